//! The store logic both backends share, written once as the `sql_store!` macro.
//!
//! SQLite and PostgreSQL run the very same SQL: sqlx's SQLite driver binds `$1`-style
//! placeholders by number just as PostgreSQL does, both databases support
//! `INSERT … ON CONFLICT … RETURNING`, `UPDATE … FROM (VALUES …)`, row values and `excluded`,
//! and every integer is read back as a 64-bit value. Only how a transaction begins and the
//! placeholders of the multi-row statements differ, so the implementation of [`Store`] is
//! written once, as the `sql_store!` macro below, and expanded in `sqlite.rs` and `postgres.rs`
//! with those differences as arguments.
//!
//! An append costs a fixed number of statements whatever the number of updates in it (multi-row
//! statements), because each statement costs a round trip to the server on PostgreSQL (and
//! parsing and planning everywhere), and under load a group commit carries hundreds of updates.
//! The statements come from [`AppendPlan`], which the SQLite write thread
//! (`store::write_thread`, rusqlite) runs too.
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
//!   runs at READ COMMITTED and locks each document row — the append's first statement is an
//!   upsert of the document rows, in sorted order so that two batches touching the same documents
//!   cannot deadlock, whose `DO UPDATE` takes the row lock — before reading anything the append
//!   depends on, such as a client's last batch; each later statement then sees every append
//!   committed before the lock was granted.
//! * A read transaction must see one snapshot across its statements, or a compaction committing
//!   between reading a document's row and reading its log would make the log look like it has a
//!   hole. SQLite's deferred transaction does that in WAL mode; PostgreSQL needs REPEATABLE READ
//!   (which, being read only, never fails with a serialization error).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{Appended, DeviceIdentity, LogEntry, StoredDoc};
use crate::chat::ChatFacts;
use crate::doc::MAX_CLIENT_ID;
use crate::{Error, Result};
use driftsync_protocol::Cursor;

/// Folding more bytes than this runs on the blocking thread pool rather than on the async
/// runtime's worker, which it would otherwise stall.
const INLINE_FOLD_BYTES: usize = 64 * 1024;

/// The `doc` named in [`Error::Corrupt`] for rows that belong to no document.
pub(super) const DEVICE_ROW: &str = "(device identity)";
/// What errors about the client id owners table name instead of a document.
pub(super) const CLIENT_OWNERS: &str = "(client id owners)";

/// An [`Error::Corrupt`] for `doc`.
pub(super) fn corrupt(doc: &str, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        doc: doc.to_string(),
        reason: reason.into(),
    }
}

/// Maps a failed read of `doc`'s rows: a value that does not decode (a NULL, a text where an
/// integer belongs) is corrupt data, anything else is a database failure.
/// How many documents one query of `Store::heads` asks about (SQLite allows 32,766 bound
/// parameters, PostgreSQL 65,535).
pub(super) const HEADS_PER_QUERY: usize = 500;

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

/// The most rows one multi-row statement of an append carries (three or four parameters each,
/// far below SQLite's and PostgreSQL's limits on parameters per statement).
pub(super) const ROWS_PER_STATEMENT: usize = 256;

/// Multi-row statements with at most this many rows stay in sqlx's per-connection cache of
/// prepared statements; larger ones, whose text varies with the group, are prepared once and
/// dropped, so they do not evict the common small shapes.
pub(super) const CACHED_ROWS: usize = 4;

/// `($1, $2), ($3, $4), …` (`numbered`) or `(?, ?), (?, ?), …`: the placeholders of `rows` rows
/// of `columns` parameters each.
///
/// SQLite gets anonymous ones: sqlx looks up the name of every parameter it binds, and SQLite
/// finds a parameter's name by walking the list of all named parameters, so binding the
/// hundreds of `$n` of a multi-row statement took time quadratic in their number (most of an
/// append's CPU time). Anonymous parameters have no name to look up.
pub(super) fn values(rows: usize, columns: usize, numbered: bool) -> String {
    let mut sql = String::with_capacity(rows * columns * 5);
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            if numbered {
                sql.push('$');
                sql.push_str(&(row * columns + column + 1).to_string());
            } else {
                sql.push('?');
            }
        }
        sql.push(')');
    }
    sql
}

/// A value bound to a placeholder of a [`Statement`].
#[derive(Clone, Copy)]
pub(super) enum Value<'a> {
    Text(&'a str),
    Int(i64),
    Blob(&'a [u8]),
}

/// One statement of an append, with its parameters.
pub(super) struct Statement<'a> {
    /// A document it concerns, named in errors.
    pub(super) doc: &'a str,
    pub(super) sql: String,
    /// Whether sqlx should keep it prepared (see [`CACHED_ROWS`]).
    pub(super) cached: bool,
    pub(super) values: Vec<Value<'a>>,
}

impl<'a> Statement<'a> {
    pub(super) fn new(doc: &'a str, sql: String, rows: usize, values: Vec<Value<'a>>) -> Self {
        Statement {
            doc,
            sql,
            cached: rows <= CACHED_ROWS,
            values,
        }
    }
}

/// One update to append inside a write transaction (the borrowed form of an
/// [`Append`](super::Append)).
#[derive(Clone, Copy)]
pub(super) struct Row<'a> {
    pub(super) doc: &'a str,
    pub(super) origin: Option<super::Origin>,
    pub(super) update: &'a [u8],
    pub(super) chat: Option<&'a ChatFacts>,
}

impl<'a> From<&'a super::Append> for Row<'a> {
    fn from(append: &'a super::Append) -> Self {
        Row {
            doc: &append.doc,
            origin: append.origin,
            update: &append.update,
            chat: append.chat.as_deref(),
        }
    }
}

/// Records a local change in a client's outbox and returns its batch id: `(doc, update)`.
pub(super) const OUTBOX_INSERT: &str = "INSERT INTO outbox (doc, data) VALUES ($1, $2) RETURNING batch";

