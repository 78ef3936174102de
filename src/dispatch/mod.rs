//! Dispatch: runs each (delivery, handler) pair until it succeeds once.
//!
//! The queue lives in the store, one per handler ordered by due time, and its entries are
//! written with the claim, before the acknowledgement; the [`Dispatcher`] reads, in turns,
//! only the front of the queues of the handlers that may start a run now (not paused,
//! under their `concurrency` and `rate`), so a held-back handler's backlog costs nothing. A
//! run is counted *before* the handler starts ([`JobQueue::begin_attempt`](crate::store::JobQueue::begin_attempt): durably
//! with PostgreSQL; in memory with sled, where a crash is counted at the next opening
//! instead) and its queue entry stays until the outcome is recorded, so a crash mid-run
//! leaves the entry due: on the next start the pair runs again with `attempt + 1` and the
//! same idempotency key. Start-up therefore costs what is queued, not what is stored.
//!
//! What a pass costs is kept off the number of runs in flight, since the entries being
//! run stay at the front of the queue: with a store of this process alone the dispatcher
//! reads [`READ_AHEAD`] due entries at once and starts them as slots free up, the next
//! read starts past the last entry read (and from the front at least every
//! half a second), the same read tells when to look next, and skipped entries
//! are recognised by their raw keys ([`crate::store::SkipSet`]). Whatever went stale in
//! between is caught by `begin_attempt`, under the delivery's lock.
//!
//! Failures back off exponentially with jitter ([`backoff`]); after `max_attempts`, or a
//! [`HandlerError::Permanent`], the pair is dead-lettered and kept.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::calls::CallService;
use crate::clock::Clock;
use crate::config::DispatchConfig;
use crate::handlers::{Delivery, HandlerContext, HandlerError, HandlerRegistry};
use crate::metrics::Metrics;
use crate::store::{AttemptOutcome, Begin, DeliveryStore, JobKey, QueuedJob, SkipSet, StoreError};

pub mod hold;
pub mod retry;
pub mod turns;

pub use hold::{Held, hold_lease};
pub use retry::backoff;
pub use turns::{Turn, Turns};

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
/// from the front, which comes at least this often while the handler has work.
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

/// How one run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunResult {
    /// The pair had already succeeded or died, or its delivery expired: nothing ran.
    Skipped,
    /// Another runner holds the pair until this time (ms since the epoch): nothing ran.
    Busy(u64),
    /// The handler runs as many pairs as its `concurrency` allows on every replica
    /// together: nothing ran; look again at this time (ms since the epoch).
    AtLimit(u64),
    /// An inline run did not get its turn (`concurrency`, `rate`) within its wait: nothing
    /// ran.
    NoTurn,
    /// The run's lease could not be proven held: the handler was stopped and no outcome
    /// recorded (invariant 6); the pair runs again once the lease is past its grace.
    LeaseLost(String),
    /// The handler succeeded.
    Succeeded,
    /// The handler failed.
    Failed(HandlerError),
}

/// Shared by the dispatcher and the `ack = "processed"` path: run one pair once.
#[derive(Clone)]
pub struct Runner {
    /// The store.
    pub store: Arc<dyn DeliveryStore>,
    /// The handlers.
    pub registry: Arc<HandlerRegistry>,
    /// Retry policy.
    pub config: DispatchConfig,
    /// Time.
    pub clock: Clock,
    /// Cancelled when running handlers must stop.
    pub cancel: CancellationToken,
    /// Where runs are counted.
    pub metrics: Arc<Metrics>,
    /// Each handler's `concurrency` and `rate`, for every run of this process.
    pub turns: Arc<Turns>,
    /// The downstream client every run's context carries.
    pub calls: Arc<CallService>,
    /// Told how each run ended (operational webhooks).
    pub alerts: Arc<crate::alerts::Alerts>,
}

impl Runner {
    /// A runner over `store` and `registry`, with a gate per handler.
    pub fn new(
        store: Arc<dyn DeliveryStore>,
        registry: Arc<HandlerRegistry>,
        config: DispatchConfig,
        clock: Clock,
        cancel: CancellationToken,
        metrics: Arc<Metrics>,
        calls: Arc<CallService>,
    ) -> Runner {
        let turns = Arc::new(Turns::new(&registry, store.clone(), clock));
        Runner {
            store,
            registry,
            config,
            clock,
            cancel,
            metrics,
            turns,
            calls,
            alerts: crate::alerts::Alerts::none(),
        }
    }

    /// The runner, telling `alerts` how each run ends.
    pub fn with_alerts(mut self, alerts: Arc<crate::alerts::Alerts>) -> Runner {
        self.alerts = alerts;
        self
    }

