//! Spawns the real application on port 0 with a temporary data directory.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;
use webhook_inbox::config::Config;
use webhook_inbox::config::Durability;
use webhook_inbox::store::{DeliveryStore, FlushHook, SledStore};
use webhook_inbox::verify::Source;
use webhook_inbox::{
    ApplicationBuilder, Delivery, Handler, HandlerContext, HandlerError, Registration,
};

/// The test source's secret (base64 of "test-secret-for-the-credicorp-source").
pub const SECRET: &str = "whsec_dGVzdC1zZWNyZXQtZm9yLXRoZS1jcmVkaWNvcnAtc291cmNl";
/// A secret the service does not know.
pub const OTHER_SECRET: &str = "whsec_b3RoZXItc2VjcmV0LW5vdC1jb25maWd1cmVk";

/// One recorded handler run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub source: String,
    pub id: String,
    pub event_type: Option<String>,
    pub attempt: u32,
    pub idempotency_key: String,
    pub body: Vec<u8>,
}

/// A handler that records every run, failing the first `fail_first` runs of each delivery.
#[derive(Clone, Default)]
pub struct Recorder {
    pub runs: Arc<Mutex<Vec<Run>>>,
    pub fail_first: u32,
}

impl Recorder {
    pub fn runs(&self) -> Vec<Run> {
        self.runs.lock().expect("lock").clone()
    }

    pub fn runs_of(&self, id: &str) -> usize {
        self.runs().iter().filter(|r| r.id == id).count()
    }
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, d: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError> {
        self.runs.lock().expect("lock").push(Run {
            source: d.source.clone(),
            id: d.id.clone(),
            event_type: d.event_type.clone(),
            attempt: d.attempt,
            idempotency_key: ctx.idempotency_key.clone(),
            body: d.body.to_vec(),
        });
        if d.attempt <= self.fail_first {
            return Err(HandlerError::Retryable(format!(
                "failing attempt {}",
                d.attempt
            )));
        }
        Ok(())
    }
}

/// The HTTP client of a test: it drops a pooled connection idle for a second, well before
/// the server's keep-alive (actix's 5 s) closes it, so a request after a long wait never
/// goes out on a connection the server is closing at that moment (hyper then fails it
/// with `IncompleteMessage`, a race of the test's client, not of the server).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(1))
        .build()
        .expect("client")
}

/// What to vary between tests.
pub struct Options {
    pub durability: &'static str,
    pub ack: &'static str,
    pub max_body_bytes: usize,
    /// TOML appended to the generated config (more sources, handlers…).
    pub extra_toml: String,
    /// TOML added to its `[server]` table.
    pub server_toml: String,
    /// TOML added to its `[dispatch]` table.
    pub dispatch_toml: String,
    /// Reuse a data directory (restart tests).
    pub dir: Option<Arc<TempDir>>,
    /// Use this store instead of opening one.
    pub store: Option<Arc<dyn DeliveryStore>>,
    pub recorder: Recorder,
    /// More Rust handlers, beside the recorder.
    pub handlers: Vec<Registration>,
    pub retention: &'static str,
    /// `storage.fingerprint_retention` (default: the service's, 90 days).
    pub fingerprint_retention: Option<&'static str>,
    pub tolerance: &'static str,
    /// The admin bearer token (None: admin API disabled).
    pub admin_token: Option<&'static str>,
    /// The test is about sled itself: sled even when the suite runs against PostgreSQL.
    pub sled_only: bool,
    /// `dispatch.max_attempts`.
    pub max_attempts: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            durability: "fsync",
            ack: "durable",
            max_body_bytes: 64 * 1024,
            extra_toml: String::new(),
            server_toml: String::new(),
            dispatch_toml: String::new(),
            dir: None,
            store: None,
            recorder: Recorder::default(),
            handlers: Vec::new(),
            retention: "7d",
            fingerprint_retention: None,
            tolerance: "5m",
            admin_token: None,
            sled_only: false,
            max_attempts: 3,
        }
    }
}

