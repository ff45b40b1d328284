//! [`AnyStore`], which picks a backend from a URL at run time, for binaries that take a
//! database URL.

use super::{
    Append, Appended, Compacted, CompactionPolicy, DeviceIdentity, DocMeta, DueNotification, LogTail, OutboxEntry,
    PendingPush, PgStore, PushOutcome, PushSettings, PushStats, SqliteStore, Store, StoredDoc,
};
use crate::{Error, Result};
use driftsync_protocol::Cursor;

/// A store whose backend is chosen at run time, for binaries that take a database URL.
#[derive(Debug)]
pub enum AnyStore {
    /// An embedded SQLite database.
    Sqlite(SqliteStore),
    /// A PostgreSQL database, possibly shared by several server instances.
    Postgres(PgStore),
}

impl AnyStore {
    /// Opens the store that `url_or_path` names:
    ///
    /// * `postgres://…` or `postgresql://…`: PostgreSQL ([`PgStore::connect`]);
    /// * `sqlite:…`: SQLite through a sqlx URL ([`SqliteStore::connect`]), for example
    ///   `sqlite:data/app.db` or `sqlite::memory:`;
    /// * anything else without a `scheme://` prefix: the path of an SQLite database file, created
    ///   with its parent directories if missing ([`SqliteStore::open`]).
    ///
    /// Any other URL scheme is [`Error::UnsupportedUrl`].
    pub async fn open(url_or_path: &str) -> Result<Self> {
        if url_or_path.starts_with("postgres://") || url_or_path.starts_with("postgresql://") {
            Ok(AnyStore::Postgres(PgStore::connect(url_or_path).await?))
        } else if url_or_path.starts_with("sqlite:") {
            Ok(AnyStore::Sqlite(SqliteStore::connect(url_or_path).await?))
        } else if url_or_path.contains("://") || url_or_path.is_empty() {
            Err(Error::UnsupportedUrl(url_or_path.to_string()))
        } else {
            Ok(AnyStore::Sqlite(SqliteStore::open(url_or_path).await?))
        }
    }
}

/// Runs the same call on whichever store `self` holds.
macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($store) => $call,
            AnyStore::Postgres($store) => $call,
        }
    };
}

impl Store for AnyStore {
    fn set_push(&self, settings: Option<PushSettings>) {
        dispatch!(self, s => s.set_push(settings))
    }

    async fn push_pending(&self, limit: usize) -> Result<Vec<PendingPush>> {
        dispatch!(self, s => s.push_pending(limit).await)
    }

    async fn push_claim(&self, now_ms: u64, lease_until_ms: u64, limit: usize) -> Result<Vec<DueNotification>> {
        dispatch!(self, s => s.push_claim(now_ms, lease_until_ms, limit).await)
    }

    async fn push_finish(&self, due: &DueNotification, outcome: &PushOutcome, now_ms: u64) -> Result<()> {
        dispatch!(self, s => s.push_finish(due, outcome, now_ms).await)
    }

    async fn push_seen(&self, seen: &[(String, String)], users: &[String]) -> Result<()> {
        dispatch!(self, s => s.push_seen(seen, users).await)
    }

    async fn push_stopped(&self, limit: usize) -> Result<Vec<String>> {
        dispatch!(self, s => s.push_stopped(limit).await)
    }

    async fn push_stats(&self) -> Result<PushStats> {
        dispatch!(self, s => s.push_stats().await)
    }

    async fn append(&self, batch: &[Append]) -> Result<Vec<Appended>> {
        dispatch!(self, s => s.append(batch).await)
    }

    async fn load(&self, doc: &str) -> Result<Option<StoredDoc>> {
        dispatch!(self, s => s.load(doc).await)
    }

    async fn log_after(&self, doc: &str, after: Cursor) -> Result<LogTail> {
        dispatch!(self, s => s.log_after(doc, after).await)
    }

    async fn meta(&self, doc: &str) -> Result<Option<DocMeta>> {
        dispatch!(self, s => s.meta(doc).await)
    }

    async fn heads(&self, docs: &[&str]) -> Result<Vec<Cursor>> {
        dispatch!(self, s => s.heads(docs).await)
    }

    async fn compact(&self, doc: &str, policy: &CompactionPolicy) -> Result<Option<Compacted>> {
        dispatch!(self, s => s.compact(doc, policy).await)
    }

    async fn documents(&self) -> Result<Vec<String>> {
        dispatch!(self, s => s.documents().await)
    }

    async fn claim_client(&self, client_id: u64, owner: &str) -> Result<String> {
        dispatch!(self, s => s.claim_client(client_id, owner).await)
    }

    async fn inbox(&self, user: &str, since: u64) -> Result<super::Inbox> {
        dispatch!(self, s => s.inbox(user, since).await)
    }

    async fn members(&self, room: &str) -> Result<Vec<super::RoomMember>> {
        dispatch!(self, s => s.members(room).await)
    }

    async fn set_seen(&self, seen: &[(String, u64)]) -> Result<()> {
        dispatch!(self, s => s.set_seen(seen).await)
    }

    async fn device(&self) -> Result<DeviceIdentity> {
        dispatch!(self, s => s.device().await)
    }

    async fn record_local(&self, doc: &str, update: &[u8]) -> Result<u64> {
        dispatch!(self, s => s.record_local(doc, update).await)
    }

    async fn outbox(&self, doc: Option<&str>) -> Result<Vec<OutboxEntry>> {
        dispatch!(self, s => s.outbox(doc).await)
    }

    async fn acknowledge(&self, doc: &str, batch: u64) -> Result<()> {
        dispatch!(self, s => s.acknowledge(doc, batch).await)
    }

    async fn server_cursor(&self, doc: &str) -> Result<Cursor> {
        dispatch!(self, s => s.server_cursor(doc).await)
    }

    async fn record_remote(&self, doc: &str, cursor: Cursor, updates: &[Vec<u8>]) -> Result<()> {
        dispatch!(self, s => s.record_remote(doc, cursor, updates).await)
    }
}
