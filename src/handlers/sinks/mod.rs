//! Sinks (design.md, "Sinks"): handlers that put each verified, deduplicated delivery on a
//! broker — `nats` (JetStream), `amqp` (RabbitMQ) and `redis` (a stream).
//!
//! Shared here: the name [`Template`]s (`{source}`, `{event_type}`, `{handler}`, checked at
//! start; a value's dots stay dots, its wildcards `*` `>` `#` and whitespace become `_`),
//! the metadata every message carries ([`Metadata`]: `webhook-source`, `webhook-id`,
//! `webhook-event-type`, `webhook-received-at`, `idempotency-key`), and the URL handling
//! (`url` or `url_env`; the URL may hold credentials and is only ever shown redacted).
//!
//! With traces exported, each message carries the `traceparent` of its `publish` span (a
//! header; a field of the Redis entry).
//!
//! A run succeeds only once the broker has taken the message durably (the JetStream
//! publish acknowledgement; a RabbitMQ publisher confirm of a `mandatory` message that was
//! routed; the `XADD` reply). A rerun of the pair publishes no duplicate where the broker
//! can tell: NATS drops a message whose `Nats-Msg-Id` (the pair's key) it saw within the
//! stream's duplicate window; Redis runs `XADD` in a script that first remembers the key
//! for `storage.retention`; RabbitMQ cannot tell, and its consumers drop a second copy by
//! `message_id` (the key). A broker that is down fails the run retryably with a message
//! that says so; connections are made on first use, shared per URL by every sink of the
//! service ([`SinkConnections`]), and made again after a failure — readiness never depends
//! on a broker.

pub mod amqp;
pub mod nats;
pub mod redis;

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::Delivery;

/// A subject, stream or routing-key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Source,
    EventType,
    Handler,
}

impl Template {
    /// Parses `text`; the error names what is wrong (an unknown placeholder, a lone brace).
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find(['{', '}']) {
            if rest[open..].starts_with('}') {
                return Err(format!("`{text}`: a `}}` without its `{{`"));
            }
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("`{text}`: a `{{` without its `}}`"));
            };
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "source" => Part::Source,
                "event_type" => Part::EventType,
                "handler" => Part::Handler,
                other => {
                    return Err(format!(
                        "`{text}`: unknown placeholder `{{{other}}}` (use {{source}}, {{event_type}}, {{handler}})"
                    ));
                }
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err("an empty name".into());
        }
        Ok(Template(parts))
    }

    /// The name for `delivery` run by `handler`.
    pub fn render(&self, delivery: &Delivery, handler: &str) -> String {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Source => out.push_str(&name_value(&delivery.source)),
                Part::EventType => {
                    out.push_str(&name_value(delivery.event_type.as_deref().unwrap_or("")))
                }
                Part::Handler => out.push_str(&name_value(handler)),
            }
        }
        out
    }
}

