//! Downstream calls (design.md, "Downstream calls"): the partner's own rules, applied to
//! our outbound work.
//!
//! A handler's call to a partner is a named **step** of its run. For each step the client
//! ([`Calls`]):
//! - sends `Idempotency-Key` = [`JobKey::step_key`] — the same for every attempt, restart
//!   and replica, different for any other step, handler or delivery;
//! - retries inside the call with that key: connection errors, time-outs,
//!   408, 409, 425, 429 and 5xx, with full-jitter exponential back-off, never sooner than a
//!   `Retry-After` (seconds or HTTP date) asks, within `max_attempts` and `max_elapsed`;
//!   out of either, the run fails retryably and dispatch's own back-off goes on. A 422 fails
//!   the run for good (the partner refused a reused key with a different request); any
//!   other answer is final and goes back to the handler;
//! - keeps the final answer in the store's journal ([`crate::store::CallRecord`]) with the
//!   request's fingerprint, so a later run of the pair that reaches the step with the same
//!   request gets it without a network call (and knows it was replayed), and one with a
//!   different request fails for good: a step must be deterministic.
//!
//! What the journal keeps is what the handler is given, live or replayed: status,
//! `Content-Type`, `Location`, and the body up to `journal_max_bytes` (`body_truncated`
//! says when there was more; the rest is not read). Answers of 400 and above are given to
//! the handler but not kept: the partner did not act on them, and a later run (an operator
//! retry after the cause was fixed) asks again, with the same key.
//!
//! Request headers are never kept; URLs are kept and shown without user, password or query.
//! [`loopback`] serves the same client to `command` handlers through `webhook-inbox call`.

pub mod loopback;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::CallsConfig;
use crate::store::{CallRecord, DeliveryStore, JobKey};

pub use reqwest::Method;

/// Longest step name.
pub const MAX_STEP_LEN: usize = 64;

/// Whether `step` is a valid step name: 1–64 of `[A-Za-z0-9._-]`.
pub fn is_valid_step(step: &str) -> bool {
    (1..=MAX_STEP_LEN).contains(&step.len())
        && step
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A URL as it may be shown: no user, password, query or fragment (where secrets go).
pub fn redact(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    let credentials = !url.username().is_empty() || url.password().is_some();
    let mut text = shown.to_string();
    if credentials || url.query().is_some() {
        text.push_str(" (credentials and query redacted)");
    }
    text
}

/// The request's fingerprint: hex SHA-256 over the method, the URL without user or password
/// (its query included) and the SHA-256 of the body.
pub fn fingerprint(method: &Method, url: &reqwest::Url, body: &[u8]) -> String {
    let mut bare = url.clone();
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    bare.set_fragment(None);
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update(b"\n");
    h.update(bare.as_str().as_bytes());
    h.update(b"\n");
    h.update(Sha256::digest(body));
    crate::domain::lower_hex(&h.finalize())
}

/// Whether an answer is retried inside the call (with the same key).
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 409 | 425 | 429) || (500..600).contains(&status)
}

/// A `Retry-After` value as a wait from `now`: delay-seconds or an HTTP date.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The full-jitter back-off before exchange `attempt + 1`: a random wait up to
/// `initial × 2^(attempt−1)`, capped at `max`.
pub fn full_jitter(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(31);
    let bound = initial.saturating_mul(1u32 << exp).min(max);
    let bound_ms = bound.as_millis() as u64;
    Duration::from_millis(rand::random::<u64>() % (bound_ms + 1))
}

