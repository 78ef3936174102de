//! `kind = "command"`: runs a program per delivery, in any language.
//!
//! Contract: no shell; the raw body on stdin; env `WEBHOOK_SOURCE`, `WEBHOOK_ID`,
//! `WEBHOOK_EVENT_TYPE`, `WEBHOOK_ATTEMPT`, `IDEMPOTENCY_KEY`. Exit 0 succeeded; exit 65
//! (`EX_DATAERR`) failed for good; anything else, a signal, or the timeout is retried.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{Delivery, Handler, HandlerContext, HandlerError};

/// Exit status meaning "never retry".
pub const EXIT_PERMANENT: i32 = 65;
/// How much of the program's stderr is kept as the error.
const STDERR_KEPT: usize = 1024;

/// Runs `program args…` for each delivery.
#[derive(Debug, Clone)]
pub struct CommandHandler {
    argv: Vec<String>,
    timeout: Duration,
}

impl CommandHandler {
    /// `argv[0]` is the program; it is killed and the run retried after `timeout`.
    pub fn new(argv: Vec<String>, timeout: Duration) -> CommandHandler {
        CommandHandler { argv, timeout }
    }
}

#[async_trait]
impl Handler for CommandHandler {
    async fn handle(&self, d: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let Some((program, args)) = self.argv.split_first() else {
            return Err(HandlerError::Permanent("no program configured".into()));
        };
        let mut child = Command::new(program)
            .args(args)
            .env("WEBHOOK_SOURCE", &d.source)
            .env("WEBHOOK_ID", &d.id)
            .env("WEBHOOK_EVENT_TYPE", d.event_type.as_deref().unwrap_or(""))
            .env("WEBHOOK_ATTEMPT", d.attempt.to_string())
            .env("IDEMPOTENCY_KEY", &ctx.idempotency_key)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| HandlerError::Retryable(format!("cannot start `{program}`: {e}")))?;

        let mut stdin = child.stdin.take();
        let body = d.body.clone();
        let run = async move {
            if let Some(stdin) = stdin.as_mut() {
                // A program that exits without reading its input is fine: ignore EPIPE.
                let _ = stdin.write_all(&body).await;
            }
            drop(stdin);
            child.wait_with_output().await
        };
        let output = tokio::select! {
            out = tokio::time::timeout(self.timeout, run) => match out {
                Ok(out) => out.map_err(|e| HandlerError::Retryable(format!("waiting for `{program}`: {e}")))?,
                Err(_) => return Err(HandlerError::Retryable(format!(
                    "`{program}` timed out after {}", humantime::format_duration(self.timeout)
                ))),
            },
            () = ctx.shutdown.cancelled() => {
                return Err(HandlerError::Retryable("stopped by shutdown".into()));
            }
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        let tail: String = stderr
            .char_indices()
            .rev()
            .take_while(|(i, _)| stderr.len() - i <= STDERR_KEPT)
            .map(|(_, c)| c)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        match output.status.code() {
            Some(0) => Ok(()),
            Some(EXIT_PERMANENT) => Err(HandlerError::Permanent(format!(
                "`{program}` exited {EXIT_PERMANENT}: {tail}"
            ))),
            Some(code) => Err(HandlerError::Retryable(format!(
                "`{program}` exited {code}: {tail}"
            ))),
            None => Err(HandlerError::Retryable(format!(
                "`{program}` was killed by a signal: {tail}"
            ))),
        }
    }
}
