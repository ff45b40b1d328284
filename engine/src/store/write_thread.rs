//! The SQLite store's write path: a thread of its own that owns the write connection and runs
//! each write transaction whole, from `BEGIN IMMEDIATE` to `COMMIT`, in one call.
//!
//! Why a thread rather than sqlx: sqlx runs SQLite on a worker thread too, but answers each
//! statement through channels, so a durable append cost four round trips between the async
//! runtime and that worker (begin, the two steps of an [`AppendPlan`], commit), and on a server
//! pinned to one core every round trip is two context switches — the largest item of the
//! server's profile under load. Here the async side hands the whole job over once and is woken
//! once with its answer. The SQL is the same ([`AppendPlan`] builds it for both drivers); the
//! connection is rusqlite's, on the very SQLite library sqlx links (`libsqlite3-sys`), with the
//! settings of every other connection of the store (see `store::sqlite`).
//!
//! Jobs queue in a bounded channel (the callers wait when it is full). A job whose caller went
//! away still runs to its end — a transaction is never left half done — and its answer is
//! dropped. The thread ends once every handle to it is gone, after the jobs already queued.
//!
//! Besides appends and a client's recorded changes, compaction's last step (the snapshot swap)
//! runs here too, so that the server's writes all go through this one connection: a second
//! writer would make each wait for the other's lock by SQLite's busy handler, which polls with
//! sleeps of up to 100 ms instead of being woken.
//!
//! Once the thread has had no job for [`RELEASE_AFTER`], it gives its connection's page cache
//! back (`PRAGMA shrink_memory`): under load the cache keeps the B-tree pages appends touch over
//! and over, but an idle server would otherwise hold up to SQLite's default 2 MiB of copies of
//! pages that sit in the operating system's file cache anyway. Waiting with a timeout needs a
//! wake-up a tokio channel cannot give a plain thread, so the thread parks between jobs and every
//! hand-off unparks it (the last handle to go away too, so that the thread sees the queue close).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::Thread;
use std::time::{Duration, Instant};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

use super::push::PushPlan;
use super::sql::{
    corrupt, from_sql, AppendPlan, ReadRow, Row, Statement, Swap, Value, OUTBOX_INSERT, PRUNE_LOG, RECOUNT_LOG_BYTES,
    SWAP_SNAPSHOT, SYNC_STATE_ADVANCE,
};
use super::{Append, Appended};
use crate::{Error, Result};

/// Jobs that may wait for the thread.
const QUEUE: usize = 256;

/// Prepared statements the connection keeps (the append's common shapes, see
/// `sql::CACHED_ROWS`, plus the client's statements).
const STATEMENT_CACHE: usize = 32;

/// How long the thread goes without a job before it gives its page cache back (see the module
/// docs).
const RELEASE_AFTER: Duration = Duration::from_secs(2);

/// A job and where its answer goes.
enum Job {
    Append(Vec<Append>, Option<PushPlan>, oneshot::Sender<Result<Vec<Appended>>>),
    /// Any other write: a closure given the connection (the push outbox's statements).
    Run(Box<dyn FnOnce(&mut Connection) + Send>),
    RecordLocal {
        doc: String,
        update: Vec<u8>,
        reply: oneshot::Sender<Result<u64>>,
    },
    RecordRemote {
        doc: String,
        cursor: i64,
        updates: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<()>>,
    },
    SwapSnapshot {
        doc: String,
        snapshot: Vec<u8>,
        state_vector: Vec<u8>,
        covered: i64,
        prune_to: i64,
        read_cursor: i64,
        reply: oneshot::Sender<Result<Option<u64>>>,
    },
}

/// The most a WAL file keeps on disk once it restarts (`PRAGMA journal_size_limit`): a WAL that
/// grew past it (while a long read held an old snapshot, say) is cut back to it.
const WAL_SIZE_LIMIT: u64 = 16 << 20;

/// A handle to the write thread. Cloning shares the thread.
#[derive(Debug, Clone)]
pub(super) struct WriteThread {
    shared: Arc<Handle>,
}

/// What the handles share: the queue, and the thread to unpark after each job is queued.
#[derive(Debug)]
struct Handle {
    /// `Some` until the last handle is dropped.
    jobs: Option<mpsc::Sender<Job>>,
    thread: Thread,
    /// Set when the thread should checkpoint what the WAL holds before its next job (see
    /// [`WriteThread::finish_checkpoint`]).
    checkpoint: Arc<AtomicBool>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The queue closes first, then the thread is woken to see it closed (after the jobs
        // already queued).
        self.jobs = None;
        self.thread.unpark();
    }
}

