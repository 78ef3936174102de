//! Handlers: what runs once per delivery.
//!
//! A [`Handler`] is a tiny async trait (`handle(delivery, ctx)`), dyn-compatible so the
//! built-ins and a user's own Rust plugins sit in one [`HandlerRegistry`]. The registry is
//! built once at start-up, so a bad handler config fails before the first request. It routes
//! by source and by event-type pattern (`*`, `prefix.*`, exact).
//!
//! Every run gets a [`HandlerContext`] with the deterministic idempotency key of its
//! (source, delivery, handler): the same on every retry and after a crash, so work done
//! downstream with that key cannot happen twice.

mod command;
mod http;
mod log;
pub mod sinks;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

pub use command::CommandHandler;
pub use http::HttpHandler;
pub use log::LogHandler;

use crate::calls::{CallBuilder, CallError, Calls};
use crate::config::{Binding, Config, HandlerConfig};
use crate::domain::Headers;

/// A delivery as a handler sees it: authenticated, recorded, and the same on every attempt
/// except `attempt`.
///
/// ```
/// let d = webhook_inbox::testing::delivery(
///     "credicorp", "msg_1", Some("application.created"),
///     r#"{"type":"application.created","data":{"application_id":"app_1"}}"#,
/// );
/// assert_eq!(d.attempt, 1);
/// let json = d.json().expect("a JSON body");
/// assert_eq!(json["data"]["application_id"], "app_1");
/// assert_eq!(d.headers.get("Content-Type"), Some("application/json"));
/// ```
///
/// `#[non_exhaustive]`: a plugin reads these fields, and gets one from
/// [`crate::testing::delivery`] in its tests, so that later fields (trace context, sink
/// metadata) do not break it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Delivery {
    /// Source name.
    pub source: String,
    /// Delivery id.
    pub id: String,
    /// Event type, when the delivery names one.
    pub event_type: Option<String>,
    /// When the first copy arrived.
    pub received_at: SystemTime,
    /// Attempt number of this run, from 1.
    pub attempt: u32,
    /// Request headers of the first copy.
    pub headers: Headers,
    /// The raw body, byte for byte as the sender signed it.
    pub body: Bytes,
}

impl Delivery {
    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// What a run is given besides the delivery.
///
/// ```
/// let d = webhook_inbox::testing::delivery("credicorp", "msg_1", None, "{}");
/// let ctx = webhook_inbox::testing::context("open-case", &d);
/// // Deterministic: the same (source, delivery, handler) always gets the same key.
/// assert_eq!(ctx.idempotency_key, webhook_inbox::testing::context("open-case", &d).idempotency_key);
/// assert_ne!(ctx.idempotency_key, webhook_inbox::testing::context("notify", &d).idempotency_key);
/// assert_eq!(ctx.idempotency_key.len(), 64);
/// assert!(!ctx.shutdown.is_cancelled());
/// ```
///
/// `#[non_exhaustive]` for the same reason as [`Delivery`]: plugins make one with
/// [`crate::testing::context`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HandlerContext {
    /// Deterministic per (source, delivery, handler), at most 64 characters: send it as
    /// `Idempotency-Key` to anything you call.
    pub idempotency_key: String,
    /// Cancelled when the service shuts down and the grace period is over; long work should
    /// stop (and fail retryably) when it fires.
    pub shutdown: CancellationToken,
    /// The downstream client of this run: one named step per logical operation, each with
    /// its own key, retried, and answered from the journal on a later run (see
    /// [`crate::calls`]).
    pub calls: Calls,
}

impl HandlerContext {
    /// Starts step `step` of this run's downstream calls:
    /// `ctx.call("create-payment-link").post(url).json(&body).send().await?`.
    pub fn call(&self, step: &str) -> CallBuilder<'_> {
        self.calls.step(step)
    }
}

/// A call that gave no answer fails the run: for good where the contract says so (a bad
/// step name or request, a 422, a step that changed), retryably otherwise.
impl From<CallError> for HandlerError {
    fn from(e: CallError) -> HandlerError {
        if e.is_permanent() {
            HandlerError::Permanent(e.to_string())
        } else {
            HandlerError::Retryable(e.to_string())
        }
    }
}

