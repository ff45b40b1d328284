//! What the simulation compares and checks: a document's visible state, and whether a batch is
//! contained in the store's document.

use driftsync_engine::chat::{ChatRoom, Message, Receipt};
use driftsync_engine::doc::{load_document, text};
use driftsync_engine::sync::{apply_remote, Applied, Limits};
use std::collections::BTreeMap;
use yrs::{Doc, ReadTxn, Transact};

/// What every replica of a document must agree on: its state vector, its text and, for chat
/// rooms, its messages in display order and its receipts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// (client id, clock), sorted.
    pub state_vector: Vec<(u64, u32)>,
    /// The root text.
    pub text: String,
    /// Chat messages in display order (empty for text documents).
    pub messages: Vec<Message>,
    /// Effective receipts per user.
    pub receipts: BTreeMap<String, Receipt>,
}

impl Fingerprint {
    /// The first difference to `other`, in words, if any.
    pub fn difference(&self, other: &Fingerprint) -> Option<String> {
        if self.state_vector != other.state_vector {
            return Some(format!(
                "state vectors differ: {:?} vs {:?}",
                self.state_vector, other.state_vector
            ));
        }
        if self.text != other.text {
            return Some(format!("texts differ: {:?} vs {:?}", self.text, other.text));
        }
        if self.messages != other.messages {
            let a: Vec<&str> = self.messages.iter().map(|m| m.sort.as_str()).collect();
            let b: Vec<&str> = other.messages.iter().map(|m| m.sort.as_str()).collect();
            return Some(format!("chat messages differ: {a:?} vs {b:?}"));
        }
        if self.receipts != other.receipts {
            return Some(format!("receipts differ: {:?} vs {:?}", self.receipts, other.receipts));
        }
        None
    }
}

/// The fingerprint of a document; `room` is the replica's own chat room over it, if it has one
/// (a second `ChatRoom` over the same document would replace the first one's clock observer).
pub fn fingerprint(doc: &Doc, room: Option<&ChatRoom>, chat: bool) -> Fingerprint {
    let mut state_vector: Vec<(u64, u32)> = doc
        .transact()
        .state_vector()
        .iter()
        .map(|(client, clock)| (client.get(), *clock))
        .collect();
    state_vector.sort_unstable();
    let (messages, receipts) = match (room, chat) {
        (Some(room), _) => (room.messages(), room.receipts()),
        (None, true) => {
            let room = ChatRoom::new(doc.clone());
            (room.messages(), room.receipts())
        }
        (None, false) => (Vec::new(), BTreeMap::new()),
    };
    Fingerprint {
        state_vector,
        text: text(doc),
        messages,
        receipts,
    }
}

/// The store's document `doc`, loaded as a fresh replica (an empty one if it was never stored).
pub fn store_doc(store: &crate::store::MemStore, doc: &str) -> Result<Doc, String> {
    match store.stored(doc) {
        Some(stored) => load_document(doc, &stored, 1).map_err(|e| format!("the store's {doc} does not load: {e}")),
        None => driftsync_engine::doc::new_doc(1).map_err(|e| e.to_string()),
    }
}

/// Whether everything `update` carries is in `doc` already (applying it changes nothing).
/// `doc` is changed when it is not.
pub fn contains(doc: &Doc, update: &[u8]) -> Result<bool, String> {
    match apply_remote(
        doc,
        update,
        &Limits {
            max_pending_bytes: usize::MAX,
        },
    ) {
        Ok(Applied::Unchanged) => Ok(true),
        Ok(_) => Ok(false),
        Err(e) => Err(format!("an acknowledged batch does not decode: {e}")),
    }
}
