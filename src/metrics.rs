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
//! - `answer_duration_seconds{source}`: from a request's arrival to its answer (every
//!   outcome), per configured source (`_unknown` otherwise).
//! - `calls_total{handler,outcome}`: downstream call steps (`succeeded`, `refused`,
//!   `replayed` from the journal, `failed`), registered from the call service at start-up.
//! - `sink_publishes_total{handler,broker,result}`: sink messages `published`, `duplicate`
//!   (the broker already held it) or `failed`.
//! - `alerts_total{event,result}`: operational webhooks `sent`, `failed` (retries ran
//!   out) or `dropped` (too many unsent).
//! - `store_flush_seconds`: one group commit of the sled store (registered at start-up
//!   when the service opened that store itself).
//!
//! `deploy/grafana-dashboard.json` charts these; a test fails if it names a metric the
//! binary does not export.
//!
//! Beside the counters, [`RecentActivity`] keeps the last hour of deliveries per source and
//! minute, for the console's overview chart (Prometheus keeps no history itself).

use std::sync::RwLock;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::collections::FastHashMap;
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

/// Labels of `answer_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// Source name (or `_unknown`).
    pub source: String,
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

/// From 100 µs to about 6.5 s: an fsync'd ack is a millisecond or a few.
fn answer_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// One source label's handles on the per-request series (see `Metrics::request_series`).
#[derive(Default)]
struct RequestSeries {
    /// `deliveries_total`, by (outcome, reason).
    deliveries: FastHashMap<(&'static str, &'static str), Counter>,
    /// `answer_duration_seconds`.
    answer_duration: Option<Histogram>,
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
    answer_duration: Family<SourceLabels, Histogram, fn() -> Histogram>,
    /// The configured handlers, so each has its gauges even when idle.
    handlers: Vec<String>,
    /// The last hour, per source and minute.
    activity: RecentActivity,
    /// Handles on every request's series, by source label (configured sources and
    /// `_unknown`, so a bounded map): a request then costs a lookup by `&str` instead of
    /// three label strings built for the family's own lookup (~2 % of a redelivery's CPU in
    /// session 18's profile). The handles share their values with the families.
    request_series: RwLock<FastHashMap<String, RequestSeries>>,
    /// Where the activity's minutes come from.
    clock: crate::clock::Clock,
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
        let answer_duration =
            Family::<SourceLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                answer_histogram,
            );
        registry.register(
            "answer_duration_seconds",
            "From a webhook request's arrival to its answer",
            answer_duration.clone(),
        );
        Metrics {
            registry,
            deliveries,
            answer_duration,
            handler_runs,
            handler_duration,
            queue_depth,
            dead_letters,
            handler_queue_depth,
            handler_paused,
            handlers: Vec::new(),
            clock: crate::clock::Clock::System,
            activity: RecentActivity::default(),
            request_series: RwLock::default(),
        }
    }

    /// The last hour of deliveries, per source and minute.
    pub fn activity(&self) -> &RecentActivity {
        &self.activity
    }

    /// Reads time from `clock` (the last hour's activity): the server's, so that a test
    /// on tokio's paused clock sees the minutes it moves through.
    pub fn set_clock(&mut self, clock: crate::clock::Clock) {
        self.clock = clock;
    }

    /// The configured handlers: each gets its per-handler gauges, even at zero.
    pub fn set_handlers(&mut self, handlers: impl IntoIterator<Item = String>) {
        self.handlers = handlers.into_iter().collect();
    }

    /// Counts one answered delivery.
    pub fn delivery(&self, source: &str, outcome: &'static str, reason: &'static str) {
        if let Some(kind) = ActivityKind::of(outcome) {
            self.activity.record(source, kind, self.clock.now_ms());
        }
        let known = |series: &FastHashMap<String, RequestSeries>| {
            series
                .get(source)
                .and_then(|s| s.deliveries.get(&(outcome, reason)).cloned())
        };
        let counter = self.read_series(known).unwrap_or_else(|| {
            let counter = self
                .deliveries
                .get_or_create(&DeliveryLabels {
                    source: source.to_owned(),
                    outcome: outcome.to_owned(),
                    reason: reason.to_owned(),
                })
                .clone();
            self.write_series(source, |s| {
                s.deliveries.insert((outcome, reason), counter.clone());
            });
            counter
        });
        counter.inc();
    }

    /// How long a request of `source` took to answer.
    pub fn answered_in(&self, source: &str, seconds: f64) {
        let known = |series: &FastHashMap<String, RequestSeries>| {
            series.get(source).and_then(|s| s.answer_duration.clone())
        };
        let histogram = self.read_series(known).unwrap_or_else(|| {
            let histogram = self
                .answer_duration
                .get_or_create(&SourceLabels {
                    source: source.to_owned(),
                })
                .clone();
            self.write_series(source, |s| s.answer_duration = Some(histogram.clone()));
            histogram
        });
        histogram.observe(seconds);
    }

    fn read_series<T>(
        &self,
        read: impl Fn(&FastHashMap<String, RequestSeries>) -> Option<T>,
    ) -> Option<T> {
        read(
            &self
                .request_series
                .read()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    fn write_series(&self, source: &str, write: impl FnOnce(&mut RequestSeries)) {
        let mut series = self
            .request_series
            .write()
            .unwrap_or_else(|p| p.into_inner());
        write(series.entry(source.to_owned()).or_default());
    }

    /// Registers the call service's step counts as `calls_total`.
    pub fn register_calls(&mut self, outcomes: crate::calls::CallOutcomes) {
        self.registry.register(
            "calls",
            "Downstream call steps by handler and outcome",
            outcomes,
        );
    }

    /// Registers a metric another part keeps itself (`name` without the prefix; a
    /// counter's `_total` is added): the sinks' `sink_publishes_total`, kept by the
    /// handlers.
    pub fn register(
        &mut self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.registry.register(name, help, metric);
    }

    /// Registers the operational webhooks' counts as `alerts_total`.
    pub fn register_alerts(&mut self, outcomes: crate::alerts::AlertOutcomes) {
        self.registry.register(
            "alerts",
            "Operational webhooks by kind and result (sent, failed, dropped)",
            outcomes,
        );
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

/// What the overview chart counts: the outcomes an operator tells apart at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivityKind {
    /// Accepted or processed: a new delivery.
    Accepted,
    /// A redelivery answered with the first answer (or a body seen under another id).
    Replayed,
    /// Refused: a bad signature, a stale timestamp, a malformed request…
    Rejected,
    /// A known id with another body (422).
    Conflict,
}

impl ActivityKind {
    /// Every kind, in the chart's order.
    pub const ALL: [ActivityKind; 4] = [
        ActivityKind::Accepted,
        ActivityKind::Replayed,
        ActivityKind::Rejected,
        ActivityKind::Conflict,
    ];

    fn of(outcome: &str) -> Option<ActivityKind> {
        match outcome {
            "accepted" | "processed" => Some(ActivityKind::Accepted),
            "replayed" | "body_duplicate" => Some(ActivityKind::Replayed),
            "rejected" => Some(ActivityKind::Rejected),
            "conflict" => Some(ActivityKind::Conflict),
            _ => None,
        }
    }

    /// Its name, as the console shows it.
    pub fn name(self) -> &'static str {
        match self {
            ActivityKind::Accepted => "accepted",
            ActivityKind::Replayed => "replayed",
            ActivityKind::Rejected => "rejected",
            ActivityKind::Conflict => "conflicts",
        }
    }
}

/// Minutes the overview looks back.
pub const ACTIVITY_MINUTES: usize = 60;

/// Per source, a ring of the last [`ACTIVITY_MINUTES`] minutes of counts per
/// [`ActivityKind`]: bounded (sources are the configured ones plus `_unknown`), reset by a
/// restart.
#[derive(Debug, Default)]
pub struct RecentActivity {
    rings: std::sync::Mutex<std::collections::BTreeMap<String, Ring>>,
}

/// One source's minutes: `(minute since the epoch, counts)` per slot.
#[derive(Debug, Clone)]
struct Ring([(u64, [u64; 4]); ACTIVITY_MINUTES]);

impl RecentActivity {
    fn record(&self, source: &str, kind: ActivityKind, now_ms: u64) {
        let minute = now_ms / 60_000;
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        // On every request: the source's name is copied only the first time it is seen.
        if !rings.contains_key(source) {
            rings.insert(source.to_owned(), Ring([(0, [0; 4]); ACTIVITY_MINUTES]));
        }
        let Some(ring) = rings.get_mut(source) else {
            return;
        };
        let slot = &mut ring.0[(minute % ACTIVITY_MINUTES as u64) as usize];
        if slot.0 != minute {
            *slot = (minute, [0; 4]);
        }
        let i = ActivityKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        slot.1[i] += 1;
    }

    /// Per source, the counts of each of the last [`ACTIVITY_MINUTES`] minutes up to
    /// `now_ms`, oldest first (indexed as [`ActivityKind::ALL`]).
    pub fn last_hour(&self, now_ms: u64) -> Vec<(String, Vec<[u64; 4]>)> {
        let now = now_ms / 60_000;
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        rings
            .iter()
            .map(|(source, ring)| {
                let minutes = (0..ACTIVITY_MINUTES as u64)
                    .rev()
                    .map(|ago| {
                        let minute = now.saturating_sub(ago);
                        let slot = ring.0[(minute % ACTIVITY_MINUTES as u64) as usize];
                        if slot.0 == minute && now >= ago {
                            slot.1
                        } else {
                            [0; 4]
                        }
                    })
                    .collect();
                (source.clone(), minutes)
            })
            .collect()
    }
}

#[cfg(test)]
mod activity_tests {
    use super::{ACTIVITY_MINUTES, ActivityKind, RecentActivity};

    #[test]
    fn the_last_hour_counts_per_minute_and_forgets_older_minutes() {
        let a = RecentActivity::default();
        let t0 = 1_000 * 60_000;
        a.record("s", ActivityKind::Accepted, t0);
        a.record("s", ActivityKind::Accepted, t0 + 1_000);
        a.record("s", ActivityKind::Conflict, t0 + 61_000);
        let hour = a.last_hour(t0 + 61_000);
        let minutes = &hour[0].1;
        assert_eq!(minutes.len(), ACTIVITY_MINUTES);
        assert_eq!(minutes[ACTIVITY_MINUTES - 1], [0, 0, 0, 1]);
        assert_eq!(minutes[ACTIVITY_MINUTES - 2], [2, 0, 0, 0]);
        // An hour later the slot is reused: the old minute is gone.
        a.record("s", ActivityKind::Rejected, t0 + 60 * 60_000);
        let hour = a.last_hour(t0 + 60 * 60_000);
        assert_eq!(hour[0].1[ACTIVITY_MINUTES - 1], [0, 0, 1, 0]);
        assert_eq!(
            hour[0].1.iter().map(|m| m.iter().sum::<u64>()).sum::<u64>(),
            2
        );
    }

    #[test]
    fn concurrent_records_are_all_counted() {
        let a = std::sync::Arc::new(RecentActivity::default());
        let t0 = 2_000 * 60_000;
        let threads: Vec<_> = (0..8)
            .map(|n| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        let source = if (n + i) % 2 == 0 { "a" } else { "b" };
                        a.record(source, ActivityKind::Replayed, t0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let hour = a.last_hour(t0);
        let total: u64 = hour.iter().map(|(_, m)| m[ACTIVITY_MINUTES - 1][1]).sum();
        assert_eq!(total, 8000);
        assert_eq!(hour.len(), 2);
    }
}

#[cfg(test)]
mod request_series_tests {
    use super::Metrics;

    /// The per-source handles count into the families the registry exports: every request
    /// counted, by whichever thread first created a series (several may race to) or found
    /// it made.
    #[test]
    fn concurrent_requests_are_all_exported_through_the_cached_handles() {
        let metrics = std::sync::Arc::new(Metrics::new());
        let threads: Vec<_> = (0..8)
            .map(|n| {
                let metrics = metrics.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let source = if (n + i) % 2 == 0 { "a" } else { "b" };
                        metrics.delivery(source, "replayed", "");
                        metrics.delivery(source, "rejected", "invalid_signature");
                        metrics.answered_in(source, 0.001);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).expect("encode");
        for source in ["a", "b"] {
            for line in [
                format!(
                    "webhook_inbox_deliveries_total{{source=\"{source}\",outcome=\"replayed\",reason=\"\"}} 2000"
                ),
                format!(
                    "webhook_inbox_deliveries_total{{source=\"{source}\",outcome=\"rejected\",reason=\"invalid_signature\"}} 2000"
                ),
                format!("webhook_inbox_answer_duration_seconds_count{{source=\"{source}\"}} 2000"),
            ] {
                assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
            }
        }
    }
}