/// Advances a document's last server cursor, never backwards: `(doc, cursor)`.
pub(super) const SYNC_STATE_ADVANCE: &str = "INSERT INTO sync_state (doc, cursor) VALUES ($1, $2) \
     ON CONFLICT (doc) DO UPDATE SET cursor = CASE WHEN excluded.cursor > sync_state.cursor \
     THEN excluded.cursor ELSE sync_state.cursor END";

/// The last step of a compaction: the folded snapshot swapped in, in one write transaction of
/// the three statements below, unless another compactor already moved the snapshot.
pub(super) struct Swap<'a> {
    pub(super) doc: &'a str,
    pub(super) snapshot: &'a [u8],
    pub(super) state_vector: &'a [u8],
    /// The cursor the new snapshot covers.
    pub(super) covered: i64,
    /// Log entries up to this cursor are deleted (those after it kept, see
    /// `CompactionPolicy::retain_entries`).
    pub(super) prune_to: i64,
    /// The snapshot cursor the fold started from: the swap happens only if it is still current.
    pub(super) read_cursor: i64,
}

/// The snapshot swapped in: `$1` doc, `$2` snapshot, `$3` state vector, `$4` covered cursor,
/// `$5` prune-to cursor, `$6` the snapshot cursor read; returns the new `pruned_through`, no row
/// when another compactor got there first. (Numbered parameters bound by number: sqlx does that,
/// rusqlite binds them by name.)
pub(super) const SWAP_SNAPSHOT: &str = "UPDATE documents SET snapshot = $2, snapshot_sv = $3, snapshot_cursor = $4, \
     pruned_through = CASE WHEN pruned_through > $5 THEN pruned_through ELSE $5 END \
     WHERE doc = $1 AND snapshot_cursor = $6 RETURNING pruned_through";

/// The log size recounted after a swap: `$1` doc, `$2` covered cursor. The swap holds the
/// document's row lock, so every append to it has either committed (and is counted here) or
/// waits for this transaction.
pub(super) const RECOUNT_LOG_BYTES: &str = "UPDATE documents SET log_bytes = \
     (SELECT CAST(COALESCE(SUM(length(data)), 0) AS BIGINT) FROM updates WHERE doc = $1 AND seq > $2) \
     WHERE doc = $1";

/// The folded log entries deleted: `$1` doc, `$2` pruned-through cursor.
pub(super) const PRUNE_LOG: &str = "DELETE FROM updates WHERE doc = $1 AND seq <= $2";

/// What the first step of an append reads back.
pub(super) enum ReadRow {
    /// A document's row, created if it was missing: its last assigned cursor.
    Head { doc: String, head: i64 },
    /// A pushing client's latest stored batch for a document and that batch's cursor.
    Batch {
        doc: String,
        client_id: i64,
        batch: i64,
        seq: i64,
    },
}

/// An append, planned in a fixed number of statements whatever the number of its rows (each
/// multi-row statement carries up to [`ROWS_PER_STATEMENT`] rows), in two steps that both
/// backends run inside one write transaction:
///
/// 1. [`reads`](Self::reads): every document's row is created if missing and its `head` read,
///    by one upsert in sorted document order — on PostgreSQL the upsert's row lock is what
///    serialises appends to a document (sorted, so two groups cannot deadlock), and every later
///    statement sees each append committed before it was granted — and the pushing clients'
///    last batches are read, to drop re-sent batches;
/// 2. [`writes`](Self::writes): cursors are assigned in memory, `head + 1, head + 2, …` per
///    document in the order of the rows, and the log rows, the new heads and the clients' last
///    batches are written.
pub(super) struct AppendPlan<'a> {
    rows: &'a [Row<'a>],
    /// The distinct documents, in lock order.
    docs: Vec<&'a str>,
    /// The distinct (document, pushing client) pairs, sorted.
    pushers: Vec<(&'a str, i64)>,
}

