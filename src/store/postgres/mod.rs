//! The PostgreSQL implementation of [`DeliveryStore`](crate::store::DeliveryStore): several `serve` replicas, one
//! database, every guarantee of the sled store unchanged.
//!
//! Schema (`migrations/`, embedded and run at start, see `schema.rs`): `inbox_deliveries`
//! (one row per `(source, id)`: the record as JSON text, the body), `inbox_jobs` (one row
//! per (delivery, handler), written with the claim; its `due_ms` is the queue entry,
//! `lease_owner`/`lease_until_ms` the runner's hold, `reserved_by`/`reserved_until_ms` a
//! dispatcher's), `inbox_fingerprints` (body dedup, kept past the delivery for
//! `storage.fingerprint_retention`) and `inbox_handlers` (pauses).
//!
//! Files: this one (connecting, the pools, the statements several operations share), one per
//! role of the store — `claim`, `queue` (dispatch), `journal` (call journal), `operator`,
//! `retention` — and `schema.rs` (migrations), `check.rs` (`store check`), `import.rs`
//! (`store copy`).
//!
//! Three pools: `pool_size` connections for requests (claims, admin), and two of a quarter
//! of that for the dispatcher — its reads and the writes that need not wait for the WAL
//! (reservations, renewals, outcomes: see `PgStore::relaxed`), and the durable start of a
//! run — so that a burst of claims never starves dispatch of connections.
//!
//! # Why replicas cannot break the invariants
//!
//! Each operation is one transaction (most of them one statement), so another replica sees
//! all of it or none of it; nothing has an order a crash could cut.
//! - Claim: `INSERT … ON CONFLICT DO NOTHING` on the primary key, in the same statement
//!   (or, with body dedup, the same transaction) as its job rows; a concurrent claim of
//!   the same key waits for the first to commit and then finds it. The answer is sent
//!   after COMMIT, which with `synchronous_commit = on` (the default) is on disk.
//! - Body dedup: the fingerprint row's primary key decides between ids carrying one body,
//!   and the loser becomes an alias in the same transaction (invariant 4).
//! - Dispatch: a replica reserves due rows with `FOR UPDATE SKIP LOCKED` (so replicas take
//!   different work) and starts one with a conditional `UPDATE` that succeeds only if the
//!   pair is not running under a live lease and not reserved by another replica: one runner
//!   per pair at a time. The run lease and the reservation are separate columns, so that a
//!   reservation of a pair whose runner died can never pass for a live run. A replica that dies
//!   leaves a lease that lapses; another then starts the pair with `attempt + 1` (the count
//!   is durable at start) and the same idempotency key.
//! - A pause (`inbox_handlers.paused`) is checked in that same update: once committed, no
//!   run of the handler starts on any replica.
//! - `order_by` lines (`order_key`, `order_at_ms`, schema version 3): a line's pairs that
//!   are not final run one at a time; the active one has a `due_ms`, the others wait with
//!   none. A claim entering a line, the final outcome of a run handing it on
//!   (`promote_next`) and an operator retry of a pair in a line each take the line's
//!   transaction-scoped advisory lock first, so replicas see a line change whole; the hand-on
//!   is in the same transaction as the outcome.
//! - Operator retry moves `due_ms`; a dispatcher holding the old due time starts nothing
//!   (invariant 5). Retention locks the delivery rows it removes (`FOR UPDATE`), and every
//!   retry locks the delivery it requeues, so the two never cross; only one replica sweeps
//!   at a time (a transaction-scoped advisory lock).
//!
//! New work wakes the other replicas' dispatchers through `NOTIFY` (sent on commit); they
//! also poll every few seconds in case a notification is lost while reconnecting.
//!
//! The database may be unreachable at start or go away later: the pool connects lazily,
//! migrations are retried in the background, every operation fails fast with a
//! [`StoreError`] (503 `storage_unavailable`) until the database is back, and nothing
//! needs a restart.

mod check;
mod claim;
mod import;
mod journal;
mod operator;
mod queue;
mod retention;
mod schema;

use std::collections::{HashMap, HashSet};
use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row as _, Transaction};
use tokio::sync::Notify;

pub use schema::migrate;

