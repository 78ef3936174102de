//! The operator's actions — list and look at deliveries, retry one or many, pause or resume
//! a handler, backfill one — as the admin API (`routes/admin.rs`) and the web console
//! (`routes/console`) both perform them.
//!
//! Why apart from the routes: the two front ends must do exactly the same thing (the same
//! checks, the same wake of the dispatcher, the same log line), and neither should need
//! the other. Nothing here knows HTTP: a route parses its request, calls an [`Operator`]
//! method, and maps an [`OperationError`] to its answer ([`crate::error`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::backfill::{BackfillError, BackfillReport, BackfillRequest};
use crate::clock::Clock;
use crate::config::Config;
use crate::domain::EventPattern;
use crate::handlers::HandlerRegistry;
use crate::store::{
    Cursor, DeliveryKey, DeliveryRecord, DeliveryStatus, DeliveryStore, JobState, Page,
    RetryFilter, StoreError,
};

/// Why an operation was not done.
#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    /// No such delivery is stored.
    #[error("no such delivery is stored")]
    NotFound,
    /// No handler of that name is configured.
    #[error("no handler of that name is configured")]
    UnknownHandler,
    /// A filter value is unusable (a time that is not RFC 3339, an invalid event pattern).
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] StoreError),
    /// The blocking task that did the work ended without an answer.
    #[error("the operation's task ended without an answer")]
    Interrupted,
}

/// One handler's state in a delivery's detail.
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

/// One journaled step in a delivery's detail (never a request header, a URL's credentials
/// or query, nor the answer's body).
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

/// One delivery whole: its record, raw body, status and each handler's state with its
/// idempotency key.
#[derive(Debug)]
pub struct DeliveryDetail {
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

/// One configured handler with its pairs' counts.
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

/// A backfill as an operator asks for it, every field as typed (blank is absent).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackfillFields {
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

/// The operator's actions over one store and the configured handlers.
pub struct Operator {
    store: Arc<dyn DeliveryStore>,
    registry: Arc<HandlerRegistry>,
    dispatch_waker: Arc<Notify>,
    clock: Clock,
}

impl Operator {
    /// Actions on `store`, for `registry`'s handlers; `dispatch_waker` is told of work made
    /// due.
    pub fn new(
        store: Arc<dyn DeliveryStore>,
        registry: Arc<HandlerRegistry>,
        dispatch_waker: Arc<Notify>,
        clock: Clock,
    ) -> Operator {
        Operator {
            store,
            registry,
            dispatch_waker,
            clock,
        }
    }

    /// A page of deliveries, newest first (see [`crate::store::Operations::list`]), read on
    /// a blocking thread: the sled store reads synchronously, and a long listing must never
    /// hold up a listener's workers (health probes, metrics).
    pub async fn list(
        &self,
        source: Option<String>,
        status: Option<DeliveryStatus>,
        limit: usize,
        cursor: Option<Cursor>,
    ) -> Result<Page, OperationError> {
        let store = self.store.clone();
        let runtime = tokio::runtime::Handle::current();
        let page = tokio::task::spawn_blocking(move || {
            runtime.block_on(store.list(source.as_deref(), status, limit, cursor.as_ref()))
        })
        .await
        .map_err(|_| OperationError::Interrupted)??;
        Ok(page)
    }

