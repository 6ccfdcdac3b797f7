//! All SQL lives here, one file per aggregate. The same SQL text runs on SQLite and on
//! PostgreSQL: queries use `$n` placeholders (both accept them), portable types (`text`,
//! `bigint` epoch milliseconds, JSON as `text`), and are checked at run time (no
//! compile-time query macros, which would bind the build to one database).
//!
//! [`Db`] is the pool of either backend; [`on_db!`] runs one body against whichever it is.

pub mod approved;
pub mod audit;
pub mod batches;
pub mod comments;
pub mod deliveries;
pub mod drafts;
pub mod jobs;
pub mod limits;
pub mod outbox;
pub mod stats;
pub mod tasks;
pub mod tokens;
pub mod webhooks;

use std::{str::FromStr, time::Duration};

use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    PgPool, Postgres, Sqlite, SqlitePool,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migrating the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported DATABASE_URL `{0}`: use sqlite://FILE or postgres://...")]
    UnsupportedUrl(String),
    #[error("{0} not found")]
    NotFound(String),
    /// A concurrent change won (optimistic concurrency), or a state transition is invalid.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, StoreError::Sqlx(sqlx::Error::Database(e)) if e.is_unique_violation())
    }
}

/// The database: SQLite (embedded, the default) or PostgreSQL (shared by many hosts).
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// An open transaction on either backend.
pub enum Tx {
    Sqlite(sqlx::Transaction<'static, Sqlite>),
    Postgres(sqlx::Transaction<'static, Postgres>),
}

/// Runs `$body` with `$pool` bound to the concrete pool (`&SqlitePool` or `&PgPool`).
/// The body is compiled once per backend, so it must use only portable SQL and types.
#[macro_export]
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::store::Db::Sqlite($pool) => $body,
            $crate::store::Db::Postgres($pool) => $body,
        }
    };
}

/// Runs `$body` with `$conn` bound to the transaction's connection.
#[macro_export]
macro_rules! on_tx {
    ($tx:expr, $conn:ident => $body:expr) => {
        match $tx {
            $crate::store::Tx::Sqlite(t) => {
                let $conn = &mut **t;
                $body
            }
            $crate::store::Tx::Postgres(t) => {
                let $conn = &mut **t;
                $body
            }
        }
    };
}

pub use crate::{on_db, on_tx};

impl Db {
    /// Connects to `url`, creating the SQLite file when missing. SQLite runs in WAL mode with
    /// `synchronous=NORMAL` (durable across process crashes) and waits on locks instead of
    /// failing at once.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(30))
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(60))
                .connect_with(opts)
                .await?;
            Ok(Db::Sqlite(pool))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let opts = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(opts)
                .await?;
            Ok(Db::Postgres(pool))
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// Applies our migrations and the job queue's (apalis) migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(pool) => {
                // apalis-sqlite records its migrations in the same `_sqlx_migrations` table:
                // each migrator must ignore the other's versions.
                // the queue's tables first: one of our migrations adds a trigger to them
                let mut queue = apalis_sqlite::SqliteStorage::<()>::migrations();
                queue.set_ignore_missing(true);
                queue.run(pool).await?;
                let mut ours = sqlx::migrate!("./migrations/sqlite");
                ours.set_ignore_missing(true);
                ours.run(pool).await?;
            }
            Db::Postgres(pool) => {
                let mut ours = sqlx::migrate!("./migrations/postgres");
                ours.set_ignore_missing(true);
                ours.run(pool).await?;
                let mut queue = apalis_postgres::PostgresStorage::<()>::migrations();
                queue.set_ignore_missing(true);
                queue.run(pool).await?;
            }
        }
        Ok(())
    }

    pub async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(match self {
            Db::Sqlite(p) => Tx::Sqlite(p.begin().await?),
            Db::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        on_db!(self, p => sqlx::query("select 1").execute(p).await.is_ok())
    }

    pub async fn close(&self) {
        on_db!(self, p => p.close().await)
    }
}

impl Tx {
    pub async fn commit(self) -> Result<(), StoreError> {
        match self {
            Tx::Sqlite(t) => t.commit().await?,
            Tx::Postgres(t) => t.commit().await?,
        }
        Ok(())
    }
}

/// A URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A new sortable id.
pub fn new_id() -> String {
    ulid::Ulid::new().to_string()
}

pub(crate) fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    what: &str,
    s: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }
}
