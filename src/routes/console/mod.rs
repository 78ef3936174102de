//! The web console under `/console/` on the admin listener (design.md, "Web console"): for
//! the person on call, what came in, what failed, and the buttons to fix it.
//!
//! - Sign-in with the admin token (a form) starts a session: a random id in an `HttpOnly`,
//!   `SameSite=Strict` cookie scoped to `/console`, the session itself (its expiry and its
//!   CSRF token) kept here in memory ([`Sessions`], at most [`MAX_SESSIONS`]); sign-out, a
//!   restart or [`SESSION_TTL_MS`] ends it. The cookie is `Secure` when the request came
//!   over HTTPS or `console.secure_cookie` says so. Sign-in attempts are throttled per
//!   client address ([`SignInThrottle`]: 429 with `Retry-After`). No admin token
//!   configured: the console says so and offers nothing.
//! - Every state-changing action is a form `POST` carrying the session's CSRF token (403
//!   without it). Pages are rendered on the server (`pages`, maud: every value escaped, so an
//!   attacker-controlled body or header is text), with no script at all; the one stylesheet
//!   is embedded in the binary; `Content-Security-Policy: default-src 'self'` on every answer.
//! - The actions are the admin API's (`super::admin`): the same store calls, the same
//!   dispatcher wake-up.

mod pages;
mod sessions;

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use super::AppState;
use super::admin::tokens_match;
use crate::operations::{BackfillFields, OperationError, filter_time, parse_status};
use crate::store::{Cursor, DeliveryKey, DeliveryStatus, JobStatus, RetryFilter};
pub use sessions::{
    MAX_SESSIONS, SESSION_TTL_MS, SIGN_IN_BURST, SIGN_IN_INTERVAL_MS, Session, Sessions,
    SignInThrottle,
};

/// The session cookie.
const COOKIE: &str = "webhook_inbox_console";
/// Deliveries per page.
const PAGE_SIZE: usize = 50;
/// Store pages read at most for one filtered page (a filter that matches little stops
/// short, with a link to go on).
const SCAN_PAGES: usize = 20;

/// The console's in-memory state: its sessions and the sign-in throttle.
#[derive(Debug, Default)]
pub struct ConsoleState {
    sessions: Sessions,
    throttle: SignInThrottle,
}

/// Registers the console's routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/console", web::get().to(to_overview))
        .route("/console/", web::get().to(overview))
        .route("/console/console.css", web::get().to(stylesheet))
        .route("/console/sign-in", web::get().to(sign_in_form))
        .route("/console/sign-in", web::post().to(sign_in))
        .route("/console/sign-out", web::post().to(sign_out))
        .route("/console/deliveries", web::get().to(deliveries))
        .route("/console/deliveries/{source}/{id}", web::get().to(delivery))
        .route(
            "/console/deliveries/{source}/{id}/retry",
            web::post().to(retry),
        )
        .route(
            "/console/deliveries/{source}/{id}/fixture",
            web::get().to(fixture),
        )
        .route("/console/dead", web::get().to(dead_letters))
        .route("/console/retry", web::post().to(retry_all))
        .route("/console/handlers", web::get().to(handlers))
        .route("/console/backfill", web::post().to(backfill))
        .route(
            "/console/handlers/{name}/{action}",
            web::post().to(pause_or_resume),
        );
}

/// Headers every console answer carries.
fn secured(mut builder: actix_web::HttpResponseBuilder) -> actix_web::HttpResponseBuilder {
    builder
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-store"));
    builder
}

fn html(status: StatusCode, page: maud::Markup) -> HttpResponse {
    secured(HttpResponse::build(status))
        .content_type("text/html; charset=utf-8")
        .body(page.into_string())
}

fn see_other(to: &str) -> HttpResponse {
    secured(HttpResponse::SeeOther())
        .insert_header((header::LOCATION, to))
        .finish()
}

