//! `POST /webhooks/{source}`, the thin HTTP edge of [`crate::ingest`].
//!
//! Here: the limits on reading a body (declared size, signature headers before any byte is
//! read, the in-flight byte budget, `server.body_timeout`, shutdown), the delivery span,
//! the metrics, and turning an [`Outcome`] or an error into the response. Everything else —
//! authenticate, claim, ack policy — is [`crate::ingest::Ingest::receive`].

use std::sync::atomic::{AtomicUsize, Ordering};

use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::BytesMut;
use futures_util::StreamExt as _;
use tracing::Instrument as _;

use super::AppState;
use crate::domain::Headers;
use crate::error::ApiError;
use crate::ingest::{IngestError, Outcome};
use crate::store::StoredResponse;

fn answer(stored: &StoredResponse, replayed: bool) -> HttpResponse {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::ACCEPTED);
    let mut response = HttpResponse::build(status);
    response.content_type("application/json");
    if replayed {
        // Static: a name given as text is parsed and copied on every replay.
        response.insert_header((
            HeaderName::from_static("idempotent-replayed"),
            HeaderValue::from_static("true"),
        ));
    }
    response.body(stored.body.clone())
}

fn into_response(outcome: Outcome) -> HttpResponse {
    match outcome {
        Outcome::Accepted(r) | Outcome::Processed(r) => answer(&r, false),
        Outcome::Replayed(r) | Outcome::BodyDuplicate(r) => answer(&r, true),
        Outcome::Handshake(body) => HttpResponse::Ok()
            .content_type("application/json")
            .body(body),
    }
}

fn api_error(e: IngestError) -> ApiError {
    if let IngestError::Storage(e) = &e {
        tracing::error!(error = %e, "store failure");
    }
    ApiError::from(e)
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

/// The public listener's one route, `POST /webhooks/{source}`, matched here rather than by
/// actix's router, which matches a dynamic segment with a regex: 5 % of a redelivery's CPU
/// in a profile (BENCHMARKS.md, session 11). Anything else is 404 with no body, as the
/// router answered it; the source segment is percent-decoded, as the router's `Path` did.
pub async fn route(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    match source_of(req.method(), req.path()) {
        Some(source) => receive(req, source, payload, state).await,
        None => Ok(HttpResponse::NotFound().finish()),
    }
}

/// The `{source}` of `POST /webhooks/{source}`: one non-empty segment, percent-decoded.
fn source_of(method: &actix_web::http::Method, path: &str) -> Option<String> {
    if method != actix_web::http::Method::POST {
        return None;
    }
    let segment = path.strip_prefix("/webhooks/")?;
    if segment.is_empty() || segment.contains('/') {
        return None;
    }
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

async fn receive(
    req: HttpRequest,
    source: String,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    // The path is the sender's text: an unknown source is logged as `_unknown`, never as
    // written (it could forge log lines or carry terminal escapes).
    let source_label = if state.ingest.sources.contains_key(source.as_str()) {
        source.as_str()
    } else {
        "_unknown"
    };
    let arrived = std::time::Instant::now();
    let span = tracing::info_span!(
        "delivery",
        otel.name = "receive",
        source = %source_label,
        delivery_id = tracing::field::Empty,
        event_type = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    crate::telemetry::continue_trace(
        &span,
        req.headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok()),
    );
    let result = handle(&req, &source, payload, &state, &span)
        .instrument(span.clone())
        .await;
    let (outcome, reason) = crate::error::outcome_labels(&result);
    span.record("outcome", if reason.is_empty() { outcome } else { reason });
    state.metrics.delivery(source_label, outcome, reason);
    if source_label != "_unknown"
        && let Err(e) = &result
        && actix_web::ResponseError::status_code(e) == actix_web::http::StatusCode::UNAUTHORIZED
    {
        state.alerts.rejected(source_label, state.clock.now_ms());
    }
    state
        .metrics
        .answered_in(source_label, arrived.elapsed().as_secs_f64());
    let _entered = span.enter();
    match &result {
        Err(ApiError::StorageUnavailable | ApiError::HandlerFailed | ApiError::ServerBusy) => {
            tracing::warn!("delivery not acknowledged")
        }
        Err(_) => tracing::info!("delivery rejected"),
        Ok(_) => tracing::debug!("delivery answered"),
    }
    result.map(into_response)
}

async fn handle(
    req: &HttpRequest,
    source_name: &str,
    payload: web::Payload,
    state: &AppState,
    span: &tracing::Span,
) -> Result<Outcome, ApiError> {
    let source = state.ingest.source(source_name).map_err(api_error)?;
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
    state
        .ingest
        .receive(source, headers, &not_utf8, body, span)
        .await
        .map_err(api_error)
}

#[cfg(test)]
mod route_tests {
    use super::source_of;
    use actix_web::http::Method;

    #[test]
    fn the_route_takes_one_decoded_segment_of_a_post_and_nothing_else() {
        let post = |p| source_of(&Method::POST, p);
        assert_eq!(post("/webhooks/credicorp").as_deref(), Some("credicorp"));
        assert_eq!(post("/webhooks/cred%69corp").as_deref(), Some("credicorp"));
        assert_eq!(post("/webhooks/a%20b").as_deref(), Some("a b"));
        for path in [
            "/webhooks/",
            "/webhooks",
            "/webhooks/a/b",
            "/webhooks/a/",
            "/webhook/a",
            "/other/webhooks/a",
            "/webhooks/%FF",
        ] {
            assert_eq!(post(path), None, "{path}");
        }
        assert_eq!(source_of(&Method::GET, "/webhooks/credicorp"), None);
        assert_eq!(source_of(&Method::PUT, "/webhooks/credicorp"), None);
    }
}
