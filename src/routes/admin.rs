//! The admin API under `/admin/`, behind `Authorization: Bearer <token>` (the token is read
//! at start from the variable `admin.token_env` names, and compared in constant time):
//! 401 without or with a wrong token, 403 when no token is configured.
//!
//! - `GET /admin/deliveries?source=&status=&limit=&cursor=`: newest first, paged.
//! - `GET /admin/deliveries/{source}/{id}`: the record, its handlers' states, the body.
//! - `POST /admin/deliveries/{source}/{id}/retry`: failed and dead handlers due now.
//! - `GET /admin/deliveries/{source}/{id}/fixture`: the delivery as a fixture.

use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

use super::AppState;
use crate::error::ApiError;
use crate::store::{
    Cursor, DeliveryKey, DeliveryRecord, DeliveryStatus, JobState, JobStatus, RetryFilter,
    StoreError,
};

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

fn storage(e: crate::store::StoreError) -> ApiError {
    tracing::error!(error = %e, "store failure in the admin API");
    ApiError::StorageUnavailable
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
        Some(s) => Some(parse_status(s).ok_or(ApiError::InvalidQuery)?),
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
    let page = list_off_the_workers(&state, query.source.clone(), status, limit, cursor)
        .await
        .map_err(|e| match e {
            Some(e) => storage(e),
            None => ApiError::StorageUnavailable,
        })?;
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

/// A page of [`crate::store::Operations::list`], read on a blocking thread: the sled
/// store reads synchronously, and a long listing must never hold up the admin listener's
/// workers (health probes, metrics). `Err(None)`: the read task itself failed.
pub(crate) async fn list_off_the_workers(
    state: &AppState,
    source: Option<String>,
    status: Option<DeliveryStatus>,
    limit: usize,
    cursor: Option<Cursor>,
) -> Result<crate::store::Page, Option<crate::store::StoreError>> {
    let store = state.store.clone();
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        runtime.block_on(store.list(source.as_deref(), status, limit, cursor.as_ref()))
    })
    .await
    .map_err(|_| None)?
    .map_err(Some)
}

/// The `status` filter: one of the [`DeliveryStatus`] names.
fn parse_status(text: &str) -> Option<DeliveryStatus> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).ok()
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

/// One handler's state in `show`.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandlerView {
    /// Handler name.
    pub name: String,
    /// Its state (absent only for a record written by another version).
    pub state: Option<JobState>,
    /// The idempotency key it runs with.
    pub idempotency_key: String,
    /// Its downstream calls' steps, as the journal keeps them.
    pub steps: Vec<StepView>,
}

/// One journaled step in `show` (never a request header, a URL's credentials or query,
/// nor the answer's body).
#[derive(Debug, Serialize, Deserialize)]
pub struct StepView {
    /// The step's name.
    pub step: String,
    /// `METHOD url`, the URL without credentials or query.
    pub request: String,
    /// The kept answer's status.
    pub status: u16,
    /// Exchanges it took.
    pub attempts: u32,
    /// When the answer came (RFC 3339).
    pub at: String,
    /// How many later runs got it from the journal.
    pub replayed: u32,
    /// Its `Idempotency-Key`.
    pub idempotency_key: String,
}

/// One delivery as the admin API and the console show it: its record, raw body, status
/// and each handler's state with its idempotency key.
pub(crate) struct DeliveryDetail {
    /// The record.
    pub record: DeliveryRecord,
    /// The raw body (empty when it cannot be read back: see `body_error`).
    pub body: bytes::Bytes,
    /// Why the body cannot be read back intact (invariant 8), if it cannot.
    pub body_error: Option<String>,
    /// Where it stands, from its handlers' states.
    pub status: DeliveryStatus,
    /// Each bound handler, in the record's order.
    pub handlers: Vec<HandlerView>,
}

/// Reads one delivery whole; [`ApiError::NotFound`] when there is none.
pub(crate) async fn delivery_detail(
    state: &AppState,
    key: &DeliveryKey,
) -> Result<DeliveryDetail, ApiError> {
    let record = state
        .store
        .record(key)
        .await
        .map_err(storage)?
        .ok_or(ApiError::NotFound)?;
    // A body that fails its checksum is shown as such, not as a failed page (invariant 8).
    let (body, body_error) = match state.store.body(key).await {
        Ok(body) => (body.unwrap_or_default(), None),
        Err(StoreError::Corrupt(e)) => (bytes::Bytes::new(), Some(format!("body unreadable: {e}"))),
        Err(e) => return Err(storage(e)),
    };
    let journal = state.store.journal_of(key).await.map_err(storage)?;
    let mut handlers = Vec::new();
    for name in &record.handlers {
        let job = key.job(name);
        let steps = journal
            .iter()
            .filter(|e| &e.handler == name)
            .map(|e| StepView {
                step: e.step.clone(),
                request: e.record.request.clone(),
                status: e.record.status,
                attempts: e.record.attempts,
                at: crate::clock::rfc3339_ms(e.record.at_ms),
                replayed: e.record.replayed,
                idempotency_key: job.step_key(&e.step),
            })
            .collect();
        handlers.push(HandlerView {
            name: name.clone(),
            state: state.store.job(&job).await.map_err(storage)?,
            idempotency_key: job.idempotency_key(),
            steps,
        });
    }
    let jobs: Vec<Option<JobState>> = handlers.iter().map(|h| h.state.clone()).collect();
    let status = DeliveryStatus::of(&record, &jobs);
    Ok(DeliveryDetail {
        record,
        body,
        body_error,
        status,
        handlers,
    })
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
    } = delivery_detail(&state, &DeliveryKey::new(&path.0, &path.1)).await?;
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

