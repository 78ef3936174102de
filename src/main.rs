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
    webhook_inbox::telemetry::init(cli.log_format);
    cli::run(cli).await
}
