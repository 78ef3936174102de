//! Typed, strict configuration: `config.toml` → [`Config`].
//!
//! Every struct denies unknown keys, so a typo fails at start-up with the key and the file
//! named instead of silently falling back to a default. [`Config::load`] parses and runs the
//! checks that need nothing but the file itself (durations, references between sections);
//! turning secrets into keys happens when the [`crate::startup::Application`] is built, so
//! `check-config` and `serve` run the very same validation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A configuration problem, always naming the file it came from.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    /// The file the configuration was read from (`<inline>` for in-memory configs).
    pub file: String,
    /// What is wrong, naming the key.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(file: &str, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            message: message.into(),
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners and request limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where and how deliveries are recorded.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Background handler execution.
    #[serde(default)]
    pub dispatch: DispatchConfig,
    /// The admin API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The web console.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Downstream calls made through the handlers' client: defaults for every handler.
    #[serde(default)]
    pub calls: CallsConfig,
    /// Partners, by the name used in `POST /webhooks/{source}`.
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
    /// Built-in handlers (`log`, `command`, `http`).
    #[serde(default)]
    pub handlers: Vec<HandlerConfig>,
    /// Operational webhooks: endpoints told when handlers fail, work backs up, a source is
    /// refused or the store is unavailable.
    #[serde(default)]
    pub alerts: Vec<AlertConfig>,
    /// Trace export.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// The file this configuration was read from; set by [`Config::load`].
    #[serde(skip)]
    pub file: String,
}

/// `[telemetry]`: OpenTelemetry traces over OTLP/HTTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP URL (`http://127.0.0.1:4318`); unset:
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// The share of traces kept, 0.0 to 1.0 (a sender's sampled flag is followed).
    pub sample_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            service_name: "webhook-inbox".into(),
        }
    }
}

/// `[[alerts]]`: one endpoint of operational webhooks (see `crate::alerts`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Where alerts are POSTed (http or https).
    pub url: String,
    /// The variable holding the `whsec_…` secret they are signed with (Standard Webhooks;
    /// required for that format, read at start).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// `standard-webhooks` (signed JSON events) or `slack` (an incoming-webhook message).
    #[serde(default)]
    pub format: AlertFormat,
    /// The alert kinds sent here (default: all).
    #[serde(default = "all_alert_events")]
    pub events: Vec<String>,
    /// One alert per (kind, subject) at most this often; the rest are counted into the next.
    #[serde(default = "default_min_interval", with = "humantime_duration")]
    pub min_interval: Duration,
    /// `handler.failing` after this many consecutive failed runs of a handler.
    #[serde(default = "default_failing_after")]
    pub failing_after: u32,
    /// `queue.backlog` when more than this many pairs are queued …
    #[serde(default = "default_backlog_over")]
    pub backlog_over: u64,
    /// … for this long.
    #[serde(default = "default_backlog_for", with = "humantime_duration")]
    pub backlog_for: Duration,
    /// `source.rejections` when a source's 401s within a minute pass this.
    #[serde(default = "default_rejections_over")]
    pub rejections_over: u64,
}

/// How alerts are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlertFormat {
    /// Signed JSON events (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
    #[default]
    StandardWebhooks,
    /// `{"text": "…"}` for a Slack incoming webhook.
    Slack,
}

/// Every alert kind, in design.md's order.
pub const ALERT_EVENTS: [&str; 7] = [
    "delivery.dead",
    "handler.failing",
    "handler.recovered",
    "queue.backlog",
    "source.rejections",
    "storage.unavailable",
    "storage.recovered",
];

fn all_alert_events() -> Vec<String> {
    ALERT_EVENTS.iter().map(|e| (*e).to_owned()).collect()
}

fn default_min_interval() -> Duration {
    Duration::from_secs(300)
}

fn default_failing_after() -> u32 {
    5
}

fn default_backlog_over() -> u64 {
    10_000
}

fn default_backlog_for() -> Duration {
    Duration::from_secs(300)
}

