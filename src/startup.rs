//! Building and running the service: the one code path that `serve`, `check-config`, a
//! user's own `main` and the tests all use.
//!
//! [`ApplicationBuilder::build`] does everything that can fail before traffic arrives:
//! decode every secret, build every handler, open the store, bind both listeners (port 0 in
//! tests). [`Application::run_until_stopped`] serves until the given shutdown future
//! resolves, then stops accepting, lets in-flight requests and running handlers finish,
//! flushes and returns.

use crate::collections::FastHashMap;
use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{Backend, Config, ConfigError};
use crate::dispatch::{Dispatcher, Runner};
use crate::handlers::{HandlerRegistry, Registration};
use crate::ingest::Ingest;
use crate::routes;
use crate::store::{DeliveryStore, OpenError, OpenedStore, Opening, PgStore, SledStore};
use crate::verify::Source;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An `[[alerts]]` endpoint cannot be set up.
    #[error(transparent)]
    Alerts(#[from] crate::alerts::AlertError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] OpenError),
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
}

pub use crate::routes::AppState;

/// `store_writes_total{tree}`: what each operation costs the sled store.
const STORE_WRITES: &str = "store_writes";
const STORE_WRITES_HELP: &str = "Writes to the sled store, by tree";

/// Assembles an [`Application`] from a config, a user's handlers, and optionally a store:
/// the very service `webhook-inbox serve` runs, with your plugins in it.
///
/// ```no_run
/// use webhook_inbox::config::Config;
/// use webhook_inbox::handlers::LogHandler;
/// use webhook_inbox::{ApplicationBuilder, Registration};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let config = Config::load("config.toml".as_ref())?;
/// let app = ApplicationBuilder::new(config)
///     .handler(Registration::new("audit", LogHandler).events(["application.*"]))
///     .build()
///     .await?; // validates, opens the store, binds both listeners
/// println!("webhooks on port {}", app.port());
/// app.run_until_stopped(async { let _ = tokio::signal::ctrl_c().await; }).await?;
/// # Ok(())
/// # }
/// ```
pub struct ApplicationBuilder {
    config: Config,
    handlers: Vec<Registration>,
    store: Option<Arc<dyn DeliveryStore>>,
    flush_seconds: Option<prometheus_client::metrics::histogram::Histogram>,
    store_writes: Option<crate::store::WriteCounts>,
    clock: Clock,
    env: EnvLookup,
}

/// Looks up an environment variable (the process environment unless replaced).
type EnvLookup = Box<dyn Fn(&str) -> Option<String>>;

impl ApplicationBuilder {
    /// Starts from a loaded config.
    pub fn new(config: Config) -> ApplicationBuilder {
        ApplicationBuilder {
            config,
            handlers: Vec::new(),
            store: None,
            flush_seconds: None,
            store_writes: None,
            clock: Clock::System,
            env: Box::new(|k| std::env::var(k).ok()),
        }
    }

    /// Adds a Rust handler (a plugin) beside the built-ins of the config.
    pub fn handler(mut self, registration: Registration) -> ApplicationBuilder {
        self.handlers.push(registration);
        self
    }

    /// Uses this store instead of opening sled at `storage.path`.
    pub fn store(mut self, store: Arc<dyn DeliveryStore>) -> ApplicationBuilder {
        self.store = Some(store);
        self
    }

    /// Uses this sled store, and reports its group commits as `store_flush_seconds` and its
    /// writes as `store_writes_total` (as the store `build` opens itself does).
    pub fn sled_store(mut self, store: Arc<SledStore>) -> ApplicationBuilder {
        self.flush_seconds = Some(store.flush_seconds());
        self.store_writes = Some(store.write_counts());
        self.store = Some(store);
        self
    }

    /// Uses this clock (tests).
    pub fn clock(mut self, clock: Clock) -> ApplicationBuilder {
        self.clock = clock;
        self
    }

    /// Reads `secrets_env` variables through `env` instead of the process environment.
    pub fn env(mut self, env: impl Fn(&str) -> Option<String> + 'static) -> ApplicationBuilder {
        self.env = Box::new(env);
        self
    }

    /// Every start-up check that needs neither the store nor a socket: what `check-config`
    /// runs.
    pub fn validate(&self) -> Result<(), StartupError> {
        self.sources()?;
        self.registry()?;
        if self.config.storage.backend == Backend::Postgres {
            let url = self.config.postgres_url(&*self.env)?;
            PgStore::options(&url, self.config.storage.durability).map_err(|e| {
                ConfigError::new(
                    &self.config.file,
                    format!("{}: {e}", self.config.postgres_url_key()),
                )
            })?;
        }
        Ok(())
    }

