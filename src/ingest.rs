//! Ingest: from a received request to the sender's answer, without HTTP.
//!
//! The route ([`crate::routes::webhook`]) reads the body within its limits and hands the
//! rest here: authenticate ([`Source::authenticate_signed`], then
//! [`Source::read_event_type`] unless the store already holds this body under this id),
//! claim `(source, delivery id)` atomically
//! ([`Claims::claim`](crate::store::Claims::claim)), then apply the source's ack policy:
//! - `ack = "durable"`: the first answer (202) is built into the record before the claim, so
//!   it is on disk with it; the handlers run in the background from the durable queue;
//! - `ack = "processed"`: the handlers run before the answer, under a lease on the delivery
//!   that is renewed while they run; 200 is stored when all succeeded, else nothing final.
//!
//! A redelivery gets the stored first answer ([`Outcome::Replayed`]); the same body under
//! another id, with body dedup, gets the first delivery's ([`Outcome::BodyDuplicate`]). The
//! route maps [`IngestError`] to the contract's status codes (`error.rs`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::Notify;
use tracing::Instrument as _;

use crate::clock::Clock;
use crate::collections::FastHashMap;
use crate::config::AckMode;
use crate::dispatch::{Held, RunResult, Runner, hold_lease};
use crate::domain::{Headers, fingerprint};
use crate::handlers::HandlerRegistry;
use crate::store::{
    Claim, DeliveryKey, DeliveryRecord, DeliveryStore, JobStatus, Lease, NewDelivery, StoreError,
    StoredFirst, StoredResponse, TakeOver,
};
use crate::verify::{AuthError, Authenticated, AuthenticatedDelivery, Source};

/// What the sender is answered, when it is not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// New, recorded durably; handlers run in the background (202).
    Accepted(StoredResponse),
    /// New, and every handler succeeded before the answer (200).
    Processed(StoredResponse),
    /// Seen before: the stored first answer, byte for byte.
    Replayed(StoredResponse),
    /// A new id whose body was already recorded under another (body dedup): answered as
    /// that first delivery, recorded as its alias, nothing run.
    BodyDuplicate(StoredResponse),
    /// A provider handshake (Slack's `url_verification`): answered 200 with this JSON and
    /// not recorded.
    Handshake(String),
}

/// Why a request gets no 2xx.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// No source of that name is configured.
    #[error("no source with this name is configured")]
    UnknownSource,
    /// Not an authenticated delivery (signature, id, JSON, event type).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The id was seen with a different body; the record is untouched.
    #[error("this delivery id was already received with a different body")]
    DeliveryIdConflict,
    /// `ack = "processed"`: another copy (or runner) holds the delivery.
    #[error("this delivery is still being processed")]
    InProgress {
        /// Seconds until its lease ends.
        retry_after_secs: u64,
    },
    /// `ack = "processed"`: a handler failed; nothing final was stored.
    #[error("a handler failed")]
    HandlerFailed,
    /// The store could not record or read it.
    #[error(transparent)]
    Storage(#[from] StoreError),
}

/// Everything ingest needs, built once at start-up.
pub struct Ingest {
    /// Configured sources by name.
    pub sources: FastHashMap<String, Source>,
    /// The store.
    pub store: Arc<dyn DeliveryStore>,
    /// Which handlers a delivery binds.
    pub registry: Arc<HandlerRegistry>,
    /// Runs handlers inline in processed mode.
    pub runner: Runner,
    /// Wakes the dispatcher after a new delivery is queued.
    pub dispatch_waker: Arc<Notify>,
    /// Time.
    pub clock: Clock,
    /// `server.unstored_headers`: request headers left out of the stored delivery.
    pub unstored_headers: Vec<String>,
}

/// Connection-level headers: meaningless once the request is over, never stored.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "expect",
];

/// Whether a header is left out of the stored delivery: hop-by-hop, or named (a trailing
/// `*` matches a prefix) in `server.unstored_headers`.
pub fn unstored(name: &str, configured: &[String]) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
        || configured
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name
                    .get(..prefix.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(prefix)),
                None => pattern.eq_ignore_ascii_case(name),
            })
}