fn default_rejections_over() -> u64 {
    100
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Public listener serving `POST /webhooks/{source}`.
    pub listen: SocketAddr,
    /// Admin listener serving `/healthz`.
    pub admin_listen: SocketAddr,
    /// Largest accepted body; larger ones get 413 `payload_too_large`.
    pub max_body_bytes: usize,
    /// actix-web worker threads; 0 means one per core.
    pub workers: usize,
    /// How long a sender may take to send its body; slower gets 408 `body_timeout`.
    #[serde(with = "humantime_duration")]
    pub body_timeout: Duration,
    /// Bytes of request bodies being read at once, over all connections; past it a new
    /// request gets 503 `server_busy` with `Retry-After`, before its body is read.
    pub max_inflight_bytes: usize,
    /// Request headers never stored (nor exported in fixtures): credentials and proxy
    /// headers. A trailing `*` matches a prefix. Hop-by-hop headers are never stored either.
    pub unstored_headers: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            max_body_bytes: 1024 * 1024,
            workers: 0,
            body_timeout: Duration::from_secs(10),
            max_inflight_bytes: 64 * 1024 * 1024,
            unstored_headers: [
                "authorization",
                "cookie",
                "proxy-authorization",
                "x-forwarded-*",
                "forwarded",
                "x-real-ip",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// When an acknowledgement may be sent relative to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledge only after the record is fsync'd (survives a power loss).
    Fsync,
    /// Acknowledge after the write; sled's background flusher persists it shortly after.
    Buffered,
}

/// Which engine keeps the deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Embedded sled at `storage.path`: one process, one machine (the default).
    Sled,
    /// PostgreSQL: several replicas on one database.
    Postgres,
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `sled` (default) or `postgres`.
    pub backend: Backend,
    /// The sled directory, relative to the working directory.
    pub path: PathBuf,
    /// The environment variable holding the PostgreSQL URL (`backend = "postgres"`).
    pub postgres_url_env: Option<String>,
    /// The PostgreSQL URL itself (local use: a URL with a password belongs in the
    /// environment).
    pub postgres_url: Option<String>,
    /// PostgreSQL connections per process for requests; the dispatcher has two pools of its
    /// own, a quarter of this each (at least 2).
    pub pool_size: u32,
    /// `fsync` or `buffered`.
    pub durability: Durability,
    /// How long a delivery id is remembered.
    #[serde(with = "humantime_duration")]
    pub retention: Duration,
    /// sled's page cache, in bytes (sled's own default is 1 GiB). The process holds about
    /// 1.4 bytes per byte of it under load, beside sled's page table (which grows with the
    /// store, not with this): docs/sizing.md.
    pub cache_capacity: u64,
    /// With `body_dedup`: how long a body's fingerprint (and the first answer) is kept after
    /// its delivery expired, so a captured request of a scheme without a signed timestamp
    /// is still a replay then.
    #[serde(with = "humantime_duration")]
    pub fingerprint_retention: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Sled,
            path: PathBuf::from("data"),
            postgres_url_env: None,
            postgres_url: None,
            pool_size: 16,
            durability: Durability::Fsync,
            retention: Duration::from_secs(7 * 24 * 3600),
            cache_capacity: 32 * 1024 * 1024,
            fingerprint_retention: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// `[dispatch]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// Runs in flight at once in this process, every handler together (default 64). A run
    /// holds its slot from its start to its outcome; at 16, when a start still waited for a
    /// group commit, the slots spent most of their time waiting for the disk and dispatch
    /// fell behind the acknowledgements (BENCHMARKS.md, session 9). A handler's own
    /// `concurrency` caps it further.
    pub concurrency: usize,
    /// Attempts per (delivery, handler) before it is dead-lettered.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles each attempt.
    #[serde(with = "humantime_duration")]
    pub initial_backoff: Duration,
    /// Upper bound of the retry delay.
    #[serde(with = "humantime_duration")]
    pub max_backoff: Duration,
    /// How long running handlers may take to finish at shutdown.
    #[serde(with = "humantime_duration")]
    pub shutdown_grace: Duration,
    /// How long a run holds its (delivery, handler) pair without renewing it (it renews
    /// every third of this while the handler runs). With PostgreSQL, the time after which
    /// another replica takes over the pairs of a replica that died.
    #[serde(with = "humantime_duration")]
    pub run_lease: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            max_attempts: 8,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(30),
            run_lease: Duration::from_secs(30),
        }
    }
}

impl DispatchConfig {
    /// The longest a pair can take from its first failure to being dead-lettered: every
    /// back-off up to `max_attempts` at its largest (the base delay plus half of it as
    /// jitter, capped at `max_backoff`; see `dispatch::backoff`). A retention shorter than
    /// this could forget a delivery while it still waits for a retry.
    pub fn longest_retry_schedule(&self) -> Duration {
        (1..self.max_attempts)
            .map(|attempt| {
                let exp = attempt.saturating_sub(1).min(31);
                let base = self
                    .initial_backoff
                    .saturating_mul(1u32 << exp)
                    .min(self.max_backoff);
                (base + base / 2).min(self.max_backoff)
            })
            .fold(Duration::ZERO, Duration::saturating_add)
    }
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Environment variable holding the bearer token of `/admin/`.
    pub token_env: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            token_env: "WEBHOOK_INBOX_ADMIN_TOKEN".into(),
        }
    }
}

/// `[calls]`: how a handler's downstream calls are made and journaled (design.md,
/// "Downstream calls"); each `[[handlers]]` may override any key in its own `calls` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// One HTTP exchange.
    #[serde(with = "humantime_duration")]
    pub timeout: Duration,
    /// Exchanges of one call inside one run; then the run fails, retryable.
    pub max_attempts: u32,
    /// The first back-off's upper bound (full jitter: a random wait up to it).
    #[serde(with = "humantime_duration")]
    pub initial_backoff: Duration,
    /// The largest back-off bound.
    #[serde(with = "humantime_duration")]
    pub max_backoff: Duration,
    /// Every exchange of one call within one run, back-offs included.
    #[serde(with = "humantime_duration")]
    pub max_elapsed: Duration,
    /// The largest response body the journal keeps (and a handler is given).
    pub journal_max_bytes: usize,
}

impl Default for CallsConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(30),
            journal_max_bytes: 1024 * 1024,
        }
    }
}

