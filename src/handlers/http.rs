//! `kind = "http"`: POSTs the raw body to a URL, for handlers written as web services — one
//! step (`forward`) of the downstream client ([`crate::calls`]).
//!
//! Headers: `Idempotency-Key` (the pair's key, as it always was: the one step of this
//! handler keeps it, so an upgrade changes no pending delivery's key), `Webhook-Source`,
//! `Webhook-Id`, `Webhook-Event-Type`, and the delivery's `Content-Type`. The client retries
//! connection errors, time-outs, 408, 409, 425, 429 and 5xx inside the run (honouring
//! `Retry-After`), then fails the run retryably; 2xx succeeded; a 3xx (redirects are not
//! followed) or another 4xx failed for good; a 422 too, as the client's refusal.

use std::time::Duration;

use async_trait::async_trait;

use super::{Delivery, Handler, HandlerContext, HandlerError};
use crate::calls::{CallRequest, Method};

pub use crate::calls::redact;

/// How much of an error response body is kept as the error.
const BODY_KEPT: usize = 512;

/// The step this handler's one call is.
pub const STEP: &str = "forward";

/// POSTs each delivery to `url`.
#[derive(Clone)]
pub struct HttpHandler {
    url: reqwest::Url,
    /// `url` without credentials or query: the only form that reaches an error or a log.
    shown: String,
    timeout: Duration,
}

impl std::fmt::Debug for HttpHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpHandler")
            .field("url", &self.shown)
            .finish()
    }
}

/// Why an `http` handler cannot be built. Never shows the URL's credentials.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// The URL does not parse.
    #[error("url: {0}")]
    Parse(<reqwest::Url as std::str::FromStr>::Err),
    /// Not http or https.
    #[error("url `{0}`: only http and https are supported")]
    Scheme(String),
}

impl HttpHandler {
    /// A handler posting to `url`, giving up on one exchange after `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<HttpHandler, UrlError> {
        // The text may hold credentials: an unparsable one is not repeated.
        let url = reqwest::Url::parse(url).map_err(UrlError::Parse)?;
        let shown = redact(&url);
        if !matches!(url.scheme(), "http" | "https") {
            return Err(UrlError::Scheme(shown));
        }
        Ok(HttpHandler {
            url,
            shown,
            timeout,
        })
    }
}

/// The start of an error answer's body (at most [`BODY_KEPT`] characters), with how much
/// more there was.
fn excerpt(body: &[u8], truncated: bool) -> String {
    let text = String::from_utf8_lossy(body);
    let excerpt: String = text.chars().take(BODY_KEPT).collect();
    let more = body.len().saturating_sub(excerpt.len());
    match (more, truncated) {
        (0, false) => excerpt,
        (_, true) => format!("{excerpt}… (at least {more} more bytes)"),
        _ => format!("{excerpt}… ({more} more bytes)"),
    }
}

#[async_trait]
impl Handler for HttpHandler {
    async fn handle(&self, d: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let content_type = d.headers.get("content-type").unwrap_or("application/json");
        let request = CallRequest {
            method: Method::POST,
            url: self.url.to_string(),
            headers: vec![
                ("Webhook-Source".into(), d.source.clone()),
                ("Webhook-Id".into(), d.id.clone()),
                (
                    "Webhook-Event-Type".into(),
                    d.event_type.clone().unwrap_or_default(),
                ),
                ("Content-Type".into(), content_type.to_owned()),
            ],
            body: d.body.clone(),
            timeout: Some(self.timeout),
        };
        let response = ctx
            .calls
            .execute_keyed(STEP, &ctx.idempotency_key, request)
            .await?;
        let status = response.status;
        if response.is_success() {
            return Ok(());
        }
        if (300..400).contains(&status) {
            // Final: the target moved, and following it would post the delivery elsewhere.
            let location = response
                .location
                .as_deref()
                .and_then(|l| self.url.join(l).ok())
                .map_or_else(|| "no usable Location".to_owned(), |l| redact(&l));
            return Err(HandlerError::Permanent(format!(
                "POST {} answered {status}, a redirect to {location}: redirects are not followed",
                self.shown
            )));
        }
        let message = format!(
            "POST {} answered {status}: {}",
            self.shown,
            excerpt(&response.body, response.body_truncated)
        );
        if (400..500).contains(&status) {
            Err(HandlerError::Permanent(message))
        } else {
            Err(HandlerError::Retryable(message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_urls_carry_no_credentials() {
        let url =
            reqwest::Url::parse("https://user:hunter2@example.test:8443/hooks?token=s3cr3t#frag")
                .expect("url");
        let shown = redact(&url);
        assert!(
            !shown.contains("hunter2") && !shown.contains("user") && !shown.contains("s3cr3t"),
            "{shown}"
        );
        assert!(
            shown.starts_with("https://example.test:8443/hooks"),
            "{shown}"
        );
        let handler = HttpHandler::new(url.as_str(), Duration::from_secs(1)).expect("handler");
        assert!(!format!("{handler:?}").contains("hunter2"));
    }
}
