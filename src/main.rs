//! The `webhook-inbox` binary: parse the command line, set up logs, run the subcommand.

use std::process::ExitCode;

use clap::Parser as _;
use webhook_inbox::cli::{self, Cli};

/// sled copies a leaf on every write, so the service allocates and frees a lot; glibc's
/// malloc took about a fifth of the server's CPU under load (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let otlp = cli::otlp_settings(&cli);
    if let Err(e) = webhook_inbox::telemetry::init(cli.log_format, otlp.as_ref()) {
        tracing::warn!(error = %e, "traces are not exported");
    }
    cli::run(cli).await
}