/// A handler's `calls` table: any `[calls]` key, for that handler only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsOverride {
    /// See [`CallsConfig::timeout`].
    #[serde(with = "humantime_duration_option")]
    pub timeout: Option<Duration>,
    /// See [`CallsConfig::max_attempts`].
    pub max_attempts: Option<u32>,
    /// See [`CallsConfig::initial_backoff`].
    #[serde(with = "humantime_duration_option")]
    pub initial_backoff: Option<Duration>,
    /// See [`CallsConfig::max_backoff`].
    #[serde(with = "humantime_duration_option")]
    pub max_backoff: Option<Duration>,
    /// See [`CallsConfig::max_elapsed`].
    #[serde(with = "humantime_duration_option")]
    pub max_elapsed: Option<Duration>,
    /// See [`CallsConfig::journal_max_bytes`].
    pub journal_max_bytes: Option<usize>,
}

impl CallsConfig {
    /// These defaults with `over`'s keys applied.
    pub fn with(self, over: &CallsOverride) -> CallsConfig {
        CallsConfig {
            timeout: over.timeout.unwrap_or(self.timeout),
            max_attempts: over.max_attempts.unwrap_or(self.max_attempts),
            initial_backoff: over.initial_backoff.unwrap_or(self.initial_backoff),
            max_backoff: over.max_backoff.unwrap_or(self.max_backoff),
            max_elapsed: over.max_elapsed.unwrap_or(self.max_elapsed),
            journal_max_bytes: over.journal_max_bytes.unwrap_or(self.journal_max_bytes),
        }
    }

    /// Why these settings cannot work, naming the key under `prefix` (`calls` or
    /// `handlers.<name>.calls`).
    pub fn problem(&self, prefix: &str) -> Option<String> {
        if self.timeout.is_zero() {
            return Some(format!("{prefix}.timeout must be greater than 0"));
        }
        if self.max_attempts == 0 {
            return Some(format!("{prefix}.max_attempts must be at least 1"));
        }
        if self.initial_backoff > self.max_backoff {
            return Some(format!(
                "{prefix}.initial_backoff must not exceed {prefix}.max_backoff"
            ));
        }
        if self.max_elapsed < self.timeout {
            return Some(format!(
                "{prefix}.max_elapsed ({}) is shorter than {prefix}.timeout ({}): not even one \
                 exchange would fit",
                humantime::format_duration(self.max_elapsed),
                humantime::format_duration(self.timeout)
            ));
        }
        None
    }
}

/// `[console]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Mark the session cookie `Secure` whatever the request says (a proxy terminating TLS
    /// without `X-Forwarded-Proto`); it is marked so anyway when the request came over HTTPS.
    pub secure_cookie: bool,
}

/// How a source's deliveries are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SchemeName {
    /// <https://www.standardwebhooks.com/> (and Svix's header names).
    #[default]
    StandardWebhooks,
    /// `Stripe-Signature: t=…,v1=…`.
    Stripe,
    /// `X-Hub-Signature-256`.
    Github,
    /// `X-Slack-Signature` over `v0:{ts}:{body}`.
    Slack,
    /// `X-Shopify-Hmac-Sha256`.
    Shopify,
    /// Generic HMAC-SHA256, configured per source.
    HmacSha256,
}

/// When the sender gets its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// 202 once recorded durably; handlers run in the background.
    #[default]
    Durable,
    /// Handlers run before answering; 200 when all succeeded.
    Processed,
}

/// `hmac-sha256`: how the tag is written in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Lower- or upper-case hex.
    #[default]
    Hex,
    /// Standard base64.
    Base64,
}

/// `[sources.<name>]`: the keys every scheme takes, and the scheme with the keys only it
/// takes ([`SchemeConfig`]). A key that does not belong to the source's scheme is a parse
/// error that names it (`scheme` itself defaults to `standard-webhooks`).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "toml::Table")]
pub struct SourceConfig {
    /// The signature scheme and its own settings.
    pub scheme: SchemeConfig,
    /// Signing secrets; any of them may match (rotation).
    pub secrets: Vec<String>,
    /// Environment variable with comma-separated secrets, read at start.
    pub secrets_env: Option<String>,
    /// Largest accepted distance between the signed timestamp and now, either way.
    pub tolerance: Duration,
    /// `durable` or `processed`.
    pub ack: AckMode,
    /// `ack = "processed"`: how long a claimant holds a delivery before a sender's retry
    /// may take it over; renewed while its handlers run, so only a crash lets it lapse.
    pub processed_lease: Duration,
    /// Override: header carrying the delivery id.
    pub id_header: Option<String>,
    /// Override: JSON pointer of the delivery id in the body.
    pub id_pointer: Option<String>,
    /// Treat a signed body already seen under another id as a replay of the first. Default:
    /// on where the id is not covered by the signature.
    pub body_dedup: Option<bool>,
    /// Override: header carrying the event type.
    pub event_type_header: Option<String>,
    /// Override: JSON pointer of the event type in the body.
    pub event_type_pointer: Option<String>,
}