impl<'a> AppendPlan<'a> {
    pub(super) fn new(rows: &'a [Row<'a>]) -> Result<Self> {
        let docs: Vec<&str> = lock_order(rows.iter().map(|row| row.doc)).into_iter().collect();
        let mut pushers: Vec<(&str, i64)> = Vec::new();
        for row in rows {
            if let Some(origin) = row.origin {
                pushers.push((row.doc, to_sql(origin.client_id, "client id")?));
            }
        }
        pushers.sort_unstable();
        pushers.dedup();
        Ok(AppendPlan { rows, docs, pushers })
    }

    /// The statements of step 1; their rows become [`ReadRow`]s (two columns: a head; four: a
    /// client's batch).
    pub(super) fn reads(&self, numbered: bool) -> Vec<Statement<'a>> {
        let mut reads = Vec::new();
        for chunk in self.docs.chunks(ROWS_PER_STATEMENT) {
            reads.push(Statement::new(
                chunk[0],
                format!(
                    "INSERT INTO documents (doc) VALUES {} ON CONFLICT (doc) \
                     DO UPDATE SET head = documents.head RETURNING doc, head",
                    values(chunk.len(), 1, numbered)
                ),
                chunk.len(),
                chunk.iter().map(|doc| Value::Text(doc)).collect(),
            ));
        }
        for chunk in self.pushers.chunks(ROWS_PER_STATEMENT) {
            reads.push(Statement::new(
                chunk[0].0,
                format!(
                    "SELECT doc, client_id, last_batch, last_seq FROM client_batches \
                     WHERE (doc, client_id) IN (VALUES {})",
                    values(chunk.len(), 2, numbered)
                ),
                chunk.len(),
                chunk
                    .iter()
                    .flat_map(|&(doc, client)| [Value::Text(doc), Value::Int(client)])
                    .collect(),
            ));
        }
        reads
    }

    /// Assigns cursors from what step 1 read and returns what became of each row, in order,
    /// with the statements of step 2 (none when every row was a re-sent batch).
    pub(super) fn writes(
        &self,
        read: Vec<ReadRow>,
        numbered: bool,
        push: Option<super::push::PushPlan>,
    ) -> Result<(Vec<Appended>, Vec<Statement<'a>>)> {
        // Per document: the head read, the head after this append, the bytes appended.
        let mut heads: HashMap<String, (i64, i64, i64)> = HashMap::with_capacity(self.docs.len());
        // The latest stored batch of each pushing client, per document.
        let mut last: HashMap<(&str, i64), (u64, Cursor)> = HashMap::with_capacity(self.pushers.len());
        for row in read {
            match row {
                ReadRow::Head { doc, head } => {
                    from_sql(head, &doc, "head")?;
                    heads.insert(doc, (head, head, 0));
                }
                ReadRow::Batch {
                    doc,
                    client_id,
                    batch,
                    seq,
                } => {
                    let batch = from_sql(batch, &doc, "client's last batch")?;
                    let seq = from_sql(seq, &doc, "client's last cursor")?;
                    let Ok(at) = self
                        .pushers
                        .binary_search_by(|probe| probe.cmp(&(doc.as_str(), client_id)))
                    else {
                        return Err(corrupt(
                            &doc,
                            "a client's last batch came back for a client not asked for",
                        ));
                    };
                    last.insert(self.pushers[at], (batch, seq));
                }
            }
        }

        // Cursors, in memory; re-sent batches are answered with the client's last cursor.
        let mut appended = Vec::with_capacity(self.rows.len());
        let mut stored: Vec<(&str, i64, &[u8])> = Vec::with_capacity(self.rows.len());
        let mut pushed: BTreeMap<(&str, i64), (u64, Cursor)> = BTreeMap::new();
        let mut indexed: Vec<(&'a str, &'a ChatFacts)> = Vec::new();
        for row in self.rows {
            let len = len_to_sql(row.update)?;
            let key = match row.origin {
                Some(origin) => {
                    let key = (row.doc, to_sql(origin.client_id, "client id")?);
                    if let Some(&(batch, cursor)) = last.get(&key) {
                        if origin.batch <= batch {
                            appended.push(Appended::Duplicate(cursor));
                            continue;
                        }
                    }
                    Some((key, origin.batch))
                }
                None => None,
            };
            let Some((_, head, bytes)) = heads.get_mut(row.doc) else {
                return Err(corrupt(row.doc, "the document row vanished inside its transaction"));
            };
            *head = head
                .checked_add(1)
                .ok_or_else(|| corrupt(row.doc, "the head cursor overflowed"))?;
            *bytes = bytes.saturating_add(len);
            let cursor = from_sql(*head, row.doc, "head")?;
            stored.push((row.doc, *head, row.update));
            if let Some(facts) = row.chat.filter(|facts| !facts.is_empty()) {
                indexed.push((row.doc, facts));
            }
            if let Some((key, batch)) = key {
                last.insert(key, (batch, cursor));
                pushed.insert(key, (batch, cursor));
            }
            appended.push(Appended::Stored(cursor));
        }
        let mut writes = Vec::new();
        if stored.is_empty() {
            return Ok((appended, writes));
        }

        for chunk in stored.chunks(ROWS_PER_STATEMENT) {
            writes.push(Statement::new(
                chunk[0].0,
                format!(
                    "INSERT INTO updates (doc, seq, data) VALUES {}",
                    values(chunk.len(), 3, numbered)
                ),
                chunk.len(),
                chunk
                    .iter()
                    .flat_map(|&(doc, seq, update)| [Value::Text(doc), Value::Int(seq), Value::Blob(update)])
                    .collect(),
            ));
        }
        let moved: Vec<(&str, i64, i64)> = self
            .docs
            .iter()
            .filter_map(|doc| heads.get(*doc).map(|&(read, head, bytes)| (*doc, read, head, bytes)))
            .filter(|&(_, read, head, _)| head != read)
            .map(|(doc, _, head, bytes)| (doc, head, bytes))
            .collect();
        for chunk in moved.chunks(ROWS_PER_STATEMENT) {
            writes.push(Statement::new(
                chunk[0].0,
                format!(
                    "UPDATE documents SET head = v.column2, log_bytes = log_bytes + v.column3 \
                     FROM (VALUES {}) AS v WHERE documents.doc = v.column1",
                    values(chunk.len(), 3, numbered)
                ),
                chunk.len(),
                chunk
                    .iter()
                    .flat_map(|&(doc, head, bytes)| [Value::Text(doc), Value::Int(head), Value::Int(bytes)])
                    .collect(),
            ));
        }
        let mut batches = Vec::with_capacity(pushed.len());
        for ((doc, client_id), (batch, cursor)) in pushed {
            batches.push((doc, client_id, to_sql(batch, "batch id")?, to_sql(cursor, "cursor")?));
        }
        for chunk in batches.chunks(ROWS_PER_STATEMENT) {
            writes.push(Statement::new(
                chunk[0].0,
                format!(
                    "INSERT INTO client_batches (doc, client_id, last_batch, last_seq) VALUES {} \
                     ON CONFLICT (doc, client_id) \
                     DO UPDATE SET last_batch = excluded.last_batch, last_seq = excluded.last_seq",
                    values(chunk.len(), 4, numbered)
                ),
                chunk.len(),
                chunk
                    .iter()
                    .flat_map(|&(doc, client, batch, seq)| {
                        [Value::Text(doc), Value::Int(client), Value::Int(batch), Value::Int(seq)]
                    })
                    .collect(),
            ));
        }
        writes.extend(chat_index_writes(&indexed, numbered)?);
        // The push outbox (`serve --push-webhook-url`): due notifications for the members of
        // the rooms that got messages, in this same transaction.
        if let Some(push) = push {
            writes.extend(super::push::due_statements(&indexed, &push, numbered)?);
        }
        Ok((appended, writes))
    }
}