/// The variable an `[[alerts]]` table of a test names as its `secret_env`, and its value.
pub const ALERT_SECRET_ENV: &str = "WEBHOOK_INBOX_TEST_ALERT_SECRET";
pub const ALERT_SECRET: &str = "whsec_YWxlcnRzLXNlY3JldC1mb3ItdGVzdHM=";

pub struct TestApp {
    pub address: String,
    pub admin_address: String,
    pub client: reqwest::Client,
    pub dir: Arc<TempDir>,
    pub config: Config,
    pub recorder: Recorder,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub fn init_logs() {
    if std::env::var("TEST_LOG").is_ok() {
        let _ = webhook_inbox::telemetry::init(webhook_inbox::telemetry::LogFormat::Pretty, None);
    }
}

pub fn config_text(dir: &std::path::Path, o: &Options) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_body_bytes = {max}
workers = 2
{server}

[storage]
path = "{path}"
durability = "{durability}"
retention = "{retention}"
{fingerprint_retention}

[dispatch]
concurrency = 4
max_attempts = {max_attempts}
initial_backoff = "20ms"
max_backoff = "100ms"
{dispatch}

[sources.credicorp]
scheme = "standard-webhooks"
secrets = ["{SECRET}"]
tolerance = "{tolerance}"
ack = "{ack}"
{extra}
"#,
        max = o.max_body_bytes,
        path = dir.join("data").display(),
        durability = o.durability,
        ack = o.ack,
        extra = o.extra_toml,
        server = o.server_toml,
        dispatch = o.dispatch_toml,
        retention = o.retention,
        fingerprint_retention = o
            .fingerprint_retention
            .map(|f| format!("fingerprint_retention = \"{f}\""))
            .unwrap_or_default(),
        tolerance = o.tolerance,
        max_attempts = o.max_attempts,
    )
}

pub async fn spawn_app() -> TestApp {
    spawn_with(Options::default()).await
}

pub async fn spawn_with(o: Options) -> TestApp {
    let dir = o
        .dir
        .clone()
        .unwrap_or_else(|| Arc::new(TempDir::new().expect("temp dir")));
    let text = config_text(dir.path(), &o);
    let config = Config::parse(&text, "test.toml").expect("test config is valid");
    let recorder = Registration::new("recorder", o.recorder.clone()).source("credicorp");
    let mut handlers = vec![recorder];
    handlers.extend(o.handlers);
    let store = match o.store {
        Some(store) => Some(store),
        None if o.sled_only => Some(
            open_store_at(&config.storage.path, config.storage.durability, None).await
                as Arc<dyn DeliveryStore>,
        ),
        None => None,
    };
    spawn_config_with_token(config, dir, store, handlers, o.recorder, o.admin_token).await
}

/// Spawns the app on an already-built config (its listen addresses and storage path are
/// used as they are).
pub async fn spawn_config(
    config: Config,
    dir: Arc<TempDir>,
    store: Option<Arc<dyn DeliveryStore>>,
    handlers: Vec<Registration>,
    recorder: Recorder,
) -> TestApp {
    spawn_config_with_token(config, dir, store, handlers, recorder, None).await
}

