//! `store check` on PostgreSQL: the same invariants as on sled (design.md 1, 2 and 4), read
//! with three queries. Every operation here is one transaction, so a crash cannot leave a
//! delivery half written; what this can still find is damage from outside (a hand-edited
//! row, a restored backup), and `--repair` makes such a pair due again.

use super::{PgStore, backend, db_ms, lock_line, promote_next};
use crate::store::{CheckReport, StoreError};
use sqlx::Row as _;

impl PgStore {
    /// Lists every violation; with `repair`, queues the pairs that have no way to run.
    pub async fn check(&self, repair: bool, now_ms: u64) -> Result<CheckReport, StoreError> {
        let db = self.db()?;
        let mut report = CheckReport {
            deliveries: self.count("SELECT count(*) FROM inbox_deliveries").await?,
            ..CheckReport::default()
        };
        // 1 and 2: an answered delivery's unfinished pair with no queue entry.
        let stranded = sqlx::query(
            "SELECT j.source, j.id, j.handler, j.status FROM inbox_jobs j \
             JOIN inbox_deliveries d ON d.source = j.source AND d.id = j.id \
             WHERE d.alias_of IS NULL AND (d.record::jsonb -> 'response') <> 'null'::jsonb \
               AND j.status NOT IN ('succeeded', 'dead') AND j.due_ms IS NULL \
               AND j.order_key IS NULL",
        )
        .fetch_all(db)
        .await
        .map_err(backend)?;
        for row in &stranded {
            let (source, id, handler, status): (String, String, String, String) = (
                row.try_get("source").map_err(backend)?,
                row.try_get("id").map_err(backend)?,
                row.try_get("handler").map_err(backend)?,
                row.try_get("status").map_err(backend)?,
            );
            report.violations.push(format!(
                "{source}/{id}#{handler} is {status} with nothing queued to run it"
            ));
            if repair {
                sqlx::query(
                    "UPDATE inbox_jobs SET due_ms = $4 \
                     WHERE source = $1 AND id = $2 AND handler = $3 AND due_ms IS NULL",
                )
                .bind(&source)
                .bind(&id)
                .bind(&handler)
                .bind(db_ms(now_ms))
                .execute(db)
                .await
                .map_err(backend)?;
            }
        }
        // 1 and 2 in `order_by` lines: a line whose waiting pairs have nobody active ahead.
        let stuck = sqlx::query(
            "SELECT handler, order_key FROM inbox_jobs \
             WHERE order_key IS NOT NULL AND status NOT IN ('succeeded', 'dead') \
             GROUP BY handler, order_key HAVING count(due_ms) = 0",
        )
        .fetch_all(db)
        .await
        .map_err(backend)?;
        for row in &stuck {
            let handler: String = row.try_get("handler").map_err(backend)?;
            let line: String = row.try_get("order_key").map_err(backend)?;
            report.violations.push(format!(
                "handler {handler}: order_by line {line} waits behind nothing that runs"
            ));
            if repair {
                let mut tx = self.begin().await?;
                lock_line(&mut tx, &handler, &line).await?;
                promote_next(&mut tx, &handler, &line, now_ms).await?;
                tx.commit().await.map_err(backend)?;
            }
        }
        // 4: one body recorded under several ids, each running its handlers.
        let doubled = sqlx::query(
            "SELECT source, record::jsonb ->> 'fingerprint' AS fingerprint, count(*) AS ids \
             FROM inbox_deliveries \
             WHERE alias_of IS NULL AND (record::jsonb -> 'body_dedup') = 'true'::jsonb \
             GROUP BY 1, 2 HAVING count(*) > 1",
        )
        .fetch_all(db)
        .await
        .map_err(backend)?;
        for row in &doubled {
            let source: String = row.try_get("source").map_err(backend)?;
            let fingerprint: String = row.try_get("fingerprint").map_err(backend)?;
            let ids: i64 = row.try_get("ids").map_err(backend)?;
            report.violations.push(format!(
                "{source}: one body ({fingerprint}) recorded under {ids} ids"
            ));
        }
        report.repaired = repair;
        Ok(report)
    }
}