/// The body of a first answer.
#[derive(Serialize)]
struct FirstResponse<'a> {
    status: &'a str,
    source: &'a str,
    delivery_id: &'a str,
    received_at: String,
}

/// The first answer to `record`: 202 `accepted` or 200 `processed`. A function of the
/// record alone, so it can be rebuilt byte for byte.
pub fn first_response(record: &DeliveryRecord, processed: bool) -> StoredResponse {
    let body = FirstResponse {
        status: if processed { "processed" } else { "accepted" },
        source: &record.source,
        delivery_id: &record.id,
        received_at: crate::clock::rfc3339_ms(record.received_at_ms),
    };
    StoredResponse {
        status: if processed { 200 } else { 202 },
        // A struct of strings always serializes.
        body: serde_json::to_string(&body).expect("response serializes"),
    }
}

fn in_progress(until_ms: u64, now_ms: u64) -> IngestError {
    IngestError::InProgress {
        retry_after_secs: until_ms.saturating_sub(now_ms).div_ceil(1000).max(1),
    }
}

fn lease_ms(source: &Source) -> u64 {
    source.processed_lease.as_millis() as u64
}

impl Outcome {
    fn into_stored(self) -> StoredResponse {
        match self {
            Outcome::Accepted(r)
            | Outcome::Processed(r)
            | Outcome::Replayed(r)
            | Outcome::BodyDuplicate(r) => r,
            Outcome::Handshake(body) => StoredResponse { status: 200, body },
        }
    }
}

impl Ingest {
    /// The configured source `name`.
    pub fn source(&self, name: &str) -> Result<&Source, IngestError> {
        self.sources.get(name).ok_or(IngestError::UnknownSource)
    }

    /// Authenticates a request to `source` and answers it: claim, ack policy, replay.
    /// `not_utf8` names the headers whose values were not text (never read by a check; see
    /// [`Source::authenticate`]). Records `delivery_id` and `event_type` on `span` once known.
    pub async fn receive(
        &self,
        source: &Source,
        headers: Headers,
        not_utf8: &[String],
        body: Bytes,
        span: &tracing::Span,
    ) -> Result<Outcome, IngestError> {
        let signed = match source.authenticate_signed(headers, not_utf8, body, self.clock.now())? {
            Authenticated::Delivery(d) => d,
            Authenticated::Handshake(answer) => return Ok(Outcome::Handshake(answer)),
        };
        span.record("delivery_id", signed.id().as_str());
        // A replay's span names its event type where that costs no read of the body.
        if let Some(t) = signed.header_event_type() {
            span.record("event_type", t);
        }

        // A redelivery is answered from what is stored before anything is built for it.
        // Its body, when it is the one stored, passed the event-type check (and JSON, where
        // the type is read from the body) when it was first received: not read again.
        let key = DeliveryKey::new(signed.source(), signed.id().as_str());
        let redelivery = match self.store.stored_first(&key).await? {
            Some(existing) => {
                if self.store.take_requeued_by_reads() {
                    self.dispatch_waker.notify_one();
                }
                let fingerprint = fingerprint(signed.body());
                if existing.fingerprint == fingerprint {
                    return self.answer_redelivery(source, existing, &fingerprint).await;
                }
                Some((existing, fingerprint))
            }
            None => None,
        };
        let delivery = source
            .read_event_type(signed)?
            .without_headers(|name| unstored(name, &self.unstored_headers));
        if let Some(t) = delivery.event_type() {
            span.record("event_type", t);
        }
        if let Some((existing, fingerprint)) = redelivery {
            // Another body under a stored id: a conflict, once the checks have passed.
            return self.answer_redelivery(source, existing, &fingerprint).await;
        }

        let received_at_ms = self.clock.now_ms();
        let new = self.new_delivery(source, delivery, received_at_ms);
        let fingerprint = new.record().fingerprint.clone();
        // Built into the record before the claim (durable mode), so it is on disk with it.
        let answer = new.record().response.clone();
        let inline = (source.ack == AckMode::Processed).then(|| new.record().clone());
        match self.store.claim(new).await? {
            Claim::New => match inline {
                None => {
                    self.dispatch_waker.notify_one();
                    let stored = answer.ok_or_else(|| {
                        StoreError::Corrupt("a durable claim without its answer".into())
                    })?;
                    Ok(Outcome::Accepted(stored))
                }
                Some(record) => self.process_inline(source, record).await,
            },
            Claim::Existing(existing) => {
                self.answer_redelivery(source, existing, &fingerprint).await
            }
            Claim::BodyDuplicate(first) => {
                self.answer_existing(source, first.into())
                    .await
                    .map(|(response, replayed)| {
                        if replayed {
                            Outcome::BodyDuplicate(response.into_stored())
                        } else {
                            response
                        }
                    })
            }
        }
    }

