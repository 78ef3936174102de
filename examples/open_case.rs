//! A handler plugin in your own `main`: opens a case per `application.created`.
//!
//! The effect is idempotent on the delivery's key twice over:
//! - locally, the case file is named by the idempotency key and created with `create_new`,
//!   so a re-run (a retry, or a run interrupted by a crash) finds it and does nothing;
//! - downstream, the call to the case API (optional, `CASE_API_URL`) carries the same key
//!   as `Idempotency-Key`, so the API can deduplicate it too.
//!
//! Run it with the repository's config (serves on 127.0.0.1:8080, cases in `./cases`):
//!
//! ```sh
//! cargo run --example open_case -- config.toml
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use webhook_inbox::config::Config;
use webhook_inbox::{
    ApplicationBuilder, Delivery, Handler, HandlerContext, HandlerError, Registration,
};

/// Opens one case per application, in `cases_dir`, and tells the case API.
pub struct OpenCase {
    cases_dir: PathBuf,
    case_api: Option<String>,
    client: reqwest::Client,
}

impl OpenCase {
    /// Cases go to `cases_dir`; `case_api`, if set, is POSTed each new case.
    pub fn new(cases_dir: PathBuf, case_api: Option<String>) -> OpenCase {
        OpenCase {
            cases_dir,
            case_api,
            client: reqwest::Client::new(),
        }
    }
}

#[webhook_inbox::async_trait]
impl Handler for OpenCase {
    async fn handle(&self, d: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let json = d
            .json()
            .ok_or_else(|| HandlerError::Permanent("body is not JSON".into()))?;
        let application_id = json
            .pointer("/data/application/application_id")
            .and_then(|v| v.as_str())
            .ok_or_else(|| HandlerError::Permanent("no /data/application/application_id".into()))?;
        let case = serde_json::json!({
            "application_id": application_id,
            "source": d.source,
            "delivery_id": d.id,
            "opened_on_attempt": d.attempt,
        });

        // Downstream first, with the key: a retry after a failure here sends the same key.
        if let Some(url) = &self.case_api {
            let response = self
                .client
                .post(url)
                .header("Idempotency-Key", &ctx.idempotency_key)
                .json(&case)
                .send()
                .await
                .map_err(|e| HandlerError::Retryable(format!("case API: {e}")))?;
            if response.status().is_client_error() {
                return Err(HandlerError::Permanent(format!(
                    "case API: {}",
                    response.status()
                )));
            }
            if !response.status().is_success() {
                return Err(HandlerError::Retryable(format!(
                    "case API: {}",
                    response.status()
                )));
            }
        }

        std::fs::create_dir_all(&self.cases_dir)
            .map_err(|e| HandlerError::Retryable(format!("cases dir: {e}")))?;
        let path = self.cases_dir.join(format!("{}.json", ctx.idempotency_key));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => serde_json::to_writer_pretty(file, &case)
                .map_err(|e| HandlerError::Retryable(format!("writing the case: {e}"))),
            // Already opened by an earlier run with this key: nothing more to do.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(HandlerError::Retryable(format!("opening the case: {e}"))),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = webhook_inbox::telemetry::init(webhook_inbox::telemetry::LogFormat::Pretty, None);
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "config.toml".into());
    let config = match Config::load(path.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handler = OpenCase::new(PathBuf::from("cases"), std::env::var("CASE_API_URL").ok());
    let app = ApplicationBuilder::new(config)
        .handler(
            Registration::new("open-case", handler)
                .source("credicorp")
                .events(["application.created"]),
        )
        .build()
        .await;
    let app = match app {
        Ok(app) => app,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SIGINT or SIGTERM: a service manager's stop finishes in-flight work gracefully.
    match app
        .run_until_stopped(webhook_inbox::shutdown_signal())
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use webhook_inbox::testing;

    fn config() -> Config {
        Config::load(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml").as_ref()).expect("config")
    }

    #[tokio::test]
    async fn a_fixture_opens_one_case_even_when_run_twice() {
        let dir = tempfile::TempDir::new().expect("dir");
        let handler = OpenCase::new(dir.path().to_path_buf(), None);
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/credicorp/application.created.json"
        );
        let delivery =
            testing::delivery_from_fixture(&config(), fixture.as_ref()).expect("fixture");
        assert_eq!(delivery.event_type.as_deref(), Some("application.created"));
        let cases = || {
            std::fs::read_dir(dir.path())
                .map(|d| d.count())
                .unwrap_or(0)
        };
        testing::assert_one_effect(&handler, "open-case", &delivery, cases).await;
        let case: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                std::fs::read_dir(dir.path())
                    .expect("dir")
                    .next()
                    .expect("case")
                    .expect("entry")
                    .path(),
            )
            .expect("read"),
        )
        .expect("json");
        assert_eq!(case["application_id"], "app_01JD8Z5K3M4N");
    }

    #[tokio::test]
    async fn it_meets_the_handler_contract() {
        let dir = tempfile::TempDir::new().expect("dir");
        let handler = OpenCase::new(dir.path().to_path_buf(), None);
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/credicorp/application.created.json"
        );
        let delivery =
            testing::delivery_from_fixture(&config(), fixture.as_ref()).expect("fixture");
        testing::check_conformance(&handler, "open-case", &delivery)
            .await
            .expect("conformant");
    }
}
