//! `kind = "redis"`: an entry of a Redis stream per delivery.
//!
//! The entry holds the raw body in the field `body` beside the [`super::Metadata`] fields.
//! It is appended by a script that first looks for the pair's key
//! (`webhook-inbox:published:{<stream>}:<key>`, kept for `storage.retention`): a rerun
//! finds it and appends nothing, so the stream holds one entry per pair whatever is
//! retried. `max_len`
//! trims the stream approximately (`XADD MAXLEN ~`).

use std::time::Duration;

use super::{Metadata, SinkConnections, SinkError, Slot, Template, resolve_url, shown_url};
use crate::handlers::{Delivery, Handler, HandlerContext, HandlerError};
use async_trait::async_trait;

/// Appends the entry once per key; returns its id (the first one's, on a rerun) and 1 when
/// it appended now, 0 when the key was already there.
const APPEND_ONCE: &str = r"
local seen = redis.call('GET', KEYS[2])
if seen then return {seen, 0} end
local args = {KEYS[1]}
if ARGV[1] ~= '' then
  table.insert(args, 'MAXLEN'); table.insert(args, '~'); table.insert(args, ARGV[1])
end
table.insert(args, '*')
for i = 3, #ARGV do table.insert(args, ARGV[i]) end
local id = redis.call('XADD', unpack(args))
redis.call('SET', KEYS[2], id, 'PX', ARGV[2])
return {id, 1}
";

/// The key that remembers `key` was appended to `stream`: per stream (another stream is
/// another publish), in the stream's Redis Cluster slot (the `{stream}` hash tag), since a
/// script may only touch keys of one slot.
fn published_marker(stream: &str, key: &str) -> String {
    format!("webhook-inbox:published:{{{stream}}}:{key}")
}

/// Appends each delivery to a stream.
pub struct RedisSink {
    client: redis::Client,
    shown: String,
    stream: Template,
    max_len: Option<u64>,
    remember: Duration,
    handler: String,
    script: redis::Script,
    connection: Slot<redis::aio::ConnectionManager>,
}

impl std::fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSink")
            .field("url", &self.shown)
            .field("stream", &self.stream)
            .finish()
    }
}

impl RedisSink {
    /// A sink for handler `handler`, remembering published keys for `remember`
    /// (`storage.retention`); checked now, connected on first use (from `connections`).
    pub fn new(
        connections: &SinkConnections,
        handler: &str,
        url: Option<&str>,
        url_env: Option<&str>,
        stream: &str,
        max_len: Option<u64>,
        remember: Duration,
    ) -> Result<RedisSink, SinkError> {
        let url = resolve_url(url, url_env)?;
        let shown = shown_url(&url);
        let client = redis::Client::open(url.as_str())
            .map_err(|_| SinkError::BadUrl(format!("{shown}: a redis:// URL is expected")))?;
        let stream =
            Template::parse(stream).map_err(|why| SinkError::Template { key: "stream", why })?;
        Ok(RedisSink {
            connection: connections.slot("redis", &url),
            client,
            shown,
            stream,
            max_len,
            remember,
            handler: handler.to_owned(),
            script: redis::Script::new(APPEND_ONCE),
        })
    }

    /// The shared connection, made first if need be (it reconnects by itself after that).
    async fn connection(&self) -> Result<redis::aio::ConnectionManager, String> {
        let connect = async {
            tokio::time::timeout(Duration::from_secs(5), self.client.get_connection_manager())
                .await
                .map_err(|_| format!("cannot connect to {}: timed out", self.shown))?
                .map_err(|e| format!("cannot connect to {}: {}", self.shown, e.kind_text()))
        };
        self.connection.get(|_| true, connect).await
    }
}

/// A redis error without anything that could hold a URL.
trait KindText {
    fn kind_text(&self) -> String;
}

impl KindText for redis::RedisError {
    fn kind_text(&self) -> String {
        match self.detail() {
            Some(detail) => format!("{:?}: {detail}", self.kind()),
            None => format!("{:?}", self.kind()),
        }
    }
}

#[async_trait]
impl Handler for RedisSink {
    async fn handle(&self, d: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let result = self.append(d, ctx).await;
        let counted = match &result {
            Ok(true) => "published",
            Ok(false) => "duplicate",
            Err(_) => "failed",
        };
        super::count_publish(&self.handler, "redis", counted);
        result.map(drop)
    }
}

impl RedisSink {
    /// Appends the entry unless its key was; `Ok(true)` when it appended now.
    async fn append(&self, d: &Delivery, ctx: &HandlerContext) -> Result<bool, HandlerError> {
        let stream = self.stream.render(d, &self.handler);
        let mut connection = self.connection().await.map_err(HandlerError::Retryable)?;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(&stream)
            .key(published_marker(&stream, &ctx.idempotency_key))
            .arg(self.max_len.map(|n| n.to_string()).unwrap_or_default())
            .arg(self.remember.as_millis().max(1) as u64)
            .arg("body")
            .arg(d.body.as_ref());
        for (name, value) in Metadata::of(d, &ctx.idempotency_key).0 {
            invocation.arg(name).arg(value);
        }
        let span = super::publish_span("redis", &stream);
        if let Some(traceparent) = crate::telemetry::traceparent(&span) {
            invocation.arg("traceparent").arg(traceparent);
        }
        let append = tracing::Instrument::instrument(
            tokio::time::timeout(
                Duration::from_secs(10),
                invocation.invoke_async::<(String, i64)>(&mut connection),
            ),
            span,
        );
        let (id, appended) = tokio::select! {
            r = append => r
                .map_err(|_| HandlerError::Retryable(format!("append to {} stream `{stream}`: timed out", self.shown)))?
                .map_err(|e| HandlerError::Retryable(format!("append to {} stream `{stream}`: {}", self.shown, e.kind_text())))?,
            () = ctx.shutdown.cancelled() => {
                return Err(HandlerError::Retryable("stopped by shutdown".into()));
            }
        };
        tracing::debug!(%stream, %id, appended, "appended");
        Ok(appended == 1)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_marker_is_per_stream_and_in_the_stream_s_cluster_slot() {
        assert_eq!(
            super::published_marker("webhooks:credicorp", "k1"),
            "webhook-inbox:published:{webhooks:credicorp}:k1"
        );
    }
}