use super::{
    AttemptContext, AttemptOutcome, Begin, Binding, Claim, Cursor, DeliveryKey, DeliveryRecord,
    DeliveryStatus, DeliverySummary, JobKey, JobState, JobStatus, KeptFingerprint, Lease,
    NewDelivery, QueuedJob, SkipSet, StoreError, TAKE_OVER_GRACE_MS,
};
use crate::config::Durability;

/// A handler at its `concurrency` on every replica together is looked at again this much
/// later (a run ending elsewhere frees a slot without telling this replica).
const AT_LIMIT_RETRY_MS: u64 = 200;

/// How often the paused handlers are read from the database (see `PgStore::pauses`).
pub const PAUSES_READ_EVERY: Duration = Duration::from_millis(250);

/// The channel new work is announced on.
const WORK_CHANNEL: &str = "webhook_inbox_work";

/// The advisory lock that lets one replica at a time sweep retention.
pub const RETENTION_LOCK: i64 = 0x7765_6268_6f6f_6b31; // "webhook1"

/// How long an operation waits for a connection before answering 503: a client's retry is
/// better than a request that hangs while the database is away.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// Rows looked at per page of a filtered listing, and in all, before a page stops short.
const LIST_CHUNK: i64 = 500;
const LIST_SCAN_LIMIT: usize = 10_000;

/// How one try of a claim ended.
enum Attempt {
    /// The claim is decided.
    Decided(Box<Claim>),
    /// The key is taken: the claim reads the record that holds it.
    KeyTaken,
    /// What the claim relied on changed under it: it starts again.
    Again,
}

/// Why a PostgreSQL store could not be made.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PgConfigError(String);

