//! `POST /webhooks/{source}`: check, claim, answer.
//!
//! 1. The checks of design.md, in order; any failure answers and stores nothing.
//! 2. The atomic claim of `(source, delivery id)`.
//! 3. New: the first response (202 once durable, or 200 after the handlers in processed
//!    mode). Seen with the same body: the stored first response, byte for byte, plus
//!    `Idempotent-Replayed: true`. Seen with another body: 422, the record untouched.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::BytesMut;
use futures_util::StreamExt as _;
use serde::Serialize;
use tracing::Instrument as _;

use crate::config::AckMode;
use crate::dispatch::RunResult;
use crate::error::ApiError;
use crate::startup::AppState;
use crate::store::{Claim, DeliveryRecord, JobStatus, NewDelivery, StoredResponse, TakeOver};
use crate::verify::{Authenticated, AuthenticatedDelivery, Headers, Source};

/// Body of the first answer.
#[derive(Serialize)]
struct FirstResponse<'a> {
    status: &'a str,
    source: &'a str,
    delivery_id: &'a str,
    received_at: String,
}

fn first_response(record: &DeliveryRecord, status: StatusCode) -> StoredResponse {
    let body = FirstResponse {
        status: if status == StatusCode::OK {
            "processed"
        } else {
            "accepted"
        },
        source: &record.source,
        delivery_id: &record.id,
        received_at: crate::clock::rfc3339_ms(record.received_at_ms),
    };
    StoredResponse {
        status: status.as_u16(),
        // A struct of strings always serializes.
        body: serde_json::to_string(&body).expect("response serializes"),
    }
}

fn answer(stored: &StoredResponse, replayed: bool) -> HttpResponse {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::ACCEPTED);
    let mut response = HttpResponse::build(status);
    response.content_type("application/json");
    if replayed {
        response.insert_header(("Idempotent-Replayed", "true"));
    }
    response.body(stored.body.clone())
}

fn storage(e: crate::store::StoreError) -> ApiError {
    tracing::error!(error = %e, "store failure");
    ApiError::StorageUnavailable
}