    fn sources(&self) -> Result<FastHashMap<String, Source>, ConfigError> {
        self.config
            .sources
            .iter()
            .map(|(name, sc)| {
                Source::from_config(name, sc, &self.config.file, &*self.env)
                    .map(|s| (name.clone(), s))
            })
            .collect()
    }

    fn registry(&self) -> Result<HandlerRegistry, ConfigError> {
        HandlerRegistry::build(&self.config, self.handlers.clone())
            .map_err(|e| ConfigError::new(&self.config.file, e.to_string()))
    }

    /// Validates, opens the store and binds both listeners.
    pub async fn build(self) -> Result<Application, StartupError> {
        let sources = self.sources()?;
        let registry = Arc::new(self.registry()?);
        let config = self.config;
        let mut metrics = crate::metrics::Metrics::new();
        metrics.set_clock(self.clock);
        metrics.set_handlers(registry.limits().map(|(name, _)| name.to_owned()));
        if let Some(writes) = self.store_writes {
            metrics.register(STORE_WRITES, STORE_WRITES_HELP, writes);
        }
        if let Some(histogram) = self.flush_seconds {
            metrics.register_flush_seconds(histogram);
        }
        let store: Arc<dyn DeliveryStore> = match self.store {
            Some(s) => s,
            None => match crate::store::open(&config, &*self.env, Opening::Serve).await? {
                OpenedStore::Sled(sled) => {
                    metrics.register_flush_seconds(sled.flush_seconds());
                    metrics.register(STORE_WRITES, STORE_WRITES_HELP, sled.write_counts());
                    Arc::new(sled)
                }
                opened => opened.shared(),
            },
        };
        let bind = |addr: std::net::SocketAddr| {
            TcpListener::bind(addr).map_err(|source| StartupError::Bind {
                addr: addr.to_string(),
                source,
            })
        };
        let listener = bind(config.server.listen)?;
        let admin_listener = bind(config.server.admin_listen)?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let admin_port = admin_listener.local_addr().map(|a| a.port()).unwrap_or(0);

        let cancel_handlers = CancellationToken::new();
        let calls = crate::calls::CallService::new(
            Some(store.clone()),
            self.clock,
            config.calls,
            config
                .handlers
                .iter()
                .map(|h| {
                    let binding = h.binding();
                    (binding.name, config.calls.with(&binding.calls))
                })
                .collect(),
        );
        metrics.register_calls(calls.outcomes());
        metrics.register(
            "sink_publishes",
            "Sink messages by handler, broker and result (published, duplicate, failed)",
            crate::handlers::sinks::publish_counts().clone(),
        );
        let alerts = crate::alerts::Alerts::start(&config, &*self.env, cancel_handlers.clone())?;
        metrics.register_alerts(alerts.outcomes());
        tokio::spawn(alerts.clone().watch(store.clone(), cancel_handlers.clone()));
        let metrics = Arc::new(metrics);
        let admin_token = (self.env)(&config.admin.token_env).filter(|t| !t.is_empty());
        let stopping = CancellationToken::new();
        // `webhook-inbox call` in a `command` handler reaches this process on the admin
        // listener, over loopback when it listens on every address.
        if let Ok(admin) = admin_listener.local_addr() {
            let host = match admin.ip() {
                ip if ip.is_unspecified() && ip.is_ipv6() => "[::1]".to_owned(),
                ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            };
            calls.set_loopback_base(format!("http://{host}:{}/calls", admin.port()));
        }
        let runner = Runner::new(
            store.clone(),
            registry.clone(),
            config.dispatch.clone(),
            self.clock,
            cancel_handlers.clone(),
            metrics.clone(),
            calls.clone(),
        )
        .with_alerts(alerts.clone());
        let dispatcher = Dispatcher::new(runner.clone());
        let operator = crate::operations::Operator::new(
            store.clone(),
            registry.clone(),
            dispatcher.waker(),
            self.clock,
        );
        let ingest = Ingest {
            sources,
            store: store.clone(),
            registry,
            runner,
            dispatch_waker: dispatcher.waker(),
            clock: self.clock,
            unstored_headers: config.server.unstored_headers.clone(),
        };
        let state = web::Data::new(AppState {
            ingest,
            store: store.clone(),
            clock: self.clock,
            max_body_bytes: config.server.max_body_bytes,
            metrics,
            admin_token,
            dispatcher_running: dispatcher.running_flag(),
            config: config.clone(),
            body_timeout: config.server.body_timeout,
            inflight: Arc::new(crate::routes::webhook::InflightBytes::new(
                config.server.max_inflight_bytes,
            )),
            stopping: stopping.clone(),
            console: Default::default(),
            operator,
            calls,
            alerts,
        });

        let workers = match config.server.workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let public_state = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(public_state.clone())
                .default_service(web::to(routes::webhook::route))
        })
        .workers(workers)
        .disable_signals()
        .listen(listener)
        .map_err(|source| StartupError::Bind {
            addr: config.server.listen.to_string(),
            source,
        })?
        .run();
        let admin_state = state.clone();
        let admin = HttpServer::new(move || {
            App::new()
                .app_data(admin_state.clone())
                .route("/healthz", web::get().to(routes::health::healthz))
                .route("/readyz", web::get().to(routes::health::readyz))
                .route("/metrics", web::get().to(routes::admin::metrics))
                .route("/admin/deliveries", web::get().to(routes::admin::list))
                .route(
                    "/admin/deliveries/{source}/{id}",
                    web::get().to(routes::admin::show),
                )
                .route(
                    "/admin/deliveries/{source}/{id}/retry",
                    web::post().to(routes::admin::retry),
                )
                .route(
                    "/admin/deliveries/{source}/{id}/fixture",
                    web::get().to(routes::admin::fixture),
                )
                .route("/admin/retry", web::post().to(routes::admin::retry_all))
                .route("/admin/handlers", web::get().to(routes::admin::handlers))
                .route(
                    "/admin/handlers/{name}/pause",
                    web::post().to(routes::admin::pause),
                )
                .route(
                    "/admin/handlers/{name}/resume",
                    web::post().to(routes::admin::resume),
                )
                .route(
                    "/admin/handlers/{name}/backfill",
                    web::post().to(routes::admin::backfill),
                )
                .route("/calls/{token}", web::post().to(routes::calls::call))
                .app_data(web::PayloadConfig::new(routes::calls::MAX_REQUEST_BYTES))
                .configure(routes::console::configure)
        })
        // Two workers: a slow admin query never queues a health probe behind it.
        .workers(2)
        .disable_signals()
        .listen(admin_listener)
        .map_err(|source| StartupError::Bind {
            addr: config.server.admin_listen.to_string(),
            source,
        })?
        .run();

        Ok(Application {
            port,
            admin_port,
            server,
            admin,
            dispatcher,
            store,
            cancel_handlers,
            stopping,
            retention: config.storage.retention,
            fingerprint_retention: config.storage.fingerprint_retention,
            clock: self.clock,
        })
    }
}

