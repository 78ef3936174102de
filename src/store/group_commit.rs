//! Group commit: one thread makes writes durable for every waiting request at once.
//!
//! On sled 0.34, `flush_async()` deadlocks under concurrent callers (sled #1308) and
//! `Db::flush()` only writes and calls `sync_file_range`, which does not survive a power
//! loss. So a dedicated thread gathers every request waiting for durability, runs the sync
//! step (`db.flush()` then a real `fsync`, see [`super::SledStore`]) once for all of them,
//! and wakes them together. Under load, one fsync serves a whole batch of requests.
//!
//! A failed sync poisons the committer: what reached the disk is then unknown (the
//! "fsyncgate" lesson), so it refuses every later write until the process restarts, and the
//! senders, who got 503, retry against a restarted process.
//!
//! The thread ends in the shutdown sequence ([`GroupCommit::close`], from the store's
//! `Maintenance::close`), once it has served every waiter already queued; a store still
//! used after that (a test reusing it, a tool) syncs in the caller, on tokio's blocking
//! pool, one at a time.
//!
//! Readers ask [`GroupCommit::is_settled`] about the key they read: a writer registers the
//! key of the record it changes ([`GroupCommit::begin_write`]) before its write can be seen
//! and holds it until its wait for the disk has returned, so a record whose key is registered may not be durable
//! yet, and the reader joins the next batch before answering from it. A record whose key is
//! not registered is on disk, however many other writes are in flight: a redelivery among
//! new deliveries is answered without waiting for their batch (BENCHMARKS.md, session 20).
//!
//! A batch waits a little for writers already writing: a short write
//! ([`GroupCommit::begin_write`]) counts as *writing* until it joins a batch
//! ([`GroupCommit::wait_for`]) or gives up its guard, and the committer, once it has the
//! writers already waiting, takes in those still writing for up to [`GATHER`] before it
//! syncs (PostgreSQL's `commit_delay` with `commit_siblings`, but only while someone is
//! actually writing). Every batch costs the same syncs and thread wake-ups whatever its
//! size, so fewer, fuller batches leave more of the CPU to requests (BENCHMARKS.md,
//! session 21). Long writes (retention, an operator's bulk retry) are not waited for
//! ([`GroupCommit::begin_long_write`]).
//!
//! For the same reason batches are spaced while they are shared: after a batch that served
//! more than one waiter, the next starts no sooner than [`SPACING`] after it started, so
//! under load the committer runs at most ~500 syncs a second however fast the disk answers.
//! A sync costs CPU by the flush, not by the byte (two device flushes, the thread hand-offs,
//! sled's flush), and on a small machine that CPU is what requests need: capping the rate
//! took the server's CPU per delivery from 134 to 118 µs (system time ~72 to ~53 µs) and the
//! fsync acks from 0.21x to 0.22–0.24x bare, same runs against the build before
//! (BENCHMARKS.md, session 25). A write waits at most [`SPACING`] more.
//! A batch of one is not followed by a wait: a lone sender (a sequential replay, a quiet
//! hour) has nobody to share with, and would only be slowed (1 ms to 2 ms a delivery).

use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::StoreError;
use crate::collections::FastHashMap;

type Waiter = oneshot::Sender<Result<(), StoreError>>;

/// How long a batch waits, at most, for writers still writing to join it.
pub const GATHER: Duration = Duration::from_micros(200);

/// The least time from the start of a batch that served more than one waiter to the next
/// batch's start.
pub const SPACING: Duration = Duration::from_millis(2);

/// When the committer takes a batch in: [`GATHER`] and [`SPACING`] in the server, others
/// in tests.
#[derive(Clone, Copy, Debug)]
struct Pacing {
    gather: Duration,
    spacing: Duration,
}

/// The sync step run once per batch.
pub type SyncFn = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// Counters of the committer, for tests and metrics.
#[derive(Debug)]
pub struct CommitStats {
    /// Sync steps run.
    pub batches: AtomicU64,
    /// Waiters served.
    pub waiters: AtomicU64,
    /// Duration of each sync step, in seconds.
    pub sync_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Default for CommitStats {
    fn default() -> Self {
        CommitStats {
            batches: AtomicU64::new(0),
            waiters: AtomicU64::new(0),
            sync_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 16),
            ),
        }
    }
}

