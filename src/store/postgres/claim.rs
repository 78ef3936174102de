//! Taking deliveries in: the claim, the reads of a stored delivery, and `ack = "processed"`'s
//! delivery lease ([`crate::store::Claims`]).

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::Row as _;

use super::{Attempt, PgStore, backend, decode_record};
use crate::store::Claims;
use crate::store::{
    Claim, DeliveryKey, DeliveryRecord, Lease, NewDelivery, StoreError, StoredResponse, TakeOver,
};

#[async_trait]
impl Claims for PgStore {
    async fn claim(&self, new: NewDelivery) -> Result<Claim, StoreError> {
        let key = new.record().key();
        // A claim that loses to a concurrent one reads the winner; should the winner be
        // gone by then (expired in between), the claim is tried again.
        for _ in 0..5 {
            let attempt = if new.record().body_dedup || !new.record().order_keys.is_empty() {
                self.claim_in_transaction(&new).await?
            } else if self.claim_plain(&new).await? {
                Attempt::Decided(Box::new(Claim::New))
            } else {
                Attempt::KeyTaken
            };
            match attempt {
                Attempt::Decided(claim) => return Ok(*claim),
                Attempt::Again => continue,
                Attempt::KeyTaken => {
                    if let Some(existing) = self.resolved(self.db()?, &key).await? {
                        return Ok(Claim::Existing(existing));
                    }
                }
            }
        }
        Err(StoreError::Backend(format!(
            "postgres: the claim of {key} kept racing with its expiry"
        )))
    }

    async fn record(&self, key: &DeliveryKey) -> Result<Option<DeliveryRecord>, StoreError> {
        let row = sqlx::query("SELECT record FROM inbox_deliveries WHERE source = $1 AND id = $2")
            .bind(&key.source)
            .bind(&key.id)
            .fetch_optional(self.db()?)
            .await
            .map_err(backend)?;
        match row {
            Some(row) => {
                decode_record(&row.try_get::<String, _>("record").map_err(backend)?).map(Some)
            }
            None => Ok(None),
        }
    }

    async fn body(&self, key: &DeliveryKey) -> Result<Option<Bytes>, StoreError> {
        // An alias keeps no copy of the body it shares with its first delivery.
        let row = sqlx::query(
            "SELECT COALESCE(f.body, d.body) AS body FROM inbox_deliveries d \
             LEFT JOIN inbox_deliveries f ON f.source = d.source AND f.id = d.alias_of \
             WHERE d.source = $1 AND d.id = $2",
        )
        .bind(&key.source)
        .bind(&key.id)
        .fetch_optional(self.db()?)
        .await
        .map_err(backend)?;
        match row {
            Some(row) => Ok(Some(Bytes::from(
                row.try_get::<Vec<u8>, _>("body").map_err(backend)?,
            ))),
            None => Ok(None),
        }
    }

    async fn take_over(
        &self,
        key: &DeliveryKey,
        now_ms: u64,
        lease: Lease,
    ) -> Result<TakeOver, StoreError> {
        self.update_record(key, |record| match record {
            Some(record) => {
                let (taken, changed) = record.take_over(now_ms, lease);
                (Ok(taken), changed)
            }
            None => (
                Err(StoreError::Corrupt(
                    "record vanished during take-over".into(),
                )),
                false,
            ),
        })
        .await?
    }

    async fn renew_lease(&self, key: &DeliveryKey, lease: Lease) -> Result<bool, StoreError> {
        // The owner is in the condition: the row is locked, read, and changed only if
        // `lease.owner` holds it.
        self.update_record(key, |record| match record {
            Some(record) => {
                let renewed = record.renew_processed_lease(lease);
                (renewed, renewed)
            }
            None => (false, false),
        })
        .await
    }

    async fn release(
        &self,
        key: &DeliveryKey,
        owner: u64,
        response: Option<StoredResponse>,
    ) -> Result<bool, StoreError> {
        self.update_record(key, |record| match record {
            Some(record) => {
                let released = record.release_processed_lease(owner, response);
                (released, released)
            }
            None => (false, false),
        })
        .await
    }
}