/// A source's scheme with the settings only it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemeConfig {
    /// <https://www.standardwebhooks.com/> (and Svix's header names).
    StandardWebhooks {
        /// `v1a`: ed25519 public keys, `whpk_<base64>`.
        public_keys: Vec<String>,
    },
    /// `Stripe-Signature: t=…,v1=…`.
    Stripe,
    /// `X-Hub-Signature-256`.
    Github,
    /// `X-Slack-Signature` over `v0:{ts}:{body}`.
    Slack,
    /// `X-Shopify-Hmac-Sha256`.
    Shopify,
    /// Generic HMAC-SHA256, configured per source.
    HmacSha256(HmacConfig),
}

impl SchemeConfig {
    /// The scheme's name.
    pub fn name(&self) -> SchemeName {
        match self {
            SchemeConfig::StandardWebhooks { .. } => SchemeName::StandardWebhooks,
            SchemeConfig::Stripe => SchemeName::Stripe,
            SchemeConfig::Github => SchemeName::Github,
            SchemeConfig::Slack => SchemeName::Slack,
            SchemeConfig::Shopify => SchemeName::Shopify,
            SchemeConfig::HmacSha256(_) => SchemeName::HmacSha256,
        }
    }
}

/// `scheme = "hmac-sha256"`: how the partner signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HmacConfig {
    /// Header carrying the signature.
    pub signature_header: String,
    /// Text before the encoded signature, e.g. `sha256=`.
    pub prefix: Option<String>,
    /// `hex` (default) or `base64`.
    pub encoding: Option<Encoding>,
    /// Header carrying the signed Unix timestamp.
    pub timestamp_header: Option<String>,
    /// Signed content over `{id}`, `{timestamp}`, `{body}`.
    pub signed_content: Option<String>,
}

/// One TOML shape per scheme: the keys every source takes plus the scheme's own, each
/// with `deny_unknown_fields`, so a key of another scheme is an error naming it.
macro_rules! source_toml {
    ($name:ident { $($(#[$meta:meta])* $field:ident : $ty:ty,)* }) => {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $name {
            #[serde(default)]
            secrets: Vec<String>,
            secrets_env: Option<String>,
            #[serde(default = "default_tolerance", with = "humantime_duration")]
            tolerance: Duration,
            #[serde(default)]
            ack: AckMode,
            #[serde(default = "default_processed_lease", with = "humantime_duration")]
            processed_lease: Duration,
            id_header: Option<String>,
            id_pointer: Option<String>,
            body_dedup: Option<bool>,
            event_type_header: Option<String>,
            event_type_pointer: Option<String>,
            $($(#[$meta])* $field: $ty,)*
        }

        impl $name {
            fn into_config(self, scheme: impl FnOnce(&Self) -> SchemeConfig) -> SourceConfig {
                SourceConfig {
                    scheme: scheme(&self),
                    secrets: self.secrets,
                    secrets_env: self.secrets_env,
                    tolerance: self.tolerance,
                    ack: self.ack,
                    processed_lease: self.processed_lease,
                    id_header: self.id_header,
                    id_pointer: self.id_pointer,
                    body_dedup: self.body_dedup,
                    event_type_header: self.event_type_header,
                    event_type_pointer: self.event_type_pointer,
                }
            }
        }
    };
}

source_toml!(PresetToml {});
source_toml!(StandardWebhooksToml {
    #[serde(default)]
    public_keys: Vec<String>,
});
source_toml!(HmacToml {
    signature_header: String,
    prefix: Option<String>,
    encoding: Option<Encoding>,
    timestamp_header: Option<String>,
    signed_content: Option<String>,
});

impl TryFrom<toml::Table> for SourceConfig {
    type Error = toml::de::Error;

    fn try_from(mut table: toml::Table) -> Result<SourceConfig, toml::de::Error> {
        let scheme = match table.remove("scheme") {
            Some(value) => SchemeName::deserialize(value)?,
            None => SchemeName::default(),
        };
        let fields = toml::Value::Table(table);
        Ok(match scheme {
            SchemeName::StandardWebhooks => {
                StandardWebhooksToml::deserialize(fields)?.into_config(|t| {
                    SchemeConfig::StandardWebhooks {
                        public_keys: t.public_keys.clone(),
                    }
                })
            }
            SchemeName::Stripe => {
                PresetToml::deserialize(fields)?.into_config(|_| SchemeConfig::Stripe)
            }
            SchemeName::Github => {
                PresetToml::deserialize(fields)?.into_config(|_| SchemeConfig::Github)
            }
            SchemeName::Slack => {
                PresetToml::deserialize(fields)?.into_config(|_| SchemeConfig::Slack)
            }
            SchemeName::Shopify => {
                PresetToml::deserialize(fields)?.into_config(|_| SchemeConfig::Shopify)
            }
            SchemeName::HmacSha256 => HmacToml::deserialize(fields)?.into_config(|t| {
                SchemeConfig::HmacSha256(HmacConfig {
                    signature_header: t.signature_header.clone(),
                    prefix: t.prefix.clone(),
                    encoding: t.encoding,
                    timestamp_header: t.timestamp_header.clone(),
                    signed_content: t.signed_content.clone(),
                })
            }),
        })
    }
}

fn default_processed_lease() -> Duration {
    Duration::from_secs(60)
}

fn default_tolerance() -> Duration {
    Duration::from_secs(300)
}

/// Declares a `[[handlers]]` kind: the binding keys every kind shares, written here once,
/// then the kind's own keys; and its [`Binding`]. (Not `#[serde(flatten)]`: serde cannot
/// deny unknown keys through a flattened struct, and a misspelt key must be refused.)
macro_rules! handler_kind {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$field_meta:meta])* $field:ident : $ty:ty ),* $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// Unique handler name; part of the idempotency key.
            pub name: String,
            /// A source name, or absent / `"*"` for every source.
            pub source: Option<String>,
            /// Event-type patterns: `*`, `prefix.*` or exact; parsed as the file is read, so
            /// an invalid one is refused with its line.
            #[serde(default = "default_events")]
            pub events: Vec<crate::domain::EventPattern>,
            /// `match`: JSON pointer -> allowed values; a delivery whose body does not hold
            /// one of the values at every pointer is not bound to the handler (decided at
            /// claim time).
            #[serde(default, rename = "match")]
            pub body_match: BTreeMap<String, Vec<serde_json::Value>>,
            /// At most this many runs of the handler at once (on top of
            /// `dispatch.concurrency`); signed, so that a negative value is refused by the
            /// check that names the key.
            #[serde(default)]
            pub concurrency: Option<i64>,
            /// At most this many run starts per second, minute or hour.
            #[serde(default)]
            pub rate: Option<crate::domain::Rate>,
            /// `order_by`: a JSON pointer into the body; deliveries with the same value there
            /// run one at a time, in received order (those without it run unordered).
            #[serde(default)]
            pub order_by: Option<String>,
            /// `calls`: this handler's own `[calls]` keys.
            #[serde(default)]
            pub calls: CallsOverride,
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl $name {
            /// The binding part of this handler's config.
            pub fn binding(&self) -> Binding {
                Binding {
                    name: self.name.clone(),
                    source: self.source.clone(),
                    events: self.events.clone(),
                    body_match: self.body_match.clone(),
                    concurrency: self.concurrency,
                    rate: self.rate,
                    order_by: self.order_by.clone(),
                    calls: self.calls,
                }
            }
        }
    };
}