    /// Runs `job` once, taken from the queue entry due at `queued_due`: waits for the
    /// handler's turn, then starts it under a lease; a failure is rescheduled through the
    /// queue (or dead-lettered).
    pub async fn run(&self, job: &JobKey, queued_due: u64) -> Result<RunResult, StoreError> {
        self.run_once(job, Some(queued_due), None).await
    }

    /// Runs `job` once inline (`ack = "processed"`), its sender waiting: a failure is only
    /// recorded (the sender's retry re-runs it). Gives up ([`RunResult::NoTurn`]) when the
    /// handler's turn does not come within `wait`.
    pub async fn run_inline(&self, job: &JobKey, wait: Duration) -> Result<RunResult, StoreError> {
        self.run_once(job, None, Some(wait)).await
    }

    /// A delivery that cannot be read back intact (invariant 8): its pair is dead-lettered
    /// with the reason, through the same outcome path as any dead run, so it never blocks its
    /// `order_by` line or comes back to the dispatcher.
    async fn dead_letter_unreadable(
        &self,
        job: &JobKey,
        attempt: u32,
        error: String,
    ) -> Result<RunResult, StoreError> {
        let error = format!("body unreadable: {error}");
        tracing::error!(job = %job, %error, "dead-lettering a delivery that cannot be read back");
        self.metrics.handler_run(&job.handler, "dead", 0.0);
        self.alerts.run_finished(
            &job.handler,
            &job.delivery.source,
            &job.delivery.id,
            crate::alerts::RunEnd::Dead,
            &error,
        );
        self.store
            .finish_attempt(
                job,
                attempt,
                AttemptOutcome::Dead {
                    error: error.clone(),
                },
                self.clock.now_ms(),
            )
            .await?;
        Ok(RunResult::Failed(HandlerError::Permanent(error)))
    }