    /// One delivery whole.
    pub async fn detail(&self, key: &DeliveryKey) -> Result<DeliveryDetail, OperationError> {
        let record = self
            .store
            .record(key)
            .await?
            .ok_or(OperationError::NotFound)?;
        // A body that fails its checksum is shown as such, not as a failure (invariant 8).
        let (body, body_error) = match self.store.body(key).await {
            Ok(body) => (body.unwrap_or_default(), None),
            Err(StoreError::Corrupt(e)) => {
                (bytes::Bytes::new(), Some(format!("body unreadable: {e}")))
            }
            Err(e) => return Err(e.into()),
        };
        let journal = self.store.journal_of(key).await?;
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
                state: self.store.job(&job).await?,
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

    /// One delivery as a fixture (`replay`'s format).
    pub async fn fixture(
        &self,
        config: &Config,
        key: &DeliveryKey,
    ) -> Result<crate::fixture::Fixture, OperationError> {
        crate::export::fixture_of(&*self.store, config, &key.source, &key.id)
            .await?
            .ok_or(OperationError::NotFound)
    }

    /// Queued pairs, all handlers together.
    pub async fn queued(&self) -> Result<usize, OperationError> {
        Ok(self
            .store
            .queue_depths()
            .await?
            .iter()
            .map(|(_, n)| n)
            .sum())
    }

    /// Dead-lettered pairs, all handlers together.
    pub async fn dead_letters(&self) -> Result<usize, OperationError> {
        Ok(self.store.dead_letters().await?)
    }

    /// An operator retry of one delivery (see [`crate::store::Operations::retry`]): the
    /// handlers now due, the dispatcher woken.
    pub async fn retry(&self, key: &DeliveryKey) -> Result<Vec<String>, OperationError> {
        if self.store.record(key).await?.is_none() {
            return Err(OperationError::NotFound);
        }
        let requeued = self.store.retry(key, self.clock.now_ms()).await?;
        self.dispatch_waker.notify_one();
        tracing::info!(source = %key.source, delivery_id = %key.id, ?requeued, "retry requested");
        Ok(requeued)
    }

    /// A bulk operator retry (see [`crate::store::Operations::retry_all`]): how many pairs
    /// it requeued, the dispatcher woken.
    pub async fn retry_matching(&self, filter: &RetryFilter) -> Result<usize, OperationError> {
        let retried = self.store.retry_all(filter, self.clock.now_ms()).await?;
        self.dispatch_waker.notify_one();
        tracing::info!(?filter, retried, "bulk retry requested");
        Ok(retried)
    }

    /// Each configured handler (or only `only`), paused or not, with its pairs' counts.
    pub async fn handlers(
        &self,
        only: Option<&str>,
    ) -> Result<Vec<HandlerStatusView>, OperationError> {
        let stats = self.store.handler_stats(self.clock.now_ms()).await?;
        let paused = self.store.paused_handlers().await?;
        Ok(self
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

    /// Pauses or resumes a configured handler (on every replica; survives restarts), the
    /// dispatcher woken.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<(), OperationError> {
        if !self.registry.contains(name) {
            return Err(OperationError::UnknownHandler);
        }
        self.store
            .set_paused(name, paused, self.clock.now_ms())
            .await?;
        self.dispatch_waker.notify_one();
        tracing::info!(handler = %name, paused, "handler {}", if paused { "paused" } else { "resumed" });
        Ok(())
    }

    /// The configured handlers' names, in configuration order.
    pub fn handler_names(&self) -> Vec<&str> {
        self.registry.limits().map(|(name, _)| name).collect()
    }

    /// Whether `name` is a configured handler.
    pub fn has_handler(&self, name: &str) -> bool {
        self.registry.contains(name)
    }

    /// Runs a backfill (see [`crate::backfill`]; [`BackfillFields::request`] makes one) on a
    /// blocking thread (it
    /// reads and binds batch after batch: the listeners' workers keep answering probes
    /// meanwhile), the dispatcher woken after each batch; `progress` hears of each.
    pub async fn backfill(
        &self,
        request: BackfillRequest,
        mut progress: impl FnMut(&BackfillReport) + Send + 'static,
    ) -> Result<BackfillReport, OperationError> {
        if !self.registry.contains(&request.handler) {
            return Err(OperationError::UnknownHandler);
        }
        let store = self.store.clone();
        let registry = self.registry.clone();
        let now_ms = self.clock.now_ms();
        let runtime = tokio::runtime::Handle::current();
        let waker = self.dispatch_waker.clone();
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
        .map_err(|_| OperationError::Interrupted)?
        .map_err(|e| match e {
            BackfillError::UnknownHandler(_) => OperationError::UnknownHandler,
            BackfillError::Store(e) => OperationError::Storage(e),
        })?;
        self.dispatch_waker.notify_one();
        tracing::info!(
            handler = %request.handler,
            bound = report.bound,
            already = report.already,
            dry_run = request.dry_run,
            "backfill"
        );
        Ok(report)
    }
}

impl BackfillFields {
    /// The backfill of `handler` these fields ask for; checked here, before anything runs
    /// (a front end that streams progress answers a bad field before it starts).
    pub fn request(self, handler: String) -> Result<BackfillRequest, OperationError> {
        backfill_request(handler, self)
    }
}

fn backfill_request(
    handler: String,
    fields: BackfillFields,
) -> Result<BackfillRequest, OperationError> {
    let events = match fields
        .events
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        Some(pattern) => Some(
            EventPattern::parse(pattern).map_err(|_| OperationError::Invalid("event pattern"))?,
        ),
        None => None,
    };
    Ok(BackfillRequest {
        handler,
        since_ms: filter_time(fields.since.as_deref())?,
        until_ms: filter_time(fields.until.as_deref())?,
        source: fields.source.filter(|s| !s.trim().is_empty()),
        events,
        dry_run: fields.dry_run,
    })
}

/// A filter's time: RFC 3339 to ms since the epoch; blank is no bound.
pub fn filter_time(text: Option<&str>) -> Result<Option<u64>, OperationError> {
    match text.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => humantime::parse_rfc3339_weak(t)
            .map(|t| Some(crate::clock::to_ms(t)))
            .map_err(|_| OperationError::Invalid("time")),
    }
}

/// A delivery status filter: one of the [`DeliveryStatus`] names.
pub fn parse_status(text: &str) -> Result<DeliveryStatus, OperationError> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| OperationError::Invalid("status"))
}
