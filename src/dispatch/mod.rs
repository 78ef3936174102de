//! Dispatch: runs each (delivery, handler) pair until it succeeds once.
//!
//! The queue lives in the store, ordered by due time, and its entries are written with the
//! claim, before the acknowledgement; the [`Dispatcher`] reads only its front. A run is counted durably *before* the
//! handler starts ([`DeliveryStore::begin_attempt`]) and its queue entry stays until the
//! outcome is recorded, so a crash mid-run leaves the entry due: on the next start the pair
//! runs again with `attempt + 1` and the same idempotency key. Start-up therefore costs what
//! is queued, not what is stored.
//!
//! Failures back off exponentially with jitter ([`backoff`]); after `max_attempts`, or a
//! [`HandlerError::Permanent`], the pair is dead-lettered and kept.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::clock::Clock;
use crate::config::DispatchConfig;
use crate::handlers::{Delivery, HandlerContext, HandlerError, HandlerRegistry};
use crate::metrics::Metrics;
use crate::store::{AttemptOutcome, Begin, DeliveryStore, JobKey, StoreError};

/// The delay before retry number `attempt` (1 after the first failure): doubling from
/// `initial`, capped at `max`, plus up to half again of random jitter so that a burst of
/// failures does not retry in lock-step. Each delay is at least the previous one's maximum
/// until the cap, so delays grow.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    let base = initial.saturating_mul(1u32 << exp.min(31)).min(max);
    let jitter_ms = (base.as_millis() as u64) / 2;
    let jitter = if jitter_ms == 0 {
        0
    } else {
        rand::random::<u64>() % jitter_ms
    };
    (base + Duration::from_millis(jitter)).min(max)
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
}