/// What errors about the chat index name instead of a document.
pub(super) const INBOX: &str = "(chat index)";

/// A user's inbox rooms changed after a version: `$1` user, `$2` version (0: every room they
/// are a member of; later, a room they left only when they left after `$2`). Unread = others'
/// counted messages after the user's read receipt, counted up to 1,000 (shown as "999+"): the
/// count costs at most that many index entries per room.
pub(super) const INBOX_QUERY: &str = "SELECT m.room, m.joined, m.at, r.last_sort, r.last_id, r.last_author, \
     r.last_kind, r.last_text, r.last_deleted, r.last_at, COALESCE(rd.sort, ''), \
     (SELECT COUNT(*) FROM (SELECT 1 FROM chat_messages x WHERE x.room = m.room \
      AND x.sort > COALESCE(rd.sort, '') AND x.author <> $1 AND x.counted = 1 LIMIT 1000) AS u) \
     FROM chat_members m \
     LEFT JOIN chat_rooms r ON r.room = m.room \
     LEFT JOIN chat_reads rd ON rd.room = m.room AND rd.user_id = $1 \
     WHERE m.user_id = $1 AND (m.changed > $2 OR r.changed > $2 OR rd.changed > $2) \
     AND (m.joined = 1 OR ($2 > 0 AND m.changed > $2)) \
     ORDER BY COALESCE(r.last_sort, '') DESC, m.room";

/// A row of [`INBOX_QUERY`].
pub(super) type InboxRow = (
    String,
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    String,
    i64,
);

/// The inbox from [`INBOX_QUERY`]'s rows.
pub(super) fn inbox_from_rows(version: i64, rows: Vec<InboxRow>) -> Result<super::Inbox> {
    let mut rooms = Vec::with_capacity(rows.len());
    for (room, joined, at, sort, id, author, kind, text, deleted, last_at, read_sort, unread) in rows {
        let last = match (sort, id, author) {
            (Some(sort), Some(id), Some(author)) => Some(super::LastMessage {
                id,
                sort,
                author,
                kind: kind.unwrap_or_default(),
                text: text.unwrap_or_default(),
                deleted: deleted.unwrap_or(0) != 0,
                at_ms: from_sql(last_at.unwrap_or(0), &room, "message time")?,
            }),
            _ => None,
        };
        rooms.push(super::InboxRoom {
            joined: joined != 0,
            at_ms: from_sql(at, &room, "membership time")?,
            last,
            unread: from_sql(unread, &room, "unread count")?,
            read_sort,
            room,
        });
    }
    Ok(super::Inbox {
        version: from_sql(version, INBOX, "version")?,
        rooms,
    })
}

/// The version column's value in the chat index's statements: the version this transaction
/// raised it to.
const CHAT_VERSION: &str = "(SELECT version FROM chat_version WHERE id = 1)";

/// `values(rows, columns, numbered)` with [`CHAT_VERSION`] as each row's last column.
fn versioned_values(rows: usize, columns: usize, numbered: bool) -> String {
    let plain = values(rows, columns, numbered);
    plain.replace(')', &format!(", {CHAT_VERSION})"))
}

