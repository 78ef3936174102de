//! Reading a whole sled store out, page by page, for `store copy` (see
//! [`crate::store::copy`]).

use super::SledInner;
use super::encoding::{BodyEntry, backend, decode_delivery_key, split_delivery};
use crate::store::{DeliveryKey, ExportPosition, StoreError, StoredItem};

impl SledInner {
    /// Up to `limit` stored items from `from` on, and where the next page starts (`None`
    /// once everything was read). Each delivery comes with all its job states; the store
    /// should not be written meanwhile (the server stopped).
    pub fn export_page(
        &self,
        from: &ExportPosition,
        limit: usize,
    ) -> Result<(Vec<StoredItem>, Option<ExportPosition>), StoreError> {
        let mut items = Vec::new();
        let mut position = from.clone();
        if position.phase == 0 {
            let range = match &position.after {
                Some(after) => self.deliveries.range((
                    std::ops::Bound::Excluded(after.clone()),
                    std::ops::Bound::Unbounded,
                )),
                None => self.deliveries.iter(),
            };
            for entry in range {
                let (key, value) = entry.map_err(backend)?;
                let Some(delivery) = decode_delivery_key(&key) else {
                    continue;
                };
                let (meta, body) = split_delivery(&value)?;
                let record = meta.record()?;
                let jobs = record
                    .handlers
                    .iter()
                    .map(|h| {
                        let state = self.read_job(&delivery.job(h).encode())?;
                        Ok((h.clone(), self.crashes_counted(state, &record)))
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?;
                let calls = self.journal_entries(&delivery)?;
                items.push(StoredItem::Delivery {
                    record: Box::new(record),
                    body: self.body_of(body)?,
                    jobs,
                    calls,
                });
                position.after = Some(key.to_vec());
                if items.len() == limit {
                    return Ok((items, Some(position)));
                }
            }
            position = ExportPosition {
                phase: 1,
                after: None,
            };
        }
        let range = match &position.after {
            Some(after) => self.body_index.range((
                std::ops::Bound::Excluded(after.clone()),
                std::ops::Bound::Unbounded,
            )),
            None => self.body_index.iter(),
        };
        for entry in range {
            let (key, value) = entry.map_err(backend)?;
            position.after = Some(key.to_vec());
            if let BodyEntry::Kept(kept) = BodyEntry::decode(&value)?
                && let Some(DeliveryKey {
                    source,
                    id: fingerprint,
                }) = decode_delivery_key(&key)
            {
                items.push(StoredItem::Fingerprint {
                    source,
                    fingerprint,
                    kept,
                });
                if items.len() == limit {
                    return Ok((items, Some(position)));
                }
            }
        }
        Ok((items, None))
    }
}
