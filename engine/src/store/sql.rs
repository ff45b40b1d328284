//! The store logic both backends share, written once as the `sql_store!` macro.
//!
//!
//! SQLite and PostgreSQL run the very same SQL: sqlx's SQLite driver binds `$1`-style
//! placeholders by number just as PostgreSQL does, both databases support
//! `INSERT … ON CONFLICT`, `UPDATE … RETURNING` and `excluded`, and every integer is read back as
//! a 64-bit value. Only two things differ — how a transaction begins and how a document row is
//! locked — so the implementation of [`Store`] is written once, as the `sql_store!` macro below,
//! and expanded in `sqlite.rs` and `postgres.rs` with those differences as arguments.
//!
//! A macro rather than code generic over `sqlx::Database`: the bounds sqlx needs for that
//! (executors for every lifetime, encoders for every parameter type, `Send` futures through all
//! of it) would bury the logic, while each expansion is ordinary, concretely typed code that the
//! compiler checks against its own driver.
//!
//! The transaction discipline, which the macro's arguments must uphold:
//!
//! * A write transaction serialises appends to a document. SQLite begins it with
//!   `BEGIN IMMEDIATE`, taking the database's write lock up front (a deferred transaction that
//!   reads first and writes later can fail with `SQLITE_BUSY` instead of waiting). PostgreSQL
//!   runs at READ COMMITTED and locks each document row (`SELECT … FOR UPDATE`, in sorted order
//!   so that two batches touching the same documents cannot deadlock) before reading anything the
//!   append depends on, such as a client's last batch; each later statement then sees every
//!   append committed before the lock was granted.
//! * A read transaction must see one snapshot across its statements, or a compaction committing
//!   between reading a document's row and reading its log would make the log look like it has a
//!   hole. SQLite's deferred transaction does that in WAL mode; PostgreSQL needs REPEATABLE READ
//!   (which, being read only, never fails with a serialization error).

use std::collections::BTreeSet;

use super::{DeviceIdentity, LogEntry, StoredDoc};
use crate::doc::MAX_CLIENT_ID;
use crate::{Error, Result};
use driftsync_protocol::Cursor;

/// Folding more bytes than this runs on the blocking thread pool rather than on the async
/// runtime's worker, which it would otherwise stall.
const INLINE_FOLD_BYTES: usize = 64 * 1024;

/// The `doc` named in [`Error::Corrupt`] for rows that belong to no document.
pub(super) const DEVICE_ROW: &str = "(device identity)";

/// An [`Error::Corrupt`] for `doc`.
pub(super) fn corrupt(doc: &str, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        doc: doc.to_string(),
        reason: reason.into(),
    }
}

/// Maps a failed read of `doc`'s rows: a value that does not decode (a NULL, a text where an
/// integer belongs) is corrupt data, anything else is a database failure.
pub(super) fn read_error(doc: &str) -> impl FnOnce(sqlx::Error) -> Error + '_ {
    move |e| match e {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => corrupt(doc, e.to_string()),
        e => Error::Store(e),
    }
}

/// Converts a cursor, batch or client id for SQL, which only has signed 64-bit integers.
pub(super) fn to_sql(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::Invalid(format!("{what} {value} does not fit in a signed 64-bit integer")))
}

/// Converts a byte length for SQL.
pub(super) fn len_to_sql(bytes: &[u8]) -> Result<i64> {
    i64::try_from(bytes.len()).map_err(|_| Error::Invalid(format!("an update of {} bytes is too large", bytes.len())))
}

/// Converts a counter read back from `doc`'s rows; a negative value is corrupt data (a cast would
/// turn it into a huge cursor instead).
pub(super) fn from_sql(value: i64, doc: &str, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| corrupt(doc, format!("{what} is negative ({value})")))
}

