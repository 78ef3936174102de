//! The loop: reads, in turns, the front of the queues of the handlers that may start a run
//! now, and hands each due pair to a [`Runner`] task, as many at once as
//! `dispatch.concurrency` allows; passes over pairs in flight or held by another runner;
//! sleeps until the next entry is due, new work is announced, or a run ends.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::runner::{RunResult, Runner};
use super::turns::{RateTurn, Turns};
use crate::collections::FastHashMap;
use crate::handlers::HandlerRegistry;
use crate::store::{DeliveryStore, JobKey, QueuedJob, SkipSet, StoreError};

/// With a store of this process alone: how many due entries of a handler one queue read
/// takes, kept in memory and started as slots free up. The entries being run stay at the
/// front of the queue until their outcome is written, so a read that took only the free
/// slots would walk past every running entry again for each run (the profile in
/// BENCHMARKS.md: a quarter of the server's instructions). An entry that went stale while
/// it waited here (an operator retry moved it, a pause) is caught by
/// [`JobQueue::begin_attempt`](crate::store::JobQueue::begin_attempt), which re-checks it under the delivery's lock. With a
/// shared store a read reserves its entries for this process, so there it takes only what
/// it starts.
pub const READ_AHEAD: usize = 64;

/// With read-ahead, a handler's queue is read from past the last entry read, not from its
/// front (past every entry being run, again); but entries queued before that one (a
/// delivery whose request began earlier, a retry due earlier) are then only seen by a read
/// from the front, which comes at least this often while the handler has work, and at once
/// when a read past the position finds nothing while none of the handler's runs is in
/// flight (the front then has nothing to walk past).
const FRONT_READ_EVERY_MS: u64 = 500;

/// Where the next read of a handler's queue starts.
#[derive(Default)]
struct ReadPosition {
    /// The last entry read: the next read starts past it. `None`: at the front.
    after: Option<QueuedJob>,
    /// When the queue was last read from its front (ms since the epoch).
    front_read_ms: u64,
}

/// With a store other processes share: how often the queue is read even without a notice
/// of new work.
pub const SHARED_STORE_POLL: Duration = Duration::from_secs(5);

/// How often the dispatcher looks for queued handlers that are no longer configured (their
/// pairs are run, and die with an error that says so, rather than wait forever).
const UNCONFIGURED_SCAN: Duration = Duration::from_secs(60);

/// The handlers the dispatcher serves, in turns, with what limits them: a pause (read from
/// the store every pass, so a pause on another replica holds here too), `concurrency`
/// (runs of this process; across replicas, a hold until the store's count has room) and
/// `rate`, whose spacing is [`Turns`]' alone.
struct HandlerTurns {
    names: Vec<String>,
    concurrency: FastHashMap<String, usize>,
    paused: HashSet<String>,
    /// Handlers at their `concurrency` on every replica together: not before this time
    /// (ms since the epoch).
    held_until: FastHashMap<String, u64>,
    /// Which handler goes first this pass, so that none is always served last.
    turn: usize,
    scanned_at: Option<std::time::Instant>,
}

impl HandlerTurns {
    fn new(registry: &HandlerRegistry) -> HandlerTurns {
        HandlerTurns {
            names: registry.limits().map(|(name, _)| name.to_owned()).collect(),
            concurrency: registry
                .limits()
                .filter_map(|(name, limits)| Some((name.to_owned(), limits.concurrency?)))
                .collect(),
            paused: HashSet::new(),
            held_until: FastHashMap::default(),
            turn: 0,
            scanned_at: None,
        }
    }

    /// Reads the pauses, and now and then the queued handlers no longer configured.
    async fn refresh(&mut self, store: &dyn DeliveryStore) -> Result<(), StoreError> {
        if self
            .scanned_at
            .is_none_or(|t| t.elapsed() >= UNCONFIGURED_SCAN)
        {
            for name in store.queued_handlers().await? {
                if !self.names.contains(&name) {
                    self.names.push(name);
                }
            }
            self.scanned_at = Some(std::time::Instant::now());
        }
        self.paused = store.paused_handlers().await?;
        Ok(())
    }

