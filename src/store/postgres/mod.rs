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
//! (`store copy`), `batches.rs` (run starts and successes written many to a statement).
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
//!   per pair at a time. (The starts asked for at once share one such statement, each row
//!   under its own conditions: `batches`.) The run lease and the reservation are separate
//!   columns, so that a reservation of a pair whose runner died can never pass for a live
//!   run. A replica that dies leaves a lease that lapses; another then starts the pair with
//!   `attempt + 1` (the count is durable at start) and the same idempotency key.
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
//! New work wakes the other replicas' dispatchers through `NOTIFY`; they also poll every
//! few seconds in case a notification is lost while reconnecting. Claims do not notify in
//! their own transaction: PostgreSQL serializes the commits of every transaction that
//! notified (a database-wide lock held through the WAL flush), which held the whole ack
//! path to one commit at a time. A claim that queued work wakes a task that sends one
//! `NOTIFY` for every claim since its last (`PgStore::announce_work`); the rarer writers
//! (operator retries, a line handed on) still notify on commit.
//!
//! The database may be unreachable at start or go away later: the pool connects lazily,
//! migrations are retried in the background, every operation fails fast with a
//! [`StoreError`] (503 `storage_unavailable`) until the database is back, and nothing
//! needs a restart.

mod batches;
mod check;
mod claim;
mod import;
mod journal;
mod lines;
mod operator;
mod pool;
mod queue;
mod retention;
mod schema;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{Postgres, Row as _, Transaction};
use tokio::sync::Notify;

pub use schema::migrate;

use lines::{line_key, lock_line, lock_lines, promote_next};
pub use pool::WORK_CHANNEL_QUERY;
use pool::notify_work;

use super::{
    AttemptContext, Begin, Claim, DeliveryKey, DeliveryRecord, JobKey, JobState, JobStatus, Lease,
    StoreError,
};

/// How often the paused handlers are read from the database (see `PgStore::pauses`).
pub const PAUSES_READ_EVERY: Duration = Duration::from_millis(250);

/// The key of a named advisory lock as SQL text, `$name` being the SQL of the name: the
/// name within this store's schema. Advisory locks are database-wide, so a bare name would
/// let deployments (and test stores) in schemas of their own share a database and still
/// hold each other's locks: one's retention sweep skipped while another's ran.
macro_rules! lock_key {
    ($name:literal) => {
        concat!(
            "hashtextextended(current_schema() || '/' || ",
            $name,
            ", 0)"
        )
    };
}
use lock_key;

/// Takes the transaction-scoped lock that lets one replica at a time sweep this schema's
/// retention (`true`: this transaction holds it; `false`: another sweeps).
pub const TRY_RETENTION_LOCK: &str = concat!(
    "SELECT pg_try_advisory_xact_lock(",
    lock_key!("'retention'"),
    ")"
);

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
    /// Wakes the task that announces this replica's new claims to the others
    /// ([`PgStore::announce_work`]).
    announce: Arc<Notify>,
    /// Where run starts go to be written many to a commit (see `batches`).
    starts: tokio::sync::mpsc::UnboundedSender<batches::StartRequest>,
    /// Where runs' successes go to be written many to a statement (see `batches`).
    successes: tokio::sync::mpsc::UnboundedSender<batches::SuccessRequest>,
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
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
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
    /// The number a `SELECT count(*) …` returns.
    async fn count(&self, sql: &'static str) -> Result<usize, StoreError> {
        let n: i64 = sqlx::query_scalar(sql)
            .fetch_one(self.db()?)
            .await
            .map_err(backend)?;
        Ok(usize::try_from(n).unwrap_or(0))
    }
}

/// A delivery's record read under a row lock (`FOR UPDATE` or `FOR SHARE`) held until `tx`
/// ends.
/// The run a row of `batches::START_BATCH_SQL` started.
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
        record: std::sync::Arc::new(record),
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

/// Writes a new delivery's job rows (queued on arrival when acknowledged; the claim
/// announces them once committed, [`PgStore::announce_work`]). The pair of an ordered
/// handler whose line has anyone in it that is not final waits there unqueued (the caller
/// holds the line's lock).
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
    Ok(())
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
        assert_eq!(grace!(), crate::store::TAKE_OVER_GRACE_MS.to_string());
    }
}
