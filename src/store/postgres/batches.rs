//! Run starts and successes, many to a statement.
//!
//! The start of a run commits durably: its attempt number must survive a crash of the
//! database, or a rerun after one would count the same attempt twice. With one statement per
//! start, each on one of the dispatcher's few durable connections, every start waited for a
//! WAL flush of its own, queued behind the claims' (about 20 ms under load on the benchmark
//! machine): at four connections, a few hundred runs a second could start however idle the
//! handlers. The outcome of a run does not wait for the disk, but one statement per
//! success kept the dispatcher's other connections busy, and a statement's fixed cost is
//! most of what such a small update costs the database.
//!
//! So [`JobQueue::begin_attempt`](crate::store::JobQueue::begin_attempt) and the success
//! of [`JobQueue::finish_attempt`](crate::store::JobQueue::finish_attempt) hand their row to
//! a task ([`write_in_batches`]) that gathers every request made while the previous
//! batches were being written and writes them with one statement ([`START_BATCH_SQL`],
//! [`SUCCESS_BATCH_SQL`]): one commit, one flush. Each row is written under the conditions
//! a statement of its own would check (a start under a handler's `concurrency` lock is
//! this statement with one row), re-checked by PostgreSQL on the row's latest version, so
//! a batch writes nothing a statement of its own would not have. A request the
//! batch passed over is told so, and goes on as it did when its own statement changed
//! nothing (a start reads why, `PgStore::not_started`; a success of a pair in an `order_by`
//! line goes to `PgStore::finish_in_line`).
//!
//! A batch that fails (the database went away, a deadlock with another replica's batch
//! that PostgreSQL broke by aborting this one) fails every request in it, as each would have
//! failed alone: a start that fails started nothing, and the dispatcher reads the queue
//! again later; a success that fails is not recorded, and the pair runs again once its
//! lease lapses, with the same idempotency key. The rows of a batch are sorted by key so
//! that two replicas' batches lock rows they share in one order.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use sqlx::postgres::{PgPool, PgRow};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{backend, db_ms, grace, job_key_of, started};
use crate::store::{Begin, JobKey, StoreError};

/// The most rows one statement carries.
const MAX_BATCH: usize = 256;

/// A row to write, and where its answer goes.
pub(super) struct Request<T, A> {
    pub job: JobKey,
    pub row: T,
    pub reply: oneshot::Sender<Result<A, StoreError>>,
}

/// A start: `begin_attempt`'s arguments. Answered `Some` when started (or started but
/// unreadable), `None` when the batch passed it over.
pub(super) struct Start {
    pub queued_due: Option<u64>,
    pub now_ms: u64,
    pub lease_until_ms: u64,
}

/// A start to write.
pub(super) type StartRequest = Request<Start, Option<Begin>>;

/// A success to record (the time it is recorded at). Answered true when recorded, false
/// when the pair is in an `order_by` line or had succeeded already.
pub(super) type SuccessRequest = Request<u64, bool>;

/// Writes the requests sent on `requests` in batches, `parallel` batches at most at once:
/// the requests made while every slot is taken wait for the next batch together.
pub(super) async fn write_in_batches<T, A, W, F>(
    mut requests: mpsc::UnboundedReceiver<Request<T, A>>,
    parallel: usize,
    write: W,
) where
    T: Send + 'static,
    A: Send + 'static,
    W: Fn(Vec<Request<T, A>>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(parallel.max(1)));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = requests.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        batch.sort_by(|a, b| {
            (&a.job.delivery.source, &a.job.delivery.id, &a.job.handler).cmp(&(
                &b.job.delivery.source,
                &b.job.delivery.id,
                &b.job.handler,
            ))
        });
        let written = write(batch);
        tokio::spawn(async move {
            written.await;
            drop(slot);
        });
    }
}

