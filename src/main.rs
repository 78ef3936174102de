//! The `webhook-inbox` binary: parse the command line, set up logs, run the subcommand.

use std::process::ExitCode;

use clap::Parser as _;
use webhook_inbox::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    webhook_inbox::telemetry::init(cli.log_format);
    cli::run(cli).await
}