/// A built service, listening, not yet serving.
pub struct Application {
    port: u16,
    admin_port: u16,
    server: Server,
    admin: Server,
    dispatcher: Dispatcher,
    store: Arc<dyn DeliveryStore>,
    cancel_handlers: CancellationToken,
    stopping: CancellationToken,
    retention: std::time::Duration,
    fingerprint_retention: std::time::Duration,
    clock: Clock,
}

impl Application {
    /// The public listener's port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The admin listener's port.
    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// Serves until `shutdown` resolves; then stops accepting, finishes in-flight requests,
    /// gives running handlers `dispatch.shutdown_grace`, flushes the store and returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), std::io::Error> {
        let server_handle = self.server.handle();
        let admin_handle = self.admin.handle();
        let server = tokio::spawn(self.server);
        let admin = tokio::spawn(self.admin);
        let stop_dispatch = CancellationToken::new();
        let dispatcher = tokio::spawn(self.dispatcher.run(stop_dispatch.clone()));
        let sweeper = tokio::spawn(crate::retention::run(
            self.store.clone(),
            self.retention,
            self.fingerprint_retention,
            self.clock,
            stop_dispatch.clone(),
        ));
        let _cancel_on_exit = self.cancel_handlers.clone().drop_guard();

        shutdown.await;
        tracing::info!("shutting down: finishing in-flight requests");
        self.stopping.cancel();
        server_handle.stop(true).await;
        let served = server.await;
        stop_dispatch.cancel();
        let _ = dispatcher.await;
        let _ = sweeper.await;
        admin_handle.stop(true).await;
        let _ = admin.await;
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "final flush failed");
        }
        self.store.close().await;
        tracing::info!("stopped");
        served.map_err(std::io::Error::other)?
    }
}

/// Resolves on SIGINT or SIGTERM: what to pass to [`Application::run_until_stopped`] in
/// your own `main` (as `serve` does), so a service manager's stop is a graceful one. The handlers are installed when this is *called*, not
/// when the future is first polled: `serve` calls it before announcing that it serves, so a
/// signal that arrives right after that line still shuts down gracefully.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).ok();
        let mut int = signal(SignalKind::interrupt()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = wait(term.take()) => {}
                () = wait(int.take()) => {}
            }
            tracing::info!("shutdown signal received");
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown signal received");
    }
}