fn session_id(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// Why a console request is refused.
enum Refusal {
    /// No admin token: the console is off.
    Disabled,
    /// Not signed in (or the session ended).
    SignIn,
    /// A POST without the session's CSRF token.
    Csrf,
    /// Something else, with its page.
    Page(StatusCode, maud::Markup),
}

/// The console's page for an error of the contract's table ([`crate::error`]): its status,
/// and its sentence (a storage failure says the store cannot be read, not that a delivery
/// could not be recorded).
impl From<crate::error::ApiError> for Refusal {
    fn from(e: crate::error::ApiError) -> Refusal {
        let page = match e {
            crate::error::ApiError::StorageUnavailable => pages::message(
                "Storage unavailable",
                "The store cannot be read right now; try again in a moment.",
            ),
            _ => pages::message("Cannot do that", &e.to_string()),
        };
        Refusal::Page(actix_web::ResponseError::status_code(&e), page)
    }
}

impl From<OperationError> for Refusal {
    fn from(e: OperationError) -> Refusal {
        crate::error::ApiError::from(e).into()
    }
}

fn answer(result: Result<HttpResponse, Refusal>) -> HttpResponse {
    match result {
        Ok(response) => response,
        Err(Refusal::Disabled) => html(StatusCode::FORBIDDEN, pages::disabled()),
        Err(Refusal::SignIn) => see_other("/console/sign-in"),
        Err(Refusal::Csrf) => html(
            StatusCode::FORBIDDEN,
            pages::message(
                "Refused",
                "This form did not come from this console session (its CSRF token is missing or \
                 wrong). Reload the page and try again.",
            ),
        ),
        Err(Refusal::Page(status, page)) => html(status, page),
    }
}

/// The signed-in session, or why there is none.
fn signed_in(req: &HttpRequest, state: &AppState) -> Result<Session, Refusal> {
    if state.admin_token.is_none() {
        return Err(Refusal::Disabled);
    }
    session_id(req)
        .and_then(|id| state.console.sessions.get(&id, state.clock.now_ms()))
        .ok_or(Refusal::SignIn)
}

/// A state-changing request: signed in, and carrying the session's CSRF token.
fn authorized_post(req: &HttpRequest, state: &AppState, csrf: &str) -> Result<Session, Refusal> {
    let session = match signed_in(req, state) {
        Err(Refusal::SignIn) => return Err(Refusal::Csrf),
        other => other?,
    };
    if tokens_match(csrf, &session.csrf) {
        Ok(session)
    } else {
        Err(Refusal::Csrf)
    }
}

/// The CSRF token of a form that may not have come at all (a POST without a form body is
/// refused as one without the token).
fn csrf_of(form: &Option<web::Form<CsrfForm>>) -> &str {
    form.as_ref().map_or("", |f| f.csrf.as_str())
}

/// Just the CSRF token of a form.
#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn to_overview() -> HttpResponse {
    see_other("/console/")
}

async fn stylesheet() -> HttpResponse {
    secured(HttpResponse::Ok())
        .content_type("text/css; charset=utf-8")
        .body(include_str!("console.css"))
}

async fn sign_in_form(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if state.admin_token.is_none() {
        return answer(Err(Refusal::Disabled));
    }
    if signed_in(&req, &state).is_ok() {
        return see_other("/console/");
    }
    html(StatusCode::OK, pages::sign_in(None))
}

/// The sign-in form.
#[derive(Debug, Deserialize)]
pub struct SignInForm {
    #[serde(default)]
    token: String,
}

async fn sign_in(
    req: HttpRequest,
    state: web::Data<AppState>,
    form: web::Form<SignInForm>,
) -> HttpResponse {
    let Some(expected) = state.admin_token.as_deref() else {
        return answer(Err(Refusal::Disabled));
    };
    let now_ms = state.clock.now_ms();
    // The peer, not a forwarded-for header a client writes itself: behind a proxy every
    // operator shares the proxy's allowance, which errs on the side of the guesser's.
    let address = req
        .peer_addr()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    if let Err(wait_ms) = state.console.throttle.attempt(address, now_ms) {
        tracing::warn!(%address, "console sign-in throttled");
        return secured(HttpResponse::TooManyRequests())
            .insert_header((header::RETRY_AFTER, wait_ms.div_ceil(1000).to_string()))
            .content_type("text/html; charset=utf-8")
            .body(
                pages::sign_in(Some(
                    "Too many sign-in attempts from this address; wait a moment and try again.",
                ))
                .into_string(),
            );
    }
    if !tokens_match(&form.token, expected) {
        tracing::warn!("console sign-in with a wrong token");
        return html(
            StatusCode::UNAUTHORIZED,
            pages::sign_in(Some("That is not the admin token.")),
        );
    }
    let (id, _) = state.console.sessions.start(now_ms);
    tracing::info!("console sign-in");
    secured(HttpResponse::SeeOther())
        .insert_header((header::LOCATION, "/console/"))
        .insert_header((
            header::SET_COOKIE,
            session_cookie(&req, &state, &id, SESSION_TTL_MS / 1000),
        ))
        .finish()
}

