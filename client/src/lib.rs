//! The driftsync client library: an offline-first replica of documents on a local SQLite store.
//!
//! Every local change is applied to its in-memory yrs document and written to the store (its log
//! and its outbox) before the call returns, so nothing the application saw is lost if the process
//! dies. [`Client::sync_once`] connects to a server, resumes every known document in one round
//! trip, applies what the server sends, pushes the outbox and waits until every push is
//! acknowledged; a [`Session`] keeps the documents in sync for as long as it runs. Both drive
//! one protocol state machine (the hidden `machine` module: no I/O, frames in, actions out) over
//! a [`Transport`] (a WebSocket, or an in-memory channel pair in tests).
//!
//! Documents are loaded lazily from the store on first use and cached; a document counts as
//! known (and is resumed by a sync) once it is stored or has been opened by any call.

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

mod backoff;
mod error;
mod live;
#[doc(hidden)]
pub mod machine;
mod sync;
mod tls;
mod transport;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use driftsync_engine::chat::{Author, ChatRoom, Message, NewMessage, Reactions, Receipt, MESSAGES_ROOT};
use driftsync_engine::doc::{self, decode_update, is_empty_update, load_document};
use driftsync_engine::store::{DeviceIdentity, SqliteStore, Store};
use driftsync_protocol::DocId;
use yrs::branch::BranchID;
use yrs::{ClientID, Doc, Map, Out, Transact};

pub use backoff::{retry, Backoff};
pub use error::{Error, Result};
pub use live::{
    ConnectFuture, ConnectionState, Event, Events, Options, Session, TokenFuture, TYPING_THROTTLE, TYPING_TIMEOUT,
};
pub use sync::{SyncReport, MAX_ASSEMBLED_ANSWER, SYNC_TIMEOUT};
pub use tls::Tls;
pub use transport::{Incoming, MemoryTransport, Transport, TransportFuture, WebSocketTransport};

/// A replica of documents on one local store, acting for one user.
pub struct Client {
    store: SqliteStore,
    identity: DeviceIdentity,
    author: Author,
    docs: HashMap<String, Doc>,
    rooms: HashMap<String, ChatRoom>,
    /// Documents this client changed by itself while applying what the server sent (delivery
    /// receipts): the driver pushes them ([`Client::take_own_changes`]).
    own_changes: BTreeSet<String>,
    /// Per chat room, its clock when its delivery receipt was last brought up to date.
    delivered_clock: HashMap<String, driftsync_engine::clock::Hlc>,
}

