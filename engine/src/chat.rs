//! Chat rooms and read receipts, as one yrs document per room.
//!
//! # Schema (what a JavaScript Yjs client reads and writes; ARCHITECTURE.md repeats it)
//! * Root `Y.Map` [`MESSAGES_ROOT`] (`"messages"`): key = message id (a UUIDv7 string), value =
//!   a nested `Y.Map` with the fields `id`, `author` (user id), `device` (device id), `client`
//!   (the yrs client id of the sending replica, a number), `text` (string), `created` (wall-clock
//!   milliseconds, a number), `hlc` (the [`Hlc::key`] string), `sort` (the sort key string, see
//!   [`sort_key`]), and after changes `edited` (milliseconds) and `deleted` (`true`: a tombstone
//!   whose `text` is `""`).
//! * Root `Y.Map` [`RECEIPTS_ROOT`] (`"receipts"`): key = `"{user}/{device}"`, value = a plain
//!   JSON object `{ "message": id, "sort": sort key, "at": milliseconds }`: "this device of this
//!   user has read up to this message". Each key has a single writer (its device), so the entry
//!   never conflicts; a user's receipt is the entry with the greatest `sort` among their devices,
//!   so concurrent marks from two devices merge to the later one, and it never moves backwards.
//!
//! * Optional message fields: `kind` ([`Kind`]; absent: text), `meta` (an object of strings),
//!   `attachments` ([`Attachment`]s by reference) and `reply_to` (a message id).
//! * Root `Y.Map` [`DELIVERED_ROOT`] (`"delivered"`): delivery receipts, shaped like read
//!   receipts: "this device of this user has received every message up to this one".
//! * Root `Y.Map` [`REACTIONS_ROOT`] (`"reactions"`): `"{message}/{reaction}/{user}"` → `{at}`.
//!
//! Messages are ordered by their `sort` string, `"{hlc}/{client:016}/{id}"`: HLC, then client
//! id, then message id. Every replica holding the same messages shows them in the same order.
//!
//! Messages are created once with a fresh id, so no two replicas ever create the same nested map
//! concurrently (which in Yjs would lose one of them); receipts are flat for the same reason.
//!
//! # Rules a server enforces
//! [`ChatGuard`] watches a room document and checks each transaction applied to it against the
//! rules, given the writer's user id and the server's clock: a new message's `author` is the
//! writer and its `id` is its key; its `hlc` is a valid stamp (see [`Hlc::is_valid`]) at most
//! [`DEFAULT_MAX_CLOCK_SKEW_MS`] (or the configured bound) ahead of the server's clock, its
//! `client` an integer below 2^53, and its `sort` exactly [`sort_key`] of those; a message is
//! never removed or replaced (deletion is a tombstone); only its author changes a message, and
//! only its `text`, `edited` and `deleted` fields (so its stamp and sort key never change); a
//! user writes only receipts keyed `"{user}/{device}"`, which only move forward and are never
//! removed, and only reactions keyed with their user id; optional fields keep their shapes and
//! bounds (`details`), and `system` messages come from the server only. Other root types of a
//! room are not checked.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use yrs::types::{EntryChange, Event, Events, PathSegment};
use yrs::{Any, DeepObservable, Doc, Map, MapPrelim, MapRef, Observable, Out, ReadTxn, Transact, TransactionMut};

use crate::clock::{Hlc, HlcClock, DEFAULT_MAX_CLOCK_SKEW_MS};
use crate::doc::edit;

mod details;
mod members;

use crate::{Error, Result};
pub use details::{
    check_metadata, check_reaction, parse_reaction_key, reaction_key, Attachment, Kind, MAX_ATTACHMENTS,
    MAX_MESSAGE_ID_BYTES, MAX_METADATA_ENTRIES, MAX_METADATA_KEY_BYTES, MAX_METADATA_VALUE_BYTES, MAX_MIME_BYTES,
    MAX_REACTION_BYTES, MAX_URL_BYTES,
};
pub use members::{
    joined_members, preview, ChatFacts, EditFact, Member, MemberFact, MessageFact, ReadFact, MAX_PREVIEW_BYTES,
    MEMBERS_ROOT,
};

/// Root map of the messages.
pub const MESSAGES_ROOT: &str = "messages";
/// Root map of the read receipts.
pub const RECEIPTS_ROOT: &str = "receipts";
/// The root map of delivery receipts: `"{user}/{device}"` → `{message, sort, at}`, "this device
/// of this user has received every message up to this one".
pub const DELIVERED_ROOT: &str = "delivered";
/// The root map of reactions: `"{message}/{reaction}/{user}"` → `{at}`, one entry per user and
/// reaction on a message; removing the entry takes the reaction back.
pub const REACTIONS_ROOT: &str = "reactions";

/// Who is writing: a user on one of their devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Author {
    /// The user id (a token's subject).
    pub user: String,
    /// The device id (one per client store).
    pub device: String,
}

/// One chat message as a replica sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// UUIDv7.
    pub id: String,
    /// User id of the author.
    pub author: String,
    /// Device it was sent from.
    pub device: String,
    /// yrs client id of the sending replica.
    pub client: u64,
    /// The text (empty for a deleted message).
    pub text: String,
    /// Wall-clock milliseconds at sending, as the sender's device saw them.
    pub created_ms: u64,
    /// The HLC stamp.
    pub hlc: Hlc,
    /// The sort key (see the module docs).
    pub sort: String,
    /// What it is (`kind`; absent: text).
    pub kind: Kind,
    /// Small string-to-string metadata (`meta`).
    pub metadata: BTreeMap<String, String>,
    /// Files it refers to (`attachments`).
    pub attachments: Vec<Attachment>,
    /// The message it answers (`reply_to`).
    pub reply_to: Option<String>,
    /// When it was last edited, if ever.
    pub edited_ms: Option<u64>,
    /// Whether it was deleted (a tombstone).
    pub deleted: bool,
}

/// A user's effective read receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Read up to and including this message.
    pub message: String,
    /// That message's sort key.
    pub sort: String,
    /// When it was marked (milliseconds).
    pub at_ms: u64,
    /// The device that marked it.
    pub device: String,
}

/// What a new message carries besides its stamps: [`ChatRoom::send_message`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewMessage {
    /// The text (may be empty for an attachment).
    pub text: String,
    /// Its kind. `System` is for the server: a client's is refused.
    pub kind: Kind,
    /// Small string-to-string metadata, at most [`MAX_METADATA_ENTRIES`] entries.
    pub metadata: BTreeMap<String, String>,
    /// Files by reference, at most [`MAX_ATTACHMENTS`].
    pub attachments: Vec<Attachment>,
    /// The id of the message it answers.
    pub reply_to: Option<String>,
}

impl NewMessage {
    /// A text message.
    pub fn text(text: impl Into<String>) -> NewMessage {
        NewMessage {
            text: text.into(),
            ..NewMessage::default()
        }
    }

    /// Checks the bounds the server's rules check.
    pub fn check(&self) -> std::result::Result<(), String> {
        check_metadata(&self.metadata)?;
        if self.attachments.len() > MAX_ATTACHMENTS {
            return Err(format!("at most {MAX_ATTACHMENTS} attachments"));
        }
        self.attachments.iter().try_for_each(Attachment::check)?;
        if let Some(reply_to) = &self.reply_to {
            details::check_message_ref(reply_to)?;
        }
        Ok(())
    }
}

/// Everyone's reactions to one message: reaction → users, in name order.
pub type Reactions = BTreeMap<String, Vec<String>>;

/// The sort key of a message: `"{hlc}/{client:016}/{id}"`, all fixed width but the id.
pub fn sort_key(hlc: Hlc, client: u64, id: &str) -> String {
    format!("{}/{:016}/{}", hlc.key(), client, id)
}

/// A chat room over a yrs document.
///
/// The room keeps an HLC that advances on every message sent here and every message that
/// arrives in the document by any route (observed through yrs), so stamps stay causal.
pub struct ChatRoom {
    doc: Doc,
    messages: MapRef,
    receipts: MapRef,
    delivered: MapRef,
    reactions: MapRef,
    members: MapRef,
    clock: Arc<Mutex<HlcClock>>,
}

impl std::fmt::Debug for ChatRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatRoom")
            .field("clock", &self.clock())
            .finish_non_exhaustive()
    }
}

const CLOCK_OBSERVER: &str = "driftsync-hlc";

