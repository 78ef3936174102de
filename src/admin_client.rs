//! `webhook-inbox deliveries list|show|retry|export`: the admin API from the command line,
//! as readable tables or, with `--json`, the API's own JSON.

use std::path::Path;

use crate::config::Config;

/// Why an admin API call gave no answer to show.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// The admin URL does not parse, or takes no path.
    #[error("admin url `{0}` is not a base URL")]
    Url(String),
    /// The request did not get an answer.
    #[error("{url}: {source}")]
    Request {
        /// The URL called.
        url: reqwest::Url,
        /// The cause.
        source: reqwest::Error,
    },
    /// The answer is not JSON.
    #[error("{url}: answered {status} without JSON: {source}")]
    NotJson {
        /// The URL called.
        url: reqwest::Url,
        /// Its status.
        status: reqwest::StatusCode,
        /// The cause.
        source: reqwest::Error,
    },
    /// The API answered with an error.
    #[error("{status}: {message}")]
    Api {
        /// Its status.
        status: reqwest::StatusCode,
        /// Its `message`.
        message: String,
    },
    /// The output file could not be written.
    #[error("{}: {source}", path.display())]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Where the admin API is and how to authenticate.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: reqwest::Url,
    token: Option<String>,
    client: reqwest::Client,
}

impl AdminClient {
    /// From the config: `http://{server.admin_listen}` unless `url` is given, the token from
    /// the variable `admin.token_env` names.
    pub fn new(config: &Config, url: Option<&str>) -> Result<AdminClient, AdminClientError> {
        let base = url
            .map(str::to_owned)
            .unwrap_or_else(|| format!("http://{}", config.server.admin_listen));
        let base = reqwest::Url::parse(&base).map_err(|_| AdminClientError::Url(base))?;
        Ok(AdminClient {
            base,
            token: std::env::var(&config.admin.token_env).ok(),
            client: reqwest::Client::new(),
        })
    }

    fn url(&self, segments: &[&str]) -> Result<reqwest::Url, AdminClientError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|_| AdminClientError::Url(self.base.to_string()))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        url: reqwest::Url,
    ) -> Result<serde_json::Value, AdminClientError> {
        let request = self.client.request(method, url.clone());
        self.send(url, request).await
    }

    /// Sends `request` (with the token) and reads the API's JSON answer.
    async fn send(
        &self,
        url: reqwest::Url,
        mut request: reqwest::RequestBuilder,
    ) -> Result<serde_json::Value, AdminClientError> {
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|source| AdminClientError::Request {
                url: url.clone(),
                source,
            })?;
        let status = response.status();
        let body: serde_json::Value =
            response
                .json()
                .await
                .map_err(|source| AdminClientError::NotJson {
                    url: url.clone(),
                    status,
                    source,
                })?;
        if !status.is_success() {
            return Err(AdminClientError::Api {
                status,
                message: body["message"].as_str().unwrap_or("no message").to_owned(),
            });
        }
        Ok(body)
    }

    /// `GET /admin/deliveries`.
    pub async fn list(
        &self,
        source: Option<&str>,
        status: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<serde_json::Value, AdminClientError> {
        let mut url = self.url(&["admin", "deliveries"])?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("limit", &limit.to_string());
            if let Some(s) = source {
                q.append_pair("source", s);
            }
            if let Some(s) = status {
                q.append_pair("status", s);
            }
            if let Some(c) = cursor {
                q.append_pair("cursor", c);
            }
        }
        self.call(reqwest::Method::GET, url).await
    }

    /// `GET /admin/deliveries/{source}/{id}`.
    pub async fn show(
        &self,
        source: &str,
        id: &str,
    ) -> Result<serde_json::Value, AdminClientError> {
        let url = self.url(&["admin", "deliveries", source, id])?;
        self.call(reqwest::Method::GET, url).await
    }

    /// `POST /admin/retry` with a filter (`source`, `handler`, `status`, `since`, `until`).
    pub async fn retry_all(
        &self,
        filter: &serde_json::Value,
    ) -> Result<serde_json::Value, AdminClientError> {
        let url = self.url(&["admin", "retry"])?;
        let request = self.client.post(url.clone()).json(filter);
        self.send(url, request).await
    }

    /// `POST /admin/deliveries/{source}/{id}/retry`.
    pub async fn retry(
        &self,
        source: &str,
        id: &str,
    ) -> Result<serde_json::Value, AdminClientError> {
        let url = self.url(&["admin", "deliveries", source, id, "retry"])?;
        self.call(reqwest::Method::POST, url).await
    }

    /// `GET /admin/deliveries/{source}/{id}/fixture`.
    pub async fn fixture(
        &self,
        source: &str,
        id: &str,
    ) -> Result<serde_json::Value, AdminClientError> {
        let url = self.url(&["admin", "deliveries", source, id, "fixture"])?;
        self.call(reqwest::Method::GET, url).await
    }

    /// `GET /admin/handlers`.
    pub async fn handlers(&self) -> Result<serde_json::Value, AdminClientError> {
        let url = self.url(&["admin", "handlers"])?;
        self.call(reqwest::Method::GET, url).await
    }

    /// `POST /admin/handlers/{name}/pause` or `…/resume`.
    pub async fn set_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<serde_json::Value, AdminClientError> {
        let verb = if paused { "pause" } else { "resume" };
        let url = self.url(&["admin", "handlers", name, verb])?;
        self.call(reqwest::Method::POST, url).await
    }
}

