//! Operational webhooks (design.md, "Observability"): `[[alerts]]` endpoints are told when
//! a pair is dead-lettered, a handler keeps failing and recovers, work backs up, a source is
//! being refused, or the store becomes unavailable and recovers.
//!
//! Never in the way of ingest or dispatch: the service reports what happened with a
//! non-blocking call ([`Alerts::run_finished`], [`Alerts::rejected`]; a background watch
//! reads the queue depth and the store's health every second), each endpoint's own task
//! decides and sends. A full queue of unsent alerts drops the newest (a log line and
//! `alerts_total{result="dropped"}`); a dead endpoint costs a log line and
//! `alerts_total{result="failed"}` once its retries (exponential, 1 s to 1 min, six
//! attempts) ran out.
//!
//! Per (kind, subject) — the subject is a handler, a source, `queue` or `storage` — an
//! endpoint gets at most one alert per `min_interval`: the first at once, the ones within
//! the interval counted (`"count"`) into the next. Each alert has a `webhook-id` of its own
//! (kept across its retries, so a receiver deduplicates them) and, in the Standard Webhooks
//! format, is signed with the endpoint's secret like any sender's delivery.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{AlertConfig, AlertFormat, Config};
use crate::store::DeliveryStore;
use crate::verify::{SignatureScheme, StandardWebhooks};

/// Unsent alerts an endpoint may hold before new ones are dropped.
const QUEUE: usize = 1024;
/// Sending attempts per alert.
const ATTEMPTS: u32 = 6;

/// Labels of `alerts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    /// The alert kind.
    pub event: &'static str,
    /// `sent`, `failed` (retries ran out), `dropped` (too many unsent).
    pub result: &'static str,
}

/// Alerts by kind and result, registered by the metrics as `alerts_total`.
pub type AlertOutcomes = Family<AlertLabels, Counter>;

/// One thing worth telling.
#[derive(Debug, Clone)]
pub struct Alert {
    /// Its kind (one of [`crate::config::ALERT_EVENTS`]).
    pub event: &'static str,
    /// What it is about: a handler, a source, `queue`, `storage`.
    pub subject: String,
    /// A sentence for people.
    pub message: String,
    /// More, for programs (the delivery of a dead pair, counts, thresholds).
    pub data: serde_json::Value,
}

/// Why alerts cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// The secret's variable is unset, or its value is not a `whsec_` secret.
    #[error("alerts[{index}].secret_env: {why}")]
    Secret {
        /// Which `[[alerts]]`.
        index: usize,
        /// What is wrong (never the secret).
        why: String,
    },
}

/// How a run ended, as alerts see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// Succeeded.
    Succeeded,
    /// Failed, to be retried.
    Failed,
    /// Dead-lettered.
    Dead,
}

/// What one endpoint has seen, for its thresholds.
#[derive(Default)]
struct Watch {
    consecutive_failures: HashMap<String, u32>,
    failing: HashSet<String>,
    /// Source -> (minute, 401s in it, alerted in it).
    rejections: HashMap<String, (u64, u64, bool)>,
    backlog_since: Option<Instant>,
    backlog_alerted: bool,
    storage_down: bool,
}

struct Endpoint {
    config: AlertConfig,
    queue: mpsc::Sender<Alert>,
    watch: Mutex<Watch>,
}

/// The service's alert endpoints; cheap to call from the hot paths.
pub struct Alerts {
    endpoints: Vec<Endpoint>,
    outcomes: AlertOutcomes,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts")
            .field("endpoints", &self.endpoints.len())
            .finish()
    }
}

impl Alerts {
    /// No endpoint: every report is a no-op.
    pub fn none() -> Arc<Alerts> {
        Arc::new(Alerts {
            endpoints: Vec::new(),
            outcomes: AlertOutcomes::default(),
        })
    }

