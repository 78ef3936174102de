//! One run of one (delivery, handler) pair, shared by the dispatcher and the
//! `ack = "processed"` path: the handler's turn ([`super::turns`]), the start under a
//! lease (counted before the handler runs), the handler under that lease, kept and fenced
//! by [`super::hold_lease`], then the outcome ([`super::retry::outcome`]) recorded.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::hold::{Held, hold_lease};
use super::retry;
use super::turns::{Entered, Turns};
use crate::calls::CallService;
use crate::clock::Clock;
use crate::config::DispatchConfig;
use crate::handlers::{Delivery, HandlerContext, HandlerError, HandlerRegistry};
use crate::metrics::Metrics;
use crate::store::{AttemptOutcome, Begin, DeliveryStore, JobKey, StoreError};

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
    /// `entered` is the run's place in its handler's rate ([`Turns::enter`], taken when the
    /// run was handed out).
    pub async fn run(
        &self,
        job: &JobKey,
        queued_due: u64,
        entered: Entered,
    ) -> Result<RunResult, StoreError> {
        self.run_once(job, Some(queued_due), entered, None).await
    }

    /// Runs `job` once inline (`ack = "processed"`), its sender waiting: a failure is only
    /// recorded (the sender's retry re-runs it). Gives up ([`RunResult::NoTurn`]) when the
    /// handler's turn does not come within `wait`.
    pub async fn run_inline(&self, job: &JobKey, wait: Duration) -> Result<RunResult, StoreError> {
        let entered = self.turns.enter(&job.handler);
        self.run_once(job, None, entered, Some(wait)).await
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
        entered: Entered,
        wait: Option<Duration>,
    ) -> Result<RunResult, StoreError> {
        let queued = queued_due.is_some();
        let deadline = wait.map(|w| tokio::time::Instant::now() + w);
        // The turn first, holding no lease (invariant 6): a run waiting for its rate or a
        // slot has not started, and no lease can lapse under it.
        let Some(_turn) = self.turns.take(&job.handler, entered, wait).await? else {
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