/// How a run failed: [`HandlerError::Retryable`] is run again after a back-off (up to
/// `dispatch.max_attempts`), [`HandlerError::Permanent`] is dead-lettered at once.
///
/// ```
/// use webhook_inbox::HandlerError;
///
/// fn classify(status: u16) -> Result<(), HandlerError> {
///     match status {
///         200..=299 => Ok(()),
///         400 | 422 => Err(HandlerError::Permanent(format!("downstream refused: {status}"))),
///         _ => Err(HandlerError::Retryable(format!("downstream answered {status}"))),
///     }
/// }
/// assert!(matches!(classify(503), Err(HandlerError::Retryable(_))));
/// assert!(matches!(classify(422), Err(HandlerError::Permanent(_))));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Worth another try later (timeouts, 5xx, a crash of the program).
    #[error("retryable: {0}")]
    Retryable(String),
    /// Will never succeed (a 4xx, a rejected payload): dead-letter it now.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// A handler: runs once per matching delivery until it succeeds.
///
/// Implement it with [`macro@crate::async_trait`] and register it with
/// [`Registration`] on [`crate::ApplicationBuilder`]. The trait is dyn-compatible: the
/// service keeps every handler as `Arc<dyn Handler>`.
///
/// ```
/// use webhook_inbox::{Delivery, Handler, HandlerContext, HandlerError};
///
/// /// Forwards `application.created` to a case system, keyed for idempotency.
/// struct OpenCase;
///
/// #[webhook_inbox::async_trait]
/// impl Handler for OpenCase {
///     async fn handle(&self, d: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError> {
///         let json = d.json().ok_or_else(|| HandlerError::Permanent("not JSON".into()))?;
///         let _application = json["data"]["application_id"].as_str().unwrap_or_default();
///         // Call the case API with `Idempotency-Key: ctx.idempotency_key` here; a retry of
///         // this delivery sends the same key, so the API can deduplicate it.
///         let _key = &ctx.idempotency_key;
///         Ok(())
///     }
/// }
///
/// let _: std::sync::Arc<dyn Handler> = std::sync::Arc::new(OpenCase);
/// ```
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Processes one delivery. Called again (with a higher `attempt`, the same key) after a
    /// retryable error or a crash mid-run, so make the effect idempotent on
    /// `ctx.idempotency_key`.
    async fn handle(&self, delivery: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError>;
}

pub use crate::domain::{BodyMatch, EventPattern};

/// A handler with its name and binding.
///
/// ```
/// use webhook_inbox::{Registration, handlers::LogHandler};
///
/// let r = Registration::new("audit", LogHandler)
///     .source("credicorp")
///     .events(["application.*", "payment_link.paid"]);
/// assert_eq!(r.name, "audit");
/// assert_eq!(r.source.as_deref(), Some("credicorp"));
/// ```
#[derive(Clone)]
pub struct Registration {
    /// Unique name; part of the idempotency key, so renaming a handler re-runs it.
    pub name: String,
    /// Bound source, or `None` for all.
    pub source: Option<String>,
    /// Event-type patterns; any may match.
    pub events: Vec<EventPattern>,
    /// Values the body must hold (`match`); empty matches every delivery.
    pub body_match: BodyMatch,
    /// How hard the dispatcher may drive it (`concurrency`, `rate`).
    pub limits: HandlerLimits,
    /// `order_by`: a JSON pointer; runs for deliveries with the same value there never
    /// overlap and start in received order.
    pub order_by: Option<String>,
    /// The handler.
    pub handler: Arc<dyn Handler>,
}

/// Where one delivery goes: the handlers bound to it, and for each ordered one the value
/// its runs are ordered by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    /// The handlers bound to the delivery, in configuration order.
    pub handlers: Vec<String>,
    /// Handler -> the value at its `order_by` pointer, for the handlers that have one and
    /// whose pointer the body holds.
    pub order_keys: std::collections::BTreeMap<String, String>,
}

