//! `POST /webhooks/{source}`: check, claim, answer.
//!
//! 1. The checks of design.md, in order; any failure answers and stores nothing.
//! 2. The atomic claim of `(source, delivery id)`.
//! 3. New: the first response (202 once durable, or 200 after the handlers in processed
//!    mode). Seen with the same body: the stored first response, byte for byte, plus
//!    `Idempotent-Replayed: true`. Seen with another body: 422, the record untouched.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// Bytes of request bodies being read at once, over every connection
/// (`server.max_inflight_bytes`): slow or large unauthenticated bodies cannot add up to
/// more memory than this.
#[derive(Debug)]
pub struct InflightBytes {
    used: AtomicUsize,
    cap: usize,
}

impl InflightBytes {
    /// A budget of `cap` bytes.
    pub fn new(cap: usize) -> InflightBytes {
        InflightBytes {
            used: AtomicUsize::new(0),
            cap,
        }
    }

    /// Bytes reserved right now (for tests and metrics).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    fn reserve(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(n).filter(|total| *total <= self.cap)
            })
            .is_ok()
    }
}

/// Bytes one request holds of the budget; given back when dropped.
struct Reservation<'a> {
    budget: &'a InflightBytes,
    held: usize,
}

impl Reservation<'_> {
    fn grow_to(&mut self, total: usize) -> Result<(), ApiError> {
        if total <= self.held {
            return Ok(());
        }
        if !self.budget.reserve(total - self.held) {
            return Err(ApiError::ServerBusy);
        }
        self.held = total;
        Ok(())
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.held, Ordering::SeqCst);
    }
}

/// The most a body buffer is sized up front, whatever `Content-Length` claims.
const PREALLOCATE_AT_MOST: usize = 16 * 1024;

/// Reads the body: at most `max_body_bytes` (by `Content-Length` up front, while streaming
/// for chunked bodies), within `body_timeout`, within the in-flight budget (reserved as it
/// arrives, the declared length up front), and not past the start of a shutdown.
async fn read_body(
    declared: Option<u64>,
    mut payload: web::Payload,
    state: &AppState,
) -> Result<bytes::Bytes, ApiError> {
    let max = state.max_body_bytes;
    let mut reservation = Reservation {
        budget: &state.inflight,
        held: 0,
    };
    let declared = declared.map_or(0, |n| n as usize);
    reservation.grow_to(declared)?;
    let read = async {
        let mut body = BytesMut::with_capacity(declared.min(max).min(PREALLOCATE_AT_MOST));
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|_| ApiError::InvalidBody)?;
            if body.len() + chunk.len() > max {
                return Err(ApiError::PayloadTooLarge);
            }
            reservation.grow_to(body.len() + chunk.len())?;
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    tokio::select! {
        read = tokio::time::timeout(state.body_timeout, read) => {
            read.map_err(|_| ApiError::BodyTimeout)?
        }
        () = state.stopping.cancelled() => Err(ApiError::ServerBusy),
    }
}

fn declared_length(req: &HttpRequest) -> Option<u64> {
    req.headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Request headers as text (lower-case names), and the names whose values are not UTF-8
/// (kept lossily: such a value is never a valid id, event type or signature).
fn headers_of(req: &HttpRequest) -> (Headers, Vec<String>) {
    let mut not_utf8 = Vec::new();
    let pairs = req
        .headers()
        .iter()
        .map(|(k, v)| {
            let value = match std::str::from_utf8(v.as_bytes()) {
                Ok(text) => text.to_owned(),
                Err(_) => {
                    not_utf8.push(k.as_str().to_owned());
                    String::from_utf8_lossy(v.as_bytes()).into_owned()
                }
            };
            (k.as_str().to_owned(), value)
        })
        .collect();
    (Headers(pairs), not_utf8)
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
fn unstored(name: &str, configured: &[String]) -> bool {
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

/// `POST /webhooks/{source}`.
pub async fn receive(
    req: HttpRequest,
    source: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    // The path is the sender's text: an unknown source is logged as `_unknown`, never as
    // written (it could forge log lines or carry terminal escapes).
    let source_label = if state.sources.contains_key(source.as_str()) {
        source.as_str()
    } else {
        "_unknown"
    };
    let span = tracing::info_span!(
        "delivery",
        source = %source_label,
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
        Err(ApiError::ServerBusy) => ("busy", ""),
        Err(ApiError::HandlerFailed) => ("handler_failed", ""),
        Err(e) => ("rejected", e.code()),
    };
    span.record("outcome", if reason.is_empty() { outcome } else { reason });
    state.metrics.delivery(source_label, outcome, reason);
    let _entered = span.enter();
    match &result {
        Err(ApiError::StorageUnavailable | ApiError::HandlerFailed | ApiError::ServerBusy) => {
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
    let declared = declared_length(req);
    if declared.is_some_and(|n| n > state.max_body_bytes as u64) {
        return Err(ApiError::PayloadTooLarge);
    }
    // No body is read for a request that cannot be authenticated anyway.
    let (headers, not_utf8) = headers_of(req);
    if !source.has_signature_headers(&headers) {
        return Err(ApiError::MissingSignature);
    }
    let body = read_body(declared, payload, state).await?;
    let delivery = match source.authenticate(headers, body, state.clock.now())? {
        Authenticated::Delivery(d) => d,
        Authenticated::Handshake(answer) => return Ok(Outcome::Handshake(answer)),
    };
    // A value that is not UTF-8 is never an id or an event type (read lossily, two
    // different byte strings could become one id).
    let not_text =
        |h: Option<&str>| h.is_some_and(|h| not_utf8.iter().any(|n| n.eq_ignore_ascii_case(h)));
    if not_text(source.id_header()) {
        return Err(ApiError::InvalidDeliveryId);
    }
    if not_text(source.event_type_header()) {
        return Err(ApiError::InvalidEventType);
    }
    let delivery = delivery.without_headers(|name| unstored(name, &state.unstored_headers));
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