    /// The handlers not paused, starting with this pass's first.
    fn in_turn(&mut self) -> Vec<String> {
        let n = self.names.len().max(1);
        let first = self.turn % n;
        self.turn = self.turn.wrapping_add(1);
        self.names[first..]
            .iter()
            .chain(&self.names[..first])
            .filter(|h| !self.paused.contains(*h))
            .cloned()
            .collect()
    }

    /// Runs `handler` may be handed now, out of `free` slots of the whole dispatcher.
    fn capacity(
        &self,
        handler: &str,
        free: usize,
        running_of: &FastHashMap<String, usize>,
        turns: &Turns,
        now: u64,
    ) -> usize {
        if self.held_until(handler) > now {
            return 0;
        }
        let mut cap = free;
        if let Some(&limit) = self.concurrency.get(handler) {
            cap = cap.min(limit.saturating_sub(running_of.get(handler).copied().unwrap_or(0)));
        }
        match turns.rate_turn(handler, now) {
            RateTurn::Unlimited => cap,
            RateTurn::Free => cap.min(1),
            RateTurn::At(_) | RateTurn::Waiting => 0,
        }
    }

    /// Starts no run of `handler` before `until_ms` (its `concurrency` is reached on every
    /// replica together).
    fn hold(&mut self, handler: &str, until_ms: u64) {
        let at = self.held_until(handler).max(until_ms);
        self.held_until.insert(handler.to_owned(), at);
    }

    fn held_until(&self, handler: &str) -> u64 {
        self.held_until.get(handler).copied().unwrap_or(0)
    }

    /// The earliest time `handler` may be handed a run, as far as its limits go; `None`:
    /// when a run of it has had its rate turn ([`Turns::turn_taken`] wakes the loop).
    fn next_start(&self, handler: &str, turns: &Turns, now: u64) -> Option<u64> {
        let held = self.held_until(handler);
        match turns.rate_turn(handler, now) {
            RateTurn::Unlimited | RateTurn::Free => Some(held),
            RateTurn::At(at) => Some(held.max(at)),
            RateTurn::Waiting => None,
        }
    }

    /// The handlers that could start a run once one is due (not paused, under their
    /// `concurrency`).
    fn runnable(&self, running_of: &FastHashMap<String, usize>) -> Vec<String> {
        self.names
            .iter()
            .filter(|h| !self.paused.contains(*h))
            .filter(|h| {
                self.concurrency
                    .get(*h)
                    .is_none_or(|&limit| running_of.get(*h).copied().unwrap_or(0) < limit)
            })
            .cloned()
            .collect()
    }
}

/// The background worker pool over the durable queue.
pub struct Dispatcher {
    runner: Runner,
    wake: Arc<Notify>,
    running: Arc<std::sync::atomic::AtomicBool>,
}

impl Dispatcher {
    /// A dispatcher; call [`Dispatcher::run`] to start it.
    pub fn new(runner: Runner) -> Dispatcher {
        Dispatcher {
            runner,
            wake: Arc::new(Notify::new()),
            running: Arc::default(),
        }
    }