handler_kind! {
    /// Which deliveries a handler is bound to: the keys every kind shares.
    Binding {}
}

fn default_events() -> Vec<crate::domain::EventPattern> {
    vec![crate::domain::EventPattern::Any]
}

/// `[[handlers]]`: a built-in handler, by `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HandlerConfig {
    /// A tracing line per delivery.
    Log(LogHandlerConfig),
    /// Runs a program with the body on stdin.
    Command(CommandHandlerConfig),
    /// POSTs the body to a URL with an `Idempotency-Key`.
    Http(HttpHandlerConfig),
    /// Publishes the body to NATS JetStream.
    Nats(NatsHandlerConfig),
    /// Publishes the body to a RabbitMQ exchange.
    Amqp(AmqpHandlerConfig),
    /// Appends the body to a Redis stream.
    Redis(RedisHandlerConfig),
}

impl HandlerConfig {
    /// The binding common to every kind.
    pub fn binding(&self) -> Binding {
        match self {
            HandlerConfig::Log(c) => c.binding(),
            HandlerConfig::Command(c) => c.binding(),
            HandlerConfig::Http(c) => c.binding(),
            HandlerConfig::Nats(c) => c.binding(),
            HandlerConfig::Amqp(c) => c.binding(),
            HandlerConfig::Redis(c) => c.binding(),
        }
    }
}

handler_kind! {
    /// `kind = "log"`
    LogHandlerConfig {}
}

handler_kind! {
    /// `kind = "command"`
    CommandHandlerConfig {
        /// Program and arguments; run directly, no shell.
        command: Vec<String>,
        /// Variables of the service's environment to pass on, beyond `PATH`, `HOME` and
        /// `LANG` (the program's environment is otherwise clean).
        #[serde(default)]
        env: Vec<String>,
        /// Kill the program and retry after this long.
        #[serde(default = "default_handler_timeout", with = "humantime_duration")]
        timeout: Duration,
    }
}

handler_kind! {
    /// `kind = "http"`
    HttpHandlerConfig {
        /// Where to POST the raw body.
        url: String,
        /// Give up on one request (and retry) after this long.
        #[serde(default = "default_handler_timeout", with = "humantime_duration")]
        timeout: Duration,
    }
}

handler_kind! {
    /// `kind = "nats"`: a JetStream publish per delivery.
    NatsHandlerConfig {
        /// The broker's URL (credentials allowed: never shown).
        url: Option<String>,
        /// Or the environment variable holding it, read at start.
        url_env: Option<String>,
        /// The subject, a template of `{source}`, `{event_type}`, `{handler}`.
        subject: String,
    }
}

handler_kind! {
    /// `kind = "amqp"`: a RabbitMQ publish per delivery.
    AmqpHandlerConfig {
        /// The broker's URL, `amqp://user:pass@host:5672/vhost` (credentials never shown).
        url: Option<String>,
        /// Or the environment variable holding it, read at start.
        url_env: Option<String>,
        /// The exchange (`""` is the default exchange, which routes by queue name).
        exchange: String,
        /// The routing key, a template of `{source}`, `{event_type}`, `{handler}`.
        routing_key: String,
    }
}

