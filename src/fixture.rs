//! Fixtures: `fixtures/<source>/<name>.json`, deliveries a user can sign and send.
//!
//! ```json
//! { "source": "credicorp", "id": "msg_…", "headers": { }, "body": { "type": "…" } }
//! ```
//! `body` is JSON (sent compact) or `body_raw` a string sent byte for byte; `id` goes where
//! the source's scheme takes it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use serde::Deserialize;

use crate::config::Config;
use crate::verify::Source;

/// A fixture file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    /// Source name.
    pub source: String,
    /// Delivery id.
    pub id: String,
    /// Extra headers to send.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A JSON body, sent compact.
    pub body: Option<serde_json::Value>,
    /// A body sent byte for byte.
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

impl Fixture {
    /// Reads a fixture file.
    pub fn load(path: &Path) -> Result<Fixture, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The body bytes as they are sent.
    pub fn body_bytes(&self) -> Result<Vec<u8>, String> {
        match (&self.body, &self.body_raw) {
            (Some(v), None) => Ok(v.to_string().into_bytes()),
            (None, Some(raw)) => Ok(raw.clone().into_bytes()),
            _ => Err("a fixture has exactly one of `body` and `body_raw`".into()),
        }
    }

    /// Signs this fixture with its source's scheme and first secret at `now`.
    pub fn sign(&self, config: &Config, now: SystemTime) -> Result<SignedRequest, String> {
        let source_config = config
            .sources
            .get(&self.source)
            .ok_or_else(|| format!("source `{}` is not in {}", self.source, config.file))?;
        let source = Source::from_config(&self.source, source_config, &config.file, &|k| {
            std::env::var(k).ok()
        })
        .map_err(|e| e.to_string())?;
        let body = self.body_bytes()?;
        let mut headers: Vec<(String, String)> =
            vec![("content-type".into(), "application/json".into())];
        headers.extend(
            self.headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
        );
        for (k, v) in source.sign(&self.id, &body, now) {
            headers.retain(|(h, _)| !h.eq_ignore_ascii_case(&k));
            headers.push((k, v));
        }
        Ok(SignedRequest {
            path: format!("/webhooks/{}", self.source),
            headers,
            body,
        })
    }
}

/// `webhook-inbox sign`: the request as text, headers then a blank line then the body.
pub fn sign_fixture(config: &Config, path: &Path) -> Result<String, String> {
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