    /// The endpoints of `config`, each with its sending task (on the current runtime, until
    /// `cancel`); `env` reads the secrets' variables.
    pub fn start(
        config: &Config,
        env: &dyn Fn(&str) -> Option<String>,
        cancel: CancellationToken,
    ) -> Result<Arc<Alerts>, AlertError> {
        let outcomes = AlertOutcomes::default();
        for event in crate::config::ALERT_EVENTS {
            for result in ["sent", "failed", "dropped"] {
                let _ = outcomes.get_or_create(&AlertLabels { event, result });
            }
        }
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        let mut endpoints = Vec::new();
        for (index, alert) in config.alerts.iter().enumerate() {
            let signer = match (alert.format, &alert.secret_env) {
                (AlertFormat::StandardWebhooks, Some(var)) => {
                    let secret =
                        env(var)
                            .filter(|s| !s.is_empty())
                            .ok_or_else(|| AlertError::Secret {
                                index,
                                why: format!("the variable {var} is not set"),
                            })?;
                    Some(
                        StandardWebhooks::new(&[secret]).map_err(|e| AlertError::Secret {
                            index,
                            why: e.to_string(),
                        })?,
                    )
                }
                _ => None,
            };
            let (queue, receiver) = mpsc::channel(QUEUE);
            tokio::spawn(send_loop(Sender {
                config: alert.clone(),
                signer: signer.map(Arc::new),
                http: http.clone(),
                outcomes: outcomes.clone(),
                receiver,
                cancel: cancel.clone(),
            }));
            endpoints.push(Endpoint {
                config: alert.clone(),
                queue,
                watch: Mutex::default(),
            });
        }
        Ok(Arc::new(Alerts {
            endpoints,
            outcomes,
        }))
    }

    /// The count of alerts by kind and result (for `/metrics`).
    pub fn outcomes(&self) -> AlertOutcomes {
        self.outcomes.clone()
    }

    /// Whether any endpoint is configured.
    pub fn is_enabled(&self) -> bool {
        !self.endpoints.is_empty()
    }

    fn emit(&self, endpoint: &Endpoint, alert: Alert) {
        if !endpoint.config.events.iter().any(|e| e == alert.event) {
            return;
        }
        let event = alert.event;
        if endpoint.queue.try_send(alert).is_err() {
            tracing::warn!(event, "alert dropped: too many unsent alerts");
            self.outcomes
                .get_or_create(&AlertLabels {
                    event,
                    result: "dropped",
                })
                .inc();
        }
    }

    /// A run of `handler` on delivery `source`/`id` ended.
    pub fn run_finished(&self, handler: &str, source: &str, id: &str, end: RunEnd, error: &str) {
        for endpoint in &self.endpoints {
            let mut alerts = Vec::new();
            {
                let mut watch = endpoint.watch.lock().unwrap_or_else(|p| p.into_inner());
                match end {
                    RunEnd::Succeeded => {
                        watch.consecutive_failures.remove(handler);
                        if watch.failing.remove(handler) {
                            alerts.push(Alert {
                                event: "handler.recovered",
                                subject: handler.to_owned(),
                                message: format!("handler {handler} succeeded again"),
                                data: serde_json::json!({ "handler": handler }),
                            });
                        }
                    }
                    RunEnd::Failed | RunEnd::Dead => {
                        let n = watch
                            .consecutive_failures
                            .entry(handler.to_owned())
                            .or_default();
                        *n += 1;
                        let n = *n;
                        if n >= endpoint.config.failing_after
                            && watch.failing.insert(handler.to_owned())
                        {
                            alerts.push(Alert {
                                event: "handler.failing",
                                subject: handler.to_owned(),
                                message: format!(
                                    "handler {handler}: {n} consecutive failed runs (last: {})",
                                    crate::domain::printable(error)
                                ),
                                data: serde_json::json!({
                                    "handler": handler, "consecutive_failures": n,
                                    "last_error": error,
                                }),
                            });
                        }
                    }
                }
            }
            if end == RunEnd::Dead {
                alerts.push(Alert {
                    event: "delivery.dead",
                    subject: handler.to_owned(),
                    message: format!(
                        "{source}/{id} dead-lettered for handler {handler}: {}",
                        crate::domain::printable(error)
                    ),
                    data: serde_json::json!({
                        "handler": handler, "source": source, "delivery_id": id,
                        "error": error,
                    }),
                });
            }
            for alert in alerts {
                self.emit(endpoint, alert);
            }
        }
    }

