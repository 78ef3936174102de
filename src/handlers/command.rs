//! `kind = "command"`: runs a program per delivery, in any language.
//!
//! Contract: no shell; the raw body on stdin; env `WEBHOOK_SOURCE`, `WEBHOOK_ID`,
//! `WEBHOOK_EVENT_TYPE`, `WEBHOOK_ATTEMPT`, `IDEMPOTENCY_KEY`, and for `webhook-inbox
//! call` `WEBHOOK_HANDLER` and `WEBHOOK_INBOX_CALLS` (the run's loopback URL, valid while
//! the run lives; see [`crate::calls::loopback`]). Exit 0 succeeded; exit 65
//! (`EX_DATAERR`) failed for good; anything else, a signal, or the timeout is retried.
//!
//! The program gets a clean environment: only `PATH`, `HOME` and `LANG` of the service's
//! own, the variables above, and the names listed in the handler's `env` — never the admin
//! token or a source's `secrets_env` unless listed. It runs in a process group of its own,
//! and a timeout (or shutdown) kills the whole group, so a shell script's children do not
//! outlive it.

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
/// How much of the program's stderr is held while it runs (its end; the rest is counted).
const STDERR_READ_KEPT: usize = 4 * STDERR_KEPT;

/// Variables of the service's environment every program gets.
pub const INHERITED_ENV: [&str; 3] = ["PATH", "HOME", "LANG"];

/// Runs `program args…` for each delivery.
#[derive(Debug, Clone)]
pub struct CommandHandler {
    argv: Vec<String>,
    timeout: Duration,
    pass_env: Vec<String>,
}

impl CommandHandler {
    /// `argv[0]` is the program; it is killed (with its process group) and the run retried
    /// after `timeout`.
    pub fn new(argv: Vec<String>, timeout: Duration) -> CommandHandler {
        CommandHandler {
            argv,
            timeout,
            pass_env: Vec::new(),
        }
    }

    /// Also passes these variables of the service's environment (the handler's `env`).
    pub fn with_env(mut self, names: Vec<String>) -> CommandHandler {
        self.pass_env = names;
        self
    }
}

/// The last [`STDERR_READ_KEPT`] bytes of the program's stderr, read as it comes, and how
/// many bytes came before them: memory stays bounded whatever the program writes.
async fn stderr_tail(stderr: Option<tokio::process::ChildStderr>) -> (Vec<u8>, u64) {
    use tokio::io::AsyncReadExt as _;
    let Some(mut stderr) = stderr else {
        return (Vec::new(), 0);
    };
    let mut tail = std::collections::VecDeque::with_capacity(STDERR_READ_KEPT);
    let mut dropped = 0u64;
    let mut chunk = [0u8; 8192];
    while let Ok(n) = stderr.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        tail.extend(&chunk[..n]);
        while tail.len() > STDERR_READ_KEPT {
            tail.pop_front();
            dropped += 1;
        }
    }
    (tail.into_iter().collect(), dropped)
}

/// Ends the program's whole process group (it leads it: `process_group(0)`).
fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // Already gone is fine: the group may have exited on its own.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[async_trait]
impl Handler for CommandHandler {
    async fn handle(&self, d: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError> {
        let Some((program, args)) = self.argv.split_first() else {
            return Err(HandlerError::Permanent("no program configured".into()));
        };
        let mut command = Command::new(program);
        command.env_clear();
        for name in INHERITED_ENV
            .iter()
            .copied()
            .chain(self.pass_env.iter().map(String::as_str))
        {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        // Kept until the program has ended: its token is refused after that.
        let loopback = ctx.calls.open_loopback();
        if let Some(loopback) = &loopback {
            command.env(crate::calls::loopback::ENV_URL, &loopback.url);
        }
        let mut child = command
            .args(args)
            .env("WEBHOOK_HANDLER", &ctx.calls.job().handler)
            .process_group(0)
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

        let pid = child.id();
        let mut stdin = child.stdin.take();
        let stderr = child.stderr.take();
        let body = d.body.clone();
        let run = async move {
            let feed = async {
                if let Some(stdin) = stdin.as_mut() {
                    // A program that exits without reading its input is fine: ignore EPIPE.
                    let _ = stdin.write_all(&body).await;
                }
                drop(stdin);
            };
            let (_, tail, status) = tokio::join!(feed, stderr_tail(stderr), child.wait());
            status.map(|status| (status, tail))
        };
        let (status, (tail, dropped)) = tokio::select! {
            out = tokio::time::timeout(self.timeout, run) => match out {
                Ok(out) => out.map_err(|e| HandlerError::Retryable(format!("waiting for `{program}`: {e}")))?,
                Err(_) => {
                    kill_group(pid);
                    return Err(HandlerError::Retryable(format!(
                        "`{program}` timed out after {}", humantime::format_duration(self.timeout)
                    )));
                }
            },
            () = ctx.shutdown.cancelled() => {
                kill_group(pid);
                return Err(HandlerError::Retryable("stopped by shutdown".into()));
            }
        };
        let stderr = String::from_utf8_lossy(&tail);
        let stderr = stderr.trim();
        let kept: String = stderr
            .char_indices()
            .rev()
            .take_while(|(i, _)| stderr.len() - i <= STDERR_KEPT)
            .map(|(_, c)| c)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let dropped = dropped + (stderr.len() - kept.len()) as u64;
        let tail = if dropped > 0 {
            format!("({dropped} earlier bytes of stderr not kept) {kept}")
        } else {
            kept
        };
        match status.code() {
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
