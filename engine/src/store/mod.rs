//! Durable storage of documents: an append-only update log per document with a store-assigned
//! cursor, a snapshot that compaction folds the log into, and, for clients, an outbox of local
//! changes the server has not acknowledged yet plus the last server cursor seen per document.
//!
//! Two implementations through sqlx: [`SqliteStore`] (the embedded default, WAL mode) and
//! [`PgStore`] (for servers, several instances may share one database). [`AnyStore`] picks one
//! at run time from a URL.
//!
//! The store moves bytes; it never interprets an update except during [`Store::compact`] and in
//! [`load_document`](crate::doc::load_document), where an undecodable row becomes [`Error::Corrupt`] naming the document —
//! never a panic and never a silently empty document.
//!
//! Architecture invariant: a cursor is assigned inside the transaction that stores the update,
//! from the document's `head` row read under a lock that serialises appends to one document
//! across server instances (and written back in the same transaction), so cursors of one
//! document are gap-free and increase in commit order.

mod any;
mod postgres;
mod push;
mod sql;
mod sqlite;
mod write_thread;

use std::future::Future;

pub use any::AnyStore;
pub use postgres::PgStore;
pub use push::{DueNotification, PendingPush, PushOutcome, PushSettings, PushStats};
pub use sqlite::SqliteStore;

#[allow(unused_imports)] // `Error` is named in the docs.
use crate::{Error, Result};
use driftsync_protocol::Cursor;

/// Where an appended update came from, for deduplicating a batch a client re-sends after a lost
/// acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The pushing client's yrs client id.
    pub client_id: u64,
    /// The client's batch id; increasing per client and document.
    pub batch: u64,
}

/// One update to append to a document's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    /// The document.
    pub doc: String,
    /// The pushing client's batch, if the update came from a client push (`None` for local edits
    /// and server-generated updates: never deduplicated).
    pub origin: Option<Origin>,
    /// A yrs v1 update.
    pub update: Vec<u8>,
    /// In a chat room: what the update does that the chat index keeps (messages, receipts,
    /// membership; see [`ChatFacts`](crate::chat::ChatFacts)), written in the transaction that
    /// stores it. `None` elsewhere.
    pub chat: Option<Box<crate::chat::ChatFacts>>,
}

/// What became of one [`Append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored at this cursor.
    Stored(Cursor),
    /// The same client already pushed this batch (or a later one) for this document: nothing was
    /// stored. The cursor is that of the client's latest stored batch, at or after the original.
    Duplicate(Cursor),
}

impl Appended {
    /// The cursor the update is stored at (or, for a duplicate, at or before).
    pub fn cursor(self) -> Cursor {
        match self {
            Appended::Stored(c) | Appended::Duplicate(c) => c,
        }
    }
}

/// A room's last message, as the chat index keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastMessage {
    /// Its id.
    pub id: String,
    /// Its sort key.
    pub sort: String,
    /// Its author.
    pub author: String,
    /// Its kind.
    pub kind: String,
    /// The start of its text.
    pub text: String,
    /// Deleted.
    pub deleted: bool,
    /// Its sender's clock at sending (milliseconds).
    pub at_ms: u64,
}

/// One room of a user's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxRoom {
    /// The room (a `chat/` document id).
    pub room: String,
    /// Whether the user is a member (`false`: they left).
    pub joined: bool,
    /// When they joined or left.
    pub at_ms: u64,
    /// The room's last message, if any.
    pub last: Option<LastMessage>,
    /// Messages of others after the user's read receipt, neither deleted nor system.
    pub unread: u64,
    /// The sort key the user has read up to (`""`: nothing).
    pub read_sort: String,
}

/// A user's inbox, or what changed in it (see [`Store::inbox`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inbox {
    /// The index version it is current at: ask for changes after it next time.
    pub version: u64,
    /// The rooms, most recently active first.
    pub rooms: Vec<InboxRoom>,
}

/// A member of a room as the chat index keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomMember {
    /// The user.
    pub user: String,
    /// Joined (`false`: left).
    pub joined: bool,
    /// When they joined or left (their clock).
    pub at_ms: u64,
    /// When a connection of theirs was last seen (the server's clock), if ever.
    pub last_seen_ms: Option<u64>,
}

/// One entry of a document's update log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Its cursor.
    pub cursor: Cursor,
    /// The yrs v1 update.
    pub update: Vec<u8>,
}

/// A document as stored: the snapshot and the log entries after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredDoc {
    /// The snapshot (a yrs v1 update holding the state up to `snapshot_cursor`), if any.
    pub snapshot: Option<Vec<u8>>,
    /// The cursor the snapshot covers (0 without a snapshot).
    pub snapshot_cursor: Cursor,
    /// Log entries after `snapshot_cursor`, in cursor order.
    pub tail: Vec<LogEntry>,
    /// The document's last assigned cursor.
    pub head: Cursor,
}

