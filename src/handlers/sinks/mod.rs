//! Sinks (design.md, "Sinks"): handlers that put each verified, deduplicated delivery on a
//! broker — `nats` (JetStream) and `redis` (a stream).
//!
//! Shared here: the name [`Template`]s (`{source}`, `{event_type}`, `{handler}`, checked at
//! start; a value's dots stay dots, its wildcards `*` `>` `#` and whitespace become `_`),
//! the metadata every message carries ([`Metadata`]: `webhook-source`, `webhook-id`,
//! `webhook-event-type`, `webhook-received-at`, `idempotency-key`), and the URL handling
//! (`url` or `url_env`; the URL may hold credentials and is only ever shown redacted).
//!
//! A run succeeds only once the broker has taken the message durably (the JetStream
//! publish acknowledgement; the `XADD` reply). A rerun of the pair publishes no duplicate
//! where the broker can tell: NATS drops a message whose `Nats-Msg-Id` (the pair's key) it
//! saw within the stream's duplicate window; Redis runs `XADD` in a script that first
//! remembers the key for `storage.retention`. A broker that is down fails the run
//! retryably with a message that says so; connections are made on first use, shared per
//! URL within a handler, and made again after a failure.

pub mod nats;
pub mod redis;

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
        /// The key (`subject`, `stream`).
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
            "webhooks.credicorp.a.___b_c"
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
