//! `kind = "log"`: one tracing line per delivery. Useful as a first handler and in demos.

use async_trait::async_trait;

use super::{Delivery, Handler, HandlerContext, HandlerError};

/// Logs source, id, event type, attempt and body size (never the body: it may hold PII).
#[derive(Debug, Default)]
pub struct LogHandler;

#[async_trait]
impl Handler for LogHandler {
    async fn handle(&self, d: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError> {
        tracing::info!(
            source = %d.source,
            delivery_id = %d.id,
            event_type = d.event_type.as_deref().unwrap_or(""),
            attempt = d.attempt,
            body_bytes = d.body.len(),
            idempotency_key = %ctx.idempotency_key,
            "delivery received"
        );
        Ok(())
    }
}
