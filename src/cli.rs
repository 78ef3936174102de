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
        /// The configuration file.
        #[command(flatten)]
        config: ConfigPath,
    },
    /// Run every start-up check without binding a port or opening the store.
    CheckConfig {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigPath,
    },
    /// Sign fixtures like their sender would and send them.
    Replay {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigPath,
        /// Base URL of the service (default: `server.listen` of the config).
        #[arg(long)]
        target: Option<String>,
        /// Send each fixture this many times.
        #[arg(long, default_value_t = 1)]
        times: usize,
        /// Requests in flight at once (copies of one fixture race each other).
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Send a bad signature; every answer must be 401.
        #[arg(long)]
        tamper: bool,
        /// Give every copy a fresh delivery id.
        #[arg(long)]
        new_ids: bool,
        /// Fixture files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Stored deliveries.
    Deliveries {
        /// What to do with them.
        #[command(subcommand)]
        command: DeliveriesCommand,
    },
    /// The store of a stopped server.
    Store {
        /// What to do with it.
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Print the headers and body a sender would send for a fixture, signed now.
    Sign {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigPath,
        /// Fixture file (`fixtures/<source>/<name>.json`).
        fixture: PathBuf,
    },
}

/// `store …`, on the data directory of a stopped server.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// List every breach of design.md's invariants 1, 2 and 4 (exit 1 if any) and what a
    /// crash left behind; `--repair` puts back what can be put back.
    Check {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigPath,
        /// Repair: put back missing queue entries, remove leftovers.
        #[arg(long)]
        repair: bool,
    },
}

/// `--config FILE`, shared by every command that reads the configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigPath {
    /// Configuration file.
    #[arg(long = "config", value_name = "FILE", default_value = "config.toml")]
    pub path: PathBuf,
}

