//! `order_by` through the whole service (design.md, "Delivery control"): deliveries sent by
//! many senders at once, 50 application ids × 20 deliveries each, a handler that takes a
//! moment per run and sometimes fails. Per application id: runs never overlap, they start
//! in received order (a failed run holds the later ones until its retry succeeds), and
//! every delivery succeeds once. The same across a `kill -9` of the real binary.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use webhook_inbox::{Delivery, Handler, HandlerContext, HandlerError, Registration};

use crate::helpers::{Options, eventually, spawn_with};

const KEYS: usize = 50;
const PER_KEY: usize = 20;
const SENDERS: usize = 16;
const POINTER: &str = "/data/application/application_id";

fn application(key: usize, seq: usize) -> String {
    format!(
        r#"{{"type":"application.updated","data":{{"application":{{"application_id":"app_{key}","seq":{seq}}}}}}}"#
    )
}

fn delivery_id(key: usize, seq: usize) -> String {
    format!("msg_order_{key}_{seq}")
}

/// The order the senders go in: every key `PER_KEY` times, shuffled (a fixed LCG, so each
/// run sends in the same order); a key's own deliveries go out one after another.
fn shuffled_sends() -> Vec<usize> {
    let mut sends: Vec<usize> = (0..KEYS)
        .flat_map(|k| std::iter::repeat_n(k, PER_KEY))
        .collect();
    let mut state: u64 = 0x5eed;
    for i in (1..sends.len()).rev() {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        sends.swap(i, (state >> 33) as usize % (i + 1));
    }
    sends
}

/// Whether the run of `seq` fails on its first attempt.
fn fails_first(seq: usize) -> bool {
    seq % 7 == 3
}

/// What the handler saw, per application id.
#[derive(Clone, Default)]
struct OrderLog {
    inner: Arc<Mutex<LogState>>,
}

#[derive(Default)]
struct LogState {
    /// Per key: the seq of each run start, in start order.
    starts: HashMap<String, Vec<usize>>,
    /// Keys with a run going.
    running: HashSet<String>,
    /// Runs that started while another run of the same key was going.
    overlaps: Vec<String>,
    /// Succeeded runs per delivery id.
    successes: HashMap<String, usize>,
}

#[async_trait]
impl Handler for OrderLog {
    async fn handle(&self, d: &Delivery, _: &HandlerContext) -> Result<(), HandlerError> {
        let body: serde_json::Value =
            serde_json::from_slice(&d.body).map_err(|e| HandlerError::Permanent(e.to_string()))?;
        let key = body
            .pointer(POINTER)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        let seq = body
            .pointer("/data/application/seq")
            .and_then(|v| v.as_u64())
            .unwrap_or_default() as usize;
        {
            let mut s = self.inner.lock().expect("lock");
            if !s.running.insert(key.clone()) {
                s.overlaps
                    .push(format!("{key}: seq {seq} started while another ran"));
            }
            s.starts.entry(key.clone()).or_default().push(seq);
        }
        // The handler's own work (a downstream call), so that runs have a length to overlap.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let mut s = self.inner.lock().expect("lock");
        s.running.remove(&key);
        if fails_first(seq) && d.attempt == 1 {
            return Err(HandlerError::Retryable("downstream busy".into()));
        }
        *s.successes.entry(d.id.clone()).or_default() += 1;
        Ok(())
    }
}

impl OrderLog {
    fn succeeded(&self) -> usize {
        self.inner.lock().expect("lock").successes.len()
    }

    /// Every breach of the ordering contract, one line each.
    fn breaches(&self) -> Vec<String> {
        let s = self.inner.lock().expect("lock");
        let mut breaches = s.overlaps.clone();
        for (id, n) in &s.successes {
            if *n != 1 {
                breaches.push(format!("{id} succeeded {n} times"));
            }
        }
        for (key, starts) in &s.starts {
            // Received order, a failed run started again before the next one.
            if starts.windows(2).any(|w| w[1] < w[0]) {
                breaches.push(format!("{key}: runs started in the order {starts:?}"));
            }
            let distinct: HashSet<&usize> = starts.iter().collect();
            if distinct.len() != PER_KEY {
                breaches.push(format!("{key}: {} of {PER_KEY} ran", distinct.len()));
            }
        }
        breaches
    }
}

/// A delivery ready to send: id, body, signature headers.
type SignedDelivery = (String, String, Vec<(String, String)>);

/// Sends every delivery: `SENDERS` at once, in the shuffled order, each key's next one only
/// once its previous one is acknowledged (so received order per key is the send order).
async fn send_all(address: String, sign: impl Fn(&str, &[u8]) -> Vec<(String, String)>) {
    let client = reqwest::Client::new();
    let sends = shuffled_sends();
    let keys: Arc<Vec<tokio::sync::Mutex<usize>>> =
        Arc::new((0..KEYS).map(|_| tokio::sync::Mutex::new(0)).collect());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let signed: Arc<Vec<SignedDelivery>> = Arc::new(
        (0..KEYS)
            .flat_map(|k| (0..PER_KEY).map(move |s| (k, s)))
            .map(|(k, s)| {
                let body = application(k, s);
                let headers = sign(&delivery_id(k, s), body.as_bytes());
                (delivery_id(k, s), body, headers)
            })
            .collect(),
    );
    let sends = Arc::new(sends);
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let (client, sends, keys, next, signed, address) = (
            client.clone(),
            sends.clone(),
            keys.clone(),
            next.clone(),
            signed.clone(),
            address.clone(),
        );
        senders.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(&key) = sends.get(i) else { break };
                let mut seq = keys[key].lock().await;
                let (_, body, headers) = &signed[key * PER_KEY + *seq];
                let mut request = client
                    .post(format!("{address}/webhooks/credicorp"))
                    .body(body.clone());
                for (k, v) in headers {
                    request = request.header(k.as_str(), v.as_str());
                }
                let status = request.send().await.expect("sent").status().as_u16();
                assert_eq!(status, 202, "key {key} seq {}", *seq);
                *seq += 1;
            }
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
}

/// Many senders at once, one handler ordered by application id, failures on the way: per
/// id no overlap, received order, each delivery succeeded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_one_key_never_overlap_and_start_in_received_order() {
    let log = OrderLog::default();
    let app = spawn_with(Options {
        handlers: vec![
            Registration::new("ordered", log.clone())
                .source("credicorp")
                .ordered_by(POINTER),
        ],
        ..Options::default()
    })
    .await;
    send_all(app.address.clone(), |id, body| app.sign(id, body)).await;
    assert!(
        eventually(Duration::from_secs(120), || log.succeeded()
            == KEYS * PER_KEY)
        .await,
        "{} of {} succeeded",
        log.succeeded(),
        KEYS * PER_KEY
    );
    let breaches = log.breaches();
    assert!(breaches.is_empty(), "{}", breaches.join("\n"));
    // The unordered recorder beside it ran every delivery too.
    assert!(
        eventually(Duration::from_secs(30), || app.recorder.runs().len()
            == KEYS * PER_KEY)
        .await
    );
    app.stop().await;
}