/// The session cookie's `Set-Cookie` value. `Secure` when the request came over HTTPS (as
/// the connection or a TLS-terminating proxy's `Forwarded`/`X-Forwarded-Proto` says: a
/// client claiming HTTPS can only make its own cookie stricter) or `console.secure_cookie`
/// says so.
fn session_cookie(req: &HttpRequest, state: &AppState, value: &str, max_age_s: u64) -> String {
    let secure = state.config.console.secure_cookie
        || req.connection_info().scheme().eq_ignore_ascii_case("https");
    format!(
        "{COOKIE}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{}",
        if secure { "; Secure" } else { "" }
    )
}

async fn sign_out(
    req: HttpRequest,
    state: web::Data<AppState>,
    form: Option<web::Form<CsrfForm>>,
) -> HttpResponse {
    answer(authorized_post(&req, &state, csrf_of(&form)).map(|_| {
        if let Some(id) = session_id(&req) {
            state.console.sessions.end(&id);
        }
        secured(HttpResponse::SeeOther())
            .insert_header((header::LOCATION, "/console/sign-in"))
            .insert_header((header::SET_COOKIE, session_cookie(&req, &state, "", 0)))
            .finish()
    }))
}

async fn overview(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    answer(overview_page(&req, &state).await)
}

async fn overview_page(req: &HttpRequest, state: &AppState) -> Result<HttpResponse, Refusal> {
    let session = signed_in(req, state)?;
    let activity = state.metrics.activity().last_hour(state.clock.now_ms());
    let depth = state.operator.queued().await?;
    let dead = state.operator.dead_letters().await?;
    let handlers = state.operator.handlers(None).await?;
    let sources: Vec<&str> = state.config.sources.keys().map(String::as_str).collect();
    Ok(html(
        StatusCode::OK,
        pages::overview(&session.csrf, &sources, &activity, depth, dead, &handlers),
    ))
}

/// The filters of the deliveries page.
#[derive(Debug, Default, Deserialize)]
pub struct DeliveryFilter {
    #[serde(default)]
    source: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    event_type: String,
    #[serde(default)]
    id_prefix: String,
    #[serde(default)]
    cursor: String,
}

impl DeliveryFilter {
    fn keeps(&self, summary: &crate::store::DeliverySummary) -> bool {
        let event = summary.record.event_type.as_deref().unwrap_or("");
        let event_ok = match self.event_type.strip_suffix('*') {
            _ if self.event_type.is_empty() => true,
            Some(prefix) => event.starts_with(prefix),
            None => event == self.event_type,
        };
        event_ok && summary.record.id.starts_with(&self.id_prefix)
    }
}

async fn deliveries(
    req: HttpRequest,
    state: web::Data<AppState>,
    filter: web::Query<DeliveryFilter>,
) -> HttpResponse {
    answer(deliveries_page(&req, &state, &filter).await)
}

async fn deliveries_page(
    req: &HttpRequest,
    state: &AppState,
    filter: &DeliveryFilter,
) -> Result<HttpResponse, Refusal> {
    let session = signed_in(req, state)?;
    let status: Option<DeliveryStatus> = match filter.status.as_str() {
        "" => None,
        s => Some(parse_status(s)?),
    };
    let source = (!filter.source.is_empty()).then_some(filter.source.as_str());
    let mut cursor = match filter.cursor.as_str() {
        "" => None,
        token => Some(Cursor::from_token(token).ok_or(crate::error::ApiError::InvalidQuery)?),
    };
    let mut shown = Vec::new();
    for _ in 0..SCAN_PAGES {
        let page = list(state, source, status, cursor.take()).await?;
        shown.extend(page.deliveries.into_iter().filter(|d| filter.keeps(d)));
        cursor = page.next;
        if cursor.is_none() || shown.len() >= PAGE_SIZE {
            break;
        }
    }
    let sources: Vec<&str> = state.config.sources.keys().map(String::as_str).collect();
    let next = cursor.map(|c| {
        let query = [
            ("source", filter.source.as_str()),
            ("status", filter.status.as_str()),
            ("event_type", filter.event_type.as_str()),
            ("id_prefix", filter.id_prefix.as_str()),
            ("cursor", &c.to_token()),
        ];
        console_url(&["deliveries"], &query)
    });
    Ok(html(
        StatusCode::OK,
        pages::deliveries(
            &session.csrf,
            &sources,
            &pages::Filters {
                source: &filter.source,
                status: &filter.status,
                event_type: &filter.event_type,
                id_prefix: &filter.id_prefix,
            },
            &shown,
            next.as_deref(),
        ),
    ))
}