/// A value as part of a name: dots stay (so consumers can subscribe to
/// `webhooks.credicorp.application.*`), wildcards and whitespace become `_`; empty is `_`.
fn name_value(value: &str) -> String {
    if value.is_empty() {
        return "_".into();
    }
    value
        .chars()
        .map(|c| {
            if matches!(c, '*' | '>' | '#') || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// What travels beside the body: header names and values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata(pub Vec<(&'static str, String)>);

impl Metadata {
    /// The metadata of `delivery` run with the pair's `key`.
    pub fn of(delivery: &Delivery, key: &str) -> Metadata {
        let received_ms = delivery
            .received_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis() as u64;
        Metadata(vec![
            ("webhook-source", delivery.source.clone()),
            ("webhook-id", delivery.id.clone()),
            (
                "webhook-event-type",
                delivery.event_type.clone().unwrap_or_default(),
            ),
            ("webhook-received-at", crate::clock::rfc3339_ms(received_ms)),
            ("idempotency-key", key.to_owned()),
        ])
    }
}

/// Why a sink cannot be built. Never shows a URL's credentials.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Neither `url` nor `url_env`, or both.
    #[error("set one of `url` and `url_env`")]
    NoUrl,
    /// `url_env` names a variable that is not set.
    #[error("url_env: the variable {0} is not set")]
    UnsetUrl(String),
    /// The URL does not parse, or has the wrong scheme.
    #[error("url: {0}")]
    BadUrl(String),
    /// A template is wrong.
    #[error("{key}: {why}")]
    Template {
        /// The key (`subject`, `stream`, `routing_key`).
        key: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// The URL of a sink: `url`, or the value of `url_env` (read at start).
pub fn resolve_url(url: Option<&str>, url_env: Option<&str>) -> Result<String, SinkError> {
    match (url, url_env) {
        (Some(url), None) => Ok(url.to_owned()),
        (None, Some(var)) => std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| SinkError::UnsetUrl(var.to_owned())),
        _ => Err(SinkError::NoUrl),
    }
}

/// Labels of `sink_publishes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct PublishLabels {
    /// The sink (handler) name.
    pub handler: String,
    /// `nats`, `amqp` or `redis`.
    pub broker: &'static str,
    /// `published` (the broker took it), `duplicate` (the broker already held it: NATS's
    /// duplicate window, Redis's remembered key) or `failed`.
    pub result: &'static str,
}

/// Messages published by the sinks of this process, by handler, broker and result; the
/// metrics register it as `sink_publishes_total`.
pub type PublishCounts = prometheus_client::metrics::family::Family<
    PublishLabels,
    prometheus_client::metrics::counter::Counter,
>;

/// The process's publish counts (one family, whatever registry built the sinks).
pub fn publish_counts() -> &'static PublishCounts {
    static COUNTS: std::sync::OnceLock<PublishCounts> = std::sync::OnceLock::new();
    COUNTS.get_or_init(PublishCounts::default)
}

/// Counts one publish of sink `handler`.
pub(crate) fn count_publish(handler: &str, broker: &'static str, result: &'static str) {
    publish_counts()
        .get_or_create(&PublishLabels {
            handler: handler.to_owned(),
            broker,
            result,
        })
        .inc();
}

/// The `publish` span of one message (`otel.name`), whose `traceparent` the message
/// carries when traces are exported.
pub fn publish_span(broker: &'static str, destination: &str) -> tracing::Span {
    tracing::info_span!("publish", otel.name = "publish", broker, destination = %destination)
}

/// The broker connections of one service, one per (kind, URL), shared by every sink that
/// names that URL.
#[derive(Default)]
pub struct SinkConnections {
    slots: std::sync::Mutex<HashMap<(&'static str, String), AnySlot>>,
}

/// A [`Slot`]'s shared state, its connection type erased.
type AnySlot = Arc<dyn Any + Send + Sync>;

impl std::fmt::Debug for SinkConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkConnections").finish_non_exhaustive()
    }
}

impl SinkConnections {
    /// The slot of the `kind` connection to `url` (the same slot for every caller).
    pub fn slot<T: Clone + Send + 'static>(&self, kind: &'static str, url: &str) -> Slot<T> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let any = slots
            .entry((kind, url.to_owned()))
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(None::<T>)))
            .clone();
        match any.downcast::<tokio::sync::Mutex<Option<T>>>() {
            Ok(slot) => Slot(slot),
            // A kind names one connection type; a mismatch is a bug here, not a user error,
            // and an unshared slot still works.
            Err(_) => Slot(Arc::new(tokio::sync::Mutex::new(None))),
        }
    }
}

/// One shared connection: made on first use, and again once it is no longer live.
pub struct Slot<T>(Arc<tokio::sync::Mutex<Option<T>>>);

impl<T: Clone> Slot<T> {
    /// The connection, if it is `live`; otherwise a new one from `connect` (at most one
    /// caller connects at a time, the others then share what it made).
    pub async fn get<F>(&self, live: impl Fn(&T) -> bool, connect: F) -> Result<T, String>
    where
        F: Future<Output = Result<T, String>>,
    {
        let mut held = self.0.lock().await;
        if let Some(c) = held.as_ref().filter(|c| live(c)) {
            return Ok(c.clone());
        }
        let c = connect.await?;
        *held = Some(c.clone());
        Ok(c)
    }
}

