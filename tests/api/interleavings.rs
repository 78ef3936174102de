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
//! - `SledStore::check` finds no violation, and no call journal step without its delivery
//!   (every run of a dispatch pass writes one, as a run making a downstream call does).
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
    AttemptOutcome, Begin, BodyLogSettings, CallJournal, Claim, Claims, DeliveryKey, JobQueue,
    JobStatus, Maintenance, NewDelivery, Op, Operations, RetryFilter, SledOptions, SledStore,
    StoreProbe, StoredResponse,
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
    /// Run in the gap once the injection has finished or waits: what it finds broken.
    gap_check: Mutex<Option<GapCheck>>,
    gap_failures: Mutex<Vec<String>>,
}

/// A check of the store's state in a gap, run on its own thread (the paused operation's
/// thread is inside a runtime).
type GapCheck = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

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
        let check = self.gap_check.lock().expect("lock").clone();
        if let Some(check) = check {
            let found = std::thread::spawn(move || check())
                .join()
                .expect("gap check");
            self.gap_failures.lock().expect("lock").extend(found);
        }
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
    /// received_at of each delivery claimed new (retention may forget the record later).
    received: Mutex<HashMap<String, u64>>,
    /// Runs that started and were recorded succeeded, per (id, handler).
    successes: Mutex<HashMap<(String, String), usize>>,
    /// Ids of handler `a`'s run starts, in start order (the ordered world's line).
    starts_of_a: Mutex<Vec<String>>,
    /// Pairs whose run was recorded dead: retention may forget them before a retry.
    deaths: Mutex<std::collections::HashSet<(String, String)>>,
}