impl std::ops::Deref for ConfigPath {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

/// Options shared by the `deliveries` commands.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The configuration file.
    #[command(flatten)]
    pub config: ConfigPath,
    /// Admin API base URL (default: `http://{server.admin_listen}`).
    #[arg(long)]
    pub admin: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `deliveries …`, through the admin API.
#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// Stored deliveries, newest first.
    List {
        #[command(flatten)]
        /// Common options.
        common: AdminArgs,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Only this status: pending, running, failed, dead, succeeded, in_progress.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Continue after a previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// One delivery: record, handler states, attempts, last errors.
    Show {
        #[command(flatten)]
        /// Common options.
        common: AdminArgs,
        /// Source name.
        source: String,
        /// Delivery id.
        id: String,
    },
    /// Put a delivery's unfinished handlers back in line (succeeded ones never run again);
    /// with `--all`, every failed or dead pair a filter selects.
    Retry {
        #[command(flatten)]
        /// Common options.
        common: AdminArgs,
        /// Source name (of one delivery; with `--all`, a filter).
        #[arg(required_unless_present = "all")]
        source: Option<String>,
        /// Delivery id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every pair the filter selects: `--source`, `--handler`, `--status`, `--since`,
        /// `--until`.
        #[arg(long)]
        all: bool,
        /// With `--all`: only this source.
        #[arg(long = "source", requires = "all", conflicts_with = "source")]
        source_filter: Option<String>,
        /// With `--all`: only this handler.
        #[arg(long, requires = "all")]
        handler: Option<String>,
        /// With `--all`: `dead` (default) or `failed`.
        #[arg(long, requires = "all")]
        status: Option<String>,
        /// With `--all`: only deliveries received at or after this RFC 3339 time.
        #[arg(long, requires = "all")]
        since: Option<String>,
        /// With `--all`: only deliveries received before this RFC 3339 time.
        #[arg(long, requires = "all")]
        until: Option<String>,
    },
    /// Write a stored delivery as a fixture. Asks the admin API; with `--data-dir`, reads
    /// the data directory of a stopped server instead.
    Export {
        #[command(flatten)]
        /// Common options.
        common: AdminArgs,
        /// Read `storage.path` directly (the server must be stopped).
        #[arg(long)]
        data_dir: bool,
        /// Source name.
        source: String,
        /// Delivery id.
        id: String,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { config } => serve(config.path).await,
        Command::CheckConfig { config } => match load(&config.path)
            .map_err(CliError::from)
            .and_then(|c| Ok(ApplicationBuilder::new(c).validate()?))
        {
            Ok(()) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Replay {
            config,
            target,
            times,
            concurrency,
            tamper,
            new_ids,
            paths,
        } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            let options = crate::replay::ReplayOptions {
                target: target.unwrap_or_else(|| format!("http://{}", config.server.listen)),
                times,
                concurrency,
                tamper,
                new_ids,
                verbose: true,
            };
            replay(&config, &paths, &options).await
        }
        Command::Deliveries { command } => deliveries(command).await,
        Command::Store {
            command: StoreCommand::Check { config, repair },
        } => store_check(&config, repair),
        Command::Sign { config, fixture } => {
            match load(&config)
                .map_err(CliError::from)
                .and_then(|c| Ok(crate::fixture::sign_fixture(&c, &fixture)?))
            {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}

async fn replay(
    config: &Config,
    paths: &[PathBuf],
    options: &crate::replay::ReplayOptions,
) -> ExitCode {
    match crate::replay::run(config, paths, options).await {
        Ok(summary) => {
            println!("{}", summary.report());
            if summary.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => fail(e),
    }
}

/// The top of the command line: any error, shown as its message.
type CliError = Box<dyn std::error::Error>;

async fn deliveries(command: DeliveriesCommand) -> ExitCode {
    let result: Result<(), CliError> = async {
        let common = match &command {
            DeliveriesCommand::List { common, .. }
            | DeliveriesCommand::Show { common, .. }
            | DeliveriesCommand::Retry { common, .. }
            | DeliveriesCommand::Export { common, .. } => common,
        };
        let config = load(&common.config)?;
        let client = crate::admin_client::AdminClient::new(&config, common.admin.as_deref())?;
        let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
        match &command {
            DeliveriesCommand::List {
                source,
                status,
                limit,
                cursor,
                ..
            } => {
                let page = client
                    .list(
                        source.as_deref(),
                        status.as_deref(),
                        *limit,
                        cursor.as_deref(),
                    )
                    .await?;
                let text = if common.json {
                    pretty(&page)
                } else {
                    crate::admin_client::render_list(&page)
                };
                Ok(crate::admin_client::emit(&text, None)?)
            }
            DeliveriesCommand::Show { source, id, .. } => {
                let d = client.show(source, id).await?;
                let text = if common.json {
                    pretty(&d)
                } else {
                    crate::admin_client::render_show(&d)
                };
                Ok(crate::admin_client::emit(&text, None)?)
            }
            DeliveriesCommand::Retry {
                all: true,
                source,
                source_filter,
                handler,
                status,
                since,
                until,
                ..
            } => {
                let filter = serde_json::json!({
                    "source": source_filter.as_ref().or(source.as_ref()),
                    "handler": handler,
                    "status": status,
                    "since": since,
                    "until": until,
                });
                let r = client.retry_all(&filter).await?;
                let text = if common.json {
                    pretty(&r)
                } else {
                    format!("requeued {} pair(s)", r["retried"])
                };
                Ok(crate::admin_client::emit(&text, None)?)
            }
            DeliveriesCommand::Retry { source, id, .. } => {
                let (Some(source), Some(id)) = (source, id) else {
                    return Err("give SOURCE ID, or --all".into());
                };
                let r = client.retry(source, id).await?;
                let text = if common.json {
                    pretty(&r)
                } else {
                    let names: Vec<String> = r["requeued"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default();
                    if names.is_empty() {
                        "nothing to retry: no failed or dead handler".to_owned()
                    } else {
                        format!("requeued: {}", names.join(", "))
                    }
                };
                Ok(crate::admin_client::emit(&text, None)?)
            }
            DeliveriesCommand::Export {
                data_dir,
                source,
                id,
                out,
                ..
            } => {
                let text = if *data_dir {
                    crate::export::export_from_data_dir(&config, source, id).await?
                } else {
                    pretty(&client.fixture(source, id).await?)
                };
                Ok(crate::admin_client::emit(&text, out.as_deref())?)
            }
        }
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// `store check [--repair]`: exit 0 when nothing breaks an invariant (after the repair,
/// with `--repair`), 1 when something does, 2 when the store cannot be read.
fn store_check(path: &std::path::Path, repair: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let options = crate::store::SledOptions {
        repair_on_open: false,
        ..Default::default()
    };
    let store = match crate::store::SledStore::open_with(
        &config.storage.path,
        config.storage.durability,
        config.storage.cache_capacity,
        options,
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}: {e}", config.storage.path.display());
            return ExitCode::from(2);
        }
    };
    let report = match store.check(repair, crate::clock::Clock::System.now_ms()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    for v in &report.violations {
        println!("violation: {v}");
    }
    for l in &report.leftovers {
        println!("leftover: {l}");
    }
    let verb = if repair { "repaired" } else { "found" };
    println!(
        "{} deliveries checked: {} violation(s), {} leftover(s) {verb}",
        report.deliveries,
        report.violations.len(),
        report.leftovers.len()
    );
    if report.violations.is_empty() || repair {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn load(path: &std::path::Path) -> Result<Config, crate::config::ConfigError> {
    let mut config = Config::load(path)?;
    config.apply_env_overrides(&|k| std::env::var(k).ok())?;
    Ok(config)
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
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
    let shutdown = crate::startup::shutdown_signal();
    // The bound ports, which differ from the configured ones when those are 0.
    listen.set_port(app.port());
    admin.set_port(app.admin_port());
    tracing::info!(%listen, %admin, "webhook-inbox serving");
    match app.run_until_stopped(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.to_string()),
    }
}