/// Handle to the group-commit thread.
pub struct GroupCommit {
    sender: Mutex<Option<mpsc::Sender<Waiter>>>,
    unsettled: Arc<Unsettled>,
    poisoned: Arc<AtomicBool>,
    /// Set by [`GroupCommit::close`]: the committer no longer waits out the spacing.
    closing: Arc<AtomicBool>,
    stats: Arc<CommitStats>,
    /// The committer; it hands the sync step back when it ends.
    thread: Mutex<Option<thread::JoinHandle<SyncFn>>>,
    /// The sync step once the thread has ended: run by each waiter in turn.
    after_close: Arc<Mutex<Option<SyncFn>>>,
}

/// The keys of writes not known to be durable yet, as hashes with a count of writers (two
/// keys of one hash only make a reader wait when it need not).
#[derive(Default)]
struct Unsettled {
    writers: Mutex<FastHashMap<u64, usize>>,
    hasher: foldhash::fast::RandomState,
    /// Short writes begun and not yet joined to a batch (nor given up).
    writing: AtomicUsize,
}

impl Unsettled {
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn writers(&self) -> std::sync::MutexGuard<'_, FastHashMap<u64, usize>> {
        self.writers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Held by a writer from before its write until its write is durable: its key counts as
/// unsettled until it is dropped.
pub struct WriteGuard {
    unsettled: Arc<Unsettled>,
    hash: Option<u64>,
    /// Counted in [`Unsettled::writing`] until it joins a batch.
    writing: bool,
}

impl WriteGuard {
    /// No longer counted as writing: joined a batch, or done.
    fn joined(&mut self) {
        if std::mem::take(&mut self.writing) {
            self.unsettled.writing.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        self.joined();
        let Some(hash) = self.hash else {
            return;
        };
        let mut writers = self.unsettled.writers();
        if let Some(n) = writers.get_mut(&hash) {
            *n -= 1;
            if *n == 0 {
                writers.remove(&hash);
            }
        }
    }
}

impl GroupCommit {
    /// Starts the committer thread around `sync`.
    pub fn start(sync: SyncFn) -> GroupCommit {
        Self::start_paced(
            sync,
            Pacing {
                gather: GATHER,
                spacing: SPACING,
            },
        )
    }

    /// [`GroupCommit::start`] with the tests' own pacing.
    fn start_paced(mut sync: SyncFn, pacing: Pacing) -> GroupCommit {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let poisoned = Arc::new(AtomicBool::new(false));
        let closing = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(CommitStats::default());
        let unsettled = Arc::new(Unsettled::default());
        let thread = {
            let poisoned = poisoned.clone();
            let closing = closing.clone();
            let stats = stats.clone();
            let unsettled = unsettled.clone();
            thread::Builder::new()
                .name("group-commit".into())
                .spawn(move || {
                    // The start of the last batch, if it served more than one waiter.
                    let mut shared_start: Option<Instant> = None;
                    // Ends when every sender is gone (the store was closed), after the
                    // waiters already queued.
                    while let Ok(first) = rx.recv() {
                        if let Some(at) = shared_start {
                            wait_out_spacing(at + pacing.spacing, &closing);
                        }
                        let mut batch = vec![first];
                        batch.extend(rx.try_iter());
                        gather_writing(&rx, &mut batch, &unsettled, pacing.gather);
                        let started = Instant::now();
                        shared_start = (batch.len() > 1).then_some(started);
                        let result = if poisoned.load(Ordering::SeqCst) {
                            Err(StoreError::Flush("an earlier flush failed".into()))
                        } else {
                            sync().map_err(|e| {
                                poisoned.store(true, Ordering::SeqCst);
                                tracing::error!(error = %e, "flush to disk failed; refusing writes until restart");
                                StoreError::Flush(e.to_string())
                            })
                        };
                        stats.sync_seconds.observe(started.elapsed().as_secs_f64());
                        stats.batches.fetch_add(1, Ordering::Relaxed);
                        stats.waiters.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        for waiter in batch {
                            // The requester may have gone away; nothing to tell then.
                            let _ = waiter.send(result.clone());
                        }
                    }
                    sync
                })
                .expect("spawning the group-commit thread")
        };
        GroupCommit {
            sender: Mutex::new(Some(tx)),
            unsettled,
            poisoned,
            closing,
            stats,
            thread: Mutex::new(Some(thread)),
            after_close: Arc::default(),
        }
    }

    /// Announces a write to the record under `key` (the key a redelivery's read finds it
    /// under; `None` for a write that changes nothing a redelivery is answered from). Call
    /// before the write can be seen, and hold the guard until its [`GroupCommit::wait_for`]
    /// has returned.
    ///
    /// The write counts as writing until [`GroupCommit::wait_for`] or the guard's drop: a
    /// batch being formed meanwhile waits for it (up to [`GATHER`]), so the write should be
    /// short (a claim, a run's start or outcome).
    pub fn begin_write(&self, key: Option<&[u8]>) -> Result<WriteGuard, StoreError> {
        self.begin(key, true)
    }

