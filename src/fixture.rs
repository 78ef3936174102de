//! Fixtures: `fixtures/<source>/<name>.json`, deliveries a user can sign and send.
//!
//! ```json
//! { "source": "credicorp", "id": "msg_…", "headers": { }, "body": { "type": "…" } }
//! ```
//! `body` is JSON (sent compact) or `body_raw` a string sent byte for byte; `id` goes where
//! the source's scheme takes it (a header, or the body's id field). `deliveries export`
//! writes a stored delivery in this form, so a real delivery captured in production can be
//! replayed on a laptop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError};
use crate::store::DeliveryRecord;
use crate::verify::Source;

/// A fixture file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    /// Source name.
    pub source: String,
    /// Delivery id.
    pub id: String,
    /// Extra headers to send (provider headers such as `X-GitHub-Event`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// A JSON body, sent compact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    /// A body sent byte for byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_raw: Option<String>,
}

/// A request ready to send.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    /// `/webhooks/<source>`.
    pub path: String,
    /// Every header, signature included.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// Headers the HTTP layer sets per request, never part of a fixture.
const TRANSPORT_HEADERS: [&str; 6] = [
    "host",
    "content-length",
    "connection",
    "accept-encoding",
    "transfer-encoding",
    "user-agent",
];

/// Why a fixture could not be read or signed.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A directory could not be listed.
    #[error("{}: cannot list: {source}", path.display())]
    List {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a fixture.
    #[error("{}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// Neither or both of `body` and `body_raw`.
    #[error("fixture `{id}`: give exactly one of `body` and `body_raw`")]
    Body {
        /// The fixture's id.
        id: String,
    },
    /// Its source is not configured, or cannot be built.
    #[error(transparent)]
    Source(#[from] ConfigError),
}

impl Fixture {
    /// Reads a fixture file.
    pub fn load(path: &Path) -> Result<Fixture, FixtureError> {
        let text = std::fs::read_to_string(path).map_err(|source| FixtureError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| FixtureError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// The fixture of a stored delivery. The body stays `body` (JSON) when sending it compact
    /// gives back the very bytes received, else it is kept byte for byte in `body_raw`.
    /// Headers its `source`'s sender sets per request (signature, timestamp, the id header
    /// where `replay` writes the id) are left out: `replay` signs afresh.
    pub fn from_record(record: &DeliveryRecord, body: &[u8], source: Option<&Source>) -> Fixture {
        let json = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .filter(|v| v.to_string().as_bytes() == body);
        let mut per_request: Vec<String> = TRANSPORT_HEADERS.map(String::from).to_vec();
        if let Some(source) = source {
            per_request.extend(source.signature_headers().into_iter().map(String::from));
            per_request.extend(
                source
                    .sign(&record.id, body, SystemTime::now())
                    .into_iter()
                    .map(|(name, _)| name),
            );
        }
        let headers = record
            .headers
            .0
            .iter()
            .filter(|(k, _)| !per_request.iter().any(|h| h.eq_ignore_ascii_case(k)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Fixture {
            source: record.source.clone(),
            id: record.id.clone(),
            headers,
            body_raw: json
                .is_none()
                .then(|| String::from_utf8_lossy(body).into_owned()),
            body: json,
        }
    }

    /// The body bytes as they are sent, with `id` written at `id_pointer` when the source
    /// reads the id from a JSON body.
    pub fn body_bytes(&self, id: &str, id_pointer: Option<&str>) -> Result<Vec<u8>, FixtureError> {
        match (&self.body, &self.body_raw) {
            (Some(v), None) => {
                let mut v = v.clone();
                if let Some(slot) = id_pointer.and_then(|p| v.pointer_mut(p)) {
                    *slot = serde_json::Value::String(id.to_owned());
                }
                Ok(v.to_string().into_bytes())
            }
            (None, Some(raw)) => Ok(raw.clone().into_bytes()),
            _ => Err(FixtureError::Body {
                id: self.id.clone(),
            }),
        }
    }

    /// Signs this fixture as delivery `id` with `source` (its scheme and first secret) at
    /// `now`; `tamper` flips the signature so the service must answer 401.
    pub fn sign_as(
        &self,
        source: &Source,
        id: &str,
        now: SystemTime,
        tamper: bool,
    ) -> Result<SignedRequest, FixtureError> {
        let body = self.body_bytes(id, source.id_pointer())?;
        let mut headers: Vec<(String, String)> =
            vec![("content-type".into(), "application/json".into())];
        for (k, v) in &self.headers {
            headers.retain(|(h, _)| !h.eq_ignore_ascii_case(k));
            headers.push((k.to_ascii_lowercase(), v.clone()));
        }
        // Signed over the real body; a tampered request then sends other bytes.
        for (k, v) in source.sign(id, &body, now) {
            headers.retain(|(h, _)| !h.eq_ignore_ascii_case(&k));
            headers.push((k, v));
        }
        let mut body = body;
        if tamper {
            body.push(b' ');
        }
        Ok(SignedRequest {
            path: format!("/webhooks/{}", self.source),
            headers,
            body,
        })
    }

    /// Signs this fixture under its own id, now.
    pub fn sign(&self, config: &Config, now: SystemTime) -> Result<SignedRequest, FixtureError> {
        self.sign_as(&Source::named(config, &self.source)?, &self.id, now, false)
    }
}

/// Every `*.json` file under `paths` (files as given, directories recursively), sorted.
pub fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>, FixtureError> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), FixtureError> {
        let list = |source| FixtureError::List {
            path: dir.to_owned(),
            source,
        };
        for entry in std::fs::read_dir(dir).map_err(list)? {
            let path = entry.map_err(list)?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else if path.extension().is_some_and(|e| e == "json") {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            walk(path, &mut out)?;
        } else {
            out.push(path.clone());
        }
    }
    out.sort();
    Ok(out)
}

/// `webhook-inbox sign`: the request as text, headers then a blank line then the body.
pub fn sign_fixture(config: &Config, path: &Path) -> Result<String, FixtureError> {
    let request = Fixture::load(path)?.sign(config, SystemTime::now())?;
    let mut out = format!("POST {}\n", request.path);
    for (k, v) in &request.headers {
        out.push_str(&format!("{k}: {v}\n"));
    }
    out.push('\n');
    out.push_str(&String::from_utf8_lossy(&request.body));
    out.push('\n');
    Ok(out)
}
