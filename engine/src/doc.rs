//! yrs documents as driftsync uses them.
//!
//! Every document is a plain yrs `Doc` whose offsets count UTF-16 code units, as JavaScript Yjs
//! does, so positions mean the same on every client. Collaborative text lives in the root
//! `Y.Text` named [`TEXT_ROOT`], key/value data in the root `Y.Map` named [`MAP_ROOT`].
//!
//! Bytes from the network or from the store are decoded only through [`decode_update`] and
//! [`decode_state_vector`], which check the bytes' structure with [`crate::validate`] before
//! yrs sees them and turn every failure — including a panic inside yrs on hostile input — into a
//! typed error.

use std::panic::{catch_unwind, AssertUnwindSafe};

use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{
    Any, ClientID, Doc, GetString, Map, OffsetKind, Options, ReadTxn, StateVector, Text, Transact, Update, WriteTxn,
};

use crate::store::StoredDoc;
use crate::{validate, Error, Result};

/// Name of the root `Y.Text` of a text document (what `y-websocket` editors bind to as `text`).
pub const TEXT_ROOT: &str = "text";
/// Name of the root `Y.Map` for key/value data.
pub const MAP_ROOT: &str = "map";
/// Client ids must stay below this (JavaScript numbers hold 53 bits exactly).
pub const MAX_CLIENT_ID: u64 = validate::MAX_CLIENT_ID;

/// A fresh random client id in `1..2^53`.
///
/// A client id identifies one replica's edits. It is created once per device store, persisted,
/// and never used by another device: two live replicas with the same id corrupt documents.
pub fn new_client_id() -> u64 {
    rand::random_range(1..MAX_CLIENT_ID)
}

/// Creates an empty document that edits as `client_id` (which must be below 2^53).
pub fn new_doc(client_id: u64) -> Result<Doc> {
    if client_id == 0 || client_id >= MAX_CLIENT_ID {
        return Err(Error::Invalid(format!("client id {client_id} is not in 1..2^53")));
    }
    let mut options = Options::with_client_id(ClientID::new(client_id));
    options.offset_kind = OffsetKind::Utf16;
    Ok(Doc::with_options(options))
}

/// Decodes a yrs v1 update from untrusted bytes.
///
/// The bytes are checked by [`validate::check_update`] first, so yrs never sees a count the
/// input cannot pay for, `Any` values nested deeper than [`validate::MAX_ANY_DEPTH`], clocks
/// beyond `u32::MAX`, client ids of 2^53 or more, or trailing bytes.
pub fn decode_update(bytes: &[u8]) -> Result<Update> {
    decode_update_with_summary(bytes).map(|(update, _)| update)
}

/// [`decode_update`], also returning what the check learned about the update (its client
/// groups, the IDs it references, its delete set): see [`validate::dependencies_satisfied`].
pub fn decode_update_with_summary(bytes: &[u8]) -> Result<(Update, validate::UpdateSummary)> {
    let summary = validate::check_update(bytes).map_err(|e| Error::InvalidUpdate(e.to_string()))?;
    match catch_unwind(AssertUnwindSafe(|| Update::decode_v1(bytes))) {
        Ok(Ok(update)) => Ok((update, summary)),
        Ok(Err(e)) => Err(Error::InvalidUpdate(e.to_string())),
        Err(_) => Err(Error::InvalidUpdate("decoder panicked".into())),
    }
}

/// Decodes a yrs v1 state vector from untrusted bytes (checked by
/// [`validate::check_state_vector`] first).
pub fn decode_state_vector(bytes: &[u8]) -> Result<StateVector> {
    validate::check_state_vector(bytes).map_err(|e| Error::InvalidStateVector(e.to_string()))?;
    match catch_unwind(AssertUnwindSafe(|| StateVector::decode_v1(bytes))) {
        Ok(Ok(sv)) => {
            if sv.iter().any(|(client, _)| client.get() >= MAX_CLIENT_ID) {
                return Err(Error::InvalidStateVector("client id above 2^53".into()));
            }
            Ok(sv)
        }
        Ok(Err(e)) => Err(Error::InvalidStateVector(e.to_string())),
        Err(_) => Err(Error::InvalidStateVector("decoder panicked".into())),
    }
}