impl ChatRoom {
    /// Wraps a room document (empty or loaded). Its existing messages seed the clock.
    pub fn new(doc: Doc) -> Self {
        let messages = doc.get_or_insert_map(MESSAGES_ROOT);
        let receipts = doc.get_or_insert_map(RECEIPTS_ROOT);
        let delivered = doc.get_or_insert_map(DELIVERED_ROOT);
        let reactions = doc.get_or_insert_map(REACTIONS_ROOT);
        let members = doc.get_or_insert_map(MEMBERS_ROOT);
        let mut clock = HlcClock::new();
        {
            let txn = doc.transact();
            for (_, value) in messages.iter(&txn) {
                if let Some(hlc) = message_hlc(&txn, &value) {
                    clock.observe(hlc);
                }
            }
        }
        let clock = Arc::new(Mutex::new(clock));
        let observed = Arc::clone(&clock);
        messages.observe(
            CLOCK_OBSERVER,
            move |txn: &TransactionMut<'_>, event: &yrs::types::map::MapEvent| {
                for change in event.keys(txn).values() {
                    if let EntryChange::Inserted(value) = change {
                        if let Some(hlc) = message_hlc(txn, value) {
                            observed.lock().unwrap_or_else(PoisonError::into_inner).observe(hlc);
                        }
                    }
                }
            },
        );
        ChatRoom {
            doc,
            messages,
            receipts,
            delivered,
            reactions,
            members,
            clock,
        }
    }

    /// The underlying document.
    pub fn doc(&self) -> &Doc {
        &self.doc
    }

    /// The room's clock: the largest stamp sent or seen.
    pub fn clock(&self) -> Hlc {
        self.clock.lock().unwrap_or_else(PoisonError::into_inner).last()
    }

    /// Sends a message at wall time `now_ms`. Returns its id (at once: the caller stores the
    /// update and shows the message before any network round trip) and the update to store.
    pub fn send(&self, author: &Author, text: &str, now_ms: u64) -> (String, Vec<u8>) {
        self.send_with_id(author, uuid::Uuid::now_v7().to_string(), text, now_ms)
    }

    /// [`send`](Self::send) with the message id chosen by the caller instead of a new UUIDv7
    /// (which reads the wall clock and a random generator): for deterministic simulations and
    /// tests. The id must be unique in the room; a UUIDv7 is what peers expect.
    #[doc(hidden)]
    pub fn send_with_id(&self, author: &Author, id: String, text: &str, now_ms: u64) -> (String, Vec<u8>) {
        self.write_message(author, id, &NewMessage::text(text), now_ms)
    }

    /// Sends a message with a kind, metadata, attachments or a reply (see [`NewMessage`]),
    /// checked against the bounds the server's rules check.
    pub fn send_message(&self, author: &Author, message: &NewMessage, now_ms: u64) -> Result<(String, Vec<u8>)> {
        message.check().map_err(Error::Invalid)?;
        Ok(self.write_message(author, uuid::Uuid::now_v7().to_string(), message, now_ms))
    }

    fn write_message(&self, author: &Author, id: String, message: &NewMessage, now_ms: u64) -> (String, Vec<u8>) {
        let text = message.text.as_str();
        let hlc = self.clock.lock().unwrap_or_else(PoisonError::into_inner).tick(now_ms);
        let client = self.doc.client_id().get();
        let sort = sort_key(hlc, client, &id);
        // The optional fields only when set: a text message's bytes stay what they were.
        let mut optional = Vec::new();
        if message.kind != Kind::Text {
            optional.push(("kind", Any::from(message.kind.as_str())));
        }
        if !message.metadata.is_empty() {
            optional.push(("meta", details::metadata_to_any(&message.metadata)));
        }
        if !message.attachments.is_empty() {
            optional.push(("attachments", details::attachments_to_any(&message.attachments)));
        }
        if let Some(reply_to) = &message.reply_to {
            optional.push(("reply_to", Any::from(reply_to.as_str())));
        }
        let fields = [
            ("id", Any::from(id.as_str())),
            ("author", Any::from(author.user.as_str())),
            ("device", Any::from(author.device.as_str())),
            ("client", Any::from(client as f64)),
            ("text", Any::from(text)),
            ("created", Any::from(now_ms as f64)),
            ("hlc", Any::from(hlc.key())),
            ("sort", Any::from(sort)),
        ]
        .into_iter()
        .chain(optional);
        let ((), update) = edit(&self.doc, |txn| {
            // The fields one by one, in this order, in the same transaction: a `MapPrelim` holds
            // them in a `HashMap` with a random hasher, which would give them clocks in a
            // different order every time (the same message, but different bytes — and delete
            // sets of different sizes when fields are replaced later).
            let message = self.messages.insert(txn, id.as_str(), MapPrelim::default());
            for (key, value) in fields {
                message.insert(txn, key, value);
            }
        });
        (id, update)
    }

    /// Replaces the text of the author's own message.
    pub fn edit(&self, author: &Author, id: &str, text: &str, now_ms: u64) -> Result<Vec<u8>> {
        let fields = self.own_message(author, id)?;
        let (_, update) = edit(&self.doc, |txn| {
            fields.insert(txn, "text", text);
            fields.insert(txn, "edited", now_ms as f64);
        });
        Ok(update)
    }

    /// Deletes the author's own message, leaving a tombstone so the order of the others holds.
    pub fn delete(&self, author: &Author, id: &str, now_ms: u64) -> Result<Vec<u8>> {
        let fields = self.own_message(author, id)?;
        let (_, update) = edit(&self.doc, |txn| {
            fields.insert(txn, "text", "");
            fields.insert(txn, "deleted", true);
            fields.insert(txn, "edited", now_ms as f64);
        });
        Ok(update)
    }

    /// Replaces the metadata and attachments of the author's own message (an upload finished,
    /// a caption changed).
    pub fn set_details(
        &self,
        author: &Author,
        id: &str,
        metadata: &BTreeMap<String, String>,
        attachments: &[Attachment],
        now_ms: u64,
    ) -> Result<Vec<u8>> {
        let check = NewMessage {
            metadata: metadata.clone(),
            attachments: attachments.to_vec(),
            ..NewMessage::default()
        };
        check.check().map_err(Error::Invalid)?;
        let fields = self.own_message(author, id)?;
        let (_, update) = edit(&self.doc, |txn| {
            fields.insert(txn, "meta", details::metadata_to_any(metadata));
            fields.insert(txn, "attachments", details::attachments_to_any(attachments));
            fields.insert(txn, "edited", now_ms as f64);
        });
        Ok(update)
    }

    /// Adds (or with `add == false` takes back) the author's `reaction` to message `id`.
    /// `None` when there is nothing to change.
    pub fn react(&self, author: &Author, id: &str, reaction: &str, add: bool, now_ms: u64) -> Result<Option<Vec<u8>>> {
        check_reaction(reaction).map_err(Error::Invalid)?;
        if self.message(id).is_none() {
            return Err(Error::NoSuchMessage(id.to_string()));
        }
        let key = reaction_key(id, reaction, &author.user);
        let present = self.reactions.contains_key(&self.doc.transact(), &key);
        if present == add {
            return Ok(None);
        }
        let (_, update) = edit(&self.doc, |txn| {
            if add {
                let at = Any::from(std::collections::HashMap::from([(
                    "at".to_string(),
                    Any::from(now_ms as f64),
                )]));
                self.reactions.insert(txn, key.as_str(), at);
            } else {
                self.reactions.remove(txn, &key);
            }
        });
        Ok(Some(update))
    }

    /// Every message's reactions: message id → reaction → users.
    pub fn all_reactions(&self) -> BTreeMap<String, Reactions> {
        let txn = self.doc.transact();
        let mut out: BTreeMap<String, Reactions> = BTreeMap::new();
        for (key, _) in self.reactions.iter(&txn) {
            if let Ok((message, reaction, user)) = parse_reaction_key(key) {
                out.entry(message.to_string())
                    .or_default()
                    .entry(reaction.to_string())
                    .or_default()
                    .push(user.to_string());
            }
        }
        for reactions in out.values_mut() {
            for users in reactions.values_mut() {
                users.sort();
            }
        }
        out
    }

    /// One message's reactions: reaction → users.
    pub fn reactions(&self, id: &str) -> Reactions {
        self.all_reactions().remove(id).unwrap_or_default()
    }

    fn own_message(&self, author: &Author, id: &str) -> Result<MapRef> {
        let txn = self.doc.transact();
        let Some(Out::YMap(fields)) = self.messages.get(&txn, id) else {
            return Err(Error::NoSuchMessage(id.to_string()));
        };
        if get_str(&txn, &fields, "author").as_deref() != Some(author.user.as_str()) {
            return Err(Error::NotAuthor(id.to_string()));
        }
        Ok(fields)
    }

    /// One message by id.
    pub fn message(&self, id: &str) -> Option<Message> {
        let txn = self.doc.transact();
        match self.messages.get(&txn, id) {
            Some(Out::YMap(fields)) => read_message(&txn, id, &fields),
            _ => None,
        }
    }

    /// Every message (tombstones included), in the deterministic order.
    ///
    /// Entries that do not follow the schema (written by a foreign client) are skipped.
    pub fn messages(&self) -> Vec<Message> {
        let txn = self.doc.transact();
        let mut all: Vec<Message> = self
            .messages
            .iter(&txn)
            .filter_map(|(id, value)| match value {
                Out::YMap(fields) => read_message(&txn, id, &fields),
                _ => None,
            })
            .collect();
        all.sort_by(|a, b| a.sort.cmp(&b.sort));
        all
    }

    /// Marks the room read up to message `id` for `author`'s user, from `author`'s device.
    ///
    /// Returns `None` (and changes nothing) when the user's receipt already covers `id`: a
    /// receipt never moves backwards.
    pub fn mark_read(&self, author: &Author, id: &str, now_ms: u64) -> Result<Option<Vec<u8>>> {
        self.raise(&self.receipts, author, id, now_ms)
    }

    /// Records that this device of `author` has received every message up to and including
    /// `id` (a delivery receipt). Like [`mark_read`](Self::mark_read), it never moves back:
    /// `None` when the user's delivery receipt is there already.
    pub fn mark_delivered(&self, author: &Author, id: &str, now_ms: u64) -> Result<Option<Vec<u8>>> {
        self.raise(&self.delivered, author, id, now_ms)
    }

    /// Raises `author`'s entry in a receipts map to message `id`.
    fn raise(&self, map: &MapRef, author: &Author, id: &str, now_ms: u64) -> Result<Option<Vec<u8>>> {
        let message = self.message(id).ok_or_else(|| Error::NoSuchMessage(id.to_string()))?;
        if let Some(current) = self.receipt_entries(map).remove(&author.user) {
            if current.sort >= message.sort {
                return Ok(None);
            }
        }
        if author.user.contains('\n') || author.device.contains('/') {
            return Err(Error::Invalid("device ids must not contain '/'".into()));
        }
        let key = receipt_key(&author.user, &author.device);
        let value = Any::from(std::collections::HashMap::from([
            ("message".to_string(), Any::from(id)),
            ("sort".to_string(), Any::from(message.sort.as_str())),
            ("at".to_string(), Any::from(now_ms as f64)),
        ]));
        let (_, update) = edit(&self.doc, |txn| {
            map.insert(txn, key, value);
        });
        Ok(Some(update))
    }

    /// Every user's effective receipt (the latest over their devices).
    pub fn receipts(&self) -> BTreeMap<String, Receipt> {
        self.receipt_entries(&self.receipts)
    }

    /// Every user's effective delivery receipt (the latest over their devices).
    pub fn delivered(&self) -> BTreeMap<String, Receipt> {
        self.receipt_entries(&self.delivered)
    }

    /// The users whose delivery receipt covers the message with this sort key.
    pub fn delivered_to(&self, sort: &str) -> Vec<String> {
        self.delivered()
            .into_iter()
            .filter(|(_, r)| r.sort.as_str() >= sort)
            .map(|(user, _)| user)
            .collect()
    }

    /// The latest entry per user of a receipts map.
    fn receipt_entries(&self, map: &MapRef) -> BTreeMap<String, Receipt> {
        let txn = self.doc.transact();
        let mut out: BTreeMap<String, Receipt> = BTreeMap::new();
        for (key, value) in map.iter(&txn) {
            let Some((user, device)) = key.rsplit_once('/') else {
                continue;
            };
            let Out::Any(Any::Map(fields)) = value else { continue };
            let (Some(Any::String(message)), Some(Any::String(sort))) = (fields.get("message"), fields.get("sort"))
            else {
                continue;
            };
            let at_ms = fields.get("at").and_then(any_u64).unwrap_or(0);
            let candidate = Receipt {
                message: message.to_string(),
                sort: sort.to_string(),
                at_ms,
                device: device.to_string(),
            };
            match out.get(user) {
                Some(existing) if (&existing.sort, &existing.device) >= (&candidate.sort, &candidate.device) => {}
                _ => {
                    out.insert(user.to_string(), candidate);
                }
            }
        }
        out
    }

    /// One user's effective receipt.
    pub fn receipt(&self, user: &str) -> Option<Receipt> {
        self.receipts().remove(user)
    }

    /// Messages after the user's receipt that others wrote and that are neither deleted nor
    /// system messages.
    pub fn unread_count(&self, user: &str) -> usize {
        let read = self.receipt(user).map(|r| r.sort);
        self.messages()
            .iter()
            .filter(|m| {
                !m.deleted
                    && m.kind != Kind::System
                    && m.author != user
                    && read.as_deref().is_none_or(|r| m.sort.as_str() > r)
            })
            .count()
    }

    /// Joins the room as `author`'s user: their entry in `members` becomes `joined` (the server
    /// then writes a system message). `None` when they are a member already.
    pub fn join(&self, author: &Author, now_ms: u64) -> Option<Vec<u8>> {
        self.set_membership(author, true, now_ms)
    }

    /// Leaves the room: `author`'s entry in `members` becomes `left`. `None` when they are not
    /// a member.
    pub fn leave(&self, author: &Author, now_ms: u64) -> Option<Vec<u8>> {
        self.set_membership(author, false, now_ms)
    }

    fn set_membership(&self, author: &Author, joined: bool, now_ms: u64) -> Option<Vec<u8>> {
        if self.is_member(&author.user) == joined {
            return None;
        }
        let (_, update) = edit(&self.doc, |txn| {
            self.members
                .insert(txn, author.user.as_str(), members::member_value(joined, now_ms));
        });
        Some(update)
    }

    /// Whether `user` has joined (and not left).
    pub fn is_member(&self, user: &str) -> bool {
        let txn = self.doc.transact();
        self.members
            .get(&txn, user)
            .and_then(|value| members::member_from(&value))
            .is_some_and(|(joined, _)| joined)
    }

    /// Everyone who ever joined, with their state, in user order (entries that do not follow
    /// the schema are skipped).
    pub fn members(&self) -> Vec<Member> {
        let txn = self.doc.transact();
        let mut all: Vec<Member> = self
            .members
            .iter(&txn)
            .filter_map(|(user, value)| {
                members::member_from(&value).map(|(joined, at_ms)| Member {
                    user: user.to_string(),
                    joined,
                    at_ms,
                })
            })
            .collect();
        all.sort_by(|a, b| a.user.cmp(&b.user));
        all
    }

    /// The users whose receipt covers a message with this sort key.
    pub fn read_by(&self, sort: &str) -> Vec<String> {
        self.receipts()
            .into_iter()
            .filter(|(_, r)| r.sort.as_str() >= sort)
            .map(|(user, _)| user)
            .collect()
    }
}