impl AdminClient {
    /// `POST /admin/handlers/{name}/backfill` with `body`, reading its progress lines:
    /// `progress` is called with each batch's line; the last line (the report) is returned.
    pub async fn backfill(
        &self,
        name: &str,
        body: &serde_json::Value,
        mut progress: impl FnMut(&serde_json::Value),
    ) -> Result<serde_json::Value, AdminClientError> {
        use futures_util::StreamExt as _;
        let url = self.url(&["admin", "handlers", name, "backfill"])?;
        let mut request = self
            .client
            .post(url.clone())
            .header(reqwest::header::ACCEPT, "application/x-ndjson")
            .json(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let failed = |source| AdminClientError::Request {
            url: url.clone(),
            source,
        };
        let response = request.send().await.map_err(failed)?;
        let status = response.status();
        if !status.is_success() {
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            return Err(AdminClientError::Api {
                status,
                message: body["message"].as_str().unwrap_or("no message").to_owned(),
            });
        }
        let mut stream = response.bytes_stream();
        let mut pending = Vec::new();
        let mut last = serde_json::Value::Null;
        while let Some(chunk) = stream.next().await {
            pending.extend_from_slice(&chunk.map_err(failed)?);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let Ok(value) = serde_json::from_slice::<serde_json::Value>(&line) else {
                    continue;
                };
                if value.get("done").is_some() || value.get("error").is_some() {
                    last = value;
                } else {
                    progress(&value);
                }
            }
        }
        if let Some(message) = last.get("message").and_then(|m| m.as_str()) {
            return Err(AdminClientError::Api {
                status: reqwest::StatusCode::SERVICE_UNAVAILABLE,
                message: message.to_owned(),
            });
        }
        if last.is_null() {
            return Err(AdminClientError::Api {
                status,
                message: "the backfill's answer ended before its report".into(),
            });
        }
        Ok(last)
    }
}

/// The handlers as a table.
pub fn render_handlers(list: &serde_json::Value) -> String {
    let rows: Vec<Vec<String>> = list["handlers"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|h| {
            vec![
                text(&h["name"]),
                if h["paused"].as_bool() == Some(true) {
                    "paused".into()
                } else {
                    "running".into()
                },
                h["due"].to_string(),
                h["waiting"].to_string(),
                h["running"].to_string(),
                h["failed"].to_string(),
                h["dead"].to_string(),
                text(&h["last_error"]),
            ]
        })
        .collect();
    table(
        &[
            "handler",
            "state",
            "due",
            "waiting",
            "running",
            "failed",
            "dead",
            "last_error",
        ],
        &rows,
    )
}

/// Renders rows as a table with aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(header.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.clone()));
    }
    out
}

/// A value as one line of terminal text: every control character (C0, DEL, C1) escaped as
/// Rust writes it (`\u{1b}`, `\n`), so a program's stderr or a sender's header cannot move
/// the cursor, recolour the terminal or set its title (OSC) when an operator reads it.
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => crate::domain::printable(s),
        serde_json::Value::Null => "-".into(),
        other => crate::domain::printable(&other.to_string()),
    }
}

/// The listing as a table.
pub fn render_list(page: &serde_json::Value) -> String {
    let rows: Vec<Vec<String>> = page["deliveries"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|d| {
            let r = &d["record"];
            vec![
                crate::clock::rfc3339_ms(r["received_at_ms"].as_u64().unwrap_or(0)),
                text(&r["source"]),
                text(&r["id"]),
                text(&r["event_type"]),
                text(&d["status"]),
            ]
        })
        .collect();
    let mut out = table(
        &["received_at", "source", "id", "event_type", "status"],
        &rows,
    );
    if let Some(c) = page["next_cursor"].as_str() {
        out.push_str(&format!("\nmore: --cursor {c}"));
    }
    out
}

/// One delivery with its handlers, as text.
pub fn render_show(d: &serde_json::Value) -> String {
    let r = &d["record"];
    let mut out = format!(
        "source       {}\nid           {}\nevent_type   {}\nreceived_at  {}\nstatus       {}\nfingerprint  {}\n\n",
        text(&r["source"]),
        text(&r["id"]),
        text(&r["event_type"]),
        text(&d["received_at"]),
        text(&d["status"]),
        text(&r["fingerprint"]),
    );
    let rows: Vec<Vec<String>> = d["handlers"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|h| {
            let s = &h["state"];
            vec![
                text(&h["name"]),
                text(&s["status"]),
                text(&s["attempts"]),
                text(&s["last_error"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &["handler", "status", "attempts", "last_error"],
        &rows,
    ));
    out
}

/// Writes `value` pretty to `out` (a file) or stdout.
pub fn emit(value: &str, out: Option<&Path>) -> Result<(), AdminClientError> {
    match out {
        Some(path) => {
            std::fs::write(path, format!("{value}\n")).map_err(|source| AdminClientError::Write {
                path: path.to_owned(),
                source,
            })
        }
        None => {
            println!("{value}");
            Ok(())
        }
    }
}