/// A page of deliveries, read off the listener's workers (as the admin API does).
async fn list(
    state: &AppState,
    source: Option<&str>,
    status: Option<DeliveryStatus>,
    cursor: Option<Cursor>,
) -> Result<crate::store::Page, Refusal> {
    Ok(state
        .operator
        .list(source.map(str::to_owned), status, PAGE_SIZE, cursor)
        .await?)
}

/// A console path: `/console/`, then `segments` (each percent-encoded, so an id with `/`
/// or `?` stays one segment), then `query` form-encoded. Built with the URL type the
/// admin client uses.
pub(crate) fn console_url(segments: &[&str], query: &[(&str, &str)]) -> String {
    // Any base will do: only the path and the query are kept. A constant, so it parses.
    let mut url = reqwest::Url::parse("http://console.invalid/console/").expect("a valid base");
    if !segments.is_empty()
        && let Ok(mut path) = url.path_segments_mut()
    {
        path.pop_if_empty().extend(segments);
    }
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    }
}

async fn delivery(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    answer(delivery_page(&req, &state, &path.0, &path.1).await)
}

async fn delivery_page(
    req: &HttpRequest,
    state: &AppState,
    source: &str,
    id: &str,
) -> Result<HttpResponse, Refusal> {
    let session = signed_in(req, state)?;
    let detail = state.operator.detail(&DeliveryKey::new(source, id)).await?;
    Ok(html(
        StatusCode::OK,
        pages::delivery(&session.csrf, &detail),
    ))
}

async fn retry(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    form: Option<web::Form<CsrfForm>>,
) -> HttpResponse {
    answer(
        async {
            authorized_post(&req, &state, csrf_of(&form))?;
            state
                .operator
                .retry(&DeliveryKey::new(&path.0, &path.1))
                .await?;
            Ok(see_other(&console_url(
                &["deliveries", &path.0, &path.1],
                &[],
            )))
        }
        .await,
    )
}

async fn fixture(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    answer(
        async {
            signed_in(&req, &state)?;
            let fixture = state
                .operator
                .fixture(&state.config, &DeliveryKey::new(&path.0, &path.1))
                .await?;
            // A file name of safe characters only, whatever the id holds.
            let name: String = path
                .1
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            Ok(secured(HttpResponse::Ok())
                .content_type("application/json")
                .insert_header((
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{name}.json\""),
                ))
                .body(serde_json::to_string_pretty(&fixture).unwrap_or_default()))
        }
        .await,
    )
}

/// The filters of the dead letters page and of its bulk retry.
#[derive(Debug, Default, Deserialize)]
pub struct DeadFilter {
    #[serde(default)]
    source: String,
    #[serde(default)]
    handler: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    /// Set after a bulk retry: how many pairs it requeued.
    #[serde(default)]
    retried: Option<usize>,
    #[serde(default)]
    csrf: String,
}

async fn dead_letters(
    req: HttpRequest,
    state: web::Data<AppState>,
    filter: web::Query<DeadFilter>,
) -> HttpResponse {
    answer(
        async {
            let session = signed_in(&req, &state)?;
            let source = (!filter.source.is_empty()).then_some(filter.source.as_str());
            let (since, until) = (
                filter_time(Some(&filter.since))?,
                filter_time(Some(&filter.until))?,
            );
            let mut shown = Vec::new();
            let mut cursor = None;
            for _ in 0..SCAN_PAGES {
                let page = list(&state, source, Some(DeliveryStatus::Dead), cursor.take()).await?;
                shown.extend(page.deliveries.into_iter().filter(|d| {
                    let at = d.record.received_at_ms;
                    (filter.handler.is_empty() || d.record.handlers.contains(&filter.handler))
                        && since.is_none_or(|t| at >= t)
                        && until.is_none_or(|t| at < t)
                }));
                cursor = page.next;
                if cursor.is_none() || shown.len() >= PAGE_SIZE {
                    break;
                }
            }
            let sources: Vec<&str> = state.config.sources.keys().map(String::as_str).collect();
            let handlers = state.operator.handler_names();
            Ok(html(
                StatusCode::OK,
                pages::dead_letters(
                    &session.csrf,
                    &sources,
                    &handlers,
                    &pages::DeadFilters {
                        source: &filter.source,
                        handler: &filter.handler,
                        since: &filter.since,
                        until: &filter.until,
                    },
                    &shown,
                    filter.retried,
                ),
            ))
        }
        .await,
    )
}

