//! `deliveries export`: a stored delivery as a fixture, so what arrived in production can be
//! replayed on a laptop (`webhook-inbox replay`).

use crate::config::Config;
use crate::fixture::Fixture;
use crate::store::{DeliveryKey, DeliveryStore, SledStore, StoreError};
use crate::verify::Source;

/// Why a delivery could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The store could not be opened or read (a running server holds it, say).
    #[error("{}: {source}", path.display())]
    Store {
        /// `storage.path`.
        path: std::path::PathBuf,
        /// The cause.
        source: StoreError,
    },
    /// No such delivery is stored.
    #[error("no delivery {0} is stored")]
    NotFound(DeliveryKey),
}

/// The fixture of `(source, id)` in `store`, or `None` when it is not stored.
pub async fn fixture_of(
    store: &dyn DeliveryStore,
    config: &Config,
    source: &str,
    id: &str,
) -> Result<Option<Fixture>, StoreError> {
    let key = DeliveryKey::new(source, id);
    let (Some(record), Some(body)) = (store.record(&key).await?, store.body(&key).await?) else {
        return Ok(None);
    };
    // The source says which headers its sender sets per request (left out of the fixture).
    let source = Source::named(config, source).ok();
    Ok(Some(Fixture::from_record(&record, &body, source.as_ref())))
}

/// Opens the config's store directly and returns the fixture as pretty JSON: sled at
/// `storage.path` (the server must be stopped: sled allows one process), or the PostgreSQL
/// database (servers may run).
pub async fn export_from_data_dir(
    config: &Config,
    source: &str,
    id: &str,
) -> Result<String, ExportError> {
    let store_error = |source| ExportError::Store {
        path: config.storage.path.clone(),
        source,
    };
    let store: Box<dyn DeliveryStore> = match config.storage.backend {
        crate::config::Backend::Sled => Box::new(
            SledStore::open(&config.storage.path, config.storage.durability, 16 << 20)
                .map_err(store_error)?,
        ),
        crate::config::Backend::Postgres => {
            let env = |k: &str| std::env::var(k).ok();
            let store = crate::store::PgStore::from_config(config, &env)
                .map_err(|e| store_error(StoreError::Backend(e.to_string())))?;
            store
                .wait_ready(std::time::Duration::from_secs(30))
                .await
                .map_err(store_error)?;
            Box::new(store)
        }
    };
    let fixture = fixture_of(&*store, config, source, id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ExportError::NotFound(DeliveryKey::new(source, id)))?;
    // A fixture is strings and JSON values: it always serializes.
    Ok(serde_json::to_string_pretty(&fixture).expect("a fixture serializes"))
}
