//! `order_by` through the whole service (design.md, "Delivery control"): deliveries sent by
//! many senders at once, 50 application ids × 20 deliveries each, a handler that takes a
//! moment per run and sometimes fails. Per application id: runs never overlap, they start
//! in received order (a failed run holds the later ones until its retry succeeds), and
//! every delivery succeeds once. The same across a `kill -9` of the real binary.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
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
    let client = crate::helpers::client();
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

/// Keys and deliveries per key of the crash variant: as many as above.
const CRASH_KEYS: usize = KEYS;
const CRASH_PER_KEY: usize = PER_KEY;
const KILLS: usize = 4;

/// The same promise across `kill -9` of the real binary and restarts, with a `command`
/// handler that logs each run's start and end and fails the first attempt of some
/// deliveries: per key, a delivery's first run starts only after the previous delivery's
/// run succeeded, deliveries start in received order, and every one succeeded.
#[test]
fn order_holds_across_kill_dash_nine_and_restart() {
    use std::process::Command;
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
    use std::time::Instant;

    let dir = tempfile::TempDir::new().expect("dir");
    let log = dir.path().join("runs.log");
    // Fails the first attempt of every delivery whose seq is 3, 7 or 11.
    let script = r#"echo "start $WEBHOOK_ID $WEBHOOK_ATTEMPT" >> "$1"; cat > /dev/null; sleep 0.01; case "$WEBHOOK_ID" in *_3|*_7|*_11) if [ "$WEBHOOK_ATTEMPT" = 1 ]; then echo "fail $WEBHOOK_ID $WEBHOOK_ATTEMPT" >> "$1"; exit 1; fi;; esac; echo "end $WEBHOOK_ID $WEBHOOK_ATTEMPT" >> "$1""#;
    let extra = format!(
        "\n[[handlers]]\nname = \"ordered\"\nkind = \"command\"\nsource = \"credicorp\"\norder_by = {POINTER:?}\ncommand = [\"sh\", \"-c\", {script:?}, \"sh\", \"{}\"]\n",
        log.display()
    );
    let text = crate::helpers::config_text(
        dir.path(),
        &Options {
            extra_toml: extra,
            sled_only: true,
            ..Options::default()
        },
    );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, &text).expect("write config");
    let config = webhook_inbox::config::Config::parse(&text, "t.toml").expect("config");

    let (mut child, port) = crate::crash::start(&config_path);
    let current_port = Arc::new(AtomicU16::new(port));
    let acked = Arc::new(AtomicUsize::new(0));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // One sender per key, each in received order, retrying across the restarts.
    let senders: Vec<_> = (0..CRASH_KEYS)
        .map(|key| {
            let port = current_port.clone();
            let acked = acked.clone();
            let cfg = config.sources["credicorp"].clone();
            runtime.spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .expect("client");
                for seq in 0..CRASH_PER_KEY {
                    let (id, body) = (delivery_id(key, seq), application(key, seq));
                    crate::crash::send_until_acknowledged(&client, &port, &cfg, &id, &body).await;
                    acked.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let mut rng_state: u64 = 0x0dd5;
    for _ in 0..KILLS {
        rng_state = rng_state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(200 + (rng_state >> 33) % 800));
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        let (next, port) = crate::crash::start(&config_path);
        child = next;
        current_port.store(port, Ordering::SeqCst);
    }
    for s in senders {
        runtime.block_on(s).expect("sender finished");
    }
    assert_eq!(acked.load(Ordering::SeqCst), CRASH_KEYS * CRASH_PER_KEY);

    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ended: HashSet<String> = read()
            .lines()
            .filter_map(|l| l.strip_prefix("end "))
            .filter_map(|l| l.split(' ').next().map(str::to_owned))
            .collect();
        if ended.len() == CRASH_KEYS * CRASH_PER_KEY {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {} deliveries succeeded",
            ended.len(),
            CRASH_KEYS * CRASH_PER_KEY
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().expect("exit").success(), "graceful exit");
    crate::crash::assert_store_check_clean(&config_path);

    // Per key, in the log's order: (phase, seq).
    let mut per_key: HashMap<usize, Vec<(String, usize)>> = HashMap::new();
    for line in read().lines() {
        let mut parts = line.split(' ');
        let (Some(phase), Some(id)) = (parts.next(), parts.next()) else {
            continue;
        };
        let mut nums = id.trim_start_matches("msg_order_").split('_');
        let (Some(Ok(key)), Some(Ok(seq))) = (
            nums.next().map(str::parse::<usize>),
            nums.next().map(str::parse::<usize>),
        ) else {
            continue;
        };
        per_key
            .entry(key)
            .or_default()
            .push((phase.to_owned(), seq));
    }
    let mut breaches = Vec::new();
    for (key, events) in &per_key {
        let mut succeeded: HashSet<usize> = HashSet::new();
        let mut last_start = 0;
        for (phase, seq) in events {
            match phase.as_str() {
                "start" => {
                    if *seq < last_start {
                        breaches.push(format!("key {key}: seq {seq} started after {last_start}"));
                    }
                    if *seq > 0 && !succeeded.contains(&(seq - 1)) {
                        breaches.push(format!(
                            "key {key}: seq {seq} started before seq {} succeeded",
                            seq - 1
                        ));
                    }
                    last_start = last_start.max(*seq);
                }
                "end" => {
                    succeeded.insert(*seq);
                }
                _ => {}
            }
        }
        if succeeded.len() != CRASH_PER_KEY {
            breaches.push(format!("key {key}: {} succeeded", succeeded.len()));
        }
    }
    assert_eq!(per_key.len(), CRASH_KEYS);
    assert!(breaches.is_empty(), "{}", breaches.join("\n"));
}

mod cut {
    //! The store cut mid-operation, as a process that dies there leaves it.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::SystemTime;

    use webhook_inbox::config::{Config, Durability};
    use webhook_inbox::store::{
        AttemptOutcome, Begin, JobQueue, NewDelivery, Op, SledOptions, SledStore, StoreProbe,
        StoredResponse,
    };

    use super::{application, delivery_id};

    pub const NOW: u64 = 2_000_000_000_000;

    /// Dies (panics, leaving the rest of the operation unwritten) at one step once armed.
    pub struct DieAt {
        pub op: Op,
        pub step: &'static str,
        pub armed: AtomicBool,
    }

    impl StoreProbe for DieAt {
        fn at(&self, op: Op, step: &'static str) {
            if op == self.op && step == self.step && self.armed.load(Ordering::SeqCst) {
                panic!("the process dies here");
            }
        }
    }

    pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    /// Opens the store. A store dropped a moment ago in this process (the one that "died")
    /// may still hold sled's file lock while sled's own threads wind down: retried until
    /// a deadline.
    pub fn open(path: &std::path::Path, probe: Option<Arc<DieAt>>, repair: bool) -> SledStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match SledStore::open_with(
                path,
                Durability::Fsync,
                4 << 20,
                SledOptions {
                    probe: probe.clone().map(|p| p as Arc<dyn StoreProbe>),
                    repair_on_open: repair,
                    ..SledOptions::default()
                },
            ) {
                Ok(store) => return store,
                Err(e) if std::time::Instant::now() > deadline => panic!("store: {e:?}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }

    /// Delivery `seq` of application 0, ordered by it for handler `h`.
    pub fn ordered(seq: usize, received_at: u64) -> NewDelivery {
        let config = Config::parse(
            "[sources.credicorp]\nsecrets = [\"whsec_b3JkZXI=\"]\n",
            "order.toml",
        )
        .expect("config");
        let source = webhook_inbox::verify::Source::named(&config, "credicorp").expect("source");
        let body = application(0, seq);
        let d = webhook_inbox::testing::authenticated(
            &source,
            &delivery_id(0, seq),
            body.as_bytes(),
            SystemTime::now(),
        )
        .expect("signed");
        NewDelivery::new(d, received_at, vec!["h".into()], false)
            .acknowledged(StoredResponse {
                status: 202,
                body: "{}".into(),
            })
            .ordered([("h".to_owned(), "app_0".to_owned())].into())
    }

    /// Runs `op` on its own thread, where the probe makes it die.
    pub fn dies<T: Send + 'static>(
        op: impl std::future::Future<Output = T> + Send + 'static,
    ) -> bool {
        std::thread::spawn(move || block_on(op)).join().is_err()
    }

    /// The ids due now, and whether each starts.
    pub fn startable(store: &SledStore) -> Vec<(String, bool)> {
        let due = block_on(store.due_jobs(u64::MAX / 2, 10, &Default::default())).expect("queue");
        due.iter()
            .map(|q| {
                let begun =
                    block_on(store.begin_attempt(&q.job, Some(q.due_ms), NOW, NOW + 30_000))
                        .expect("begin");
                (
                    q.job.delivery.id.clone(),
                    matches!(begun, Begin::Started(_)),
                )
            })
            .collect()
    }

    pub fn succeed(store: &SledStore, id: &str) {
        let job = webhook_inbox::store::DeliveryKey::new("credicorp", id).job("h");
        let state = block_on(store.job(&job)).expect("job").expect("state");
        block_on(store.finish_attempt(&job, state.attempts, AttemptOutcome::Succeeded, NOW))
            .expect("finish");
    }
}

/// The run of the next pair of a line starts only once its predecessor's outcome is on
/// disk: its start waits for a sync (a start of an unordered pair need not), so a `kill -9`
/// right after it cannot bring the earlier delivery back to run after it.
#[test]
fn the_next_pair_of_a_line_starts_only_once_the_outcome_before_it_is_durable() {
    use cut::*;
    use std::sync::atomic::Ordering;
    use webhook_inbox::store::Claims;

    let dir = tempfile::TempDir::new().expect("dir");
    let store = open(&dir.path().join("data"), None, true);
    block_on(store.claim(ordered(0, NOW - 2000))).expect("claim");
    block_on(store.claim(ordered(1, NOW - 1000))).expect("claim");
    assert_eq!(startable(&store), [("msg_order_0_0".to_owned(), true)]);
    succeed(&store, "msg_order_0_0");
    let waiters = || store.group_commit().stats().waiters.load(Ordering::SeqCst);
    let before = waiters();
    assert_eq!(startable(&store), [("msg_order_0_1".to_owned(), true)]);
    assert!(
        waiters() > before,
        "the second pair started before the first one's outcome was synced"
    );
}

/// A process that dies between a pair's final outcome and the promotion of the next pair
/// in its line leaves a line with nobody to run: `store check` reports it, and the next
/// start repairs it before anything runs.
#[test]
fn a_line_cut_between_an_outcome_and_its_promotion_is_repaired_at_start() {
    use cut::*;
    use std::sync::atomic::Ordering;
    use webhook_inbox::store::{AttemptOutcome, Claims, JobQueue, Op};

    let dir = tempfile::TempDir::new().expect("dir");
    let path = dir.path().join("data");
    let die = Arc::new(DieAt {
        op: Op::FinishAttempt,
        step: "after-job-state",
        armed: Default::default(),
    });
    let store = Arc::new(open(&path, Some(die.clone()), true));
    block_on(store.claim(ordered(0, NOW - 2000))).expect("claim");
    block_on(store.claim(ordered(1, NOW - 1000))).expect("claim");
    assert_eq!(startable(&store), [("msg_order_0_0".to_owned(), true)]);
    die.armed.store(true, Ordering::SeqCst);
    let job = webhook_inbox::store::DeliveryKey::new("credicorp", "msg_order_0_0").job("h");
    let s = store.clone();
    assert!(dies(async move {
        s.finish_attempt(&job, 1, AttemptOutcome::Succeeded, NOW)
            .await
    }));
    drop(store);

    let inspect = open(&path, None, false);
    let report = inspect.check(false, NOW).expect("check");
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.contains("msg_order_0_1#h") && v.contains("line")),
        "{:?}",
        report.violations
    );
    drop(inspect);
    let restarted = open(&path, None, true);
    // (The first pair's own entry is still there too: a leftover dispatch drops as final.)
    let mut due = startable(&restarted);
    due.sort();
    assert_eq!(
        due,
        [
            ("msg_order_0_0".to_owned(), false),
            ("msg_order_0_1".to_owned(), true)
        ]
    );
    assert!(
        restarted
            .check(false, NOW)
            .expect("check")
            .violations
            .is_empty()
    );
}

/// A process that dies between a claim's record and its line entry (its sender then gets
/// the replay of its 202): the start-up repair puts the pair back in its line, so a later
/// delivery of the same value waits behind it.
#[test]
fn a_claim_cut_before_its_line_entry_is_put_back_in_line_at_start() {
    use cut::*;
    use webhook_inbox::store::{Claims, Op};

    let dir = tempfile::TempDir::new().expect("dir");
    let path = dir.path().join("data");
    let die = Arc::new(DieAt {
        op: Op::Claim,
        step: "after-record",
        armed: AtomicBool::new(true),
    });
    let store = Arc::new(open(&path, Some(die), true));
    let s = store.clone();
    assert!(dies(async move { s.claim(ordered(0, NOW - 2000)).await }));
    drop(store);
    let restarted = open(&path, None, true);
    block_on(restarted.claim(ordered(1, NOW - 1000))).expect("claim");
    assert_eq!(startable(&restarted), [("msg_order_0_0".to_owned(), true)]);
    succeed(&restarted, "msg_order_0_0");
    assert_eq!(startable(&restarted), [("msg_order_0_1".to_owned(), true)]);
    assert!(
        restarted
            .check(false, NOW)
            .expect("check")
            .violations
            .is_empty()
    );
}