impl WriteThread {
    /// Opens a write connection to the database file at `path` (which must exist, its schema
    /// migrated) and starts the thread.
    pub(super) fn start(path: &Path, busy_timeout: Duration) -> Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(busy_timeout)?;
        // The settings of `store::sqlite` (the journal mode is the file's, WAL already).
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA wal_autocheckpoint = 0; PRAGMA foreign_keys = ON;")?;
        // Statement journals (a multi-row statement that may fail halfway keeps the pages it
        // changes, to undo just itself) in memory: on disk, SQLite created, wrote, synced and
        // deleted a temporary file in almost every append transaction.
        conn.execute_batch("PRAGMA temp_store = MEMORY;")?;
        conn.query_row(&format!("PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}"), [], |_| Ok(()))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let (jobs, queue) = mpsc::channel(QUEUE);
        let checkpoint = Arc::new(AtomicBool::new(false));
        let due = Arc::clone(&checkpoint);
        let thread = std::thread::Builder::new()
            .name("driftsync-sqlite-writer".into())
            .spawn(move || run(conn, queue, &due))
            .map_err(|e| Error::Store(sqlx::Error::Io(e)))?
            .thread()
            .clone();
        Ok(WriteThread {
            shared: Arc::new(Handle {
                jobs: Some(jobs),
                thread,
                checkpoint,
            }),
        })
    }

    /// Asks the thread to checkpoint the WAL before its next job — the end of a checkpoint that
    /// ran on another connection (see `store::sqlite`). That one copies the WAL next to the
    /// writer, so under a steady stream of commits it never catches up with the end of the WAL,
    /// and SQLite starts the WAL over only when a checkpoint did: without this last step the
    /// file grew for as long as the writes went on (to 1.5 GB in half a minute of the throughput
    /// benchmark). Here nothing is appended meanwhile, and only the frames appended since the
    /// other checkpoint began are left to copy.
    pub(super) fn finish_checkpoint(&self) {
        self.shared.checkpoint.store(true, Ordering::Release);
        self.shared.thread.unpark();
    }

    /// [`Store::append`](super::Store::append) on the thread.
    pub(super) async fn append(&self, batch: Vec<Append>, push: Option<PushPlan>) -> Result<Vec<Appended>> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Append(batch, push, reply), answer).await
    }

    /// Runs `work` in a write transaction on the thread (committed if it succeeds).
    pub(super) async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Run(Box::new(move |conn: &mut Connection| {
            let _ = reply.send(transaction(conn, work));
        }));
        self.submit(job, answer).await
    }

    /// [`Store::record_local`](super::Store::record_local) on the thread.
    pub(super) async fn record_local(&self, doc: &str, update: &[u8]) -> Result<u64> {
        let (reply, answer) = oneshot::channel();
        let job = Job::RecordLocal {
            doc: doc.to_string(),
            update: update.to_vec(),
            reply,
        };
        self.submit(job, answer).await
    }

    /// [`Store::record_remote`](super::Store::record_remote) on the thread (`cursor` already
    /// converted for SQL).
    pub(super) async fn record_remote(&self, doc: &str, cursor: i64, updates: &[Vec<u8>]) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        let job = Job::RecordRemote {
            doc: doc.to_string(),
            cursor,
            updates: updates.to_vec(),
            reply,
        };
        self.submit(job, answer).await
    }

    /// The last step of a compaction on the thread: the number of log entries deleted, or
    /// `None` if another compactor moved the snapshot first.
    pub(super) async fn swap_snapshot(&self, swap: &Swap<'_>) -> Result<Option<u64>> {
        let (reply, answer) = oneshot::channel();
        let job = Job::SwapSnapshot {
            doc: swap.doc.to_string(),
            snapshot: swap.snapshot.to_vec(),
            state_vector: swap.state_vector.to_vec(),
            covered: swap.covered,
            prune_to: swap.prune_to,
            read_cursor: swap.read_cursor,
            reply,
        };
        self.submit(job, answer).await
    }

    async fn submit<T>(&self, job: Job, answer: oneshot::Receiver<Result<T>>) -> Result<T> {
        let stopped = || Error::Invalid("the SQLite write thread has stopped".into());
        let jobs = self.shared.jobs.as_ref().ok_or_else(stopped)?;
        jobs.send(job).await.map_err(|_| stopped())?;
        self.shared.thread.unpark();
        answer.await.map_err(|_| stopped())?
    }
}