struct World {
    /// Handler `a` orders every delivery by one value: they all stand in one line.
    ordered: bool,
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

/// Long enough for the body log (`BODY_LOG_MIN`), so its append and reclaim are among the
/// steps paused.
fn body(tag: &str) -> Bytes {
    let pad = "p".repeat(300);
    Bytes::from(format!(
        r#"{{"type":"application.created","data":{{"tag":"{tag}","pad":"{pad}"}}}}"#
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
    let new = if w.ordered {
        new.ordered([("a".to_owned(), "K".to_owned())].into())
    } else {
        new
    };
    let claimed = w.store.claim(new).await.expect("claim");
    if matches!(claimed, Claim::New) {
        w.ledger
            .received
            .lock()
            .expect("lock")
            .insert(id.into(), received_at);
        *w.ledger
            .news
            .lock()
            .expect("lock")
            .entry(id.into())
            .or_default() += 1;
    }
    claimed
}

/// How the runs of a dispatcher pass end.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RunEnd {
    Succeed,
    Fail,
    Die,
}

/// One pass of a dispatcher: every due entry, begun and finished with `end`. Returns how
/// many runs it started.
async fn dispatch_pass(w: &World, end: RunEnd) -> usize {
    let due = w
        .store
        .due_jobs(u64::MAX / 2, 100, &Default::default())
        .await
        .expect("queue");
    let mut started = 0;
    for entry in due {
        let begun = w
            .store
            .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
            .await
            .expect("begin");
        let Begin::Started(attempt) = begun else {
            continue;
        };
        started += 1;
        // The run makes a downstream call: its journal step is written while it runs.
        let record = webhook_inbox::store::CallRecord {
            request: "POST http://partner.test/links".into(),
            fingerprint: "f".into(),
            status: 201,
            content_type: None,
            location: None,
            body: Vec::new(),
            body_truncated: false,
            attempts: 1,
            at_ms: NOW,
            replayed: 0,
        };
        w.store
            .journal_put(&entry.job, "call", &record)
            .await
            .expect("journal");
        if entry.job.handler == "a" {
            w.ledger
                .starts_of_a
                .lock()
                .expect("lock")
                .push(entry.job.delivery.id.clone());
        }
        let outcome = match end {
            RunEnd::Succeed => {
                *w.ledger
                    .successes
                    .lock()
                    .expect("lock")
                    .entry((entry.job.delivery.id.clone(), entry.job.handler.clone()))
                    .or_default() += 1;
                AttemptOutcome::Succeeded
            }
            RunEnd::Fail => AttemptOutcome::RetryAt {
                due_ms: NOW + 60_000,
                error: "not yet".into(),
            },
            RunEnd::Die => {
                w.ledger
                    .deaths
                    .lock()
                    .expect("lock")
                    .insert((entry.job.delivery.id.clone(), entry.job.handler.clone()));
                AttemptOutcome::Dead {
                    error: "gave up".into(),
                }
            }
        };
        w.store
            .finish_attempt(&entry.job, attempt.attempt, outcome, NOW)
            .await
            .expect("finish");
    }
    started
}

async fn sweep(w: &World) {
    while w
        .store
        .expire(NOW + 1, NOW + 1, 2)
        .await
        .expect("expire")
        .examined
        == 2
    {}
}

/// A backfill of handler `c` (configured later: no claim binds it) over every stored
/// delivery, two at a time; in the ordered world `c` is ordered by the same value as `a`.
async fn backfill_c(w: &World) {
    let mut after = None;
    loop {
        let batch = w
            .store
            .received_between(0, u64::MAX / 2, after.as_ref(), 2)
            .await
            .expect("received");
        let Some(last) = batch.last().cloned() else {
            break;
        };
        let order = w.ordered.then(|| "K".to_owned());
        let pairs: Vec<_> = batch
            .iter()
            .map(|r| (r.key.clone(), order.clone()))
            .collect();
        w.store.bind_handler("c", &pairs).await.expect("bind");
        after = Some(last);
    }
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
    DispatchDies,
    /// A pass whose runs die, then a bulk retry of the dead pairs (in the ordered world a
    /// dead pair goes back in its line, behind the one now active).
    DieThenRetryDead,
    /// The same, then a pass whose runs succeed (a line hands on to a retried pair).
    DieRetryDeadThenSucceed,
    OperatorRetry,
    RetentionSweep,
    BulkRetry,
    Backfill,
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
    Backfill,
}

/// The state every scenario starts from, received before `NOW` (so a sweep finds them
/// expired): `w` and `z`, whose handlers both succeeded, and `y`, whose handlers both
/// failed once and wait in the queue. `w` came first, alone in its body log segment: a
/// sweep reclaims that segment while `y` is kept.
async fn setup(w: &World) {
    claim(w, "w", &body("w"), NOW - 20_000).await;
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
        let outcome = if entry.job.delivery.id != "y" {
            *w.ledger
                .successes
                .lock()
                .expect("lock")
                .entry((entry.job.delivery.id.clone(), entry.job.handler.clone()))
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
        Paused::DispatchSucceeds => {
            dispatch_pass(w, RunEnd::Succeed).await;
        }
        Paused::DispatchFails => {
            dispatch_pass(w, RunEnd::Fail).await;
        }
        Paused::DispatchDies => {
            dispatch_pass(w, RunEnd::Die).await;
        }
        Paused::DieThenRetryDead => {
            dispatch_pass(w, RunEnd::Die).await;
            let filter = RetryFilter {
                source: None,
                handler: None,
                status: JobStatus::Dead,
                since_ms: None,
                until_ms: None,
            };
            w.store.retry_all(&filter, NOW).await.expect("bulk retry");
        }
        Paused::DieRetryDeadThenSucceed => {
            Box::pin(run_paused(w, Paused::DieThenRetryDead)).await;
            dispatch_pass(w, RunEnd::Succeed).await;
        }
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
        Paused::Backfill => backfill_c(w).await,
    }
}

async fn run_injected(w: &World, op: Injected) {
    match op {
        Injected::DispatchPass => {
            dispatch_pass(w, RunEnd::Succeed).await;
        }
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
        Injected::Backfill => backfill_c(w).await,
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// A store with `fsync`, the default: a claim's `received` index item is then held in
/// memory until its batch's entry is written (`received`), so every gap after it sees the
/// item held, as a server's readers do.
fn world(probe: Arc<Probe>, ordered: bool) -> World {
    let dir = tempfile::TempDir::new().expect("dir");
    let store = SledStore::open_with(
        &dir.path().join("data"),
        Durability::Fsync,
        4 << 20,
        SledOptions {
            probe: Some(probe),
            // About two bodies a segment, bounds to the millisecond: appends seal segments,
            // and sweeps reclaim them.
            body_log: BodyLogSettings {
                segment_bytes: 700,
                bound_step_ms: 1,
            },
            ..SledOptions::default()
        },
    )
    .expect("store");
    World {
        ordered,
        store: Arc::new(store),
        source: Arc::new(source()),
        ledger: Arc::default(),
        _dir: dir,
    }
}

/// Every delivery id a scenario can claim.
const IDS: [&str; 6] = ["x", "y", "z", "x-again", "z2", "z3"];

/// The ordered world's line: the pairs of handler `a` that could run now (a queue entry,
/// not final, or running under a live lease). More than one breaks `order_by`.
async fn line_breaches(w: &World) -> Vec<String> {
    let mut could_run = std::collections::BTreeSet::new();
    for entry in w
        .store
        .due_jobs(u64::MAX / 2, 1000, &Default::default())
        .await
        .expect("queue")
    {
        if entry.job.handler == "a"
            && !w
                .store
                .job(&entry.job)
                .await
                .expect("job")
                .is_some_and(|s| s.is_final())
        {
            could_run.insert(entry.job.delivery.id);
        }
    }
    for id in IDS {
        let job = DeliveryKey::new("credicorp", id).job("a");
        if let Some(state) = w.store.job(&job).await.expect("job")
            && state.status == JobStatus::Running
            && state.lease.is_some_and(|l| l.until_ms > NOW)
        {
            could_run.insert(id.to_owned());
        }
    }
    if could_run.len() > 1 {
        vec![format!(
            "one line, several pairs that may run: {could_run:?}"
        )]
    } else {
        Vec::new()
    }
}

/// Runs one scenario; returns the steps the paused operation went through (with
/// `target: None`) or the failures found.
fn scenario(
    ordered: bool,
    paused: Paused,
    target: Option<(Op, &'static str, usize)>,
    injected: Injected,
) -> Result<Vec<(Op, &'static str, usize)>, String> {
    let probe = Arc::new(Probe::default());
    let w = Arc::new(world(probe.clone(), ordered));
    block_on(setup(&w));
    probe.counts.lock().expect("lock").clear();
    probe.steps.lock().expect("lock").clear();
    *probe.target.lock().expect("lock") = target;
    if ordered {
        let w = w.clone();
        *probe.gap_check.lock().expect("lock") =
            Some(Arc::new(move || block_on(line_breaches(&w))));
    }
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
    let mut failures = probe.gap_failures.lock().expect("lock").clone();
    // Everything left runs now: dead pairs retried, then passes until nothing starts (a
    // line hands on one pair per pass).
    block_on(async {
        let filter = RetryFilter {
            source: None,
            handler: None,
            status: JobStatus::Dead,
            since_ms: None,
            until_ms: None,
        };
        w.store.retry_all(&filter, NOW).await.expect("retry dead");
        for _ in 0..20 {
            if ordered {
                failures.extend(line_breaches(&w).await);
            }
            if dispatch_pass(&w, RunEnd::Succeed).await == 0 {
                break;
            }
        }
    });
    let news = w.ledger.news.lock().expect("lock").clone();
    let successes = w.ledger.successes.lock().expect("lock").clone();
    let deaths = w.ledger.deaths.lock().expect("lock").clone();
    for (id, n) in &news {
        let forgotten = block_on(w.store.record(&DeliveryKey::new("credicorp", id.as_str())))
            .expect("record")
            .is_none();
        for h in HANDLERS {
            let ran = successes
                .get(&(id.clone(), h.to_owned()))
                .copied()
                .unwrap_or(0);
            // A pair that died is final: retention may forget it before the retry.
            let died_and_expired =
                ran == 0 && forgotten && deaths.contains(&(id.clone(), h.to_owned()));
            if ran != *n && !died_and_expired {
                failures.push(format!(
                    "{id}#{h}: claimed new {n} time(s) but succeeded {ran} time(s)"
                ));
            }
        }
    }
    // The backfilled handler: at most one run per delivery, and one for every delivery
    // still stored that a backfill bound (its record lists `c`).
    for id in news.keys() {
        let ran = successes
            .get(&(id.clone(), "c".to_owned()))
            .copied()
            .unwrap_or(0);
        let record =
            block_on(w.store.record(&DeliveryKey::new("credicorp", id.as_str()))).expect("record");
        let bound = record.is_some_and(|r| r.handlers.iter().any(|h| h == "c"));
        let died = deaths.contains(&(id.clone(), "c".to_owned()));
        if ran > 1 || (bound && ran == 0 && !died) {
            failures.push(format!(
                "{id}#c (backfilled): bound {bound}, succeeded {ran} time(s)"
            ));
        }
    }
    for ((id, h), ran) in &successes {
        if !news.contains_key(id) {
            failures.push(format!(
                "{id}#{h}: ran {ran} time(s) but was never claimed new"
            ));
        }
    }
    if ordered {
        // First starts in received order (received_at, then id).
        let starts = w.ledger.starts_of_a.lock().expect("lock").clone();
        let mut first: Vec<String> = Vec::new();
        for id in starts {
            if !first.contains(&id) {
                first.push(id);
            }
        }
        let mut expected = Vec::new();
        let received = w.ledger.received.lock().expect("lock").clone();
        for id in &first {
            expected.push((received.get(id).copied(), id.clone()));
        }
        expected.sort();
        let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
        if first != expected {
            failures.push(format!(
                "line started {first:?}, received order is {expected:?}"
            ));
        }
    }
    let report = w.store.check(false, NOW).expect("check");
    failures.extend(report.violations);
    // A journal step never outlives its delivery (retention takes it with the delivery,
    // and no run of a final pair writes one).
    failures.extend(
        report
            .leftovers
            .into_iter()
            .filter(|l| l.starts_with("call journal")),
    );
    if failures.is_empty() {
        Ok(steps)
    } else {
        Err(failures.join("; "))
    }
}

/// Every paused operation at every step, with every injection in the gap.
fn every_gap(ordered: bool) {
    let injections = [
        Injected::DispatchPass,
        Injected::Redelivery,
        Injected::SameBodyNewId,
        Injected::OperatorRetry,
        Injected::RetentionSweep,
        Injected::BulkRetry,
        Injected::Backfill,
    ];
    let paused_ops = [
        Paused::ClaimNew,
        Paused::ClaimSameBody,
        Paused::DispatchSucceeds,
        Paused::DispatchFails,
        Paused::DispatchDies,
        Paused::DieThenRetryDead,
        Paused::DieRetryDeadThenSucceed,
        Paused::OperatorRetry,
        Paused::RetentionSweep,
        Paused::BulkRetry,
        Paused::Backfill,
    ];
    let mut failures = Vec::new();
    let mut scenarios = 0;
    let mut seen = std::collections::HashSet::new();
    for paused in paused_ops {
        // A dry run lists the steps this operation goes through from the common start.
        let steps = scenario(ordered, paused, None, Injected::DispatchPass).expect("dry run");
        assert!(!steps.is_empty(), "{paused:?} reports its steps");
        seen.extend(steps.iter().map(|(_, step, _)| *step));
        for step in steps {
            for injected in injections {
                scenarios += 1;
                if let Err(e) = scenario(ordered, paused, Some(step), injected) {
                    failures.push(format!(
                        "{paused:?} stopped at {step:?}, {injected:?} in the gap: {e}"
                    ));
                }
            }
        }
    }
    assert!(scenarios > 100, "only {scenarios} scenarios");
    // The body log's append (a body's frame, and the journal frame of a claim whose body
    // stays in its record), the deletion of a reclaimed segment and retention's removal of
    // the index items of a pass have their gaps tried.
    for step in [
        "after-body-log",
        "after-journal",
        "before-body-reclaim",
        "after-index",
    ] {
        assert!(seen.contains(step), "no scenario reaches {step}");
    }
    if ordered {
        // Every write of a line's hand-on and of a dead pair's return has its gaps tried.
        for step in [
            "after-promotion",
            "after-promoted-state",
            "after-line-entry",
            "after-parked-state",
        ] {
            assert!(seen.contains(step), "no scenario reaches {step}");
        }
    }
    eprintln!("{scenarios} interleavings checked");
    assert!(
        failures.is_empty(),
        "{} of {scenarios} interleavings broke an invariant:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_gap_of_every_store_operation_keeps_the_invariants() {
    every_gap(false);
}

/// The same with handler `a` ordered by one value for every delivery (`order_by`): besides
/// the invariants, in every gap at most one pair of the line may run, and the line starts
/// its pairs in received order.
#[test]
fn every_gap_keeps_an_order_by_line_to_one_runner_in_received_order() {
    every_gap(true);
}

/// Parks the first pair a bulk retry has locked until the test releases it, and counts the
/// batches. If the retry ran on the test's only runtime thread, nothing could release it:
/// the park gives up after a while and says so.
#[derive(Default)]
struct ParkFirstRetry {
    armed: AtomicBool,
    parked: AtomicBool,
    released: Mutex<bool>,
    wake: std::sync::Condvar,
    held_the_runtime: AtomicBool,
    batches: std::sync::atomic::AtomicUsize,
}

impl StoreProbe for ParkFirstRetry {
    fn at(&self, op: Op, step: &'static str) {
        if op != Op::Retry {
            return;
        }
        if step == "batch" {
            self.batches.fetch_add(1, Ordering::SeqCst);
        }
        if step == "locked" && self.armed.swap(false, Ordering::SeqCst) {
            self.parked.store(true, Ordering::SeqCst);
            let released = self.released.lock().expect("lock");
            let (_released, wait) = self
                .wake
                .wait_timeout_while(released, std::time::Duration::from_secs(10), |r| !*r)
                .expect("lock");
            if wait.timed_out() {
                self.held_the_runtime.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// Issue 22, item 6: a bulk retry on sled runs off the async worker, in batches of
/// `RETRY_BATCH` index entries: while it works, the same runtime thread serves other
/// requests (it held the admin worker for a second over 30 001 pairs, and `/readyz` with it).
#[tokio::test]
async fn a_bulk_retry_runs_in_batches_off_the_async_worker() {
    let probe = Arc::new(ParkFirstRetry::default());
    let dir = tempfile::TempDir::new().expect("dir");
    let store = Arc::new(
        SledStore::open_with(
            &dir.path().join("data"),
            Durability::Buffered,
            8 << 20,
            SledOptions {
                probe: Some(probe.clone()),
                ..SledOptions::default()
            },
        )
        .expect("store"),
    );
    let source = source();
    let pairs = 2 * webhook_inbox::store::RETRY_BATCH + 10;
    for i in 0..pairs {
        let id = format!("bulk{i:05}");
        let delivery = webhook_inbox::testing::authenticated(
            &source,
            &id,
            format!(r#"{{"type":"application.created","n":{i}}}"#).as_bytes(),
            SystemTime::now(),
        )
        .expect("signed");
        let new =
            NewDelivery::new(delivery, NOW, vec!["a".into()], false).acknowledged(StoredResponse {
                status: 202,
                body: "{}".into(),
            });
        store.claim(new).await.expect("claim");
    }
    loop {
        let due = store
            .due_jobs(u64::MAX / 2, 1000, &Default::default())
            .await
            .expect("queue");
        if due.is_empty() {
            break;
        }
        for entry in due {
            let Begin::Started(a) = store
                .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
                .await
                .expect("begin")
            else {
                panic!("starts")
            };
            let dead = AttemptOutcome::Dead {
                error: "down".into(),
            };
            store
                .finish_attempt(&entry.job, a.attempt, dead, NOW)
                .await
                .expect("finish");
        }
    }
    probe.armed.store(true, Ordering::SeqCst);
    let retry = {
        let store = store.clone();
        tokio::spawn(async move {
            let filter = RetryFilter {
                source: None,
                handler: None,
                status: JobStatus::Dead,
                since_ms: None,
                until_ms: None,
            };
            store.retry_all(&filter, NOW).await.expect("bulk retry")
        })
    };
    // This test's runtime has one thread: it gets here only if the retry let go of it.
    let parked = crate::helpers::eventually(std::time::Duration::from_secs(20), || {
        probe.parked.load(Ordering::SeqCst)
    })
    .await;
    *probe.released.lock().expect("lock") = true;
    probe.wake.notify_all();
    assert_eq!(
        retry.await.expect("joined"),
        pairs,
        "every dead pair requeued"
    );
    assert!(parked);
    assert!(
        !probe.held_the_runtime.load(Ordering::SeqCst),
        "the bulk retry held the async worker while it worked"
    );
    assert!(
        probe.batches.load(Ordering::SeqCst) >= 3,
        "{pairs} dead pairs in batches of {}",
        webhook_inbox::store::RETRY_BATCH
    );
}
