//! The one place a store is opened from the config. `serve`, `store check`, `store copy`
//! and `export` all come here, so what a backend needs to open — sled's path, cache size
//! and start-up repair, PostgreSQL's URL, pool and the wait for the database — is decided
//! once, and a new backend is added in one match.

use std::sync::Arc;
use std::time::Duration;

use super::{CheckReport, DeliveryStore, PgStore, SledOptions, SledStore, StoreError};
use crate::config::{Backend, Config, ConfigError};

/// How long a command (not `serve`) waits for PostgreSQL to be reachable and migrated.
const TOOL_WAIT: Duration = Duration::from_secs(30);

/// Who opens the store, which decides how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// The server: sled repairs what a crash left before anything runs; PostgreSQL is not
    /// waited for (an unreachable database is not a start-up failure: `/readyz` says 503
    /// until it is back).
    Serve,
    /// A command that needs the store now (`store check`, `store copy`, `export`): PostgreSQL
    /// is waited for until reachable and migrated; sled repairs at open only if asked (`store
    /// check` without `--repair` must see the store as the crash left it).
    Tool {
        /// sled: run the start-up repair when opening.
        repair_on_open: bool,
    },
}

/// A store as the config names it.
pub enum OpenedStore {
    /// `storage.backend = "sled"`.
    Sled(SledStore),
    /// `storage.backend = "postgres"` (boxed: its pools are most of the enum).
    Postgres(Box<PgStore>),
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The config does not say how (no URL, a URL that does not parse).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store is there but could not be opened (a running server holds sled's lock, a
    /// database that stays unreachable).
    #[error("opening the store at {place}: {source}")]
    Store {
        /// `storage.path`, or the config key of the PostgreSQL URL (never the URL: it may
        /// hold a password).
        place: String,
        /// The cause.
        source: StoreError,
    },
}

/// Opens the store `config` names, reading `secrets_env`-style variables through `env`.
pub async fn open(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
    opening: Opening,
) -> Result<OpenedStore, OpenError> {
    let storage = &config.storage;
    match storage.backend {
        Backend::Sled => {
            let options = SledOptions {
                repair_on_open: match opening {
                    Opening::Serve => true,
                    Opening::Tool { repair_on_open } => repair_on_open,
                },
                ..SledOptions::default()
            };
            SledStore::open_with(
                &storage.path,
                storage.durability,
                storage.cache_capacity,
                options,
            )
            .map(OpenedStore::Sled)
            .map_err(|source| OpenError::Store {
                place: storage.path.display().to_string(),
                source,
            })
        }
        Backend::Postgres => {
            let store = PgStore::from_config(config, env)?;
            if let Opening::Tool { .. } = opening {
                store
                    .wait_ready(TOOL_WAIT)
                    .await
                    .map_err(|source| OpenError::Store {
                        place: config.postgres_url_key(),
                        source,
                    })?;
            }
            Ok(OpenedStore::Postgres(Box::new(store)))
        }
    }
}

impl OpenedStore {
    /// The store behind its roles, to be shared by the parts of the service.
    pub fn shared(self) -> Arc<dyn DeliveryStore> {
        match self {
            OpenedStore::Sled(s) => Arc::new(s),
            OpenedStore::Postgres(s) => Arc::new(*s),
        }
    }

    /// The same store, borrowed behind its roles.
    pub fn as_dyn(&self) -> &dyn DeliveryStore {
        match self {
            OpenedStore::Sled(s) => s,
            OpenedStore::Postgres(s) => &**s,
        }
    }

    /// `store check`: the invariants' violations and the leftovers, repaired if asked.
    pub async fn check(&self, repair: bool, now_ms: u64) -> Result<CheckReport, StoreError> {
        match self {
            OpenedStore::Sled(s) => s.check(repair, now_ms),
            OpenedStore::Postgres(s) => s.check(repair, now_ms).await,
        }
    }
}