    /// A request to `source` was refused 401 at `now_ms`.
    pub fn rejected(&self, source: &str, now_ms: u64) {
        let minute = now_ms / 60_000;
        for endpoint in &self.endpoints {
            let fire = {
                let mut watch = endpoint.watch.lock().unwrap_or_else(|p| p.into_inner());
                let entry = watch
                    .rejections
                    .entry(source.to_owned())
                    .or_insert((minute, 0, false));
                if entry.0 != minute {
                    *entry = (minute, 0, false);
                }
                entry.1 += 1;
                let fire = entry.1 > endpoint.config.rejections_over && !entry.2;
                entry.2 |= fire;
                fire.then_some(entry.1)
            };
            if let Some(count) = fire {
                self.emit(
                    endpoint,
                    Alert {
                        event: "source.rejections",
                        subject: source.to_owned(),
                        message: format!(
                            "source {source}: over {} requests refused 401 within a minute (a rotated secret, or someone probing)",
                            endpoint.config.rejections_over
                        ),
                        data: serde_json::json!({
                            "source": source, "refused": count,
                            "rejections_over": endpoint.config.rejections_over,
                        }),
                    },
                );
            }
        }
    }

    /// One look at the queue's depth and the store's health (the watch does this every
    /// second).
    pub fn observe(&self, queued: Option<u64>, healthy: bool, now: Instant) {
        for endpoint in &self.endpoints {
            let mut alerts = Vec::new();
            {
                let mut watch = endpoint.watch.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(queued) = queued {
                    if queued > endpoint.config.backlog_over {
                        let since = *watch.backlog_since.get_or_insert(now);
                        if now.duration_since(since) >= endpoint.config.backlog_for
                            && !watch.backlog_alerted
                        {
                            watch.backlog_alerted = true;
                            alerts.push(Alert {
                                event: "queue.backlog",
                                subject: "queue".into(),
                                message: format!(
                                    "{queued} pairs queued, over {} for {}",
                                    endpoint.config.backlog_over,
                                    humantime::format_duration(endpoint.config.backlog_for)
                                ),
                                data: serde_json::json!({
                                    "queued": queued,
                                    "backlog_over": endpoint.config.backlog_over,
                                }),
                            });
                        }
                    } else {
                        watch.backlog_since = None;
                        watch.backlog_alerted = false;
                    }
                }
                if healthy == watch.storage_down {
                    watch.storage_down = !healthy;
                    alerts.push(if healthy {
                        Alert {
                            event: "storage.recovered",
                            subject: "storage".into(),
                            message: "the store accepts writes again".into(),
                            data: serde_json::json!({}),
                        }
                    } else {
                        Alert {
                            event: "storage.unavailable",
                            subject: "storage".into(),
                            message: "the store refuses writes: deliveries are answered 503".into(),
                            data: serde_json::json!({}),
                        }
                    });
                }
            }
            for alert in alerts {
                self.emit(endpoint, alert);
            }
        }
    }

    /// Looks at the queue and the store every second until `cancel`.
    pub async fn watch(self: Arc<Self>, store: Arc<dyn DeliveryStore>, cancel: CancellationToken) {
        if !self.is_enabled() {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = cancel.cancelled() => return,
            }
            let queued = store
                .queue_depths()
                .await
                .ok()
                .map(|d| d.iter().map(|(_, n)| *n as u64).sum());
            let healthy = store.is_healthy().await;
            self.observe(queued, healthy, Instant::now());
        }
    }
}

/// One endpoint's sending side.
struct Sender {
    config: AlertConfig,
    signer: Option<Arc<StandardWebhooks>>,
    http: reqwest::Client,
    outcomes: AlertOutcomes,
    receiver: mpsc::Receiver<Alert>,
    cancel: CancellationToken,
}

/// What an endpoint holds back per (kind, subject): the first alert goes at once, the ones
/// within `min_interval` of the last one sent are counted into the next.
struct Coalescer {
    min_interval: Duration,
    slots: HashMap<(&'static str, String), Slot>,
}

struct Slot {
    last_sent: Instant,
    pending: u32,
    latest: Option<Alert>,
}

impl Coalescer {
    fn new(min_interval: Duration) -> Coalescer {
        Coalescer {
            min_interval,
            slots: HashMap::new(),
        }
    }