/// Why a call gave no answer to hand back. [`CallError::is_permanent`] says how the run
/// ends; `webhook-inbox call` exits with [`CallError::exit_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The step name is not 1–64 of `[A-Za-z0-9._-]`.
    #[error("step name `{0}`: a step name is 1 to 64 of A-Z a-z 0-9 . _ -")]
    BadStep(String),
    /// The request cannot be made (bad URL, scheme, header).
    #[error("step {step}: {why}")]
    BadRequest {
        /// The step.
        step: String,
        /// What is wrong, without the URL's credentials.
        why: String,
    },
    /// The partner answered 422.
    #[error("step {step}: the partner refused a reused key with a different request")]
    Refused {
        /// The step.
        step: String,
    },
    /// The journal holds this step's answer to another request.
    #[error("step {step} sent a different request than before: a step must be deterministic")]
    NotDeterministic {
        /// The step.
        step: String,
    },
    /// Every exchange allowed within the run failed or was asked to wait.
    #[error("step {step}: no final answer after {attempts} attempt(s): {last}")]
    Exhausted {
        /// The step.
        step: String,
        /// Exchanges made.
        attempts: u32,
        /// What the last one got.
        last: String,
    },
    /// The run was stopped (shutdown, or its lease could not be proven held).
    #[error("step {step}: stopped before a final answer")]
    Stopped {
        /// The step.
        step: String,
    },
    /// The journal could not be read or written.
    #[error("step {step}: the call journal is unavailable: {error}")]
    Journal {
        /// The step.
        step: String,
        /// The store's error.
        error: String,
    },
}

impl CallError {
    /// Whether the run fails for good (dead letter) rather than retryably.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            CallError::BadStep(_)
                | CallError::BadRequest { .. }
                | CallError::Refused { .. }
                | CallError::NotDeterministic { .. }
        )
    }

    /// `webhook-inbox call`'s exit code: 65 for good, 75 to retry (the `command` handler's
    /// own codes).
    pub fn exit_code(&self) -> u8 {
        if self.is_permanent() { 65 } else { 75 }
    }
}

/// One request of a step, before the client adds its `Idempotency-Key`.
#[derive(Debug, Clone)]
pub struct CallRequest {
    /// The method.
    pub method: Method,
    /// The URL (may hold credentials: it is never shown as such).
    pub url: String,
    /// Headers to send (never journaled).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
    /// One exchange's time-out instead of `calls.timeout` (the `http` handler's `timeout`).
    pub timeout: Option<Duration>,
}

/// A step's final answer, live or from the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallResponse {
    /// Status.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// `Location`, if any.
    pub location: Option<String>,
    /// The body, up to `calls.journal_max_bytes`.
    pub body: Bytes,
    /// The body was longer: `body` is its start.
    pub body_truncated: bool,
    /// Taken from the journal: no network call was made.
    pub replayed: bool,
    /// Exchanges it took in the run that got it.
    pub attempts: u32,
}

impl CallResponse {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body parsed as JSON, if it is.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    fn from_record(record: CallRecord, replayed: bool) -> CallResponse {
        CallResponse {
            status: record.status,
            content_type: record.content_type,
            location: record.location,
            body: Bytes::from(record.body),
            body_truncated: record.body_truncated,
            replayed,
            attempts: record.attempts,
        }
    }
}

/// The process's client for downstream calls: one HTTP connection pool, the store that
/// holds the journal, each handler's `[calls]` settings, and the live runs `webhook-inbox
/// call` may reach ([`loopback`]).
pub struct CallService {
    http: reqwest::Client,
    store: Option<Arc<dyn DeliveryStore>>,
    clock: Clock,
    defaults: CallsConfig,
    per_handler: HashMap<String, CallsConfig>,
    live: loopback::LiveRuns,
    loopback_base: Mutex<Option<String>>,
    outcomes: CallOutcomes,
}

/// Labels of `calls_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct CallLabels {
    /// The handler whose run made the call.
    pub handler: String,
    /// `succeeded` (an answer under 400), `refused` (a final answer of 400 or more),
    /// `replayed` (from the journal, no network call), `failed` (no answer: retries ran
    /// out, a bad request, a changed step).
    pub outcome: &'static str,
}

/// Steps by handler and outcome, registered by the metrics as `calls_total`.
pub type CallOutcomes = prometheus_client::metrics::family::Family<
    CallLabels,
    prometheus_client::metrics::counter::Counter,
>;

impl std::fmt::Debug for CallService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallService")
            .field("journal", &self.store.is_some())
            .field("defaults", &self.defaults)
            .finish()
    }
}