impl Runner {
    /// Runs `job` once. Taken from the queue entry due at `queued_due`, a failure is
    /// rescheduled through the queue (or dead-lettered); run inline (`None`), it is only
    /// recorded (the sender's retry re-runs it).
    pub async fn run(
        &self,
        job: &JobKey,
        queued_due: Option<u64>,
    ) -> Result<RunResult, StoreError> {
        let queued = queued_due.is_some();
        let now = self.clock.now_ms();
        // Held this long unless renewed: renewed every third of it while the handler runs,
        // so a long handler keeps it and a process that died loses it.
        let lease = self.config.run_lease;
        let attempt = match self
            .store
            .begin_attempt(job, queued_due, now, now + lease.as_millis() as u64)
            .await?
        {
            Begin::Started(attempt) => attempt,
            Begin::Busy { until_ms } => return Ok(RunResult::Busy(until_ms)),
            Begin::Skipped => return Ok(RunResult::Skipped),
        };
        let record = &attempt.record;
        let span = tracing::info_span!(
            "handler",
            handler = %job.handler,
            source = %record.source,
            delivery_id = %record.id,
            attempt = attempt.attempt,
            result = tracing::field::Empty,
        );
        let started = std::time::Instant::now();
        let result = async {
            let Some(handler) = self.registry.get(&job.handler) else {
                return Err(HandlerError::Permanent(format!(
                    "handler `{}` is no longer configured",
                    job.handler
                )));
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
                shutdown: self.cancel.clone(),
            };
            let run = AssertUnwindSafe(handler.handle(&delivery, &ctx)).catch_unwind();
            tokio::pin!(run);
            // Keep the lease while the handler runs, however long it takes.
            let mut renew = tokio::time::interval(lease / 3);
            renew.tick().await;
            loop {
                tokio::select! {
                    result = &mut run => {
                        break result.unwrap_or_else(|_| {
                            Err(HandlerError::Retryable("handler panicked".into()))
                        });
                    }
                    _ = renew.tick() => {
                        let until = self.clock.now_ms() + lease.as_millis() as u64;
                        match self.store.renew_job_lease(job, attempt.attempt, until).await {
                            Ok(true) => {}
                            Ok(false) => tracing::warn!("the run's lease was lost; its outcome may be ignored"),
                            Err(e) => tracing::warn!(error = %e, "renewing the run's lease failed"),
                        }
                    }
                }
            }
        }
        .instrument(span.clone())
        .await;

        let now = self.clock.now_ms();
        let outcome = match &result {
            Ok(()) => AttemptOutcome::Succeeded,
            Err(e) if !queued => AttemptOutcome::Failed {
                error: e.to_string(),
            },
            Err(HandlerError::Permanent(m)) => AttemptOutcome::Dead {
                error: format!("permanent: {m}"),
            },
            Err(e @ HandlerError::Retryable(_))
                if attempt.attempts_in_round >= self.config.max_attempts =>
            {
                AttemptOutcome::Dead {
                    error: format!("{e} (gave up after {} attempts)", attempt.attempt),
                }
            }
            Err(e) => {
                let delay = backoff(
                    attempt.attempt,
                    self.config.initial_backoff,
                    self.config.max_backoff,
                );
                AttemptOutcome::RetryAt {
                    due_ms: now + delay.as_millis() as u64,
                    error: e.to_string(),
                }
            }
        };
        let label = match &outcome {
            AttemptOutcome::Succeeded => "succeeded",
            AttemptOutcome::RetryAt { .. } | AttemptOutcome::Failed { .. } => "failed",
            AttemptOutcome::Dead { .. } => "dead",
        };
        span.record("result", label);
        self.metrics
            .handler_run(&job.handler, label, started.elapsed().as_secs_f64());
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
        let mut running: JoinSet<Option<(JobKey, u64)>> = JoinSet::new();
        let mut in_flight: HashMap<tokio::task::Id, JobKey> = HashMap::new();
        // Pairs another runner holds (an inline processed-mode run), left alone until
        // their lease ends: their queue entry stays, so nothing is lost by waiting.
        let mut deferred: HashMap<JobKey, u64> = HashMap::new();
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
        loop {
            let now = self.runner.clock.now_ms();
            deferred.retain(|_, until| *until > now);
            let free = concurrency.saturating_sub(running.len());
            let mut store_failed = false;
            let skip: HashSet<JobKey> =
                in_flight.values().chain(deferred.keys()).cloned().collect();
            if free > 0 {
                match self.runner.store.due_jobs(now, free, &skip).await {
                    Ok(due) => {
                        for entry in due {
                            let runner = self.runner.clone();
                            let job = entry.job.clone();
                            let due = entry.due_ms;
                            let handle = running.spawn(async move {
                                match runner.run(&job, Some(due)).await {
                                    Ok(RunResult::Busy(until)) => Some((job, until)),
                                    Ok(_) => None,
                                    Err(e) => {
                                        tracing::error!(job = %job, error = %e, "recording a handler run failed");
                                        None
                                    }
                                }
                            });
                            in_flight.insert(handle.id(), entry.job);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reading the queue failed");
                        store_failed = true;
                    }
                }
            }
            let skip: HashSet<JobKey> =
                in_flight.values().chain(deferred.keys()).cloned().collect();
            let first_deferred = deferred.values().min().copied();
            let wait = if store_failed {
                Duration::from_secs(1)
            } else if running.len() >= concurrency {
                poll
            } else {
                let next = match self.runner.store.next_due_ms(&skip).await {
                    Ok(next) => next,
                    Err(_) => Some(now + 1000),
                };
                match next.into_iter().chain(first_deferred).min() {
                    Some(ms) => self.runner.clock.until_ms(ms).min(poll),
                    None => poll,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = announced() => {}
                Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                    let id = match done {
                        Ok((id, busy)) => {
                            if let Some((job, until)) = busy {
                                deferred.insert(job, until);
                            }
                            id
                        }
                        Err(e) => e.id(),
                    };
                    in_flight.remove(&id);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_within_bounds() {
        let initial = Duration::from_secs(1);
        let max = Duration::from_secs(600);
        for _ in 0..100 {
            let mut previous = Duration::ZERO;
            for attempt in 1..=12 {
                let d = backoff(attempt, initial, max);
                assert!(d >= initial && d <= max, "attempt {attempt}: {d:?}");
                assert!(
                    d >= previous || d == max,
                    "attempt {attempt}: {d:?} < {previous:?}"
                );
                previous = d;
            }
        }
        assert_eq!(backoff(40, initial, max), max);
    }
}