/// An operator retry of one delivery (see [`crate::store::Operations::retry`]): the
/// handlers now due, the dispatcher woken. Shared by the admin API and the console.
pub(crate) async fn retry_delivery(
    state: &AppState,
    key: &DeliveryKey,
) -> Result<Vec<String>, ApiError> {
    if state.store.record(key).await.map_err(storage)?.is_none() {
        return Err(ApiError::NotFound);
    }
    let requeued = state
        .store
        .retry(key, state.clock.now_ms())
        .await
        .map_err(storage)?;
    state.ingest.dispatch_waker.notify_one();
    tracing::info!(source = %key.source, delivery_id = %key.id, ?requeued, "retry requested");
    Ok(requeued)
}

/// `POST /admin/deliveries/{source}/{id}/retry`
pub async fn retry(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let requeued = retry_delivery(&state, &DeliveryKey::new(&path.0, &path.1)).await?;
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
        since_ms: rfc3339_ms(request.since.as_deref())?,
        until_ms: rfc3339_ms(request.until.as_deref())?,
    };
    let retried = retry_matching(&state, &filter).await?;
    Ok(json(&serde_json::json!({ "retried": retried })))
}

/// A filter's time: RFC 3339 to ms since the epoch; blank is no bound.
pub(crate) fn rfc3339_ms(text: Option<&str>) -> Result<Option<u64>, ApiError> {
    match text.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => humantime::parse_rfc3339_weak(t)
            .map(|t| Some(crate::clock::to_ms(t)))
            .map_err(|_| ApiError::InvalidQuery),
    }
}

/// A bulk operator retry (see [`crate::store::Operations::retry_all`]): how many pairs
/// it requeued, the dispatcher woken. Shared by the admin API and the console.
pub(crate) async fn retry_matching(
    state: &AppState,
    filter: &RetryFilter,
) -> Result<usize, ApiError> {
    let retried = state
        .store
        .retry_all(filter, state.clock.now_ms())
        .await
        .map_err(storage)?;
    state.ingest.dispatch_waker.notify_one();
    tracing::info!(?filter, retried, "bulk retry requested");
    Ok(retried)
}

/// `GET /admin/deliveries/{source}/{id}/fixture`
pub async fn fixture(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let fixture = crate::export::fixture_of(&*state.store, &state.config, &path.0, &path.1)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "export failed");
            ApiError::StorageUnavailable
        })?
        .ok_or(ApiError::NotFound)?;
    Ok(json(&fixture))
}

/// One handler as `GET /admin/handlers` lists it.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandlerStatusView {
    /// The handler's name.
    pub name: String,
    /// Whether an operator paused it.
    pub paused: bool,
    /// Queued pairs (due now or later, running included).
    pub due: usize,
    /// Pairs waiting in an `order_by` line behind an earlier delivery of their key.
    pub waiting: usize,
    /// Pairs running.
    pub running: usize,
    /// Pairs that failed and wait for a retry.
    pub failed: usize,
    /// Dead-lettered pairs.
    pub dead: usize,
    /// The error of its latest failed or dead run.
    pub last_error: Option<String>,
    /// Its `concurrency`.
    pub concurrency: Option<usize>,
    /// Its `rate`, as configured (e.g. `"50/s"`).
    pub rate: Option<String>,
}

pub(crate) async fn handler_views(
    state: &AppState,
    only: Option<&str>,
) -> Result<Vec<HandlerStatusView>, ApiError> {
    let stats = state
        .store
        .handler_stats(state.clock.now_ms())
        .await
        .map_err(storage)?;
    let paused = state.store.paused_handlers().await.map_err(storage)?;
    Ok(state
        .ingest
        .registry
        .limits()
        .filter(|(name, _)| only.is_none_or(|o| o == *name))
        .map(|(name, limits)| {
            let s = stats.get(name).cloned().unwrap_or_default();
            HandlerStatusView {
                name: name.to_owned(),
                paused: paused.contains(name),
                due: s.queued,
                waiting: s.waiting,
                running: s.running,
                failed: s.failed,
                dead: s.dead,
                last_error: s.last_error,
                concurrency: limits.concurrency,
                rate: limits.rate.map(|r| r.to_string()),
            }
        })
        .collect())
}