/// Deliveries in PostgreSQL.
pub struct PgStore {
    pool: PgPool,
    /// Connections whose commits do not wait for the WAL flush (`synchronous_commit =
    /// off`), for the writes no answer depends on (see [`PgStore::relaxed`]).
    relaxed: PgPool,
    /// The dispatcher's durable connections: the start of a run (see [`PgStore::dispatch`]).
    dispatch: PgPool,
    /// This process's lease owner id.
    instance: i64,
    /// Set once the migrations have run; until then every operation is refused.
    ready: Arc<AtomicBool>,
    /// Notified when another replica (or this one) announces new work.
    work: Arc<Notify>,
    /// How long a dispatcher's reservation of a due pair holds before another replica may
    /// take it (the reserving replica starts it at once; this only matters if it dies
    /// first): `dispatch.run_lease`.
    reservation: Duration,
    /// Where the retention sweep goes on from (past deliveries it had to keep).
    sweep_from: std::sync::Mutex<Option<(i64, String, String)>>,
    /// The paused handlers as last read, and when: the dispatcher asks every pass, and a
    /// pause made on another replica may take [`PAUSES_READ_EVERY`] to be seen here (one
    /// made here is seen at once).
    pauses: std::sync::Mutex<Option<(std::time::Instant, HashSet<String>)>>,
    /// Bumped by every pause or resume made here, so that a read that began before one is
    /// not kept as the latest.
    pauses_changed: std::sync::atomic::AtomicU64,
    /// Background tasks (migrations, LISTEN), stopped with the store.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn backend(e: sqlx::Error) -> StoreError {
    StoreError::Backend(format!("postgres: {e}"))
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// Milliseconds as PostgreSQL's `bigint` (saturating: "never" is `i64::MAX`).
fn db_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn ms(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn status_name(s: JobStatus) -> &'static str {
    match s {
        JobStatus::Pending => "pending",
        JobStatus::Running => "running",
        JobStatus::Succeeded => "succeeded",
        JobStatus::Failed => "failed",
        JobStatus::Dead => "dead",
    }
}

fn parse_status(s: &str) -> Result<JobStatus, StoreError> {
    Ok(match s {
        "pending" => JobStatus::Pending,
        "running" => JobStatus::Running,
        "succeeded" => JobStatus::Succeeded,
        "failed" => JobStatus::Failed,
        "dead" => JobStatus::Dead,
        other => return Err(corrupt(format!("job status `{other}`"))),
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Serializing our own plain structs cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(corrupt)
}

fn decode_record(text: &str) -> Result<DeliveryRecord, StoreError> {
    serde_json::from_str(text).map_err(corrupt)
}

/// The columns [`job_from_row`] reads.
const JOB_COLUMNS: &str =
    "status, attempts, retry_base, last_error, due_ms, updated_ms, lease_owner, lease_until_ms";

/// The `(source, id, handler)` of a job row.
fn job_key_of(row: &PgRow) -> Result<JobKey, StoreError> {
    let text = |column: &str| row.try_get::<String, _>(column).map_err(backend);
    Ok(DeliveryKey::new(text("source")?, text("id")?).job(&text("handler")?))
}

/// A job row as the [`JobState`] the trait speaks; `None` for a pair with no state yet.
fn job_from_row(row: &PgRow) -> Result<Option<JobState>, StoreError> {
    let updated: Option<i64> = row.try_get("updated_ms").map_err(backend)?;
    let Some(updated) = updated else {
        return Ok(None);
    };
    let status: String = row.try_get("status").map_err(backend)?;
    let owner: Option<i64> = row.try_get("lease_owner").map_err(backend)?;
    let until: Option<i64> = row.try_get("lease_until_ms").map_err(backend)?;
    let status = parse_status(&status)?;
    Ok(Some(JobState {
        status,
        attempts: row.try_get::<i32, _>("attempts").map_err(backend)?.max(0) as u32,
        last_error: row.try_get("last_error").map_err(backend)?,
        queued_at_ms: row
            .try_get::<Option<i64>, _>("due_ms")
            .map_err(backend)?
            .map(ms),
        updated_ms: ms(updated),
        retry_base: row.try_get::<i32, _>("retry_base").map_err(backend)?.max(0) as u32,
        // Only a running pair's lease is its runner's; a reservation is the dispatcher's.
        lease: match (status, owner, until) {
            (JobStatus::Running, Some(owner), Some(until)) => Some(Lease {
                owner: owner as u64,
                until_ms: ms(until),
            }),
            _ => None,
        },
    }))
}

impl PgStore {
    /// A store on the database at `url` (not connected yet: the pool connects on first use,
    /// migrations run in the background until they succeed, and [`Maintenance::is_healthy`](crate::store::Maintenance::is_healthy)
    /// says when the store is ready). A URL that cannot be parsed is an error; a database
    /// that cannot be reached is not.
    pub fn connect(
        url: &str,
        pool_size: u32,
        durability: Durability,
    ) -> Result<PgStore, PgConfigError> {
        let options = Self::options(url, durability)?;
        let reservation = crate::config::DispatchConfig::default().run_lease;
        // The dispatcher's own connections, a quarter of `pool_size` each (at least 2), so
        // that it never waits behind a burst of claims for one of the main pool's.
        let dispatch_size = (pool_size / 4).max(2);
        let relaxed = PgPoolOptions::new()
            .max_connections(dispatch_size)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options.clone().options([("synchronous_commit", "off")]));
        let dispatch = PgPoolOptions::new()
            .max_connections(dispatch_size)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options.clone());
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        let ready = Arc::new(AtomicBool::new(false));
        let work = Arc::new(Notify::new());
        let tasks = vec![
            tokio::spawn(schema::migrate_until_done(pool.clone(), ready.clone())),
            tokio::spawn(listen_for_work(pool.clone(), work.clone())),
        ];
        Ok(PgStore {
            pool,
            relaxed,
            dispatch,
            instance: rand::random::<i64>() & i64::MAX,
            ready,
            work,
            reservation,
            sweep_from: std::sync::Mutex::new(None),
            pauses: std::sync::Mutex::new(None),
            pauses_changed: std::sync::atomic::AtomicU64::new(0),
            tasks,
        })
    }

    /// The store `[storage]` names: the URL from `postgres_url` or the variable
    /// `postgres_url_env` names (looked up through `env`), `pool_size`, `durability`. A
    /// missing variable or a URL that is not one is an error naming the key.
    pub fn from_config(
        config: &crate::config::Config,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<PgStore, crate::config::ConfigError> {
        let url = config.postgres_url(env)?;
        let storage = &config.storage;
        let mut store =
            PgStore::connect(&url, storage.pool_size, storage.durability).map_err(|e| {
                crate::config::ConfigError::new(
                    &config.file,
                    format!("{}: {e}", config.postgres_url_key()),
                )
            })?;
        store.reservation = config.dispatch.run_lease;
        Ok(store)
    }

    /// Connection options from a URL. The error never repeats the URL (it may hold a
    /// password).
    pub fn options(url: &str, durability: Durability) -> Result<PgConnectOptions, PgConfigError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| PgConfigError(format!("not a PostgreSQL URL ({})", redact(&e))))?
            .application_name("webhook-inbox");
        Ok(match durability {
            Durability::Fsync => options,
            // Commits return before the WAL is flushed: the same trade as sled's buffered.
            Durability::Buffered => options.options([("synchronous_commit", "off")]),
        })
    }

