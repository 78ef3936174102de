//! The `webhook-inbox` binary: parse the command line, set up logs, run the subcommand.

use std::process::ExitCode;

use clap::Parser as _;
use webhook_inbox::cli::{self, Cli};

/// sled copies a leaf on every write, so the service allocates and frees a lot; glibc's
/// malloc took about a fifth of the server's CPU under load (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The environment variable tokio reads for its worker count; honoured here too, over
/// [`runtime_threads`]'s default.
const WORKER_THREADS_ENV: &str = "TOKIO_WORKER_THREADS";

/// Worker threads of the main runtime on `cores` cores, `configured` being the value of
/// `TOKIO_WORKER_THREADS` if set. The main runtime runs the dispatcher, the handlers and the
/// background work. The public and admin servers' actix workers are threads with runtimes
/// of their own beside it (`server.workers`, one per core by default), so a runtime with a
/// thread per core as well puts two busy threads on every core. Half the cores (at least
/// one) unless `TOKIO_WORKER_THREADS` says otherwise: on two cores, one thread here instead
/// of two took 4–7 % less CPU per delivery, acks up and runs keeping up (BENCHMARKS.md,
/// session 16).
fn runtime_threads(configured: Option<&str>, cores: usize) -> usize {
    configured
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or((cores / 2).max(1))
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_threads(
            std::env::var(WORKER_THREADS_ENV).ok().as_deref(),
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        ))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let cli = Cli::parse();
        let otlp = cli::otlp_settings(&cli);
        if let Err(e) = webhook_inbox::telemetry::init(cli.log_format, otlp.as_ref()) {
            tracing::warn!(error = %e, "traces are not exported");
        }
        cli::run(cli).await
    })
}

#[cfg(test)]
mod tests {
    use super::runtime_threads;

    #[test]
    fn half_the_cores_at_least_one_unless_the_environment_says_otherwise() {
        assert_eq!(runtime_threads(None, 1), 1);
        assert_eq!(runtime_threads(None, 2), 1);
        assert_eq!(runtime_threads(None, 8), 4);
        assert_eq!(runtime_threads(Some("3"), 2), 3);
        assert_eq!(runtime_threads(Some(" 6 "), 2), 6);
        // Not a positive count: the default.
        assert_eq!(runtime_threads(Some("0"), 8), 4);
        assert_eq!(runtime_threads(Some("many"), 8), 4);
    }
}