impl CallService {
    /// A client journaling into `store` (none: calls without a journal, as `webhook-inbox
    /// call` run by hand makes them), with `defaults` and per-handler settings.
    pub fn new(
        store: Option<Arc<dyn DeliveryStore>>,
        clock: Clock,
        defaults: CallsConfig,
        per_handler: HashMap<String, CallsConfig>,
    ) -> Arc<CallService> {
        // No redirects: a 3xx is the partner's answer, given to the handler as it is.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        // Every configured handler's counts exist from the start, at zero: a dashboard
        // finds the series before the first call.
        let outcomes = CallOutcomes::default();
        for handler in per_handler.keys() {
            for outcome in ["succeeded", "refused", "replayed", "failed"] {
                let _ = outcomes.get_or_create(&CallLabels {
                    handler: handler.clone(),
                    outcome,
                });
            }
        }
        Arc::new(CallService {
            http,
            store,
            clock,
            defaults,
            per_handler,
            live: loopback::LiveRuns::default(),
            loopback_base: Mutex::new(None),
            outcomes,
        })
    }

    /// The count of steps by handler and outcome (for `/metrics`).
    pub fn outcomes(&self) -> CallOutcomes {
        self.outcomes.clone()
    }

    /// The settings of `handler`'s calls.
    pub fn settings_of(&self, handler: &str) -> CallsConfig {
        self.per_handler
            .get(handler)
            .copied()
            .unwrap_or(self.defaults)
    }

    /// Where `webhook-inbox call` reaches this process: `http://<admin listener>/calls`
    /// (set once the admin listener is bound).
    pub fn set_loopback_base(&self, base: String) {
        *self.loopback_base.lock().unwrap_or_else(|p| p.into_inner()) = Some(base);
    }

    /// The live runs reachable through the loopback endpoint.
    pub fn live_runs(&self) -> &loopback::LiveRuns {
        &self.live
    }

    /// The client of one run of pair `job`, stopped by `shutdown`.
    pub fn for_run(self: &Arc<Self>, job: JobKey, shutdown: CancellationToken) -> Calls {
        Calls {
            settings: self.settings_of(&job.handler),
            service: self.clone(),
            job,
            shutdown,
            run_span: tracing::Span::current(),
        }
    }
}

/// The downstream client of one run of one (delivery, handler) pair: `ctx.calls` (or
/// `ctx.call(step)`) in a Rust plugin.
#[derive(Clone)]
pub struct Calls {
    service: Arc<CallService>,
    job: JobKey,
    settings: CallsConfig,
    shutdown: CancellationToken,
    /// The run's span: every `call` span is its child, also when a program calls through
    /// the loopback endpoint (whose request has no span of the run).
    run_span: tracing::Span,
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calls").field("job", &self.job).finish()
    }
}

impl Calls {
    /// A client without a journal for pair `job` (tests, and `webhook-inbox call` by hand):
    /// the same keys and retry rules.
    pub fn direct(job: JobKey, settings: CallsConfig) -> Calls {
        let service = CallService::new(None, Clock::System, settings, HashMap::new());
        service.for_run(job, CancellationToken::new())
    }

    /// The pair this client calls for.
    pub fn job(&self) -> &JobKey {
        &self.job
    }

    /// The `Idempotency-Key` of `step`.
    pub fn key(&self, step: &str) -> String {
        self.job.step_key(step)
    }