/// A handler's own limits, on top of `dispatch.concurrency`; a pair over a limit is only
/// delayed, never dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandlerLimits {
    /// At most this many runs at once.
    pub concurrency: Option<usize>,
    /// At most this many run starts per period.
    pub rate: Option<crate::domain::Rate>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("name", &self.name)
            .field("source", &self.source)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl Registration {
    /// A handler for every source and event; narrow it with [`Registration::source`],
    /// [`Registration::events`] and [`Registration::matching_body`].
    pub fn new(name: impl Into<String>, handler: impl Handler) -> Registration {
        Registration {
            name: name.into(),
            source: None,
            events: vec![EventPattern::Any],
            body_match: BodyMatch::default(),
            limits: HandlerLimits::default(),
            order_by: None,
            handler: Arc::new(handler),
        }
    }

    /// Runs for deliveries with the same value at the JSON pointer `pointer` one at a
    /// time, in received order, as a handler's `order_by` in the config.
    pub fn ordered_by(mut self, pointer: impl Into<String>) -> Registration {
        self.order_by = Some(pointer.into());
        self
    }

    /// At most `runs` runs of this handler at once (at least 1).
    pub fn concurrency(mut self, runs: usize) -> Registration {
        self.limits.concurrency = Some(runs.max(1));
        self
    }

    /// At most `rate` run starts per period.
    pub fn rate(mut self, rate: crate::domain::Rate) -> Registration {
        self.limits.rate = Some(rate);
        self
    }

    /// Binds to one source.
    pub fn source(mut self, source: impl Into<String>) -> Registration {
        self.source = Some(source.into());
        self
    }

    /// Binds to event-type patterns (`*`, `prefix.*`, exact).
    ///
    /// # Panics
    /// On an invalid pattern: registrations are written by the programmer, at start-up.
    pub fn events<S: AsRef<str>>(mut self, patterns: impl IntoIterator<Item = S>) -> Registration {
        self.events = patterns
            .into_iter()
            .map(|p| EventPattern::parse(p.as_ref()).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        self
    }

    fn from_binding(
        binding: Binding,
        handler: Arc<dyn Handler>,
    ) -> Result<Registration, RegistryError> {
        let events = binding.events;
        Ok(Registration {
            name: binding.name,
            source: binding.source.filter(|s| s != "*"),
            events,
            body_match: BodyMatch::new(binding.body_match),
            limits: HandlerLimits {
                // At least 1: the config check refuses anything less.
                concurrency: binding
                    .concurrency
                    .map(|c| usize::try_from(c.max(1)).unwrap_or(usize::MAX)),
                rate: binding.rate,
            },
            order_by: binding.order_by,
            handler,
        })
    }

    /// Only deliveries whose body holds one of `values` at `pointer` (all such conditions
    /// must hold), as a handler's `match` in the config.
    pub fn matching_body(
        mut self,
        pointer: impl Into<String>,
        values: impl IntoIterator<Item = serde_json::Value>,
    ) -> Registration {
        let mut conditions = std::mem::take(&mut self.body_match).into_conditions();
        conditions.push((pointer.into(), values.into_iter().collect()));
        self.body_match = BodyMatch::new(conditions);
        self
    }

    fn matches(&self, source: &str, event_type: Option<&str>) -> bool {
        self.source.as_deref().is_none_or(|s| s == source)
            && self.events.iter().any(|p| p.matches(event_type))
    }
}

/// Why the handlers cannot be assembled; a start-up error.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A handler's name has other characters than letters, digits, `-` and `_`.
    #[error("handler name `{0}`: only letters, digits, '-' and '_'")]
    InvalidName(String),
    /// Two handlers share a name.
    #[error("handler name `{0}` is used twice")]
    DuplicateName(String),
    /// A handler is bound to a source that is not configured.
    #[error("handler `{handler}`: source `{source_name}` is not configured")]
    UnknownSource {
        /// The handler.
        handler: String,
        /// The source it names.
        source_name: String,
    },
    /// An `http` handler's URL is unusable.
    #[error("handler `{handler}`: {source}")]
    Url {
        /// The handler.
        handler: String,
        /// What is wrong.
        source: http::UrlError,
    },
    /// A sink's URL or template is unusable.
    #[error("handler `{handler}`: {source}")]
    Sink {
        /// The handler.
        handler: String,
        /// What is wrong.
        source: sinks::SinkError,
    },
}

/// Every handler of the service, routed by source and event type.
#[derive(Debug, Clone, Default)]
pub struct HandlerRegistry {
    entries: Vec<Registration>,
}

