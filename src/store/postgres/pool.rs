//! Connecting: the three pools, their options, the wait for a database that is not up
//! yet, and the LISTEN task that wakes this replica's dispatcher when another queues work.

use std::str::FromStr as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use tokio::sync::Notify;

use super::{PgConfigError, PgStore, backend, batches, schema};
use crate::config::Durability;
use crate::store::StoreError;

/// Prepared statements are planned anew at every execution, never from a cached generic
/// plan. sqlx prepares each statement once per connection, and after five executions
/// PostgreSQL may keep a generic plan, costed on the tables as they were then: on a fresh
/// store's near-empty `inbox_jobs`, the run-start batch (a join of `unnest` over the
/// batch's keys) was planned as a sequential scan and hash join, and kept so while the
/// table grew (until an ANALYZE, which autovacuum runs at most once a minute and only once
/// a tenth of the table has changed), so that every batch read the whole table, dead rows
/// and all. Its latency climbed from 8 to 74 ms in 30 s of load and one replica's runs fell
/// behind its acks (BENCHMARKS.md, session 27). A custom plan costs a planning per
/// statement (a fraction of a millisecond) and follows the table as it grows. A
/// `plan_cache_mode` in the URL's `options` is overridden.
const PLAN_CACHE_MODE: &str = "force_custom_plan";

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
        let announce = Arc::new(Notify::new());
        let instance = rand::random::<i64>() & i64::MAX;
        let (starts, start_requests) = tokio::sync::mpsc::unbounded_channel();
        let (successes, success_requests) = tokio::sync::mpsc::unbounded_channel();
        let tasks = vec![
            tokio::spawn(schema::migrate_until_done(pool.clone(), ready.clone())),
            tokio::spawn(listen_for_work(pool.clone(), work.clone())),
            tokio::spawn(announce_claims(relaxed.clone(), announce.clone())),
            // As many starts in flight as durable connections; successes on at most half of
            // the relaxed connections, leaving the rest to queue reads.
            tokio::spawn(batches::write_in_batches(
                start_requests,
                dispatch_size as usize,
                {
                    let pool = dispatch.clone();
                    move |batch| batches::write_starts(pool.clone(), instance, batch)
                },
            )),
            tokio::spawn(batches::write_in_batches(
                success_requests,
                (dispatch_size as usize / 2).max(1),
                {
                    let pool = relaxed.clone();
                    move |batch| batches::write_successes(pool.clone(), batch)
                },
            )),
        ];
        Ok(PgStore {
            pool,
            relaxed,
            dispatch,
            instance,
            ready,
            work,
            announce,
            starts,
            successes,
            reservation,
            sweep_from: std::sync::Mutex::new(None),
            pauses: std::sync::Mutex::new(None),
            pauses_changed: std::sync::atomic::AtomicU64::new(0),
            tasks: std::sync::Mutex::new(tasks),
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
            .application_name("webhook-inbox")
            // Every statement planned for the tables as they are now (see `PLAN_CACHE_MODE`).
            .options([("plan_cache_mode", PLAN_CACHE_MODE)]);
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
    pub(super) fn db(&self) -> Result<&PgPool, StoreError> {
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
    pub(super) fn relaxed(&self) -> Result<&PgPool, StoreError> {
        self.db()?;
        Ok(&self.relaxed)
    }

    /// The start of a run commits durably (its attempt number must survive a crash), on
    /// connections of the dispatcher's own, so that dispatch keeps its share of the
    /// database while claims queue for the main pool.
    pub(super) fn dispatch(&self) -> Result<&PgPool, StoreError> {
        self.db()?;
        Ok(&self.dispatch)
    }

    pub(super) async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.db()?.begin().await.map_err(backend)
    }
}

/// The SQL of the channel new work is announced on: one per schema (`LISTEN`/`NOTIFY`
/// channels are database-wide, so deployments in schemas of their own would otherwise wake
/// each other's dispatchers for work they cannot see). Hashed, as a channel name is at most
/// 63 bytes and a schema's name may be that long itself.
macro_rules! work_channel {
    () => {
        "'webhook_inbox_work_' || left(md5(current_schema()), 16)"
    };
}

/// Reads the name of this schema's work channel (see `work_channel!`).
pub const WORK_CHANNEL_QUERY: &str = concat!("SELECT ", work_channel!());

/// Announces work on this schema's channel.
const NOTIFY_WORK: &str = concat!("SELECT pg_notify(", work_channel!(), ", '')");

/// How long an operation waits for a connection before answering 503: a client's retry is
/// better than a request that hangs while the database is away.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

impl PgStore {
    /// How many of the store's background tasks are still running.
    pub fn running_tasks(&self) -> usize {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|task| !task.is_finished())
            .count()
    }

    /// Ends the background tasks and waits until they have (see `Maintenance::close`).
    pub(super) async fn end_tasks(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            task.abort();
            // An aborted task ends with a cancellation error: that is the point.
            let _ = task.await;
        }
    }
}

/// A store dropped without the shutdown sequence (a command, a test) still stops its
/// tasks.
impl Drop for PgStore {
    fn drop(&mut self) {
        for task in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            task.abort();
        }
    }
}

/// Announces new due work to every replica's dispatcher (delivered on commit).
pub(super) async fn notify_work(tx: &mut Transaction<'static, Postgres>) -> Result<(), StoreError> {
    sqlx::query(NOTIFY_WORK)
        .execute(&mut **tx)
        .await
        .map_err(backend)?;
    Ok(())
}

impl PgStore {
    /// Tells the other replicas (and this one's listener) that a committed claim queued
    /// work: wakes [`announce_claims`], which sends one `NOTIFY` at a time, each covering
    /// every claim made since the last was sent.
    pub(super) fn announce_work(&self) {
        self.announce.notify_one();
    }
}

/// Sends `NOTIFY` on this schema's work channel whenever [`PgStore::announce_work`] asked since the
/// last one: claims made while one is being sent are covered by the next (`Notify` keeps a
/// single permit). A notice that cannot be sent is not retried: the other replicas poll.
async fn announce_claims(pool: PgPool, wanted: Arc<Notify>) {
    loop {
        wanted.notified().await;
        if let Err(e) = sqlx::query(NOTIFY_WORK).execute(&pool).await {
            tracing::debug!(error = %redact(&e), "announcing new work failed; the other replicas poll");
        }
    }
}

/// Keeps a `LISTEN` open on this schema's work channel and wakes the dispatcher on every
/// notification; reconnects (after a pause) when the database goes away.
async fn listen_for_work(pool: PgPool, work: Arc<Notify>) {
    loop {
        let listener = async {
            let channel: String = sqlx::query_scalar(WORK_CHANNEL_QUERY)
                .fetch_one(&pool)
                .await?;
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
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