/// The statements that write what `indexed` (document, facts) found into the chat index (see
/// `migrations/*/0003_chat_index.sql`): none without facts. The version is raised first; on
/// PostgreSQL that takes the version row's lock, after every document row's (the order every
/// append takes them in), so transactions changing the index commit in version order.
/// Several facts of one key are merged first (a multi-row upsert may not touch a row twice).
fn chat_index_writes<'a>(indexed: &[(&'a str, &'a ChatFacts)], numbered: bool) -> Result<Vec<Statement<'a>>> {
    let Some(&(first, _)) = indexed.first() else {
        return Ok(Vec::new());
    };
    let mut writes = vec![Statement::new(
        first,
        "UPDATE chat_version SET version = version + 1 WHERE id = 1".to_string(),
        1,
        Vec::new(),
    )];
    // Messages, and each room's greatest one.
    let mut messages: BTreeMap<(&str, &str), (&str, i64)> = BTreeMap::new();
    let mut last: BTreeMap<&str, &crate::chat::MessageFact> = BTreeMap::new();
    let mut edits: Vec<(&str, &crate::chat::EditFact)> = Vec::new();
    let mut reads: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    let mut members: BTreeMap<(&str, &str), &crate::chat::MemberFact> = BTreeMap::new();
    for &(room, facts) in indexed {
        for message in &facts.messages {
            messages.insert((room, &message.sort), (&message.author, i64::from(message.counted())));
            match last.get(room) {
                Some(best) if best.sort >= message.sort => {}
                _ => {
                    last.insert(room, message);
                }
            }
        }
        edits.extend(facts.edits.iter().map(|edit| (room, edit)));
        for read in &facts.reads {
            let entry = reads.entry((room, &read.user)).or_insert(&read.sort);
            if read.sort.as_str() > *entry {
                *entry = &read.sort;
            }
        }
        for member in &facts.members {
            members.insert((room, &member.user), member);
        }
    }
    let messages: Vec<_> = messages.into_iter().collect();
    for chunk in messages.chunks(ROWS_PER_STATEMENT) {
        writes.push(Statement::new(
            first,
            format!(
                "INSERT INTO chat_messages (room, sort, author, counted) VALUES {} \
                 ON CONFLICT (room, sort) DO NOTHING",
                values(chunk.len(), 4, numbered)
            ),
            chunk.len(),
            chunk
                .iter()
                .flat_map(|&((room, sort), (author, counted))| {
                    [
                        Value::Text(room),
                        Value::Text(sort),
                        Value::Text(author),
                        Value::Int(counted),
                    ]
                })
                .collect(),
        ));
    }
    let last: Vec<_> = last.into_iter().collect();
    for chunk in last.chunks(ROWS_PER_STATEMENT) {
        let mut values_ = Vec::with_capacity(chunk.len() * 8);
        for &(room, message) in chunk {
            values_.extend([
                Value::Text(room),
                Value::Text(&message.sort),
                Value::Text(&message.id),
                Value::Text(&message.author),
                Value::Text(&message.kind),
                Value::Text(&message.preview),
                Value::Int(i64::from(message.deleted)),
                Value::Int(to_sql(message.created_ms.min(MAX_CLIENT_ID), "message time")?),
            ]);
        }
        let newer = "excluded.last_sort > chat_rooms.last_sort";
        let pick =
            |column: &str| format!("{column} = CASE WHEN {newer} THEN excluded.{column} ELSE chat_rooms.{column} END");
        let columns = [
            "last_id",
            "last_author",
            "last_kind",
            "last_text",
            "last_deleted",
            "last_at",
            "last_sort",
        ];
        writes.push(Statement::new(
            first,
            format!(
                "INSERT INTO chat_rooms (room, last_sort, last_id, last_author, last_kind, last_text, last_deleted, \
                 last_at, changed) VALUES {} ON CONFLICT (room) DO UPDATE SET {}, changed = excluded.changed",
                versioned_values(chunk.len(), 8, numbered),
                columns.map(pick).join(", ")
            ),
            chunk.len(),
            values_,
        ));
    }
    // Placeholders in the order of their values (SQLite's are anonymous, and a joined query's
    // are counted across its statements).
    let placeholders = |count: usize| -> Vec<String> {
        (1..=count)
            .map(|i| if numbered { format!("${i}") } else { "?".to_string() })
            .collect()
    };
    for (room, edit) in edits {
        // Rare (one per edit or deletion): a statement or two each.
        if edit.deleted {
            let p = placeholders(2);
            writes.push(Statement::new(
                room,
                format!(
                    "UPDATE chat_messages SET counted = 0 WHERE room = {} AND sort = {}",
                    p[0], p[1]
                ),
                1,
                vec![Value::Text(room), Value::Text(&edit.sort)],
            ));
        }
        let p = placeholders(5);
        writes.push(Statement::new(
            room,
            format!(
                "UPDATE chat_rooms SET changed = {CHAT_VERSION}, \
                 last_text = CASE WHEN last_id = {} THEN {} ELSE last_text END, \
                 last_deleted = CASE WHEN last_id = {} THEN {} ELSE last_deleted END WHERE room = {}",
                p[0], p[1], p[2], p[3], p[4]
            ),
            1,
            vec![
                Value::Text(&edit.id),
                Value::Text(&edit.preview),
                Value::Text(&edit.id),
                Value::Int(i64::from(edit.deleted)),
                Value::Text(room),
            ],
        ));
    }
    let reads: Vec<_> = reads.into_iter().collect();
    for chunk in reads.chunks(ROWS_PER_STATEMENT) {
        writes.push(Statement::new(
            first,
            format!(
                "INSERT INTO chat_reads (room, user_id, sort, changed) VALUES {} ON CONFLICT (room, user_id) \
                 DO UPDATE SET sort = CASE WHEN excluded.sort > chat_reads.sort THEN excluded.sort \
                 ELSE chat_reads.sort END, changed = excluded.changed",
                versioned_values(chunk.len(), 3, numbered)
            ),
            chunk.len(),
            chunk
                .iter()
                .flat_map(|&((room, user), sort)| [Value::Text(room), Value::Text(user), Value::Text(sort)])
                .collect(),
        ));
    }
    let members: Vec<_> = members.into_iter().collect();
    for chunk in members.chunks(ROWS_PER_STATEMENT) {
        let mut values_ = Vec::with_capacity(chunk.len() * 4);
        for &((room, user), member) in chunk {
            values_.extend([
                Value::Text(room),
                Value::Text(user),
                Value::Int(i64::from(member.joined)),
                Value::Int(to_sql(member.at_ms.min(MAX_CLIENT_ID), "membership time")?),
            ]);
        }
        writes.push(Statement::new(
            first,
            format!(
                "INSERT INTO chat_members (room, user_id, joined, at, changed) VALUES {} \
                 ON CONFLICT (room, user_id) DO UPDATE SET joined = excluded.joined, at = excluded.at, \
                 changed = excluded.changed",
                versioned_values(chunk.len(), 4, numbered)
            ),
            chunk.len(),
            values_,
        ));
    }
    Ok(writes)
}