/// `GET /admin/handlers`: each configured handler, paused or not, with its pairs' counts.
pub async fn handlers(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let handlers = handler_views(&state, None).await?;
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
    pause_handler(&state, &name, paused).await?;
    let view = handler_views(&state, Some(&name)).await?;
    Ok(json(&view.into_iter().next()))
}

/// Pauses or resumes a configured handler, the dispatcher woken. Shared by the admin API
/// and the console.
pub(crate) async fn pause_handler(
    state: &AppState,
    name: &str,
    paused: bool,
) -> Result<(), ApiError> {
    if !state.ingest.registry.contains(name) {
        return Err(ApiError::UnknownHandler);
    }
    state
        .store
        .set_paused(name, paused, state.clock.now_ms())
        .await
        .map_err(storage)?;
    state.ingest.dispatch_waker.notify_one();
    tracing::info!(handler = %name, paused, "handler {}", if paused { "paused" } else { "resumed" });
    Ok(())
}

/// The body of `POST /admin/handlers/{name}/backfill`; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackfillBody {
    /// RFC 3339: deliveries received at or after it.
    pub since: Option<String>,
    /// RFC 3339: deliveries received before it (default: now).
    pub until: Option<String>,
    /// Only this source's deliveries.
    pub source: Option<String>,
    /// Only event types this pattern matches (`*`, `application.*`, `application.created`).
    pub events: Option<String>,
    /// Count, bind nothing.
    #[serde(default)]
    pub dry_run: bool,
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
    let request = backfill_request(path.into_inner(), request)?;
    let wants_progress = req
        .headers()
        .get(actix_web::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(PROGRESS_TYPE));
    if !wants_progress {
        let report = run_backfill(&state, request, |_| {}).await?;
        return Ok(json(&report));
    }
    if !state.ingest.registry.contains(&request.handler) {
        return Err(ApiError::UnknownHandler);
    }
    // Progress as it goes: one JSON line per batch, then the report (`"done": true`) or
    // the error, so `webhook-inbox handlers backfill` can show a progress line.
    let (lines, receiver) = tokio::sync::mpsc::unbounded_channel::<String>();
    let state = state.into_inner();
    tokio::spawn(async move {
        let progress = lines.clone();
        let last = match run_backfill(&state, request, move |r| {
            let line = serde_json::json!({
                "scanned": r.scanned, "bound": r.bound, "already": r.already
            });
            let _ = progress.send(format!("{line}\n"));
        })
        .await
        {
            Ok(r) => serde_json::json!({ "bound": r.bound, "already": r.already, "done": true }),
            Err(e) => serde_json::json!({ "error": e.code(), "message": e.to_string() }),
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

/// A backfill request from its fields as the API and the console take them.
pub(crate) fn backfill_request(
    handler: String,
    body: BackfillBody,
) -> Result<crate::backfill::BackfillRequest, ApiError> {
    let events = match body
        .events
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        Some(pattern) => {
            Some(crate::domain::EventPattern::parse(pattern).map_err(|_| ApiError::InvalidQuery)?)
        }
        None => None,
    };
    Ok(crate::backfill::BackfillRequest {
        handler,
        since_ms: rfc3339_ms(body.since.as_deref())?,
        until_ms: rfc3339_ms(body.until.as_deref())?,
        source: body.source.filter(|s| !s.trim().is_empty()),
        events,
        dry_run: body.dry_run,
    })
}

/// Runs a backfill on a blocking thread (it reads and binds batch after batch: the admin
/// listener's workers keep answering probes meanwhile), the dispatcher woken. Shared by the
/// admin API and the console.
pub(crate) async fn run_backfill(
    state: &AppState,
    request: crate::backfill::BackfillRequest,
    mut progress: impl FnMut(&crate::backfill::BackfillReport) + Send + 'static,
) -> Result<crate::backfill::BackfillReport, ApiError> {
    if !state.ingest.registry.contains(&request.handler) {
        return Err(ApiError::UnknownHandler);
    }
    let store = state.store.clone();
    let registry = state.ingest.registry.clone();
    let now_ms = state.clock.now_ms();
    let runtime = tokio::runtime::Handle::current();
    let waker = state.ingest.dispatch_waker.clone();
    let job = request.clone();
    let report = tokio::task::spawn_blocking(move || {
        runtime.block_on(crate::backfill::backfill(
            &store,
            &registry,
            &job,
            now_ms,
            |r| {
                waker.notify_one();
                progress(r);
            },
        ))
    })
    .await
    .map_err(|_| ApiError::StorageUnavailable)?
    .map_err(|e| match e {
        crate::backfill::BackfillError::UnknownHandler(_) => ApiError::UnknownHandler,
        crate::backfill::BackfillError::Store(e) => storage(e),
    })?;
    state.ingest.dispatch_waker.notify_one();
    tracing::info!(
        handler = %request.handler,
        bound = report.bound,
        already = report.already,
        dry_run = request.dry_run,
        "backfill"
    );
    Ok(report)
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.metrics.render(&*state.store).await)
}