    /// Like [`GroupCommit::begin_write`] with no key, for a write that may take long (a
    /// retention pass, an operator's bulk change): no batch waits for it.
    pub fn begin_long_write(&self) -> Result<WriteGuard, StoreError> {
        self.begin(None, false)
    }

    fn begin(&self, key: Option<&[u8]>, short: bool) -> Result<WriteGuard, StoreError> {
        if self.is_poisoned() {
            return Err(StoreError::Flush(
                "an earlier flush failed; restart to recover".into(),
            ));
        }
        let hash = key.map(|k| self.unsettled.hash(k));
        if let Some(hash) = hash {
            *self.unsettled.writers().entry(hash).or_default() += 1;
        }
        if short {
            self.unsettled.writing.fetch_add(1, Ordering::AcqRel);
        }
        Ok(WriteGuard {
            unsettled: self.unsettled.clone(),
            hash,
            writing: short,
        })
    }

    /// Whether what a reader found under `key` is surely durable: no write to `key` is
    /// between its [`GroupCommit::begin_write`] and the end of its wait for the disk.
    pub fn is_settled(&self, key: &[u8]) -> bool {
        let hash = self.unsettled.hash(key);
        !self.unsettled.writers().contains_key(&hash)
    }

    /// [`GroupCommit::wait`] for the write `guard` announced; the guard no longer counts as
    /// writing once it has joined a batch. Hold it until this returns.
    pub async fn wait_for(&self, guard: &mut WriteGuard) -> Result<(), StoreError> {
        // Before the join: a batch that looks in between misses this writer (it joins the
        // next), where the other order could hold that batch for a writer already in it.
        guard.joined();
        self.wait().await
    }

    /// Waits until everything written before this call is on disk.
    pub async fn wait(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        let sent = self
            .sender
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|sender| sender.send(tx));
        match sent {
            Some(sent) => {
                sent.map_err(|_| StoreError::Flush("group-commit thread is gone".into()))?;
            }
            None => return self.sync_after_close().await,
        }
        rx.await
            .map_err(|_| StoreError::Flush("group-commit thread is gone".into()))?
    }

    /// True after a failed sync.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    /// Counters.
    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }

    /// Stops the thread after it has served every waiter already queued; later waits run
    /// the sync step themselves.
    pub fn close(&self) {
        // Held throughout, so that a wait that finds no sender finds the sync step once the
        // thread has handed it back.
        let mut after_close = self.after_close.lock().unwrap_or_else(|p| p.into_inner());
        self.sender.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.closing.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.thread().unpark();
            if let Ok(sync) = t.join() {
                *after_close = Some(sync);
            }
        }
    }

    /// Whether the committer thread still runs (it ends at [`GroupCommit::close`]).
    pub fn is_running(&self) -> bool {
        self.thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// A wait once the thread has ended: the sync step, run here (one caller at a time).
    async fn sync_after_close(&self) -> Result<(), StoreError> {
        let after_close = self.after_close.clone();
        let poisoned = self.poisoned.clone();
        let synced = tokio::task::spawn_blocking(move || {
            let mut sync = after_close.lock().unwrap_or_else(|p| p.into_inner());
            let Some(sync) = sync.as_mut() else {
                return Err(StoreError::Flush("group-commit thread is gone".into()));
            };
            if poisoned.load(Ordering::SeqCst) {
                return Err(StoreError::Flush("an earlier flush failed".into()));
            }
            sync().map_err(|e| {
                poisoned.store(true, Ordering::SeqCst);
                StoreError::Flush(e.to_string())
            })
        })
        .await;
        synced.map_err(|e| StoreError::Flush(format!("sync task failed: {e}")))?
    }
}

/// Sleeps until `until`, or until the store closes (the waiters queued are then served at
/// once). Parked rather than blocked on the queue: a waiter joining meanwhile wakes nobody,
/// which is the CPU the spacing is there to save.
fn wait_out_spacing(until: Instant, closing: &AtomicBool) {
    while !closing.load(Ordering::SeqCst) {
        match until.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => thread::park_timeout(left),
            _ => return,
        }
    }
}