    /// `alert` arrived at `now`: what to send now (with its count), if anything.
    fn offer(&mut self, alert: Alert, now: Instant) -> Option<(Alert, u32)> {
        let key = (alert.event, alert.subject.clone());
        match self.slots.get_mut(&key) {
            Some(slot) if now.duration_since(slot.last_sent) < self.min_interval => {
                slot.pending += 1;
                slot.latest = Some(alert);
                None
            }
            _ => {
                self.slots.insert(
                    key,
                    Slot {
                        last_sent: now,
                        pending: 0,
                        latest: None,
                    },
                );
                Some((alert, 1))
            }
        }
    }

    /// What held back is due at `now`, each with how many it stands for.
    fn due(&mut self, now: Instant) -> Vec<(Alert, u32)> {
        let mut out = Vec::new();
        for slot in self.slots.values_mut() {
            if slot.pending > 0
                && now.duration_since(slot.last_sent) >= self.min_interval
                && let Some(alert) = slot.latest.take()
            {
                out.push((alert, slot.pending));
                slot.pending = 0;
                slot.last_sent = now;
            }
        }
        let min_interval = self.min_interval;
        self.slots.retain(|_, slot| {
            slot.pending > 0 || now.duration_since(slot.last_sent) < min_interval
        });
        out
    }
}

async fn send_loop(mut s: Sender) {
    let mut coalescer = Coalescer::new(s.config.min_interval);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            received = s.receiver.recv() => {
                let Some(alert) = received else { return };
                if let Some((alert, count)) = coalescer.offer(alert, Instant::now()) {
                    spawn_send(&s, alert, count);
                }
            }
            _ = tick.tick() => {
                for (alert, count) in coalescer.due(Instant::now()) {
                    spawn_send(&s, alert, count);
                }
            }
            () = s.cancel.cancelled() => return,
        }
    }
}

