//! `kind = "amqp"`: a RabbitMQ publish per delivery, confirmed by the broker.
//!
//! The message is the raw body, persistent (`delivery_mode` 2), with `message_id` = the
//! pair's idempotency key, `content_type` from the delivery (else
//! `application/octet-stream`), and the [`super::Metadata`] as headers. It is published
//! `mandatory` on a channel in confirm mode: the run succeeds only on the broker's `ack` of
//! a message it routed to a queue. A message that routes nowhere, an exchange that does not
//! exist, a `nack` or a broker that is down fail the run retryably, saying which.
//!
//! RabbitMQ keeps no window of seen ids: a rerun after a crash between the confirm and the
//! recorded outcome publishes a second copy with the same `message_id`, which consumers
//! drop (docs/sinks.md says how). The exchange and its bindings are the user's: nothing is
//! declared.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use super::{Metadata, SinkConnections, SinkError, Slot, Template, resolve_url, scrub, shown_url};
use crate::handlers::{Delivery, Handler, HandlerContext, HandlerError};

/// How long a connection, a publish or its confirm may take before the run fails.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection and its channel in confirm mode, shared by the sinks of one URL.
pub struct Link {
    connection: Connection,
    channel: Channel,
}

impl Link {
    fn live(self: &Arc<Link>) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

/// Publishes each delivery to an exchange.
pub struct AmqpSink {
    url: String,
    shown: String,
    exchange: String,
    routing_key: Template,
    handler: String,
    link: Slot<Arc<Link>>,
}

impl std::fmt::Debug for AmqpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSink")
            .field("url", &self.shown)
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .finish()
    }
}

impl AmqpSink {
    /// A sink for handler `handler` from its config keys, checked now; the connection (from
    /// `connections`) is made on first use.
    pub fn new(
        connections: &SinkConnections,
        handler: &str,
        url: Option<&str>,
        url_env: Option<&str>,
        exchange: &str,
        routing_key: &str,
    ) -> Result<AmqpSink, SinkError> {
        let url = resolve_url(url, url_env)?;
        let shown = shown_url(&url);
        if url.parse::<lapin::uri::AMQPUri>().is_err() {
            return Err(SinkError::BadUrl(format!(
                "{shown}: an amqp:// or amqps:// URL is expected"
            )));
        }
        let routing_key = Template::parse(routing_key).map_err(|why| SinkError::Template {
            key: "routing_key",
            why,
        })?;
        Ok(AmqpSink {
            link: connections.slot("amqp", &url),
            url,
            shown,
            exchange: exchange.to_owned(),
            routing_key,
            handler: handler.to_owned(),
        })
    }

    /// The shared link, connecting (again) if it is not live.
    async fn link(&self) -> Result<Arc<Link>, String> {
        let connect = async {
            let failed = |e: &dyn std::fmt::Display| {
                format!(
                    "cannot connect to {}: {}",
                    self.shown,
                    scrub(&e.to_string(), &self.url)
                )
            };
            let open = async {
                let connection = Connection::connect(&self.url, ConnectionProperties::default())
                    .await
                    .map_err(|e| failed(&e))?;
                let channel = connection.create_channel().await.map_err(|e| failed(&e))?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| failed(&e))?;
                Ok(Arc::new(Link {
                    connection,
                    channel,
                }))
            };
            tokio::time::timeout(BROKER_TIMEOUT, open)
                .await
                .map_err(|_| failed(&"timed out"))?
        };
        self.link.get(Link::live, connect).await
    }

    async fn publish(&self, d: &Delivery, key: &str) -> Result<(), HandlerError> {
        let routing_key = self.routing_key.render(d, &self.handler);
        let failed = |e: &dyn std::fmt::Display| {
            HandlerError::Retryable(format!(
                "publish to {} exchange `{}` routing key `{routing_key}`: {}",
                self.shown,
                self.exchange,
                scrub(&e.to_string(), &self.url)
            ))
        };
        let link = self.link().await.map_err(HandlerError::Retryable)?;
        let mut headers = FieldTable::default();
        for (name, value) in Metadata::of(d, key).0 {
            headers.insert(
                ShortString::from(name),
                AMQPValue::LongString(LongString::from(value)),
            );
        }
        let span = super::publish_span("amqp", &routing_key);
        if let Some(traceparent) = crate::telemetry::traceparent(&span) {
            headers.insert(
                ShortString::from("traceparent"),
                AMQPValue::LongString(LongString::from(traceparent)),
            );
        }
        let content_type = d
            .headers
            .get("content-type")
            .unwrap_or("application/octet-stream");
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from(key))
            .with_delivery_mode(2)
            .with_content_type(ShortString::from(content_type))
            .with_headers(headers);
        let publish = async {
            let confirm = link
                .channel
                .basic_publish(
                    ShortString::from(self.exchange.as_str()),
                    ShortString::from(routing_key.as_str()),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &d.body,
                    properties,
                )
                .await
                .map_err(|e| failed(&e))?;
            confirm.await.map_err(|e| failed(&e))
        };
        let publish = tracing::Instrument::instrument(publish, span);
        let confirmation = tokio::time::timeout(BROKER_TIMEOUT, publish)
            .await
            .map_err(|_| failed(&"no confirm in time"))??;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(failed(&format!(
                "the exchange routed the message to no queue ({})",
                returned.reply_text
            ))),
            Confirmation::Nack(_) => Err(failed(&"the broker refused the message (nack)")),
            Confirmation::NotRequested => Err(failed(&"the channel is not in confirm mode")),
        }
    }
}

#[async_trait]
impl Handler for AmqpSink {
    async fn handle(&self, d: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let result = tokio::select! {
            r = self.publish(d, &ctx.idempotency_key) => r,
            () = ctx.shutdown.cancelled() => {
                return Err(HandlerError::Retryable("stopped by shutdown".into()));
            }
        };
        let counted = if result.is_ok() {
            "published"
        } else {
            "failed"
        };
        super::count_publish(&self.handler, "amqp", counted);
        result
    }
}
