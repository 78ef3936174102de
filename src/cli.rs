//! The command line: `serve`, `check-config`, `sign`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::startup::ApplicationBuilder;
use crate::store::Opening;
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
    /// Handlers: list them, pause or resume one (through the admin API).
    Handlers {
        /// What to do.
        #[command(subcommand)]
        command: HandlersCommand,
    },
    /// The store of a stopped server.
    Store {
        /// What to do with it.
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Bring the PostgreSQL schema up to date (`storage.backend = "postgres"`); `serve`
    /// also does this at start.
    Migrate {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigPath,
    },
    /// Make one step of a handler's downstream calls (design.md, "Downstream calls"):
    /// inside a `command` handler through the service (journal, key, retries), by hand
    /// directly (same key and retries, no journal). Prints the response body; exits 0 for
    /// 2xx, 65 for a final non-2xx (the status on stderr), 75 when the retries ran out.
    Call {
        /// The step: 1–64 of `A-Z a-z 0-9 . _ -`, one per logical operation.
        step: String,
        /// The HTTP method.
        method: String,
        /// The URL.
        url: String,
        /// A request header, `"Name: value"` (repeatable; never journaled).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// The body: text, `@FILE`, or `@-` for stdin.
        #[arg(long)]
        data: Option<String>,
        /// The delivery's source, by hand (a `command` handler's environment has it).
        #[arg(long, env = "WEBHOOK_SOURCE")]
        source: Option<String>,
        /// The delivery id, by hand.
        #[arg(long, env = "WEBHOOK_ID")]
        id: Option<String>,
        /// The handler, by hand.
        #[arg(long, env = "WEBHOOK_HANDLER")]
        handler: Option<String>,
        /// The run's loopback URL (set by the service in a `command` handler's run).
        #[arg(long, env = crate::calls::loopback::ENV_URL, hide = true)]
        through: Option<String>,
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

/// `handlers …`, through the admin API.
#[derive(Debug, Subcommand)]
pub enum HandlersCommand {
    /// Each handler: paused or not, pairs due, running, failed, dead, the latest error.
    List {
        #[command(flatten)]
        /// Common options.
        common: AdminArgs,
    },
    /// No run of the handler starts until it is resumed (deliveries are still accepted and
    /// queued); survives restarts.
    Pause {
        #[command(flatten)]
        /// Common options.
        common: AdminArgs,
        /// The handler's name.
        name: String,
    },
    /// Lets a paused handler run again.
    Resume {
        #[command(flatten)]
        /// Common options.
        common: AdminArgs,
        /// The handler's name.
        name: String,
    },
    /// Runs a handler over the deliveries already stored that it would bind today and has
    /// no pair with yet (a handler added after they arrived); a second backfill binds
    /// nothing new. Prints a progress line, then how many it bound.
    Backfill {
        #[command(flatten)]
        /// Common options.
        common: AdminArgs,
        /// The handler's name.
        name: String,
        /// Deliveries received at or after this time (RFC 3339, or a duration ago: "24h").
        #[arg(long)]
        since: Option<String>,
        /// Deliveries received before this time (RFC 3339, or a duration ago; default now).
        #[arg(long)]
        until: Option<String>,
        /// Only this source's deliveries.
        #[arg(long)]
        source: Option<String>,
        /// Only event types this pattern matches (`application.*`).
        #[arg(long)]
        events: Option<String>,
        /// Count what would be bound; bind nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// A `--since`/`--until` of `handlers backfill`: RFC 3339 as it is, or a duration ago
/// ("24h", "7d") as RFC 3339.
fn time_arg(text: &str) -> Result<String, CliError> {
    if humantime::parse_rfc3339_weak(text).is_ok() {
        return Ok(text.to_owned());
    }
    let ago = humantime::parse_duration(text).map_err(|_| -> CliError {
        format!("`{text}`: expected an RFC 3339 time or a duration ago (\"24h\")").into()
    })?;
    let at = std::time::SystemTime::now()
        .checked_sub(ago)
        .unwrap_or(std::time::UNIX_EPOCH);
    Ok(humantime::format_rfc3339_millis(at).to_string())
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
    /// Copy every delivery, job state and the dedup window of a stopped server's sled store
    /// into the PostgreSQL database of another config; run again to finish a cut-short copy.
    Copy {
        /// The config whose store is read (sled).
        #[arg(long, value_name = "OLD.toml")]
        from: PathBuf,
        /// The config whose store is written (postgres).
        #[arg(long, value_name = "NEW.toml")]
        to: PathBuf,
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

/// Where `serve` exports traces: `[telemetry]` of its config, or
/// `OTEL_EXPORTER_OTLP_ENDPOINT`; none for the other commands (or a config that does not
/// load, which `serve` then reports).
pub fn otlp_settings(cli: &Cli) -> Option<crate::telemetry::OtlpSettings> {
    let Command::Serve { config } = &cli.command else {
        return None;
    };
    let config = load(&config.path).ok()?;
    let endpoint = config.telemetry.otlp_endpoint.clone().or_else(|| {
        std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
    })?;
    Some(crate::telemetry::OtlpSettings {
        endpoint,
        sample_ratio: config.telemetry.sample_ratio,
        service_name: config.telemetry.service_name,
    })
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
        Command::Handlers { command } => handlers(command).await,
        Command::Store {
            command: StoreCommand::Check { config, repair },
        } => store_check(&config, repair).await,
        Command::Store {
            command: StoreCommand::Copy { from, to },
        } => store_copy(&from, &to).await,
        Command::Migrate { config } => migrate(&config).await,
        Command::Call {
            step,
            method,
            url,
            headers,
            data,
            source,
            id,
            handler,
            through,
        } => {
            let request = CallArgs {
                step,
                method,
                url,
                headers,
                data,
            };
            call(request, (source, id, handler), through).await
        }
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

async fn handlers(command: HandlersCommand) -> ExitCode {
    let result: Result<(), CliError> = async {
        let (common, change) = match &command {
            HandlersCommand::List { common } => (common, None),
            HandlersCommand::Pause { common, name } => (common, Some((name, true))),
            HandlersCommand::Resume { common, name } => (common, Some((name, false))),
            HandlersCommand::Backfill {
                common,
                name,
                since,
                until,
                source,
                events,
                dry_run,
            } => {
                let config = load(&common.config)?;
                let client =
                    crate::admin_client::AdminClient::new(&config, common.admin.as_deref())?;
                let body = serde_json::json!({
                    "since": since.as_deref().map(time_arg).transpose()?,
                    "until": until.as_deref().map(time_arg).transpose()?,
                    "source": source,
                    "events": events,
                    "dry_run": dry_run,
                });
                let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
                let report = client
                    .backfill(name, &body, |p| {
                        let line = format!(
                            "{name}: looked at {}, bound {}, already {}",
                            p["scanned"], p["bound"], p["already"]
                        );
                        if terminal {
                            eprint!("\r{line}");
                        } else {
                            eprintln!("{line}");
                        }
                    })
                    .await;
                if terminal {
                    eprintln!();
                }
                let report = report?;
                let text = if common.json {
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                } else if *dry_run {
                    format!(
                        "{name}: would bind {}, already bound {} (dry run: nothing bound)",
                        report["bound"], report["already"]
                    )
                } else {
                    format!(
                        "{name}: bound {}, already bound {}",
                        report["bound"], report["already"]
                    )
                };
                return Ok(crate::admin_client::emit(&text, None)?);
            }
        };
        let config = load(&common.config)?;
        let client = crate::admin_client::AdminClient::new(&config, common.admin.as_deref())?;
        if let Some((name, paused)) = change {
            let view = client.set_paused(name, paused).await?;
            if common.json {
                return Ok(crate::admin_client::emit(
                    &serde_json::to_string_pretty(&view).unwrap_or_default(),
                    None,
                )?);
            }
            let verb = if paused { "paused" } else { "resumed" };
            return Ok(crate::admin_client::emit(&format!("{name} {verb}"), None)?);
        }
        let list = client.handlers().await?;
        let text = if common.json {
            serde_json::to_string_pretty(&list).unwrap_or_default()
        } else {
            crate::admin_client::render_handlers(&list)
        };
        Ok(crate::admin_client::emit(&text, None)?)
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
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
async fn store_check(path: &std::path::Path, repair: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let now = crate::clock::Clock::System.now_ms();
    let env = |k: &str| std::env::var(k).ok();
    // Without --repair the store is looked at as the crash left it.
    let opening = Opening::Tool {
        repair_on_open: false,
    };
    let store = match crate::store::open(&config, &env, opening).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match store.check(repair, now).await {
        Ok(report) => print_check(&report, repair),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Prints a check's findings; exit 1 if something breaks an invariant and was not repaired.
fn print_check(report: &crate::store::CheckReport, repair: bool) -> ExitCode {
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

/// `migrate`: exit 0 once the schema is current.
/// `webhook-inbox call`'s request, as given.
struct CallArgs {
    step: String,
    method: String,
    url: String,
    headers: Vec<String>,
    data: Option<String>,
}

async fn call(
    args: CallArgs,
    (source, id, handler): (Option<String>, Option<String>, Option<String>),
    through: Option<String>,
) -> ExitCode {
    use crate::calls::loopback::{WireAnswer, WireRequest};
    let retry_later = ExitCode::from(75);
    let body = match &args.data {
        None => Vec::new(),
        Some(d) if d == "@-" => {
            let mut buf = Vec::new();
            if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf) {
                eprintln!("error: reading the body from stdin: {e}");
                return ExitCode::from(65);
            }
            buf
        }
        Some(d) => match d.strip_prefix('@') {
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => bytes,
                Err(e) => {
                    eprintln!("error: reading the body from {path}: {e}");
                    return ExitCode::from(65);
                }
            },
            None => d.clone().into_bytes(),
        },
    };
    let mut headers = Vec::new();
    for h in &args.headers {
        let Some((name, value)) = h.split_once(':') else {
            eprintln!(
                "error: header `{}`: write it as \"Name: value\"",
                crate::domain::printable(h)
            );
            return ExitCode::from(65);
        };
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let wire = WireRequest {
        step: args.step,
        method: args.method.to_ascii_uppercase(),
        url: args.url,
        headers,
        body_base64: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &body),
    };
    let answer = match through {
        Some(loopback) => match crate::calls::loopback::call_through(&loopback, &wire).await {
            Ok(answer) => answer,
            Err(e) => {
                eprintln!("error: {e}");
                return retry_later;
            }
        },
        None => {
            let (Some(source), Some(id), Some(handler)) = (source, id, handler) else {
                eprintln!(
                    "error: by hand, name the pair: --source, --id and --handler (or \
                     WEBHOOK_SOURCE, WEBHOOK_ID, WEBHOOK_HANDLER)"
                );
                return ExitCode::from(65);
            };
            let job = crate::store::DeliveryKey::new(&source, &id).job(&handler);
            let calls = crate::calls::Calls::direct(job, crate::config::CallsConfig::default());
            match wire.into_request() {
                Ok((step, request)) => calls.execute(&step, request).await.into(),
                Err(e) => Err(e).into(),
            }
        }
    };
    match answer {
        WireAnswer::Response {
            status,
            body_base64,
            replayed,
            ..
        } => {
            let body =
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, body_base64)
                    .unwrap_or_default();
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &body);
            if replayed {
                eprintln!("(answered from the journal)");
            }
            if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                eprintln!("status {status}");
                ExitCode::from(65)
            }
        }
        WireAnswer::Failed { message, exit_code } => {
            eprintln!("error: {}", crate::domain::printable(&message));
            ExitCode::from(exit_code)
        }
    }
}

async fn migrate(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let env = |k: &str| std::env::var(k).ok();
    let url = match config.postgres_url(&env) {
        Ok(url) => url,
        Err(e) => return fail(e),
    };
    let options = match crate::store::PgStore::options(&url, config.storage.durability) {
        Ok(o) => o,
        Err(e) => return fail(format!("{}: {e}", config.postgres_url_key())),
    };
    let pool = match sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(options)
        .await
    {
        Ok(pool) => pool,
        Err(e) => return fail(format!("connecting to the database: {e}")),
    };
    match crate::store::postgres::migrate(&pool).await {
        Ok(ran) => {
            println!("{ran} migration(s) applied; the schema is current");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("migrating: {e}")),
    }
}

/// `store copy --from OLD.toml --to NEW.toml`: sled into PostgreSQL.
async fn store_copy(from: &std::path::Path, to: &std::path::Path) -> ExitCode {
    let (from, to) = match (load(from), load(to)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let env = |k: &str| std::env::var(k).ok();
    let opening = Opening::Tool {
        repair_on_open: true,
    };
    let source = match crate::store::open(&from, &env, opening).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let target = match crate::store::open(&to, &env, opening).await {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let now = crate::clock::Clock::System.now_ms();
    let copied = crate::store::copy::copy(
        source.as_dyn(),
        target.as_dyn(),
        now,
        crate::store::copy::PAGE,
    )
    .await;
    match copied {
        Ok(report) => {
            println!(
                "copied {} deliveries and {} kept fingerprints ({} written, the rest were already there)",
                report.deliveries, report.fingerprints, report.written
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("copying: {e}")),
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
    tracing::info!(
        %listen,
        %admin,
        traces = crate::telemetry::exporting(),
        "webhook-inbox serving"
    );
    let ended = app.run_until_stopped(shutdown).await;
    // Off the runtime's threads: the exporter's last batch is sent on this runtime.
    let _ = tokio::task::spawn_blocking(crate::telemetry::shutdown_otlp).await;
    match ended {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.to_string()),
    }
}