impl Drop for ChatRoom {
    fn drop(&mut self) {
        self.messages.unobserve(CLOCK_OBSERVER);
    }
}

/// A system message saying that `user` did `event` (`"joined"`, `"left"`) at `at_ms`, as a
/// server writes it into a room: `kind` `system`, `author` the user concerned, device
/// `server`, `meta` `{event, user}`. It is stamped at `at_ms` — the time of the change on the
/// member's device (the caller bounds it by its own clock) — so that it sorts where the change
/// happened: before what the member wrote after joining, even when both arrive together from a
/// device that was offline. Returns its id and the update, which the caller applies to the
/// room and stores.
///
/// The update is built on a scratch document with a fresh random client id, never the room's:
/// a new key of the `messages` map references nothing else in the room, and an id used once
/// can never be re-used for other content after a failed commit or by another instance.
pub fn system_message(user: &str, event: &str, at_ms: u64) -> Result<(String, Vec<u8>)> {
    let chat = ChatRoom::new(crate::doc::new_doc(crate::doc::new_client_id())?);
    let message = NewMessage {
        text: format!("{user} {event}"),
        kind: Kind::System,
        metadata: BTreeMap::from([
            ("event".to_string(), event.to_string()),
            ("user".to_string(), user.to_string()),
        ]),
        ..NewMessage::default()
    };
    message.check().map_err(Error::Invalid)?;
    let author = Author {
        user: user.to_string(),
        device: "server".to_string(),
    };
    Ok(chat.write_message(&author, uuid::Uuid::now_v7().to_string(), &message, at_ms))
}

/// The fields of a message its author may change after sending it.
pub const MUTABLE_FIELDS: [&str; 5] = ["text", "edited", "deleted", "meta", "attachments"];

/// The optional fields of a message, checked for their shapes when set.
const DETAIL_FIELDS: [&str; 4] = ["kind", "meta", "attachments", "reply_to"];

/// An update broke the chat rules; the text says which rule and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Violation {}

impl From<Violation> for Error {
    fn from(violation: Violation) -> Self {
        Error::SchemaViolation(violation.0)
    }
}

/// One thing a transaction did to a room, and who may do it.
#[derive(Debug, Clone)]
pub(crate) enum Touch {
    /// Allowed to this user only (`None`: the owner is unknown, so to no authenticated user).
    Owner { user: Option<String>, what: String },
    /// Breaks the schema whoever does it.
    Forbidden(String),
    /// A new message stamped `hlc`: allowed if the stamp is not too far ahead of the clock of
    /// whoever judges it.
    Stamp { hlc: Hlc, message: String },
    /// A system message: the server writes those, never a client.
    System(String),
}

/// The largest `client` a message may name: yrs (and Yjs) client ids are below 2^53.
const MAX_CLIENT_ID: u64 = (1 << 53) - 1;

const GUARD_OBSERVER: &str = "driftsync-chat-guard";

/// Checks what transactions do to a chat room against the rules (see the module docs).
///
/// [`ChatGuard::attach`] registers deep observers on the room's `messages` and `receipts` maps;
/// they record what every transaction touched and who may touch it. After applying an update,
/// [`ChatGuard::check`] takes that record and judges it for the writer. The guard does no I/O;
/// the caller decides what to do with a refused update (a server reloads the document from its
/// store, so that nothing refused stays in it).
pub struct ChatGuard {
    /// Keeps the document (and so the observed branches) alive as long as the guard.
    _doc: Doc,
    messages: MapRef,
    receipts: MapRef,
    delivered: MapRef,
    reactions: MapRef,
    members: MapRef,
    record: Arc<Mutex<Vec<Touch>>>,
    /// What the transactions since the last reset did that an index keeps.
    facts: Arc<Mutex<ChatFacts>>,
    /// How far ahead of the judge's clock a new message's stamp may be.
    max_clock_skew_ms: u64,
}

impl std::fmt::Debug for ChatGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatGuard").finish_non_exhaustive()
    }
}