    /// Waits until the migrations have run (tests, `store copy`), at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.ready.load(Ordering::Acquire) {
            if tokio::time::Instant::now() > deadline {
                return Err(StoreError::Backend(
                    "postgres: the database did not become ready".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The pool, refused until the schema is in place.
    fn db(&self) -> Result<&PgPool, StoreError> {
        if self.ready.load(Ordering::Acquire) {
            Ok(&self.pool)
        } else {
            Err(StoreError::Backend(
                "postgres: not ready (the database is unreachable or its migrations have not run yet)"
                    .into(),
            ))
        }
    }

    /// The dispatcher's connections: for its reads (so that they never queue behind a burst
    /// of claims for a connection of the main pool), and for writes that acknowledge
    /// nothing to anyone and whose loss in a crash the design allows for, as sled's unsynced writes: a dispatcher's reservation (lost, it was never
    /// taken), a lease renewal (lost, the lease is shorter), the outcome of a run (lost, the
    /// pair runs again with `attempt + 1` — its start was durable — and the same idempotency
    /// key). They are visible at once, and PostgreSQL writes its WAL in order, so any later
    /// durable commit (an acknowledgement) makes them durable too. Without this the
    /// dispatcher waited one WAL flush per pair it took from the queue.
    fn relaxed(&self) -> Result<&PgPool, StoreError> {
        self.db()?;
        Ok(&self.relaxed)
    }

    /// The start of a run commits durably (its attempt number must survive a crash), on
    /// connections of the dispatcher's own, so that dispatch keeps its share of the
    /// database while claims queue for the main pool.
    fn dispatch(&self) -> Result<&PgPool, StoreError> {
        self.db()?;
        Ok(&self.dispatch)
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.db()?.begin().await.map_err(backend)
    }

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

    /// A plain claim (no body dedup): one statement inserts the record and its job rows and
    /// announces the work; `None` when the key was taken.
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
                RETURNING due_ms \
             ), n AS ( \
                SELECT pg_notify($8, '') FROM (SELECT 1 FROM j WHERE due_ms IS NOT NULL LIMIT 1) AS any_due \
             ) \
             SELECT (SELECT count(*) FROM d) AS inserted, (SELECT count(*) FROM n) AS notified",
        )
        .bind(&record.source)
        .bind(&record.id)
        .bind(db_ms(record.received_at_ms))
        .bind(to_json(record))
        .bind(new.body().as_ref())
        .bind(&record.handlers)
        .bind(due)
        .bind(WORK_CHANNEL)
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
                    return Ok(Attempt::Decided(Box::new(Claim::Existing(first))));
                }
                first
            }
            None => self
                .resolved(&mut *tx, &DeliveryKey::new(&record.source, &first_id))
                .await?
                .ok_or_else(|| corrupt("a fingerprint names a delivery that is gone"))?,
        };
        let mut alias = record.clone();
        alias.alias_of = Some(first.id.clone());
        alias.handlers = Vec::new();
        alias.response = first.response.clone();
        alias.lease_until_ms = None;
        alias.lease_owner = None;
        alias.order_keys.clear();
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
        record.handlers.push(handler.to_owned());
        if let Some(value) = order_key {
            record
                .order_keys
                .insert(handler.to_owned(), value.to_owned());
        }
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

    /// The start of a run as one check-and-set: started only if not final, still queued
    /// where the caller found it, not running under a lease that blocks a take-over
    /// (whoever's), not reserved by another replica, and its handler not paused (a pause
    /// committed before this statement holds, whatever the dispatcher read earlier).
    fn start_query<'q>(
        &self,
        job: &'q JobKey,
        queued_due: Option<u64>,
        now_ms: u64,
        lease_until_ms: u64,
    ) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        sqlx::query(concat!(
            "UPDATE inbox_jobs j SET status = 'running', attempts = j.attempts + 1, \
                updated_ms = $4, lease_owner = $6, lease_until_ms = $7, \
                reserved_by = NULL, reserved_until_ms = NULL \
             FROM inbox_deliveries d \
             WHERE j.source = $1 AND j.id = $2 AND j.handler = $3 \
               AND d.source = j.source AND d.id = j.id \
               AND j.status NOT IN ('succeeded', 'dead') \
               AND ($5::bigint IS NULL OR j.due_ms = $5) \
               AND NOT (j.status = 'running' AND COALESCE(j.lease_until_ms, 0) + ",
            grace!(),
            " > $4) \
               AND NOT (COALESCE(j.reserved_until_ms, 0) > $4 AND j.reserved_by <> $6) \
               AND NOT EXISTS (SELECT 1 FROM inbox_handlers h WHERE h.name = j.handler AND h.paused) \
             RETURNING j.attempts, j.retry_base, d.record, d.body",
        ))
        .bind(&job.delivery.source)
        .bind(&job.delivery.id)
        .bind(&job.handler)
        .bind(db_ms(now_ms))
        .bind(queued_due.map(db_ms))
        .bind(self.instance)
        .bind(db_ms(lease_until_ms))
    }

    /// Why [`PgStore::start_query`] started nothing: busy (someone holds it) or nothing to
    /// run.
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
            _ if paused => Some(now.saturating_add(super::PAUSED_RETRY_MS as i64)),
            _ => None,
        };
        // Without a live hold it changed between the two statements: the next pass decides.
        Ok(Begin::Busy {
            until_ms: held.map_or(now_ms, ms),
        })
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
        let rows = sqlx::query(&format!(
            "WITH c AS ( \
                SELECT source, id, handler FROM inbox_jobs \
                WHERE due_ms <= $1 {of_handler} \
                  AND NOT (status = 'running' AND COALESCE(lease_until_ms, 0) + {grace} > $1) \
                  AND (COALESCE(reserved_until_ms, 0) <= $1 OR reserved_by = $3) \
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
        .fetch_all(self.relaxed()?)
        .await
        .map_err(backend)?;
        let mut due = Vec::with_capacity(rows.len());
        for row in rows {
            let job = job_key_of(&row)?;
            // A pair this process runs or has deferred is held, so the statement passed it
            // by already; this only guards a race with its own lease.
            if skip.contains(&job) {
                continue;
            }
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

    /// The number a `SELECT count(*) …` returns.
    async fn count(&self, sql: &'static str) -> Result<usize, StoreError> {
        let n: i64 = sqlx::query_scalar(sql)
            .fetch_one(self.db()?)
            .await
            .map_err(backend)?;
        Ok(usize::try_from(n).unwrap_or(0))
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

impl Drop for PgStore {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A delivery's record read under a row lock (`FOR UPDATE` or `FOR SHARE`) held until `tx`
/// ends.
/// The run a [`PgStore::start_query`] row started.
fn started(row: &PgRow) -> Result<Begin, StoreError> {
    let attempt = row.try_get::<i32, _>("attempts").map_err(backend)?.max(0) as u32;
    let base = row.try_get::<i32, _>("retry_base").map_err(backend)?.max(0) as u32;
    // Started all the same: the runner dead-letters it with the reason (invariant 8).
    let record = match decode_record(&row.try_get::<String, _>("record").map_err(backend)?) {
        Ok(record) => record,
        Err(e) => {
            return Ok(Begin::Unreadable {
                attempt,
                error: e.to_string(),
            });
        }
    };
    Ok(Begin::Started(Box::new(AttemptContext {
        record,
        body: Bytes::from(row.try_get::<Vec<u8>, _>("body").map_err(backend)?),
        attempt,
        attempts_in_round: attempt.saturating_sub(base),
    })))
}

async fn locked_record(
    tx: &mut Transaction<'static, Postgres>,
    key: &DeliveryKey,
    lock: &'static str,
) -> Result<Option<DeliveryRecord>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT record FROM inbox_deliveries WHERE source = $1 AND id = $2 {lock}"
    ))
    .bind(&key.source)
    .bind(&key.id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(backend)?;
    match row {
        Some(row) => decode_record(&row.try_get::<String, _>("record").map_err(backend)?).map(Some),
        None => Ok(None),
    }
}

/// Inserts a delivery's row unless its key is taken; returns whether it did.
async fn insert_delivery(
    tx: &mut Transaction<'static, Postgres>,
    record: &DeliveryRecord,
    body: &[u8],
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO inbox_deliveries (source, id, received_at_ms, record, alias_of, body) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(&record.source)
    .bind(&record.id)
    .bind(db_ms(record.received_at_ms))
    .bind(to_json(record))
    .bind(&record.alias_of)
    .bind(body)
    .execute(&mut **tx)
    .await
    .map_err(backend)?
    .rows_affected();
    Ok(inserted == 1)
}

/// Records `record` as the first delivery of its body (body dedup) unless the body is
/// known already; returns whether it did.
async fn take_fingerprint(
    tx: &mut Transaction<'static, Postgres>,
    record: &DeliveryRecord,
) -> Result<bool, StoreError> {
    let took = sqlx::query(
        "INSERT INTO inbox_fingerprints (source, fingerprint, id, received_at_ms) \
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(&record.source)
    .bind(&record.fingerprint)
    .bind(&record.id)
    .bind(db_ms(record.received_at_ms))
    .execute(&mut **tx)
    .await
    .map_err(backend)?
    .rows_affected();
    Ok(took == 1)
}

/// Writes a new delivery's job rows (queued on arrival when acknowledged) and announces
/// them on commit. The pair of an ordered handler whose line has anyone in it that is not
/// final waits there unqueued (the caller holds the line's lock).
async fn insert_jobs(
    tx: &mut Transaction<'static, Postgres>,
    record: &DeliveryRecord,
    enqueue: bool,
) -> Result<(), StoreError> {
    if record.handlers.is_empty() {
        return Ok(());
    }
    let mut lines = Vec::with_capacity(record.handlers.len());
    let mut parked = Vec::with_capacity(record.handlers.len());
    for handler in &record.handlers {
        let line = record.order_keys.get(handler).map(|v| line_key(v));
        let waits = match &line {
            Some(line) => sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM inbox_jobs WHERE handler = $1 AND order_key = $2 \
                   AND status NOT IN ('succeeded', 'dead'))",
            )
            .bind(handler)
            .bind(line)
            .fetch_one(&mut **tx)
            .await
            .map_err(backend)?,
            None => false,
        };
        lines.push(line);
        parked.push(waits);
    }
    sqlx::query(
        "INSERT INTO inbox_jobs (source, id, handler, status, due_ms, order_key, order_at_ms) \
         SELECT $1, $2, h, 'pending', CASE WHEN p THEN NULL ELSE $4 END, k, \
                CASE WHEN k IS NULL THEN NULL ELSE $7 END \
         FROM unnest($3::text[], $5::text[], $6::bool[]) AS t(h, k, p)",
    )
    .bind(&record.source)
    .bind(&record.id)
    .bind(&record.handlers)
    .bind(enqueue.then(|| db_ms(record.received_at_ms)))
    .bind(&lines)
    .bind(&parked)
    .bind(db_ms(record.received_at_ms))
    .execute(&mut **tx)
    .await
    .map_err(backend)?;
    if enqueue {
        notify_work(tx).await?;
    }
    Ok(())
}

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

/// The `order_key` column of a line: hex of [`super::line_id`].
fn line_key(value: &str) -> String {
    hex::encode(super::line_id(value))
}

/// Takes the transaction-scoped locks of `(handler, value)` lines, in one order (so two
/// transactions never wait on each other in a cycle).
async fn lock_lines<'a>(
    tx: &mut Transaction<'static, Postgres>,
    lines: impl Iterator<Item = (&'a String, &'a String)>,
) -> Result<(), StoreError> {
    let mut names: Vec<String> = lines
        .map(|(handler, value)| format!("{handler}/{}", line_key(value)))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended(n, 0)) \
         FROM unnest($1::text[]) WITH ORDINALITY AS t(n, i) ORDER BY i",
    )
    .bind(&names)
    .execute(&mut **tx)
    .await
    .map_err(backend)?;
    Ok(())
}

