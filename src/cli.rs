//! The command line: `serve`, `check-config`, `sign`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::startup::ApplicationBuilder;
use crate::telemetry::LogFormat;

/// An idempotent webhook receiver.
#[derive(Debug, Parser)]
#[command(name = "webhook-inbox", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve webhooks until SIGINT/SIGTERM.
    Serve {
        /// Configuration file.
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Run every start-up check without binding a port or opening the store.
    CheckConfig {
        /// Configuration file.
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Print the headers and body a sender would send for a fixture, signed now.
    Sign {
        /// Configuration file.
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
        /// Fixture file (`fixtures/<source>/<name>.json`).
        fixture: PathBuf,
    },
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { config } => serve(config).await,
        Command::CheckConfig { config } => match load(&config).and_then(|c| {
            ApplicationBuilder::new(c)
                .validate()
                .map_err(|e| e.to_string())
        }) {
            Ok(()) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Sign { config, fixture } => {
            match load(&config).and_then(|c| crate::fixture::sign_fixture(&c, &fixture)) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, String> {
    Config::load(path).map_err(|e| e.to_string())
}

fn fail(message: String) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

async fn serve(path: PathBuf) -> ExitCode {
    let config = match load(&path) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let (mut listen, mut admin) = (config.server.listen, config.server.admin_listen);
    let app = match ApplicationBuilder::new(config).build().await {
        Ok(app) => app,
        Err(e) => return fail(e.to_string()),
    };
    // The bound ports, which differ from the configured ones when those are 0.
    listen.set_port(app.port());
    admin.set_port(app.admin_port());
    tracing::info!(%listen, %admin, "webhook-inbox serving");
    match app.run_until_stopped(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.to_string()),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown signal received");
}
