//! The `order_by` lines: a line's key, its transaction-scoped advisory lock, and the
//! hand-on to its next pair.

use sqlx::{Postgres, Transaction};

use super::{backend, db_ms, lock_key, notify_work};
use crate::store::StoreError;

/// The `order_key` column of a line: hex of [`crate::store::line_id`].
pub(super) fn line_key(value: &str) -> String {
    hex::encode(crate::store::line_id(value))
}

/// Takes the transaction-scoped locks of `(handler, value)` lines, in one order (so two
/// transactions never wait on each other in a cycle).
pub(super) async fn lock_lines<'a>(
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
    sqlx::query(concat!(
        "SELECT pg_advisory_xact_lock(",
        lock_key!("n"),
        ") FROM unnest($1::text[]) WITH ORDINALITY AS t(n, i) ORDER BY i"
    ))
    .bind(&names)
    .execute(&mut **tx)
    .await
    .map_err(backend)?;
    Ok(())
}

/// Takes the lock of the line of `(handler, order_key column)`.
pub(super) async fn lock_line(
    tx: &mut Transaction<'static, Postgres>,
    handler: &str,
    line: &str,
) -> Result<(), StoreError> {
    sqlx::query(concat!(
        "SELECT pg_advisory_xact_lock(",
        lock_key!("$1"),
        ")"
    ))
    .bind(format!("{handler}/{line}"))
    .execute(&mut **tx)
    .await
    .map_err(backend)?;
    Ok(())
}

/// Gives the first pair of a line that waits a way to run, unless a pair of the line has
/// one already (the caller holds the line's lock), due as
/// [`crate::store::transitions::next_in_line_due`] says: a pair never run at its
/// received_at, one put back in line by an operator retry now.
pub(super) async fn promote_next(
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
