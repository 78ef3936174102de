//! Taking deliveries in: the claim, the reads of a stored delivery, and `ack = "processed"`'s
//! delivery lease ([`crate::store::Claims`]).

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::Row as _;

use super::{
    Attempt, PgStore, backend, corrupt, db_ms, decode_record, insert_delivery, insert_jobs,
    lock_lines, locked_record, ms, take_fingerprint, to_json,
};
use crate::store::{
    Claim, Claims, DeliveryKey, DeliveryRecord, KeptFingerprint, Lease, NewDelivery, StoreError,
    StoredResponse, TakeOver,
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
                Attempt::Decided(claim) => {
                    if matches!(*claim, Claim::New)
                        && new.enqueue()
                        && !new.record().handlers.is_empty()
                    {
                        // After the commit, so whoever wakes finds the rows.
                        self.announce_work();
                    }
                    return Ok(*claim);
                }
                Attempt::Again => continue,
                Attempt::KeyTaken => {
                    if let Some(existing) = self.resolved(self.db()?, &key).await? {
                        return Ok(Claim::Existing(existing.into()));
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

impl PgStore {
    /// The record under `key`, or, for an alias made by body dedup, the first delivery's
    /// while it is still stored.
    async fn resolved<'e>(
        &self,
        executor: impl sqlx::PgExecutor<'e>,
        key: &DeliveryKey,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT d.record, f.record AS first FROM inbox_deliveries d \
             LEFT JOIN inbox_deliveries f ON f.source = d.source AND f.id = d.alias_of \
             WHERE d.source = $1 AND d.id = $2",
        )
        .bind(&key.source)
        .bind(&key.id)
        .fetch_optional(executor)
        .await
        .map_err(backend)?;
        let Some(row) = row else { return Ok(None) };
        let first: Option<String> = row.try_get("first").map_err(backend)?;
        let own: String = row.try_get("record").map_err(backend)?;
        decode_record(first.as_deref().unwrap_or(&own)).map(Some)
    }

    /// A plain claim (no body dedup): one statement inserts the record and its job rows;
    /// `None` when the key was taken.
    async fn claim_plain(&self, new: &NewDelivery) -> Result<bool, StoreError> {
        let record = new.record();
        let due = new.enqueue().then(|| db_ms(record.received_at_ms));
        let row = sqlx::query(
            "WITH d AS ( \
                INSERT INTO inbox_deliveries (source, id, received_at_ms, record, body) \
                VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING source, id \
             ), j AS ( \
                INSERT INTO inbox_jobs (source, id, handler, status, due_ms) \
                SELECT d.source, d.id, h, 'pending', $7 FROM d, unnest($6::text[]) AS h \
             ) \
             SELECT (SELECT count(*) FROM d) AS inserted",
        )
        .bind(&record.source)
        .bind(&record.id)
        .bind(db_ms(record.received_at_ms))
        .bind(to_json(record))
        .bind(new.body().as_ref())
        .bind(&record.handlers)
        .bind(due)
        .fetch_one(self.db()?)
        .await
        .map_err(backend)?;
        Ok(row.try_get::<i64, _>("inserted").map_err(backend)? == 1)
    }

    /// A claim with body dedup or `order_by` lines: the record, then the body's
    /// fingerprint, then the job rows, in one transaction; a fingerprint already taken
    /// turns the new record into an alias. The lines' locks are taken first, so the pairs
    /// entering a line see everyone ahead of them.
    async fn claim_in_transaction(&self, new: &NewDelivery) -> Result<Attempt, StoreError> {
        let record = new.record();
        let mut tx = self.begin().await?;
        lock_lines(&mut tx, record.order_keys.iter()).await?;
        if !insert_delivery(&mut tx, record, new.body()).await? {
            return Ok(Attempt::KeyTaken);
        }
        if !record.body_dedup || take_fingerprint(&mut tx, record).await? {
            insert_jobs(&mut tx, record, new.enqueue()).await?;
            tx.commit().await.map_err(backend)?;
            return Ok(Attempt::Decided(Box::new(Claim::New)));
        }
        // The body is known: under which id, and is that delivery still stored?
        let row = sqlx::query(
            "SELECT id, received_at_ms, kept_response FROM inbox_fingerprints \
             WHERE source = $1 AND fingerprint = $2 FOR UPDATE",
        )
        .bind(&record.source)
        .bind(&record.fingerprint)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        let Some(row) = row else {
            // Forgotten in between (its kept fingerprint expired): from the start again.
            tx.rollback().await.map_err(backend)?;
            return Ok(Attempt::Again);
        };
        let first_id: String = row.try_get("id").map_err(backend)?;
        let kept: Option<String> = row.try_get("kept_response").map_err(backend)?;
        let first = match kept {
            Some(response) => {
                let kept = KeptFingerprint {
                    id: first_id.clone(),
                    received_at_ms: ms(row.try_get("received_at_ms").map_err(backend)?),
                    response: serde_json::from_str(&response).map_err(corrupt)?,
                };
                let first = kept.as_record(&record.source, &record.fingerprint);
                if first_id == record.id {
                    // This very delivery, expired but remembered by its body: a replay.
                    tx.rollback().await.map_err(backend)?;
                    return Ok(Attempt::Decided(Box::new(Claim::Existing(first.into()))));
                }
                first
            }
            None => self
                .resolved(&mut *tx, &DeliveryKey::new(&record.source, &first_id))
                .await?
                .ok_or_else(|| corrupt("a fingerprint names a delivery that is gone"))?,
        };
        let alias = record.as_alias_of(&first);
        sqlx::query(
            "UPDATE inbox_deliveries SET record = $3, alias_of = $4, body = '' \
             WHERE source = $1 AND id = $2",
        )
        .bind(&record.source)
        .bind(&record.id)
        .bind(to_json(&alias))
        .bind(&first.id)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(Attempt::Decided(Box::new(Claim::BodyDuplicate(first))))
    }

    /// Reads a delivery's record under a row lock, lets `change` edit it, writes it back if
    /// `change` says so; one transaction (the processed-mode lease operations).
    async fn update_record<T>(
        &self,
        key: &DeliveryKey,
        change: impl FnOnce(Option<&mut DeliveryRecord>) -> (T, bool),
    ) -> Result<T, StoreError> {
        let mut tx = self.begin().await?;
        let mut record = locked_record(&mut tx, key, "FOR UPDATE").await?;
        let (out, write) = change(record.as_mut());
        if let (true, Some(record)) = (write, &record) {
            sqlx::query("UPDATE inbox_deliveries SET record = $3 WHERE source = $1 AND id = $2")
                .bind(&key.source)
                .bind(&key.id)
                .bind(to_json(record))
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
            tx.commit().await.map_err(backend)?;
        } else {
            tx.rollback().await.map_err(backend)?;
        }
        Ok(out)
    }
}
