//! `webhook-inbox call` inside a `command` handler: the program's calls go through the
//! service (journal, key, retries) by a loopback URL given in its environment
//! (`WEBHOOK_INBOX_CALLS`).
//!
//! Each run of a `command` handler opens a [`Loopback`]: a fresh random token registered in
//! [`LiveRuns`] with that run's [`Calls`], removed when the run ends (the guard's `Drop`).
//! The endpoint (`POST /calls/{token}` on the admin listener, `crate::routes`) accepts only
//! a live run's own token; a finished run's token is refused, so a leftover process cannot
//! act for a pair it no longer runs. This module holds the registry and the wire format,
//! both free of HTTP serving.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{CallError, CallRequest, CallResponse, Calls, Method};

/// The environment variable holding a run's loopback URL.
pub const ENV_URL: &str = "WEBHOOK_INBOX_CALLS";

/// The runs whose programs may call through the service, by token.
#[derive(Debug, Default, Clone)]
pub struct LiveRuns {
    runs: Arc<Mutex<HashMap<String, Calls>>>,
}

impl LiveRuns {
    /// The client of the live run holding `token`.
    pub fn get(&self, token: &str) -> Option<Calls> {
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
    }

    /// How many runs are reachable now.
    pub fn len(&self) -> usize {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no run is reachable.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A run's registration: its URL while it lives; dropping it ends the token.
#[derive(Debug)]
pub struct Loopback {
    /// `WEBHOOK_INBOX_CALLS` for the run's program.
    pub url: String,
    token: String,
    live: LiveRuns,
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.live
            .runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.token);
    }
}

impl Calls {
    /// Registers this run for `webhook-inbox call` (none when the service has no loopback
    /// listener, or no journal: the program then calls directly).
    pub fn open_loopback(&self) -> Option<Loopback> {
        let base = self
            .service
            .loopback_base
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        self.service.store.as_ref()?;
        let token = hex::encode(rand::random::<[u8; 32]>());
        let live = self.service.live.clone();
        live.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token.clone(), self.clone());
        Some(Loopback {
            url: format!("{base}/{token}"),
            token,
            live,
        })
    }
}

/// What `webhook-inbox call` sends to the loopback endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireRequest {
    /// The step.
    pub step: String,
    /// The method.
    pub method: String,
    /// The URL.
    pub url: String,
    /// `(name, value)` headers.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The body, base64.
    #[serde(default)]
    pub body_base64: String,
}

impl WireRequest {
    /// The request it describes, or why it is not one.
    pub fn into_request(self) -> Result<(String, CallRequest), CallError> {
        let bad = |why: String| CallError::BadRequest {
            step: crate::domain::printable(&self.step),
            why,
        };
        let method = Method::from_bytes(self.method.as_bytes()).map_err(|_| {
            bad(format!(
                "`{}` is not an HTTP method",
                crate::domain::printable(&self.method)
            ))
        })?;
        let body = BASE64
            .decode(&self.body_base64)
            .map_err(|_| bad("the body is not base64".into()))?;
        Ok((
            self.step.clone(),
            CallRequest {
                method,
                url: self.url.clone(),
                headers: self.headers.clone(),
                body: Bytes::from(body),
                timeout: None,
            },
        ))
    }
}

/// Sends `wire` to the run's loopback URL (what `webhook-inbox call` does inside a
/// `command` handler). The error says why no answer came (the service unreachable, or the
/// run over).
pub async fn call_through(url: &str, wire: &WireRequest) -> Result<WireAnswer, String> {
    let response = reqwest::Client::new()
        .post(url)
        .json(wire)
        .send()
        .await
        .map_err(|e| format!("the service is unreachable: {}", e.without_url()))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        return Err(format!("the service refused the call ({status}): {text}"));
    }
    response
        .json()
        .await
        .map_err(|e| format!("the service's answer: {}", e.without_url()))
}

/// What the loopback endpoint answers: the step's response, or why there is none.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum WireAnswer {
    /// A final answer.
    Response {
        /// Status.
        status: u16,
        /// `Content-Type`.
        content_type: Option<String>,
        /// `Location`.
        location: Option<String>,
        /// Body, base64.
        body_base64: String,
        /// The body was cut at `journal_max_bytes`.
        body_truncated: bool,
        /// From the journal.
        replayed: bool,
    },
    /// No answer to give.
    Failed {
        /// The message.
        message: String,
        /// The exit code `webhook-inbox call` ends with (65 or 75).
        exit_code: u8,
    },
}

impl From<Result<CallResponse, CallError>> for WireAnswer {
    fn from(result: Result<CallResponse, CallError>) -> WireAnswer {
        match result {
            Ok(r) => WireAnswer::Response {
                status: r.status,
                content_type: r.content_type,
                location: r.location,
                body_base64: BASE64.encode(&r.body),
                body_truncated: r.body_truncated,
                replayed: r.replayed,
            },
            Err(e) => WireAnswer::Failed {
                message: e.to_string(),
                exit_code: e.exit_code(),
            },
        }
    }
}