impl ChatGuard {
    /// Starts watching a room document. Must not be called inside a transaction on `doc`.
    pub fn attach(doc: &Doc) -> ChatGuard {
        let messages = doc.get_or_insert_map(MESSAGES_ROOT);
        let receipts = doc.get_or_insert_map(RECEIPTS_ROOT);
        let record: Arc<Mutex<Vec<Touch>>> = Arc::default();
        let facts: Arc<Mutex<ChatFacts>> = Arc::default();
        let (sink, found) = (Arc::clone(&record), Arc::clone(&facts));
        let root = messages.clone();
        messages.observe_deep(GUARD_OBSERVER, move |txn: &TransactionMut<'_>, events: &Events<'_>| {
            let mut touches = Vec::new();
            let mut new = ChatFacts::default();
            for event in events.iter() {
                message_touches(txn, &root, event, &mut touches, &mut new);
            }
            sink.lock().unwrap_or_else(PoisonError::into_inner).extend(touches);
            found.lock().unwrap_or_else(PoisonError::into_inner).extend(new);
        });
        let delivered = doc.get_or_insert_map(DELIVERED_ROOT);
        for (map, what) in [(&receipts, "read receipt"), (&delivered, "delivery receipt")] {
            let (sink, found) = (Arc::clone(&record), Arc::clone(&facts));
            let read = what == "read receipt";
            map.observe_deep(GUARD_OBSERVER, move |txn: &TransactionMut<'_>, events: &Events<'_>| {
                let mut touches = Vec::new();
                let mut reads = Vec::new();
                for event in events.iter() {
                    receipt_touches(txn, event, what, &mut touches, &mut reads);
                }
                sink.lock().unwrap_or_else(PoisonError::into_inner).extend(touches);
                if read && !reads.is_empty() {
                    found.lock().unwrap_or_else(PoisonError::into_inner).extend(ChatFacts {
                        reads,
                        ..ChatFacts::default()
                    });
                }
            });
        }
        let reactions = doc.get_or_insert_map(REACTIONS_ROOT);
        let sink = Arc::clone(&record);
        reactions.observe_deep(GUARD_OBSERVER, move |txn: &TransactionMut<'_>, events: &Events<'_>| {
            let mut touches = Vec::new();
            for event in events.iter() {
                reaction_touches(txn, event, &mut touches);
            }
            sink.lock().unwrap_or_else(PoisonError::into_inner).extend(touches);
        });
        let members = doc.get_or_insert_map(MEMBERS_ROOT);
        let (sink, found) = (Arc::clone(&record), Arc::clone(&facts));
        members.observe_deep(GUARD_OBSERVER, move |txn: &TransactionMut<'_>, events: &Events<'_>| {
            let mut touches = Vec::new();
            let mut changes = Vec::new();
            for event in events.iter() {
                members::member_touches(txn, event, &mut touches, &mut changes);
            }
            sink.lock().unwrap_or_else(PoisonError::into_inner).extend(touches);
            if !changes.is_empty() {
                found.lock().unwrap_or_else(PoisonError::into_inner).extend(ChatFacts {
                    members: changes,
                    ..ChatFacts::default()
                });
            }
        });
        ChatGuard {
            _doc: doc.clone(),
            messages,
            receipts,
            delivered,
            reactions,
            members,
            record,
            facts,
            max_clock_skew_ms: DEFAULT_MAX_CLOCK_SKEW_MS,
        }
    }

    /// The same guard, refusing new messages stamped more than `max_clock_skew_ms` ahead of the
    /// clock given to [`check`](Self::check) (default: [`DEFAULT_MAX_CLOCK_SKEW_MS`]).
    pub fn with_max_clock_skew(mut self, max_clock_skew_ms: u64) -> ChatGuard {
        self.max_clock_skew_ms = max_clock_skew_ms;
        self
    }

    /// The bound set by [`with_max_clock_skew`](Self::with_max_clock_skew).
    pub fn max_clock_skew_ms(&self) -> u64 {
        self.max_clock_skew_ms
    }

    /// Forgets what was recorded so far (call it before applying the update to judge).
    pub fn reset(&self) {
        self.record.lock().unwrap_or_else(PoisonError::into_inner).clear();
        *self.facts.lock().unwrap_or_else(PoisonError::into_inner) = ChatFacts::default();
    }

