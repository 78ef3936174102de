//! What an operator does and reads: listings, retries, pauses, counts, backfill
//! ([`crate::store::Operations`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use sqlx::Row as _;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Transaction};

use super::{
    JOB_COLUMNS, PgStore, REQUEUE, REQUEUE_STATE, backend, corrupt, db_ms, decode_record, grace,
    job_from_row, job_key_of, line_key, lock_line, lock_lines, locked_record, ms, notify_work,
    parse_status, status_name, to_json,
};
use crate::store::{
    Binding, Cursor, DeliveryKey, DeliveryRecord, DeliveryStatus, DeliverySummary, JobKey,
    JobState, JobStatus, Operations, Page, Received, RetryFilter, StoreError, TAKE_OVER_GRACE_MS,
};

#[async_trait]
impl Operations for PgStore {
    async fn list(
        &self,
        source: Option<&str>,
        status: Option<DeliveryStatus>,
        limit: usize,
        cursor: Option<&Cursor>,
    ) -> Result<Page, StoreError> {
        let mut before = match cursor {
            Some(c) => decode_cursor(c),
            None => None,
        }
        .unwrap_or((i64::MAX, String::new(), String::new()));
        let mut deliveries = Vec::new();
        let mut examined = 0;
        loop {
            let chunk = if status.is_some() {
                LIST_CHUNK
            } else {
                i64::try_from(limit - deliveries.len()).unwrap_or(LIST_CHUNK)
            };
            let rows = sqlx::query(
                "SELECT record FROM inbox_deliveries \
                 WHERE ($1::text IS NULL OR source = $1) \
                   AND (received_at_ms, source, id) < ($2, $3, $4) \
                 ORDER BY received_at_ms DESC, source DESC, id DESC LIMIT $5",
            )
            .bind(source)
            .bind(before.0)
            .bind(&before.1)
            .bind(&before.2)
            .bind(chunk)
            .fetch_all(self.db()?)
            .await
            .map_err(backend)?;
            let fetched = rows.len();
            let mut records = Vec::with_capacity(fetched);
            for row in rows {
                records.push(decode_record(
                    &row.try_get::<String, _>("record").map_err(backend)?,
                )?);
            }
            for summary in self.summaries(records).await? {
                examined += 1;
                before = (
                    db_ms(summary.record.received_at_ms),
                    summary.record.source.clone(),
                    summary.record.id.clone(),
                );
                if status.is_none_or(|s| s == summary.status) {
                    deliveries.push(summary);
                    if deliveries.len() == limit {
                        let next = deliveries.last().map(|d| encode_cursor(&d.record));
                        return Ok(Page { deliveries, next });
                    }
                }
            }
            if (fetched as i64) < chunk {
                return Ok(Page {
                    deliveries,
                    next: None,
                });
            }
            if examined >= LIST_SCAN_LIMIT {
                // A page may stop short of `limit` (with a cursor to go on) rather than read
                // the whole store for a filter that matches little.
                let mut position = ms(before.0).to_be_bytes().to_vec();
                position.extend_from_slice(&DeliveryKey::new(&before.1, &before.2).encode());
                return Ok(Page {
                    deliveries,
                    next: Some(Cursor::from_position(position)),
                });
            }
        }
    }

    async fn retry(&self, key: &DeliveryKey, now_ms: u64) -> Result<Vec<String>, StoreError> {
        let mut tx = self.begin().await?;
        // The delivery's row lock: retention cannot remove it under this retry.
        let Some(record) = locked_record(&mut tx, key, "FOR SHARE").await? else {
            return Ok(Vec::new());
        };
        lock_lines(&mut tx, record.order_keys.iter()).await?;
        let mut requeued: Vec<String> = sqlx::query_scalar(&format!(
            "UPDATE inbox_jobs SET {REQUEUE} \
             WHERE source = $1 AND id = $2 AND handler = ANY($3) AND status <> 'succeeded' \
               AND NOT (status = 'running' AND COALESCE(lease_until_ms, 0) + {grace} > $4) \
               AND order_key IS NULL \
             RETURNING handler",
            grace = grace!()
        ))
        .bind(&key.source)
        .bind(&key.id)
        .bind(&record.handlers)
        .bind(db_ms(now_ms))
        .fetch_all(&mut *tx)
        .await
        .map_err(backend)?;
        for handler in record.order_keys.keys() {
            if requeue_in_line(&mut tx, &key.job(handler), None, now_ms).await? {
                requeued.push(handler.clone());
            }
        }
        if !requeued.is_empty() {
            notify_work(&mut tx).await?;
        }
        tx.commit().await.map_err(backend)?;
        // In the record's order.
        Ok(record
            .handlers
            .into_iter()
            .filter(|h| requeued.contains(h))
            .collect())
    }

