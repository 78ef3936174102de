//! The queue of (delivery, handler) pairs and the runs' start and outcome
//! ([`crate::store::JobQueue`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{
    AT_LIMIT_RETRY_MS, JOB_COLUMNS, PAUSES_READ_EVERY, PgStore, backend, db_ms, grace,
    job_from_row, ms, started,
};
use crate::store::JobQueue;
use crate::store::{AttemptOutcome, Begin, JobKey, JobState, QueuedJob, SkipSet, StoreError};

#[async_trait]
impl JobQueue for PgStore {
    async fn job(&self, key: &JobKey) -> Result<Option<JobState>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM inbox_jobs WHERE source = $1 AND id = $2 AND handler = $3"
        ))
        .bind(&key.delivery.source)
        .bind(&key.delivery.id)
        .bind(&key.handler)
        .fetch_optional(self.db()?)
        .await
        .map_err(backend)?;
        match row {
            Some(row) => job_from_row(&row),
            None => Ok(None),
        }
    }

    async fn due_jobs(
        &self,
        now_ms: u64,
        limit: usize,
        skip: &SkipSet,
    ) -> Result<Vec<QueuedJob>, StoreError> {
        self.reserve_due(None, now_ms, limit, skip).await
    }

    async fn next_due_ms(&self, skip: &SkipSet) -> Result<Option<u64>, StoreError> {
        self.next_due(None, skip).await
    }

    async fn due_jobs_of(
        &self,
        handler: &str,
        now_ms: u64,
        limit: usize,
        skip: &SkipSet,
    ) -> Result<Vec<QueuedJob>, StoreError> {
        self.reserve_due(Some(handler), now_ms, limit, skip).await
    }

    async fn next_due_of(&self, handler: &str, skip: &SkipSet) -> Result<Option<u64>, StoreError> {
        self.next_due(Some(handler), skip).await
    }

    async fn begin_attempt(
        &self,
        job: &JobKey,
        queued_due: Option<u64>,
        now_ms: u64,
        lease_until_ms: u64,
    ) -> Result<Begin, StoreError> {
        let row = self
            .start_query(job, queued_due, now_ms, lease_until_ms)
            .fetch_optional(self.dispatch()?)
            .await
            .map_err(backend)?;
        match row {
            Some(row) => started(&row),
            None => self.not_started(job, queued_due, now_ms).await,
        }
    }

    async fn begin_limited_attempt(
        &self,
        job: &JobKey,
        queued_due: Option<u64>,
        now_ms: u64,
        lease_until_ms: u64,
        concurrency: Option<usize>,
    ) -> Result<Begin, StoreError> {
        let Some(limit) = concurrency else {
            return self
                .begin_attempt(job, queued_due, now_ms, lease_until_ms)
                .await;
        };
        // The handler's slots are its pairs running under leases that block a take-over,
        // counted and taken under the handler's transaction-scoped lock, so that replicas
        // starting runs at once count each other (`concurrency` across every replica).
        let mut tx = self.dispatch()?.begin().await.map_err(backend)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("slots/{}", job.handler))
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        let running: i64 = sqlx::query_scalar(concat!(
            "SELECT count(*) FROM inbox_jobs WHERE handler = $1 AND status = 'running' \
               AND COALESCE(lease_until_ms, 0) + ",
            grace!(),
            " > $2"
        ))
        .bind(&job.handler)
        .bind(db_ms(now_ms))
        .fetch_one(&mut *tx)
        .await
        .map_err(backend)?;
        if usize::try_from(running).unwrap_or(usize::MAX) >= limit {
            tx.rollback().await.map_err(backend)?;
            return Ok(Begin::AtLimit {
                retry_at_ms: now_ms + AT_LIMIT_RETRY_MS,
            });
        }
        let row = self
            .start_query(job, queued_due, now_ms, lease_until_ms)
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        match row {
            Some(row) => started(&row),
            None => self.not_started(job, queued_due, now_ms).await,
        }
    }

    async fn reserve_start(
        &self,
        handler: &str,
        interval_ms: u64,
        now_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        // One statement: the handler's next start moves on by the interval, from now at the
        // earliest (a burst of one), and this start takes the time it moved from.
        let at: i64 = sqlx::query_scalar(
            "INSERT INTO inbox_handlers (name, paused, updated_ms, next_start_ms) \
             VALUES ($1, false, $2, $2 + $3) \
             ON CONFLICT (name) DO UPDATE SET next_start_ms = \
                GREATEST(COALESCE(inbox_handlers.next_start_ms, 0), $2) + $3 \
             RETURNING next_start_ms - $3",
        )
        .bind(handler)
        .bind(db_ms(now_ms))
        .bind(db_ms(interval_ms))
        .fetch_one(self.relaxed()?)
        .await
        .map_err(backend)?;
        Ok(Some(ms(at)))
    }

    async fn renew_job_lease(
        &self,
        job: &JobKey,
        attempt: u32,
        lease_until_ms: u64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE inbox_jobs SET lease_owner = $5, lease_until_ms = $6 \
             WHERE source = $1 AND id = $2 AND handler = $3 \
               AND status = 'running' AND attempts = $4 AND lease_owner = $5",
        )
        .bind(&job.delivery.source)
        .bind(&job.delivery.id)
        .bind(&job.handler)
        .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
        .bind(self.instance)
        .bind(db_ms(lease_until_ms))
        .execute(self.relaxed()?)
        .await
        .map_err(backend)?;
        Ok(done.rows_affected() == 1)
    }

    async fn finish_attempt(
        &self,
        job: &JobKey,
        attempt: u32,
        outcome: AttemptOutcome,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        // A success is recorded whichever attempt it came from; any other outcome only
        // from the current attempt. A pair that succeeded stays succeeded.
        let pair = |sql| {
            sqlx::query(sql)
                .bind(&job.delivery.source)
                .bind(&job.delivery.id)
                .bind(&job.handler)
                .bind(db_ms(now_ms))
        };
        let attempt = i32::try_from(attempt).unwrap_or(i32::MAX);
        let query = match &outcome {
            // A final outcome of an ordered pair also hands its line on: that is
            // `finish_in_line`'s, so these update only pairs outside any line.
            AttemptOutcome::Succeeded => pair(
                "UPDATE inbox_jobs SET status = 'succeeded', due_ms = NULL, \
                    lease_owner = NULL, lease_until_ms = NULL, updated_ms = $4 \
                 WHERE source = $1 AND id = $2 AND handler = $3 AND status <> 'succeeded' \
                   AND order_key IS NULL",
            ),
            AttemptOutcome::Dead { error } => pair(
                "UPDATE inbox_jobs SET status = 'dead', due_ms = NULL, last_error = $6, \
                    lease_owner = NULL, lease_until_ms = NULL, updated_ms = $4 \
                 WHERE source = $1 AND id = $2 AND handler = $3 AND status <> 'succeeded' \
                   AND attempts = $5 AND order_key IS NULL",
            )
            .bind(attempt)
            .bind(error),
            AttemptOutcome::RetryAt { due_ms, error } => pair(
                "UPDATE inbox_jobs SET status = 'failed', due_ms = $7, last_error = $6, \
                    lease_owner = NULL, lease_until_ms = NULL, updated_ms = $4 \
                 WHERE source = $1 AND id = $2 AND handler = $3 AND status <> 'succeeded' \
                   AND attempts = $5",
            )
            .bind(attempt)
            .bind(error)
            .bind(db_ms(*due_ms)),
            // Processed mode: the sender's retry runs it again; a queue entry an operator
            // retry added stays.
            AttemptOutcome::Failed { error } => pair(
                "UPDATE inbox_jobs SET status = 'failed', last_error = $6, \
                    lease_owner = NULL, lease_until_ms = NULL, updated_ms = $4 \
                 WHERE source = $1 AND id = $2 AND handler = $3 AND status <> 'succeeded' \
                   AND attempts = $5",
            )
            .bind(attempt)
            .bind(error),
        };
        // Not waited for: see `relaxed`.
        let updated = query
            .execute(self.relaxed()?)
            .await
            .map_err(backend)?
            .rows_affected();
        if updated == 0
            && matches!(
                outcome,
                AttemptOutcome::Succeeded | AttemptOutcome::Dead { .. }
            )
        {
            self.finish_in_line(job, attempt, &outcome, now_ms).await?;
        }
        Ok(())
    }

    async fn queued_handlers(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT DISTINCT handler FROM inbox_jobs WHERE due_ms IS NOT NULL")
            .fetch_all(self.relaxed()?)
            .await
            .map_err(backend)
    }

    async fn paused_handlers(&self) -> Result<HashSet<String>, StoreError> {
        if let Some((at, paused)) = &*self.pauses.lock().unwrap_or_else(|p| p.into_inner())
            && at.elapsed() < PAUSES_READ_EVERY
        {
            return Ok(paused.clone());
        }
        let generation = self.pauses_changed.load(Ordering::Acquire);
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM inbox_handlers WHERE paused")
            .fetch_all(self.relaxed()?)
            .await
            .map_err(backend)?;
        let paused: HashSet<String> = names.into_iter().collect();
        let mut cached = self.pauses.lock().unwrap_or_else(|p| p.into_inner());
        if self.pauses_changed.load(Ordering::Acquire) == generation {
            *cached = Some((std::time::Instant::now(), paused.clone()));
        }
        Ok(paused)
    }

    fn work_signal(&self) -> Option<Arc<Notify>> {
        Some(self.work.clone())
    }
}