/// The start of a run as one check-and-set, for each row: started only if not final, still
/// queued where the caller found it, not running under a lease that blocks a take-over
/// (whoever's), not reserved by another replica, and its handler not paused (a pause
/// committed before this statement holds, whatever the dispatcher read earlier). Each row
/// has its own due time, clock and lease. Used for a batch, and for a single start under a
/// handler's `concurrency` lock ([`start_query`]).
const START_BATCH_SQL: &str = concat!(
    "WITH r AS ( \
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], \
            $6::bigint[]) AS r(source, id, handler, queued_due, now_ms, lease_until_ms) \
     ) \
     UPDATE inbox_jobs j SET status = 'running', attempts = j.attempts + 1, \
        updated_ms = r.now_ms, lease_owner = $7, lease_until_ms = r.lease_until_ms, \
        reserved_by = NULL, reserved_until_ms = NULL \
     FROM r, inbox_deliveries d \
     WHERE j.source = r.source AND j.id = r.id AND j.handler = r.handler \
       AND d.source = j.source AND d.id = j.id \
       AND j.status NOT IN ('succeeded', 'dead') \
       AND (r.queued_due IS NULL OR j.due_ms = r.queued_due) \
       AND NOT (j.status = 'running' AND COALESCE(j.lease_until_ms, 0) + ",
    grace!(),
    " > r.now_ms) \
       AND NOT (COALESCE(j.reserved_until_ms, 0) > r.now_ms AND j.reserved_by <> $7) \
       AND NOT EXISTS (SELECT 1 FROM inbox_handlers h WHERE h.name = j.handler AND h.paused) \
     RETURNING j.source, j.id, j.handler, j.attempts, j.retry_base, d.record, d.body",
);

/// A run's success, for each row: recorded whichever attempt it came from, never over a
/// success, and only outside `order_by` lines (whose final outcomes also hand the line on:
/// `PgStore::finish_in_line`).
const SUCCESS_BATCH_SQL: &str = "WITH r AS ( \
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) \
            AS r(source, id, handler, now_ms) \
     ) \
     UPDATE inbox_jobs j SET status = 'succeeded', due_ms = NULL, \
        lease_owner = NULL, lease_until_ms = NULL, updated_ms = r.now_ms \
     FROM r \
     WHERE j.source = r.source AND j.id = r.id AND j.handler = r.handler \
       AND j.status <> 'succeeded' AND j.order_key IS NULL \
     RETURNING j.source, j.id, j.handler";

