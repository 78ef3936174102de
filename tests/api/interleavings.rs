//! design.md's store invariants under every interleaving of the store's operations.
//!
//! Each operation of the sled store (a claim, the start and end of a run, an operator
//! retry, a retention sweep) is stopped at every step between two of its writes — the
//! [`StoreProbe`] reports them — and, in that gap, each *other* operation runs on another
//! thread: a dispatcher pass, a redelivery, the same body under a new id, an operator retry
//! (of one delivery, and in bulk), a retention sweep. The injected operation either completes inside the gap or waits for the
//! paused one's lock (the probe reports that wait, so the test never guesses with a sleep).
//! Then everything left is dispatched, and the test checks:
//! - every handler of every delivery that was claimed new ran to success exactly once per
//!   such claim (nothing acknowledged left behind, nothing run twice; invariants 1, 2, 5);
//! - one body under several ids ran its handlers once (invariant 4);
//! - `SledStore::check` finds no violation.
//!
//! The first version of the store fails the very first gap of this test: a dispatcher pass
//! between a claim's queue entry and its record dropped the entry (issue 10).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use webhook_inbox::config::{Config, Durability};
use webhook_inbox::store::{
    AttemptOutcome, Begin, Claim, DeliveryKey, DeliveryStore, JobStatus, NewDelivery, Op,
    RetryFilter, SledOptions, SledStore, StoreProbe, StoredResponse,
};
use webhook_inbox::verify::Source;

/// "Now" for every operation: fixed, so the scenarios are the same on every run.
const NOW: u64 = 2_000_000_000_000;
const LEASE: u64 = NOW + 30_000;
const HANDLERS: [&str; 2] = ["a", "b"];

/// Starts the injected operation on its own thread.
type Injection = Box<dyn FnOnce() -> std::thread::JoinHandle<()> + Send>;

/// Stops the target step once, runs the injection there, and waits until it has finished
/// or is waiting for a lock the paused operation holds.
#[derive(Default)]
struct Probe {
    /// (op, step, occurrence) to stop at; `None` records steps only.
    target: Mutex<Option<(Op, &'static str, usize)>>,
    counts: Mutex<HashMap<(Op, &'static str), usize>>,
    steps: Mutex<Vec<(Op, &'static str, usize)>>,
    injection: Mutex<Option<Injection>>,
    signal: Mutex<Option<mpsc::Sender<()>>>,
    injected: Mutex<Option<std::thread::JoinHandle<()>>>,
    fired: AtomicBool,
}

impl StoreProbe for Probe {
    fn at(&self, op: Op, step: &'static str) {
        let n = {
            let mut counts = self.counts.lock().expect("lock");
            let n = counts.entry((op, step)).or_default();
            *n += 1;
            *n
        };
        self.steps.lock().expect("lock").push((op, step, n));
        let hit = *self.target.lock().expect("lock") == Some((op, step, n));
        if !hit || self.fired.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(inject) = self.injection.lock().expect("lock").take() else {
            return;
        };
        let (tx, rx) = mpsc::channel();
        *self.signal.lock().expect("lock") = Some(tx.clone());
        let handle = inject();
        // The injection thread says "done" when it ends; `contended` says it is blocked on
        // a lock this paused operation holds. Either way the gap has been exercised.
        let watcher = {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = handle.join();
                let _ = tx.send(());
            })
        };
        rx.recv().expect("the injection ends or waits");
        *self.signal.lock().expect("lock") = None;
        *self.injected.lock().expect("lock") = Some(watcher);
    }

    fn contended(&self, _op: Op) {
        if let Some(tx) = self.signal.lock().expect("lock").as_ref() {
            let _ = tx.send(());
        }
    }
}

/// What happened, to compare with what ran.
#[derive(Default)]
struct Ledger {
    /// Claims answered `New`, per delivery id.
    news: Mutex<HashMap<String, usize>>,
    /// Runs that started and were recorded succeeded, per (id, handler).
    successes: Mutex<HashMap<(String, String), usize>>,
}

struct World {
    store: Arc<SledStore>,
    source: Arc<Source>,
    ledger: Arc<Ledger>,
    _dir: tempfile::TempDir,
}

fn source() -> Source {
    let config = Config::parse(
        "[sources.credicorp]\nsecrets = [\"whsec_dGVzdC1zZWNyZXQ=\"]\n",
        "interleavings.toml",
    )
    .expect("config");
    Source::named(&config, "credicorp").expect("source")
}

fn body(tag: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"type":"application.created","data":{{"tag":"{tag}"}}}}"#
    ))
}