/// Implements [`Store`] (and a few hidden test hooks) for a store struct with a `pool` field, a
/// `writer(&self)` method giving the pool write transactions run on (SQLite: one connection that
/// stays warm) and an `after_write(&self)` method, called after each committed append (SQLite
/// checkpoints its WAL from there).
///
/// * `store`: the struct;
/// * `database`: its sqlx database type;
/// * `begin_write`, `begin_read`: the statements that begin a write and a read transaction;
/// * `numbered_placeholders`: whether the multi-row statements of an append use `$n`
///   placeholders (PostgreSQL's only kind) or anonymous `?` ones (see [`values`]);
/// * `joined_statements`: whether the statements of one step of an append go to the database as
///   one query (SQLite: sqlx runs them one after another on its worker thread, one round trip to
///   that thread instead of one each; PostgreSQL takes one statement per prepared query);
/// * `write_thread` (optional): a method returning `Option<&WriteThread>`; when it gives one,
///   appends, the client's recorded changes and compaction's swap run there instead (SQLite on
///   a file, see `store::write_thread`).
///
/// See the module docs for what these statements must guarantee.
macro_rules! sql_store {
    (
        store: $store:ident,
        database: $db:ty,
        begin_write: $begin_write:literal,
        begin_read: $begin_read:literal,
        numbered_placeholders: $numbered:literal,
        joined_statements: $joined:literal,
        claim_lock: $lock:literal
        $(, write_thread: $thread:ident)? $(,)?
    ) => {
        /// The implementation of [`Store`](crate::store::Store) that both backends share (see the docs
        /// of `store::sql`).
        mod shared {
            use std::future::Future;

            use super::$store;
            use driftsync_protocol::Cursor;
            use $crate::store::sql::{
                check_counters, corrupt, device_identity, fold, from_sql, inbox_from_rows, log_entries, read_error, to_sql,
                InboxRow, INBOX, INBOX_QUERY,
                AppendPlan, ReadRow, Row, Statement, Swap, Value, CLIENT_OWNERS, DEVICE_ROW, HEADS_PER_QUERY, OUTBOX_INSERT, PRUNE_LOG,
                RECOUNT_LOG_BYTES, SWAP_SNAPSHOT, SYNC_STATE_ADVANCE,
            };
            use $crate::store::{
                Append, Appended, Compacted, CompactionPolicy, DeviceIdentity, DocMeta, LogTail, OutboxEntry, Store,
                StoredDoc,
            };
            use $crate::Result;
            use $crate::store::push;

            /// Whether multi-row statements use `$n` placeholders (see `values`).
            const NUMBERED: bool = $numbered;
            /// Whether the statements of one step of an append run as one query.
            const JOINED: bool = $joined;

            /// The connection a transaction runs on.
            type Connection = <$db as ::sqlx::Database>::Connection;

            /// Runs `statements` — all of them as one query where the backend takes several
            /// statements in one (`JOINED`), else one by one — and returns the rows they yield.
            async fn run(
                conn: &mut Connection,
                statements: Vec<Statement<'_>>,
            ) -> Result<Vec<<$db as ::sqlx::Database>::Row>> {
                let groups: Vec<Vec<Statement<'_>>> = if JOINED {
                    vec![statements]
                } else {
                    statements.into_iter().map(|statement| vec![statement]).collect()
                };
                let mut rows = Vec::new();
                for group in groups {
                    let Some(first) = group.first() else { continue };
                    let (doc, cached) = (first.doc, group.iter().all(|statement| statement.cached));
                    let sql = group
                        .iter()
                        .map(|statement| statement.sql.as_str())
                        .collect::<Vec<_>>()
                        .join("; ");
                    let mut query = ::sqlx::query(&sql).persistent(cached);
                    for value in group.iter().flat_map(|statement| &statement.values) {
                        query = match *value {
                            Value::Text(text) => query.bind(text),
                            Value::Int(int) => query.bind(int),
                            Value::Blob(blob) => query.bind(blob),
                        };
                    }
                    rows.extend(query.fetch_all(&mut *conn).await.map_err(read_error(doc))?);
                }
                Ok(rows)
            }

            /// Appends `rows` inside a write transaction (see [`AppendPlan`]), one query per step
            /// where the backend joins statements.
            async fn append_rows(
                conn: &mut Connection,
                rows: &[Row<'_>],
                push: Option<$crate::store::push::PushPlan>,
            ) -> Result<Vec<Appended>> {
                use ::sqlx::Row as _;

                let plan = AppendPlan::new(rows)?;
                let mut read = Vec::new();
                for row in run(conn, plan.reads(NUMBERED)).await? {
                    // The two statements' rows are told apart by their width.
                    let doc: String = row.try_get(0).map_err(|e| corrupt("(append)", e.to_string()))?;
                    let get = |i: usize, what: &str| -> Result<i64> {
                        row.try_get(i).map_err(|e| corrupt(&doc, format!("{what}: {e}")))
                    };
                    read.push(if row.len() == 2 {
                        ReadRow::Head { head: get(1, "head")?, doc }
                    } else {
                        ReadRow::Batch {
                            client_id: get(1, "client id")?,
                            batch: get(2, "client's last batch")?,
                            seq: get(3, "client's last cursor")?,
                            doc,
                        }
                    });
                }
                let (appended, writes) = plan.writes(read, NUMBERED, push)?;
                if !writes.is_empty() {
                    run(conn, writes).await?;
                }
                Ok(appended)
            }

            /// Binds `values` to `query` by number.
            fn bind_values<'q>(
                mut query: ::sqlx::query::Query<'q, $db, <$db as ::sqlx::Database>::Arguments<'q>>,
                values: &[Value<'q>],
            ) -> ::sqlx::query::Query<'q, $db, <$db as ::sqlx::Database>::Arguments<'q>> {
                for value in values {
                    query = match *value {
                        Value::Text(text) => query.bind(text),
                        Value::Int(int) => query.bind(int),
                        Value::Blob(blob) => query.bind(blob),
                    };
                }
                query
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
                    Ok(self.writer().begin_with($begin_write).await?)
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
                    let swap = Swap {
                        doc,
                        snapshot: &snapshot,
                        state_vector: &state_vector,
                        covered: covered_sql,
                        prune_to,
                        read_cursor,
                    };
                    let deleted = 'swap: {
                        $(if let Some(thread) = self.$thread() {
                            break 'swap thread.swap_snapshot(&swap).await?;
                        })?
                        let mut tx = self.begin_write().await?;
                        let pruned: Option<i64> = ::sqlx::query_scalar(SWAP_SNAPSHOT)
                            .bind(swap.doc)
                            .bind(swap.snapshot)
                            .bind(swap.state_vector)
                            .bind(swap.covered)
                            .bind(swap.prune_to)
                            .bind(swap.read_cursor)
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(read_error(doc))?;
                        let Some(pruned) = pruned else {
                            tx.rollback().await?;
                            break 'swap None;
                        };
                        ::sqlx::query(RECOUNT_LOG_BYTES)
                            .bind(doc)
                            .bind(covered_sql)
                            .execute(&mut *tx)
                            .await?;
                        let deleted = ::sqlx::query(PRUNE_LOG)
                            .bind(doc)
                            .bind(pruned)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        tx.commit().await?;
                        Some(deleted)
                    };
                    let Some(deleted) = deleted else { return Ok(None) };
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
                fn set_push(&self, settings: Option<$crate::store::PushSettings>) {
                    self.push.set(settings);
                }

                async fn push_pending(&self, limit: usize) -> Result<Vec<$crate::store::PendingPush>> {
                    let rows: Vec<(String, String, i64)> = ::sqlx::query_as(push::PENDING)
                        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                        .fetch_all(&self.pool)
                        .await
                        .map_err(read_error("(push outbox)"))?;
                    Ok(rows
                        .into_iter()
                        .map(|(room, user, due_at)| $crate::store::PendingPush {
                            room,
                            user,
                            due_at: u64::try_from(due_at).unwrap_or(0),
                        })
                        .collect())
                }

                async fn push_claim(
                    &self,
                    now_ms: u64,
                    lease_until_ms: u64,
                    limit: usize,
                ) -> Result<Vec<$crate::store::DueNotification>> {
                    let (now, lease, limit) = (push::ms(now_ms), push::ms(lease_until_ms), i64::try_from(limit).unwrap_or(i64::MAX));
                    $(if let Some(thread) = self.$thread() {
                        return thread
                            .write(move |tx| {
                                let sql = push::claim_sql($lock);
                                let mut statement = tx.prepare(&sql)?;
                                let rows = statement.query_map(
                                    ::rusqlite::named_params! { "$1": now, "$2": lease, "$3": limit },
                                    |row| {
                                        Ok((
                                            row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?,
                                            row.get(5)?, row.get(6)?, row.get(7)?, row.get(8)?, row.get(9)?,
                                        ))
                                    },
                                )?;
                                let mut claimed = Vec::new();
                                for row in rows {
                                    claimed.push(push::claimed(row?));
                                }
                                Ok(claimed)
                            })
                            .await;
                    })?
                    let mut tx = self.begin_write().await?;
                    let rows: Vec<(String, String, String, i64, String, String, String, i64, i64, i64)> =
                        ::sqlx::query_as(&push::claim_sql($lock))
                            .bind(now)
                            .bind(lease)
                            .bind(limit)
                            .fetch_all(&mut *tx)
                            .await
                            .map_err(read_error("(push outbox)"))?;
                    tx.commit().await?;
                    Ok(rows.into_iter().map(push::claimed).collect())
                }

                async fn push_finish(
                    &self,
                    due: &$crate::store::DueNotification,
                    outcome: &$crate::store::PushOutcome,
                    now_ms: u64,
                ) -> Result<()> {
                    $(if let Some(thread) = self.$thread() {
                        let (due, outcome) = (due.clone(), outcome.clone());
                        return thread
                            .write(move |tx| {
                                for (sql, values) in push::finish_statements(&due, &outcome, now_ms) {
                                    $crate::store::write_thread::execute_named(tx, sql, &values)?;
                                }
                                Ok(())
                            })
                            .await;
                    })?
                    let mut tx = self.begin_write().await?;
                    for (sql, values) in push::finish_statements(due, outcome, now_ms) {
                        bind_values(::sqlx::query(sql), &values).execute(&mut *tx).await?;
                    }
                    tx.commit().await?;
                    Ok(())
                }

                async fn push_seen(&self, seen: &[(String, String)], users: &[String]) -> Result<()> {
                    if seen.is_empty() && users.is_empty() {
                        return Ok(());
                    }
                    $(if let Some(thread) = self.$thread() {
                        let (seen, users) = (seen.to_vec(), users.to_vec());
                        return thread
                            .write(move |tx| {
                                for (sql, values) in push::seen_statements(&seen, &users) {
                                    $crate::store::write_thread::execute_named(tx, sql, &values)?;
                                }
                                Ok(())
                            })
                            .await;
                    })?
                    let mut tx = self.begin_write().await?;
                    for (sql, values) in push::seen_statements(seen, users) {
                        bind_values(::sqlx::query(sql), &values).execute(&mut *tx).await?;
                    }
                    tx.commit().await?;
                    Ok(())
                }

                async fn push_stopped(&self, limit: usize) -> Result<Vec<String>> {
                    ::sqlx::query_scalar(push::STOPPED)
                        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                        .fetch_all(&self.pool)
                        .await
                        .map_err(read_error("(push outbox)"))
                }

                async fn push_stats(&self) -> Result<$crate::store::PushStats> {
                    let (pending, dead, oldest): (i64, i64, Option<i64>) = ::sqlx::query_as(push::STATS)
                        .fetch_one(&self.pool)
                        .await
                        .map_err(read_error("(push outbox)"))?;
                    Ok($crate::store::PushStats {
                        pending: u64::try_from(pending).unwrap_or(0),
                        dead: u64::try_from(dead).unwrap_or(0),
                        oldest_created_ms: oldest.and_then(|oldest| u64::try_from(oldest).ok()),
                    })
                }

                async fn append(&self, batch: &[Append]) -> Result<Vec<Appended>> {
                    if batch.is_empty() {
                        return Ok(Vec::new());
                    }
                    let push = self.push.plan();
                    $(if let Some(thread) = self.$thread() {
                        let appended = thread.append(batch.to_vec(), push).await?;
                        self.after_write();
                        return Ok(appended);
                    })?
                    let rows: Vec<Row<'_>> = batch.iter().map(Row::from).collect();
                    let mut tx = self.begin_write().await?;
                    let appended = append_rows(&mut tx, &rows, push).await?;
                    tx.commit().await?;
                    self.after_write();
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

                /// One query per [`HEADS_PER_QUERY`] documents.
                async fn inbox(&self, user: &str, since: u64) -> Result<$crate::store::Inbox> {
                    let since_sql = to_sql(since, "inbox version")?;
                    let mut tx = self.begin_read().await?;
                    // The version first: in one snapshot, every change up to it is visible.
                    let (version,): (i64,) = ::sqlx::query_as("SELECT version FROM chat_version WHERE id = 1")
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(read_error(INBOX))?;
                    let rows: Vec<InboxRow> = ::sqlx::query_as(INBOX_QUERY)
                        .bind(user)
                        .bind(since_sql)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(read_error(INBOX))?;
                    tx.commit().await?;
                    inbox_from_rows(version, rows)
                }

                async fn members(&self, room: &str) -> Result<Vec<$crate::store::RoomMember>> {
                    let rows: Vec<(String, i64, i64, Option<i64>)> = ::sqlx::query_as(
                        "SELECT m.user_id, m.joined, m.at, s.at FROM chat_members m \
                         LEFT JOIN user_seen s ON s.user_id = m.user_id WHERE m.room = $1 ORDER BY m.user_id \
                         LIMIT 10000",
                    )
                    .bind(room)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(read_error(room))?;
                    rows.into_iter()
                        .map(|(user, joined, at, seen)| {
                            Ok($crate::store::RoomMember {
                                user,
                                joined: joined != 0,
                                at_ms: from_sql(at, room, "membership time")?,
                                last_seen_ms: seen.map(|seen| from_sql(seen, room, "last seen")).transpose()?,
                            })
                        })
                        .collect()
                }

                async fn set_seen(&self, seen: &[(String, u64)]) -> Result<()> {
                    if seen.is_empty() {
                        return Ok(());
                    }
                    let mut tx = self.pool.begin().await?;
                    for (user, at) in seen {
                        ::sqlx::query(
                            "INSERT INTO user_seen (user_id, at) VALUES ($1, $2) ON CONFLICT (user_id) \
                             DO UPDATE SET at = CASE WHEN excluded.at > user_seen.at THEN excluded.at ELSE user_seen.at END",
                        )
                        .bind(user.as_str())
                        .bind(to_sql(*at, "last seen")?)
                        .execute(&mut *tx)
                        .await
                        .map_err(read_error(INBOX))?;
                    }
                    tx.commit().await?;
                    Ok(())
                }

                async fn heads(&self, docs: &[&str]) -> Result<Vec<Cursor>> {
                    let mut found: ::std::collections::HashMap<String, Cursor> =
                        ::std::collections::HashMap::with_capacity(docs.len());
                    for chunk in docs.chunks(HEADS_PER_QUERY) {
                        let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
                        let sql = format!(
                            "SELECT doc, head FROM documents WHERE doc IN ({})",
                            placeholders.join(", ")
                        );
                        let mut query = ::sqlx::query_as::<_, (String, i64)>(&sql);
                        for doc in chunk {
                            query = query.bind(*doc);
                        }
                        let rows = query.fetch_all(&self.pool).await.map_err(read_error("(heads)"))?;
                        for (doc, head) in rows {
                            let head = from_sql(head, &doc, "head")?;
                            found.insert(doc, head);
                        }
                    }
                    Ok(docs.iter().map(|doc| found.get(*doc).copied().unwrap_or(0)).collect())
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

                async fn claim_client(&self, client_id: u64, owner: &str) -> Result<String> {
                    const SELECT: &str = "SELECT owner FROM client_owners WHERE client_id = $1";
                    let id = to_sql(client_id, "client id")?;
                    // Bound already (the usual case: every later connection of the same writer).
                    let bound: Option<String> = ::sqlx::query_scalar(SELECT)
                        .bind(id)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(read_error(CLIENT_OWNERS))?;
                    if let Some(bound) = bound {
                        return Ok(bound);
                    }
                    // First use: bind it unless a concurrent caller (maybe on another instance)
                    // just did, then read whichever won, so that every caller gets the same owner.
                    let mut tx = self.begin_write().await?;
                    ::sqlx::query(
                        "INSERT INTO client_owners (client_id, owner) VALUES ($1, $2) \
                         ON CONFLICT (client_id) DO NOTHING",
                    )
                    .bind(id)
                    .bind(owner)
                    .execute(&mut *tx)
                    .await?;
                    let bound: Option<String> = ::sqlx::query_scalar(SELECT)
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(read_error(CLIENT_OWNERS))?;
                    tx.commit().await?;
                    bound.ok_or_else(|| corrupt(CLIENT_OWNERS, "a client id's owner is missing right after it was bound"))
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
                    $(if let Some(thread) = self.$thread() {
                        let batch = thread.record_local(doc, update).await?;
                        self.after_write();
                        return Ok(batch);
                    })?
                    let mut tx = self.begin_write().await?;
                    append_rows(
                        &mut tx,
                        &[Row {
                            doc,
                            origin: None,
                            update,
                            chat: None,
                        }],
                        None,
                    )
                    .await?;
                    let batch: i64 =
                        ::sqlx::query_scalar(OUTBOX_INSERT)
                            .bind(doc)
                            .bind(update)
                            .fetch_one(&mut *tx)
                            .await
                            .map_err(read_error(doc))?;
                    let batch = from_sql(batch, doc, "outbox batch")?;
                    tx.commit().await?;
                    self.after_write();
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
                    $(if let Some(thread) = self.$thread() {
                        thread.record_remote(doc, cursor, updates).await?;
                        self.after_write();
                        return Ok(());
                    })?
                    let mut tx = self.begin_write().await?;
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
                        append_rows(&mut tx, &rows, None).await?;
                    }
                    ::sqlx::query(SYNC_STATE_ADVANCE)
                    .bind(doc)
                    .bind(cursor)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    self.after_write();
                    Ok(())
                }
            }
        }
    };
}

pub(super) use sql_store;