    async fn retry_all(&self, filter: &RetryFilter, now_ms: u64) -> Result<usize, StoreError> {
        let mut tx = self.begin().await?;
        let requeued = sqlx::query(&format!(
            "WITH c AS ( \
                SELECT j.source, j.id, j.handler FROM inbox_jobs j \
                JOIN inbox_deliveries d ON d.source = j.source AND d.id = j.id \
                WHERE j.status = $1 AND ($2::text IS NULL OR j.source = $2) \
                  AND ($3::text IS NULL OR j.handler = $3) \
                  AND ($5::bigint IS NULL OR d.received_at_ms >= $5) \
                  AND ($6::bigint IS NULL OR d.received_at_ms < $6) \
                FOR SHARE OF d FOR UPDATE OF j \
             ) \
             UPDATE inbox_jobs SET {REQUEUE} FROM c \
             WHERE inbox_jobs.source = c.source AND inbox_jobs.id = c.id \
               AND inbox_jobs.handler = c.handler AND inbox_jobs.status = $1 \
               AND inbox_jobs.order_key IS NULL"
        ))
        .bind(status_name(filter.status))
        .bind(filter.source.as_deref())
        .bind(filter.handler.as_deref())
        .bind(db_ms(now_ms))
        .bind(filter.since_ms.map(db_ms))
        .bind(filter.until_ms.map(db_ms))
        .execute(&mut *tx)
        .await
        .map_err(backend)?
        .rows_affected();
        // Pairs in `order_by` lines, one by one under their lines' locks (taken in one
        // order, before any of their rows).
        let ordered = sqlx::query(
            "SELECT j.source, j.id, j.handler, j.order_key FROM inbox_jobs j \
             JOIN inbox_deliveries d ON d.source = j.source AND d.id = j.id \
             WHERE j.status = $1 AND j.order_key IS NOT NULL \
               AND ($2::text IS NULL OR j.source = $2) AND ($3::text IS NULL OR j.handler = $3) \
               AND ($4::bigint IS NULL OR d.received_at_ms >= $4) \
               AND ($5::bigint IS NULL OR d.received_at_ms < $5) \
             ORDER BY j.handler, j.order_key",
        )
        .bind(status_name(filter.status))
        .bind(filter.source.as_deref())
        .bind(filter.handler.as_deref())
        .bind(filter.since_ms.map(db_ms))
        .bind(filter.until_ms.map(db_ms))
        .fetch_all(&mut *tx)
        .await
        .map_err(backend)?;
        let mut requeued = requeued as usize;
        for row in &ordered {
            let job = job_key_of(row)?;
            let line: String = row.try_get("order_key").map_err(backend)?;
            lock_line(&mut tx, &job.handler, &line).await?;
            if requeue_in_line(&mut tx, &job, Some(filter.status), now_ms).await? {
                requeued += 1;
            }
        }
        if requeued > 0 {
            notify_work(&mut tx).await?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(requeued)
    }

    async fn queue_depths(&self) -> Result<Vec<(String, usize)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT handler, count(*) FROM inbox_jobs WHERE due_ms IS NOT NULL GROUP BY handler",
        )
        .fetch_all(self.db()?)
        .await
        .map_err(backend)?;
        Ok(rows
            .into_iter()
            .map(|(h, n)| (h, usize::try_from(n).unwrap_or(0)))
            .collect())
    }

    async fn handler_stats(
        &self,
        _now_ms: u64,
    ) -> Result<HashMap<String, crate::store::HandlerStats>, StoreError> {
        let rows = sqlx::query(
            "SELECT handler, \
                count(*) FILTER (WHERE due_ms IS NOT NULL) AS queued, \
                count(*) FILTER (WHERE due_ms IS NULL AND order_key IS NOT NULL \
                    AND status NOT IN ('succeeded', 'dead', 'running')) AS waiting, \
                count(*) FILTER (WHERE status = 'running') AS running, \
                count(*) FILTER (WHERE status = 'failed') AS failed, \
                count(*) FILTER (WHERE status = 'dead') AS dead, \
                (array_agg(last_error ORDER BY updated_ms DESC) \
                    FILTER (WHERE status IN ('failed', 'dead') AND last_error IS NOT NULL))[1] \
                    AS last_error \
             FROM inbox_jobs \
             WHERE due_ms IS NOT NULL OR status IN ('running', 'failed', 'dead') \
                OR (order_key IS NOT NULL AND status NOT IN ('succeeded', 'dead')) \
             GROUP BY handler",
        )
        .fetch_all(self.db()?)
        .await
        .map_err(backend)?;
        let count = |row: &PgRow, column: &str| {
            row.try_get::<i64, _>(column)
                .map(|n| usize::try_from(n).unwrap_or(0))
                .map_err(backend)
        };
        let mut stats = HashMap::new();
        for row in &rows {
            stats.insert(
                row.try_get::<String, _>("handler").map_err(backend)?,
                crate::store::HandlerStats {
                    queued: count(row, "queued")?,
                    waiting: count(row, "waiting")?,
                    running: count(row, "running")?,
                    failed: count(row, "failed")?,
                    dead: count(row, "dead")?,
                    last_error: row.try_get("last_error").map_err(backend)?,
                },
            );
        }
        Ok(stats)
    }

    async fn set_paused(&self, handler: &str, paused: bool, now_ms: u64) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO inbox_handlers (name, paused, updated_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET paused = $2, updated_ms = $3",
        )
        .bind(handler)
        .bind(paused)
        .bind(db_ms(now_ms))
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        if !paused {
            // Its queue may be due: every replica's dispatcher looks again.
            notify_work(&mut tx).await?;
        }
        tx.commit().await.map_err(backend)?;
        // Seen by this replica's next dispatcher pass, not a cached read later.
        let mut cached = self.pauses.lock().unwrap_or_else(|p| p.into_inner());
        self.pauses_changed.fetch_add(1, Ordering::AcqRel);
        *cached = None;
        Ok(())
    }

    async fn dead_letters(&self) -> Result<usize, StoreError> {
        self.count("SELECT count(*) FROM inbox_jobs WHERE status = 'dead'")
            .await
    }

    async fn received_between(
        &self,
        since_ms: u64,
        until_ms: u64,
        after: Option<&Received>,
        limit: usize,
    ) -> Result<Vec<Received>, StoreError> {
        let (after_ms, after_source, after_id) = match after {
            Some(a) => (
                Some(db_ms(a.received_at_ms)),
                Some(a.key.source.as_str()),
                Some(a.key.id.as_str()),
            ),
            None => (None, None, None),
        };
        let rows = sqlx::query(
            "SELECT source, id, received_at_ms FROM inbox_deliveries \
             WHERE received_at_ms >= $1 AND received_at_ms < $2 \
               AND ($3::bigint IS NULL OR (received_at_ms, source, id) > ($3, $4, $5)) \
             ORDER BY received_at_ms, source, id LIMIT $6",
        )
        .bind(db_ms(since_ms))
        .bind(db_ms(until_ms))
        .bind(after_ms)
        .bind(after_source)
        .bind(after_id)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.relaxed()?)
        .await
        .map_err(backend)?;
        rows.iter()
            .map(|row| {
                Ok(Received {
                    received_at_ms: ms(row.try_get("received_at_ms").map_err(backend)?),
                    key: DeliveryKey::new(
                        row.try_get::<String, _>("source").map_err(backend)?,
                        row.try_get::<String, _>("id").map_err(backend)?,
                    ),
                })
            })
            .collect()
    }

    async fn bind_handler(
        &self,
        handler: &str,
        batch: &[(DeliveryKey, Option<String>)],
    ) -> Result<Vec<Binding>, StoreError> {
        let mut out = Vec::with_capacity(batch.len());
        for (key, order_key) in batch {
            out.push(self.bind_one(handler, key, order_key.as_deref()).await?);
        }
        Ok(out)
    }
}