/// `message` with the password of `url` (if any, and if it somehow appears) blanked: a
/// client library's error text is not trusted to leave it out.
pub fn scrub(message: &str, url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let mut out = message.to_owned();
            for secret in [u.password().unwrap_or(""), u.username()] {
                if secret.len() >= 3 {
                    out = out.replace(secret, "***");
                }
            }
            out
        }
        Err(_) => message.to_owned(),
    }
}

/// `url` without user, password or query, for messages.
pub fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(parsed) => crate::calls::redact(&parsed),
        Err(_) => "(an unparsable URL)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(event_type: Option<&str>) -> Delivery {
        Delivery {
            source: "credicorp".into(),
            id: "msg_1".into(),
            event_type: event_type.map(str::to_owned),
            received_at: UNIX_EPOCH + Duration::from_millis(1_800_000_000_123),
            attempt: 1,
            headers: Default::default(),
            body: bytes::Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn templates_render_names_keeping_dots_and_replacing_wildcards() {
        let t = Template::parse("webhooks.{source}.{event_type}").expect("template");
        assert_eq!(
            t.render(&delivery(Some("application.created")), "h"),
            "webhooks.credicorp.application.created"
        );
        assert_eq!(
            t.render(&delivery(Some("a.* >#b c")), "h"),
            "webhooks.credicorp.a.____b_c"
        );
        assert_eq!(t.render(&delivery(None), "h"), "webhooks.credicorp._");
        let h = Template::parse("{handler}:{source}").expect("template");
        assert_eq!(h.render(&delivery(None), "to-redis"), "to-redis:credicorp");
    }

    #[test]
    fn a_bad_template_says_what_is_wrong() {
        for (text, says) in [
            ("webhooks.{sourc}", "unknown placeholder `{sourc}`"),
            ("webhooks.{source", "without its `}`"),
            ("webhooks}.x", "without its `{`"),
            ("", "empty"),
        ] {
            let e = Template::parse(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn scrub_blanks_credentials_a_library_might_echo() {
        let url = "amqp://webhooks:s3cr3t@broker:5672/prod";
        let m = scrub("cannot log in as webhooks with s3cr3t", url);
        assert_eq!(m, "cannot log in as *** with ***");
        assert_eq!(scrub("refused", "nats://127.0.0.1:4222"), "refused");
    }

    #[tokio::test]
    async fn a_slot_is_shared_per_kind_and_url_and_reconnects_when_not_live() {
        let connections = SinkConnections::default();
        let a: Slot<u32> = connections.slot("test", "u1");
        let b: Slot<u32> = connections.slot("test", "u1");
        let other: Slot<u32> = connections.slot("test", "u2");
        assert_eq!(a.get(|_| true, async { Ok(1) }).await, Ok(1));
        assert_eq!(b.get(|_| true, async { Ok(2) }).await, Ok(1), "shared");
        assert_eq!(other.get(|_| true, async { Ok(3) }).await, Ok(3));
        assert_eq!(b.get(|c| *c != 1, async { Ok(4) }).await, Ok(4), "remade");
        assert_eq!(a.get(|_| true, async { Ok(5) }).await, Ok(4));
        let failed: Slot<u32> = connections.slot("test", "u3");
        assert!(
            failed
                .get(|_| true, async { Err("down".into()) })
                .await
                .is_err()
        );
        assert_eq!(failed.get(|_| true, async { Ok(6) }).await, Ok(6));
    }

    #[test]
    fn metadata_names_the_delivery_and_its_key() {
        let m = Metadata::of(&delivery(Some("x.y")), "k");
        assert_eq!(
            m.0,
            vec![
                ("webhook-source", "credicorp".to_owned()),
                ("webhook-id", "msg_1".to_owned()),
                ("webhook-event-type", "x.y".to_owned()),
                ("webhook-received-at", "2027-01-15T08:00:00.123Z".to_owned()),
                ("idempotency-key", "k".to_owned()),
            ]
        );
    }
}