/// The thread: one job, one transaction, one answer, until every handle is gone; the page
/// cache given back once no job came for [`RELEASE_AFTER`].
fn run(mut conn: Connection, mut queue: mpsc::Receiver<Job>, checkpoint: &AtomicBool) {
    // When the last job ran, while the cache may hold pages.
    let mut cached: Option<Instant> = None;
    loop {
        if checkpoint.swap(false, Ordering::AcqRel) {
            finish_checkpoint(&conn);
        }
        match queue.try_recv() {
            Ok(job) => {
                run_job(&mut conn, job);
                cached = Some(Instant::now());
            }
            Err(TryRecvError::Disconnected) => return,
            // A park returns early when unparked (a job queued, or the last handle gone, since
            // the `try_recv` above or while parked), and sometimes spuriously: either way the
            // queue is looked at again.
            Err(TryRecvError::Empty) => match cached {
                None => std::thread::park(),
                Some(since) => match RELEASE_AFTER.checked_sub(since.elapsed()) {
                    Some(left) if !left.is_zero() => std::thread::park_timeout(left),
                    _ => {
                        if let Err(e) = conn.execute_batch("PRAGMA shrink_memory") {
                            tracing::warn!(error = %e, "the SQLite write connection kept its page cache");
                        }
                        cached = None;
                    }
                },
            },
        }
    }
}

/// The checkpoint of [`WriteThread::finish_checkpoint`]. Passive: a reader holding an older
/// snapshot keeps the frames it needs, and a later checkpoint copies them.
fn finish_checkpoint(conn: &Connection) {
    let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
    });
    match done {
        Ok((frames, copied)) => tracing::debug!(frames, copied, "WAL checkpointed on the write thread"),
        Err(e) => tracing::warn!(error = %e, "WAL checkpoint on the write thread failed; the next one will retry"),
    }
}

/// One job: its transaction, its answer (dropped if its caller went away).
fn run_job(conn: &mut Connection, job: Job) {
    match job {
        Job::Append(batch, push, reply) => {
            let rows: Vec<Row<'_>> = batch.iter().map(Row::from).collect();
            let _ = reply.send(transaction(conn, |tx| append_rows(tx, &rows, push)));
        }
        Job::Run(work) => work(conn),
        Job::RecordLocal { doc, update, reply } => {
            let _ = reply.send(transaction(conn, |tx| record_local(tx, &doc, &update)));
        }
        Job::RecordRemote {
            doc,
            cursor,
            updates,
            reply,
        } => {
            let _ = reply.send(transaction(conn, |tx| record_remote(tx, &doc, cursor, &updates)));
        }
        Job::SwapSnapshot {
            doc,
            snapshot,
            state_vector,
            covered,
            prune_to,
            read_cursor,
            reply,
        } => {
            let swap = Swap {
                doc: &doc,
                snapshot: &snapshot,
                state_vector: &state_vector,
                covered,
                prune_to,
                read_cursor,
            };
            let _ = reply.send(swap_snapshot(conn, &swap));
        }
    }
}

/// Runs `work` in a write transaction (`BEGIN IMMEDIATE`: the write lock first, so that it waits
/// for another writer instead of failing halfway) and commits it if it succeeds; a failure rolls
/// everything back.
pub(super) fn transaction<T>(conn: &mut Connection, work: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let value = work(&tx)?;
    tx.commit()?;
    Ok(value)
}

/// The two steps of an [`AppendPlan`].
fn append_rows(tx: &Transaction<'_>, rows: &[Row<'_>], push: Option<PushPlan>) -> Result<Vec<Appended>> {
    let plan = AppendPlan::new(rows)?;
    let mut read = Vec::new();
    for statement in plan.reads(false) {
        query(tx, &statement, |row| {
            let doc: String = row.get(0).map_err(|e| corrupt("(append)", e.to_string()))?;
            let get =
                |i: usize, what: &str| -> Result<i64> { row.get(i).map_err(|e| corrupt(&doc, format!("{what}: {e}"))) };
            read.push(if row.as_ref().column_count() == 2 {
                ReadRow::Head {
                    head: get(1, "head")?,
                    doc,
                }
            } else {
                ReadRow::Batch {
                    client_id: get(1, "client id")?,
                    batch: get(2, "client's last batch")?,
                    seq: get(3, "client's last cursor")?,
                    doc,
                }
            });
            Ok(())
        })?;
    }
    let (appended, writes) = plan.writes(read, false, push)?;
    for statement in writes {
        query(tx, &statement, |_| Ok(()))?;
    }
    Ok(appended)
}

