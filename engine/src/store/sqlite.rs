//! The embedded store: one SQLite database file per device or small server.
//!
//! Settings, and why:
//!
//! * WAL journal mode, so that readers never block the writer nor the writer the readers: a
//!   client keeps reading documents while a sync writes.
//! * `synchronous = FULL`: every commit syncs the WAL, so an append acknowledged to a pushing
//!   client survives a power loss, not only a crash. `NORMAL` would be faster but may lose the
//!   last commits on power loss, after the server told clients they were stored.
//! * The pool's connections (reads) keep a page cache of [`READ_CACHE_KIB`] KiB each instead of
//!   SQLite's default 2 MiB: the pages of a database file sit in the operating system's cache
//!   anyway, so each connection's own copy saves a `pread` of a cached page at the cost of
//!   memory that a server with a pool of connections pays several times — at 1,000 idle rooms
//!   `valgrind --tool=massif` found SQLite's page caches holding 2.9 MB, more than the rooms'
//!   documents. The write thread keeps the default while it works — appends touch the same
//!   few B-tree pages over and over — and gives its cache back once idle for two seconds
//!   (`store::write_thread`); the pool's connections close once unused for [`READER_IDLE`]
//!   (sqlx opens a fresh one at once to keep one open), so a burst of loads (a thousand rooms
//!   joined at once) does not leave ten connections' caches and lookaside behind.
//! * A busy timeout of five seconds, so that another process (a CLI next to a running client)
//!   holding the write lock makes a writer wait instead of fail.
//! * No automatic WAL checkpoints (`wal_autocheckpoint = 0`): SQLite would run them inside the
//!   commit that crosses the threshold, and that commit — which a server acknowledges and
//!   broadcasts only after it returns — would wait for the checkpoint to copy pages and sync the
//!   database file. Instead, every [`CHECKPOINT_EVERY`] commits a passive checkpoint runs on
//!   another connection of the pool, next to the writer rather than in front of it, and one runs
//!   when the store is opened (for what short-lived processes left behind). When it is done,
//!   the write thread checkpoints the few frames appended meanwhile, between two transactions:
//!   SQLite starts a WAL over only after a checkpoint reached its end, which one running beside
//!   a steady stream of commits never does (the WAL grew without bound under load). The write
//!   connection's `journal_size_limit` cuts a WAL that grew back to 16 MiB when it starts over.
//! * Statement journals in memory (`temp_store = MEMORY` on the write connection): on disk
//!   SQLite made, wrote, synced and deleted a temporary file in almost every append.
//! * Write transactions run on one connection of their own (SQLite allows one writer at a time
//!   anyway): its page cache and prepared statements stay warm, where taking turns with the
//!   readers' connections would make each write re-read the pages another connection changed.
//!   On a file, that connection is the write thread's (`store::write_thread`): appends, a
//!   client's recorded changes and compaction's snapshot swap run there, each transaction in one
//!   call; only the device identity, written once per store, is written through sqlx's pool
//!   (as is everything of an in-memory database, whose pool is its one connection).
//! * Write transactions begin with `BEGIN IMMEDIATE`, taking the write lock before their first
//!   read; see the docs of `store::sql`, which holds the SQL both backends share.
//!
//! An in-memory database lives exactly as long as the one connection that opened it, so the
//! in-memory store runs on a pool of a single connection that is never closed for idleness.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use super::sql::sql_store;
use super::write_thread::WriteThread;
use crate::Result;

/// How long a writer waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The page cache of each of the pool's connections, in KiB (see the module docs).
const READ_CACHE_KIB: u32 = 256;

/// How long a pooled reader connection stays open unused (see the module docs).
const READER_IDLE: Duration = Duration::from_secs(10);

/// Commits between two WAL checkpoints (see the module docs).
const CHECKPOINT_EVERY: u32 = 256;

/// The SQLite store. Cloning shares the connection pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Checkpoint bookkeeping; `None` for an in-memory database, which has no WAL.
    wal: Option<Arc<Wal>>,
    /// The thread appends run on; `None` in memory (an in-memory database is private to the
    /// connection that opened it) and for a database opened read-only.
    thread: Option<WriteThread>,
    /// The push outbox's switch (see `store::push`).
    push: Arc<super::push::PushSwitch>,
}

/// When the WAL was last checkpointed, and whether a checkpoint is running.
#[derive(Debug, Default)]
struct Wal {
    commits: AtomicU32,
    running: AtomicBool,
}