handler_kind! {
    /// `kind = "redis"`: an entry of a Redis stream per delivery.
    RedisHandlerConfig {
        /// The broker's URL (credentials allowed: never shown).
        url: Option<String>,
        /// Or the environment variable holding it, read at start.
        url_env: Option<String>,
        /// The stream's key, a template of `{source}`, `{event_type}`, `{handler}`.
        stream: String,
        /// Trim the stream to about this many entries (`XADD MAXLEN ~`).
        max_len: Option<u64>,
    }
}

fn default_handler_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Config {
    /// The key the PostgreSQL URL comes from, as error messages name it.
    pub fn postgres_url_key(&self) -> String {
        match &self.storage.postgres_url_env {
            Some(var) => format!("storage.postgres_url_env ({var})"),
            None => "storage.postgres_url".to_owned(),
        }
    }

    /// The PostgreSQL URL: `storage.postgres_url`, or the value of the variable that
    /// `storage.postgres_url_env` names (read through `env`). The error names the key, never
    /// the URL (it may hold a password).
    pub fn postgres_url(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<String, ConfigError> {
        let storage = &self.storage;
        match (&storage.postgres_url, &storage.postgres_url_env) {
            (Some(url), _) => Ok(url.clone()),
            (None, Some(var)) => env(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                ConfigError::new(
                    &self.file,
                    format!("storage.postgres_url_env: the variable {var} is not set"),
                )
            }),
            (None, None) => Err(ConfigError::new(
                &self.file,
                "storage.postgres_url_env (or storage.postgres_url) is not set".to_owned(),
            )),
        }
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(&file, format!("cannot read: {e}")))?;
        Self::parse(&text, &file)
    }

    /// Parses and validates configuration text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text)
            .map_err(|e| ConfigError::new(file, e.to_string().trim_end().to_owned()))?;
        config.file = file.to_owned();
        config.validate()?;
        Ok(config)
    }

    /// Applies the named environment overrides, for deployments that template the
    /// addresses and data directory but not the file: `WEBHOOK_INBOX_LISTEN`,
    /// `WEBHOOK_INBOX_ADMIN_LISTEN`, `WEBHOOK_INBOX_DATA_DIR`. Nothing else is read from the
    /// environment (secrets come from each source's `secrets_env`).
    pub fn apply_env_overrides(
        &mut self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let address = |var: &str| -> Result<Option<SocketAddr>, ConfigError> {
            env(var)
                .map(|v| {
                    v.parse().map_err(|e| {
                        ConfigError::new(&self.file, format!("{var}=`{v}` is not an address: {e}"))
                    })
                })
                .transpose()
        };
        if let Some(a) = address("WEBHOOK_INBOX_LISTEN")? {
            self.server.listen = a;
        }
        if let Some(a) = address("WEBHOOK_INBOX_ADMIN_LISTEN")? {
            self.server.admin_listen = a;
        }
        if let Some(dir) = env("WEBHOOK_INBOX_DATA_DIR").filter(|d| !d.is_empty()) {
            self.storage.path = PathBuf::from(dir);
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError::new(&self.file, m));
        if self.server.max_body_bytes == 0 {
            return err("server.max_body_bytes must be greater than 0".into());
        }
        if self.server.max_inflight_bytes < self.server.max_body_bytes {
            return err(format!(
                "server.max_inflight_bytes ({}) is smaller than server.max_body_bytes ({}): \
                 a body of the largest accepted size could never be read",
                self.server.max_inflight_bytes, self.server.max_body_bytes
            ));
        }
        if self.server.body_timeout.is_zero() {
            return err("server.body_timeout must be greater than 0".into());
        }
        if self.dispatch.concurrency == 0 {
            return err("dispatch.concurrency must be at least 1".into());
        }
        if self.dispatch.max_attempts == 0 {
            return err("dispatch.max_attempts must be at least 1".into());
        }
        if self.dispatch.run_lease < Duration::from_secs(1) {
            return err(format!(
                "dispatch.run_lease ({}) must be at least 1s",
                humantime::format_duration(self.dispatch.run_lease)
            ));
        }
        if self.dispatch.initial_backoff > self.dispatch.max_backoff {
            return err("dispatch.initial_backoff must not exceed dispatch.max_backoff".into());
        }
        if let Some(problem) = self.calls.problem("calls") {
            return err(problem);
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            return err("telemetry.sample_ratio must be between 0.0 and 1.0".into());
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint {
            match reqwest::Url::parse(endpoint) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => return err("telemetry.otlp_endpoint: an http or https URL is expected".into()),
            }
        }
        for (i, alert) in self.alerts.iter().enumerate() {
            let key = format!("alerts[{i}]");
            match reqwest::Url::parse(&alert.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => return err(format!("{key}.url: an http or https URL is expected")),
            }
            if let Some(unknown) = alert
                .events
                .iter()
                .find(|e| !ALERT_EVENTS.contains(&e.as_str()))
            {
                return err(format!(
                    "{key}.events: unknown alert `{}` (known: {})",
                    crate::domain::printable(unknown),
                    ALERT_EVENTS.join(", ")
                ));
            }
            if alert.format == AlertFormat::StandardWebhooks && alert.secret_env.is_none() {
                return err(format!(
                    "{key}.secret_env: the standard-webhooks format signs every alert: name the variable holding its whsec_ secret"
                ));
            }
            if alert.failing_after == 0 {
                return err(format!("{key}.failing_after must be at least 1"));
            }
        }
        for handler in &self.handlers {
            let binding = handler.binding();
            let prefix = format!("handlers.{}.calls", binding.name);
            if let Some(problem) = self.calls.with(&binding.calls).problem(&prefix) {
                return err(problem);
            }
        }
        for (name, source) in &self.sources {
            if !is_valid_name(name) {
                return err(format!(
                    "sources.{name}: a source name may hold only letters, digits, '-' and '_'"
                ));
            }
            if source.processed_lease < Duration::from_secs(1) {
                return err(format!(
                    "sources.{name}.processed_lease ({}) must be at least 1s",
                    humantime::format_duration(source.processed_lease)
                ));
            }
            if self.storage.retention < source.tolerance {
                return err(format!(
                    "storage.retention ({}) is shorter than sources.{name}.tolerance ({}): \
                     a replay could outlive the memory of its id",
                    humantime::format_duration(self.storage.retention),
                    humantime::format_duration(source.tolerance)
                ));
            }
            let no_public_keys = match &source.scheme {
                SchemeConfig::StandardWebhooks { public_keys } => public_keys.is_empty(),
                _ => true,
            };
            if source.secrets.is_empty() && source.secrets_env.is_none() && no_public_keys {
                return err(format!(
                    "sources.{name}.secrets is empty: set `secrets` or `secrets_env`"
                ));
            }
        }
        match (
            self.storage.backend,
            &self.storage.postgres_url,
            &self.storage.postgres_url_env,
        ) {
            (Backend::Postgres, None, None) => {
                return err(
                    "storage.backend = \"postgres\" needs storage.postgres_url_env \
                     (or storage.postgres_url)"
                        .into(),
                );
            }
            (Backend::Postgres, Some(_), Some(_)) => {
                return err(
                    "set one of storage.postgres_url and storage.postgres_url_env, not both".into(),
                );
            }
            (Backend::Sled, Some(_), _) | (Backend::Sled, _, Some(_)) => {
                return err("storage.postgres_url and storage.postgres_url_env need \
                     storage.backend = \"postgres\""
                    .into());
            }
            _ => {}
        }
        if self.storage.pool_size == 0 {
            return err("storage.pool_size must be at least 1".into());
        }
        if self.storage.fingerprint_retention < self.storage.retention {
            return err(format!(
                "storage.fingerprint_retention ({}) is shorter than storage.retention ({}): \
                 fingerprints are what is remembered after a delivery expires",
                humantime::format_duration(self.storage.fingerprint_retention),
                humantime::format_duration(self.storage.retention)
            ));
        }
        let schedule = self.dispatch.longest_retry_schedule();
        if self.storage.retention < schedule {
            return err(format!(
                "storage.retention ({}) is shorter than the longest retry schedule ({}, from \
                 dispatch.max_attempts, initial_backoff and max_backoff): a delivery could be \
                 forgotten while a retry of it is still due",
                humantime::format_duration(self.storage.retention),
                humantime::format_duration(schedule)
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, handler) in self.handlers.iter().enumerate() {
            let b = handler.binding();
            if !is_valid_name(&b.name) {
                return err(format!(
                    "handlers[{i}].name `{}`: a handler name may hold only letters, digits, '-' and '_'",
                    b.name
                ));
            }
            if !seen.insert(b.name.clone()) {
                return err(format!("handlers[{i}].name `{}` is used twice", b.name));
            }
            for (pointer, values) in &b.body_match {
                if !pointer.starts_with('/') {
                    return err(format!(
                        "handlers[{i}].match: `{pointer}` is not a JSON pointer (it starts with '/')"
                    ));
                }
                if values.is_empty() {
                    return err(format!(
                        "handlers[{i}].match.\"{pointer}\": give at least one allowed value"
                    ));
                }
            }
            if let Some(src) = b.source.as_deref()
                && src != "*"
                && !self.sources.contains_key(src)
            {
                let known: Vec<&str> = self.sources.keys().map(String::as_str).collect();
                return err(format!(
                    "handlers[{i}] `{}`: source `{src}` is not configured (sources: {})",
                    b.name,
                    known.join(", ")
                ));
            }
            if let Some(limit) = b.concurrency
                && limit < 1
            {
                return err(format!(
                    "handlers[{i}].concurrency ({limit}, handler `{}`) must be at least 1",
                    b.name
                ));
            }
            if let Some(pointer) = &b.order_by
                && !pointer.starts_with('/')
            {
                return err(format!(
                    "handlers[{i}].order_by: `{pointer}` (handler `{}`) is not a JSON pointer (it starts with '/')",
                    b.name
                ));
            }
            if b.order_by.is_some()
                && let Some(src) = b.source.as_deref()
                && self
                    .sources
                    .get(src)
                    .is_some_and(|s| s.ack == AckMode::Processed)
            {
                return err(format!(
                    "handlers[{i}].order_by (handler `{}`): source `{src}` has ack = \"processed\", \
                     whose deliveries run while the sender waits, in the order it sends them; \
                     order_by orders background runs (ack = \"durable\")",
                    b.name
                ));
            }
            if let HandlerConfig::Command(c) = handler
                && c.command.first().is_none_or(|p| p.is_empty())
            {
                return err(format!(
                    "handlers[{i}] `{}`: command must name a program",
                    b.name
                ));
            }
        }
        Ok(())
    }
}

/// Source and handler names end up in storage keys and URLs; keep them plain.
pub(crate) fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `serde(with)` for durations written the humantime way: "5m", "7d", "250ms".
mod humantime_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration `{text}`: {e} (write it like \"30s\", \"5m\", \"7d\")"
            ))
        })
    }
}