/// Log entries after a cursor, for a resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTail {
    /// Every entry after the cursor, in order (possibly none).
    Entries(Vec<LogEntry>),
    /// Entries after the cursor were already folded into the snapshot and deleted; the caller
    /// must fall back to a state-vector diff.
    Pruned,
}

/// Bookkeeping of one document, cheap to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DocMeta {
    /// Last assigned cursor.
    pub head: Cursor,
    /// Cursor covered by the snapshot.
    pub snapshot_cursor: Cursor,
    /// Encoded size of the snapshot in bytes.
    pub snapshot_bytes: u64,
    /// Total size of the log entries after the snapshot, in bytes.
    pub log_bytes: u64,
    /// Log entries up to this cursor have been deleted.
    pub pruned_through: Cursor,
}

/// When and how to compact a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Compact once the log after the snapshot holds more bytes than the snapshot and at least
    /// this many bytes.
    pub min_log_bytes: u64,
    /// Keep this many of the newest log entries after compacting, so that clients a little
    /// behind still resume with a cheap log tail instead of a state-vector diff.
    pub retain_entries: u64,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            min_log_bytes: 64 * 1024,
            retain_entries: 1024,
        }
    }
}

impl CompactionPolicy {
    /// Whether a document with this bookkeeping should be compacted now.
    pub fn due(&self, meta: &DocMeta) -> bool {
        meta.log_bytes >= self.min_log_bytes && meta.log_bytes > meta.snapshot_bytes
    }
}

/// What a compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// The cursor the new snapshot covers.
    pub snapshot_cursor: Cursor,
    /// Size of the new snapshot in bytes.
    pub snapshot_bytes: u64,
    /// Number of log entries deleted.
    pub deleted_entries: u64,
}

/// A device's identity in a client store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// The yrs client id every local edit of this device is made with: random, below 2^53,
    /// created once per store and never reused elsewhere.
    pub client_id: u64,
    /// A random device id (UUID) for receipts and chat messages.
    pub device_id: String,
}

/// One unacknowledged local change in a client's outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The document.
    pub doc: String,
    /// The batch id it is pushed with; increasing over the whole store.
    pub batch: u64,
    /// The yrs v1 update.
    pub update: Vec<u8>,
}