impl HandlerRegistry {
    /// Builds the built-in handlers of `config`, then adds `extra` (a user's plugins).
    /// Names must be unique and bound sources must exist.
    pub fn build(
        config: &Config,
        extra: Vec<Registration>,
    ) -> Result<HandlerRegistry, RegistryError> {
        let mut entries = Vec::new();
        let connections = sinks::SinkConnections::default();
        for handler in &config.handlers {
            let built: Arc<dyn Handler> = match handler {
                HandlerConfig::Log(_) => Arc::new(LogHandler),
                HandlerConfig::Command(c) => Arc::new(
                    CommandHandler::new(c.command.clone(), c.timeout).with_env(c.env.clone()),
                ),
                HandlerConfig::Http(c) => {
                    Arc::new(HttpHandler::new(&c.url, c.timeout).map_err(|source| {
                        RegistryError::Url {
                            handler: c.name.clone(),
                            source,
                        }
                    })?)
                }
                HandlerConfig::Nats(c) => Arc::new(
                    sinks::nats::NatsSink::new(
                        &connections,
                        &c.name,
                        c.url.as_deref(),
                        c.url_env.as_deref(),
                        &c.subject,
                    )
                    .map_err(|source| RegistryError::Sink {
                        handler: c.name.clone(),
                        source,
                    })?,
                ),
                HandlerConfig::Amqp(c) => Arc::new(
                    sinks::amqp::AmqpSink::new(
                        &connections,
                        &c.name,
                        c.url.as_deref(),
                        c.url_env.as_deref(),
                        &c.exchange,
                        &c.routing_key,
                    )
                    .map_err(|source| RegistryError::Sink {
                        handler: c.name.clone(),
                        source,
                    })?,
                ),
                HandlerConfig::Redis(c) => Arc::new(
                    sinks::redis::RedisSink::new(
                        &connections,
                        &c.name,
                        c.url.as_deref(),
                        c.url_env.as_deref(),
                        &c.stream,
                        c.max_len,
                        config.storage.retention,
                    )
                    .map_err(|source| RegistryError::Sink {
                        handler: c.name.clone(),
                        source,
                    })?,
                ),
            };
            entries.push(Registration::from_binding(handler.binding(), built)?);
        }
        for r in extra {
            if !crate::config::is_valid_name(&r.name) {
                return Err(RegistryError::InvalidName(r.name));
            }
            if let Some(s) = &r.source
                && !config.sources.contains_key(s)
            {
                return Err(RegistryError::UnknownSource {
                    handler: r.name,
                    source_name: s.clone(),
                });
            }
            entries.push(r);
        }
        let mut names = std::collections::HashSet::new();
        for r in &entries {
            if !names.insert(r.name.as_str()) {
                return Err(RegistryError::DuplicateName(r.name.clone()));
            }
        }
        Ok(HandlerRegistry { entries })
    }

    /// The handlers a delivery of `source` with `event_type` and `body` goes to, and the
    /// values their runs are ordered by. The body is parsed as JSON only when a candidate
    /// handler has a `match` or an `order_by`.
    pub fn matching(&self, source: &str, event_type: Option<&str>, body: &[u8]) -> Routing {
        let mut json: Option<Option<serde_json::Value>> = None;
        let mut routing = Routing::default();
        for r in self
            .entries
            .iter()
            .filter(|r| r.matches(source, event_type))
        {
            if r.body_match.is_empty() && r.order_by.is_none() {
                routing.handlers.push(r.name.clone());
                continue;
            }
            let body = json
                .get_or_insert_with(|| serde_json::from_slice(body).ok())
                .as_ref();
            if !r.body_match.is_empty() && !r.body_match.matches(body) {
                continue;
            }
            routing.handlers.push(r.name.clone());
            if let Some(key) = r
                .order_by
                .as_deref()
                .and_then(|p| crate::domain::order_key_at(body?, p))
            {
                routing.order_keys.insert(r.name.clone(), key);
            }
        }
        routing
    }

    /// Every handler's name and limits, in configuration order.
    pub fn limits(&self) -> impl Iterator<Item = (&str, HandlerLimits)> {
        self.entries.iter().map(|r| (r.name.as_str(), r.limits))
    }

    /// The limits of the handler named `name`.
    pub fn limits_of(&self, name: &str) -> Option<HandlerLimits> {
        self.entries
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.limits)
    }

    /// Whether a handler of this name is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.iter().any(|r| r.name == name)
    }

    /// The handler named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Handler>> {
        self.entries
            .iter()
            .find(|r| r.name == name)
            .map(|r| &r.handler)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let any = EventPattern::parse("*").expect("ok");
        let prefix = EventPattern::parse("application.*").expect("ok");
        let exact = EventPattern::parse("application.created").expect("ok");
        assert!(any.matches(None) && any.matches(Some("x")));
        assert!(prefix.matches(Some("application.created")));
        assert!(!prefix.matches(Some("applicationx.created")));
        assert!(!prefix.matches(Some("application")));
        assert!(exact.matches(Some("application.created")));
        assert!(!exact.matches(Some("application.created.v2")));
        assert!(!exact.matches(None));
        for bad in ["", "a*", "*.created", "a.*.b"] {
            assert!(EventPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