fn record_local(tx: &Transaction<'_>, doc: &str, update: &[u8]) -> Result<u64> {
    append_rows(
        tx,
        &[Row {
            doc,
            origin: None,
            update,
            chat: None,
        }],
        None,
    )?;
    let batch: i64 = tx
        .prepare_cached(OUTBOX_INSERT)?
        .query_row((doc, update), |row| row.get(0))
        .map_err(|e| corrupt(doc, format!("outbox batch: {e}")))?;
    from_sql(batch, doc, "outbox batch")
}

fn record_remote(tx: &Transaction<'_>, doc: &str, cursor: i64, updates: &[Vec<u8>]) -> Result<()> {
    if !updates.is_empty() {
        let rows: Vec<Row<'_>> = updates
            .iter()
            .map(|update| Row {
                doc,
                origin: None,
                update,
                chat: None,
            })
            .collect();
        append_rows(tx, &rows, None)?;
    }
    tx.prepare_cached(SYNC_STATE_ADVANCE)?.execute((doc, cursor))?;
    Ok(())
}

/// The swap's three statements (see `sql::SWAP_SNAPSHOT`), in one write transaction; nothing is
/// written when another compactor got there first. Their `$n` parameters are bound by name.
fn swap_snapshot(conn: &mut Connection, swap: &Swap<'_>) -> Result<Option<u64>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let pruned: Option<i64> = {
        let mut statement = tx.prepare_cached(SWAP_SNAPSHOT)?;
        let mut rows = statement
            .query(rusqlite::named_params! {
                "$1": swap.doc,
                "$2": swap.snapshot,
                "$3": swap.state_vector,
                "$4": swap.covered,
                "$5": swap.prune_to,
                "$6": swap.read_cursor,
            })
            .map_err(|e| statement_error(swap.doc, e))?;
        match rows.next().map_err(|e| statement_error(swap.doc, e))? {
            Some(row) => Some(row.get(0).map_err(|e| statement_error(swap.doc, e))?),
            None => None,
        }
    };
    let Some(pruned) = pruned else {
        // Dropping the transaction rolls it back.
        return Ok(None);
    };
    tx.prepare_cached(RECOUNT_LOG_BYTES)?
        .execute(rusqlite::named_params! { "$1": swap.doc, "$2": swap.covered })?;
    let deleted = tx
        .prepare_cached(PRUNE_LOG)?
        .execute(rusqlite::named_params! { "$1": swap.doc, "$2": pruned })?;
    tx.commit()?;
    Ok(Some(deleted as u64))
}

/// Runs one statement of a plan, handing each row it yields to `each`. Statements that should
/// stay prepared (see `sql::CACHED_ROWS`) go through the connection's statement cache.
fn query(
    tx: &Transaction<'_>,
    statement: &Statement<'_>,
    mut each: impl FnMut(&rusqlite::Row<'_>) -> Result<()>,
) -> Result<()> {
    let mut cached;
    let mut fresh;
    let prepared: &mut rusqlite::Statement<'_> = if statement.cached {
        cached = tx.prepare_cached(&statement.sql)?;
        &mut cached
    } else {
        fresh = tx.prepare(&statement.sql)?;
        &mut fresh
    };
    let mut rows = prepared
        .query(rusqlite::params_from_iter(statement.values.iter()))
        .map_err(|e| statement_error(statement.doc, e))?;
    while let Some(row) = rows.next().map_err(|e| statement_error(statement.doc, e))? {
        each(row)?;
    }
    Ok(())
}

/// A failed statement: a value that does not convert is corrupt data of `doc`, anything else a
/// database failure.
fn statement_error(doc: &str, e: rusqlite::Error) -> Error {
    match e {
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => corrupt(doc, e.to_string()),
        e => Error::Sqlite(e),
    }
}

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Value::Text(text) => ValueRef::Text(text.as_bytes()),
            Value::Int(int) => ValueRef::Integer(int),
            Value::Blob(blob) => ValueRef::Blob(blob),
        }))
    }
}

/// Runs one statement whose `$n` parameters are bound by name (rusqlite numbers `$n`
/// parameters in the order they first appear, not by their digits).
pub(super) fn execute_named(tx: &Transaction<'_>, sql: &str, values: &[Value<'_>]) -> Result<usize> {
    let names: Vec<String> = (1..=values.len()).map(|n| format!("${n}")).collect();
    let params: Vec<(&str, &dyn rusqlite::ToSql)> = names
        .iter()
        .zip(values)
        .map(|(name, value)| (name.as_str(), value as &dyn rusqlite::ToSql))
        .collect();
    Ok(tx.prepare_cached(sql)?.execute(params.as_slice())?)
}