    /// A delivery id seen before: its stored answer if the body is the one first received
    /// (`fingerprint`), else a conflict.
    async fn answer_redelivery(
        &self,
        source: &Source,
        existing: StoredFirst,
        fingerprint: &str,
    ) -> Result<Outcome, IngestError> {
        if existing.fingerprint != fingerprint {
            return Err(IngestError::DeliveryIdConflict);
        }
        self.answer_existing(source, existing)
            .await
            .map(|(response, _)| response)
    }

    fn new_delivery(
        &self,
        source: &Source,
        d: AuthenticatedDelivery,
        received_at_ms: u64,
    ) -> NewDelivery {
        let routing = self.registry.matching(d.source(), d.event_type(), d.body());
        let new = NewDelivery::new(d, received_at_ms, routing.handlers, source.body_dedup)
            .traced(crate::telemetry::traceparent(&tracing::Span::current()));
        match source.ack {
            AckMode::Durable => {
                let response = first_response(new.record(), false);
                new.acknowledged(response).ordered(routing.order_keys)
            }
            AckMode::Processed => new.leased(Lease {
                owner: Lease::new_owner(),
                until_ms: received_at_ms + lease_ms(source),
            }),
        }
    }

    /// A delivery seen before: its stored first response; or, in processed mode while it is
    /// not final, a take-over once its lease has lapsed. `.1` is whether the answer is a
    /// replay.
    async fn answer_existing(
        &self,
        source: &Source,
        existing: StoredFirst,
    ) -> Result<(Outcome, bool), IngestError> {
        if let Some(stored) = existing.response {
            return Ok((Outcome::Replayed(stored), true));
        }
        // Processed mode, not final yet: take it over unless someone holds it.
        let now = self.clock.now_ms();
        match self
            .store
            .take_over(
                &existing.key(),
                now,
                Lease {
                    owner: Lease::new_owner(),
                    until_ms: now + lease_ms(source),
                },
            )
            .await?
        {
            TakeOver::Final(r) => {
                let response = r.response.ok_or_else(|| {
                    StoreError::Corrupt("a final delivery without its answer".into())
                })?;
                Ok((Outcome::Replayed(response), true))
            }
            TakeOver::Held { until_ms } => Err(in_progress(until_ms, now)),
            TakeOver::Acquired(r) => Ok((self.process_inline(source, r).await?, false)),
        }
    }

    /// `ack = "processed"`: run every handler that has not yet succeeded, then store the 200
    /// (all succeeded) or release the lease and fail with [`IngestError::HandlerFailed`]
    /// (the sender's retry re-runs only the failures). The lease is renewed while the
    /// handlers run, so a slow handler never lets a second copy take over beside it; when
    /// it can no longer be proven held, the handlers are stopped and the sender gets 503
    /// (invariant 6). A handler that another runner holds (an operator retry running in the
    /// background), or whose turn (`concurrency`, `rate`) does not come within the lease,
    /// makes it [`IngestError::InProgress`]. Runs as its own task so a sender hanging up
    /// does not cut a handler short.
    async fn process_inline(
        &self,
        source: &Source,
        record: DeliveryRecord,
    ) -> Result<Outcome, IngestError> {
        let runner = self.runner.clone();
        let lease = source.processed_lease;
        // Instrumented with the delivery's span, so each handler run logs as its child.
        let task = tokio::spawn(
            async move { run_inline(runner, lease, record).await }
                .instrument(tracing::Span::current()),
        );
        match task.await {
            Ok(Ok(Inline::Processed(response))) => Ok(Outcome::Processed(response)),
            Ok(Ok(Inline::Failed)) => Err(IngestError::HandlerFailed),
            Ok(Ok(Inline::Busy(busy_until))) => Err(in_progress(busy_until, self.clock.now_ms())),
            Ok(Err(e)) => Err(IngestError::Storage(e)),
            Err(_) => Err(IngestError::HandlerFailed),
        }
    }
}