impl PgStore {
    /// Backfill of one delivery, in one transaction: under its line's lock (taken first, as
    /// a claim does) and the delivery row's, a job row for `handler` — due at received_at,
    /// or without a due time behind a live pair of its line — and the record naming it.
    async fn bind_one(
        &self,
        handler: &str,
        key: &DeliveryKey,
        order_key: Option<&str>,
    ) -> Result<Binding, StoreError> {
        let mut tx = self.begin().await?;
        let line = order_key.map(line_key);
        if let Some(line) = &line {
            lock_line(&mut tx, handler, line).await?;
        }
        let row = sqlx::query(
            "SELECT record, received_at_ms FROM inbox_deliveries \
             WHERE source = $1 AND id = $2 FOR UPDATE",
        )
        .bind(&key.source)
        .bind(&key.id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        let Some(row) = row else {
            return Ok(Binding::Skipped);
        };
        let mut record: DeliveryRecord =
            serde_json::from_str(&row.try_get::<String, _>("record").map_err(backend)?)
                .map_err(corrupt)?;
        if record.alias_of.is_some() || record.response.is_none() {
            return Ok(Binding::Skipped);
        }
        if record.handlers.iter().any(|h| h == handler) {
            return Ok(Binding::Already);
        }
        let received_at_ms: i64 = row.try_get("received_at_ms").map_err(backend)?;
        let parked = match &line {
            Some(line) => sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM inbox_jobs WHERE handler = $1 AND order_key = $2 \
                   AND status NOT IN ('succeeded', 'dead'))",
            )
            .bind(handler)
            .bind(line)
            .fetch_one(&mut *tx)
            .await
            .map_err(backend)?,
            None => false,
        };
        let inserted = sqlx::query(
            "INSERT INTO inbox_jobs (source, id, handler, status, due_ms, order_key, order_at_ms) \
             VALUES ($1, $2, $3, 'pending', $4, $5, CASE WHEN $5::text IS NULL THEN NULL ELSE $6 END) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&key.source)
        .bind(&key.id)
        .bind(handler)
        .bind((!parked).then_some(received_at_ms))
        .bind(&line)
        .bind(received_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(backend)?
        .rows_affected();
        if inserted == 0 {
            return Ok(Binding::Already);
        }
        record.bind(handler, order_key);
        sqlx::query("UPDATE inbox_deliveries SET record = $3 WHERE source = $1 AND id = $2")
            .bind(&key.source)
            .bind(&key.id)
            .bind(to_json(&record))
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        if !parked {
            notify_work(&mut tx).await?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(Binding::Bound)
    }

    /// The statuses of `keys`' deliveries, from their job rows.
    async fn summaries(
        &self,
        records: Vec<DeliveryRecord>,
    ) -> Result<Vec<DeliverySummary>, StoreError> {
        let sources: Vec<&str> = records.iter().map(|r| r.source.as_str()).collect();
        let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
        let rows = sqlx::query(&format!(
            "SELECT source, id, handler, {JOB_COLUMNS} FROM inbox_jobs \
             WHERE (source, id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
        ))
        .bind(&sources)
        .bind(&ids)
        .fetch_all(self.db()?)
        .await
        .map_err(backend)?;
        let mut jobs: HashMap<JobKey, Option<JobState>> = HashMap::new();
        for row in &rows {
            jobs.insert(job_key_of(row)?, job_from_row(row)?);
        }
        Ok(records
            .into_iter()
            .map(|record| {
                let key = record.key();
                let states: Vec<Option<JobState>> = record
                    .handlers
                    .iter()
                    .map(|h| jobs.remove(&key.job(h)).flatten())
                    .collect();
                DeliverySummary {
                    status: DeliveryStatus::of(&record, &states),
                    record,
                }
            })
            .collect())
    }
}

/// Rows looked at per page of a filtered listing, and in all, before a page stops short.
const LIST_CHUNK: i64 = 500;

const LIST_SCAN_LIMIT: usize = 10_000;

/// An operator retry of a pair in an `order_by` line (the caller holds the line's lock): a
/// pair that waits in line stays there (a retry must not let it overtake); the active one is
/// due now; a dead one goes back in line, due now when nobody else in the line is active.
/// Returns whether it was requeued.
async fn requeue_in_line(
    tx: &mut Transaction<'static, Postgres>,
    job: &JobKey,
    only: Option<JobStatus>,
    now_ms: u64,
) -> Result<bool, StoreError> {
    let row = sqlx::query(
        "SELECT status, due_ms, lease_until_ms, order_key FROM inbox_jobs \
         WHERE source = $1 AND id = $2 AND handler = $3 FOR UPDATE",
    )
    .bind(&job.delivery.source)
    .bind(&job.delivery.id)
    .bind(&job.handler)
    .fetch_optional(&mut **tx)
    .await
    .map_err(backend)?;
    let Some(row) = row else {
        return Ok(false);
    };
    let status = parse_status(&row.try_get::<String, _>("status").map_err(backend)?)?;
    let due: Option<i64> = row.try_get("due_ms").map_err(backend)?;
    let lease: Option<i64> = row.try_get("lease_until_ms").map_err(backend)?;
    let line: Option<String> = row.try_get("order_key").map_err(backend)?;
    let now = db_ms(now_ms);
    let live_lease = status == JobStatus::Running
        && lease.is_some_and(|l| l.saturating_add(TAKE_OVER_GRACE_MS as i64) > now);
    if status == JobStatus::Succeeded
        || live_lease
        || only.is_some_and(|wanted| wanted != status)
        || (status != JobStatus::Dead && due.is_none())
    {
        return Ok(false);
    }
    let due_now = status != JobStatus::Dead || {
        sqlx::query_scalar::<_, bool>(
            "SELECT NOT EXISTS (SELECT 1 FROM inbox_jobs WHERE handler = $1 AND order_key = $2 \
               AND status NOT IN ('succeeded', 'dead') AND due_ms IS NOT NULL)",
        )
        .bind(&job.handler)
        .bind(&line)
        .fetch_one(&mut **tx)
        .await
        .map_err(backend)?
    };
    // Due now, or (`$5` false) back in line behind the active pair, promoted in its turn.
    sqlx::query(&format!(
        "UPDATE inbox_jobs SET {REQUEUE_STATE}, due_ms = CASE WHEN $5 THEN $4 END \
         WHERE source = $1 AND id = $2 AND handler = $3"
    ))
    .bind(&job.delivery.source)
    .bind(&job.delivery.id)
    .bind(&job.handler)
    .bind(now)
    .bind(due_now)
    .execute(&mut **tx)
    .await
    .map_err(backend)?;
    Ok(true)
}

/// The position of a listing cursor: received_at, source, id of the last row shown.
fn encode_cursor(record: &DeliveryRecord) -> Cursor {
    let mut bytes = record.received_at_ms.to_be_bytes().to_vec();
    bytes.extend_from_slice(&record.key().encode());
    Cursor::from_position(bytes)
}

fn decode_cursor(cursor: &Cursor) -> Option<(i64, String, String)> {
    let bytes = cursor.position();
    let (time, key) = bytes.split_at_checked(8)?;
    let time = u64::from_be_bytes(time.try_into().ok()?);
    let text = std::str::from_utf8(key).ok()?;
    let (source, id) = text.split_once('\0')?;
    Some((db_ms(time), source.to_owned(), id.to_owned()))
}