    /// Starts step `step`'s request: `calls.step("create-payment-link").post(url)…`.
    pub fn step(&self, step: &str) -> CallBuilder<'_> {
        CallBuilder {
            calls: self,
            step: step.to_owned(),
        }
    }

    /// Makes step `step`'s call (or replays its journaled answer), with the step's key.
    pub async fn execute(
        &self,
        step: &str,
        request: CallRequest,
    ) -> Result<CallResponse, CallError> {
        self.execute_keyed(step, &self.key(step), request).await
    }

    /// [`Calls::execute`] with an explicit key (the `http` handler's `forward` step keeps
    /// the pair's key it always sent, so an upgrade changes no key of a pending delivery).
    pub async fn execute_keyed(
        &self,
        step: &str,
        key: &str,
        request: CallRequest,
    ) -> Result<CallResponse, CallError> {
        let span = tracing::info_span!(
            parent: &self.run_span,
            "call",
            otel.name = "call",
            step = %crate::domain::printable(step),
            handler = %self.job.handler,
            method = %request.method,
        );
        let result = tracing::Instrument::instrument(self.answer(step, key, request), span).await;
        let outcome = match &result {
            Ok(r) if r.replayed => "replayed",
            Ok(r) if r.status < 400 => "succeeded",
            Ok(_) => "refused",
            Err(_) => "failed",
        };
        self.service
            .outcomes
            .get_or_create(&CallLabels {
                handler: self.job.handler.clone(),
                outcome,
            })
            .inc();
        result
    }

    async fn answer(
        &self,
        step: &str,
        key: &str,
        request: CallRequest,
    ) -> Result<CallResponse, CallError> {
        if !is_valid_step(step) {
            return Err(CallError::BadStep(crate::domain::printable(step)));
        }
        let bad = |why: String| CallError::BadRequest {
            step: step.to_owned(),
            why,
        };
        // The text may hold credentials: an unparsable one is not repeated.
        let url = reqwest::Url::parse(&request.url).map_err(|e| bad(format!("the URL: {e}")))?;
        let shown = format!("{} {}", request.method, redact(&url));
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad(format!("{shown}: only http and https are supported")));
        }
        let fingerprint = fingerprint(&request.method, &url, &request.body);
        let journal = |error: crate::store::StoreError| CallError::Journal {
            step: step.to_owned(),
            error: error.to_string(),
        };
        if let Some(store) = &self.service.store
            && let Some(kept) = store.journal_get(&self.job, step).await.map_err(journal)?
        {
            if kept.fingerprint != fingerprint {
                return Err(CallError::NotDeterministic {
                    step: step.to_owned(),
                });
            }
            if let Err(e) = store.journal_replayed(&self.job, step).await {
                tracing::warn!(step, error = %e, "could not count a journal replay");
            }
            tracing::info!(step, status = kept.status, "call answered from the journal");
            return Ok(CallResponse::from_record(kept, true));
        }
        let answer = exchange(
            &self.service.http,
            &self.settings,
            self.service.clock,
            &self.shutdown,
            Exchange {
                step,
                key,
                url: &url,
                shown: &shown,
                request: &request,
            },
        )
        .await?;
        let record = CallRecord {
            request: shown,
            fingerprint,
            status: answer.status,
            content_type: answer.content_type,
            location: answer.location,
            body: answer.body,
            body_truncated: answer.body_truncated,
            attempts: answer.attempts,
            at_ms: self.service.clock.now_ms(),
            replayed: 0,
        };
        match &self.service.store {
            Some(store) if record.status < 400 => {
                let kept = store
                    .journal_put(&self.job, step, &record)
                    .await
                    .map_err(journal)?;
                Ok(CallResponse::from_record(kept, false))
            }
            _ => Ok(CallResponse::from_record(record, false)),
        }
    }
}

/// `calls.step(name)`: pick the method and URL.
#[derive(Debug)]
pub struct CallBuilder<'a> {
    calls: &'a Calls,
    step: String,
}

impl<'a> CallBuilder<'a> {
    /// A request with `method` to `url`.
    pub fn request(self, method: Method, url: impl Into<String>) -> Call<'a> {
        Call {
            calls: self.calls,
            step: self.step,
            request: CallRequest {
                method,
                url: url.into(),
                headers: Vec::new(),
                body: Bytes::new(),
                timeout: None,
            },
        }
    }

    /// `POST url`.
    pub fn post(self, url: impl Into<String>) -> Call<'a> {
        self.request(Method::POST, url)
    }

    /// `PUT url`.
    pub fn put(self, url: impl Into<String>) -> Call<'a> {
        self.request(Method::PUT, url)
    }

    /// `PATCH url`.
    pub fn patch(self, url: impl Into<String>) -> Call<'a> {
        self.request(Method::PATCH, url)
    }

    /// `DELETE url`.
    pub fn delete(self, url: impl Into<String>) -> Call<'a> {
        self.request(Method::DELETE, url)
    }

    /// `GET url`.
    pub fn get(self, url: impl Into<String>) -> Call<'a> {
        self.request(Method::GET, url)
    }
}