/// Takes the lock of the line of `(handler, order_key column)`.
async fn lock_line(
    tx: &mut Transaction<'static, Postgres>,
    handler: &str,
    line: &str,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("{handler}/{line}"))
        .execute(&mut **tx)
        .await
        .map_err(backend)?;
    Ok(())
}

/// Gives the first pair of a line that waits a way to run, unless a pair of the line has
/// one already (the caller holds the line's lock). A pair never run is due at its
/// received_at, one put back in line by an operator retry now.
async fn promote_next(
    tx: &mut Transaction<'static, Postgres>,
    handler: &str,
    line: &str,
    now_ms: u64,
) -> Result<bool, StoreError> {
    let promoted = sqlx::query(
        "UPDATE inbox_jobs j SET due_ms = CASE WHEN j.status = 'pending' THEN j.order_at_ms ELSE $3 END, \
            updated_ms = $3 \
         FROM (SELECT source, id FROM inbox_jobs \
               WHERE handler = $1 AND order_key = $2 AND status NOT IN ('succeeded', 'dead') \
               ORDER BY order_at_ms, source, id LIMIT 1) AS first \
         WHERE j.source = first.source AND j.id = first.id AND j.handler = $1 \
           AND j.due_ms IS NULL \
           AND NOT EXISTS (SELECT 1 FROM inbox_jobs a WHERE a.handler = $1 AND a.order_key = $2 \
                 AND a.status NOT IN ('succeeded', 'dead') AND a.due_ms IS NOT NULL)",
    )
    .bind(handler)
    .bind(line)
    .bind(db_ms(now_ms))
    .execute(&mut **tx)
    .await
    .map_err(backend)?
    .rows_affected();
    if promoted > 0 {
        notify_work(tx).await?;
    }
    Ok(promoted > 0)
}

