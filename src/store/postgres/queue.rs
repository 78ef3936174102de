//! The queue of (delivery, handler) pairs and the runs' start and outcome
//! ([`crate::store::JobQueue`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use sqlx::Row as _;
use tokio::sync::Notify;

use super::batches::{Start, key_arrays, start_query, submit};
use super::{
    JOB_COLUMNS, PAUSES_READ_EVERY, PgStore, backend, db_ms, grace, job_from_row, job_key_of,
    lock_key, lock_line, ms, parse_status, promote_next, started,
};
use crate::store::{
    AttemptOutcome, Begin, JobKey, JobQueue, JobState, JobStatus, QueuedJob, SkipSet, StoreError,
    TAKE_OVER_GRACE_MS,
};

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
        // Written with the other starts asked for meanwhile, one commit for all (`batches`).
        self.dispatch()?;
        let start = Start {
            queued_due,
            now_ms,
            lease_until_ms,
        };
        match submit(&self.starts, job, start).await? {
            Some(begin) => Ok(begin),
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
        sqlx::query(concat!(
            "SELECT pg_advisory_xact_lock(",
            lock_key!("$1"),
            ")"
        ))
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
        let start = Start {
            queued_due,
            now_ms,
            lease_until_ms,
        };
        let row = start_query(self.instance, &[(job, &start)])
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
            // `finish_in_line`'s, so these update only pairs outside any line. A success,
            // the common outcome, is written with the others recorded meanwhile
            // (`batches`), under the same conditions.
            AttemptOutcome::Succeeded => {
                self.relaxed()?;
                if !submit(&self.successes, job, now_ms).await? {
                    self.finish_in_line(job, attempt, &outcome, now_ms).await?;
                }
                return Ok(());
            }
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
        // (A success went to `finish_in_line` above when its batch passed it over.)
        if updated == 0 && matches!(outcome, AttemptOutcome::Dead { .. }) {
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

impl PgStore {
    /// The final outcome of a pair in an `order_by` line (or of a superseded attempt,
    /// which changes nothing): under the line's lock, the outcome and the promotion of the
    /// next pair of the line, in one transaction.
    async fn finish_in_line(
        &self,
        job: &JobKey,
        attempt: i32,
        outcome: &AttemptOutcome,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut tx = self.relaxed()?.begin().await.map_err(backend)?;
        let line: Option<String> = sqlx::query_scalar(
            "SELECT order_key FROM inbox_jobs WHERE source = $1 AND id = $2 AND handler = $3",
        )
        .bind(&job.delivery.source)
        .bind(&job.delivery.id)
        .bind(&job.handler)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?
        .flatten();
        let Some(line) = line else {
            return Ok(());
        };
        lock_line(&mut tx, &job.handler, &line).await?;
        let (status, error) = match outcome {
            AttemptOutcome::Dead { error } => ("dead", Some(error.as_str())),
            _ => ("succeeded", None),
        };
        let updated = sqlx::query(
            "UPDATE inbox_jobs SET status = $4, due_ms = NULL, \
                last_error = COALESCE($5, last_error), \
                lease_owner = NULL, lease_until_ms = NULL, updated_ms = $6 \
             WHERE source = $1 AND id = $2 AND handler = $3 AND status <> 'succeeded' \
               AND ($4 = 'succeeded' OR attempts = $7)",
        )
        .bind(&job.delivery.source)
        .bind(&job.delivery.id)
        .bind(&job.handler)
        .bind(status)
        .bind(error)
        .bind(db_ms(now_ms))
        .bind(attempt)
        .execute(&mut *tx)
        .await
        .map_err(backend)?
        .rows_affected();
        if updated > 0 {
            promote_next(&mut tx, &job.handler, &line, now_ms).await?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(())
    }

    /// Why a start (`batches::START_BATCH_SQL`) started nothing: busy (someone holds it) or
    /// nothing to run.
    async fn not_started(
        &self,
        job: &JobKey,
        queued_due: Option<u64>,
        now_ms: u64,
    ) -> Result<Begin, StoreError> {
        let now = db_ms(now_ms);
        let queued = queued_due.map(db_ms);
        let row = sqlx::query(
            "SELECT status, due_ms, lease_until_ms, reserved_until_ms, \
                EXISTS (SELECT 1 FROM inbox_handlers h WHERE h.name = $3 AND h.paused) AS paused \
             FROM inbox_jobs WHERE source = $1 AND id = $2 AND handler = $3",
        )
        .bind(&job.delivery.source)
        .bind(&job.delivery.id)
        .bind(&job.handler)
        .fetch_optional(self.dispatch()?)
        .await
        .map_err(backend)?;
        let Some(row) = row else {
            return Ok(Begin::Skipped);
        };
        let status = parse_status(&row.try_get::<String, _>("status").map_err(backend)?)?;
        let due: Option<i64> = row.try_get("due_ms").map_err(backend)?;
        let lease: Option<i64> = row.try_get("lease_until_ms").map_err(backend)?;
        let reserved: Option<i64> = row.try_get("reserved_until_ms").map_err(backend)?;
        let moved = queued.is_some() && due != queued;
        if matches!(status, JobStatus::Succeeded | JobStatus::Dead) || moved {
            return Ok(Begin::Skipped);
        }
        let paused: bool = row.try_get("paused").map_err(backend)?;
        let grace = TAKE_OVER_GRACE_MS as i64;
        let held = match (status, lease, reserved) {
            (JobStatus::Running, Some(lease), _) if lease.saturating_add(grace) > now => {
                Some(lease.saturating_add(grace))
            }
            (_, _, Some(reserved)) if reserved > now => Some(reserved),
            _ if paused => Some(now.saturating_add(crate::store::PAUSED_RETRY_MS as i64)),
            _ => None,
        };
        // Without a live hold it changed between the two statements: the next pass decides.
        Ok(Begin::Busy {
            until_ms: held.map_or(now_ms, ms),
        })
    }

    /// Reserves up to `limit` due pairs (of `handler`, or of every handler) for this
    /// replica, earliest first, so that replicas reading the queue at once take different
    /// pairs; a pair running under a live lease, or reserved by another replica, is not due
    /// here.
    async fn reserve_due(
        &self,
        handler: Option<&str>,
        now_ms: u64,
        limit: usize,
        skip: &SkipSet,
    ) -> Result<Vec<QueuedJob>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = db_ms(now_ms);
        // Two texts rather than `($5 IS NULL OR handler = $5)`, so that each gets the plan
        // of its own index.
        let of_handler = if handler.is_some() {
            "AND handler = $5"
        } else {
            "AND $5::text IS NULL"
        };
        // The pairs this replica passes over are left out by the statement itself, not
        // after it: a pair handed to a runner stays reserved by this replica, and due, until
        // its start commits, and those in-flight pairs sit at the front of the queue. Left
        // to the filter below they took the batch's places, so that a read asked for n
        // pairs returned one (BENCHMARKS.md, session 15).
        let (passed_sources, passed_ids, passed_handlers) = key_arrays(
            skip.iter()
                .filter(|job| handler.is_none_or(|h| job.handler == h)),
        );
        let rows = sqlx::query(&format!(
            "WITH c AS ( \
                SELECT source, id, handler FROM inbox_jobs j \
                WHERE due_ms <= $1 {of_handler} \
                  AND NOT (status = 'running' AND COALESCE(lease_until_ms, 0) + {grace} > $1) \
                  AND (COALESCE(reserved_until_ms, 0) <= $1 OR reserved_by = $3) \
                  AND NOT EXISTS (SELECT 1 FROM unnest($6::text[], $7::text[], $8::text[]) \
                      AS s(source, id, handler) \
                      WHERE s.source = j.source AND s.id = j.id AND s.handler = j.handler) \
                ORDER BY due_ms LIMIT $2 FOR UPDATE SKIP LOCKED \
             ) \
             UPDATE inbox_jobs j SET reserved_by = $3, reserved_until_ms = $4 FROM c \
             WHERE j.source = c.source AND j.id = c.id AND j.handler = c.handler \
             RETURNING j.source, j.id, j.handler, j.due_ms",
            grace = grace!()
        ))
        .bind(now)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(self.instance)
        .bind(now.saturating_add(self.reservation.as_millis() as i64))
        .bind(handler)
        .bind(passed_sources)
        .bind(passed_ids)
        .bind(passed_handlers)
        .fetch_all(self.relaxed()?)
        .await
        .map_err(backend)?;
        let mut due = Vec::with_capacity(rows.len());
        for row in rows {
            let job = job_key_of(&row)?;
            due.push(QueuedJob {
                due_ms: ms(row.try_get("due_ms").map_err(backend)?),
                job,
            });
        }
        due.sort_by_key(|q| q.due_ms);
        Ok(due)
    }

    /// When the next pair (of `handler`, or of any) becomes due here: a pair someone holds
    /// is due to the others when the hold lapses.
    async fn next_due(
        &self,
        handler: Option<&str>,
        skip: &SkipSet,
    ) -> Result<Option<u64>, StoreError> {
        let of_handler = if handler.is_some() {
            "AND handler = $2"
        } else {
            "AND $2::text IS NULL"
        };
        let rows = sqlx::query(&format!(
            "SELECT source, id, handler, GREATEST(due_ms, \
                CASE WHEN status = 'running' THEN COALESCE(lease_until_ms, 0) + {grace} ELSE 0 END, \
                COALESCE(reserved_until_ms, 0)) AS at \
             FROM inbox_jobs WHERE due_ms IS NOT NULL {of_handler} ORDER BY due_ms LIMIT $1",
            grace = grace!()
        ))
        .bind(i64::try_from(skip.len() + 64).unwrap_or(i64::MAX))
        .bind(handler)
        .fetch_all(self.relaxed()?)
        .await
        .map_err(backend)?;
        let mut next: Option<u64> = None;
        for row in rows {
            let job = job_key_of(&row)?;
            if !skip.contains(&job) {
                let at = ms(row.try_get("at").map_err(backend)?);
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        Ok(next)
    }
}

/// A handler at its `concurrency` on every replica together is looked at again this much
/// later (a run ending elsewhere frees a slot without telling this replica).
const AT_LIMIT_RETRY_MS: u64 = 200;
