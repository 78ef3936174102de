//! The admin API under `/admin/`, behind `Authorization: Bearer <token>` (the token is read
//! at start from the variable `admin.token_env` names, and compared in constant time):
//! 401 without or with a wrong token, 403 when no token is configured.
//!
//! - `GET /admin/deliveries?source=&status=&limit=&cursor=`: newest first, paged.
//! - `GET /admin/deliveries/{source}/{id}`: the record, its handlers' states, the body.
//! - `POST /admin/deliveries/{source}/{id}/retry`: failed and dead handlers due now.
//! - `GET /admin/deliveries/{source}/{id}/fixture`: the delivery as a fixture.
//!
//! Thin: each route authorizes, parses its request, calls [`crate::operations::Operator`]
//! (shared with the console) and answers; errors map in [`crate::error`].

use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

use super::AppState;
use crate::error::ApiError;
pub use crate::operations::{
    BackfillFields as BackfillBody, HandlerStatusView, HandlerView, StepView,
};
use crate::operations::{DeliveryDetail, filter_time, parse_status};
use crate::store::{Cursor, DeliveryKey, DeliveryRecord, DeliveryStatus, JobStatus, RetryFilter};

fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let Some(expected) = state.admin_token.as_deref() else {
        return Err(ApiError::AdminDisabled);
    };
    let given = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    if tokens_match(given, expected) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Compares the SHA-256 digests, in constant time: both sides are always 32 bytes, so
/// neither the time taken nor an early return tells anything about the token's length.
pub(crate) fn tokens_match(given: &str, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    bool::from(
        Sha256::digest(given.as_bytes())
            .as_slice()
            .ct_eq(Sha256::digest(expected.as_bytes()).as_slice()),
    )
}

fn json<T: Serialize>(value: &T) -> HttpResponse {
    HttpResponse::Ok().json(value)
}

/// Query of `GET /admin/deliveries`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    source: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /admin/deliveries`
pub async fn list(
    req: HttpRequest,
    query: web::Query<ListQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let status = match query.status.as_deref() {
        Some(s) => Some(parse_status(s)?),
        None => None,
    };
    let limit = query.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::InvalidQuery);
    }
    let cursor = match query.cursor.as_deref() {
        Some(token) => Some(Cursor::from_token(token).ok_or(ApiError::InvalidQuery)?),
        None => None,
    };
    let page = state
        .operator
        .list(query.source.clone(), status, limit, cursor)
        .await?;
    Ok(json(&PageView {
        deliveries: page
            .deliveries
            .into_iter()
            .map(|d| SummaryView {
                record: d.record,
                status: d.status,
            })
            .collect(),
        next_cursor: page.next.map(|c| c.to_token()),
    }))
}

/// One delivery of `GET /admin/deliveries`.
#[derive(Debug, Serialize)]
pub struct SummaryView {
    /// The record.
    pub record: DeliveryRecord,
    /// Its status.
    pub status: DeliveryStatus,
}

/// A page of `GET /admin/deliveries`, newest first.
#[derive(Debug, Serialize)]
pub struct PageView {
    /// The deliveries.
    pub deliveries: Vec<SummaryView>,
    /// Pass as `cursor` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

/// `GET /admin/deliveries/{source}/{id}`
pub async fn show(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let DeliveryDetail {
        record,
        body,
        body_error,
        status,
        handlers,
    } = state
        .operator
        .detail(&DeliveryKey::new(&path.0, &path.1))
        .await?;
    let (body_text, body_base64) = match std::str::from_utf8(&body) {
        Ok(text) => (Some(text.to_owned()), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(&body)),
        ),
    };
    Ok(json(&serde_json::json!({
        "record": record,
        "status": status,
        "received_at": crate::clock::rfc3339_ms(record.received_at_ms),
        "handlers": handlers,
        "body": body_error.is_none().then_some(body_text).flatten(),
        "body_base64": body_error.is_none().then_some(body_base64).flatten(),
        "body_error": body_error,
    })))
}

/// `POST /admin/deliveries/{source}/{id}/retry`
pub async fn retry(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let requeued = state
        .operator
        .retry(&DeliveryKey::new(&path.0, &path.1))
        .await?;
    Ok(json(&serde_json::json!({ "requeued": requeued })))
}