/// An optional humantime duration (a handler's `calls` overrides).
mod humantime_duration_option {
    use serde::Deserializer;
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::humantime_duration::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [sources.acme]
        secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
    "#;

    #[test]
    fn calls_settings_are_validated_naming_the_key() {
        let with = |extra: &str| Config::parse(&format!("{MINIMAL}\n{extra}"), "t.toml");
        let c = with("[calls]\nmax_attempts = 3\n").expect("valid");
        assert_eq!(c.calls.max_attempts, 3);
        assert_eq!(c.calls.timeout, Duration::from_secs(10), "the default");
        let e = with("[calls]\nmax_attempts = 0\n").expect_err("zero attempts");
        assert!(
            e.to_string()
                .contains("calls.max_attempts must be at least 1"),
            "{e}"
        );
        let e = with("[calls]\nretries = 3\n").expect_err("unknown key");
        assert!(e.to_string().contains("retries"), "{e}");
        let e = with(
            "[[handlers]]\nname = \"pay\"\nkind = \"log\"\ncalls = { max_elapsed = \"1s\", timeout = \"5s\" }\n",
        )
        .expect_err("a handler's override");
        assert!(
            e.to_string().contains("handlers.pay.calls.max_elapsed (1s) is shorter than handlers.pay.calls.timeout (5s)"),
            "{e}"
        );
        let e = with("[calls]\ninitial_backoff = \"soon\"\n").expect_err("a bad duration");
        assert!(e.to_string().contains("invalid duration `soon`"), "{e}");
    }