    /// What the transactions since the last [`reset`](Self::reset) did that an index keeps
    /// (new, edited and deleted messages, read receipts, membership), and forgets it. Only
    /// meaningful once [`check`](Self::check) accepted them.
    pub fn take_facts(&self) -> ChatFacts {
        std::mem::take(&mut *self.facts.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Judges everything recorded since the last `check` or [`reset`](Self::reset) as written by
    /// `user` at wall-clock time `now_ms` (milliseconds since the Unix epoch, the judge's own
    /// clock), and forgets it.
    ///
    /// `None` means the writer is not authenticated (a server running open): ownership cannot be
    /// checked then, and only the rules that bind everyone apply — the stamp rules among them.
    pub fn check(&self, user: Option<&str>, now_ms: u64) -> Result<(), Violation> {
        let touches = std::mem::take(&mut *self.record.lock().unwrap_or_else(PoisonError::into_inner));
        let latest = now_ms.saturating_add(self.max_clock_skew_ms);
        for touch in touches {
            match touch {
                Touch::Forbidden(what) => return Err(Violation(what)),
                Touch::System(message) => {
                    return Err(Violation(format!(
                        "message {message} is a system message, which only the server writes"
                    )))
                }
                Touch::Stamp { hlc, message } => {
                    if hlc.wall_ms > latest {
                        return Err(Violation(format!(
                            "message {message}: its hlc {hlc} is {} ms ahead of the server's clock (at most {} allowed)",
                            hlc.wall_ms - now_ms,
                            self.max_clock_skew_ms
                        )));
                    }
                }
                Touch::Owner { user: owner, what } => match user {
                    Some(user) if owner.as_deref() != Some(user) => {
                        let owner = owner.as_deref().unwrap_or("no one");
                        return Err(Violation(format!("{what}, which only {owner} may do")));
                    }
                    _ => {}
                },
            }
        }
        Ok(())
    }
}

impl Drop for ChatGuard {
    fn drop(&mut self) {
        self.messages.unobserve_deep(GUARD_OBSERVER);
        self.receipts.unobserve_deep(GUARD_OBSERVER);
        self.delivered.unobserve_deep(GUARD_OBSERVER);
        self.reactions.unobserve_deep(GUARD_OBSERVER);
        self.members.unobserve_deep(GUARD_OBSERVER);
    }
}

/// Records what one event under the `messages` root did.
fn message_touches(
    txn: &TransactionMut<'_>,
    messages: &MapRef,
    event: &Event,
    out: &mut Vec<Touch>,
    facts: &mut ChatFacts,
) {
    let path = event.path();
    let Some(first) = path.front() else {
        // The root itself: messages added, replaced or removed.
        if let Event::Map(event) = event {
            for (key, change) in event.keys(txn) {
                let touch = match change {
                    EntryChange::Inserted(Out::YMap(fields)) => {
                        if get_str(txn, fields, "id").as_deref() != Some(&**key) {
                            Touch::Forbidden(format!("message {key}: its id field differs from its key"))
                        } else {
                            match stamp(txn, key, fields) {
                                Ok(hlc) => out.push(Touch::Stamp {
                                    hlc,
                                    message: key.to_string(),
                                }),
                                Err(what) => out.push(Touch::Forbidden(what)),
                            }
                            if let Err(what) = check_details(txn, key, fields, &DETAIL_FIELDS) {
                                out.push(Touch::Forbidden(what));
                            }
                            if get_str(txn, fields, "kind").as_deref() == Some(Kind::System.as_str()) {
                                out.push(Touch::System(key.to_string()));
                            }
                            if let Some(message) = read_message(txn, key, fields) {
                                facts.messages.push(MessageFact {
                                    kind: message.kind.as_str().to_string(),
                                    preview: preview(&message.text),
                                    id: message.id,
                                    sort: message.sort,
                                    author: message.author,
                                    created_ms: message.created_ms,
                                    deleted: message.deleted,
                                });
                            }
                            let author = get_str(txn, fields, "author");
                            let what = format!("sending message {key} as {}", author.as_deref().unwrap_or("no author"));
                            Touch::Owner { user: author, what }
                        }
                    }
                    EntryChange::Inserted(_) => Touch::Forbidden(format!("message {key} is not a map")),
                    EntryChange::Updated(..) => Touch::Forbidden(format!("replacing message {key}")),
                    EntryChange::Removed(_) => Touch::Forbidden(format!("removing message {key}")),
                };
                out.push(touch);
            }
        }
        return;
    };
    let PathSegment::Key(id) = first else {
        out.push(Touch::Forbidden("a change below the messages map at an index".into()));
        return;
    };
    // A change inside an existing message: its author's alone, and only to the mutable fields.
    let author = match messages.get(txn, id) {
        Some(Out::YMap(fields)) => {
            // A system message is the server's: its "author" (the member it is about) does
            // not change it either.
            if get_str(txn, &fields, "kind").as_deref() == Some(Kind::System.as_str()) {
                out.push(Touch::System(id.to_string()));
            }
            if let Some(message) = read_message(txn, id, &fields) {
                facts.edits.push(EditFact {
                    preview: preview(&message.text),
                    id: message.id,
                    sort: message.sort,
                    deleted: message.deleted,
                });
            }
            get_str(txn, &fields, "author")
        }
        _ => None,
    };
    out.push(Touch::Owner {
        user: author,
        what: format!("changing message {id}"),
    });
    match (path.get(1), event) {
        (None, Event::Map(event)) => {
            for key in event.keys(txn).keys() {
                if !MUTABLE_FIELDS.contains(&&**key) {
                    out.push(Touch::Forbidden(format!("changing field {key} of message {id}")));
                }
            }
            // New metadata or attachments keep their shapes.
            if let Some(Out::YMap(fields)) = messages.get(txn, id) {
                let changed: Vec<&str> = event
                    .keys(txn)
                    .keys()
                    .map(|k| &**k)
                    .filter(|k| DETAIL_FIELDS.contains(k))
                    .collect();
                if let Err(what) = check_details(txn, id, &fields, &changed) {
                    out.push(Touch::Forbidden(what));
                }
            }
        }
        (None, _) => out.push(Touch::Forbidden(format!("message {id} is not a map"))),
        // Inside a field: only the text could hold a shared type (metadata and attachments are
        // plain data, so nothing can change inside them).
        (Some(PathSegment::Key(field)), _) if MUTABLE_FIELDS[..3].contains(&&**field) => {}
        (Some(segment), _) => out.push(Touch::Forbidden(format!("changing {segment:?} of message {id}"))),
    }
}

/// The stamp of new message `id`, if its `hlc`, `client` and `sort` fields follow the schema:
/// a valid [`Hlc::key`], an integer client id below 2^53, and `sort` = [`sort_key`] of them.
fn stamp(txn: &TransactionMut<'_>, id: &str, fields: &MapRef) -> std::result::Result<Hlc, String> {
    let hlc = get_str(txn, fields, "hlc")
        .as_deref()
        .and_then(Hlc::parse)
        .filter(Hlc::is_valid)
        .ok_or_else(|| format!("message {id}: its hlc is missing or not a valid stamp"))?;
    let client = get_any(txn, fields, "client")
        .as_ref()
        .and_then(any_u64)
        .filter(|&client| client <= MAX_CLIENT_ID)
        .ok_or_else(|| format!("message {id}: its client is missing or not an integer below 2^53"))?;
    if get_str(txn, fields, "sort").as_deref() != Some(sort_key(hlc, client, id).as_str()) {
        return Err(format!("message {id}: its sort is not {{hlc}}/{{client:016}}/{{id}}"));
    }
    Ok(hlc)
}

/// Records what one event under a receipts root (`receipts` or `delivered`) did: every touched
/// key belongs to the user named before its last `/`; an entry is `{message, sort[, at]}`, moves
/// only forward (its `sort` never decreases) and is never removed.
fn receipt_touches(
    txn: &TransactionMut<'_>,
    event: &Event,
    what: &str,
    out: &mut Vec<Touch>,
    raised: &mut Vec<ReadFact>,
) {
    let path = event.path();
    let owner = |key: &str| Touch::Owner {
        user: key.rsplit_once('/').map(|(user, _)| user.to_string()),
        what: format!("writing {what} {key}"),
    };
    let sort_of = |value: &Out| match value {
        Out::Any(Any::Map(fields)) => match (fields.get("message"), fields.get("sort")) {
            (Some(Any::String(_)), Some(Any::String(sort))) => Some(sort.to_string()),
            _ => None,
        },
        _ => None,
    };
    match path.front() {
        None => {
            if let Event::Map(event) = event {
                for (key, change) in event.keys(txn) {
                    out.push(owner(key));
                    if let (EntryChange::Inserted(new) | EntryChange::Updated(_, new), Some((user, _))) =
                        (change, key.rsplit_once('/'))
                    {
                        // A sort key is ~70 bytes; a longer one is nobody's message, and the
                        // index does not keep it.
                        if let Some(sort) = sort_of(new).filter(|sort| sort.len() <= 256) {
                            raised.push(ReadFact {
                                user: user.to_string(),
                                sort,
                            });
                        }
                    }
                    match change {
                        EntryChange::Inserted(new) if sort_of(new).is_none() => {
                            out.push(Touch::Forbidden(format!("{what} {key} is not {{message, sort, at}}")));
                        }
                        EntryChange::Inserted(_) => {}
                        EntryChange::Updated(old, new) => match (sort_of(old), sort_of(new)) {
                            (_, None) => {
                                out.push(Touch::Forbidden(format!("{what} {key} is not {{message, sort, at}}")))
                            }
                            (Some(old), Some(new)) if new < old => {
                                out.push(Touch::Forbidden(format!("moving {what} {key} back")));
                            }
                            _ => {}
                        },
                        EntryChange::Removed(_) => out.push(Touch::Forbidden(format!("removing {what} {key}"))),
                    }
                }
            }
        }
        Some(PathSegment::Key(key)) => {
            out.push(owner(key));
            out.push(Touch::Forbidden(format!("{what} {key} is not plain data")));
        }
        Some(PathSegment::Index(_)) => {
            out.push(Touch::Forbidden(format!("a change below the {what}s map at an index")))
        }
    }
}

/// Records what one event under the `reactions` root did: a key is
/// `"{message}/{reaction}/{user}"` and belongs to that user, who adds it (`{at}`) or removes it.
fn reaction_touches(txn: &TransactionMut<'_>, event: &Event, out: &mut Vec<Touch>) {
    let Event::Map(map_event) = event else {
        out.push(Touch::Forbidden("a change below the reactions map".into()));
        return;
    };
    if !event.path().is_empty() {
        out.push(Touch::Forbidden("a change inside a reaction".into()));
        return;
    }
    for (key, change) in map_event.keys(txn) {
        match parse_reaction_key(key) {
            Ok((_, _, user)) => out.push(Touch::Owner {
                user: Some(user.to_string()),
                what: format!("reacting as {user} ({key})"),
            }),
            Err(what) => out.push(Touch::Forbidden(what)),
        }
        match change {
            EntryChange::Inserted(Out::Any(Any::Map(_))) | EntryChange::Updated(_, Out::Any(Any::Map(_))) => {}
            EntryChange::Removed(_) => {}
            _ => out.push(Touch::Forbidden(format!("reaction {key} is not {{at}}"))),
        }
    }
}

/// The receipts key of a user's device.
pub fn receipt_key(user: &str, device: &str) -> String {
    format!("{user}/{device}")
}

fn any_u64(value: &Any) -> Option<u64> {
    details::any_u64(value)
}

fn get_any<T: ReadTxn>(txn: &T, map: &MapRef, key: &str) -> Option<Any> {
    match map.get(txn, key)? {
        Out::Any(any) => Some(any),
        _ => None,
    }
}

fn get_str<T: ReadTxn>(txn: &T, map: &MapRef, key: &str) -> Option<String> {
    match get_any(txn, map, key)? {
        Any::String(s) => Some(s.to_string()),
        _ => None,
    }
}

fn message_hlc<T: ReadTxn>(txn: &T, value: &Out) -> Option<Hlc> {
    match value {
        Out::YMap(fields) => Hlc::parse(&get_str(txn, fields, "hlc")?),
        _ => None,
    }
}

fn read_message<T: ReadTxn>(txn: &T, id: &str, fields: &MapRef) -> Option<Message> {
    let hlc = Hlc::parse(&get_str(txn, fields, "hlc")?)?;
    Some(Message {
        id: id.to_string(),
        author: get_str(txn, fields, "author")?,
        device: get_str(txn, fields, "device").unwrap_or_default(),
        client: get_any(txn, fields, "client").as_ref().and_then(any_u64).unwrap_or(0),
        text: get_str(txn, fields, "text").unwrap_or_default(),
        created_ms: get_any(txn, fields, "created").as_ref().and_then(any_u64).unwrap_or(0),
        hlc,
        sort: get_str(txn, fields, "sort")?,
        edited_ms: get_any(txn, fields, "edited").as_ref().and_then(any_u64),
        deleted: matches!(get_any(txn, fields, "deleted"), Some(Any::Bool(true))),
        // What a guarded server would have refused reads as absent.
        kind: get_str(txn, fields, "kind")
            .as_deref()
            .and_then(Kind::parse)
            .unwrap_or_default(),
        metadata: get_any(txn, fields, "meta")
            .and_then(|v| details::metadata_from_any(&v).ok())
            .unwrap_or_default(),
        attachments: get_any(txn, fields, "attachments")
            .and_then(|v| details::attachments_from_any(&v).ok())
            .unwrap_or_default(),
        reply_to: get_str(txn, fields, "reply_to"),
    })
}

/// Checks the optional fields of a message written with `fields`: `kind`, `meta`, `attachments`
/// and `reply_to` (absent ones pass).
fn check_details<T: ReadTxn>(txn: &T, id: &str, fields: &MapRef, keys: &[&str]) -> std::result::Result<(), String> {
    for &key in keys {
        let Some(value) = fields.get(txn, key) else { continue };
        let Out::Any(value) = value else {
            return Err(format!("message {id}: its {key} must be plain data, not a shared type"));
        };
        match key {
            "kind" => match &value {
                Any::String(kind) if Kind::parse(kind).is_some() => {}
                _ => {
                    return Err(format!(
                        "message {id}: its kind must be text, image, video, file or system"
                    ))
                }
            },
            "meta" => {
                details::metadata_from_any(&value).map_err(|e| format!("message {id}: {e}"))?;
            }
            "attachments" => {
                details::attachments_from_any(&value).map_err(|e| format!("message {id}: {e}"))?;
            }
            "reply_to" => match &value {
                Any::String(to) => {
                    details::check_message_ref(to).map_err(|e| format!("message {id}: reply_to: {e}"))?
                }
                _ => return Err(format!("message {id}: its reply_to must be a message id")),
            },
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::{apply_bytes, new_doc};

    fn room(client: u64) -> ChatRoom {
        ChatRoom::new(new_doc(client).unwrap())
    }

    fn who(user: &str, device: &str) -> Author {
        Author {
            user: user.into(),
            device: device.into(),
        }
    }

    #[test]
    fn send_edit_delete_and_order() {
        let a = room(1);
        let b = room(2);
        let ada = who("ada", "d1");
        let (m1, u1) = a.send(&ada, "hello", 1000);
        apply_bytes(b.doc(), &u1).unwrap();
        // Bob's wall clock is far behind; his reply still sorts after what he saw.
        let bob = who("bob", "d2");
        let (m2, u2) = b.send(&bob, "hi ada", 10);
        apply_bytes(a.doc(), &u2).unwrap();
        let order: Vec<_> = a.messages().into_iter().map(|m| m.id).collect();
        assert_eq!(order, vec![m1.clone(), m2.clone()]);
        assert_eq!(b.messages(), a.messages());

        assert!(matches!(b.edit(&bob, &m1, "forged", 20), Err(Error::NotAuthor(_))));
        assert!(matches!(b.delete(&bob, &m1, 20), Err(Error::NotAuthor(_))));
        let u3 = a.edit(&ada, &m1, "hello!", 1001).unwrap();
        apply_bytes(b.doc(), &u3).unwrap();
        assert_eq!(b.message(&m1).unwrap().text, "hello!");
        let u4 = b.delete(&bob, &m2, 30).unwrap();
        apply_bytes(a.doc(), &u4).unwrap();
        let m = a.message(&m2).unwrap();
        assert!(m.deleted && m.text.is_empty());
        assert!(matches!(a.edit(&ada, "nope", "x", 1), Err(Error::NoSuchMessage(_))));
    }

    #[test]
    fn clock_advances_on_received_messages() {
        let a = room(1);
        let b = room(2);
        let (_, u) = a.send(&who("ada", "d"), "x", 5_000_000);
        apply_bytes(b.doc(), &u).unwrap();
        assert!(b.clock() >= a.clock());
        // A room loaded from existing state seeds its clock from the messages in it.
        let c = room(3);
        apply_bytes(c.doc(), &crate::doc::encode_state(a.doc())).unwrap();
        let reloaded = ChatRoom::new(c.doc().clone());
        assert!(reloaded.clock() >= a.clock());
    }

    #[test]
    fn receipts_merge_per_device_and_never_move_back() {
        let a = room(1);
        let b = room(2);
        let ada = who("ada", "d1");
        let (m1, u1) = a.send(&ada, "one", 100);
        let (m2, u2) = a.send(&ada, "two", 200);
        let (m3, u3) = a.send(&ada, "three", 300);
        for u in [&u1, &u2, &u3] {
            apply_bytes(b.doc(), u).unwrap();
        }
        assert_eq!(b.unread_count("bob"), 3);
        assert_eq!(b.unread_count("ada"), 0);
        // Bob's phone reads up to m3 while his laptop, concurrently, reads up to m1.
        let phone = b.mark_read(&who("bob", "phone"), &m3, 400).unwrap().unwrap();
        let laptop = a.mark_read(&who("bob", "laptop"), &m1, 400).unwrap().unwrap();
        apply_bytes(a.doc(), &phone).unwrap();
        apply_bytes(b.doc(), &laptop).unwrap();
        for r in [&a, &b] {
            let receipt = r.receipt("bob").unwrap();
            assert_eq!(receipt.message, m3);
            assert_eq!(r.unread_count("bob"), 0);
            assert_eq!(r.read_by(&r.message(&m2).unwrap().sort), vec!["bob".to_string()]);
        }
        // Marking an earlier message changes nothing.
        assert_eq!(a.mark_read(&who("bob", "laptop"), &m2, 500).unwrap(), None);
        assert!(a.mark_read(&ada, "missing", 1).is_err());
    }

    /// The server's clock in the guard tests (the messages are stamped long before it).
    const NOW: u64 = 1_700_000_000_000;

    /// A server-side copy of a room with its guard.
    struct Judge {
        doc: Doc,
        guard: ChatGuard,
    }

    impl Judge {
        fn new() -> Judge {
            let doc = new_doc(99).unwrap();
            let guard = ChatGuard::attach(&doc);
            Judge { doc, guard }
        }

        /// Applies `update` as written by `user` and judges it at [`NOW`].
        fn judge(&self, update: &[u8], user: Option<&str>) -> Result<(), Violation> {
            self.judge_at(update, user, NOW)
        }

        /// Applies `update` as written by `user` and judges it at `now_ms`.
        fn judge_at(&self, update: &[u8], user: Option<&str>, now_ms: u64) -> Result<(), Violation> {
            self.guard.reset();
            apply_bytes(&self.doc, update).unwrap();
            self.guard.check(user, now_ms)
        }
    }

    /// Sets fields of message `id` in `room` directly, bypassing the room's own author check.
    fn raw_set(room: &ChatRoom, id: &str, fields: &[(&str, Any)]) -> Vec<u8> {
        let txn = room.doc().transact();
        let Some(Out::YMap(message)) = room.messages.get(&txn, id) else {
            panic!("no message {id}")
        };
        drop(txn);
        edit(room.doc(), |txn| {
            for (key, value) in fields {
                message.insert(txn, *key, value.clone());
            }
        })
        .1
    }

    #[test]
    fn guard_passes_legit_send_edit_delete_and_receipts() {
        let judge = Judge::new();
        let a = room(1);
        let b = room(2);
        let ada = who("ada", "d1");
        let bob = who("bob", "d2");
        let (m1, u1) = a.send(&ada, "hello", 1000);
        assert_eq!(judge.judge(&u1, Some("ada")), Ok(()));
        apply_bytes(b.doc(), &u1).unwrap();
        let (m2, u2) = b.send(&bob, "hi", 1001);
        assert_eq!(judge.judge(&u2, Some("bob")), Ok(()));
        apply_bytes(a.doc(), &u2).unwrap();
        let edit = a.edit(&ada, &m1, "hello!", 1002).unwrap();
        assert_eq!(judge.judge(&edit, Some("ada")), Ok(()));
        let delete = b.delete(&bob, &m2, 1003).unwrap();
        assert_eq!(judge.judge(&delete, Some("bob")), Ok(()));
        let read = b.mark_read(&bob, &m1, 1004).unwrap().unwrap();
        assert_eq!(judge.judge(&read, Some("bob")), Ok(()));
        // Other root types of a room are not checked.
        let other = crate::doc::map_set(a.doc(), "anything", 1.0);
        assert_eq!(judge.judge(&other, Some("bob")), Ok(()));
    }

    #[test]
    fn guard_refuses_a_forged_author() {
        let judge = Judge::new();
        let b = room(2);
        let (_, forged) = b.send(&who("ada", "d2"), "I am ada", 1000);
        let refused = judge.judge(&forged, Some("bob")).unwrap_err();
        assert!(refused.0.contains("as ada"), "{refused}");
        // An unauthenticated writer cannot be checked for ownership.
        let (_, forged) = b.send(&who("ada", "d2"), "again", 1001);
        assert_eq!(judge.judge(&forged, None), Ok(()));
    }

    #[test]
    fn guard_refuses_editing_or_deleting_someone_elses_message() {
        let judge = Judge::new();
        let a = room(1);
        let b = room(2);
        let (m1, u1) = a.send(&who("ada", "d1"), "hello", 1000);
        judge.judge(&u1, Some("ada")).unwrap();
        apply_bytes(b.doc(), &u1).unwrap();
        let forged = raw_set(&b, &m1, &[("text", Any::from("forged")), ("edited", Any::from(2000.0))]);
        assert!(judge.judge(&forged, Some("bob")).unwrap_err().0.contains("only ada"));
        let delete = raw_set(&b, &m1, &[("text", Any::from("")), ("deleted", Any::from(true))]);
        assert!(judge.judge(&delete, Some("bob")).unwrap_err().0.contains("only ada"));
        // Replacing the message with one of his own under the same key is no better.
        let (_, replace) = edit(b.doc(), |txn| {
            let fields = MapPrelim::from([("id", Any::from(m1.as_str())), ("author", Any::from("bob"))]);
            b.messages.insert(txn, m1.as_str(), fields);
        });
        assert!(judge.judge(&replace, Some("bob")).unwrap_err().0.contains("replacing"));
    }

    #[test]
    fn guard_refuses_changing_the_author_field() {
        let judge = Judge::new();
        let a = room(1);
        let b = room(2);
        let (m1, u1) = a.send(&who("ada", "d1"), "hello", 1000);
        judge.judge(&u1, Some("ada")).unwrap();
        apply_bytes(b.doc(), &u1).unwrap();
        // Bob claims Ada's message.
        let claim = raw_set(&b, &m1, &[("author", Any::from("bob"))]);
        assert!(judge.judge(&claim, Some("bob")).is_err());
        // Not even the author may hand her message to someone else, nor move it in the order.
        let give = raw_set(&a, &m1, &[("author", Any::from("bob"))]);
        assert!(judge.judge(&give, Some("ada")).is_err());
        let (m2, u2) = a.send(&who("ada", "d1"), "two", 1001);
        judge.judge(&u2, Some("ada")).unwrap();
        let resort = raw_set(&a, &m2, &[("sort", Any::from("0"))]);
        assert!(judge.judge(&resort, Some("ada")).is_err());
    }

    #[test]
    fn guard_refuses_removing_or_replacing_a_message() {
        let judge = Judge::new();
        let a = room(1);
        let (m1, u1) = a.send(&who("ada", "d1"), "hello", 1000);
        judge.judge(&u1, Some("ada")).unwrap();
        let (_, remove) = edit(a.doc(), |txn| {
            a.messages.remove(txn, &m1);
        });
        assert!(judge.judge(&remove, Some("ada")).unwrap_err().0.contains("removing"));
        // A message that is not a map, or whose id differs from its key.
        let (_, plain) = edit(a.doc(), |txn| {
            a.messages.insert(txn, "m-plain", "text");
        });
        assert!(judge.judge(&plain, Some("ada")).is_err());
        let (_, mismatched) = edit(a.doc(), |txn| {
            let fields = MapPrelim::from([("id", Any::from("other")), ("author", Any::from("ada"))]);
            a.messages.insert(txn, "m-key", fields);
        });
        assert!(judge.judge(&mismatched, Some("ada")).is_err());
        // Structural rules bind unauthenticated writers too.
        let (m2, u2) = a.send(&who("ada", "d1"), "two", 1001);
        judge.judge(&u2, None).unwrap();
        let (_, remove) = edit(a.doc(), |txn| {
            a.messages.remove(txn, &m2);
        });
        assert!(judge.judge(&remove, None).is_err());
    }

    fn picture() -> Attachment {
        Attachment {
            url: "https://cdn.example/cat.png".into(),
            mime: "image/png".into(),
            size: 48_213,
            sha256: Some("0f".repeat(32)),
            width: Some(800),
            height: Some(600),
        }
    }

    #[test]
    fn kinds_metadata_attachments_replies_reactions_and_deliveries_round_trip_and_pass() {
        let judge = Judge::new();
        let a = room(1);
        let b = room(2);
        let ada = who("ada", "d1");
        let bob = who("bob", "d2");
        let (m1, u1) = a.send(&ada, "look", 1000);
        judge.judge(&u1, Some("ada")).unwrap();
        apply_bytes(b.doc(), &u1).unwrap();
        let photo = NewMessage {
            text: "a cat".into(),
            kind: Kind::Image,
            metadata: BTreeMap::from([("caption".into(), "Tom".into())]),
            attachments: vec![picture()],
            reply_to: Some(m1.clone()),
        };
        let (m2, u2) = b.send_message(&bob, &photo, 1001).unwrap();
        assert_eq!(judge.judge(&u2, Some("bob")), Ok(()));
        apply_bytes(a.doc(), &u2).unwrap();
        let seen = a.message(&m2).unwrap();
        assert_eq!((seen.kind, seen.text.as_str()), (Kind::Image, "a cat"));
        assert_eq!(seen.metadata, photo.metadata);
        assert_eq!(seen.attachments, vec![picture()]);
        assert_eq!(seen.reply_to.as_deref(), Some(m1.as_str()));
        assert_eq!(a.message(&m1).unwrap().kind, Kind::Text);

        let like = a.react(&ada, &m2, "👍", true, 1002).unwrap().unwrap();
        assert_eq!(judge.judge(&like, Some("ada")), Ok(()));
        assert_eq!(a.react(&ada, &m2, "👍", true, 1003).unwrap(), None, "already there");
        let party = b.react(&bob, &m2, "🎉", true, 1004).unwrap().unwrap();
        assert_eq!(judge.judge(&party, Some("bob")), Ok(()));
        apply_bytes(a.doc(), &party).unwrap();
        assert_eq!(
            a.reactions(&m2),
            BTreeMap::from([
                ("👍".to_string(), vec!["ada".to_string()]),
                ("🎉".to_string(), vec!["bob".to_string()])
            ])
        );
        let unlike = a.react(&ada, &m2, "👍", false, 1005).unwrap().unwrap();
        assert_eq!(judge.judge(&unlike, Some("ada")), Ok(()));
        assert_eq!(a.reactions(&m2).len(), 1);
        assert!(a.react(&ada, &m2, "a b", true, 1).is_err());
        assert!(a.react(&ada, "missing", "👍", true, 1).is_err());

        let got = a.mark_delivered(&ada, &m2, 1006).unwrap().unwrap();
        assert_eq!(judge.judge(&got, Some("ada")), Ok(()));
        apply_bytes(b.doc(), &got).unwrap();
        assert_eq!(b.delivered_to(&seen.sort), vec!["ada".to_string()]);
        assert_eq!(a.mark_delivered(&ada, &m1, 1007).unwrap(), None, "never back");

        let details = b
            .set_details(
                &bob,
                &m2,
                &BTreeMap::from([("caption".into(), "Tom, asleep".into())]),
                &[],
                1008,
            )
            .unwrap();
        assert_eq!(judge.judge(&details, Some("bob")), Ok(()));
        apply_bytes(a.doc(), &details).unwrap();
        assert!(a.message(&m2).unwrap().attachments.is_empty());
        assert!(a.set_details(&ada, &m2, &BTreeMap::new(), &[], 1).is_err(), "not ada's");
        let too_many = NewMessage {
            attachments: vec![picture(); MAX_ATTACHMENTS + 1],
            ..NewMessage::text("x")
        };
        assert!(a.send_message(&ada, &too_many, 1).is_err());
    }

    #[test]
    fn guard_refuses_system_messages_bad_details_and_others_details() {
        let judge = Judge::new();
        let a = room(1);
        let b = room(2);
        let ada = who("ada", "d1");
        let system = NewMessage {
            kind: Kind::System,
            ..NewMessage::text("ada joined")
        };
        let (_, forged) = a.send_message(&ada, &system, 1000).unwrap();
        let refused = judge.judge(&forged, Some("ada")).unwrap_err();
        assert!(refused.0.contains("system message"), "{refused}");
        // Not on an open server either.
        let (_, forged) = a.send_message(&ada, &system, 1001).unwrap();
        assert!(judge.judge(&forged, None).is_err());

        let (m1, u1) = a.send_message(&ada, &NewMessage::text("hi"), 1002).unwrap();
        judge.judge(&u1, Some("ada")).unwrap();
        apply_bytes(b.doc(), &u1).unwrap();
        // Bad shapes, written raw.
        for (key, value) in [
            ("kind", Any::from("sticker")),
            ("meta", Any::from("not an object")),
            ("attachments", Any::from(vec![Any::from("https://x")])),
            ("reply_to", Any::from(3.0)),
        ] {
            let bad = raw_message(
                &a,
                "m-bad",
                with(
                    fields("m-bad", "ada", 1, "000000000001003.0000000000"),
                    key,
                    Some(value),
                ),
            );
            assert!(judge.judge(&bad, Some("ada")).is_err(), "{key}");
        }
        // Someone else's metadata or attachments.
        let meta = raw_set(
            &b,
            &m1,
            &[(
                "meta",
                details::metadata_to_any(&BTreeMap::from([("k".into(), "v".into())])),
            )],
        );
        assert!(judge.judge(&meta, Some("bob")).unwrap_err().0.contains("only ada"));
        let attach = raw_set(&b, &m1, &[("attachments", details::attachments_to_any(&[picture()]))]);
        assert!(judge.judge(&attach, Some("bob")).unwrap_err().0.contains("only ada"));
        // The author's own, but malformed (on a message nobody else touched: concurrent values
        // of one key resolve by client id).
        let (m3, u3) = a.send(&ada, "three", 1003);
        judge.judge(&u3, Some("ada")).unwrap();
        let bad_own = raw_set(&a, &m3, &[("attachments", Any::from("nope"))]);
        assert!(judge.judge(&bad_own, Some("ada")).is_err());
        // Kind and reply are fixed once sent.
        let rekind = raw_set(&a, &m3, &[("kind", Any::from("file"))]);
        assert!(judge.judge(&rekind, Some("ada")).is_err());
    }

    #[test]
    fn guard_refuses_forged_deliveries_and_reactions_and_receipts_moving_back() {
        let judge = Judge::new();
        let a = room(1);
        let b = room(2);
        let ada = who("ada", "d1");
        let (m1, u1) = a.send(&ada, "one", 1000);
        let (m2, u2) = a.send(&ada, "two", 1001);
        for u in [&u1, &u2] {
            judge.judge(u, Some("ada")).unwrap();
            apply_bytes(b.doc(), u).unwrap();
        }
        let forged = b.mark_delivered(&who("carol", "x"), &m1, 1002).unwrap().unwrap();
        assert!(judge
            .judge(&forged, Some("bob"))
            .unwrap_err()
            .0
            .contains("delivery receipt carol/x"));
        let forged = b.react(&who("carol", "x"), &m1, "👎", true, 1003).unwrap().unwrap();
        assert!(judge.judge(&forged, Some("bob")).unwrap_err().0.contains("as carol"));
        // Taking back someone else's reaction.
        let hers = a.react(&ada, &m1, "❤️", true, 1004).unwrap().unwrap();
        judge.judge(&hers, Some("ada")).unwrap();
        apply_bytes(b.doc(), &hers).unwrap();
        let (_, unsay) = edit(b.doc(), |txn| {
            b.reactions.remove(txn, &reaction_key(&m1, "❤️", "ada"));
        });
        assert!(judge.judge(&unsay, Some("bob")).is_err());
        let (_, junk) = edit(b.doc(), |txn| {
            b.reactions.insert(txn, "no-slashes", Any::from(true));
        });
        assert!(judge.judge(&junk, Some("bob")).is_err());

        // Receipts move forward only, and stay.
        let bob = who("bob", "d2");
        let read = b.mark_read(&bob, &m2, 1005).unwrap().unwrap();
        judge.judge(&read, Some("bob")).unwrap();
        let m1_sort = b.message(&m1).unwrap().sort;
        let (_, back) = edit(b.doc(), |txn| {
            let value = Any::from(std::collections::HashMap::from([
                ("message".to_string(), Any::from(m1.as_str())),
                ("sort".to_string(), Any::from(m1_sort.as_str())),
            ]));
            b.receipts.insert(txn, "bob/d2", value);
        });
        assert!(judge.judge(&back, Some("bob")).unwrap_err().0.contains("back"));
        let (_, removed) = edit(b.doc(), |txn| {
            b.delivered.insert(
                txn,
                "bob/d2",
                Any::from(std::collections::HashMap::from([
                    ("message".to_string(), Any::from(m2.as_str())),
                    ("sort".to_string(), Any::from("z")),
                ])),
            );
        });
        judge.judge(&removed, Some("bob")).unwrap();
        let (_, removed) = edit(b.doc(), |txn| {
            b.delivered.remove(txn, "bob/d2");
        });
        assert!(judge.judge(&removed, Some("bob")).unwrap_err().0.contains("removing"));
        let (_, shapeless) = edit(b.doc(), |txn| {
            b.receipts.insert(txn, "bob/d3", Any::from("read"));
        });
        assert!(judge.judge(&shapeless, Some("bob")).is_err());
    }

    #[test]
    fn guard_refuses_a_receipt_for_another_user() {
        let judge = Judge::new();
        let a = room(1);
        let b = room(2);
        let (m1, u1) = a.send(&who("ada", "d1"), "hello", 1000);
        judge.judge(&u1, Some("ada")).unwrap();
        apply_bytes(b.doc(), &u1).unwrap();
        let forged = b.mark_read(&who("carol", "d2"), &m1, 1001).unwrap().unwrap();
        assert!(judge.judge(&forged, Some("bob")).unwrap_err().0.contains("carol/d2"));
        // The user is what precedes the last '/': "bob/x/y" is a receipt of user "bob/x".
        let (_, nested) = edit(b.doc(), |txn| {
            b.receipts.insert(txn, "bob/x/y", "whatever");
        });
        assert!(judge.judge(&nested, Some("bob")).is_err());
        // Removing someone else's receipt is writing it too.
        let mine = a.mark_read(&who("ada", "d1"), &m1, 1002).unwrap().unwrap();
        judge.judge(&mine, Some("ada")).unwrap();
        apply_bytes(b.doc(), &mine).unwrap();
        let (_, removed) = edit(b.doc(), |txn| {
            b.receipts.remove(txn, "ada/d1");
        });
        assert!(judge.judge(&removed, Some("bob")).is_err());
    }

    /// The fields of a well-formed message `id` by `author` from client `client` stamped `hlc`.
    fn fields(id: &str, author: &str, client: u64, hlc: &str) -> Vec<(&'static str, Any)> {
        let sort = format!("{hlc}/{client:016}/{id}");
        vec![
            ("id", Any::from(id)),
            ("author", Any::from(author)),
            ("device", Any::from("d1")),
            ("client", Any::from(client as f64)),
            ("text", Any::from("hi")),
            ("created", Any::from(1000.0)),
            ("hlc", Any::from(hlc)),
            ("sort", Any::from(sort)),
        ]
    }

    /// An update inserting message `id` with exactly `fields`, bypassing `ChatRoom::send`.
    fn raw_message(room: &ChatRoom, id: &str, fields: Vec<(&'static str, Any)>) -> Vec<u8> {
        edit(room.doc(), |txn| {
            room.messages.insert(txn, id, fields.into_iter().collect::<MapPrelim>());
        })
        .1
    }

    /// `fields` with `key` set to `value` (or removed, for `None`).
    fn with(mut fields: Vec<(&'static str, Any)>, key: &'static str, value: Option<Any>) -> Vec<(&'static str, Any)> {
        fields.retain(|(k, _)| *k != key);
        if let Some(value) = value {
            fields.push((key, value));
        }
        fields
    }

    #[test]
    fn guard_refuses_an_overflowing_or_far_future_stamp() {
        let judge = Judge::new();
        let a = room(1);
        // The attack: the largest stamp the key can express sorts after every later reply.
        let overflow = raw_message(
            &a,
            "m-overflow",
            fields("m-overflow", "ada", 1, "999999999999999.4294967295"),
        );
        let refused = judge.judge(&overflow, Some("ada")).unwrap_err();
        assert!(refused.0.contains("not a valid stamp"), "{refused}");
        // Whoever writes it, an open server included.
        let overflow = raw_message(
            &a,
            "m-overflow2",
            fields("m-overflow2", "ada", 1, "000000000000005.2147483648"),
        );
        assert!(judge.judge(&overflow, None).is_err());
        // A valid stamp, but six minutes ahead of the server's clock: refused now, accepted
        // once the server's clock is within the bound.
        let ahead = Hlc {
            wall_ms: NOW + 6 * 60 * 1000,
            counter: 0,
        };
        let early = raw_message(&a, "m-early", fields("m-early", "ada", 1, &ahead.key()));
        let refused = judge.judge(&early, Some("ada")).unwrap_err();
        assert!(refused.0.contains("ahead of the server's clock"), "{refused}");
        assert!(Judge::new().judge(&early, None).is_err());
        let early = raw_message(&a, "m-early2", fields("m-early2", "ada", 1, &ahead.key()));
        assert_eq!(judge.judge_at(&early, Some("ada"), NOW + 60 * 1000), Ok(()));
        // At the bound exactly: accepted; the largest valid counter too.
        let bound = Hlc {
            wall_ms: NOW + DEFAULT_MAX_CLOCK_SKEW_MS,
            counter: crate::clock::MAX_COUNTER,
        };
        let edge = raw_message(&a, "m-edge", fields("m-edge", "ada", 1, &bound.key()));
        assert_eq!(judge.judge(&edge, Some("ada")), Ok(()));
        // The bound is the server's to choose.
        let doc = new_doc(96).unwrap();
        let guard = ChatGuard::attach(&doc).with_max_clock_skew(1_000);
        assert_eq!(guard.max_clock_skew_ms(), 1_000);
        let strict = Judge { doc, guard };
        let soon = Hlc {
            wall_ms: NOW + 1_001,
            counter: 0,
        };
        let m = raw_message(&a, "m-soon", fields("m-soon", "ada", 1, &soon.key()));
        assert!(strict.judge(&m, Some("ada")).is_err());
        let m = raw_message(&a, "m-soon2", fields("m-soon2", "ada", 1, &soon.key()));
        assert_eq!(strict.judge_at(&m, Some("ada"), NOW + 1), Ok(()));
        // Messages sent by a ChatRoom at the server's time pass.
        let (_, sent) = a.send(&who("ada", "d1"), "now", NOW);
        assert_eq!(judge.judge(&sent, Some("ada")), Ok(()));
    }

    #[test]
    fn guard_refuses_malformed_or_inconsistent_stamps() {
        let judge = Judge::new();
        let open = Judge::new();
        let a = room(1);
        let hlc = "001700000000000.0000000000";
        let good = fields("m1", "ada", 7, hlc);
        let cases: Vec<(&str, Vec<(&'static str, Any)>)> = vec![
            ("no hlc", with(good.clone(), "hlc", None)),
            ("hlc not a string", with(good.clone(), "hlc", Some(Any::from(5.0)))),
            (
                "hlc of another form",
                with(good.clone(), "hlc", Some(Any::from("1700000000000.0"))),
            ),
            ("no client", with(good.clone(), "client", None)),
            (
                "client not an integer",
                with(good.clone(), "client", Some(Any::from(7.5))),
            ),
            (
                "client of 2^53",
                with(good.clone(), "client", Some(Any::from(9_007_199_254_740_992.0))),
            ),
            (
                "client not a number",
                with(good.clone(), "client", Some(Any::from("7"))),
            ),
            ("no sort", with(good.clone(), "sort", None)),
            (
                "sort of another hlc",
                with(
                    good.clone(),
                    "sort",
                    Some(Any::from(format!("001700000000001.0000000000/{:016}/m1", 7))),
                ),
            ),
            (
                "sort of another client",
                with(good.clone(), "sort", Some(Any::from(format!("{hlc}/{:016}/m1", 8)))),
            ),
            (
                "sort of another id",
                with(good.clone(), "sort", Some(Any::from(format!("{hlc}/{:016}/m2", 7)))),
            ),
            (
                "sort unpadded",
                with(good.clone(), "sort", Some(Any::from(format!("{hlc}/7/m1")))),
            ),
            ("sort first", with(good.clone(), "sort", Some(Any::from("0")))),
        ];
        for (i, (case, fields)) in cases.into_iter().enumerate() {
            let id = format!("c{i}");
            // The same fields under a fresh id (each refused update is undone by reloading in a
            // server; here each case inserts a new key so that it is judged as new).
            let fields = fields
                .into_iter()
                .map(|(k, v)| match (k, &v) {
                    ("id", _) => (k, Any::from(id.as_str())),
                    ("sort", Any::String(sort)) => (k, Any::from(sort.replace("/m1", &format!("/{id}")).as_str())),
                    _ => (k, v),
                })
                .collect();
            let update = raw_message(&a, &id, fields);
            assert!(judge.judge(&update, Some("ada")).is_err(), "{case} was accepted");
            assert!(
                open.judge(&update, None).is_err(),
                "{case} was accepted from an open server"
            );
        }
        let fine = raw_message(&a, "m1", good);
        assert_eq!(judge.judge(&fine, Some("ada")), Ok(()));
        // An edit cannot restamp a message, not even its author's.
        let restamp = raw_set(&a, "m1", &[("hlc", Any::from("001700000000009.0000000000"))]);
        assert!(judge.judge(&restamp, Some("ada")).unwrap_err().0.contains("hlc"));
        let reclient = raw_set(&a, "m1", &[("client", Any::from(8.0))]);
        assert!(judge.judge(&reclient, Some("ada")).is_err());
    }

    /// The server's join and leave messages: nobody but the server writes or changes them —
    /// not even the member they name (their "author"); and each user joins only themselves.
    #[test]
    fn system_messages_and_memberships() {
        let judge = Judge::new();
        let (id, system) = system_message("ada", "joined", 1_000).unwrap();
        judge.guard.reset();
        apply_bytes(&judge.doc, &system).unwrap();
        let facts = judge.guard.take_facts();
        assert_eq!(facts.messages.len(), 1);
        assert!(!facts.messages[0].counted(), "system messages are never unread");
        // Ada's replica edits or deletes "ada joined": refused.
        let ada = room(5);
        apply_bytes(ada.doc(), &system).unwrap();
        let edit = ada.edit(&who("ada", "d"), &id, "ada owns this room", NOW).unwrap();
        assert!(judge.judge(&edit, Some("ada")).is_err());
        let delete = ada.delete(&who("ada", "d"), &id, NOW).unwrap();
        assert!(judge.judge(&delete, Some("ada")).is_err());
        // Joining is one's own: bob's entry written by ada is refused.
        let join = room(6).join(&who("bob", "d"), 2_000).unwrap();
        assert!(judge.judge(&join, Some("ada")).is_err());
        // (A server reloads after a refusal: a fresh judge for the next.)
        let judge = Judge::new();
        assert_eq!(judge.judge(&join, Some("bob")), Ok(()));
        let facts = judge.guard.take_facts();
        assert_eq!(facts.members.len(), 1);
        // A first "left" (never a member) announces nothing.
        let leave = room(7).leave(&who("carol", "d"), 2_000);
        assert!(leave.is_none(), "not a member: nothing to leave");
    }

    #[test]
    fn reset_forgets_what_was_recorded() {
        let judge = Judge::new();
        let b = room(2);
        let (_, forged) = b.send(&who("ada", "d2"), "x", 1000);
        apply_bytes(&judge.doc, &forged).unwrap();
        judge.guard.reset();
        assert_eq!(judge.guard.check(Some("bob"), NOW), Ok(()));
    }
}