/// The body of `POST /admin/retry`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryAllRequest {
    /// Only this source.
    pub source: Option<String>,
    /// Only this handler.
    pub handler: Option<String>,
    /// `failed` or `dead` (default).
    pub status: Option<String>,
    /// Only deliveries received at or after this RFC 3339 time.
    pub since: Option<String>,
    /// Only deliveries received before this RFC 3339 time.
    pub until: Option<String>,
}

/// `POST /admin/retry`: every failed or dead pair the filter selects, due now, each with a
/// fresh `max_attempts`; answers `{"retried": N}`.
pub async fn retry_all(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let request: RetryAllRequest = if body.is_empty() {
        RetryAllRequest {
            source: None,
            handler: None,
            status: None,
            since: None,
            until: None,
        }
    } else {
        serde_json::from_slice(&body).map_err(|_| ApiError::InvalidQuery)?
    };
    let status = match request.status.as_deref() {
        None | Some("dead") => JobStatus::Dead,
        Some("failed") => JobStatus::Failed,
        Some(_) => return Err(ApiError::InvalidQuery),
    };
    let filter = RetryFilter {
        source: request.source,
        handler: request.handler,
        status,
        since_ms: filter_time(request.since.as_deref())?,
        until_ms: filter_time(request.until.as_deref())?,
    };
    let retried = state.operator.retry_matching(&filter).await?;
    Ok(json(&serde_json::json!({ "retried": retried })))
}

/// `GET /admin/deliveries/{source}/{id}/fixture`
pub async fn fixture(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let fixture = state
        .operator
        .fixture(&state.config, &DeliveryKey::new(&path.0, &path.1))
        .await?;
    Ok(json(&fixture))
}

/// `GET /admin/handlers`: each configured handler, paused or not, with its pairs' counts.
pub async fn handlers(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let handlers = state.operator.handlers(None).await?;
    Ok(json(&serde_json::json!({ "handlers": handlers })))
}

/// `POST /admin/handlers/{name}/pause`: no run of it starts (on any replica) until resumed;
/// its deliveries are still accepted and queued. Survives restarts.
pub async fn pause(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    set_paused(req, path, state, true).await
}

/// `POST /admin/handlers/{name}/resume`.
pub async fn resume(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    set_paused(req, path, state, false).await
}

async fn set_paused(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
    paused: bool,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let name = path.into_inner();
    state.operator.set_paused(&name, paused).await?;
    let view = state.operator.handlers(Some(&name)).await?;
    Ok(json(&view.into_iter().next()))
}

/// `POST /admin/handlers/{name}/backfill`: binds the handler to the stored deliveries it
/// would bind today and has no pair with yet (see [`crate::backfill`]); answers
/// `{"bound": N, "already": M}`.
pub async fn backfill(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let request: BackfillBody = if body.iter().all(u8::is_ascii_whitespace) {
        BackfillBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|_| ApiError::InvalidQuery)?
    };
    let request = request.request(path.into_inner())?;
    let wants_progress = req
        .headers()
        .get(actix_web::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(PROGRESS_TYPE));
    if !wants_progress {
        let report = state.operator.backfill(request, |_| {}).await?;
        return Ok(json(&report));
    }
    if !state.operator.has_handler(&request.handler) {
        return Err(ApiError::UnknownHandler);
    }
    // Progress as it goes: one JSON line per batch, then the report (`"done": true`) or
    // the error, so `webhook-inbox handlers backfill` can show a progress line.
    let (lines, receiver) = tokio::sync::mpsc::unbounded_channel::<String>();
    let state = state.into_inner();
    tokio::spawn(async move {
        let progress = lines.clone();
        let last = match state
            .operator
            .backfill(request, move |r| {
                let line = serde_json::json!({
                    "scanned": r.scanned, "bound": r.bound, "already": r.already
                });
                let _ = progress.send(format!("{line}\n"));
            })
            .await
        {
            Ok(r) => serde_json::json!({ "bound": r.bound, "already": r.already, "done": true }),
            Err(e) => {
                let e = ApiError::from(e);
                serde_json::json!({ "error": e.code(), "message": e.to_string() })
            }
        };
        let _ = lines.send(format!("{last}\n"));
    });
    let body = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let line = receiver.recv().await?;
        Some((Ok::<_, actix_web::Error>(web::Bytes::from(line)), receiver))
    });
    Ok(HttpResponse::Ok()
        .content_type(PROGRESS_TYPE)
        .streaming(body))
}

/// The media type of a backfill's progress lines.
pub const PROGRESS_TYPE: &str = "application/x-ndjson";

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.metrics.render(&*state.store).await)
}
