//! The embedded store: one SQLite database file per device or small server.
//!
//! Settings, and why:
//!
//! * WAL journal mode, so that readers never block the writer nor the writer the readers: a
//!   client keeps reading documents while a sync writes.
//! * `synchronous = FULL`: every commit syncs the WAL, so an append acknowledged to a pushing
//!   client survives a power loss, not only a crash. `NORMAL` would be faster but may lose the
//!   last commits on power loss, after the server told clients they were stored.
//! * A busy timeout of five seconds, so that another process (a CLI next to a running client)
//!   holding the write lock makes a writer wait instead of fail.
//! * Write transactions begin with `BEGIN IMMEDIATE`, taking the write lock before their first
//!   read; see the docs of `store::sql`, which holds the SQL both backends share.
//!
//! An in-memory database lives exactly as long as the one connection that opened it, so the
//! in-memory store runs on a pool of a single connection that is never closed for idleness.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use super::sql::sql_store;
use crate::Result;

/// How long a writer waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite store. Cloning shares the connection pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating it, and its parent directories, if missing) the database file at `path`
    /// and brings its schema up to date.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        create_parent_dir(path).await?;
        let options = SqliteConnectOptions::new().filename(path).create_if_missing(true);
        Self::with_options(options, SqlitePoolOptions::new()).await
    }

    /// Opens a fresh, empty database that lives in memory until the store is dropped (for
    /// tests).
    pub async fn open_in_memory() -> Result<Self> {
        let options = SqliteConnectOptions::new().filename(":memory:").in_memory(true);
        Self::with_options(options, single_connection()).await
    }

    /// Opens the database a sqlx SQLite URL names, such as `sqlite:data/app.db` or
    /// `sqlite::memory:`. A file is created if missing unless the URL sets `mode` itself.
    pub async fn connect(url: &str) -> Result<Self> {
        let mut options = SqliteConnectOptions::from_str(url)?;
        if url.contains(":memory:") || url.contains("mode=memory") {
            return Self::with_options(options, single_connection()).await;
        }
        if !url.contains("mode=") {
            options = options.create_if_missing(true);
            create_parent_dir(options.get_filename()).await?;
        }
        Self::with_options(options, SqlitePoolOptions::new()).await
    }

    /// Applies the settings every connection needs (see the module docs), connects and
    /// migrates.
    async fn with_options(options: SqliteConnectOptions, pool: SqlitePoolOptions) -> Result<Self> {
        let options = options
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = pool.connect_with(options).await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore { pool })
    }
}

/// Pool options for an in-memory database: one connection, kept open for the pool's lifetime.
fn single_connection() -> SqlitePoolOptions {
    SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
}

/// Creates the directory a database file goes into.
async fn create_parent_dir(path: &Path) -> Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => {
            tokio::fs::create_dir_all(parent).await.map_err(sqlx::Error::Io)?;
            Ok(())
        }
        _ => Ok(()),
    }
}

sql_store! {
    store: SqliteStore,
    database: ::sqlx::Sqlite,
    begin_write: "BEGIN IMMEDIATE",
    begin_read: "BEGIN",
    // BEGIN IMMEDIATE already excludes every other writer, in this process and any other.
    lock_document: None,
}