/// How [`run_inline`] ended, when the store did its part.
enum Inline {
    /// Every handler succeeded: the stored 200.
    Processed(StoredResponse),
    /// A handler failed; nothing final stored.
    Failed,
    /// Another runner holds a handler, or its turn did not come: retry at this time.
    Busy(u64),
}

/// The body of [`Ingest::process_inline`]'s task, holding the delivery's processed lease
/// (`record.lease_owner`'s) with [`hold_lease`].
async fn run_inline(
    runner: Runner,
    lease: Duration,
    record: DeliveryRecord,
) -> Result<Inline, StoreError> {
    let key = record.key();
    let Some(held) = record.processed_lease() else {
        return Err(StoreError::Corrupt(
            "a processed-mode delivery without its lease".into(),
        ));
    };
    // The handlers stop when the delivery's lease can no longer be proven held: their
    // tokens are children of this one.
    let stop = runner.cancel.child_token();
    let mut inner = runner.clone();
    inner.cancel = stop.clone();
    let work = async {
        let mut all_succeeded = true;
        for handler in &record.handlers {
            let job = key.job(handler);
            match inner.run_inline(&job, lease).await? {
                RunResult::Busy(until) | RunResult::AtLimit(until) => {
                    return Ok(Inline::Busy(until));
                }
                RunResult::NoTurn => {
                    return Ok(Inline::Busy(inner.clock.now_ms() + 1000));
                }
                RunResult::LeaseLost(why) => return Err(StoreError::LeaseLost(why)),
                RunResult::Skipped | RunResult::Succeeded | RunResult::Failed(_) => {}
            }
            let done = inner
                .store
                .job(&job)
                .await?
                .is_some_and(|j| j.status == JobStatus::Succeeded);
            all_succeeded &= done;
        }
        Ok::<_, StoreError>(if all_succeeded {
            Inline::Processed(first_response(&record, true))
        } else {
            Inline::Failed
        })
    };
    // The lease surely holds until the end the claim (or take-over) wrote.
    let held_until = tokio::time::Instant::now() + runner.clock.until_ms(held.until_ms);
    let outcome = hold_lease(work, lease, held_until, runner.clock, &stop, |until_ms| {
        Box::pin(runner.store.renew_lease(
            &key,
            Lease {
                owner: held.owner,
                until_ms,
            },
        ))
    })
    .await;
    let outcome = match outcome {
        Held::Finished(outcome) => outcome,
        // Reports nothing: not even a release, the lease may be someone else's by now.
        Held::Lost(why) => return Err(StoreError::LeaseLost(why)),
    };
    match outcome {
        Ok(Inline::Processed(response)) => {
            if !runner
                .store
                .release(&key, held.owner, Some(response.clone()))
                .await?
            {
                return Err(StoreError::LeaseLost(
                    "the delivery was taken over before its answer was stored".into(),
                ));
            }
            Ok(Inline::Processed(response))
        }
        Ok(other) => {
            runner.store.release(&key, held.owner, None).await?;
            Ok(other)
        }
        Err(e) => {
            // Best effort: let the sender's retry take over without waiting. The delivery's
            // lease is still ours here (a lost *pair* lease lands here too); `release` is
            // owner-checked, so it never clears a lease someone else took.
            let _ = runner.store.release(&key, held.owner, None).await;
            Err(e)
        }
    }
}
