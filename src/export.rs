//! `deliveries export`: a stored delivery as a fixture, so what arrived in production can be
//! replayed on a laptop (`webhook-inbox replay`).

use crate::config::Config;
use crate::fixture::Fixture;
use crate::store::{DeliveryKey, DeliveryStore, OpenError, Opening, StoreError};
use crate::verify::Source;

/// Why a delivery could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The store could not be opened (a running server holds sled's lock, say).
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The store could not be read.
    #[error("{}: {source}", path.display())]
    Read {
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
    let store = crate::store::open(
        config,
        &|k| std::env::var(k).ok(),
        Opening::Tool {
            repair_on_open: true,
        },
    )
    .await?;
    let fixture = fixture_of(store.as_dyn(), config, source, id)
        .await
        .map_err(|source| ExportError::Read {
            path: config.storage.path.clone(),
            source,
        })?
        .ok_or_else(|| ExportError::NotFound(DeliveryKey::new(source, id)))?;
    // A fixture is strings and JSON values: it always serializes.
    Ok(serde_json::to_string_pretty(&fixture).expect("a fixture serializes"))
}