/// Turns the log rows read after cursor `after` into entries, checking that they are exactly
/// `after + 1 ..= head`: a gap or a row past the head means rows were lost or forged, and serving
/// such a log would silently drop changes.
pub(super) fn log_entries(doc: &str, after: Cursor, head: Cursor, rows: Vec<(i64, Vec<u8>)>) -> Result<Vec<LogEntry>> {
    let mut entries = Vec::with_capacity(rows.len());
    let mut expected = after;
    for (seq, update) in rows {
        let cursor = from_sql(seq, doc, "log entry cursor")?;
        expected = expected.saturating_add(1);
        if cursor != expected || cursor > head {
            return Err(corrupt(
                doc,
                format!("log entry {cursor} found where {expected} was expected (head {head})"),
            ));
        }
        entries.push(LogEntry { cursor, update });
    }
    if expected < head {
        return Err(corrupt(
            doc,
            format!("the log ends at {expected} but the head is {head}"),
        ));
    }
    Ok(entries)
}

/// Checks the device row read back: the client id must be a valid yrs client id.
pub(super) fn device_identity((client_id, device_id): (i64, String)) -> Result<DeviceIdentity> {
    let client_id = from_sql(client_id, DEVICE_ROW, "client id")?;
    if client_id == 0 || client_id >= MAX_CLIENT_ID {
        return Err(corrupt(DEVICE_ROW, format!("client id {client_id} is not in 1..2^53")));
    }
    Ok(DeviceIdentity { client_id, device_id })
}

/// Checks a document row read back: `(head, snapshot_cursor, pruned_through)`, all cursors.
pub(super) fn check_counters(
    doc: &str,
    head: i64,
    snapshot_cursor: i64,
    pruned_through: i64,
) -> Result<(Cursor, Cursor, Cursor)> {
    let head = from_sql(head, doc, "head")?;
    let snapshot_cursor = from_sql(snapshot_cursor, doc, "snapshot cursor")?;
    let pruned_through = from_sql(pruned_through, doc, "pruned-through cursor")?;
    if snapshot_cursor > head || pruned_through > snapshot_cursor {
        return Err(corrupt(
            doc,
            format!(
                "cursors out of order: pruned through {pruned_through}, snapshot at \
                 {snapshot_cursor}, head {head}"
            ),
        ));
    }
    Ok((head, snapshot_cursor, pruned_through))
}

/// Folds a document for compaction (see [`crate::doc::fold`]), on the blocking thread pool when
/// it is large.
pub(super) async fn fold(doc: &str, stored: StoredDoc) -> Result<(Vec<u8>, Vec<u8>)> {
    let size = stored.snapshot.as_ref().map_or(0, Vec::len)
        + stored.tail.iter().map(|entry| entry.update.len()).sum::<usize>();
    if size <= INLINE_FOLD_BYTES {
        return crate::doc::fold(doc, &stored);
    }
    let doc_id = doc.to_string();
    match tokio::task::spawn_blocking(move || crate::doc::fold(&doc_id, &stored)).await {
        Ok(folded) => folded,
        // `fold` turns panics of the yrs decoder into errors; one escaping anyway was still
        // caused by this document's data.
        Err(e) if e.is_panic() => Err(corrupt(doc, "folding the document panicked")),
        Err(_) => Err(Error::Invalid(
            "compaction was cancelled by the runtime shutting down".into(),
        )),
    }
}

/// The set of distinct documents of a batch, in the order their rows are locked.
pub(super) fn lock_order<'a>(docs: impl IntoIterator<Item = &'a str>) -> BTreeSet<&'a str> {
    docs.into_iter().collect()
}

