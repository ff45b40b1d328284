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
//! Messages are ordered by their `sort` string, `"{hlc}/{client:016}/{id}"`: HLC, then client
//! id, then message id. Every replica holding the same messages shows them in the same order.
//!
//! Messages are created once with a fresh id, so no two replicas ever create the same nested map
//! concurrently (which in Yjs would lose one of them); receipts are flat for the same reason.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use yrs::types::EntryChange;
use yrs::{Any, Doc, Map, MapPrelim, MapRef, Observable, Out, ReadTxn, Transact, TransactionMut};

use crate::clock::{Hlc, HlcClock};
use crate::doc::edit;
use crate::{Error, Result};

/// Root map of the messages.
pub const MESSAGES_ROOT: &str = "messages";
/// Root map of the read receipts.
pub const RECEIPTS_ROOT: &str = "receipts";

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
        let id = uuid::Uuid::now_v7().to_string();
        let hlc = self.clock.lock().unwrap_or_else(PoisonError::into_inner).tick(now_ms);
        let client = self.doc.client_id().get();
        let sort = sort_key(hlc, client, &id);
        let prelim = MapPrelim::from([
            ("id", Any::from(id.as_str())),
            ("author", Any::from(author.user.as_str())),
            ("device", Any::from(author.device.as_str())),
            ("client", Any::from(client as f64)),
            ("text", Any::from(text)),
            ("created", Any::from(now_ms as f64)),
            ("hlc", Any::from(hlc.key())),
            ("sort", Any::from(sort)),
        ]);
        let ((), update) = edit(&self.doc, |txn| {
            self.messages.insert(txn, id.as_str(), prelim);
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
        let message = self.message(id).ok_or_else(|| Error::NoSuchMessage(id.to_string()))?;
        if let Some(current) = self.receipt(&author.user) {
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
            self.receipts.insert(txn, key, value);
        });
        Ok(Some(update))
    }

    /// Every user's effective receipt (the latest over their devices).
    pub fn receipts(&self) -> BTreeMap<String, Receipt> {
        let txn = self.doc.transact();
        let mut out: BTreeMap<String, Receipt> = BTreeMap::new();
        for (key, value) in self.receipts.iter(&txn) {
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

    /// Messages after the user's receipt that others wrote and that are not deleted.
    pub fn unread_count(&self, user: &str) -> usize {
        let read = self.receipt(user).map(|r| r.sort);
        self.messages()
            .iter()
            .filter(|m| !m.deleted && m.author != user && read.as_deref().is_none_or(|r| m.sort.as_str() > r))
            .count()
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

/// The receipts key of a user's device.
pub fn receipt_key(user: &str, device: &str) -> String {
    format!("{user}/{device}")
}

fn any_u64(value: &Any) -> Option<u64> {
    match value {
        Any::Number(n) => n.as_i64().and_then(|v| u64::try_from(v).ok()),
        _ => None,
    }
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
    })
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
}
