//! Prometheus metrics, all prefixed `webhook_inbox_`, served at `GET /metrics` on the admin
//! listener.
//!
//! - `deliveries_total{source,outcome,reason}`: outcome `accepted`, `processed`,
//!   `replayed`, `conflict`, `in_progress`, `rejected` (with the error code as `reason`),
//!   `unavailable`. Unknown sources count under `source="_unknown"` so a scanner cannot
//!   grow the label set.
//! - `handler_runs_total{handler,result}` (`succeeded`, `failed`, `dead`) and
//!   `handler_duration_seconds{handler}`.
//! - `queue_depth`, `dead_letters`: read from the store at scrape time; likewise, per
//!   handler, `handler_queue_depth{handler}` and `handler_paused{handler}` (1 when paused).
//! - `store_flush_seconds`: one group commit of the sled store (registered at start-up
//!   when the service opened that store itself).

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::DeliveryStore;

/// Labels of `deliveries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// Source name (or `_unknown`).
    pub source: String,
    /// What happened.
    pub outcome: String,
    /// The error code of a rejection; empty otherwise.
    pub reason: String,
}

/// Labels of `handler_runs_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    /// Handler name.
    pub handler: String,
    /// `succeeded`, `failed` or `dead`.
    pub result: String,
}

/// Labels of `handler_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerLabels {
    /// Handler name.
    pub handler: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every metric of the service.
pub struct Metrics {
    registry: Registry,
    deliveries: Family<DeliveryLabels, Counter>,
    handler_runs: Family<RunLabels, Counter>,
    handler_duration: Family<HandlerLabels, Histogram, fn() -> Histogram>,
    queue_depth: Gauge<i64, AtomicI64>,
    dead_letters: Gauge<i64, AtomicI64>,
    handler_queue_depth: Family<HandlerLabels, Gauge<i64, AtomicI64>>,
    handler_paused: Family<HandlerLabels, Gauge<i64, AtomicI64>>,
    /// The configured handlers, so each has its gauges even when idle.
    handlers: Vec<String>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric of the service.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("webhook_inbox");
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "deliveries",
            "Deliveries by source and outcome",
            deliveries.clone(),
        );
        let handler_runs = Family::<RunLabels, Counter>::default();
        registry.register(
            "handler_runs",
            "Handler runs by handler and result",
            handler_runs.clone(),
        );
        let handler_duration =
            Family::<HandlerLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram,
            );
        registry.register(
            "handler_duration_seconds",
            "Duration of handler runs",
            handler_duration.clone(),
        );
        let queue_depth = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "queue_depth",
            "Jobs waiting in the dispatch queue",
            queue_depth.clone(),
        );
        let dead_letters = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "dead_letters",
            "Dead-lettered (delivery, handler) pairs",
            dead_letters.clone(),
        );
        let handler_queue_depth = Family::<HandlerLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "handler_queue_depth",
            "Jobs waiting in the dispatch queue, per handler",
            handler_queue_depth.clone(),
        );
        let handler_paused = Family::<HandlerLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "handler_paused",
            "1 for a handler an operator has paused",
            handler_paused.clone(),
        );
        Metrics {
            registry,
            deliveries,
            handler_runs,
            handler_duration,
            queue_depth,
            dead_letters,
            handler_queue_depth,
            handler_paused,
            handlers: Vec::new(),
        }
    }

    /// The configured handlers: each gets its per-handler gauges, even at zero.
    pub fn set_handlers(&mut self, handlers: impl IntoIterator<Item = String>) {
        self.handlers = handlers.into_iter().collect();
    }

    /// Counts one answered delivery.
    pub fn delivery(&self, source: &str, outcome: &str, reason: &str) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                source: source.to_owned(),
                outcome: outcome.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts one handler run and its duration.
    pub fn handler_run(&self, handler: &str, result: &str, seconds: f64) {
        self.handler_runs
            .get_or_create(&RunLabels {
                handler: handler.to_owned(),
                result: result.to_owned(),
            })
            .inc();
        self.handler_duration
            .get_or_create(&HandlerLabels {
                handler: handler.to_owned(),
            })
            .observe(seconds);
    }

    /// Registers the sled store's group-commit durations as `store_flush_seconds`.
    pub fn register_flush_seconds(&mut self, histogram: Histogram) {
        self.registry.register(
            "store_flush_seconds",
            "Duration of one group commit (db.flush and fsync)",
            histogram,
        );
    }

    /// The exposition text, with the store's gauges read now (left as they were when the
    /// store cannot be read).
    pub async fn render(&self, store: &dyn DeliveryStore) -> String {
        if let Ok(n) = store.dead_letters().await {
            self.dead_letters.set(n as i64);
        }
        let label = |handler: &str| HandlerLabels {
            handler: handler.to_owned(),
        };
        // One read of the queue for both gauges: the total is the sum of the handlers'.
        if let Ok(depths) = store.queue_depths().await {
            for handler in &self.handlers {
                self.handler_queue_depth
                    .get_or_create(&label(handler))
                    .set(0);
            }
            let mut total = 0;
            for (handler, n) in depths {
                total += n;
                self.handler_queue_depth
                    .get_or_create(&label(&handler))
                    .set(n as i64);
            }
            self.queue_depth.set(total as i64);
        }
        if let Ok(paused) = store.paused_handlers().await {
            for handler in &self.handlers {
                self.handler_paused
                    .get_or_create(&label(handler))
                    .set(i64::from(paused.contains(handler)));
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