    async fn run_once(
        &self,
        job: &JobKey,
        queued_due: Option<u64>,
        wait: Option<Duration>,
    ) -> Result<RunResult, StoreError> {
        let queued = queued_due.is_some();
        let deadline = wait.map(|w| tokio::time::Instant::now() + w);
        // The turn first, holding no lease (invariant 6): a run waiting for its rate or a
        // slot has not started, and no lease can lapse under it.
        let Some(_turn) = self.turns.take(&job.handler, wait).await? else {
            return Ok(RunResult::NoTurn);
        };
        let concurrency = self.turns.concurrency_of(&job.handler);
        // Held this long unless renewed: renewed every third of it while the handler runs,
        // so a long handler keeps it and a process that died loses it.
        let lease = self.config.run_lease;
        let attempt = loop {
            let now = self.clock.now_ms();
            // The lease surely holds until this instant: taken before the write is issued.
            let held_until = tokio::time::Instant::now() + lease;
            let begin = self
                .store
                .begin_limited_attempt(
                    job,
                    queued_due,
                    now,
                    now + lease.as_millis() as u64,
                    concurrency,
                )
                .await?;
            match begin {
                Begin::Started(attempt) => break (attempt, held_until),
                Begin::Unreadable { attempt, error } => {
                    return self.dead_letter_unreadable(job, attempt, error).await;
                }
                Begin::Busy { until_ms } => return Ok(RunResult::Busy(until_ms)),
                Begin::Skipped => return Ok(RunResult::Skipped),
                Begin::AtLimit { retry_at_ms } => {
                    // Inline, the sender waits for a slot on another replica as long as it
                    // may; the dispatcher leaves the handler alone until then instead.
                    let again = tokio::time::Instant::now() + self.clock.until_ms(retry_at_ms);
                    match deadline {
                        Some(d) if again <= d => tokio::time::sleep_until(again).await,
                        Some(_) => return Ok(RunResult::NoTurn),
                        None => return Ok(RunResult::AtLimit(retry_at_ms)),
                    }
                }
            }
        };
        let (attempt, held_until) = attempt;
        let record = &attempt.record;
        let span = tracing::info_span!(
            "handler",
            otel.name = "run",
            handler = %job.handler,
            source = %record.source,
            delivery_id = %record.id,
            attempt = attempt.attempt,
            result = tracing::field::Empty,
        );
        crate::telemetry::link_to(&span, record.trace_parent.as_deref());
        let started = std::time::Instant::now();
        // The handler's own token: shutdown, or a lease that can no longer be proven held.
        let stop = self.cancel.child_token();
        let result = async {
            let Some(handler) = self.registry.get(&job.handler) else {
                return Ok(Err(HandlerError::Permanent(format!(
                    "handler `{}` is no longer configured",
                    job.handler
                ))));
            };
            let delivery = Delivery {
                source: record.source.clone(),
                id: record.id.clone(),
                event_type: record.event_type.clone(),
                received_at: std::time::UNIX_EPOCH + Duration::from_millis(record.received_at_ms),
                attempt: attempt.attempt,
                headers: record.headers.clone(),
                body: attempt.body.clone(),
            };
            let ctx = HandlerContext {
                idempotency_key: job.idempotency_key(),
                shutdown: stop.clone(),
                calls: self.calls.for_run(job.clone(), stop.clone()),
            };
            let run = AssertUnwindSafe(handler.handle(&delivery, &ctx)).catch_unwind();
            // Keep the lease while the handler runs, however long it takes; stop it when the
            // lease can no longer be proven held.
            let number = attempt.attempt;
            let held = hold_lease(run, lease, held_until, self.clock, &stop, |until| {
                Box::pin(self.store.renew_job_lease(job, number, until))
            })
            .await;
            match held {
                Held::Finished(result) => Ok(result
                    .unwrap_or_else(|_| Err(HandlerError::Retryable("handler panicked".into())))),
                Held::Lost(why) => Err(why),
            }
        }
        .instrument(span.clone())
        .await;
        let result = match result {
            Ok(result) => result,
            Err(why) => {
                // No outcome: whoever runs it next (after the grace) counts the attempt.
                span.record("result", "lease_lost");
                self.metrics.handler_run(
                    &job.handler,
                    "lease_lost",
                    started.elapsed().as_secs_f64(),
                );
                tracing::warn!(parent: &span, reason = %why, "run stopped: its lease could not be proven held; no outcome recorded");
                return Ok(RunResult::LeaseLost(why));
            }
        };

        let now = self.clock.now_ms();
        let outcome = retry::outcome(
            &result,
            queued,
            attempt.attempt,
            attempt.attempts_in_round,
            &self.config,
            now,
        );
        let label = match &outcome {
            AttemptOutcome::Succeeded => "succeeded",
            AttemptOutcome::RetryAt { .. } | AttemptOutcome::Failed { .. } => "failed",
            AttemptOutcome::Dead { .. } => "dead",
        };
        span.record("result", label);
        self.metrics
            .handler_run(&job.handler, label, started.elapsed().as_secs_f64());
        let (end, error) = match &outcome {
            AttemptOutcome::Succeeded => (crate::alerts::RunEnd::Succeeded, ""),
            AttemptOutcome::RetryAt { error, .. } | AttemptOutcome::Failed { error } => {
                (crate::alerts::RunEnd::Failed, error.as_str())
            }
            AttemptOutcome::Dead { error } => (crate::alerts::RunEnd::Dead, error.as_str()),
        };
        self.alerts.run_finished(
            &job.handler,
            &job.delivery.source,
            &job.delivery.id,
            end,
            error,
        );
        match &outcome {
            AttemptOutcome::Succeeded => {
                tracing::debug!(parent: &span, "handler succeeded")
            }
            AttemptOutcome::Dead { error } => {
                tracing::warn!(parent: &span, ?error, "handler dead-lettered")
            }
            AttemptOutcome::RetryAt { error, due_ms } => {
                tracing::info!(parent: &span, ?error, retry_in_ms = due_ms.saturating_sub(now), "handler failed; will retry")
            }
            AttemptOutcome::Failed { error } => {
                tracing::info!(parent: &span, ?error, "handler failed")
            }
        }
        self.store
            .finish_attempt(job, attempt.attempt, outcome, now)
            .await?;
        Ok(match result {
            Ok(()) => RunResult::Succeeded,
            Err(e) => RunResult::Failed(e),
        })
    }
}

/// How often the dispatcher looks for queued handlers that are no longer configured (their
/// pairs are run, and die with an error that says so, rather than wait forever).
const UNCONFIGURED_SCAN: Duration = Duration::from_secs(60);

/// The handlers the dispatcher serves, in turns, with what limits them: a pause (read from
/// the store every pass, so a pause on another replica holds here too), `concurrency`
/// (runs of this process) and `rate` (starts spread evenly, a burst of one).
struct HandlerTurns {
    names: Vec<String>,
    limits: HashMap<String, crate::handlers::HandlerLimits>,
    paused: HashSet<String>,
    /// `rate`: the earliest next start, ms since the epoch.
    next_start: HashMap<String, u64>,
    /// Which handler goes first this pass, so that none is always served last.
    turn: usize,
    scanned_at: Option<std::time::Instant>,
}