/// [`START_BATCH_SQL`] for `starts`, by the replica `instance`.
pub(super) fn start_query<'q>(
    instance: i64,
    starts: &[(&'q JobKey, &Start)],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let (sources, ids, handlers) = key_arrays(starts.iter().map(|(job, _)| *job));
    let dues: Vec<Option<i64>> = starts
        .iter()
        .map(|(_, s)| s.queued_due.map(db_ms))
        .collect();
    let nows: Vec<i64> = starts.iter().map(|(_, s)| db_ms(s.now_ms)).collect();
    let leases: Vec<i64> = starts
        .iter()
        .map(|(_, s)| db_ms(s.lease_until_ms))
        .collect();
    sqlx::query(START_BATCH_SQL)
        .bind(sources)
        .bind(ids)
        .bind(handlers)
        .bind(dues)
        .bind(nows)
        .bind(leases)
        .bind(instance)
}

/// One statement for a batch of starts (durable `pool`) of the replica `instance`.
pub(super) async fn write_starts(pool: PgPool, instance: i64, batch: Vec<StartRequest>) {
    let starts: Vec<(&JobKey, &Start)> = firsts(&batch).map(|r| (&r.job, &r.row)).collect();
    let rows = start_query(instance, &starts).fetch_all(&pool).await;
    answer(batch, rows, |row| started(row).map(Some), || None);
}

/// One statement for a batch of successes (`pool`: commits that do not wait for the WAL).
pub(super) async fn write_successes(pool: PgPool, batch: Vec<SuccessRequest>) {
    let written: Vec<&SuccessRequest> = firsts(&batch).collect();
    let (sources, ids, handlers) = key_arrays(written.iter().map(|r| &r.job));
    let nows: Vec<i64> = written.iter().map(|r| db_ms(r.row)).collect();
    let rows = sqlx::query(SUCCESS_BATCH_SQL)
        .bind(sources)
        .bind(ids)
        .bind(handlers)
        .bind(nows)
        .fetch_all(&pool)
        .await;
    answer(batch, rows, |_| Ok(true), || false);
}

/// The requests of `batch` (sorted by key) that its statement carries: the first for each
/// pair. A pair asked for twice must be written with the values (due time, clock, lease) of
/// the request that [`answer`] gives its row to, or a start would be told it holds a lease
/// until a time other than the one written; the later requests are answered as passed over.
fn firsts<T, A>(batch: &[Request<T, A>]) -> impl Iterator<Item = &Request<T, A>> {
    batch
        .iter()
        .enumerate()
        .filter(|(i, request)| *i == 0 || batch[i - 1].job != request.job)
        .map(|(_, request)| request)
}

/// Answers every request of `batch` from the rows its statement returned: a request whose
/// pair came back gets `found` of the row, the others `passed`. A pair asked for twice in
/// one batch is written once, from its first request ([`firsts`]), which gets the row; the
/// others are passed over.
fn answer<T, A>(
    batch: Vec<Request<T, A>>,
    rows: Result<Vec<PgRow>, sqlx::Error>,
    found: impl Fn(&PgRow) -> Result<A, StoreError>,
    passed: impl Fn() -> A,
) {
    let rows = rows.map_err(backend).and_then(|rows| {
        rows.into_iter()
            .map(|row| Ok((job_key_of(&row)?, row)))
            .collect::<Result<HashMap<JobKey, PgRow>, StoreError>>()
    });
    let mut rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            for request in batch {
                let _ = request.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    for request in batch {
        let reply = match rows.remove(&request.job) {
            Some(row) => found(&row),
            None => Ok(passed()),
        };
        let _ = request.reply.send(reply);
    }
}

/// The sources, ids and handlers of `jobs`, as the three text arrays the statements here
/// (and the queue's reservation) take their pairs in.
pub(super) fn key_arrays<'a>(
    jobs: impl IntoIterator<Item = &'a JobKey>,
) -> (Vec<&'a str>, Vec<&'a str>, Vec<&'a str>) {
    let (mut sources, mut ids, mut handlers) = (Vec::new(), Vec::new(), Vec::new());
    for job in jobs {
        sources.push(job.delivery.source.as_str());
        ids.push(job.delivery.id.as_str());
        handlers.push(job.handler.as_str());
    }
    (sources, ids, handlers)
}

/// Sends `request` to its batch writer and waits for the answer.
pub(super) async fn submit<T, A>(
    writer: &mpsc::UnboundedSender<Request<T, A>>,
    job: &JobKey,
    row: T,
) -> Result<A, StoreError> {
    let closed = || StoreError::Backend("the store is closed".into());
    let (reply, answer) = oneshot::channel();
    writer
        .send(Request {
            job: job.clone(),
            row,
            reply,
        })
        .map_err(|_| closed())?;
    answer.await.map_err(|_| closed())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DeliveryKey;

    fn request(id: &str, lease_until_ms: u64) -> StartRequest {
        StartRequest {
            job: DeliveryKey::new("s", id).job("h"),
            row: Start {
                queued_due: None,
                now_ms: 0,
                lease_until_ms,
            },
            reply: oneshot::channel().0,
        }
    }

    /// A pair asked for twice in one (sorted) batch goes into the statement once, with the
    /// values of its first request: the one `answer` gives the row to.
    #[test]
    fn a_pair_asked_for_twice_is_written_from_its_first_request() {
        let batch = vec![
            request("a", 1),
            request("b", 2),
            request("b", 3),
            request("b", 4),
            request("c", 5),
        ];
        let written: Vec<(String, u64)> = firsts(&batch)
            .map(|r| (r.job.delivery.id.to_string(), r.row.lease_until_ms))
            .collect();
        assert_eq!(written, [("a".into(), 1), ("b".into(), 2), ("c".into(), 5)]);
    }
}