/// A step's request being built; [`Call::send`] makes it.
#[derive(Debug)]
pub struct Call<'a> {
    calls: &'a Calls,
    step: String,
    request: CallRequest,
}

impl Call<'_> {
    /// Adds a header (never journaled).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.headers.push((name.into(), value.into()));
        self
    }

    /// The body, as bytes.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.request.body = body.into();
        self
    }

    /// The body as JSON, with `Content-Type: application/json`.
    pub fn json<T: serde::Serialize + ?Sized>(self, value: &T) -> Self {
        let body = serde_json::to_vec(value).unwrap_or_default();
        self.header("Content-Type", "application/json").body(body)
    }

    /// Makes the call (or replays its journaled answer).
    pub async fn send(self) -> Result<CallResponse, CallError> {
        self.calls.execute(&self.step, self.request).await
    }
}

/// One call's exchanges, borrowed.
struct Exchange<'a> {
    step: &'a str,
    key: &'a str,
    url: &'a reqwest::Url,
    shown: &'a str,
    request: &'a CallRequest,
}

/// A final answer as read.
struct Answer {
    status: u16,
    content_type: Option<String>,
    location: Option<String>,
    body: Vec<u8>,
    body_truncated: bool,
    attempts: u32,
}

/// The exchanges of one call: retried with the same key until a final answer, the
/// attempts or the time run out, or `stop` fires.
async fn exchange(
    http: &reqwest::Client,
    settings: &CallsConfig,
    clock: Clock,
    stop: &CancellationToken,
    call: Exchange<'_>,
) -> Result<Answer, CallError> {
    let step = call.step.to_owned();
    let stopped = || CallError::Stopped { step: step.clone() };
    let deadline = tokio::time::Instant::now() + settings.max_elapsed;
    let mut last = String::new();
    let mut attempts = 0;
    while attempts < settings.max_attempts {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            break;
        }
        attempts += 1;
        let timeout = call
            .request
            .timeout
            .unwrap_or(settings.timeout)
            .min(remaining);
        let mut builder = http
            .request(call.request.method.clone(), call.url.clone())
            .timeout(timeout);
        for (name, value) in &call.request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let has_traceparent = call
            .request
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("traceparent"));
        if !has_traceparent
            && let Some(traceparent) = crate::telemetry::traceparent(&tracing::Span::current())
        {
            builder = builder.header("traceparent", traceparent);
        }
        let send = builder
            .header("Idempotency-Key", call.key)
            .body(call.request.body.clone())
            .send();
        let outcome = tokio::select! {
            r = send => r,
            () = stop.cancelled() => return Err(stopped()),
        };
        let mut wait_at_least = Duration::ZERO;
        match outcome {
            Err(e) => last = format!("{}: {}", call.shown, e.without_url()),
            Ok(response) => {
                let status = response.status().as_u16();
                if status == 422 {
                    return Err(CallError::Refused { step });
                }
                if is_retryable_status(status) {
                    last = format!("{} answered {status}", call.shown);
                    if let Some(wait) = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| retry_after(v, clock.now()))
                    {
                        wait_at_least = wait;
                    }
                } else {
                    let header = |name| {
                        response
                            .headers()
                            .get(name)
                            .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let content_type = header(reqwest::header::CONTENT_TYPE);
                    let location = header(reqwest::header::LOCATION);
                    let read = read_body(response, settings.journal_max_bytes);
                    let read = tokio::select! {
                        r = tokio::time::timeout(timeout, read) => r,
                        () = stop.cancelled() => return Err(stopped()),
                    };
                    match read {
                        Ok(Ok((body, body_truncated))) => {
                            return Ok(Answer {
                                status,
                                content_type,
                                location,
                                body,
                                body_truncated,
                                attempts,
                            });
                        }
                        // The answer broke off: as if the connection had dropped.
                        Ok(Err(e)) => {
                            last = format!("{} answered {status}, then: {e}", call.shown);
                        }
                        Err(_) => {
                            last = format!(
                                "{} answered {status}, then the body timed out",
                                call.shown
                            );
                        }
                    }
                }
            }
        }
        if attempts >= settings.max_attempts {
            break;
        }
        let wait = full_jitter(attempts, settings.initial_backoff, settings.max_backoff)
            .max(wait_at_least);
        if tokio::time::Instant::now() + wait >= deadline {
            if !wait_at_least.is_zero() {
                last = format!(
                    "{last}, asked to wait {}s, past calls.max_elapsed",
                    wait_at_least.as_secs()
                );
            }
            break;
        }
        tracing::info!(step = call.step, attempt = attempts, wait_ms = wait.as_millis() as u64, reason = %last, "call retried");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return Err(stopped()),
        }
    }
    Err(CallError::Exhausted {
        step,
        attempts,
        last,
    })
}