/// The storage interface shared by servers and clients. Every method is one transaction.
pub trait Store: Send + Sync + 'static {
    /// Appends updates to their documents' logs in ONE transaction (group commit) and returns
    /// what became of each, in order. Either all are durable when this returns `Ok`, or none.
    fn append(&self, batch: &[Append]) -> impl Future<Output = Result<Vec<Appended>>> + Send;

    /// Loads a document's snapshot and log tail (`None` if it was never stored).
    fn load(&self, doc: &str) -> impl Future<Output = Result<Option<StoredDoc>>> + Send;

    /// The log entries after `after`, or [`LogTail::Pruned`] if some were deleted by compaction.
    fn log_after(&self, doc: &str, after: Cursor) -> impl Future<Output = Result<LogTail>> + Send;

    /// A document's bookkeeping (`None` if it was never stored).
    fn meta(&self, doc: &str) -> impl Future<Output = Result<Option<DocMeta>>> + Send;

    /// The heads of several documents, in the order given (0 for one never stored): what a
    /// server instance compares its live rooms with to catch up on what other instances
    /// stored. The SQL stores answer in one query per few hundred documents.
    fn heads(&self, docs: &[&str]) -> impl Future<Output = Result<Vec<Cursor>>> + Send {
        async move {
            let mut heads = Vec::with_capacity(docs.len());
            for doc in docs {
                heads.push(self.meta(doc).await?.map_or(0, |meta| meta.head));
            }
            Ok(heads)
        }
    }

    /// Folds the log into the snapshot (see the module docs). Updates appended while it runs are
    /// kept in the log. Returns `None` when there was nothing to fold.
    fn compact(&self, doc: &str, policy: &CompactionPolicy) -> impl Future<Output = Result<Option<Compacted>>> + Send;

    /// Ids of every stored document.
    fn documents(&self) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// Binds the yrs client id `client_id` to `owner` unless it is bound already, and returns
    /// its owner — `owner` if this call bound it or it was `owner`'s already, someone else's
    /// otherwise. First use wins, durably and for every instance sharing the store; a binding is
    /// never changed. (Server side: see ARCHITECTURE.md, "Authorship".)
    fn claim_client(&self, client_id: u64, owner: &str) -> impl Future<Output = Result<String>> + Send;

    /// A user's inbox from the chat index (server side, see [`Append::chat`]): the rooms they
    /// belong to whose entry changed after index version `since`, most recently active first,
    /// with the index's version to ask from next time. With `since` 0, every room they are a
    /// member of; later, rooms they left too (`joined: false`), so that a device drops them.
    fn inbox(&self, user: &str, since: u64) -> impl Future<Output = Result<Inbox>> + Send {
        let _ = (user, since);
        async { Err(crate::Error::Invalid("this store keeps no chat index".into())) }
    }

    /// The members of a chat room (joined or left) with when each was last seen connected, in
    /// user order, the first 10,000 (an answer stays within a frame).
    fn members(&self, room: &str) -> impl Future<Output = Result<Vec<RoomMember>>> + Send {
        let _ = room;
        async { Err(crate::Error::Invalid("this store keeps no chat index".into())) }
    }

    /// Records when users were last seen connected (`(user, ms since the Unix epoch)`); an
    /// earlier time never replaces a later one.
    fn set_seen(&self, seen: &[(String, u64)]) -> impl Future<Output = Result<()>> + Send {
        let _ = seen;
        async { Ok(()) }
    }

    // ----- server side: the push outbox (ARCHITECTURE.md, "Push notifications") -----

    /// Turns the push outbox on (`Some`) or off: while on, every append that stores chat
    /// messages writes, in its own transaction, a due notification for each joined member of
    /// the room other than the author (coalesced per room and member). Off by default; a
    /// store without an outbox ignores it.
    fn set_push(&self, settings: Option<PushSettings>) {
        let _ = settings;
    }

    /// Up to `limit` pending notifications, next due first (what a server instance checks
    /// against the members connected to it, and how long it may sleep).
    fn push_pending(&self, limit: usize) -> impl Future<Output = Result<Vec<PendingPush>>> + Send {
        let _ = limit;
        async { Ok(Vec::new()) }
    }

    /// Claims up to `limit` notifications due at `now_ms` (ms since the Unix epoch) for one
    /// attempt each, leased until `lease_until_ms`: no other claim gets them meanwhile (several
    /// instances on one PostgreSQL share the work, each notification going to one).
    fn push_claim(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DueNotification>>> + Send {
        let _ = (now_ms, lease_until_ms, limit);
        async { Ok(Vec::new()) }
    }

    /// Records what became of an attempt at a claimed notification.
    fn push_finish(
        &self,
        due: &DueNotification,
        outcome: &PushOutcome,
        now_ms: u64,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (due, outcome, now_ms);
        async { Ok(()) }
    }

    /// Members connected to rooms (`(room, user)`): nothing is owed to them there. `users`:
    /// users connected again, whose 410 stop ends.
    fn push_seen(&self, seen: &[(String, String)], users: &[String]) -> impl Future<Output = Result<()>> + Send {
        let _ = (seen, users);
        async { Ok(()) }
    }

    /// Users stopped by a 410 (at most `limit`).
    fn push_stopped(&self, limit: usize) -> impl Future<Output = Result<Vec<String>>> + Send {
        let _ = limit;
        async { Ok(Vec::new()) }
    }

    /// Counts of the outbox, for metrics.
    fn push_stats(&self) -> impl Future<Output = Result<PushStats>> + Send {
        async { Ok(PushStats::default()) }
    }

    // ----- client side -----

    /// This store's device identity, created on first call (random client id below 2^53, random
    /// device id) and the same forever after.
    fn device(&self) -> impl Future<Output = Result<DeviceIdentity>> + Send;

    /// Records a local change: appends it to the document's log and to the outbox in one
    /// transaction. Returns its batch id.
    fn record_local(&self, doc: &str, update: &[u8]) -> impl Future<Output = Result<u64>> + Send;

    /// Unacknowledged local changes, oldest first, optionally of one document only.
    fn outbox(&self, doc: Option<&str>) -> impl Future<Output = Result<Vec<OutboxEntry>>> + Send;

    /// The server acknowledged `batch` of `doc`: removes it (and any older batch of that document)
    /// from the outbox.
    fn acknowledge(&self, doc: &str, batch: u64) -> impl Future<Output = Result<()>> + Send;

    /// The last server cursor seen for a document (0 if none).
    fn server_cursor(&self, doc: &str) -> impl Future<Output = Result<Cursor>> + Send;

    /// Advances the last server cursor seen for a document (never moves it backwards), and
    /// appends the updates received with it, in one transaction.
    fn record_remote(&self, doc: &str, cursor: Cursor, updates: &[Vec<u8>]) -> impl Future<Output = Result<()>> + Send;
}