/// The alert as this endpoint's format writes it: (headers, body).
fn render(
    format: AlertFormat,
    signer: Option<&StandardWebhooks>,
    alert: &Alert,
    count: u32,
    id: &str,
    now: SystemTime,
) -> (Vec<(String, String)>, Vec<u8>) {
    let at = crate::clock::rfc3339_ms(crate::clock::to_ms(now));
    let body = match format {
        AlertFormat::StandardWebhooks => serde_json::json!({
            "type": alert.event,
            "timestamp": at,
            "data": {
                "subject": alert.subject,
                "message": alert.message,
                "count": count,
                "details": alert.data,
            },
        }),
        AlertFormat::Slack => {
            let times = if count > 1 {
                format!(" ({count} times)")
            } else {
                String::new()
            };
            serde_json::json!({
                "text": format!("webhook-inbox · {}{times}: {}", alert.event, alert.message),
            })
        }
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
    if let Some(signer) = signer {
        headers.extend(signer.sign(id, &body, now));
    }
    (headers, body)
}

fn spawn_send(s: &Sender, alert: Alert, count: u32) {
    let id = format!("alert_{}", hex::encode(rand::random::<[u8; 12]>()));
    let http = s.http.clone();
    let url = s.config.url.clone();
    let format = s.config.format;
    let signer = s.signer.clone();
    let outcomes = s.outcomes.clone();
    let cancel = s.cancel.clone();
    tokio::spawn(async move {
        let mut delay = Duration::from_secs(1);
        let mut last_error = String::new();
        for attempt in 1..=ATTEMPTS {
            // Signed afresh each attempt (a receiver's timestamp tolerance), same id.
            let (headers, body) = render(
                format,
                signer.as_deref(),
                &alert,
                count,
                &id,
                SystemTime::now(),
            );
            let mut request = http.post(&url).body(body);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            match request.send().await {
                Ok(r) if r.status().is_success() => {
                    outcomes
                        .get_or_create(&AlertLabels {
                            event: alert.event,
                            result: "sent",
                        })
                        .inc();
                    tracing::info!(event = alert.event, subject = %alert.subject, count, "alert sent");
                    return;
                }
                Ok(r) => last_error = format!("answered {}", r.status().as_u16()),
                Err(e) => {
                    last_error = if e.is_timeout() {
                        "timed out".into()
                    } else {
                        "no connection".into()
                    }
                }
            }
            if attempt < ATTEMPTS {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => break,
                }
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
        outcomes
            .get_or_create(&AlertLabels {
                event: alert.event,
                result: "failed",
            })
            .inc();
        let shown = reqwest::Url::parse(&url)
            .map(|u| {
                format!(
                    "{}://{}{}",
                    u.scheme(),
                    u.host_str().unwrap_or(""),
                    u.path()
                )
            })
            .unwrap_or_default();
        tracing::warn!(event = alert.event, subject = %alert.subject, endpoint = %shown, error = %last_error, "alert not delivered");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(events: &[&str]) -> Config {
        let events: Vec<String> = events.iter().map(|e| format!("\"{e}\"")).collect();
        Config::parse(
            &format!(
                "[[alerts]]\nurl = \"http://127.0.0.1:9/hooks\"\nformat = \"slack\"\nevents = [{}]\nfailing_after = 2\nrejections_over = 2\nbacklog_over = 10\nbacklog_for = \"1m\"\n",
                events.join(", ")
            ),
            "t.toml",
        )
        .expect("config")
    }

    fn alerts_without_sender(config: &Config) -> (Arc<Alerts>, mpsc::Receiver<Alert>) {
        let (queue, receiver) = mpsc::channel(QUEUE);
        let alerts = Arc::new(Alerts {
            endpoints: vec![Endpoint {
                config: config.alerts[0].clone(),
                queue,
                watch: Mutex::default(),
            }],
            outcomes: AlertOutcomes::default(),
        });
        (alerts, receiver)
    }

    fn drain(receiver: &mut mpsc::Receiver<Alert>) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        while let Ok(a) = receiver.try_recv() {
            out.push((a.event, a.subject));
        }
        out
    }

    #[test]
    fn failing_after_consecutive_failures_then_recovered_and_dead_letters() {
        let config = config(&crate::config::ALERT_EVENTS);
        let (alerts, mut rx) = alerts_without_sender(&config);
        alerts.run_finished("h", "s", "1", RunEnd::Failed, "e");
        assert!(drain(&mut rx).is_empty(), "one failure is not failing");
        alerts.run_finished("h", "s", "1", RunEnd::Dead, "e");
        assert_eq!(
            drain(&mut rx),
            [
                ("handler.failing", "h".into()),
                ("delivery.dead", "h".into())
            ]
        );
        alerts.run_finished("h", "s", "2", RunEnd::Failed, "e");
        assert!(
            drain(&mut rx).is_empty(),
            "told once while it keeps failing"
        );
        alerts.run_finished("h", "s", "3", RunEnd::Succeeded, "");
        assert_eq!(drain(&mut rx), [("handler.recovered", "h".into())]);
        alerts.run_finished("h", "s", "4", RunEnd::Succeeded, "");
        assert!(drain(&mut rx).is_empty());
    }

    #[test]
    fn rejections_over_the_threshold_within_a_minute_alert_once_per_minute() {
        let config = config(&["source.rejections"]);
        let (alerts, mut rx) = alerts_without_sender(&config);
        for _ in 0..2 {
            alerts.rejected("credicorp", 60_000);
        }
        assert!(drain(&mut rx).is_empty(), "2 is not over 2");
        alerts.rejected("credicorp", 60_001);
        alerts.rejected("credicorp", 60_002);
        assert_eq!(drain(&mut rx), [("source.rejections", "credicorp".into())]);
        for _ in 0..3 {
            alerts.rejected("credicorp", 120_000);
        }
        assert_eq!(
            drain(&mut rx),
            [("source.rejections", "credicorp".into())],
            "a new minute"
        );
    }

    #[test]
    fn a_backlog_that_lasts_and_storage_edges_alert_once_each() {
        let config = config(&crate::config::ALERT_EVENTS);
        let (alerts, mut rx) = alerts_without_sender(&config);
        let t0 = Instant::now();
        alerts.observe(Some(11), true, t0);
        alerts.observe(Some(11), true, t0 + Duration::from_secs(30));
        assert!(drain(&mut rx).is_empty(), "not for long enough yet");
        alerts.observe(Some(11), true, t0 + Duration::from_secs(61));
        alerts.observe(Some(12), true, t0 + Duration::from_secs(62));
        assert_eq!(drain(&mut rx), [("queue.backlog", "queue".into())]);
        alerts.observe(Some(3), false, t0 + Duration::from_secs(63));
        alerts.observe(Some(3), false, t0 + Duration::from_secs(64));
        alerts.observe(Some(3), true, t0 + Duration::from_secs(65));
        assert_eq!(
            drain(&mut rx),
            [
                ("storage.unavailable", "storage".into()),
                ("storage.recovered", "storage".into())
            ]
        );
    }

    #[test]
    fn alerts_within_min_interval_are_counted_into_the_next() {
        let alert = |subject: &str, message: &str| Alert {
            event: "delivery.dead",
            subject: subject.into(),
            message: message.into(),
            data: serde_json::json!({}),
        };
        let mut c = Coalescer::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let sent = c.offer(alert("h", "1"), t0).expect("the first at once");
        assert_eq!((sent.0.message.as_str(), sent.1), ("1", 1));
        assert!(
            c.offer(alert("h", "2"), t0 + Duration::from_secs(1))
                .is_none()
        );
        assert!(
            c.offer(alert("h", "3"), t0 + Duration::from_secs(2))
                .is_none()
        );
        let other = c.offer(alert("other", "x"), t0 + Duration::from_secs(2));
        assert!(other.is_some(), "another subject is not held back");
        assert!(c.due(t0 + Duration::from_secs(59)).is_empty());
        let due = c.due(t0 + Duration::from_secs(60));
        assert_eq!(due.len(), 1);
        assert_eq!(
            (due[0].0.message.as_str(), due[0].1),
            ("3", 2),
            "the latest, counting both"
        );
        assert!(
            c.offer(alert("h", "4"), t0 + Duration::from_secs(61))
                .is_none(),
            "interval from the last sent"
        );
        assert_eq!(c.due(t0 + Duration::from_secs(120))[0].1, 1);
        assert!(
            c.offer(alert("h", "5"), t0 + Duration::from_secs(200))
                .is_some()
        );
    }

    #[test]
    fn an_endpoint_gets_only_the_kinds_it_names() {
        let config = config(&["delivery.dead"]);
        let (alerts, mut rx) = alerts_without_sender(&config);
        alerts.run_finished("h", "s", "1", RunEnd::Dead, "e");
        alerts.run_finished("h", "s", "2", RunEnd::Dead, "e");
        alerts.run_finished("h", "s", "3", RunEnd::Succeeded, "");
        assert_eq!(
            drain(&mut rx),
            [("delivery.dead", "h".into()), ("delivery.dead", "h".into())]
        );
    }

    #[test]
    fn slack_alerts_are_one_text_and_standard_webhooks_alerts_are_signed_events() {
        let alert = Alert {
            event: "handler.failing",
            subject: "h".into(),
            message: "handler h: 5 consecutive failed runs".into(),
            data: serde_json::json!({}),
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let (headers, body) = render(AlertFormat::Slack, None, &alert, 3, "alert_1", now);
        assert_eq!(headers.len(), 1);
        let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            body["text"],
            "webhook-inbox · handler.failing (3 times): handler h: 5 consecutive failed runs"
        );
        let signer = StandardWebhooks::new(&["whsec_dGVzdA==".to_owned()]).expect("secret");
        let (headers, body) = render(
            AlertFormat::StandardWebhooks,
            Some(&signer),
            &alert,
            1,
            "alert_1",
            now,
        );
        let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(body["type"], "handler.failing");
        assert_eq!(body["data"]["count"], 1);
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == "webhook-id" && v == "alert_1")
        );
        assert!(headers.iter().any(|(k, _)| k == "webhook-signature"));
    }
}
