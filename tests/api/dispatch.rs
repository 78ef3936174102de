//! The dispatcher over the durable queue, driven by tokio's paused clock: back-off,
//! dead letters, siblings untouched, crash recovery, retention. Real sled store, real
//! dispatcher; only time is simulated.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use webhook_inbox::clock::Clock;
use webhook_inbox::config::{Config, DispatchConfig, Durability};
use webhook_inbox::dispatch::{Dispatcher, Runner};
use webhook_inbox::handlers::HandlerRegistry;
use webhook_inbox::store::{
    Begin, Claim, Claims, DeliveryKey, DeliveryStore, JobQueue, JobStatus, Maintenance,
    NewDelivery, SledStore, StoredResponse,
};
use webhook_inbox::verify::Source;
use webhook_inbox::{Delivery, Handler, HandlerContext, HandlerError, Registration};

/// Records (attempt, idempotency key, virtual time) and fails the first `fail_first` runs
/// (`u32::MAX`: always; `permanent`: with a permanent error).
#[derive(Clone)]
struct Timed {
    clock: Clock,
    runs: Arc<Mutex<Vec<(u32, String, u64)>>>,
    fail_first: u32,
    permanent: bool,
}

impl Timed {
    fn new(clock: Clock, fail_first: u32) -> Timed {
        Timed {
            clock,
            runs: Arc::default(),
            fail_first,
            permanent: false,
        }
    }
    fn runs(&self) -> Vec<(u32, String, u64)> {
        self.runs.lock().expect("lock").clone()
    }
}