async fn claim(w: &World, id: &str, body: &Bytes, received_at: u64) -> Claim {
    let delivery = webhook_inbox::testing::authenticated(&w.source, id, body, SystemTime::now())
        .expect("signed");
    let new = NewDelivery::new(
        delivery,
        received_at,
        HANDLERS.iter().map(|h| h.to_string()).collect(),
        true,
    )
    .acknowledged(StoredResponse {
        status: 202,
        body: format!(r#"{{"status":"accepted","delivery_id":"{id}"}}"#),
    });
    let claimed = w.store.claim(new).await.expect("claim");
    if matches!(claimed, Claim::New) {
        *w.ledger
            .news
            .lock()
            .expect("lock")
            .entry(id.into())
            .or_default() += 1;
    }
    claimed
}

/// One pass of a dispatcher: every due entry, begun and finished with `outcome`.
async fn dispatch_pass(w: &World, succeed: bool) {
    let due = w
        .store
        .due_jobs(u64::MAX / 2, 100, &Default::default())
        .await
        .expect("queue");
    for entry in due {
        let begun = w
            .store
            .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
            .await
            .expect("begin");
        let Begin::Started(attempt) = begun else {
            continue;
        };
        let outcome = if succeed {
            *w.ledger
                .successes
                .lock()
                .expect("lock")
                .entry((entry.job.delivery.id.clone(), entry.job.handler.clone()))
                .or_default() += 1;
            AttemptOutcome::Succeeded
        } else {
            AttemptOutcome::RetryAt {
                due_ms: NOW + 60_000,
                error: "not yet".into(),
            }
        };
        w.store
            .finish_attempt(&entry.job, attempt.attempt, outcome, NOW)
            .await
            .expect("finish");
    }
}

async fn sweep(w: &World) {
    while w.store.expire(NOW + 1, 2).await.expect("expire").examined == 2 {}
}

async fn retry(w: &World, id: &str) {
    w.store
        .retry(&DeliveryKey::new("credicorp", id), NOW)
        .await
        .expect("retry");
}

/// The operations that are paused, each a fresh scenario.
#[derive(Debug, Clone, Copy)]
enum Paused {
    ClaimNew,
    ClaimSameBody,
    DispatchSucceeds,
    DispatchFails,
    OperatorRetry,
    RetentionSweep,
    BulkRetry,
}

/// The operations run in the gap.
#[derive(Debug, Clone, Copy)]
enum Injected {
    DispatchPass,
    Redelivery,
    SameBodyNewId,
    OperatorRetry,
    RetentionSweep,
    BulkRetry,
}

/// The state every scenario starts from, received before `NOW` (so a sweep finds them
/// expired): `y`, whose handlers both failed once and wait in the queue, and `z`, whose
/// handlers both succeeded.
async fn setup(w: &World) {
    claim(w, "y", &body("y"), NOW - 10_000).await;
    claim(w, "z", &body("z"), NOW - 10_000).await;
    let due = w
        .store
        .due_jobs(u64::MAX / 2, 100, &Default::default())
        .await
        .expect("queue");
    for entry in due {
        let Begin::Started(attempt) = w
            .store
            .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
            .await
            .expect("begin")
        else {
            panic!("{} is runnable", entry.job)
        };
        let outcome = if entry.job.delivery.id == "z" {
            *w.ledger
                .successes
                .lock()
                .expect("lock")
                .entry(("z".into(), entry.job.handler.clone()))
                .or_default() += 1;
            AttemptOutcome::Succeeded
        } else {
            AttemptOutcome::RetryAt {
                due_ms: NOW + 5_000,
                error: "first try failed".into(),
            }
        };
        w.store
            .finish_attempt(&entry.job, attempt.attempt, outcome, NOW)
            .await
            .expect("finish");
    }
}

async fn run_paused(w: &World, op: Paused) {
    match op {
        Paused::ClaimNew => {
            claim(w, "x", &body("x"), NOW).await;
        }
        Paused::ClaimSameBody => {
            claim(w, "z2", &body("z"), NOW).await;
        }
        Paused::DispatchSucceeds => dispatch_pass(w, true).await,
        Paused::DispatchFails => dispatch_pass(w, false).await,
        Paused::OperatorRetry => retry(w, "y").await,
        Paused::RetentionSweep => sweep(w).await,
        Paused::BulkRetry => {
            let filter = RetryFilter {
                source: None,
                handler: None,
                status: JobStatus::Failed,
                since_ms: None,
                until_ms: None,
            };
            w.store.retry_all(&filter, NOW).await.expect("bulk retry");
        }
    }
}

async fn run_injected(w: &World, op: Injected) {
    match op {
        Injected::DispatchPass => dispatch_pass(w, true).await,
        Injected::Redelivery => {
            claim(w, "x", &body("x"), NOW).await;
        }
        Injected::SameBodyNewId => {
            claim(w, "x-again", &body("x"), NOW).await;
            claim(w, "z3", &body("z"), NOW).await;
        }
        Injected::OperatorRetry => {
            retry(w, "y").await;
            retry(w, "x").await;
        }
        Injected::RetentionSweep => sweep(w).await,
        Injected::BulkRetry => {
            for status in [JobStatus::Failed, JobStatus::Dead] {
                let filter = RetryFilter {
                    source: None,
                    handler: None,
                    status,
                    since_ms: None,
                    until_ms: None,
                };
                w.store.retry_all(&filter, NOW).await.expect("bulk retry");
            }
        }
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn world(probe: Arc<Probe>) -> World {
    let dir = tempfile::TempDir::new().expect("dir");
    let store = SledStore::open_with(
        &dir.path().join("data"),
        Durability::Buffered,
        4 << 20,
        SledOptions {
            probe: Some(probe),
            ..SledOptions::default()
        },
    )
    .expect("store");
    World {
        store: Arc::new(store),
        source: Arc::new(source()),
        ledger: Arc::default(),
        _dir: dir,
    }
}

/// Runs one scenario; returns the steps the paused operation went through (with
/// `target: None`) or the failures found.
fn scenario(
    paused: Paused,
    target: Option<(Op, &'static str, usize)>,
    injected: Injected,
) -> Result<Vec<(Op, &'static str, usize)>, String> {
    let probe = Arc::new(Probe::default());
    let w = Arc::new(world(probe.clone()));
    block_on(setup(&w));
    probe.counts.lock().expect("lock").clear();
    probe.steps.lock().expect("lock").clear();
    *probe.target.lock().expect("lock") = target;
    {
        let w = w.clone();
        *probe.injection.lock().expect("lock") = Some(Box::new(move || {
            std::thread::spawn(move || block_on(run_injected(&w, injected)))
        }));
    }
    let paused_thread = {
        let w = w.clone();
        std::thread::spawn(move || block_on(run_paused(&w, paused)))
    };
    paused_thread
        .join()
        .map_err(|_| "the paused operation panicked")?;
    let steps = probe.steps.lock().expect("lock").clone();
    if let Some(t) = probe.injected.lock().expect("lock").take() {
        t.join().map_err(|_| "the injected operation panicked")?;
    }
    if target.is_none() {
        return Ok(steps);
    }
    if !probe.fired.load(Ordering::SeqCst) {
        return Err(format!("step {target:?} was never reached"));
    }
    // Everything left runs now (twice: a retry may have made something due again).
    block_on(async {
        dispatch_pass(&w, true).await;
        dispatch_pass(&w, true).await;
    });
    let mut failures = Vec::new();
    let news = w.ledger.news.lock().expect("lock").clone();
    let successes = w.ledger.successes.lock().expect("lock").clone();
    for (id, n) in &news {
        for h in HANDLERS {
            let ran = successes
                .get(&(id.clone(), h.to_owned()))
                .copied()
                .unwrap_or(0);
            if ran != *n {
                failures.push(format!(
                    "{id}#{h}: claimed new {n} time(s) but succeeded {ran} time(s)"
                ));
            }
        }
    }
    for ((id, h), ran) in &successes {
        if !news.contains_key(id) {
            failures.push(format!(
                "{id}#{h}: ran {ran} time(s) but was never claimed new"
            ));
        }
    }
    let report = w.store.check(false, NOW).expect("check");
    failures.extend(report.violations);
    if failures.is_empty() {
        Ok(steps)
    } else {
        Err(failures.join("; "))
    }
}

#[test]
fn every_gap_of_every_store_operation_keeps_the_invariants() {
    let injections = [
        Injected::DispatchPass,
        Injected::Redelivery,
        Injected::SameBodyNewId,
        Injected::OperatorRetry,
        Injected::RetentionSweep,
        Injected::BulkRetry,
    ];
    let paused_ops = [
        Paused::ClaimNew,
        Paused::ClaimSameBody,
        Paused::DispatchSucceeds,
        Paused::DispatchFails,
        Paused::OperatorRetry,
        Paused::RetentionSweep,
        Paused::BulkRetry,
    ];
    let mut failures = Vec::new();
    let mut scenarios = 0;
    for paused in paused_ops {
        // A dry run lists the steps this operation goes through from the common start.
        let steps = scenario(paused, None, Injected::DispatchPass).expect("dry run");
        assert!(!steps.is_empty(), "{paused:?} reports its steps");
        for step in steps {
            for injected in injections {
                scenarios += 1;
                if let Err(e) = scenario(paused, Some(step), injected) {
                    failures.push(format!(
                        "{paused:?} stopped at {step:?}, {injected:?} in the gap: {e}"
                    ));
                }
            }
        }
    }
    assert!(scenarios > 100, "only {scenarios} scenarios");
    eprintln!("{scenarios} interleavings checked");
    assert!(
        failures.is_empty(),
        "{} of {scenarios} interleavings broke an invariant:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
