//! The downstream call journal ([`crate::store::CallJournal`]).

use async_trait::async_trait;

use super::{PgStore, backend, from_json, to_json};
use crate::store::CallJournal;
use crate::store::{CallRecord, DeliveryKey, JobKey, JournalEntry, StoreError};

#[async_trait]
impl CallJournal for PgStore {
    async fn journal_get(
        &self,
        job: &JobKey,
        step: &str,
    ) -> Result<Option<CallRecord>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT record FROM inbox_calls \
             WHERE source = $1 AND id = $2 AND handler = $3 AND step = $4",
        )
        .bind(&job.delivery.source)
        .bind(&job.delivery.id)
        .bind(&job.handler)
        .bind(step)
        .fetch_optional(self.db()?)
        .await
        .map_err(backend)?;
        row.map(|(text,)| from_json(&text)).transpose()
    }

    async fn journal_put(
        &self,
        job: &JobKey,
        step: &str,
        record: &CallRecord,
    ) -> Result<CallRecord, StoreError> {
        // Not waiting for the WAL flush (the relaxed pool); the first writer wins.
        let (text,): (String,) = sqlx::query_as(
            "WITH put AS ( \
                INSERT INTO inbox_calls (source, id, handler, step, record) \
                VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING record) \
             SELECT record FROM put \
             UNION ALL \
             SELECT record FROM inbox_calls \
             WHERE source = $1 AND id = $2 AND handler = $3 AND step = $4 \
               AND NOT EXISTS (SELECT 1 FROM put)",
        )
        .bind(&job.delivery.source)
        .bind(&job.delivery.id)
        .bind(&job.handler)
        .bind(step)
        .bind(to_json(record))
        .fetch_one(self.relaxed()?)
        .await
        .map_err(backend)?;
        from_json(&text)
    }

    async fn journal_replayed(&self, job: &JobKey, step: &str) -> Result<(), StoreError> {
        let Some(mut record) = self.journal_get(job, step).await? else {
            return Ok(());
        };
        record.replayed = record.replayed.saturating_add(1);
        sqlx::query(
            "UPDATE inbox_calls SET record = $5 \
             WHERE source = $1 AND id = $2 AND handler = $3 AND step = $4",
        )
        .bind(&job.delivery.source)
        .bind(&job.delivery.id)
        .bind(&job.handler)
        .bind(step)
        .bind(to_json(&record))
        .execute(self.relaxed()?)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn journal_of(&self, key: &DeliveryKey) -> Result<Vec<JournalEntry>, StoreError> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT handler, step, record FROM inbox_calls \
             WHERE source = $1 AND id = $2 ORDER BY handler COLLATE \"C\", step COLLATE \"C\"",
        )
        .bind(&key.source)
        .bind(&key.id)
        .fetch_all(self.db()?)
        .await
        .map_err(backend)?;
        rows.into_iter()
            .map(|(handler, step, record)| {
                Ok(JournalEntry {
                    handler,
                    step,
                    record: from_json(&record)?,
                })
            })
            .collect()
    }
}