/// Applies a decoded update to a document, turning a panic inside yrs into an error.
///
/// After an `Err` the document may hold part of the update; callers that must stay exact (the
/// server) validate updates on a scratch copy or reload the document from the store.
///
/// What waits for predecessors is retried as one update until it stops making progress: yrs
/// merges every update that has to wait into one pending update, and records what it misses per
/// update, not for the merge. When a waiting update depends on another that is waiting too, the
/// merge can end up "missing" blocks it holds itself — and yrs then never retries it, though
/// nothing else is missing (the seeded convergence test found a replica stuck like that, seed
/// 3747168694096838674). Applied as one update, the pending blocks integrate in dependency order.
///
/// Returns whether the document changed: `false` when it already held everything the update
/// carries (a re-sent batch), or when all of it waits for predecessors.
pub fn apply(doc: &Doc, update: Update) -> Result<bool> {
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut txn = doc.transact_mut();
        txn.apply_update(update)?;
        while txn.has_missing_updates() {
            let before = txn.state_vector();
            let Some(pending) = txn.prune_pending() else { break };
            txn.apply_update(pending)?;
            if txn.state_vector() == before {
                break;
            }
        }
        Ok::<bool, yrs::error::UpdateError>(!txn.insert_set().is_empty() || !txn.delete_set().is_empty())
    }));
    match result {
        Ok(Ok(changed)) => Ok(changed),
        Ok(Err(e)) => Err(Error::InvalidUpdate(e.to_string())),
        Err(_) => Err(Error::InvalidUpdate("applying the update panicked".into())),
    }
}

/// Decodes and applies untrusted update bytes.
pub fn apply_bytes(doc: &Doc, bytes: &[u8]) -> Result<()> {
    apply(doc, decode_update(bytes)?).map(drop)
}

/// The document's state vector, v1-encoded.
pub fn state_vector(doc: &Doc) -> Vec<u8> {
    doc.transact().state_vector().encode_v1()
}

/// The whole document as one v1 update (including updates still waiting for predecessors).
pub fn encode_state(doc: &Doc) -> Vec<u8> {
    doc.transact().encode_state_as_update_v1(&StateVector::default())
}

/// Rebuilds a stored document: the snapshot, then every log entry after it, in order.
///
/// Every undecodable row is an [`Error::Corrupt`] naming the document and the row; nothing is
/// skipped, so a damaged document is refused rather than served with silent holes.
pub fn load_document(doc_id: &str, stored: &StoredDoc, client_id: u64) -> Result<Doc> {
    let doc = new_doc(client_id)?;
    let corrupt = |what: String, e: Error| Error::Corrupt {
        doc: doc_id.to_string(),
        reason: format!("{what}: {e}"),
    };
    if let Some(snapshot) = &stored.snapshot {
        apply_bytes(&doc, snapshot)
            .map_err(|e| corrupt(format!("snapshot at cursor {}", stored.snapshot_cursor), e))?;
    }
    for entry in &stored.tail {
        apply_bytes(&doc, &entry.update).map_err(|e| corrupt(format!("log entry {}", entry.cursor), e))?;
    }
    Ok(doc)
}

/// Folds a stored document into one snapshot: returns its encoded state and state vector.
/// Used by compaction; deleted content is garbage-collected on the way.
pub fn fold(doc_id: &str, stored: &StoredDoc) -> Result<(Vec<u8>, Vec<u8>)> {
    // The folding replica never edits, so any valid client id will do.
    let doc = load_document(doc_id, stored, 1)?;
    let txn = doc.transact();
    Ok((
        txn.encode_state_as_update_v1(&StateVector::default()),
        txn.state_vector().encode_v1(),
    ))
}