impl HandlerTurns {
    fn new(registry: &HandlerRegistry) -> HandlerTurns {
        let limits: HashMap<String, _> = registry
            .limits()
            .map(|(name, limits)| (name.to_owned(), limits))
            .collect();
        HandlerTurns {
            names: registry.limits().map(|(name, _)| name.to_owned()).collect(),
            limits,
            paused: HashSet::new(),
            next_start: HashMap::new(),
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

    /// Runs `handler` may start now, out of `free` slots of the whole dispatcher.
    fn capacity(
        &self,
        handler: &str,
        free: usize,
        running_of: &HashMap<String, usize>,
        now: u64,
    ) -> usize {
        let limits = self.limits.get(handler).copied().unwrap_or_default();
        if self.next_start(handler) > now {
            return 0;
        }
        let mut cap = free;
        if let Some(limit) = limits.concurrency {
            cap = cap.min(limit.saturating_sub(running_of.get(handler).copied().unwrap_or(0)));
        }
        if limits.rate.is_some() {
            cap = cap.min(1);
        }
        cap
    }

    /// Counts a start against `rate`.
    fn started(&mut self, handler: &str, now: u64) {
        if let Some(rate) = self.limits.get(handler).and_then(|l| l.rate) {
            let at = self.next_start(handler).max(now);
            self.next_start
                .insert(handler.to_owned(), at + rate.interval().as_millis() as u64);
        }
    }

    /// Starts no run of `handler` before `until_ms` (its `concurrency` is reached on every
    /// replica together).
    fn hold(&mut self, handler: &str, until_ms: u64) {
        let at = self.next_start(handler).max(until_ms);
        self.next_start.insert(handler.to_owned(), at);
    }

    /// The earliest time `rate`, or a hold, lets `handler` start a run (0: any time).
    fn next_start(&self, handler: &str) -> u64 {
        self.next_start.get(handler).copied().unwrap_or(0)
    }

    /// The handlers that could start a run once one is due (not paused, under their
    /// `concurrency`).
    fn runnable(&self, running_of: &HashMap<String, usize>) -> Vec<String> {
        self.names
            .iter()
            .filter(|h| !self.paused.contains(*h))
            .filter(|h| {
                self.limits
                    .get(*h)
                    .and_then(|l| l.concurrency)
                    .is_none_or(|limit| running_of.get(*h).copied().unwrap_or(0) < limit)
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
        let mut in_flight: HashMap<tokio::task::Id, JobKey> = HashMap::new();
        // Pairs another runner holds (an inline processed-mode run, another replica), left
        // alone until their lease ends: their queue entry stays, so nothing is lost by
        // waiting.
        let mut deferred: HashMap<JobKey, u64> = HashMap::new();
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
        let mut ready: HashMap<String, VecDeque<QueuedJob>> = HashMap::new();
        let mut positions: HashMap<String, ReadPosition> = HashMap::new();
        // Runs in flight per handler, kept as runs start and end.
        let mut running_of: HashMap<String, usize> = HashMap::new();
        let mut handlers = HandlerTurns::new(&self.runner.registry);
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
            let mut next_found: HashMap<String, Option<u64>> = HashMap::new();
            // Each handler's own queue, only of the handlers that may start a run now: a
            // paused or limited handler's backlog is not read at all.
            for handler in handlers.in_turn() {
                if free == 0 || store_failed {
                    break;
                }
                let cap = handlers.capacity(&handler, free, &running_of, now);
                if cap == 0 {
                    continue;
                }
                let buffered = ready.entry(handler.clone()).or_default();
                if buffered.is_empty() {
                    let want = cap.max(read_ahead);
                    let position = positions.entry(handler.clone()).or_default();
                    let from_front = read_ahead == 0
                        || position.after.is_none()
                        || now >= position.front_read_ms + FRONT_READ_EVERY_MS;
                    let after = if from_front {
                        None
                    } else {
                        position.after.as_ref()
                    };
                    let read = self
                        .runner
                        .store
                        .due_jobs_and_next_of(&handler, now, want, &skip, after)
                        .await;
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
                    handlers.started(&handler, now);
                    *running_of.entry(handler.clone()).or_default() += 1;
                    free -= 1;
                    let runner = self.runner.clone();
                    let job = entry.job.clone();
                    let due = entry.due_ms;
                    let handle = running.spawn(async move {
                        match runner.run(&job, due).await {
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
                            let at = due.max(handlers.next_start(&handler));
                            next = Some(next.map_or(at, |n| n.min(at)));
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
                Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                    let (id, busy) = match done {
                        Ok((id, busy)) => (id, busy),
                        Err(e) => (e.id(), None),
                    };
                    if let Some(job) = in_flight.remove(&id) {
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
