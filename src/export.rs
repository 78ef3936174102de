//! `deliveries export`: a stored delivery as a fixture, so what arrived in production can be
//! replayed on a laptop (`webhook-inbox replay`).

use crate::config::Config;
use crate::fixture::Fixture;
use crate::store::{DeliveryKey, DeliveryStore, SledStore};
use crate::verify::Source;

/// The fixture of `(source, id)` in `store`, or `None` when it is not stored.
pub async fn fixture_of(
    store: &dyn DeliveryStore,
    config: &Config,
    source: &str,
    id: &str,
) -> Result<Option<Fixture>, String> {
    let key = DeliveryKey::new(source, id);
    let (Some(record), Some(body)) = (
        store.record(&key).await.map_err(|e| e.to_string())?,
        store.body(&key).await.map_err(|e| e.to_string())?,
    ) else {
        return Ok(None);
    };
    // The id header is where `replay` puts the id; keep it out of the fixture's headers.
    let id_header = Source::named(config, source)
        .ok()
        .and_then(|s| s.id_header().map(str::to_owned));
    Ok(Some(Fixture::from_record(
        &record,
        &body,
        id_header.as_deref(),
    )))
}

/// Opens `storage.path` directly (the server must be stopped: sled allows one process) and
/// returns the fixture as pretty JSON.
pub async fn export_from_data_dir(
    config: &Config,
    source: &str,
    id: &str,
) -> Result<String, String> {
    let store = SledStore::open(&config.storage.path, config.storage.durability, 16 << 20)
        .map_err(|e| {
            format!(
                "opening {}: {e} (is the server running? stop it first)",
                config.storage.path.display()
            )
        })?;
    let fixture = fixture_of(&store, config, source, id)
        .await?
        .ok_or_else(|| format!("no delivery {source}/{id} is stored"))?;
    serde_json::to_string_pretty(&fixture).map_err(|e| e.to_string())
}
