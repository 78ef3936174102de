//! The schema, as versioned migrations embedded in the binary (`migrations/*.sql`), run by
//! sqlx's migrator: applied once each, in order, under its advisory lock (so replicas
//! starting together do not race), each in a transaction, with a checksum that refuses an
//! edited migration. A new schema version is a new file added to [`MIGRATIONS`].

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::PgPool;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

/// Every migration: version, description, SQL.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../../migrations/0001_initial.sql"),
    ),
    (
        2,
        "handler queues",
        include_str!("../../../migrations/0002_handler_queues.sql"),
    ),
    (
        3,
        "order lines",
        include_str!("../../../migrations/0003_order_lines.sql"),
    ),
    (
        4,
        "global limits",
        include_str!("../../../migrations/0004_global_limits.sql"),
    ),
    (
        5,
        "call journal",
        include_str!("../../../migrations/0005_call_journal.sql"),
    ),
];

#[derive(Debug)]
struct Embedded;

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// Runs the migrations not applied yet; returns how many ran.
pub async fn migrate(pool: &PgPool) -> Result<usize, sqlx::migrate::MigrateError> {
    let migrator = Migrator::new(Embedded).await?;
    let before: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_catalog.pg_tables \
         WHERE tablename = '_sqlx_migrations' AND schemaname = ANY(current_schemas(false))",
    )
    .fetch_one(pool)
    .await
    .map_err(sqlx::migrate::MigrateError::Execute)?;
    let applied_before = if before > 0 {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .map_err(sqlx::migrate::MigrateError::Execute)?
    } else {
        0
    };
    migrator.run(pool).await?;
    Ok(MIGRATIONS.len().saturating_sub(applied_before as usize))
}

/// Runs the migrations at start, again and again while the database cannot be reached
/// (logged, the store not ready meanwhile), then marks the store ready.
pub(super) async fn migrate_until_done(pool: PgPool, ready: Arc<AtomicBool>) {
    let mut pause = Duration::from_millis(200);
    loop {
        match migrate(&pool).await {
            Ok(ran) => {
                if ran > 0 {
                    tracing::info!(migrations = ran, "database schema migrated");
                }
                ready.store(true, Ordering::Release);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?pause, "the database is not ready; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}
