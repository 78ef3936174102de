//! Retention, health and flushing ([`crate::store::Maintenance`]).

use std::collections::HashSet;

use async_trait::async_trait;
use sqlx::Row as _;

use super::{PgStore, TRY_RETENTION_LOCK, backend, db_ms, decode_record, grace, to_json};
use crate::store::Maintenance;
use crate::store::{DeliveryRecord, Expired, ExportPosition, StoreError, StoredItem};

#[async_trait]
impl Maintenance for PgStore {
    async fn expire(
        &self,
        now_ms: u64,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<Expired, StoreError> {
        let now = db_ms(now_ms.max(cutoff_ms));
        let mut tx = self.begin().await?;
        let mine: bool = sqlx::query_scalar(TRY_RETENTION_LOCK)
            .fetch_one(&mut *tx)
            .await
            .map_err(backend)?;
        if !mine {
            // Another replica is sweeping.
            tx.rollback().await.map_err(backend)?;
            return Ok(Expired::default());
        }
        let from = self
            .sweep_from
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or((i64::MIN, String::new(), String::new()));
        // Locked, so that an operator retry or a take-over waits for this sweep (and then
        // finds nothing) or this sweep passes them by.
        let rows = sqlx::query(
            "SELECT source, id, received_at_ms, record FROM inbox_deliveries \
             WHERE received_at_ms < $1 AND (received_at_ms, source, id) > ($2, $3, $4) \
             ORDER BY received_at_ms, source, id LIMIT $5 FOR UPDATE SKIP LOCKED",
        )
        .bind(db_ms(cutoff_ms))
        .bind(from.0)
        .bind(&from.1)
        .bind(&from.2)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(backend)?;
        let mut candidates = Vec::with_capacity(rows.len());
        for row in &rows {
            candidates.push(decode_record(
                &row.try_get::<String, _>("record").map_err(backend)?,
            )?);
        }
        let sources: Vec<&str> = candidates.iter().map(|r| r.source.as_str()).collect();
        let ids: Vec<&str> = candidates.iter().map(|r| r.id.as_str()).collect();
        // A delivery with a handler still due or running is kept (invariant 2).
        let busy: HashSet<(String, String)> = sqlx::query(concat!(
            "SELECT DISTINCT source, id FROM inbox_jobs \
             WHERE (source, id) IN (SELECT * FROM unnest($1::text[], $2::text[])) \
               AND status NOT IN ('succeeded', 'dead') \
               AND (due_ms IS NOT NULL OR order_key IS NOT NULL \
                    OR (status = 'running' AND COALESCE(lease_until_ms, 0) + ",
            grace!(),
            " > $3))",
        ))
        .bind(&sources)
        .bind(&ids)
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend)?
        .iter()
        .map(|r| Ok((r.try_get("source")?, r.try_get("id")?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(backend)?;
        let (keep, remove): (Vec<&DeliveryRecord>, Vec<&DeliveryRecord>) = candidates
            .iter()
            .partition(|r| busy.contains(&(r.source.clone(), r.id.clone())));
        for record in remove
            .iter()
            .filter(|r| r.body_dedup && r.alias_of.is_none())
        {
            // The fingerprint outlives the delivery (`fingerprint_retention`) with its first
            // answer, so a captured request is still answered as the replay it is.
            match &record.response {
                Some(response) => sqlx::query(
                    "UPDATE inbox_fingerprints SET kept_response = $4 \
                     WHERE source = $1 AND fingerprint = $2 AND id = $3 AND kept_response IS NULL",
                )
                .bind(&record.source)
                .bind(&record.fingerprint)
                .bind(&record.id)
                .bind(to_json(response)),
                None => sqlx::query(
                    "DELETE FROM inbox_fingerprints \
                     WHERE source = $1 AND fingerprint = $2 AND id = $3 AND kept_response IS NULL",
                )
                .bind(&record.source)
                .bind(&record.fingerprint)
                .bind(&record.id),
            }
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        let gone_sources: Vec<&str> = remove.iter().map(|r| r.source.as_str()).collect();
        let gone_ids: Vec<&str> = remove.iter().map(|r| r.id.as_str()).collect();
        // Their job rows go with them (ON DELETE CASCADE).
        sqlx::query(
            "DELETE FROM inbox_deliveries \
             WHERE (source, id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
        )
        .bind(&gone_sources)
        .bind(&gone_ids)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        *self.sweep_from.lock().unwrap_or_else(|p| p.into_inner()) = match candidates.last() {
            Some(last) if candidates.len() == limit => Some((
                db_ms(last.received_at_ms),
                last.source.clone(),
                last.id.clone(),
            )),
            // The end of what has expired: the next pass starts from the front again.
            _ => None,
        };
        Ok(Expired {
            removed: remove.len(),
            kept: keep.len(),
            examined: candidates.len(),
        })
    }

    async fn expire_fingerprints(&self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let done = sqlx::query(
            "WITH c AS ( \
                SELECT source, fingerprint FROM inbox_fingerprints \
                WHERE kept_response IS NOT NULL AND received_at_ms < $1 \
                ORDER BY received_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED \
             ) \
             DELETE FROM inbox_fingerprints f USING c \
             WHERE f.source = c.source AND f.fingerprint = c.fingerprint",
        )
        .bind(db_ms(cutoff_ms))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(self.db()?)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() as usize)
    }

    async fn is_healthy(&self) -> bool {
        let Ok(db) = self.db() else { return false };
        sqlx::query("SELECT 1").execute(db).await.is_ok()
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Every acknowledged write was committed; there is nothing to flush.
        Ok(())
    }

    async fn export_page(
        &self,
        from: &ExportPosition,
        limit: usize,
    ) -> Result<(Vec<StoredItem>, Option<ExportPosition>), StoreError> {
        self.export_items(from, limit).await
    }

    async fn import(&self, items: &[StoredItem], _now_ms: u64) -> Result<usize, StoreError> {
        self.import_items(items).await
    }

    async fn finish_import(&self, now_ms: u64) -> Result<(), StoreError> {
        self.promote_every_line(now_ms).await
    }

    async fn close(&self) {
        self.end_tasks().await;
    }
}
