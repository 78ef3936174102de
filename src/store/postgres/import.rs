//! Writing items exported from another store (`store copy`), one transaction per page.

use super::{
    PgStore, backend, db_ms, insert_delivery, line_key, lock_line, promote_next, status_name,
    take_fingerprint, to_json,
};
use crate::store::{JobState, StoreError, StoredItem};

impl PgStore {
    /// Writes `items` in one transaction; an item whose key is already here is left as it
    /// is. Returns how many were written.
    pub async fn import(&self, items: &[StoredItem]) -> Result<usize, StoreError> {
        let mut tx = self.begin().await?;
        let mut written = 0;
        let mut lines = std::collections::BTreeSet::new();
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
                        // A pair in an `order_by` line comes in parked; once the page is
                        // written, each line's first pair is made due (`promote_next`).
                        let line = record.order_keys.get(handler).map(|v| line_key(v));
                        let due = match &line {
                            Some(line) if !state.is_final() => {
                                lines.insert((handler.clone(), line.clone()));
                                None
                            }
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
        let now = crate::clock::Clock::System.now_ms();
        for (handler, line) in &lines {
            lock_line(&mut tx, handler, line).await?;
            promote_next(&mut tx, handler, line, now).await?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(written)
    }
}
