//! `store copy` on PostgreSQL: writing items exported from another store, one transaction
//! per page, and reading this one out page by page.

use sqlx::Row as _;

use super::{
    PgStore, backend, db_ms, decode_record, from_json, insert_delivery, line_key, lock_line, ms,
    promote_next, status_name, take_fingerprint, to_json,
};
use crate::store::{
    CallJournal, DeliveryKey, ExportPosition, JobQueue, JobState, KeptFingerprint, StoreError,
    StoredItem,
};

impl PgStore {
    /// Writes `items` in one transaction; an item whose key is already here is left as it
    /// is. Returns how many were written. A pair in an `order_by` line comes in parked.
    pub(super) async fn import_items(&self, items: &[StoredItem]) -> Result<usize, StoreError> {
        let mut tx = self.begin().await?;
        let mut written = 0;
        for item in items {
            match item {
                StoredItem::Delivery {
                    record,
                    body,
                    jobs,
                    calls,
                } => {
                    if !insert_delivery(&mut tx, record, body).await? {
                        continue;
                    }
                    written += 1;
                    for (handler, state) in jobs {
                        let state = state.clone().unwrap_or_else(|| JobState {
                            // Never run: queued on arrival if it was acknowledged.
                            status: crate::store::JobStatus::Pending,
                            attempts: 0,
                            last_error: None,
                            queued_at_ms: (record.response.is_some() && record.alias_of.is_none())
                                .then_some(record.received_at_ms),
                            updated_ms: 0,
                            retry_base: 0,
                            lease: None,
                        });
                        let has_state = state.updated_ms > 0 || state.attempts > 0;
                        // A pair in an `order_by` line comes in parked; once everything
                        // is in, each line's first pair is made due (`finish_import`).
                        let line = record.order_keys.get(handler).map(|v| line_key(v));
                        let due = match &line {
                            Some(_) if !state.is_final() => None,
                            _ => state.queued_at_ms.map(db_ms),
                        };
                        sqlx::query(
                            "INSERT INTO inbox_jobs (source, id, handler, status, attempts, \
                                retry_base, last_error, due_ms, updated_ms, lease_owner, \
                                lease_until_ms, order_key, order_at_ms) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                             ON CONFLICT DO NOTHING",
                        )
                        .bind(&record.source)
                        .bind(&record.id)
                        .bind(handler)
                        .bind(status_name(state.status))
                        .bind(i32::try_from(state.attempts).unwrap_or(i32::MAX))
                        .bind(i32::try_from(state.retry_base).unwrap_or(i32::MAX))
                        .bind(&state.last_error)
                        .bind(due)
                        .bind(has_state.then(|| db_ms(state.updated_ms)))
                        // A lease of the old store belongs to a process that has stopped.
                        .bind(None::<i64>)
                        .bind(None::<i64>)
                        .bind(&line)
                        .bind(line.as_ref().map(|_| db_ms(record.received_at_ms)))
                        .execute(&mut *tx)
                        .await
                        .map_err(backend)?;
                    }
                    for entry in calls {
                        sqlx::query(
                            "INSERT INTO inbox_calls (source, id, handler, step, record) \
                             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                        )
                        .bind(&record.source)
                        .bind(&record.id)
                        .bind(&entry.handler)
                        .bind(&entry.step)
                        .bind(to_json(&entry.record))
                        .execute(&mut *tx)
                        .await
                        .map_err(backend)?;
                    }
                    if record.body_dedup && record.alias_of.is_none() {
                        take_fingerprint(&mut tx, record).await?;
                    }
                }
                StoredItem::Fingerprint {
                    source,
                    fingerprint,
                    kept,
                } => {
                    written += sqlx::query(
                        "INSERT INTO inbox_fingerprints \
                            (source, fingerprint, id, received_at_ms, kept_response) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    )
                    .bind(source)
                    .bind(fingerprint)
                    .bind(&kept.id)
                    .bind(db_ms(kept.received_at_ms))
                    .bind(to_json(&kept.response))
                    .execute(&mut *tx)
                    .await
                    .map_err(backend)?
                    .rows_affected() as usize;
                }
            }
        }
        tx.commit().await.map_err(backend)?;
        Ok(written)
    }

    /// Gives every `order_by` line that nobody runs its first pair to run, a line per
    /// transaction.
    pub(super) async fn promote_every_line(&self, now_ms: u64) -> Result<(), StoreError> {
        let lines: Vec<(String, String)> = sqlx::query_as(
            "SELECT DISTINCT handler, order_key FROM inbox_jobs \
             WHERE order_key IS NOT NULL AND status NOT IN ('succeeded', 'dead')",
        )
        .fetch_all(self.db()?)
        .await
        .map_err(backend)?;
        for (handler, line) in &lines {
            let mut tx = self.begin().await?;
            lock_line(&mut tx, handler, line).await?;
            promote_next(&mut tx, handler, line, now_ms).await?;
            tx.commit().await.map_err(backend)?;
        }
        Ok(())
    }

    /// Up to `limit` stored items from `from` on: deliveries in key order with their pairs
    /// and call journal, then the fingerprints kept past their delivery.
    pub(super) async fn export_items(
        &self,
        from: &ExportPosition,
        limit: usize,
    ) -> Result<(Vec<StoredItem>, Option<ExportPosition>), StoreError> {
        let after = from.after.as_deref().and_then(DeliveryKey::decode);
        let (after_source, after_id) = match &after {
            Some(k) => (Some(k.source.as_str()), k.id.as_str()),
            None => (None, ""),
        };
        let mut items = Vec::new();
        if from.phase == 0 {
            let rows = sqlx::query(
                "SELECT source, id, record, body FROM inbox_deliveries \
                 WHERE $1::text IS NULL OR (source, id) > ($1, $2) \
                 ORDER BY source, id LIMIT $3",
            )
            .bind(after_source)
            .bind(after_id)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(self.db()?)
            .await
            .map_err(backend)?;
            for row in &rows {
                let record = decode_record(&row.try_get::<String, _>("record").map_err(backend)?)?;
                let body: Vec<u8> = row.try_get("body").map_err(backend)?;
                let key = record.key();
                let mut jobs = Vec::with_capacity(record.handlers.len());
                for handler in &record.handlers {
                    jobs.push((handler.clone(), self.job(&key.job(handler)).await?));
                }
                let calls = self.journal_of(&key).await?;
                items.push(StoredItem::Delivery {
                    record: Box::new(record),
                    body: body.into(),
                    jobs,
                    calls,
                });
            }
            if rows.len() == limit
                && let Some(StoredItem::Delivery { record, .. }) = items.last()
            {
                let next = ExportPosition {
                    phase: 0,
                    after: Some(record.key().encode()),
                };
                return Ok((items, Some(next)));
            }
            if !items.is_empty() {
                // The fingerprints start on the next page.
                let next = ExportPosition {
                    phase: 1,
                    after: None,
                };
                return Ok((items, Some(next)));
            }
            return Box::pin(self.export_items(
                &ExportPosition {
                    phase: 1,
                    after: None,
                },
                limit,
            ))
            .await;
        }
        let rows = sqlx::query(
            "SELECT source, fingerprint, id, received_at_ms, kept_response FROM inbox_fingerprints \
             WHERE kept_response IS NOT NULL AND ($1::text IS NULL OR (source, fingerprint) > ($1, $2)) \
             ORDER BY source, fingerprint LIMIT $3",
        )
        .bind(after_source)
        .bind(after_id)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.db()?)
        .await
        .map_err(backend)?;
        let mut last = None;
        for row in &rows {
            let source: String = row.try_get("source").map_err(backend)?;
            let fingerprint: String = row.try_get("fingerprint").map_err(backend)?;
            let response: String = row.try_get("kept_response").map_err(backend)?;
            last = Some(DeliveryKey::new(&source, &fingerprint));
            items.push(StoredItem::Fingerprint {
                kept: KeptFingerprint {
                    id: row.try_get("id").map_err(backend)?,
                    received_at_ms: ms(row.try_get("received_at_ms").map_err(backend)?),
                    response: from_json(&response)?,
                },
                source,
                fingerprint,
            });
        }
        let next = (rows.len() == limit).then(|| ExportPosition {
            phase: 1,
            after: last.map(|k| k.encode()),
        });
        Ok((items, next))
    }
}