impl SqliteStore {
    /// Opens (creating it, and its parent directories, if missing) the database file at `path`
    /// and brings its schema up to date.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        create_parent_dir(path).await?;
        let options = SqliteConnectOptions::new().filename(path).create_if_missing(true);
        Self::with_options(options, readers(), false, true).await
    }

    /// Opens a fresh, empty database that lives in memory until the store is dropped (for
    /// tests).
    pub async fn open_in_memory() -> Result<Self> {
        let options = SqliteConnectOptions::new().filename(":memory:").in_memory(true);
        Self::with_options(options, single_connection(), true, false).await
    }

    /// Opens the database a sqlx SQLite URL names, such as `sqlite:data/app.db` or
    /// `sqlite::memory:`. A file is created if missing unless the URL sets `mode` itself.
    pub async fn connect(url: &str) -> Result<Self> {
        let mut options = SqliteConnectOptions::from_str(url)?;
        if url.contains(":memory:") || url.contains("mode=memory") {
            return Self::with_options(options, single_connection(), true, false).await;
        }
        if !url.contains("mode=") {
            options = options.create_if_missing(true);
            create_parent_dir(options.get_filename()).await?;
        }
        let writable = !(url.contains("mode=ro") || url.contains("immutable="));
        Self::with_options(options, readers(), false, writable).await
    }

    /// Applies the settings every connection needs (see the module docs), connects and
    /// migrates.
    async fn with_options(
        options: SqliteConnectOptions,
        pool: SqlitePoolOptions,
        in_memory: bool,
        write_thread: bool,
    ) -> Result<Self> {
        let options = options
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .pragma("wal_autocheckpoint", "0")
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        // An in-memory database lives in its connection's page cache: no limit there.
        let options = match in_memory {
            true => options,
            false => options.pragma("cache_size", format!("-{READ_CACHE_KIB}")),
        };
        // A connection to a local file does not go stale: no ping (a round trip to the
        // connection's worker thread) before every use.
        let pool = pool.test_before_acquire(false).connect_with(options.clone()).await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        if in_memory {
            return Ok(SqliteStore {
                pool,
                wal: None,
                thread: None,
                push: Arc::default(),
            });
        }
        // What earlier processes left in the WAL (a short-lived CLI may exit before 256 commits
        // or before its connections close, which would checkpoint) is checkpointed once at open,
        // so the WAL stays bounded however the store is used. Not by a read-only store: copying
        // frames into a file it opened read-only fails with a "disk I/O error", which made
        // opening it fail whenever the WAL held frames not yet checkpointed.
        if write_thread {
            sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await?;
        }
        let thread = match write_thread {
            true => Some(WriteThread::start(options.get_filename(), BUSY_TIMEOUT)?),
            false => None,
        };
        Ok(SqliteStore {
            pool,
            wal: Some(Arc::new(Wal::default())),
            thread,
            push: Arc::default(),
        })
    }

    /// The pool write transactions run on.
    fn writer(&self) -> &SqlitePool {
        &self.pool
    }

    /// The thread appends run on, if any (see the module docs).
    fn write_thread(&self) -> Option<&WriteThread> {
        self.thread.as_ref()
    }

    /// Called after each committed append: every [`CHECKPOINT_EVERY`] commits, starts a passive
    /// checkpoint of the WAL on another connection, unless one is still running, and has the
    /// write thread finish it.
    fn after_write(&self) {
        let Some(wal) = &self.wal else { return };
        if wal.commits.fetch_add(1, Ordering::Relaxed) + 1 < CHECKPOINT_EVERY {
            return;
        }
        if wal.running.swap(true, Ordering::AcqRel) {
            return;
        }
        wal.commits.store(0, Ordering::Relaxed);
        let (pool, wal, thread) = (self.pool.clone(), Arc::clone(wal), self.thread.clone());
        tokio::spawn(async move {
            // PASSIVE copies what it can without waiting for readers or the writer.
            match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
                // The write thread copies what was appended meanwhile, so that the WAL starts
                // over (see `WriteThread::finish_checkpoint`).
                Ok(_) => {
                    if let Some(thread) = thread {
                        thread.finish_checkpoint();
                    }
                }
                Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; the next one will retry"),
            }
            wal.running.store(false, Ordering::Release);
        });
    }
}

/// Pool options for an in-memory database: one connection, kept open for the pool's lifetime.
/// The pool of a database file: readers close after [`READER_IDLE`] unused, their caches with
/// them, and one is kept open (reopened fresh).
fn readers() -> SqlitePoolOptions {
    SqlitePoolOptions::new().min_connections(1).idle_timeout(READER_IDLE)
}

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
    numbered_placeholders: false,
    joined_statements: true,
    claim_lock: "",
    write_thread: write_thread,
}