    /// True while [`Dispatcher::run`] is picking up work (for `/readyz`).
    pub fn running_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.running.clone()
    }

    /// A store shared with other replicas (PostgreSQL) reserves what it returns and is read
    /// once per finished run under load, so each statement counts: when the batch comes
    /// back full, the pass after this one comes at once (`more_due`), and when the next
    /// pair is due need not be asked (`now` stands in for it); only a short batch asks.
    /// Halved the statements of a pass and raised runs by about half (BENCHMARKS.md,
    /// session 14).
    async fn read_shared_queue(
        &self,
        handler: &str,
        now_ms: u64,
        want: usize,
        skip: &SkipSet,
    ) -> Result<(Vec<QueuedJob>, Option<u64>), StoreError> {
        let store = &self.runner.store;
        let due = store.due_jobs_of(handler, now_ms, want, skip).await?;
        if due.len() >= want {
            return Ok((due, Some(now_ms)));
        }
        let next = store.next_due_past(handler, skip, &due).await?;
        Ok((due, next))
    }

    /// Notify this after queueing new work, so it is picked up without waiting.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Runs until `shutdown` fires; then lets running handlers finish within
    /// `dispatch.shutdown_grace`, cancels the rest (they resume on the next start) and
    /// returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let concurrency = self.runner.config.concurrency;
        self.running
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // A run that did not start ends with the pair and until when it is held (`.2`: the
        // handler is at its `concurrency` on every replica together).
        let mut running: JoinSet<Option<(JobKey, u64, bool)>> = JoinSet::new();
        let mut in_flight: FastHashMap<tokio::task::Id, JobKey> = FastHashMap::default();
        // Pairs another runner holds (an inline processed-mode run, another replica), left
        // alone until their lease ends: their queue entry stays, so nothing is lost by
        // waiting.
        let mut deferred: FastHashMap<JobKey, u64> = FastHashMap::default();
        // The pairs the queue reads pass over: those in flight and those deferred. Kept as
        // they change, not rebuilt each pass (a pass per finished run).
        let mut skip = SkipSet::default();
        // Other processes sharing the store announce their work; a notice can be lost (the
        // listening connection drops), so then the queue is also looked at every so often.
        let shared = self.runner.store.work_signal();
        let poll = if shared.is_some() {
            SHARED_STORE_POLL
        } else {
            Duration::from_secs(3600)
        };
        let announced = async || match &shared {
            Some(signal) => signal.notified().await,
            None => std::future::pending().await,
        };
        let read_ahead = if shared.is_some() { 0 } else { READ_AHEAD };
        // Due entries read ahead, per handler, not yet started.
        let mut ready: FastHashMap<String, VecDeque<QueuedJob>> = FastHashMap::default();
        let mut positions: FastHashMap<String, ReadPosition> = FastHashMap::default();
        // Runs in flight per handler, kept as runs start and end.
        let mut running_of: FastHashMap<String, usize> = FastHashMap::default();
        let mut handlers = HandlerTurns::new(&self.runner.registry);
        let turns = self.runner.turns.clone();
        loop {
            let now = self.runner.clock.now_ms();
            deferred.retain(|job, until| {
                let keep = *until > now;
                if !keep {
                    skip.remove(job);
                }
                keep
            });
            let mut store_failed = false;
            if let Err(e) = handlers.refresh(&*self.runner.store).await {
                tracing::error!(error = %e, "reading the handlers' state failed");
                store_failed = true;
            }
            let mut free = concurrency.saturating_sub(running.len());
            let mut more_due = false;
            // What this pass's queue reads found next, per handler: spares a second read
            // to know when to look again.
            let mut next_found: FastHashMap<String, Option<u64>> = FastHashMap::default();
            // Each handler's own queue, only of the handlers that may start a run now: a
            // paused or limited handler's backlog is not read at all.
            for handler in handlers.in_turn() {
                if free == 0 || store_failed {
                    break;
                }
                let cap = handlers.capacity(&handler, free, &running_of, &turns, now);
                if cap == 0 {
                    continue;
                }
                let buffered = ready.entry(handler.clone()).or_default();
                if buffered.is_empty() {
                    let want = cap.max(read_ahead);
                    let position = positions.entry(handler.clone()).or_default();
                    let mut from_front = read_ahead == 0
                        || position.after.is_none()
                        || now >= position.front_read_ms + FRONT_READ_EVERY_MS;
                    let after = if from_front {
                        None
                    } else {
                        position.after.as_ref()
                    };
                    let mut read = if read_ahead == 0 {
                        self.read_shared_queue(&handler, now, want, &skip).await
                    } else {
                        self.runner
                            .store
                            .due_jobs_and_next_of(&handler, now, want, &skip, after)
                            .await
                    };
                    // Past the position there is nothing, and none of this handler's runs
                    // is in flight: a read from the front has nothing to walk past, and
                    // finds at once what was queued behind the position (the tail of a
                    // burst) instead of at the next periodic front read.
                    let idle = running_of.get(&handler).copied().unwrap_or(0) == 0;
                    if !from_front && idle && matches!(&read, Ok((due, _)) if due.is_empty()) {
                        from_front = true;
                        read = self
                            .runner
                            .store
                            .due_jobs_and_next_of(&handler, now, want, &skip, None)
                            .await;
                    }
                    match read {
                        Ok((due, next)) => {
                            if from_front {
                                position.front_read_ms = now;
                            }
                            // A front read that found nothing: the queue is drained, and the
                            // next read starts at the front again.
                            if due.last().is_some() || from_front {
                                position.after = due.last().cloned();
                            }
                            // What a read past the last one cannot see is seen by the next
                            // read from the front: by then at the latest.
                            let next = if position.after.is_some() {
                                let front = position.front_read_ms + FRONT_READ_EVERY_MS;
                                Some(next.map_or(front, |n| n.min(front)))
                            } else {
                                next
                            };
                            buffered.extend(due);
                            next_found.insert(handler.clone(), next);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "reading the queue failed");
                            store_failed = true;
                            break;
                        }
                    }
                }
                let take = cap.min(buffered.len());
                let due: Vec<QueuedJob> = buffered.drain(..take).collect();
                more_due |= take == cap && (!buffered.is_empty() || read_ahead == 0);
                for entry in due {
                    // Counted against the rate from now, before its task first runs.
                    let entered = turns.enter(&handler);
                    *running_of.entry(handler.clone()).or_default() += 1;
                    free -= 1;
                    let runner = self.runner.clone();
                    let job = entry.job.clone();
                    let due = entry.due_ms;
                    let handle = running.spawn(async move {
                        match runner.run(&job, due, entered).await {
                            Ok(RunResult::Busy(until)) => Some((job, until, false)),
                            Ok(RunResult::AtLimit(until)) => Some((job, until, true)),
                            Ok(_) => None,
                            Err(e) => {
                                tracing::error!(job = %job, error = %e, "recording a handler run failed");
                                None
                            }
                        }
                    });
                    skip.insert(entry.job.clone());
                    in_flight.insert(handle.id(), entry.job);
                }
            }
            let first_deferred = deferred.values().min().copied();
            let wait = if store_failed {
                Duration::from_secs(1)
            } else if more_due && free > 0 {
                // A handler had more due than it was given: go on at once.
                Duration::ZERO
            } else if running.len() >= concurrency {
                poll
            } else {
                let mut next = first_deferred;
                for handler in handlers.runnable(&running_of) {
                    let read = match ready.get(&handler).and_then(|b| b.front()) {
                        Some(entry) => Ok(Some(entry.due_ms)),
                        None => match next_found.get(&handler) {
                            Some(next) => Ok(*next),
                            None => self.runner.store.next_due_of(&handler, &skip).await,
                        },
                    };
                    match read {
                        Ok(Some(due)) => {
                            if let Some(start) = handlers.next_start(&handler, &turns, now) {
                                let at = due.max(start);
                                next = Some(next.map_or(at, |n| n.min(at)));
                            }
                        }
                        Ok(None) => {}
                        Err(_) => next = Some(now + 1000),
                    }
                }
                match next {
                    Some(ms) => self.runner.clock.until_ms(ms).min(poll),
                    None => poll,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = announced() => {}
                () = turns.turn_taken() => {}
                Some(first) = running.join_next_with_id(), if !running.is_empty() => {
                    // Every run that has ended, not only the first: the next pass then fills
                    // all their slots with one queue read. Reaping one run per pass made a
                    // queue read per run, and the loop, not the runs, the limit
                    // (BENCHMARKS.md, session 15).
                    let mut ended = vec![first];
                    while let Some(done) = running.try_join_next_with_id() {
                        ended.push(done);
                    }
                    for done in ended {
                        let (id, busy) = match done {
                            Ok((id, busy)) => (id, busy),
                            Err(e) => (e.id(), None),
                        };
                        let Some(job) = in_flight.remove(&id) else {
                            continue;
                        };
                        if let Some(n) = running_of.get_mut(&job.handler) {
                            *n = n.saturating_sub(1);
                        }
                        match busy {
                            // Held by another runner: skipped until its hold ends.
                            Some((held, until, at_limit)) => {
                                if at_limit {
                                    handlers.hold(&held.handler, until);
                                }
                                deferred.insert(held, until);
                            }
                            None => {
                                skip.remove(&job);
                            }
                        }
                    }
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
        self.running
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let grace = tokio::time::sleep(self.runner.config.shutdown_grace);
        tokio::pin!(grace);
        while !running.is_empty() {
            tokio::select! {
                _ = running.join_next() => {}
                () = &mut grace => {
                    tracing::warn!(running = running.len(), "shutdown grace period over; cancelling handlers (they resume on the next start)");
                    self.runner.cancel.cancel();
                    break;
                }
            }
        }
        // Handlers saw the cancellation; give them a moment to record it, then stop.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while running.join_next().await.is_some() {}
        })
        .await;
        running.abort_all();
    }
}
