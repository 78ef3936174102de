//! `kind = "nats"`: a JetStream publish per delivery, acknowledged by the stream.
//!
//! The message is the raw body with the [`super::Metadata`] as headers and `Nats-Msg-Id` =
//! the pair's idempotency key: within the stream's duplicate window (`duplicate_window`,
//! two minutes unless the stream says otherwise) a rerun's publish is acknowledged as a
//! duplicate and stored once. A subject no stream binds fails the run (retryably: create
//! the stream and it goes on), as does a server that is down or slow to acknowledge.

use super::{Metadata, SinkConnections, SinkError, Slot, Template, resolve_url, scrub, shown_url};
use crate::handlers::{Delivery, Handler, HandlerContext, HandlerError};
use async_trait::async_trait;

/// Publishes each delivery to a JetStream subject.
pub struct NatsSink {
    url: String,
    shown: String,
    subject: Template,
    handler: String,
    context: Slot<async_nats::jetstream::Context>,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("url", &self.shown)
            .field("subject", &self.subject)
            .finish()
    }
}

impl NatsSink {
    /// A sink for handler `handler` from its config keys, checked now (the connection, from
    /// `connections`, is made on first use, so a broker that is down does not stop the
    /// service from starting).
    pub fn new(
        connections: &SinkConnections,
        handler: &str,
        url: Option<&str>,
        url_env: Option<&str>,
        subject: &str,
    ) -> Result<NatsSink, SinkError> {
        let url = resolve_url(url, url_env)?;
        let shown = shown_url(&url);
        match reqwest::Url::parse(&url) {
            Ok(u) if matches!(u.scheme(), "nats" | "tls" | "ws" | "wss") => {}
            _ => {
                return Err(SinkError::BadUrl(format!(
                    "{shown}: a nats:// URL is expected"
                )));
            }
        }
        let subject = Template::parse(subject).map_err(|why| SinkError::Template {
            key: "subject",
            why,
        })?;
        Ok(NatsSink {
            context: connections.slot("nats", &url),
            url,
            shown,
            subject,
            handler: handler.to_owned(),
        })
    }

    /// The JetStream context, connecting first if need be (the client then reconnects by
    /// itself).
    async fn context(&self) -> Result<async_nats::jetstream::Context, String> {
        let connect = async {
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(std::time::Duration::from_secs(5))
                .connect(self.url.as_str())
                .await
                .map_err(|e| {
                    format!(
                        "cannot connect to {}: {}",
                        self.shown,
                        scrub(&e.to_string(), &self.url)
                    )
                })?;
            Ok(async_nats::jetstream::new(client))
        };
        self.context.get(|_| true, connect).await
    }
}

#[async_trait]
impl Handler for NatsSink {
    async fn handle(&self, d: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let subject = self.subject.render(d, &self.handler);
        let context = self.context().await.map_err(|e| {
            super::count_publish(&self.handler, "nats", "failed");
            HandlerError::Retryable(e)
        })?;
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in Metadata::of(d, &ctx.idempotency_key).0 {
            headers.insert(name, value.as_str());
        }
        headers.insert("Nats-Msg-Id", ctx.idempotency_key.as_str());
        let span = super::publish_span("nats", &subject);
        if let Some(traceparent) = crate::telemetry::traceparent(&span) {
            headers.insert("traceparent", traceparent.as_str());
        }
        let failed = |e: &dyn std::fmt::Display| {
            HandlerError::Retryable(format!(
                "publish to {} subject `{subject}`: {}",
                self.shown,
                scrub(&e.to_string(), &self.url)
            ))
        };
        let publish = async {
            let ack = context
                .publish_with_headers(subject.clone(), headers, d.body.clone())
                .await
                .map_err(|e| failed(&e))?;
            ack.await.map_err(|e| {
                if e.kind() == async_nats::jetstream::context::PublishErrorKind::StreamNotFound {
                    failed(&"no JetStream stream binds this subject")
                } else {
                    failed(&e)
                }
            })
        };
        let publish = tracing::Instrument::instrument(publish, span);
        let ack = tokio::select! {
            r = publish => r,
            () = ctx.shutdown.cancelled() => {
                return Err(HandlerError::Retryable("stopped by shutdown".into()));
            }
        };
        let ack = match ack {
            Ok(ack) => {
                let result = if ack.duplicate {
                    "duplicate"
                } else {
                    "published"
                };
                super::count_publish(&self.handler, "nats", result);
                ack
            }
            Err(e) => {
                super::count_publish(&self.handler, "nats", "failed");
                return Err(e);
            }
        };
        tracing::debug!(stream = %ack.stream, sequence = ack.sequence, duplicate = ack.duplicate, "published");
        Ok(())
    }
}