/// Runs `edit` in one transaction on `doc` and returns the update it produced (empty edits give
/// an update with no changes, which callers may skip with [`is_empty_update`]).
pub fn edit<R>(doc: &Doc, edit: impl FnOnce(&mut yrs::TransactionMut<'_>) -> R) -> (R, Vec<u8>) {
    let mut txn = doc.transact_mut();
    let result = edit(&mut txn);
    let update = txn.encode_update_v1();
    (result, update)
}

/// Whether a v1 update carries no change (no blocks and no deletions).
pub fn is_empty_update(update: &[u8]) -> bool {
    // The v1 encoding of an empty update is two zero varints: no clients, empty delete set.
    update == [0, 0]
}

/// The text of the root `Y.Text` [`TEXT_ROOT`].
pub fn text(doc: &Doc) -> String {
    let text = doc.get_or_insert_text(TEXT_ROOT);
    text.get_string(&doc.transact())
}

/// Length of the root text in UTF-16 code units.
pub fn text_len(doc: &Doc) -> u32 {
    let text = doc.get_or_insert_text(TEXT_ROOT);
    text.len(&doc.transact())
}

/// Inserts `chunk` at `index` (UTF-16 code units) into the root text; returns the update.
pub fn text_insert(doc: &Doc, index: u32, chunk: &str) -> Result<Vec<u8>> {
    let text = doc.get_or_insert_text(TEXT_ROOT);
    let len = text_len(doc);
    if index > len {
        return Err(Error::Invalid(format!(
            "position {index} is past the end of the text ({len})"
        )));
    }
    Ok(edit(doc, |txn| text.insert(txn, index, chunk)).1)
}

/// Deletes `len` code units at `index` from the root text; returns the update.
pub fn text_delete(doc: &Doc, index: u32, len: u32) -> Result<Vec<u8>> {
    let text = doc.get_or_insert_text(TEXT_ROOT);
    let total = text_len(doc);
    if index.checked_add(len).is_none_or(|end| end > total) {
        return Err(Error::Invalid(format!(
            "range {index}+{len} is past the end of the text ({total})"
        )));
    }
    Ok(edit(doc, |txn| text.remove_range(txn, index, len)).1)
}

/// Sets `key` in the root map; returns the update.
pub fn map_set(doc: &Doc, key: &str, value: impl Into<Any>) -> Vec<u8> {
    let map = doc.get_or_insert_map(MAP_ROOT);
    let value: Any = value.into();
    edit(doc, |txn| {
        map.insert(txn, key, value);
    })
    .1
}

/// Reads `key` from the root map as JSON-like data.
pub fn map_get(doc: &Doc, key: &str) -> Option<Any> {
    let map = doc.get_or_insert_map(MAP_ROOT);
    let txn = doc.transact();
    match map.get(&txn, key)? {
        yrs::Out::Any(any) => Some(any),
        _ => None,
    }
}

/// Removes `key` from the root map; returns the update.
pub fn map_remove(doc: &Doc, key: &str) -> Vec<u8> {
    let map = doc.get_or_insert_map(MAP_ROOT);
    edit(doc, |txn| {
        map.remove(txn, key);
    })
    .1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LogEntry;

    #[test]
    fn client_ids_fit_in_53_bits() {
        for _ in 0..1000 {
            let id = new_client_id();
            assert!(id > 0 && id < MAX_CLIENT_ID);
        }
        assert!(new_doc(0).is_err());
        assert!(new_doc(MAX_CLIENT_ID).is_err());
    }

    #[test]
    fn text_and_map_round_trip_between_replicas() {
        let a = new_doc(1).unwrap();
        let b = new_doc(2).unwrap();
        let u1 = text_insert(&a, 0, "héllo 🌍").unwrap();
        let u2 = map_set(&a, "title", "notes");
        apply_bytes(&b, &u1).unwrap();
        apply_bytes(&b, &u2).unwrap();
        assert_eq!(text(&b), "héllo 🌍");
        // The emoji is two UTF-16 code units, as in JavaScript.
        assert_eq!(text_len(&b), 8);
        assert_eq!(map_get(&b, "title"), Some(Any::from("notes")));
        let u3 = text_delete(&b, 0, 1).unwrap();
        apply_bytes(&a, &u3).unwrap();
        assert_eq!(text(&a), "éllo 🌍");
        assert!(text_insert(&a, 100, "x").is_err());
        assert!(text_delete(&a, 5, 100).is_err());
        let u4 = map_remove(&a, "title");
        apply_bytes(&b, &u4).unwrap();
        assert_eq!(map_get(&b, "title"), None);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode_update(&[0xff, 0xff, 0xff]).is_err());
        assert!(decode_state_vector(&[5, 1]).is_err());
        let doc = new_doc(3).unwrap();
        assert!(apply_bytes(&doc, b"not an update").is_err());
    }

    #[test]
    fn corrupt_rows_name_the_document() {
        let a = new_doc(1).unwrap();
        let good = text_insert(&a, 0, "ok").unwrap();
        let stored = StoredDoc {
            snapshot: Some(good),
            snapshot_cursor: 1,
            tail: vec![LogEntry {
                cursor: 2,
                update: vec![9, 9, 9],
            }],
            head: 2,
        };
        let err = load_document("notes/1", &stored, 5).unwrap_err();
        assert!(matches!(&err, Error::Corrupt { doc, .. } if doc == "notes/1"), "{err}");
        assert!(err.to_string().contains("log entry 2"));
    }

    #[test]
    fn fold_keeps_everything() {
        let a = new_doc(1).unwrap();
        let mut tail = Vec::new();
        for (i, w) in ["a", "b", "c"].iter().enumerate() {
            tail.push(LogEntry {
                cursor: i as u64 + 1,
                update: text_insert(&a, i as u32, w).unwrap(),
            });
        }
        tail.push(LogEntry {
            cursor: 4,
            update: text_delete(&a, 1, 1).unwrap(),
        });
        let stored = StoredDoc {
            snapshot: None,
            snapshot_cursor: 0,
            tail,
            head: 4,
        };
        let (snapshot, _sv) = fold("d", &stored).unwrap();
        let b = new_doc(2).unwrap();
        apply_bytes(&b, &snapshot).unwrap();
        assert_eq!(text(&b), "ac");
    }
}