    #[test]
    fn only_the_named_environment_overrides_apply() {
        let mut c = Config::parse(MINIMAL, "t.toml").expect("valid");
        let env = |k: &str| match k {
            "WEBHOOK_INBOX_LISTEN" => Some("0.0.0.0:9000".to_owned()),
            "WEBHOOK_INBOX_DATA_DIR" => Some("/var/lib/inbox".to_owned()),
            "WEBHOOK_INBOX_STORAGE_DURABILITY" => Some("buffered".to_owned()),
            _ => None,
        };
        c.apply_env_overrides(&env).expect("ok");
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:8081");
        assert_eq!(c.storage.path, PathBuf::from("/var/lib/inbox"));
        assert_eq!(
            c.storage.durability,
            Durability::Fsync,
            "no catch-all prefix"
        );
        let bad = |k: &str| (k == "WEBHOOK_INBOX_ADMIN_LISTEN").then(|| "nowhere".to_owned());
        let e = c.apply_env_overrides(&bad).expect_err("bad address");
        assert!(e.to_string().contains("WEBHOOK_INBOX_ADMIN_LISTEN"), "{e}");
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::parse(MINIMAL, "t.toml").expect("valid");
        assert_eq!(c.storage.durability, Durability::Fsync);
        assert_eq!(c.storage.retention, Duration::from_secs(7 * 86400));
        assert_eq!(c.sources["acme"].tolerance, Duration::from_secs(300));
        assert_eq!(c.sources["acme"].ack, AckMode::Durable);
        assert_eq!(c.dispatch.max_attempts, 8);
    }

    /// Event patterns are parsed as the file is read: a handler's binding holds them
    /// parsed, and a bad one is refused with the line of its `[[handlers]]` table (the
    /// `kind` tag makes serde read the table whole) and what is wrong; nothing parses them
    /// again later.
    #[test]
    fn event_patterns_are_parsed_once_at_load_and_a_bad_one_names_its_line() {
        let with = |events: &str| {
            Config::parse(
                &format!(
                    "{MINIMAL}
[[handlers]]
name = \"h\"\nkind = \"log\"\nevents = {events}\n"
                ),
                "t.toml",
            )
        };
        let c = with(r#"["*", "application.*", "payment_link.paid"]"#).expect("valid");
        assert_eq!(
            c.handlers[0].binding().events,
            vec![
                crate::domain::EventPattern::Any,
                crate::domain::EventPattern::Prefix("application.".into()),
                crate::domain::EventPattern::Exact("payment_link.paid".into()),
            ]
        );
        let e = with(r#"["app*.created"]"#).expect_err("a misplaced wildcard");
        let text = e.to_string();
        assert!(
            text.contains("line 5") && text.contains("pattern `app*.created`: `*` may only"),
            "{text}"
        );
        let e = with(r#"[""]"#).expect_err("an empty pattern");
        assert!(e.to_string().contains("line 5"), "{e}");
    }
}