/// Implements [`Store`] (and a few hidden test hooks) for a store struct with a `pool` field.
///
/// * `store`: the struct;
/// * `database`: its sqlx database type;
/// * `begin_write`, `begin_read`: the statements that begin a write and a read transaction;
/// * `lock_document`: `Some(sql)` locking the document row `$1` for the rest of a write
///   transaction, or `None` where a write transaction already excludes every other writer.
///
/// See the module docs for what these statements must guarantee.
macro_rules! sql_store {
    (
        store: $store:ident,
        database: $db:ty,
        begin_write: $begin_write:literal,
        begin_read: $begin_read:literal,
        lock_document: $lock_document:expr $(,)?
    ) => {
        /// The implementation of [`Store`](crate::store::Store) that both backends share (see the docs
        /// of `store::sql`).
        mod shared {
            use std::future::Future;

            use super::$store;
            use driftsync_protocol::Cursor;
            use $crate::store::sql::{
                check_counters, corrupt, device_identity, fold, from_sql, len_to_sql, lock_order, log_entries,
                read_error, to_sql, DEVICE_ROW,
            };
            use $crate::store::{
                Append, Appended, Compacted, CompactionPolicy, DeviceIdentity, DocMeta, LogTail, Origin, OutboxEntry,
                Store, StoredDoc,
            };
            use $crate::Result;

            /// The connection a transaction runs on.
            type Connection = <$db as ::sqlx::Database>::Connection;

            /// Ensures every document of `docs` has its row and, where the backend needs it, locks
            /// the rows (in sorted order, so concurrent batches cannot deadlock).
            async fn lock_documents<'a>(conn: &mut Connection, docs: impl IntoIterator<Item = &'a str>) -> Result<()> {
                let lock: Option<&'static str> = $lock_document;
                for doc in lock_order(docs) {
                    ::sqlx::query("INSERT INTO documents (doc) VALUES ($1) ON CONFLICT (doc) DO NOTHING")
                        .bind(doc)
                        .execute(&mut *conn)
                        .await?;
                    if let Some(lock) = lock {
                        ::sqlx::query(lock).bind(doc).execute(&mut *conn).await?;
                    }
                }
                Ok(())
            }

            /// Appends one update to a document whose row `lock_documents` has prepared in this
            /// transaction, unless `origin` marks it as a batch the client already pushed.
            async fn append_locked(
                conn: &mut Connection,
                doc: &str,
                origin: Option<Origin>,
                update: &[u8],
            ) -> Result<Appended> {
                let len = len_to_sql(update)?;
                let origin = match origin {
                    Some(origin) => {
                        let client_id = to_sql(origin.client_id, "client id")?;
                        let batch = to_sql(origin.batch, "batch id")?;
                        let last: Option<(i64, i64)> = ::sqlx::query_as(
                            "SELECT last_batch, last_seq FROM client_batches \
                             WHERE doc = $1 AND client_id = $2",
                        )
                        .bind(doc)
                        .bind(client_id)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(read_error(doc))?;
                        if let Some((last_batch, last_seq)) = last {
                            if origin.batch <= from_sql(last_batch, doc, "client's last batch")? {
                                let cursor = from_sql(last_seq, doc, "client's last cursor")?;
                                return Ok(Appended::Duplicate(cursor));
                            }
                        }
                        Some((client_id, batch))
                    }
                    None => None,
                };
                // The row lock this takes is what serialises appends to one document.
                let head: Option<i64> = ::sqlx::query_scalar(
                    "UPDATE documents SET head = head + 1, log_bytes = log_bytes + $2 \
                     WHERE doc = $1 RETURNING head",
                )
                .bind(doc)
                .bind(len)
                .fetch_optional(&mut *conn)
                .await
                .map_err(read_error(doc))?;
                let Some(head) = head else {
                    return Err(corrupt(doc, "the document row vanished inside its transaction"));
                };
                let cursor = from_sql(head, doc, "head")?;
                ::sqlx::query("INSERT INTO updates (doc, seq, data) VALUES ($1, $2, $3)")
                    .bind(doc)
                    .bind(head)
                    .bind(update)
                    .execute(&mut *conn)
                    .await?;
                if let Some((client_id, batch)) = origin {
                    ::sqlx::query(
                        "INSERT INTO client_batches (doc, client_id, last_batch, last_seq) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (doc, client_id) \
                         DO UPDATE SET last_batch = excluded.last_batch, last_seq = excluded.last_seq",
                    )
                    .bind(doc)
                    .bind(client_id)
                    .bind(batch)
                    .bind(head)
                    .execute(&mut *conn)
                    .await?;
                }
                Ok(Appended::Stored(cursor))
            }

            /// Reads a document's snapshot and log tail (inside a read transaction).
            async fn load_in(conn: &mut Connection, doc: &str) -> Result<Option<StoredDoc>> {
                let row: Option<(i64, Option<Vec<u8>>, i64, i64)> = ::sqlx::query_as(
                    "SELECT head, snapshot, snapshot_cursor, pruned_through \
                     FROM documents WHERE doc = $1",
                )
                .bind(doc)
                .fetch_optional(&mut *conn)
                .await
                .map_err(read_error(doc))?;
                let Some((head_sql, snapshot, snapshot_cursor_sql, pruned_sql)) = row else {
                    return Ok(None);
                };
                let (head, snapshot_cursor, _) = check_counters(doc, head_sql, snapshot_cursor_sql, pruned_sql)?;
                if snapshot.is_none() && snapshot_cursor > 0 {
                    return Err(corrupt(
                        doc,
                        format!("the snapshot covering cursor {snapshot_cursor} is missing"),
                    ));
                }
                let rows: Vec<(i64, Vec<u8>)> =
                    ::sqlx::query_as("SELECT seq, data FROM updates WHERE doc = $1 AND seq > $2 ORDER BY seq")
                        .bind(doc)
                        .bind(snapshot_cursor_sql)
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(read_error(doc))?;
                let tail = log_entries(doc, snapshot_cursor, head, rows)?;
                Ok(Some(StoredDoc {
                    snapshot,
                    snapshot_cursor,
                    tail,
                    head,
                }))
            }

            impl $store {
                /// Begins a transaction that writes (see the module docs of `store::sql`).
                async fn begin_write(&self) -> Result<::sqlx::Transaction<'static, $db>> {
                    Ok(self.pool.begin_with($begin_write).await?)
                }

                /// Begins a transaction that only reads, over one consistent snapshot.
                async fn begin_read(&self) -> Result<::sqlx::Transaction<'static, $db>> {
                    Ok(self.pool.begin_with($begin_read).await?)
                }

                /// [`Store::compact`], awaiting `pause` between folding and writing the snapshot.
                ///
                /// A test hook: what `pause` does (append, compact again) happens exactly in the
                /// window a concurrent writer would hit.
                #[doc(hidden)]
                pub async fn compact_with_pause(
                    &self,
                    doc: &str,
                    policy: &CompactionPolicy,
                    pause: impl Future<Output = ()>,
                ) -> Result<Option<Compacted>> {
                    // (1) Read what to fold.
                    let mut tx = self.begin_read().await?;
                    let stored = load_in(&mut tx, doc).await?;
                    tx.commit().await?;
                    let Some(stored) = stored else { return Ok(None) };
                    let Some(covered) = stored.tail.last().map(|entry| entry.cursor) else {
                        return Ok(None);
                    };
                    let read_cursor = to_sql(stored.snapshot_cursor, "snapshot cursor")?;
                    let covered_sql = to_sql(covered, "cursor")?;
                    let prune_to = to_sql(covered.saturating_sub(policy.retain_entries), "cursor")?;

                    // (2) Fold outside any transaction: this is the slow part.
                    let (snapshot, state_vector) = fold(doc, stored).await?;
                    pause.await;

                    // (3) Swap the snapshot in, unless another compactor already did.
                    let mut tx = self.begin_write().await?;
                    let pruned: Option<i64> = ::sqlx::query_scalar(
                        "UPDATE documents SET snapshot = $2, snapshot_sv = $3, snapshot_cursor = $4, \
                         pruned_through = CASE WHEN pruned_through > $5 THEN pruned_through \
                                               ELSE $5 END \
                         WHERE doc = $1 AND snapshot_cursor = $6 RETURNING pruned_through",
                    )
                    .bind(doc)
                    .bind(&snapshot)
                    .bind(&state_vector)
                    .bind(covered_sql)
                    .bind(prune_to)
                    .bind(read_cursor)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(read_error(doc))?;
                    let Some(pruned) = pruned else {
                        tx.rollback().await?;
                        return Ok(None);
                    };
                    // The statement above holds the document's row lock, so every append to it has
                    // either committed (and is counted here) or waits for this transaction.
                    ::sqlx::query(
                        "UPDATE documents SET log_bytes = \
                         (SELECT CAST(COALESCE(SUM(length(data)), 0) AS BIGINT) FROM updates \
                          WHERE doc = $1 AND seq > $2) \
                         WHERE doc = $1",
                    )
                    .bind(doc)
                    .bind(covered_sql)
                    .execute(&mut *tx)
                    .await?;
                    let deleted = ::sqlx::query("DELETE FROM updates WHERE doc = $1 AND seq <= $2")
                        .bind(doc)
                        .bind(pruned)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    tx.commit().await?;
                    Ok(Some(Compacted {
                        snapshot_cursor: covered,
                        snapshot_bytes: snapshot.len() as u64,
                        deleted_entries: deleted,
                    }))
                }

                /// Writes `data` as log entry `seq` of `doc`, replacing any entry there, without
                /// touching the document row. A test hook for corrupting a store.
                #[doc(hidden)]
                pub async fn raw_insert_update(&self, doc: &str, seq: i64, data: &[u8]) -> Result<()> {
                    ::sqlx::query(
                        "INSERT INTO updates (doc, seq, data) VALUES ($1, $2, $3) \
                         ON CONFLICT (doc, seq) DO UPDATE SET data = excluded.data",
                    )
                    .bind(doc)
                    .bind(seq)
                    .bind(data)
                    .execute(&self.pool)
                    .await?;
                    Ok(())
                }

                /// Overwrites the snapshot of `doc`. A test hook for corrupting a store.
                #[doc(hidden)]
                pub async fn raw_set_snapshot(&self, doc: &str, snapshot: Option<&[u8]>) -> Result<()> {
                    ::sqlx::query("UPDATE documents SET snapshot = $2 WHERE doc = $1")
                        .bind(doc)
                        .bind(snapshot)
                        .execute(&self.pool)
                        .await?;
                    Ok(())
                }

                /// Overwrites the head cursor of `doc`. A test hook for corrupting a store.
                #[doc(hidden)]
                pub async fn raw_set_head(&self, doc: &str, head: i64) -> Result<()> {
                    ::sqlx::query("UPDATE documents SET head = $2 WHERE doc = $1")
                        .bind(doc)
                        .bind(head)
                        .execute(&self.pool)
                        .await?;
                    Ok(())
                }
            }

            impl Store for $store {
                async fn append(&self, batch: &[Append]) -> Result<Vec<Appended>> {
                    if batch.is_empty() {
                        return Ok(Vec::new());
                    }
                    let mut tx = self.begin_write().await?;
                    lock_documents(&mut tx, batch.iter().map(|append| append.doc.as_str())).await?;
                    let mut appended = Vec::with_capacity(batch.len());
                    for append in batch {
                        appended.push(append_locked(&mut tx, &append.doc, append.origin, &append.update).await?);
                    }
                    tx.commit().await?;
                    Ok(appended)
                }

                async fn load(&self, doc: &str) -> Result<Option<StoredDoc>> {
                    let mut tx = self.begin_read().await?;
                    let stored = load_in(&mut tx, doc).await?;
                    tx.commit().await?;
                    Ok(stored)
                }

                /// A cursor past the head (a client that knows more than this store) gets no
                /// entries rather than an error: there is nothing after it to send.
                async fn log_after(&self, doc: &str, after: Cursor) -> Result<LogTail> {
                    let mut tx = self.begin_read().await?;
                    let row: Option<(i64, i64, i64)> =
                        ::sqlx::query_as("SELECT head, snapshot_cursor, pruned_through FROM documents WHERE doc = $1")
                            .bind(doc)
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(read_error(doc))?;
                    let Some((head, snapshot_cursor, pruned_through)) = row else {
                        return Ok(LogTail::Entries(Vec::new()));
                    };
                    let (head, _, pruned_through) = check_counters(doc, head, snapshot_cursor, pruned_through)?;
                    if after < pruned_through {
                        return Ok(LogTail::Pruned);
                    }
                    if after >= head {
                        return Ok(LogTail::Entries(Vec::new()));
                    }
                    let rows: Vec<(i64, Vec<u8>)> =
                        ::sqlx::query_as("SELECT seq, data FROM updates WHERE doc = $1 AND seq > $2 ORDER BY seq")
                            .bind(doc)
                            .bind(to_sql(after, "cursor")?)
                            .fetch_all(&mut *tx)
                            .await
                            .map_err(read_error(doc))?;
                    tx.commit().await?;
                    Ok(LogTail::Entries(log_entries(doc, after, head, rows)?))
                }

                async fn meta(&self, doc: &str) -> Result<Option<DocMeta>> {
                    let row: Option<(i64, i64, i64, i64, i64)> = ::sqlx::query_as(
                        "SELECT head, snapshot_cursor, \
                         CAST(COALESCE(length(snapshot), 0) AS BIGINT), log_bytes, pruned_through \
                         FROM documents WHERE doc = $1",
                    )
                    .bind(doc)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(read_error(doc))?;
                    let Some((head, snapshot_cursor, snapshot_bytes, log_bytes, pruned_through)) = row else {
                        return Ok(None);
                    };
                    let (head, snapshot_cursor, pruned_through) =
                        check_counters(doc, head, snapshot_cursor, pruned_through)?;
                    Ok(Some(DocMeta {
                        head,
                        snapshot_cursor,
                        snapshot_bytes: from_sql(snapshot_bytes, doc, "snapshot size")?,
                        log_bytes: from_sql(log_bytes, doc, "log size")?,
                        pruned_through,
                    }))
                }

                /// Compacts whenever the log after the snapshot is not empty; whether that is worth
                /// it is the caller's decision ([`CompactionPolicy::due`]), only `retain_entries` is
                /// used here.
                async fn compact(&self, doc: &str, policy: &CompactionPolicy) -> Result<Option<Compacted>> {
                    self.compact_with_pause(doc, policy, std::future::ready(())).await
                }

                async fn documents(&self) -> Result<Vec<String>> {
                    let mut docs: Vec<String> = ::sqlx::query_scalar("SELECT doc FROM documents")
                        .fetch_all(&self.pool)
                        .await?;
                    // Sorted here rather than in SQL, where the order would follow the database's
                    // collation and so differ between backends.
                    docs.sort_unstable();
                    Ok(docs)
                }

                async fn device(&self) -> Result<DeviceIdentity> {
                    const SELECT: &str = "SELECT client_id, device_id FROM device WHERE id = 1";
                    let row: Option<(i64, String)> = ::sqlx::query_as(SELECT)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(read_error(DEVICE_ROW))?;
                    if let Some(row) = row {
                        return device_identity(row);
                    }
                    // First call: insert an identity unless a concurrent caller just did, then read
                    // whichever won, so that every caller gets the same one.
                    let mut tx = self.begin_write().await?;
                    ::sqlx::query(
                        "INSERT INTO device (id, client_id, device_id) VALUES (1, $1, $2) \
                         ON CONFLICT (id) DO NOTHING",
                    )
                    .bind(to_sql($crate::doc::new_client_id(), "client id")?)
                    .bind(::uuid::Uuid::now_v7().to_string())
                    .execute(&mut *tx)
                    .await?;
                    let row: Option<(i64, String)> = ::sqlx::query_as(SELECT)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(read_error(DEVICE_ROW))?;
                    tx.commit().await?;
                    match row {
                        Some(row) => device_identity(row),
                        None => Err(corrupt(
                            DEVICE_ROW,
                            "the device row is missing right after it was inserted",
                        )),
                    }
                }

                async fn record_local(&self, doc: &str, update: &[u8]) -> Result<u64> {
                    let mut tx = self.begin_write().await?;
                    lock_documents(&mut tx, [doc]).await?;
                    append_locked(&mut tx, doc, None, update).await?;
                    let batch: i64 =
                        ::sqlx::query_scalar("INSERT INTO outbox (doc, data) VALUES ($1, $2) RETURNING batch")
                            .bind(doc)
                            .bind(update)
                            .fetch_one(&mut *tx)
                            .await
                            .map_err(read_error(doc))?;
                    let batch = from_sql(batch, doc, "outbox batch")?;
                    tx.commit().await?;
                    Ok(batch)
                }

                async fn outbox(&self, doc: Option<&str>) -> Result<Vec<OutboxEntry>> {
                    let query = match doc {
                        Some(doc) => {
                            ::sqlx::query_as("SELECT batch, doc, data FROM outbox WHERE doc = $1 ORDER BY batch")
                                .bind(doc)
                        }
                        None => ::sqlx::query_as("SELECT batch, doc, data FROM outbox ORDER BY batch"),
                    };
                    let rows: Vec<(i64, String, Vec<u8>)> = query
                        .fetch_all(&self.pool)
                        .await
                        .map_err(read_error(doc.unwrap_or("(outbox)")))?;
                    rows.into_iter()
                        .map(|(batch, doc, update)| {
                            let batch = from_sql(batch, &doc, "outbox batch")?;
                            Ok(OutboxEntry { doc, batch, update })
                        })
                        .collect()
                }

                async fn acknowledge(&self, doc: &str, batch: u64) -> Result<()> {
                    // No stored batch exceeds i64::MAX, so clamping removes exactly the right rows.
                    let batch = i64::try_from(batch).unwrap_or(i64::MAX);
                    ::sqlx::query("DELETE FROM outbox WHERE doc = $1 AND batch <= $2")
                        .bind(doc)
                        .bind(batch)
                        .execute(&self.pool)
                        .await?;
                    Ok(())
                }

                async fn server_cursor(&self, doc: &str) -> Result<Cursor> {
                    let cursor: Option<i64> = ::sqlx::query_scalar("SELECT cursor FROM sync_state WHERE doc = $1")
                        .bind(doc)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(read_error(doc))?;
                    cursor.map_or(Ok(0), |cursor| from_sql(cursor, doc, "server cursor"))
                }

                async fn record_remote(&self, doc: &str, cursor: Cursor, updates: &[Vec<u8>]) -> Result<()> {
                    let cursor = to_sql(cursor, "server cursor")?;
                    let mut tx = self.begin_write().await?;
                    if !updates.is_empty() {
                        lock_documents(&mut tx, [doc]).await?;
                        for update in updates {
                            append_locked(&mut tx, doc, None, update).await?;
                        }
                    }
                    ::sqlx::query(
                        "INSERT INTO sync_state (doc, cursor) VALUES ($1, $2) ON CONFLICT (doc) \
                         DO UPDATE SET cursor = CASE WHEN excluded.cursor > sync_state.cursor \
                                                     THEN excluded.cursor ELSE sync_state.cursor END",
                    )
                    .bind(doc)
                    .bind(cursor)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok(())
                }
            }
        }
    };
}

pub(super) use sql_store;