async fn spawn_config_with_token(
    config: Config,
    dir: Arc<TempDir>,
    store: Option<Arc<dyn DeliveryStore>>,
    handlers: Vec<Registration>,
    recorder: Recorder,
    admin_token: Option<&'static str>,
) -> TestApp {
    init_logs();
    let token_env = config.admin.token_env.clone();
    let mut builder = ApplicationBuilder::new(config.clone()).env(move |k| {
        if k == ALERT_SECRET_ENV {
            return Some(ALERT_SECRET.to_owned());
        }
        (k == token_env)
            .then(|| admin_token.map(String::from))
            .flatten()
    });
    for h in handlers {
        builder = builder.handler(h);
    }
    builder = match (store, backend_under_test()) {
        (Some(store), _) => builder.store(store),
        (None, Some(url)) => builder.store(postgres_store_for(&dir, &url).await),
        (None, None) => builder
            .sled_store(open_store_at(&config.storage.path, config.storage.durability, None).await),
    };
    let app = builder.build().await.expect("app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let admin_address = format!("http://127.0.0.1:{}", app.admin_port());
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    TestApp {
        address,
        admin_address,
        client: client(),
        dir,
        config,
        recorder,
        stop,
        task,
    }
}

/// The repository's own config.toml, on port 0 with its data in `dir`.
pub fn shipped_config(dir: &std::path::Path) -> Config {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let mut config = Config::load(path.as_ref()).expect("config.toml is valid");
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    config.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
    config.server.workers = 2;
    config.storage.path = dir.join("data");
    config
}

/// The group commit's sync held shut while `shut`: a store opened with [`SyncGate::hook`]
/// makes nothing durable until the gate is opened again.
#[derive(Clone, Default)]
pub struct SyncGate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl SyncGate {
    /// Shuts (`true`) or opens the gate.
    pub fn set(&self, shut: bool) {
        *self.0.0.lock().expect("gate") = shut;
        self.0.1.notify_all();
    }

    /// The flush hook that waits at this gate.
    pub fn hook(&self) -> FlushHook {
        let gate = self.clone();
        Box::new(move || {
            let mut shut = gate.0.0.lock().expect("gate");
            while *shut {
                shut = gate.0.1.wait(shut).expect("gate");
            }
            Ok(())
        })
    }

    /// Opens the gate when dropped, so that a failing assertion does not leave the group
    /// commit (and the store's drop) waiting forever.
    pub fn opened_on_drop(&self) -> impl Drop + use<> {
        struct OpenOnDrop(SyncGate);
        impl Drop for OpenOnDrop {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        OpenOnDrop(self.clone())
    }
}

/// Opens the sled store at `dir/data`. sled releases its file lock when the previous
/// app of a restart test has dropped its last handle, which can be a moment after it
/// stopped: retry until a deadline.
pub async fn open_store(
    dir: &std::path::Path,
    durability: Durability,
    hook: Option<FlushHook>,
) -> Arc<SledStore> {
    open_store_at(&dir.join("data"), durability, hook).await
}

/// [`open_store`] at an exact path.
pub async fn open_store_at(
    path: &std::path::Path,
    durability: Durability,
    hook: Option<FlushHook>,
) -> Arc<SledStore> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut hook = hook;
    loop {
        match SledStore::open_with_hook(path, durability, 16 << 20, hook.take()) {
            Ok(store) => return Arc::new(store),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("store does not open: {e}"),
        }
    }
}

impl TestApp {
    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.admin_address))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// Headers a sender signing with `secret` would attach.
    pub fn sign_with(
        &self,
        secret: &str,
        id: &str,
        body: &[u8],
        at: SystemTime,
    ) -> Vec<(String, String)> {
        let mut sc = self.config.sources["credicorp"].clone();
        sc.secrets = vec![secret.to_owned()];
        let source = Source::from_config("credicorp", &sc, "test.toml", &|_| None).expect("source");
        source.sign(id, body, at)
    }

    /// Headers for `source` of this app's config, signed now with its first secret.
    pub fn sign_for(&self, source: &str, id: &str, body: &[u8]) -> Vec<(String, String)> {
        Source::from_config(source, &self.config.sources[source], "test.toml", &|_| None)
            .expect("source")
            .sign(id, body, SystemTime::now())
    }

    pub fn sign(&self, id: &str, body: &[u8]) -> Vec<(String, String)> {
        self.sign_with(SECRET, id, body, SystemTime::now())
    }

    pub async fn post(
        &self,
        source: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}/webhooks/{source}", self.address))
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            request = request.header(k.as_str(), v.as_str());
        }
        request.send().await.expect("request sent")
    }

    /// A correctly signed delivery to `credicorp`.
    pub async fn deliver(&self, id: &str, body: &str) -> reqwest::Response {
        let headers = self.sign(id, body.as_bytes());
        self.post("credicorp", &headers, body.as_bytes().to_vec())
            .await
    }

    /// `GET {path}` on the admin listener with the bearer token `admin-token`.
    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.admin_address))
            .bearer_auth("admin-token")
            .send()
            .await
            .expect("admin request")
    }

    /// The admin API's JSON for one stored delivery.
    pub async fn admin_show(&self, source: &str, id: &str) -> serde_json::Value {
        self.admin_get(&format!("/admin/deliveries/{source}/{id}"))
            .await
            .json()
            .await
            .expect("json")
    }

    /// Stops gracefully and returns the data directory.
    pub async fn stop(self) -> Arc<TempDir> {
        self.stop.cancel();
        self.task.await.expect("join").expect("clean stop");
        self.dir
    }
}

