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
use crate::error::ApiError;
use crate::startup::AppState;
use crate::store::{
    Claim, DeliveryRecord, JobStatus, NewDelivery, StoredResponse, TakeOver, fingerprint,
};
use crate::verify::{Authenticated, AuthenticatedDelivery, Headers, Source};

/// How long an `ack = "processed"` claimant holds a delivery before another copy may take
/// it over (a crash must not lock an id forever).
pub const PROCESSING_LEASE_MS: u64 = 60_000;

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
    /// A provider handshake (Slack's `url_verification`), answered and not recorded.
    Handshake(String),
}

impl Outcome {
    fn into_response(self) -> HttpResponse {
        match self {
            Outcome::Accepted(r) | Outcome::Processed(r) => answer(&r, false),
            Outcome::Replayed(r) => answer(&r, true),
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
    span.record("delivery_id", delivery.id.as_str());
    if let Some(t) = &delivery.event_type {
        span.record("event_type", t.as_str());
    }

    let received_at_ms = state.clock.now_ms();
    let new = new_record(state, source, delivery, received_at_ms);
    let record = new.record.clone();
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
            AckMode::Processed => process_inline(state, record).await,
        },
        Claim::Existing(existing) => {
            if existing.fingerprint != record.fingerprint {
                return Err(ApiError::DeliveryIdConflict);
            }
            if let Some(stored) = existing.response {
                return Ok(Outcome::Replayed(stored));
            }
            // Processed mode, not final yet: take it over unless someone holds it.
            let now = state.clock.now_ms();
            match state
                .store
                .take_over(&existing.key(), now, now + PROCESSING_LEASE_MS)
                .await
                .map_err(storage)?
            {
                TakeOver::Final(r) => r
                    .response
                    .map(Outcome::Replayed)
                    .ok_or(ApiError::StorageUnavailable),
                TakeOver::Held { until_ms } => Err(ApiError::DeliveryInProgress {
                    retry_after_secs: until_ms.saturating_sub(now).div_ceil(1000).max(1),
                }),
                TakeOver::Acquired(r) => process_inline(state, r).await,
            }
        }
    }
}

fn new_record(
    state: &AppState,
    source: &Source,
    d: AuthenticatedDelivery,
    received_at_ms: u64,
) -> NewDelivery {
    let ack = source.ack;
    let handlers = state.registry.matching(&d.source, d.event_type.as_deref());
    let mut record = DeliveryRecord {
        source: d.source,
        id: d.id.as_str().to_owned(),
        fingerprint: fingerprint(&d.body),
        received_at_ms,
        event_type: d.event_type,
        headers: d.headers,
        response: None,
        lease_until_ms: None,
        handlers,
    };
    match ack {
        AckMode::Durable => record.response = Some(first_response(&record, StatusCode::ACCEPTED)),
        AckMode::Processed => record.lease_until_ms = Some(received_at_ms + PROCESSING_LEASE_MS),
    }
    NewDelivery {
        record,
        body: d.body,
        enqueue: ack == AckMode::Durable,
        body_dedup: source.body_dedup,
    }
}

/// `ack = "processed"`: run every handler that has not yet succeeded, then store the 200
/// (all succeeded) or release the lease and answer 500 (the sender's retry re-runs only
/// the failures). Runs as its own task so a sender hanging up does not cut a handler short.
async fn process_inline(state: &AppState, record: DeliveryRecord) -> Result<Outcome, ApiError> {
    let runner = state.runner.clone();
    // Instrumented with the delivery's span, so each handler run logs as its child.
    let task = tokio::spawn(
        async move {
            let key = record.key();
            let mut all_succeeded = true;
            for handler in &record.handlers {
                let job = key.job(handler);
                runner.run(&job, None).await?;
                let done = runner
                    .store
                    .job(&job)
                    .await?
                    .is_some_and(|j| j.status == JobStatus::Succeeded);
                all_succeeded &= done;
            }
            let response = all_succeeded.then(|| first_response(&record, StatusCode::OK));
            runner.store.release(&key, response.clone()).await?;
            Ok::<_, crate::store::StoreError>(response)
        }
        .instrument(tracing::Span::current()),
    );
    match task.await {
        Ok(Ok(Some(response))) => Ok(Outcome::Processed(response)),
        Ok(Ok(None)) => Err(ApiError::HandlerFailed),
        Ok(Err(e)) => Err(storage(e)),
        Err(_) => Err(ApiError::HandlerFailed),
    }
}