async fn retry_all(
    req: HttpRequest,
    state: web::Data<AppState>,
    form: Option<web::Form<DeadFilter>>,
) -> HttpResponse {
    answer(
        async {
            let Some(form) = form else {
                return Err(Refusal::Csrf);
            };
            authorized_post(&req, &state, &form.csrf)?;
            let filter = RetryFilter {
                source: (!form.source.is_empty()).then(|| form.source.clone()),
                handler: (!form.handler.is_empty()).then(|| form.handler.clone()),
                status: JobStatus::Dead,
                since_ms: filter_time(Some(&form.since))?,
                until_ms: filter_time(Some(&form.until))?,
            };
            let retried = state.operator.retry_matching(&filter).await?;
            Ok(see_other(&console_url(
                &["dead"],
                &[
                    ("source", &form.source),
                    ("handler", &form.handler),
                    ("since", &form.since),
                    ("until", &form.until),
                    ("retried", &retried.to_string()),
                ],
            )))
        }
        .await,
    )
}

/// What the handlers page shows after a backfill (the redirect's query).
#[derive(Debug, Default, Deserialize)]
struct BackfillDone {
    #[serde(default)]
    backfilled: Option<String>,
    #[serde(default)]
    bound: Option<usize>,
    #[serde(default)]
    already: Option<usize>,
    #[serde(default)]
    dry_run: Option<bool>,
}

async fn handlers(
    req: HttpRequest,
    state: web::Data<AppState>,
    done: web::Query<BackfillDone>,
) -> HttpResponse {
    answer(
        async {
            let session = signed_in(&req, &state)?;
            let views = state.operator.handlers(None).await?;
            let sources: Vec<&str> = state.config.sources.keys().map(String::as_str).collect();
            let result = match (&done.backfilled, done.bound, done.already) {
                (Some(handler), Some(bound), Some(already)) => Some(pages::BackfillResult {
                    handler,
                    bound,
                    already,
                    dry_run: done.dry_run.unwrap_or(false),
                }),
                _ => None,
            };
            Ok(html(
                StatusCode::OK,
                pages::handlers(&session.csrf, &views, &sources, result),
            ))
        }
        .await,
    )
}

/// The backfill form of the handlers page.
#[derive(Debug, Deserialize)]
struct BackfillForm {
    handler: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    events: String,
    #[serde(default)]
    dry_run: Option<String>,
    #[serde(default)]
    csrf: String,
}

async fn backfill(
    req: HttpRequest,
    state: web::Data<AppState>,
    form: Option<web::Form<BackfillForm>>,
) -> HttpResponse {
    answer(
        async {
            let Some(form) = form else {
                return Err(Refusal::Csrf);
            };
            authorized_post(&req, &state, &form.csrf)?;
            let form = form.into_inner();
            let dry_run = form.dry_run.is_some();
            let fields = BackfillFields {
                since: Some(form.since),
                until: Some(form.until),
                source: Some(form.source),
                events: Some(form.events),
                dry_run,
            };
            let request = fields.request(form.handler.clone())?;
            let report = state.operator.backfill(request, |_| {}).await?;
            Ok(see_other(&console_url(
                &["handlers"],
                &[
                    ("backfilled", &form.handler),
                    ("bound", &report.bound.to_string()),
                    ("already", &report.already.to_string()),
                    ("dry_run", if dry_run { "true" } else { "false" }),
                ],
            )))
        }
        .await,
    )
}

async fn pause_or_resume(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    form: Option<web::Form<CsrfForm>>,
) -> HttpResponse {
    answer(
        async {
            authorized_post(&req, &state, csrf_of(&form))?;
            let (name, action) = path.into_inner();
            let paused = match action.as_str() {
                "pause" => true,
                "resume" => false,
                _ => return Err(crate::error::ApiError::NotFound.into()),
            };
            state.operator.set_paused(&name, paused).await?;
            Ok(see_other("/console/handlers"))
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::console_url;

    #[test]
    fn console_urls_keep_each_segment_whole_and_encode_the_query() {
        assert_eq!(
            console_url(&["deliveries", "credicorp", "a/b?c d#e"], &[]),
            "/console/deliveries/credicorp/a%2Fb%3Fc%20d%23e"
        );
        assert_eq!(
            console_url(
                &["dead"],
                &[("since", "2026-11-28T09:00:00Z"), ("handler", "a&b")]
            ),
            "/console/dead?since=2026-11-28T09%3A00%3A00Z&handler=a%26b"
        );
        assert_eq!(console_url(&[], &[]), "/console/");
    }
}