/// Polls a job's state until it reaches `status` (30 s deadline) and returns it.
pub async fn wait_for_job(
    store: &dyn DeliveryStore,
    job: &webhook_inbox::store::JobKey,
    status: webhook_inbox::store::JobStatus,
) -> webhook_inbox::store::JobState {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = store.job(job).await.expect("read job state");
        match state {
            Some(s) if s.status == status => return s,
            _ => assert!(
                Instant::now() < deadline,
                "{job}: {state:?}, expected {status:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A body of event type `t`.
pub fn event(t: &str, n: u32) -> String {
    format!(r#"{{"type":"{t}","data":{{"n":{n}}}}}"#)
}

/// Polls `check` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`eventually`] for a check that must await (a request): polls until `check` is true or
/// `timeout` has passed.
pub async fn eventually_async<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Whether the answer is a replay of the first one (`Idempotent-Replayed: true`).
pub fn is_replayed(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v.as_bytes() == b"true")
}

/// Asserts the answer is a replay of the first one.
#[track_caller]
pub fn assert_replayed(response: &reqwest::Response) {
    assert!(
        is_replayed(response),
        "expected Idempotent-Replayed: true, got {:?}",
        response.headers()
    );
}

/// Asserts a contract error: status and `{"error": code, "message": …}`.
pub async fn assert_error(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(
        response.status().as_u16(),
        status,
        "expected {status} {code}"
    );
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// Starts the real binary on `config` (JSON logs at `RUST_LOG=info`) and waits for its
/// "serving" line. Returns the child, its public port, and a thread collecting the rest of
/// its logs (so the child never blocks on a full pipe) that ends when the child does.
pub fn spawn_binary(
    config: &std::path::Path,
) -> (std::process::Child, u16, std::thread::JoinHandle<String>) {
    try_spawn_binary(config).unwrap_or_else(|e| panic!("{e}"))
}

/// [`spawn_binary`], or why the binary ended before serving (with its logs).
pub fn try_spawn_binary(
    config: &std::path::Path,
) -> Result<(std::process::Child, u16, std::thread::JoinHandle<String>), String> {
    try_spawn_serve(config).map(|s| (s.child, s.port, s.logs))
}

/// A `serve` process of the real binary.
pub struct Serving {
    pub child: std::process::Child,
    /// The webhook port.
    pub port: u16,
    /// The admin port.
    pub admin_port: u16,
    /// Its log (JSON lines), once it has ended.
    pub logs: std::thread::JoinHandle<String>,
}

/// Starts `webhook-inbox serve --config <config>` and waits until it serves; or says why
/// the binary ended before serving (with its logs).
pub fn try_spawn_serve(config: &std::path::Path) -> Result<Serving, String> {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        // The admin token of configs that name this variable (`admin.token_env`).
        .env("WEBHOOK_INBOX_TEST_ADMIN_TOKEN", "admin-token")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("binary starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let logs = std::thread::spawn(move || {
        let mut rest = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["fields"]["message"] == "webhook-inbox serving"
            {
                let port = |key: &str| {
                    v["fields"][key]
                        .as_str()
                        .and_then(|a| a.rsplit(':').next())
                        .and_then(|p| p.parse::<u16>().ok())
                };
                if let (Some(port), Some(admin)) = (port("listen"), port("admin")) {
                    let _ = tx.send((port, admin));
                }
            }
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok((port, admin_port)) => Ok(Serving {
            child,
            port,
            admin_port,
            logs,
        }),
        Err(e) => {
            let _ = child.kill();
            let status = child.wait();
            let logs = logs.join().unwrap_or_default();
            Err(format!(
                "no serving line ({e}); the binary ended {status:?} after:\n{logs}"
            ))
        }
    }
}

/// The PostgreSQL server the tests may use (`WEBHOOK_INBOX_TEST_POSTGRES_URL`); without it,
/// prints one line saying that `group` is skipped and returns `None`.
pub fn test_postgres_url(group: &str) -> Option<String> {
    match std::env::var("WEBHOOK_INBOX_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            // Straight to the terminal: the harness hides a passing test's `println!`, and
            // a skip must never look like a pass.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "{group}: skipped: set WEBHOOK_INBOX_TEST_POSTGRES_URL to run it"
            );
            None
        }
    }
}

/// A new, empty schema on the test server, and the URL that puts a connection in it: each
/// test gets a database of its own without creating databases.
pub async fn fresh_postgres_schema(url: &str) -> String {
    use sqlx::Connection as _;
    let schema = format!("t_{:016x}", rand_u64());
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .expect("the test PostgreSQL server is reachable");
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .expect("create schema");
    let _ = conn.close().await;
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options[search_path]={schema}")
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// With `WEBHOOK_INBOX_TEST_BACKEND=postgres` (and a test server), the app every HTTP test
/// spawns keeps its deliveries in PostgreSQL instead of sled: `.ci/run` runs the suite once
/// per backend. Tests about sled itself pass their own store.
pub fn backend_under_test() -> Option<String> {
    match std::env::var("WEBHOOK_INBOX_TEST_BACKEND").as_deref() {
        Ok("postgres") => {
            Some(std::env::var("WEBHOOK_INBOX_TEST_POSTGRES_URL").expect(
                "WEBHOOK_INBOX_TEST_BACKEND=postgres needs WEBHOOK_INBOX_TEST_POSTGRES_URL",
            ))
        }
        _ => None,
    }
}

/// The PostgreSQL store of a test's data directory: a fresh schema the first time, the same
/// one when the test restarts the app on that directory.
pub async fn postgres_store_for(dir: &TempDir, url: &str) -> Arc<webhook_inbox::store::PgStore> {
    let marker = dir.path().join("postgres-url");
    let url = match std::fs::read_to_string(&marker) {
        Ok(url) => url,
        Err(_) => {
            let url = fresh_postgres_schema(url).await;
            std::fs::write(&marker, &url).expect("write marker");
            url
        }
    };
    postgres_store_at(&url).await
}

/// The store a test app on `dir` used, opened again (the app stopped): sled at the config's
/// path, or the PostgreSQL schema of that directory.
pub async fn reopen_store(dir: &TempDir, config: &Config) -> Arc<dyn DeliveryStore> {
    match backend_under_test() {
        Some(url) => postgres_store_for(dir, &url).await,
        None => open_store_at(&config.storage.path, config.storage.durability, None).await,
    }
}

/// A PostgreSQL store in a fresh schema, ready.
pub async fn postgres_store(url: &str) -> Arc<webhook_inbox::store::PgStore> {
    postgres_store_at(&fresh_postgres_schema(url).await).await
}

/// A PostgreSQL store at `url` (a schema of its own), once its migrations have run; open
/// it twice for two replicas.
pub async fn postgres_store_at(url: &str) -> Arc<webhook_inbox::store::PgStore> {
    let store =
        webhook_inbox::store::PgStore::connect(url, 8, Durability::Fsync).expect("valid URL");
    store
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("migrations run");
    Arc::new(store)
}

/// The `dead_letters` gauge of `app`'s metrics (-1 when it cannot be read).
pub async fn dead_letters(app: &TestApp) -> f64 {
    let text = app.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix("webhook_inbox_dead_letters "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1.0)
}
