//! `kind = "http"`: POSTs the raw body to a URL, for handlers written as web services.
//!
//! Headers: `Idempotency-Key`, `Webhook-Source`, `Webhook-Id`, `Webhook-Event-Type`, and
//! the delivery's `Content-Type`. 2xx succeeded; a 4xx other than 408, 409, 425 and 429
//! failed for good (the request itself is wrong); everything else — 408/409/425/429, 5xx,
//! timeouts, refused connections — is retried.

use std::time::Duration;

use async_trait::async_trait;

use super::{Delivery, Handler, HandlerContext, HandlerError};

/// How much of an error response body is kept as the error.
const BODY_KEPT: usize = 512;

/// POSTs each delivery to `url`.
#[derive(Clone)]
pub struct HttpHandler {
    url: reqwest::Url,
    /// `url` without credentials or query: the only form that reaches an error or a log.
    shown: String,
    client: reqwest::Client,
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
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    Client(reqwest::Error),
}

/// A URL as it may be shown: no user, password, query or fragment (where secrets go).
pub fn redact(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    let credentials = !url.username().is_empty() || url.password().is_some();
    let mut text = shown.to_string();
    if credentials || url.query().is_some() {
        text.push_str(" (credentials and query redacted)");
    }
    text
}

impl HttpHandler {
    /// A handler posting to `url`, giving up on a request after `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<HttpHandler, UrlError> {
        // The text may hold credentials: an unparsable one is not repeated.
        let url = reqwest::Url::parse(url).map_err(UrlError::Parse)?;
        let shown = redact(&url);
        if !matches!(url.scheme(), "http" | "https") {
            return Err(UrlError::Scheme(shown));
        }
        // No redirects: a 302 to a page that answers 200 is not the target's success.
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(UrlError::Client)?;
        Ok(HttpHandler { url, shown, client })
    }
}

/// The most of an error answer's body read: the rest is not read at all (a target that
/// answers an endless body costs nothing beyond this).
pub const ERROR_BODY_READ_MAX: usize = 64 * 1024;

/// The start of an error answer's body, kept as the run's error (at most [`BODY_KEPT`]
/// characters), with how much more there was: the body is read a chunk at a time, never
/// past [`ERROR_BODY_READ_MAX`].
async fn error_excerpt(mut response: reqwest::Response) -> String {
    let mut kept = Vec::new();
    let mut read = 0usize;
    while let Ok(Some(chunk)) = response.chunk().await {
        read += chunk.len();
        let room = (BODY_KEPT * 4).saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if read >= ERROR_BODY_READ_MAX {
            break;
        }
    }
    let text = String::from_utf8_lossy(&kept);
    let excerpt: String = text.chars().take(BODY_KEPT).collect();
    let more = read.saturating_sub(excerpt.len());
    match more {
        0 => excerpt,
        _ if read >= ERROR_BODY_READ_MAX => format!("{excerpt}… (at least {more} more bytes)"),
        _ => format!("{excerpt}… ({more} more bytes)"),
    }
}

/// Whether a status means "never retry".
pub fn is_permanent(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 408 | 409 | 425 | 429)
}

#[async_trait]
impl Handler for HttpHandler {
    async fn handle(&self, d: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let content_type = d.headers.get("content-type").unwrap_or("application/json");
        let request = self
            .client
            .post(self.url.clone())
            .header("Idempotency-Key", &ctx.idempotency_key)
            .header("Webhook-Source", &d.source)
            .header("Webhook-Id", &d.id)
            .header("Webhook-Event-Type", d.event_type.as_deref().unwrap_or(""))
            .header("Content-Type", content_type)
            .body(d.body.clone())
            .send();
        let response = tokio::select! {
            r = request => r.map_err(|e| HandlerError::Retryable(format!("POST {}: {}", self.shown, e.without_url())))?,
            () = ctx.shutdown.cancelled() => return Err(HandlerError::Retryable("stopped by shutdown".into())),
        };
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Ok(());
        }
        if response.status().is_redirection() {
            // Final: the target moved, and following it would post the delivery elsewhere.
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| self.url.join(l).ok())
                .map_or_else(|| "no usable Location".to_owned(), |l| redact(&l));
            return Err(HandlerError::Permanent(format!(
                "POST {} answered {status}, a redirect to {location}: redirects are not followed",
                self.shown
            )));
        }
        let excerpt = error_excerpt(response).await;
        let message = format!("POST {} answered {status}: {excerpt}", self.shown);
        if is_permanent(status) {
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

    #[test]
    fn retry_split_by_status() {
        for s in [400, 401, 403, 404, 410, 413, 422] {
            assert!(is_permanent(s), "{s}");
        }
        for s in [408, 409, 425, 429, 500, 502, 503, 504, 302] {
            assert!(!is_permanent(s), "{s}");
        }
    }
}