/// Reads the body, refusing more than `max` bytes (by `Content-Length` up front, and while
/// streaming for chunked bodies).
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    max: usize,
) -> Result<bytes::Bytes, ApiError> {
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(ApiError::PayloadTooLarge);
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0).min(max as u64) as usize);
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| ApiError::InvalidBody)?;
        if body.len() + chunk.len() > max {
            return Err(ApiError::PayloadTooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn headers_of(req: &HttpRequest) -> Headers {
    Headers(
        req.headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    )
}

/// `POST /webhooks/{source}`.
pub async fn receive(
    req: HttpRequest,
    source: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let span = tracing::info_span!(
        "delivery",
        source = %source,
        delivery_id = tracing::field::Empty,
        event_type = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let result = handle(&req, &source, payload, &state, &span)
        .instrument(span.clone())
        .await;
    let (outcome, reason) = match &result {
        Ok(Outcome::Accepted(_)) => ("accepted", ""),
        Ok(Outcome::Processed(_)) => ("processed", ""),
        Ok(Outcome::Replayed(_)) => ("replayed", ""),
        Ok(Outcome::BodyDuplicate(_)) => ("body_duplicate", ""),
        Ok(Outcome::Handshake(_)) => ("handshake", ""),
        Err(ApiError::DeliveryIdConflict) => ("conflict", ""),
        Err(ApiError::DeliveryInProgress { .. }) => ("in_progress", ""),
        Err(ApiError::StorageUnavailable) => ("unavailable", ""),
        Err(ApiError::HandlerFailed) => ("handler_failed", ""),
        Err(e) => ("rejected", e.code()),
    };
    span.record("outcome", if reason.is_empty() { outcome } else { reason });
    let source_label = if state.sources.contains_key(source.as_str()) {
        source.as_str()
    } else {
        "_unknown"
    };
    state.metrics.delivery(source_label, outcome, reason);
    let _entered = span.enter();
    match &result {
        Err(ApiError::StorageUnavailable | ApiError::HandlerFailed) => {
            tracing::warn!("delivery not acknowledged")
        }
        Err(_) => tracing::info!("delivery rejected"),
        Ok(_) => tracing::debug!("delivery answered"),
    }
    result.map(Outcome::into_response)
}

enum Outcome {
    Accepted(StoredResponse),
    Processed(StoredResponse),
    Replayed(StoredResponse),
    /// A new id whose body was already recorded under another (body dedup): answered as
    /// that first delivery, recorded as its alias, nothing run.
    BodyDuplicate(StoredResponse),
    /// A provider handshake (Slack's `url_verification`), answered and not recorded.
    Handshake(String),
}

impl Outcome {
    fn into_response(self) -> HttpResponse {
        match self {
            Outcome::Accepted(r) | Outcome::Processed(r) => answer(&r, false),
            Outcome::Replayed(r) | Outcome::BodyDuplicate(r) => answer(&r, true),
            Outcome::Handshake(body) => HttpResponse::Ok()
                .content_type("application/json")
                .body(body),
        }
    }
}

async fn handle(
    req: &HttpRequest,
    source_name: &str,
    payload: web::Payload,
    state: &AppState,
    span: &tracing::Span,
) -> Result<Outcome, ApiError> {
    let source = state
        .sources
        .get(source_name)
        .ok_or(ApiError::UnknownSource)?;
    let body = read_body(req, payload, state.max_body_bytes).await?;
    let delivery = match source.authenticate(headers_of(req), body, state.clock.now())? {
        Authenticated::Delivery(d) => d,
        Authenticated::Handshake(answer) => return Ok(Outcome::Handshake(answer)),
    };
    span.record("delivery_id", delivery.id().as_str());
    if let Some(t) = delivery.event_type() {
        span.record("event_type", t);
    }

    let received_at_ms = state.clock.now_ms();
    let new = new_delivery(state, source, delivery, received_at_ms);
    let record = new.record().clone();
    match state.store.claim(new).await.map_err(storage)? {
        Claim::New => match source.ack {
            AckMode::Durable => {
                state.dispatch_waker.notify_one();
                // Built into the record before the claim, so it is on disk with it.
                let stored = record
                    .response
                    .clone()
                    .ok_or(ApiError::StorageUnavailable)?;
                Ok(Outcome::Accepted(stored))
            }
            AckMode::Processed => process_inline(state, source, record).await,
        },
        Claim::Existing(existing) => {
            if existing.fingerprint != record.fingerprint {
                return Err(ApiError::DeliveryIdConflict);
            }
            answer_existing(state, source, existing)
                .await
                .map(|(response, _)| response)
        }
        Claim::BodyDuplicate(first) => {
            answer_existing(state, source, first)
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

/// A delivery seen before: its stored first response; or, in processed mode while it is not
/// final, a take-over once its lease has lapsed. `.1` is whether the answer is a replay.
async fn answer_existing(
    state: &AppState,
    source: &Source,
    existing: DeliveryRecord,
) -> Result<(Outcome, bool), ApiError> {
    if let Some(stored) = existing.response {
        return Ok((Outcome::Replayed(stored), true));
    }
    // Processed mode, not final yet: take it over unless someone holds it.
    let now = state.clock.now_ms();
    match state
        .store
        .take_over(&existing.key(), now, now + lease_ms(source))
        .await
        .map_err(storage)?
    {
        TakeOver::Final(r) => r
            .response
            .map(|r| (Outcome::Replayed(r), true))
            .ok_or(ApiError::StorageUnavailable),
        TakeOver::Held { until_ms } => Err(in_progress(until_ms, now)),
        TakeOver::Acquired(r) => Ok((process_inline(state, source, r).await?, false)),
    }
}

fn in_progress(until_ms: u64, now_ms: u64) -> ApiError {
    ApiError::DeliveryInProgress {
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

fn new_delivery(
    state: &AppState,
    source: &Source,
    d: AuthenticatedDelivery,
    received_at_ms: u64,
) -> NewDelivery {
    let handlers = state.registry.matching(d.source(), d.event_type());
    let new = NewDelivery::new(d, received_at_ms, handlers, source.body_dedup);
    match source.ack {
        AckMode::Durable => {
            let response = first_response(new.record(), StatusCode::ACCEPTED);
            new.acknowledged(response)
        }
        AckMode::Processed => new.leased_until(received_at_ms + lease_ms(source)),
    }
}

/// `ack = "processed"`: run every handler that has not yet succeeded, then store the 200
/// (all succeeded) or release the lease and answer 500 (the sender's retry re-runs only
/// the failures). The lease is renewed while the handlers run, so a slow handler never lets
/// a second copy take over beside it; a handler that another runner holds (an operator
/// retry running in the background) makes it 409. Runs as its own task so a sender hanging
/// up does not cut a handler short.
async fn process_inline(
    state: &AppState,
    source: &Source,
    record: DeliveryRecord,
) -> Result<Outcome, ApiError> {
    let runner = state.runner.clone();
    let lease = source.processed_lease;
    // Instrumented with the delivery's span, so each handler run logs as its child.
    let task = tokio::spawn(
        async move {
            let key = record.key();
            let work = async {
                let mut all_succeeded = true;
                for handler in &record.handlers {
                    let job = key.job(handler);
                    if let RunResult::Busy(until) = runner.run(&job, None).await? {
                        return Ok(Err(until));
                    }
                    let done = runner
                        .store
                        .job(&job)
                        .await?
                        .is_some_and(|j| j.status == JobStatus::Succeeded);
                    all_succeeded &= done;
                }
                Ok::<_, crate::store::StoreError>(Ok(all_succeeded))
            };
            tokio::pin!(work);
            let mut renew = tokio::time::interval(lease / 3);
            renew.tick().await;
            let outcome = loop {
                tokio::select! {
                    outcome = &mut work => break outcome,
                    _ = renew.tick() => {
                        let until = runner.clock.now_ms() + lease.as_millis() as u64;
                        if let Err(e) = runner.store.renew_lease(&key, until).await {
                            tracing::warn!(error = %e, "renewing the processing lease failed");
                        }
                    }
                }
            };
            let response = match outcome {
                Ok(Ok(all_succeeded)) => {
                    all_succeeded.then(|| first_response(&record, StatusCode::OK))
                }
                Ok(Err(busy_until)) => {
                    runner.store.release(&key, None).await?;
                    return Ok(Err(busy_until));
                }
                Err(e) => {
                    // Best effort: let the sender's retry take over without waiting.
                    let _ = runner.store.release(&key, None).await;
                    return Err(e);
                }
            };
            runner.store.release(&key, response.clone()).await?;
            Ok::<_, crate::store::StoreError>(Ok(response))
        }
        .instrument(tracing::Span::current()),
    );
    match task.await {
        Ok(Ok(Ok(Some(response)))) => Ok(Outcome::Processed(response)),
        Ok(Ok(Ok(None))) => Err(ApiError::HandlerFailed),
        Ok(Ok(Err(busy_until))) => Err(in_progress(busy_until, state.clock.now_ms())),
        Ok(Err(e)) => Err(storage(e)),
        Err(_) => Err(ApiError::HandlerFailed),
    }
}