/// Adds to `batch` the writers still writing as it formed, as they join, until none is
/// left writing or `gather` has passed.
fn gather_writing(
    rx: &mpsc::Receiver<Waiter>,
    batch: &mut Vec<Waiter>,
    unsettled: &Unsettled,
    gather: Duration,
) {
    let until = Instant::now() + gather;
    while unsettled.writing.load(Ordering::Acquire) > 0 {
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            return;
        };
        match rx.recv_timeout(left) {
            Ok(waiter) => {
                batch.push(waiter);
                batch.extend(rx.try_iter());
            }
            Err(_) => return,
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc as std_mpsc;

    /// Batches that wait up to `gather` for writers still writing, and are not spaced.
    fn gathering(gather: Duration) -> Pacing {
        Pacing {
            gather,
            spacing: Duration::ZERO,
        }
    }

    /// Runs one batch of two waiters: a writer still writing holds the batch another wait
    /// started (the pacing's gather must outlast the test) until it joins.
    async fn a_shared_batch(gc: &GroupCommit) {
        let before = gc.stats().batches.load(Ordering::Relaxed);
        let mut writing = gc.begin_write(Some(&b"a"[..])).expect("write");
        let mut other = Box::pin(gc.wait());
        assert!(futures_util::poll!(other.as_mut()).is_pending());
        gc.wait_for(&mut writing).await.expect("the writer's wait");
        other.await.expect("the other wait");
        assert_eq!(gc.stats().batches.load(Ordering::Relaxed), before + 1);
    }

    /// After a batch shared by several waiters, the next waits for the spacing; after a
    /// batch of one (a lone sender, a quiet spell) it does not, nor does one queued when
    /// the store closes (here with a spacing so long that only those can go).
    #[tokio::test]
    async fn a_batch_waits_for_the_spacing_after_a_shared_batch_only() {
        let long = Duration::from_secs(600);
        let gc = GroupCommit::start_paced(
            Box::new(|| Ok(())),
            Pacing {
                gather: long,
                spacing: long,
            },
        );
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(60), gc.wait())
                .await
                .expect("a lone waiter's batch was held")
                .expect("sync");
        }
        a_shared_batch(&gc).await;
        let mut next = Box::pin(gc.wait());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), next.as_mut())
                .await
                .is_err(),
            "a batch went before the spacing had passed"
        );
        assert_eq!(gc.stats().batches.load(Ordering::Relaxed), 4);
        // A close does not wait out the spacing: the waiter queued is served at once.
        gc.close();
        tokio::time::timeout(Duration::from_secs(60), next)
            .await
            .expect("the close waited out the spacing")
            .expect("served at the close");
        assert_eq!(gc.stats().batches.load(Ordering::Relaxed), 5);
    }

    /// Spacing batches makes them fuller: the waiters who come while the committer waits
    /// out the spacing share one sync, and the time between two syncs' starts is never
    /// less than the spacing.
    #[tokio::test]
    async fn waiters_during_the_spacing_share_one_sync() {
        let spacing = Duration::from_secs(1);
        let starts = Arc::new(Mutex::new(Vec::new()));
        let recorded = starts.clone();
        let gc = GroupCommit::start_paced(
            Box::new(move || {
                recorded.lock().expect("lock").push(Instant::now());
                Ok(())
            }),
            Pacing {
                gather: Duration::from_secs(600),
                spacing,
            },
        );
        a_shared_batch(&gc).await;
        let waits = futures_util::future::join_all((0..10).map(|_| gc.wait())).await;
        assert!(waits.iter().all(Result::is_ok));
        let starts = starts.lock().expect("lock").clone();
        assert_eq!(starts.len(), 2, "ten waiters in the spacing share one sync");
        assert!(starts[1] - starts[0] >= spacing);
    }

    /// A key is unsettled from its writer's `begin_write` until the last of its writers'
    /// guards is dropped; other keys are settled throughout.
    #[test]
    fn a_key_is_unsettled_while_a_write_to_it_is_held() {
        let gc = GroupCommit::start(Box::new(|| Ok(())));
        assert!(gc.is_settled(b"a"));
        let first = gc.begin_write(Some(&b"a"[..])).expect("write");
        let of_b = gc.begin_write(Some(&b"b"[..])).expect("write");
        let second = gc.begin_write(Some(&b"a"[..])).expect("write");
        assert!(!gc.is_settled(b"a"));
        assert!(!gc.is_settled(b"b"));
        assert!(gc.is_settled(b"c"), "a write to other keys holds no reader");
        drop(first);
        drop(of_b);
        assert!(
            !gc.is_settled(b"a"),
            "the second writer of `a` still holds it"
        );
        assert!(gc.is_settled(b"b"));
        drop(second);
        assert!(gc.is_settled(b"a"));
        let none = gc.begin_write(None).expect("write");
        assert!(gc.is_settled(b"a"));
        drop(none);
    }

    /// Waiters that arrive while a sync runs share the next one: a gated sync holds the
    /// first batch while ten more requests queue up; all ten are served by one more sync.
    #[tokio::test]
    async fn concurrent_waiters_share_one_sync() {
        let (entered_tx, entered_rx) = std_mpsc::channel::<()>();
        let (release_tx, release_rx) = std_mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let gc = GroupCommit::start(Box::new(move || {
            let _ = entered_tx.send(());
            let _ = release_rx.lock().expect("lock").recv();
            Ok(())
        }));
        // A wait enqueues itself on its first poll, before it first awaits.
        let mut first = Box::pin(gc.wait());
        assert!(futures_util::poll!(first.as_mut()).is_pending());
        entered_rx.recv().expect("first sync started");
        let mut rest: Vec<_> = (0..10).map(|_| Box::pin(gc.wait())).collect();
        for w in rest.iter_mut() {
            assert!(futures_util::poll!(w.as_mut()).is_pending());
        }
        release_tx.send(()).expect("release first");
        first.await.expect("first ok");
        entered_rx.recv().expect("second sync started");
        release_tx.send(()).expect("release second");
        for w in rest {
            w.await.expect("ok");
        }
        assert_eq!(gc.stats().waiters.load(Ordering::Relaxed), 11);
        assert_eq!(gc.stats().batches.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_failed_sync_poisons_every_later_write() {
        let gc = GroupCommit::start(Box::new(|| Err(std::io::Error::other("disk on fire"))));
        assert!(gc.wait().await.is_err());
        assert!(gc.is_poisoned());
        assert!(gc.begin_write(None).is_err());
    }

    /// The thread ends at `close`, after the waiters already queued; a wait after that
    /// still syncs (in the caller), so a store used after its server stopped stays durable.
    #[tokio::test]
    async fn after_close_the_thread_is_gone_and_a_wait_still_syncs() {
        let syncs = Arc::new(AtomicUsize::new(0));
        let counted = syncs.clone();
        let commit = GroupCommit::start(Box::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }));
        commit.wait().await.expect("sync");
        assert!(commit.is_running());
        commit.close();
        assert!(!commit.is_running());
        assert_eq!(syncs.load(Ordering::SeqCst), 1);
        commit.wait().await.expect("sync after close");
        assert_eq!(
            syncs.load(Ordering::SeqCst),
            2,
            "the wait ran the sync itself"
        );
    }

    /// A batch takes in the writers still writing when it formed: it waits while one is
    /// writing, and goes as soon as none is (here with a gather long enough that only the
    /// writer's join can end it).
    #[tokio::test]
    async fn a_batch_waits_for_a_writer_still_writing() {
        let gc = GroupCommit::start_paced(Box::new(|| Ok(())), gathering(Duration::from_secs(600)));
        let mut writing = gc.begin_write(Some(&b"a"[..])).expect("write");
        let mut other = Box::pin(gc.wait());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), other.as_mut())
                .await
                .is_err(),
            "the batch went while a writer was still writing"
        );
        gc.wait_for(&mut writing).await.expect("the writer's wait");
        other.await.expect("the other wait");
        drop(writing);
        assert_eq!(gc.stats().batches.load(Ordering::Relaxed), 1);
        assert_eq!(gc.stats().waiters.load(Ordering::Relaxed), 2);
    }

    /// Nothing else holds a batch: a short write given up without a wait (it wrote
    /// nothing), a long write, or a writer that never comes (the gather's end).
    #[tokio::test]
    async fn only_a_short_write_in_progress_holds_a_batch_and_only_for_the_gather() {
        let long = Duration::from_secs(600);
        let gc = GroupCommit::start_paced(Box::new(|| Ok(())), gathering(long));
        drop(gc.begin_write(Some(&b"a"[..])).expect("write"));
        let bulk = gc.begin_long_write().expect("long write");
        tokio::time::timeout(Duration::from_secs(60), gc.wait())
            .await
            .expect("a long write or a dropped guard held the batch")
            .expect("sync");
        drop(bulk);

        let short =
            GroupCommit::start_paced(Box::new(|| Ok(())), gathering(Duration::from_millis(20)));
        let never_joins = short.begin_write(None).expect("write");
        tokio::time::timeout(Duration::from_secs(60), short.wait())
            .await
            .expect("the batch waited past its gather")
            .expect("sync");
        drop(never_joins);
    }
}