/// Reads at most `max` bytes of the body; says whether there was more (the rest unread).
async fn read_body(mut response: reqwest::Response, max: usize) -> Result<(Vec<u8>, bool), String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| e.without_url().to_string())?
    {
        let room = max - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DeliveryKey;

    /// Computed by this formula when it was introduced; it must never change.
    const PINNED_STEP_KEY: &str =
        "dfe00ff56ebc8cb5bebabaef6bad7f721db6b0cf51e94c099ffdf90633b218ac";

    #[test]
    fn step_names_are_bounded_and_plain() {
        for ok in ["create-payment-link", "a", "v1.links_2", &"s".repeat(64)] {
            assert!(is_valid_step(ok), "{ok}");
        }
        for bad in ["", "two words", "a/b", "ü", "a\0b", &"s".repeat(65)] {
            assert!(!is_valid_step(bad), "{bad:?}");
        }
    }

    /// The documented formula, pinned: an upgrade must not change the key of a step.
    #[test]
    fn a_step_key_is_pinned_and_distinct() {
        let job = DeliveryKey::new("credicorp", "msg_1").job("open-case");
        let key = job.step_key("create-payment-link");
        let material = b"credicorp\0msg_1\0open-case\0create-payment-link";
        assert_eq!(key, hex::encode(Sha256::digest(material)));
        assert_eq!(key, PINNED_STEP_KEY);
        assert_eq!(key.len(), 64);
        assert_ne!(key, job.step_key("notify"));
        assert_ne!(key, job.idempotency_key());
        assert_ne!(
            key,
            DeliveryKey::new("credicorp", "msg_2")
                .job("open-case")
                .step_key("create-payment-link")
        );
    }

    #[test]
    fn retry_after_in_both_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(retry_after("2", now), Some(Duration::from_secs(2)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(retry_after(&later, now), Some(Duration::from_secs(7)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn full_jitter_stays_under_its_bound() {
        for attempt in 1..10 {
            let bound = Duration::from_millis(200)
                .saturating_mul(1 << (attempt - 1))
                .min(Duration::from_secs(5));
            for _ in 0..50 {
                assert!(
                    full_jitter(attempt, Duration::from_millis(200), Duration::from_secs(5))
                        <= bound
                );
            }
        }
    }

    #[test]
    fn fingerprints_ignore_credentials_but_not_the_query_or_body() {
        let url = |u: &str| reqwest::Url::parse(u).expect("url");
        let a = fingerprint(&Method::POST, &url("https://u:p@x.test/links?a=1"), b"{}");
        assert_eq!(
            a,
            fingerprint(&Method::POST, &url("https://x.test/links?a=1"), b"{}")
        );
        assert_ne!(
            a,
            fingerprint(&Method::POST, &url("https://x.test/links?a=2"), b"{}")
        );
        assert_ne!(
            a,
            fingerprint(&Method::PUT, &url("https://x.test/links?a=1"), b"{}")
        );
        assert_ne!(
            a,
            fingerprint(&Method::POST, &url("https://x.test/links?a=1"), b"{ }")
        );
    }
}