/// Announces new due work to every replica's dispatcher (delivered on commit).
async fn notify_work(tx: &mut Transaction<'static, Postgres>) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(WORK_CHANNEL)
        .execute(&mut **tx)
        .await
        .map_err(backend)?;
    Ok(())
}

/// Keeps a `LISTEN` open on [`WORK_CHANNEL`] and wakes the dispatcher on every
/// notification; reconnects (after a pause) when the database goes away.
async fn listen_for_work(pool: PgPool, work: Arc<Notify>) {
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(WORK_CHANNEL).await?;
            // Anything announced while we were not listening: look now.
            work.notify_one();
            loop {
                listener.recv().await?;
                work.notify_one();
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        if let Err(e) = listener.await {
            tracing::debug!(error = %e, "listening for new work failed; dispatch polls until it is back");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A sqlx error's text without anything that could be a URL.
fn redact(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(inner) => {
            let text = inner.to_string();
            if text.contains("://") {
                "invalid URL".into()
            } else {
                text
            }
        }
        other => other.to_string(),
    }
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

/// [`TAKE_OVER_GRACE_MS`] as SQL text: a lapsed run lease blocks others until this long past
/// its end (`lease_until_ms + grace > now`), so that its runner has stopped (invariant 6).
macro_rules! grace {
    () => {
        "2000"
    };
}
use grace;

/// The state an operator retry gives a pair, as an `UPDATE … SET` list (`$4` is now): a
/// fresh `max_attempts` if it failed or died, any hold released (its due time is set
/// beside it: see [`REQUEUE`]).
macro_rules! requeue_state {
    () => {
        "retry_base = CASE WHEN status IN ('failed', 'dead') THEN attempts ELSE retry_base END, \
         status = CASE WHEN status = 'pending' THEN 'pending' ELSE 'failed' END, \
         lease_owner = NULL, lease_until_ms = NULL, reserved_by = NULL, reserved_until_ms = NULL, \
         updated_ms = $4"
    };
}

/// [`requeue_state`] alone, for a statement that sets the due time itself.
const REQUEUE_STATE: &str = requeue_state!();

/// An operator retry of one pair, due now.
const REQUEUE: &str = concat!(requeue_state!(), ", due_ms = $4");

#[cfg(test)]
mod grace_tests {
    #[test]
    fn the_sql_grace_is_the_store_s_grace() {
        assert_eq!(grace!(), super::TAKE_OVER_GRACE_MS.to_string());
    }
}