/// Documents whose ids start with this are chat rooms (the server's `CHAT_PREFIX`).
pub const CHAT_PREFIX: &str = "chat/";

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("identity", &self.identity)
            .field("user", &self.author.user)
            .finish_non_exhaustive()
    }
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Client {
    /// Opens (or creates) the store at `path` and acts as `user` on this device.
    pub async fn open(path: impl AsRef<Path>, user: &str) -> Result<Client> {
        if user.is_empty() {
            return Err(Error::Invalid("the user id is empty".into()));
        }
        let store = SqliteStore::open(path).await?;
        let identity = store.device().await?;
        let author = Author {
            user: user.to_string(),
            device: identity.device_id.clone(),
        };
        Ok(Client {
            store,
            identity,
            author,
            docs: HashMap::new(),
            rooms: HashMap::new(),
            own_changes: BTreeSet::new(),
            delivered_clock: HashMap::new(),
        })
    }

    /// This device's identity (its yrs client id and device id).
    pub fn identity(&self) -> &DeviceIdentity {
        &self.identity
    }

    /// The user this client acts for.
    pub fn user(&self) -> &str {
        &self.author.user
    }

    /// The underlying store.
    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    /// The document `id`, loaded from the store on first use and cached afterwards.
    pub async fn document(&mut self, id: &str) -> Result<Doc> {
        if let Some(doc) = self.docs.get(id) {
            return Ok(doc.clone());
        }
        DocId::new(id).map_err(Error::DocId)?;
        let stored = self.store.load(id).await?.unwrap_or_default();
        let doc = load_document(id, &stored, self.identity.client_id)?;
        self.docs.insert(id.to_string(), doc.clone());
        Ok(doc)
    }

    /// Ids of every known document: the stored ones and the ones opened in this session.
    pub async fn documents(&self) -> Result<Vec<String>> {
        let mut all = self.store.documents().await?;
        all.extend(self.docs.keys().cloned());
        all.sort();
        all.dedup();
        Ok(all)
    }

    /// Writes a local change to the store (log and outbox). Empty updates are skipped.
    async fn record(&self, doc: &str, update: &[u8]) -> Result<Option<u64>> {
        if is_empty_update(update) {
            return Ok(None);
        }
        Ok(Some(self.store.record_local(doc, update).await?))
    }

    // ----- text -----

    /// Inserts `text` at `pos` (UTF-16 code units) into the document's root text.
    pub async fn text_insert(&mut self, doc: &str, pos: u32, text: &str) -> Result<()> {
        let d = self.document(doc).await?;
        let update = doc::text_insert(&d, pos, text)?;
        self.record(doc, &update).await?;
        Ok(())
    }

    /// Appends `text` to the document's root text.
    pub async fn text_append(&mut self, doc: &str, text: &str) -> Result<()> {
        let d = self.document(doc).await?;
        let end = doc::text_len(&d);
        let update = doc::text_insert(&d, end, text)?;
        self.record(doc, &update).await?;
        Ok(())
    }

    /// Deletes `len` code units at `pos` from the document's root text.
    pub async fn text_delete(&mut self, doc: &str, pos: u32, len: u32) -> Result<()> {
        let d = self.document(doc).await?;
        let update = doc::text_delete(&d, pos, len)?;
        self.record(doc, &update).await?;
        Ok(())
    }

    /// The document's root text.
    pub async fn text(&mut self, doc: &str) -> Result<String> {
        let d = self.document(doc).await?;
        Ok(doc::text(&d))
    }

    // ----- map -----

    /// Sets `key` in the document's root map (the `Y.Map` named `map`) to a JSON value.
    pub async fn map_set(&mut self, doc: &str, key: &str, value: serde_json::Value) -> Result<()> {
        let d = self.document(doc).await?;
        let value: yrs::Any =
            serde_json::from_value(value).map_err(|e| Error::Invalid(format!("value for {key}: {e}")))?;
        let update = doc::map_set(&d, key, value);
        self.record(doc, &update).await?;
        Ok(())
    }

    /// Removes `key` from the document's root map.
    pub async fn map_remove(&mut self, doc: &str, key: &str) -> Result<()> {
        let d = self.document(doc).await?;
        let update = doc::map_remove(&d, key);
        self.record(doc, &update).await?;
        Ok(())
    }

    /// Every plain value in the document's root map, as JSON (nested shared types are skipped).
    pub async fn map(&mut self, doc: &str) -> Result<BTreeMap<String, serde_json::Value>> {
        let d = self.document(doc).await?;
        let map = d.get_or_insert_map(doc::MAP_ROOT);
        let txn = d.transact();
        Ok(map
            .iter(&txn)
            .filter_map(|(key, value)| match value {
                Out::Any(any) => serde_json::to_value(&any).ok().map(|v| (key.to_string(), v)),
                _ => None,
            })
            .collect())
    }

    // ----- chat -----

    /// The chat room over document `room`, created on first use.
    async fn room(&mut self, room: &str) -> Result<&ChatRoom> {
        if !self.rooms.contains_key(room) {
            let doc = self.document(room).await?;
            self.rooms.insert(room.to_string(), ChatRoom::new(doc));
        }
        self.rooms
            .get(room)
            .ok_or_else(|| Error::Invalid(format!("chat room {room} is not open")))
    }

    /// Sends a message with a kind, metadata, attachments or a reply; returns its id.
    pub async fn chat_send_message(&mut self, room: &str, message: &NewMessage) -> Result<String> {
        let author = self.author.clone();
        let (id, update) = self.room(room).await?.send_message(&author, message, now_ms())?;
        self.record(room, &update).await?;
        Ok(id)
    }

    /// Adds (or with `add == false` takes back) this user's `reaction` to message `id`; returns
    /// whether anything changed.
    pub async fn chat_react(&mut self, room: &str, id: &str, reaction: &str, add: bool) -> Result<bool> {
        let author = self.author.clone();
        let update = self.room(room).await?.react(&author, id, reaction, add, now_ms())?;
        match update {
            Some(update) => {
                self.record(room, &update).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Joins chat room `room` (works offline: the server announces it with a system message
    /// when it arrives); returns whether anything changed (`false`: a member already).
    pub async fn chat_join(&mut self, room: &str) -> Result<bool> {
        self.membership(room, true).await
    }

    /// Leaves chat room `room`; returns whether anything changed (`false`: not a member).
    pub async fn chat_leave(&mut self, room: &str) -> Result<bool> {
        self.membership(room, false).await
    }

    async fn membership(&mut self, room: &str, join: bool) -> Result<bool> {
        if !room.starts_with(CHAT_PREFIX) {
            return Err(Error::Invalid(format!(
                "{room} is not a chat room (they start with {CHAT_PREFIX})"
            )));
        }
        let author = self.author.clone();
        let chat = self.room(room).await?;
        let update = if join {
            chat.join(&author, now_ms())
        } else {
            chat.leave(&author, now_ms())
        };
        match update {
            Some(update) => {
                self.record(room, &update).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The members of chat room `room` as this device knows them (joined or left, with when).
    pub async fn chat_members(&mut self, room: &str) -> Result<Vec<driftsync_engine::chat::Member>> {
        Ok(self.room(room).await?.members())
    }

    /// Replaces the metadata and attachments of one of this user's messages.
    pub async fn chat_set_details(
        &mut self,
        room: &str,
        id: &str,
        metadata: &BTreeMap<String, String>,
        attachments: &[driftsync_engine::chat::Attachment],
    ) -> Result<()> {
        let author = self.author.clone();
        let update = self
            .room(room)
            .await?
            .set_details(&author, id, metadata, attachments, now_ms())?;
        self.record(room, &update).await?;
        Ok(())
    }

    /// After messages arrived from the server in chat room `room`: records that this device
    /// has them (a delivery receipt up to the latest message of another user), if that moves
    /// its receipt. The change is pushed like any other ([`Client::take_own_changes`]).
    pub(crate) async fn note_delivered(&mut self, room: &str) -> Result<()> {
        if !room.starts_with(CHAT_PREFIX) {
            return Ok(());
        }
        let author = self.author.clone();
        // No new message since the last look (the room's clock did not move): nothing to do,
        // without reading every message for each receipt or reaction that arrives.
        let clock = self.room(room).await?.clock();
        if self.delivered_clock.get(room) == Some(&clock) {
            return Ok(());
        }
        self.delivered_clock.insert(room.to_string(), clock);
        let chat = self.room(room).await?;
        let Some(latest) = chat.messages().into_iter().rev().find(|m| m.author != author.user) else {
            return Ok(());
        };
        if let Some(update) = chat.mark_delivered(&author, &latest.id, now_ms())? {
            self.record(room, &update).await?;
            self.own_changes.insert(room.to_string());
        }
        Ok(())
    }

    /// The documents this client changed by itself while applying the server's changes since
    /// the last call (delivery receipts), for the driver to push.
    pub fn take_own_changes(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.own_changes)
    }

    /// Sends a message; returns its id.
    pub async fn chat_send(&mut self, room: &str, text: &str) -> Result<String> {
        let author = self.author.clone();
        let (id, update) = self.room(room).await?.send(&author, text, now_ms());
        self.record(room, &update).await?;
        Ok(id)
    }

    /// Replaces the text of one of this user's messages.
    pub async fn chat_edit(&mut self, room: &str, id: &str, text: &str) -> Result<()> {
        let author = self.author.clone();
        let update = self.room(room).await?.edit(&author, id, text, now_ms())?;
        self.record(room, &update).await?;
        Ok(())
    }

    /// Deletes one of this user's messages (it stays as a tombstone).
    pub async fn chat_delete(&mut self, room: &str, id: &str) -> Result<()> {
        let author = self.author.clone();
        let update = self.room(room).await?.delete(&author, id, now_ms())?;
        self.record(room, &update).await?;
        Ok(())
    }

    /// Marks the room read up to `id` (by default its latest message). Returns the message
    /// marked, or `None` when the room has no messages.
    pub async fn chat_mark_read(&mut self, room: &str, id: Option<&str>) -> Result<Option<String>> {
        let author = self.author.clone();
        let chat = self.room(room).await?;
        let target = match id {
            Some(id) => id.to_string(),
            None => match chat.messages().last() {
                Some(m) => m.id.clone(),
                None => return Ok(None),
            },
        };
        let update = chat.mark_read(&author, &target, now_ms())?;
        if let Some(update) = update {
            self.record(room, &update).await?;
        }
        Ok(Some(target))
    }

    /// Every message in order (tombstones included), each with whether the server has it: a
    /// message is delivered when no outbox entry holding its creation is left.
    pub async fn chat_messages(&mut self, room: &str) -> Result<Vec<(Message, bool)>> {
        let me = ClientID::new(self.identity.client_id);
        // The items created by this device's changes still waiting for an acknowledgement.
        let mut pending = Vec::new();
        for entry in self.store.outbox(Some(room)).await? {
            pending.push(decode_update(&entry.update)?.insertions(true));
        }
        let chat = self.room(room).await?;
        let messages = chat.messages();
        let doc = chat.doc();
        let map = doc.get_or_insert_map(MESSAGES_ROOT);
        let txn = doc.transact();
        Ok(messages
            .into_iter()
            .map(|m| {
                let created = match map.get(&txn, &m.id) {
                    Some(Out::YMap(fields)) => match fields.as_ref().id() {
                        BranchID::Nested(id) => Some(id),
                        BranchID::Root(_) => None,
                    },
                    _ => None,
                };
                let delivered = match created {
                    Some(id) if id.client == me => !pending.iter().any(|set| set.contains(&id)),
                    _ => true,
                };
                (m, delivered)
            })
            .collect())
    }

    /// Every user's effective read receipt in the room.
    pub async fn chat_receipts(&mut self, room: &str) -> Result<BTreeMap<String, Receipt>> {
        Ok(self.room(room).await?.receipts())
    }

    /// The users whose receipt covers the message with this sort key.
    pub async fn chat_read_by(&mut self, room: &str, sort: &str) -> Result<Vec<String>> {
        Ok(self.room(room).await?.read_by(sort))
    }

    /// How many messages of others this user has not read.
    pub async fn chat_unread_count(&mut self, room: &str) -> Result<usize> {
        let user = self.author.user.clone();
        Ok(self.room(room).await?.unread_count(&user))
    }
}

/// One message as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatEntry {
    /// The message.
    pub message: Message,
    /// Whether the server acknowledged it (has stored it).
    pub delivered: bool,
    /// The users other than its author whose delivery receipt covers it: on their devices.
    pub delivered_to: Vec<String>,
    /// The users other than its author whose read receipt covers it.
    pub read_by: Vec<String>,
    /// Its reactions: reaction → users.
    pub reactions: Reactions,
}

/// Where a message is on its way to the others, as its sender sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Delivery {
    /// Only on this device (sending).
    Local,
    /// Stored on the server (sent).
    Acknowledged,
    /// On at least one other member's device.
    Delivered,
    /// Read by at least one other member.
    Read,
}

impl Delivery {
    /// `"local"`, `"acknowledged"`, `"delivered"` or `"read"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Local => "local",
            Delivery::Acknowledged => "acknowledged",
            Delivery::Delivered => "delivered",
            Delivery::Read => "read",
        }
    }
}

impl ChatEntry {
    /// The message's state: local → acknowledged → delivered → read. A receipt means the
    /// server had the message (others got it from there), so it counts even before this
    /// device saw the acknowledgement.
    pub fn state(&self) -> Delivery {
        if !self.read_by.is_empty() {
            Delivery::Read
        } else if !self.delivered_to.is_empty() {
            Delivery::Delivered
        } else if self.delivered {
            Delivery::Acknowledged
        } else {
            Delivery::Local
        }
    }

    /// [`state`](Self::state) as a string.
    pub fn delivery(&self) -> &'static str {
        self.state().as_str()
    }

    /// The entry as a JSON object: id, author, kind, text, time (ms), edited, deleted,
    /// metadata, attachments, reply_to, reactions, delivery, delivered_to and read_by.
    pub fn to_json(&self) -> serde_json::Value {
        let m = &self.message;
        serde_json::json!({
            "id": m.id,
            "author": m.author,
            "kind": m.kind.as_str(),
            "text": m.text,
            "time": m.created_ms,
            "edited": m.edited_ms,
            "deleted": m.deleted,
            "metadata": m.metadata,
            "attachments": m.attachments.iter().map(|a| serde_json::json!({
                "url": a.url, "mime": a.mime, "size": a.size,
                "sha256": a.sha256, "width": a.width, "height": a.height,
            })).collect::<Vec<_>>(),
            "reply_to": m.reply_to,
            "reactions": self.reactions,
            "delivery": self.delivery(),
            "delivered_to": self.delivered_to,
            "read_by": self.read_by,
        })
    }
}

impl Client {
    /// Every message in order with its delivery state and readers.
    pub async fn chat_list(&mut self, room: &str) -> Result<Vec<ChatEntry>> {
        let messages = self.chat_messages(room).await?;
        let chat = self.room(room).await?;
        let receipts = chat.receipts();
        let deliveries = chat.delivered();
        let mut reactions = chat.all_reactions();
        let covering = |receipts: &BTreeMap<String, Receipt>, message: &Message| -> Vec<String> {
            receipts
                .iter()
                .filter(|(user, r)| **user != message.author && r.sort >= message.sort)
                .map(|(user, _)| user.clone())
                .collect()
        };
        Ok(messages
            .into_iter()
            .map(|(message, delivered)| {
                let read_by = covering(&receipts, &message);
                // Whoever read it has it too.
                let mut delivered_to = covering(&deliveries, &message);
                delivered_to.extend(read_by.iter().cloned());
                delivered_to.sort();
                delivered_to.dedup();
                ChatEntry {
                    reactions: reactions.remove(&message.id).unwrap_or_default(),
                    message,
                    delivered,
                    delivered_to,
                    read_by,
                }
            })
            .collect())
    }
}