#[async_trait]
impl Handler for Timed {
    async fn handle(&self, d: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError> {
        self.runs.lock().expect("lock").push((
            d.attempt,
            ctx.idempotency_key.clone(),
            self.clock.now_ms(),
        ));
        if d.attempt <= self.fail_first {
            return Err(if self.permanent {
                HandlerError::Permanent("no".into())
            } else {
                HandlerError::Retryable("not yet".into())
            });
        }
        Ok(())
    }
}

fn config() -> Config {
    Config::parse(
        "[sources.credicorp]\nsecrets = [\"whsec_dGVzdA==\"]\n",
        "t.toml",
    )
    .expect("config")
}

fn dispatch_config() -> DispatchConfig {
    DispatchConfig {
        concurrency: 4,
        max_attempts: 4,
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(3600),
        shutdown_grace: Duration::from_secs(5),
        ..DispatchConfig::default()
    }
}

/// Opens the store; after a previous instance in this process was dropped, sled may hold
/// its file lock a moment longer (its IO threads finish on their own), so retry on a real
/// clock until a deadline.
fn open(dir: &std::path::Path) -> Arc<SledStore> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match SledStore::open(&dir.join("data"), Durability::Buffered, 8 << 20) {
            Ok(store) => return Arc::new(store),
            Err(e) if std::time::Instant::now() > deadline => panic!("store does not open: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

async fn claim(store: &dyn DeliveryStore, id: &str, handlers: &[&str], at_ms: u64) {
    let body = Bytes::from(format!(r#"{{"type":"application.created","id":"{id}"}}"#));
    let source = Source::named(&config(), "credicorp").expect("source");
    let delivery =
        webhook_inbox::testing::authenticated(&source, id, &body, std::time::SystemTime::now())
            .expect("signed");
    let new = NewDelivery::new(
        delivery,
        at_ms,
        handlers.iter().map(|h| h.to_string()).collect(),
        false,
    )
    .acknowledged(StoredResponse {
        status: 202,
        body: "{}".into(),
    });
    let claimed = store.claim(new).await.expect("claim");
    assert!(matches!(claimed, Claim::New));
}

async fn status(store: &dyn DeliveryStore, id: &str, handler: &str) -> Option<(JobStatus, u32)> {
    store
        .job(&DeliveryKey::new("credicorp", id).job(handler))
        .await
        .expect("read")
        .map(|j| (j.status, j.attempts))
}

fn start(
    store: Arc<dyn DeliveryStore>,
    clock: Clock,
    handlers: Vec<Registration>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let (stop, task, _) = start_with_waker(store, clock, handlers);
    (stop, task)
}

/// [`start`], with the notice ingest gives the dispatcher after each claim.
fn start_with_waker(
    store: Arc<dyn DeliveryStore>,
    clock: Clock,
    handlers: Vec<Registration>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<()>,
    Arc<tokio::sync::Notify>,
) {
    let registry = HandlerRegistry::build(&config(), handlers).expect("registry");
    let metrics = Arc::new(webhook_inbox::metrics::Metrics::new());
    let calls = webhook_inbox::calls::CallService::new(
        Some(store.clone()),
        clock,
        Default::default(),
        Default::default(),
    );
    let dispatcher = Dispatcher::new(Runner::new(
        store,
        Arc::new(registry),
        dispatch_config(),
        clock,
        CancellationToken::new(),
        metrics,
        calls,
    ));
    let waker = dispatcher.waker();
    let stop = CancellationToken::new();
    let task = tokio::spawn(dispatcher.run(stop.clone()));
    (stop, task, waker)
}

/// Polls in virtual time (each sleep lets the paused clock jump ahead).
async fn until(mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..100_000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition never held");
}

#[tokio::test(start_paused = true)]
async fn fails_twice_then_succeeds_runs_three_times_with_growing_delays_and_one_key() {
    let dir = tempfile::TempDir::new().expect("dir");
    let store = open(dir.path());
    let clock = Clock::tokio();
    let flaky = Timed::new(clock, 2);
    let steady = Timed::new(clock, 0);
    let hopeless = Timed::new(clock, u32::MAX);
    claim(
        &*store,
        "msg_1",
        &["flaky", "steady", "hopeless"],
        clock.now_ms(),
    )
    .await;
    let (stop, task) = start(
        store.clone(),
        clock,
        vec![
            Registration::new("flaky", flaky.clone()),
            Registration::new("steady", steady.clone()),
            Registration::new("hopeless", hopeless.clone()),
        ],
    );
    until(async || {
        status(&*store, "msg_1", "hopeless")
            .await
            .is_some_and(|s| s.0 == JobStatus::Dead)
    })
    .await;
    until(async || {
        status(&*store, "msg_1", "flaky")
            .await
            .is_some_and(|s| s.0 == JobStatus::Succeeded)
    })
    .await;
    // Far beyond every back-off: nothing else may run.
    tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
    stop.cancel();
    task.await.expect("dispatcher stops");

    let runs = flaky.runs();
    assert_eq!(runs.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(runs.iter().all(|r| r.1 == runs[0].1), "one idempotency key");
    let (d1, d2) = (runs[1].2 - runs[0].2, runs[2].2 - runs[1].2);
    assert!(d1 >= 1000, "first retry waits initial_backoff: {d1} ms");
    assert!(d2 > d1, "delays grow: {d1} ms then {d2} ms");

    assert_eq!(
        steady.runs().len(),
        1,
        "a sibling that succeeded never runs again"
    );
    assert_eq!(hopeless.runs().len(), 4, "max_attempts = 4");
    assert_eq!(
        status(&*store, "msg_1", "hopeless").await,
        Some((JobStatus::Dead, 4))
    );
    assert_eq!(
        status(&*store, "msg_1", "steady").await,
        Some((JobStatus::Succeeded, 1))
    );
    let keys: std::collections::HashSet<_> = [&flaky, &steady, &hopeless]
        .iter()
        .map(|h| h.runs()[0].1.clone())
        .collect();
    assert_eq!(keys.len(), 3, "each handler has its own key");
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_is_dead_at_once() {
    let dir = tempfile::TempDir::new().expect("dir");
    let store = open(dir.path());
    let clock = Clock::tokio();
    let mut refuses = Timed::new(clock, u32::MAX);
    refuses.permanent = true;
    claim(&*store, "msg_p", &["refuses"], clock.now_ms()).await;
    let (stop, task) = start(
        store.clone(),
        clock,
        vec![Registration::new("refuses", refuses.clone())],
    );
    until(async || {
        status(&*store, "msg_p", "refuses")
            .await
            .is_some_and(|s| s.0 == JobStatus::Dead)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    stop.cancel();
    task.await.expect("stops");
    assert_eq!(refuses.runs().len(), 1);
}

/// A run that started but never recorded its end (the process died) runs again on the
/// next start with attempt + 1 and the same key; a finished sibling does not.
#[tokio::test(start_paused = true)]
async fn a_run_interrupted_by_a_crash_resumes_with_the_next_attempt_and_the_same_key() {
    let dir = tempfile::TempDir::new().expect("dir");
    let clock = Clock::tokio();
    let interrupted_key;
    {
        let store = open(dir.path());
        let arrived = clock.now_ms();
        claim(&*store, "msg_c", &["worker", "done"], arrived).await;
        let job = DeliveryKey::new("credicorp", "msg_c").job("worker");
        interrupted_key = job.idempotency_key();
        let lease = clock.now_ms() + 30_000;
        let Begin::Started(started) = store
            .begin_attempt(&job, Some(arrived), clock.now_ms(), lease)
            .await
            .expect("begin")
        else {
            panic!("runnable")
        };
        assert_eq!(started.attempt, 1);
        let done = DeliveryKey::new("credicorp", "msg_c").job("done");
        store
            .begin_attempt(&done, Some(arrived), clock.now_ms(), lease)
            .await
            .expect("begin");
        store
            .finish_attempt(
                &done,
                1,
                webhook_inbox::store::AttemptOutcome::Succeeded,
                clock.now_ms(),
            )
            .await
            .expect("finish");
        store.flush().await.expect("flush");
        // The process dies here: no finish_attempt for `worker`.
    }
    let store = open(dir.path());
    let worker = Timed::new(clock, 0);
    let done = Timed::new(clock, 0);
    let (stop, task) = start(
        store.clone(),
        clock,
        vec![
            Registration::new("worker", worker.clone()),
            Registration::new("done", done.clone()),
        ],
    );
    until(async || {
        status(&*store, "msg_c", "worker")
            .await
            .is_some_and(|s| s.0 == JobStatus::Succeeded)
    })
    .await;
    stop.cancel();
    task.await.expect("stops");
    assert_eq!(worker.runs().len(), 1);
    assert_eq!(worker.runs()[0].0, 2, "attempt + 1");
    assert_eq!(
        worker.runs()[0].1,
        interrupted_key,
        "the same idempotency key"
    );
    assert!(
        done.runs().is_empty(),
        "a handler that succeeded never runs again"
    );
}

/// sled keeps the start of a run in memory (its outcome is its one write): readers see it
/// while it runs; a clean close writes the starts in flight, so a run the shutdown cut comes
/// back with attempt + 1, while a pair that never started is not counted as run. (A crash,
/// which writes nothing, is `crash.rs`'s: there the unclean start is what counts.)
#[tokio::test(start_paused = true)]
async fn a_clean_close_counts_the_runs_it_cut_and_no_others() {
    let dir = tempfile::TempDir::new().expect("dir");
    let clock = Clock::tokio();
    let cut = DeliveryKey::new("credicorp", "msg_cut").job("worker");
    let waiting = DeliveryKey::new("credicorp", "msg_waiting").job("worker");
    {
        let store = open(dir.path());
        let arrived = clock.now_ms();
        claim(&*store, "msg_cut", &["worker"], arrived).await;
        claim(&*store, "msg_waiting", &["worker"], arrived).await;
        let lease = clock.now_ms() + 30_000;
        let Begin::Started(started) = store
            .begin_attempt(&cut, Some(arrived), clock.now_ms(), lease)
            .await
            .expect("begin")
        else {
            panic!("runnable")
        };
        assert_eq!(started.attempt, 1);
        assert_eq!(
            status(&*store, "msg_cut", "worker").await,
            Some((JobStatus::Running, 1)),
            "a start in memory is what readers see"
        );
        store.flush().await.expect("the final flush");
    }
    let store = open(dir.path());
    let arrived = clock.now_ms();
    let lease = clock.now_ms() + 30_000;
    for (job, expected) in [(&cut, 2), (&waiting, 1)] {
        let due = store
            .due_jobs(clock.now_ms() + 1, 10, &Default::default())
            .await
            .expect("due")
            .into_iter()
            .find(|q| &q.job == job)
            .map(|q| q.due_ms);
        let Begin::Started(started) = store
            .begin_attempt(job, due.or(Some(arrived)), clock.now_ms(), lease)
            .await
            .expect("begin")
        else {
            panic!("{job} is runnable after the restart")
        };
        assert_eq!(started.attempt, expected, "{job}");
    }
}

/// The first starts after an opening wait for the disk until the mark that counts them
/// (`open`) is durable — not only the start that set it: a run started beside it must not
/// begin before a crash could be counted for it (the crash test caught that gap, 2 runs in
/// 16). The group commit's fsync is held shut, and the second start must still be waiting.
#[tokio::test]
async fn starts_beside_the_one_that_set_the_open_mark_wait_for_it_too() {
    let dir = tempfile::TempDir::new().expect("dir");
    let gate = crate::helpers::SyncGate::default();
    let store = SledStore::open_with_hook(
        &dir.path().join("data"),
        Durability::Fsync,
        8 << 20,
        Some(gate.hook()),
    )
    .expect("open");
    let _open_at_the_end = gate.opened_on_drop();
    let now = Clock::System.now_ms();
    claim(&store, "msg_first", &["worker"], now).await;
    claim(&store, "msg_beside", &["worker"], now).await;
    gate.set(true);
    let lease = now + 30_000;
    let first = DeliveryKey::new("credicorp", "msg_first").job("worker");
    let beside = DeliveryKey::new("credicorp", "msg_beside").job("worker");
    let mut first_begin = Box::pin(store.begin_attempt(&first, Some(now), now, lease));
    assert!(
        futures_util::poll!(&mut first_begin).is_pending(),
        "the start that sets the mark waits for the disk"
    );
    let mut beside_begin = Box::pin(store.begin_attempt(&beside, Some(now), now, lease));
    assert!(
        futures_util::poll!(&mut beside_begin).is_pending(),
        "a start beside it waits for the mark too"
    );
    gate.set(false);
    for begin in [first_begin, beside_begin] {
        assert!(matches!(begin.await.expect("begin"), Begin::Started(_)));
    }
    // Once the mark is durable, starts no longer wait: a third one is done at its first poll
    // even with the disk held shut again.
    claim(&store, "msg_later", &["worker"], now).await;
    gate.set(true);
    let later = DeliveryKey::new("credicorp", "msg_later").job("worker");
    let mut later_begin = Box::pin(store.begin_attempt(&later, Some(now), now, lease));
    let polled = futures_util::poll!(&mut later_begin);
    gate.set(false);
    assert!(
        matches!(polled, std::task::Poll::Ready(Ok(Begin::Started(_)))),
        "a start after the mark is durable does not wait for the disk"
    );
}

/// Retention walks the received_at index: what is older than the retention and final goes
/// (with its jobs and queue entries) and its id counts as new; what is younger stays, and so
/// does an old delivery whose handler is still due (invariant 2), until that handler is final.
#[tokio::test(start_paused = true)]
async fn retention_forgets_expired_ids_and_keeps_the_rest() {
    let dir = tempfile::TempDir::new().expect("dir");
    let store = open(dir.path());
    let clock = Clock::tokio();
    let retention = Duration::from_secs(7 * 24 * 3600);
    let arrived = clock.now_ms();
    claim(&*store, "msg_old", &["done"], arrived).await;
    claim(&*store, "msg_waiting", &["never"], arrived).await; // queued, never run
    let done = DeliveryKey::new("credicorp", "msg_old").job("done");
    let lease = clock.now_ms() + 30_000;
    assert!(matches!(
        store
            .begin_attempt(&done, Some(arrived), clock.now_ms(), lease)
            .await
            .expect("begin"),
        Begin::Started(_)
    ));
    store
        .finish_attempt(
            &done,
            1,
            webhook_inbox::store::AttemptOutcome::Succeeded,
            clock.now_ms(),
        )
        .await
        .expect("finish");
    tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
    claim(&*store, "msg_young", &[], clock.now_ms()).await;
    tokio::time::sleep(retention - Duration::from_secs(3600)).await;

    let removed = webhook_inbox::retention::sweep_once(&*store, retention, &clock)
        .await
        .expect("sweep");
    assert_eq!(removed, 1);
    assert!(
        store
            .record(&DeliveryKey::new("credicorp", "msg_old"))
            .await
            .expect("read")
            .is_none()
    );
    assert!(
        status(&*store, "msg_old", "done").await.is_none(),
        "its job went too"
    );
    assert!(
        store
            .record(&DeliveryKey::new("credicorp", "msg_waiting"))
            .await
            .expect("read")
            .is_some(),
        "a delivery whose handler is still due is kept"
    );
    assert_eq!(
        store.next_due_ms(&Default::default()).await.expect("queue"),
        Some(arrived),
        "with its queue entry"
    );
    assert!(
        store
            .record(&DeliveryKey::new("credicorp", "msg_young"))
            .await
            .expect("read")
            .is_some()
    );
    claim(&*store, "msg_old", &[], clock.now_ms()).await; // asserts Claim::New
    assert_eq!(
        webhook_inbox::retention::sweep_once(&*store, retention, &clock)
            .await
            .expect("sweep"),
        0
    );
    // Once its handler is final, the waiting one goes on the next pass.
    let never = DeliveryKey::new("credicorp", "msg_waiting").job("never");
    assert!(matches!(
        store
            .begin_attempt(
                &never,
                Some(arrived),
                clock.now_ms(),
                clock.now_ms() + 30_000
            )
            .await
            .expect("begin"),
        Begin::Started(_)
    ));
    store
        .finish_attempt(
            &never,
            1,
            webhook_inbox::store::AttemptOutcome::Dead {
                error: "gave up".into(),
            },
            clock.now_ms(),
        )
        .await
        .expect("finish");
    assert_eq!(
        webhook_inbox::retention::sweep_once(&*store, retention, &clock)
            .await
            .expect("sweep"),
        1
    );
}

/// A hundred deliveries run, then twenty received a minute before them are claimed: queued
/// behind the dispatcher's read position. With `notify`, each claim wakes the dispatcher as
/// ingest does. Returns every run (attempt, key, when) and when the twenty were claimed.
async fn twenty_entries_behind_the_read_position(notify: bool) -> (Vec<(u32, String, u64)>, u64) {
    let dir = tempfile::TempDir::new().expect("dir");
    let store = open(dir.path());
    let clock = Clock::tokio();
    let steady = Timed::new(clock, 0);
    let now = clock.now_ms();
    for i in 0..100 {
        claim(&*store, &format!("msg_now_{i}"), &["steady"], now).await;
    }
    let (stop, task, waker) = start_with_waker(
        store.clone(),
        clock,
        vec![Registration::new("steady", steady.clone())],
    );
    until(async || steady.runs().len() >= 100).await;
    let claimed_at = clock.now_ms();
    for i in 0..20 {
        claim(
            &*store,
            &format!("msg_earlier_{i}"),
            &["steady"],
            now - 60_000,
        )
        .await;
        if notify {
            waker.notify_one();
        }
    }
    until(async || steady.runs().len() >= 120).await;
    stop.cancel();
    task.await.expect("dispatcher stops");
    (steady.runs(), claimed_at)
}

/// The dispatcher reads a handler's queue from past the last entry it read; entries queued
/// behind that point (a request that began earlier, a retry due earlier) are still run, by
/// the read from the front that comes at least every half second, even unannounced.
#[tokio::test(start_paused = true)]
async fn entries_queued_behind_the_read_position_still_run() {
    let (runs, _) = twenty_entries_behind_the_read_position(false).await;
    let keys: std::collections::HashSet<&String> = runs.iter().map(|(_, key, _)| key).collect();
    assert_eq!(keys.len(), 120, "each delivery ran once");
    assert_eq!(runs.len(), 120);
}

/// The tail of a burst: entries queued behind the read position once the handler has
/// nothing left in flight are run at once (the read past the position finds nothing, so the
/// dispatcher reads from the front then, which skips nothing), not half a second later.
#[tokio::test(start_paused = true)]
async fn entries_behind_the_read_position_run_at_once_once_the_handler_is_idle() {
    let (runs, claimed_at) = twenty_entries_behind_the_read_position(true).await;
    assert_eq!(runs.len(), 120);
    // The first hundred had all run before the earlier ones were claimed.
    let last_earlier = runs[100..]
        .iter()
        .map(|(_, _, at)| *at)
        .max()
        .expect("the earlier entries ran");
    assert!(
        last_earlier < claimed_at + 250,
        "an entry behind the read position waited {} ms with the handler idle",
        last_earlier - claimed_at
    );
}
