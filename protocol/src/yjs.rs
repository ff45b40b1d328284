//! The y-protocols (y-websocket) codec, so that stock Yjs clients (y-websocket 3.x) can connect.
//!
//! One WebSocket binary message carries exactly one [`YMessage`]: a lib0 `varUint` message type
//! followed by its payload (see [`crate::lib0`] for the primitives). The 3.x client reads only the
//! first message of a frame, so [`YMessage::encode`] produces one message and
//! [`YMessage::decode`] refuses anything after it. Document updates and state vectors are kept as
//! opaque bytes: checking them is the job of the CRDT, not of the wire codec. Awareness states are
//! kept as their raw JSON text, so the codec needs no JSON parser; the text `null` means "this
//! client left" and is represented as `None`.
//!
//! [`AwarenessTable`] is a small sans-IO helper that applies awareness entries with the
//! y-protocols rules and expires silent clients, for a server that relays presence.

use std::collections::BTreeMap;

use crate::lib0::{self, Reader};
use crate::{DecodeError, Result};

/// Message type: document synchronisation (followed by a sync sub-type).
const MESSAGE_SYNC: u64 = 0;
/// Message type: awareness (presence) update.
const MESSAGE_AWARENESS: u64 = 1;
/// Message type: authentication (followed by an auth sub-type).
const MESSAGE_AUTH: u64 = 2;
/// Message type: request for every known awareness state; no payload.
const MESSAGE_QUERY_AWARENESS: u64 = 3;

/// Sync sub-type: the sender's state vector.
const SYNC_STEP1: u64 = 0;
/// Sync sub-type: the update answering a state vector.
const SYNC_STEP2: u64 = 1;
/// Sync sub-type: an incremental update.
const SYNC_UPDATE: u64 = 2;

/// Auth sub-type: permission denied, with a reason.
const AUTH_PERMISSION_DENIED: u64 = 0;

/// The JSON text of an absent awareness state.
const NULL_STATE: &str = "null";

/// The fewest bytes one awareness entry can take: a one-byte client id, a one-byte clock and an
/// empty string's one-byte length.
const MIN_AWARENESS_ENTRY_LEN: usize = 3;

/// One y-protocols message, as carried by one WebSocket binary frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum YMessage {
    /// `[0, 0]`: the sender's encoded state vector (update encoding v1); the receiver answers with
    /// a [`YMessage::SyncStep2`].
    SyncStep1(Vec<u8>),
    /// `[0, 1]`: a v1 update holding everything the receiver of the matching step 1 lacks.
    SyncStep2(Vec<u8>),
    /// `[0, 2]`: an incremental v1 update.
    Update(Vec<u8>),
    /// `[1]`: awareness (presence) states of one or more clients.
    Awareness(Vec<AwarenessEntry>),
    /// `[2]`: an authentication message.
    Auth(AuthMessage),
    /// `[3]`: asks the receiver to send every awareness state it knows.
    QueryAwareness,
}

/// One client's awareness state in a [`YMessage::Awareness`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwarenessEntry {
    /// The client's Yjs client id (below 2^53).
    pub client_id: u64,
    /// The client's awareness clock; a newer state has a greater clock.
    pub clock: u64,
    /// The state as raw JSON text, or `None` when the client left (the JSON text `null`). A
    /// `Some` must not hold the text `null` itself: it would decode as `None`.
    pub state: Option<String>,
}

/// The y-protocols authentication message (type 2).
///
/// Hocuspocus reuses message type 2 with sub-types of its own; only the y-protocols form is
/// understood here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMessage {
    /// `[2, 0]`: the peer may not access the document.
    PermissionDenied {
        /// Why, for humans.
        reason: String,
    },
}

impl YMessage {
    /// Encodes the message as the content of one WebSocket binary frame.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            YMessage::SyncStep1(bytes) => encode_sync(SYNC_STEP1, bytes),
            YMessage::SyncStep2(bytes) => encode_sync(SYNC_STEP2, bytes),
            YMessage::Update(bytes) => encode_sync(SYNC_UPDATE, bytes),
            YMessage::Awareness(entries) => {
                let mut payload = Vec::new();
                lib0::write_var_uint(&mut payload, entries.len() as u64);
                for entry in entries {
                    lib0::write_var_uint(&mut payload, entry.client_id);
                    lib0::write_var_uint(&mut payload, entry.clock);
                    lib0::write_var_string(&mut payload, entry.state.as_deref().unwrap_or(NULL_STATE));
                }
                let mut buf = Vec::with_capacity(1 + lib0::var_uint_len(payload.len() as u64) + payload.len());
                lib0::write_var_uint(&mut buf, MESSAGE_AWARENESS);
                lib0::write_var_buf(&mut buf, &payload);
                buf
            }
            YMessage::Auth(AuthMessage::PermissionDenied { reason }) => {
                let mut buf = Vec::with_capacity(2 + lib0::var_uint_len(reason.len() as u64) + reason.len());
                lib0::write_var_uint(&mut buf, MESSAGE_AUTH);
                lib0::write_var_uint(&mut buf, AUTH_PERMISSION_DENIED);
                lib0::write_var_string(&mut buf, reason);
                buf
            }
            YMessage::QueryAwareness => vec![MESSAGE_QUERY_AWARENESS as u8],
        }
    }

    /// Decodes the content of one WebSocket binary frame as exactly one message.
    ///
    /// A frame longer than `max_frame_size` is refused with [`DecodeError::TooLarge`] before it
    /// is read. An unknown message type, sync sub-type or auth sub-type is
    /// [`DecodeError::UnknownMessageType`] carrying the unknown number; bytes after the message
    /// are [`DecodeError::TrailingBytes`]; awareness states must be UTF-8.
    pub fn decode(bytes: &[u8], max_frame_size: usize) -> Result<Self> {
        if bytes.len() > max_frame_size {
            return Err(DecodeError::TooLarge {
                size: bytes.len(),
                max: max_frame_size,
            });
        }
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        let mut r = Reader::new(bytes);
        let message = match r.read_var_uint()? {
            MESSAGE_SYNC => {
                let sub_type = r.read_var_uint()?;
                let payload = r.read_var_buf()?.to_vec();
                match sub_type {
                    SYNC_STEP1 => YMessage::SyncStep1(payload),
                    SYNC_STEP2 => YMessage::SyncStep2(payload),
                    SYNC_UPDATE => YMessage::Update(payload),
                    other => return Err(DecodeError::UnknownMessageType(other)),
                }
            }
            MESSAGE_AWARENESS => YMessage::Awareness(decode_awareness(r.read_var_buf()?)?),
            MESSAGE_AUTH => match r.read_var_uint()? {
                AUTH_PERMISSION_DENIED => YMessage::Auth(AuthMessage::PermissionDenied {
                    reason: r.read_var_string()?.to_owned(),
                }),
                other => return Err(DecodeError::UnknownMessageType(other)),
            },
            MESSAGE_QUERY_AWARENESS => YMessage::QueryAwareness,
            other => return Err(DecodeError::UnknownMessageType(other)),
        };
        r.finish()?;
        Ok(message)
    }
}

/// Encodes a sync message of the given sub-type around `payload`.
fn encode_sync(sub_type: u64, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(2 + lib0::var_uint_len(payload.len() as u64) + payload.len());
    lib0::write_var_uint(&mut buf, MESSAGE_SYNC);
    lib0::write_var_uint(&mut buf, sub_type);
    lib0::write_var_buf(&mut buf, payload);
    buf
}

/// Decodes the content of an awareness message's `varUint8Array`.
fn decode_awareness(payload: &[u8]) -> Result<Vec<AwarenessEntry>> {
    let mut r = Reader::new(payload);
    let count = r.read_var_uint()?;
    // Every entry takes at least three bytes, so a count the payload cannot hold is refused
    // before anything is allocated for it.
    let most = r.remaining() / MIN_AWARENESS_ENTRY_LEN;
    let count = usize::try_from(count)
        .ok()
        .filter(|&count| count <= most)
        .ok_or(DecodeError::UnexpectedEof)?;
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let client_id = r.read_var_uint()?;
        let clock = r.read_var_uint()?;
        let state = r.read_var_string()?;
        entries.push(AwarenessEntry {
            client_id,
            clock,
            state: (!is_json_null(state)).then(|| state.to_owned()),
        });
    }
    r.finish()?;
    Ok(entries)
}

/// Whether `json` is the JSON text `null`, allowing the whitespace JSON allows around it (a
/// JavaScript peer's `JSON.parse` reads such text as `null`, too).
fn is_json_null(json: &str) -> bool {
    json.trim_matches([' ', '\t', '\n', '\r']) == NULL_STATE
}

/// What an [`AwarenessTable`] knows about one client.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClientAwareness {
    clock: u64,
    state: Option<String>,
    last_seen_ms: u64,
}

/// The awareness states of one document as a relaying server sees them, without any I/O: the
/// caller feeds it decoded entries and the current time, and broadcasts what it returns.
///
/// Entries are applied with the y-protocols rule: an entry replaces what is known about its
/// client if its clock is greater than the known clock, or equal to it while the entry is a
/// removal (state `None`) and the client still has a state. Removals made by the table itself
/// ([`AwarenessTable::expire`], [`AwarenessTable::remove`]) keep the client's clock, as the
/// reference server does: peers apply them because the clock is equal and they still hold a
/// state, and the client's next renewal (clock + 1) is accepted everywhere at once.
#[derive(Debug, Clone, Default)]
pub struct AwarenessTable {
    clients: BTreeMap<u64, ClientAwareness>,
    /// The total length of every state held, in bytes of JSON text.
    state_bytes: usize,
}

impl AwarenessTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies entries received at `now_ms` (milliseconds on any clock the caller keeps
    /// monotonic) and returns the applied ones, to be broadcast to the document's other peers.
    ///
    /// A removal of a client the table never knew is remembered (its clock guards against older
    /// states arriving late) but not returned: there is nothing to announce.
    pub fn apply(&mut self, entries: &[AwarenessEntry], now_ms: u64) -> Vec<AwarenessEntry> {
        let mut changed = Vec::new();
        for entry in entries {
            let known = self.clients.get(&entry.client_id);
            let announce = match known {
                None => entry.state.is_some(),
                Some(known) if entry.clock > known.clock => true,
                Some(known) => entry.clock == known.clock && entry.state.is_none() && known.state.is_some(),
            };
            let remember = announce || known.is_none();
            if remember {
                let replaced = self.clients.insert(
                    entry.client_id,
                    ClientAwareness {
                        clock: entry.clock,
                        state: entry.state.clone(),
                        last_seen_ms: now_ms,
                    },
                );
                self.state_bytes -= replaced.and_then(|old| old.state).map_or(0, |state| state.len());
                self.state_bytes += entry.state.as_ref().map_or(0, String::len);
            }
            if announce {
                changed.push(entry.clone());
            }
        }
        changed
    }

    /// Removes the state of every client not refreshed for `timeout_ms` or longer (y-protocols
    /// uses 30 000 ms) and returns the removal entries to broadcast.
    ///
    /// Clients without a state are forgotten once their last change is `timeout_ms` old, so the
    /// table does not grow with every client that ever connected.
    pub fn expire(&mut self, now_ms: u64, timeout_ms: u64) -> Vec<AwarenessEntry> {
        let mut removed = Vec::new();
        let mut freed = 0;
        self.clients.retain(|&client_id, client| {
            if now_ms.saturating_sub(client.last_seen_ms) < timeout_ms {
                return true;
            }
            let Some(state) = client.state.take() else {
                return false;
            };
            freed += state.len();
            client.last_seen_ms = now_ms;
            removed.push(removal(client_id, client.clock));
            true
        });
        self.state_bytes -= freed;
        removed
    }

    /// Removes the states of the given clients (for example those a closed connection
    /// controlled) and returns the removal entries to broadcast; clients without a state are
    /// skipped.
    pub fn remove(&mut self, client_ids: &[u64]) -> Vec<AwarenessEntry> {
        let mut removed = Vec::new();
        for &client_id in client_ids {
            if let Some(client) = self.clients.get_mut(&client_id) {
                if let Some(state) = client.state.take() {
                    self.state_bytes -= state.len();
                    removed.push(removal(client_id, client.clock));
                }
            }
        }
        removed
    }

    /// The clock the table knows for `client_id`, also while the client has no state (a removal
    /// is remembered until it is `timeout_ms` old, see [`AwarenessTable::expire`]); `None` once
    /// the table has forgotten the client, or never knew it.
    pub fn clock(&self, client_id: u64) -> Option<u64> {
        self.clients.get(&client_id).map(|client| client.clock)
    }

    /// When `client_id`'s entry last changed (the `now_ms` it was applied at), if known.
    pub fn last_seen(&self, client_id: u64) -> Option<u64> {
        Some(self.clients.get(&client_id)?.last_seen_ms)
    }

    /// The current state of `client_id` (raw JSON text), if it has one.
    pub fn state(&self, client_id: u64) -> Option<&str> {
        self.clients.get(&client_id)?.state.as_deref()
    }

    /// The total length, in bytes, of every state the table holds.
    pub fn state_bytes(&self) -> usize {
        self.state_bytes
    }

    /// The exact length of `YMessage::Awareness(self.snapshot()).encode()`, without encoding it.
    pub fn snapshot_encoded_len(&self) -> usize {
        let mut count = 0u64;
        let mut payload = 0usize;
        for (&client_id, client) in &self.clients {
            if let Some(state) = &client.state {
                count += 1;
                payload += lib0::var_uint_len(client_id)
                    + lib0::var_uint_len(client.clock)
                    + lib0::var_uint_len(state.len() as u64)
                    + state.len();
            }
        }
        payload += lib0::var_uint_len(count);
        lib0::var_uint_len(MESSAGE_AWARENESS) + lib0::var_uint_len(payload as u64) + payload
    }

    /// Every client that has a state, in client id order: the answer to a
    /// [`YMessage::QueryAwareness`] and the greeting for a new connection.
    pub fn snapshot(&self) -> Vec<AwarenessEntry> {
        self.clients
            .iter()
            .filter_map(|(&client_id, client)| {
                client.state.as_ref().map(|state| AwarenessEntry {
                    client_id,
                    clock: client.clock,
                    state: Some(state.clone()),
                })
            })
            .collect()
    }
}

/// The entry announcing that `client_id` left, at `clock`.
fn removal(client_id: u64, clock: u64) -> AwarenessEntry {
    AwarenessEntry {
        client_id,
        clock,
        state: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(client_id: u64, clock: u64, state: Option<&str>) -> AwarenessEntry {
        AwarenessEntry {
            client_id,
            clock,
            state: state.map(str::to_owned),
        }
    }

    #[test]
    fn null_with_whitespace_is_a_removal() {
        let mut payload = vec![1, 5, 1];
        lib0::write_var_string(&mut payload, " null\n");
        let mut buf = vec![1];
        lib0::write_var_buf(&mut buf, &payload);
        assert_eq!(
            YMessage::decode(&buf, 100),
            Ok(YMessage::Awareness(vec![entry(5, 1, None)]))
        );
    }

    #[test]
    fn huge_awareness_count_is_refused_without_allocating() {
        // count = 2^53 - 1 followed by nothing.
        let frame = [1, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert_eq!(YMessage::decode(&frame, 100), Err(DecodeError::UnexpectedEof));
    }

    #[test]
    fn table_applies_newer_clocks_and_equal_clock_removals() {
        let mut t = AwarenessTable::new();
        assert_eq!(t.apply(&[entry(1, 1, Some("{}"))], 0), vec![entry(1, 1, Some("{}"))]);
        // Same clock with a state: stale, ignored.
        assert!(t.apply(&[entry(1, 1, Some("{\"a\":1}"))], 1).is_empty());
        // Older clock: ignored.
        assert!(t.apply(&[entry(1, 0, None)], 1).is_empty());
        // Newer clock: applied (a renewal with an equal state is announced too).
        assert_eq!(t.apply(&[entry(1, 2, Some("{}"))], 2), vec![entry(1, 2, Some("{}"))]);
        // Equal clock removal: applied once, then there is nothing left to remove.
        assert_eq!(t.apply(&[entry(1, 2, None)], 3), vec![entry(1, 2, None)]);
        assert!(t.apply(&[entry(1, 2, None)], 3).is_empty());
        assert!(t.snapshot().is_empty());
    }

    #[test]
    fn table_remembers_unknown_removals_silently() {
        let mut t = AwarenessTable::new();
        assert!(t.apply(&[entry(7, 5, None)], 0).is_empty());
        // A state older than the removal arriving late stays out.
        assert!(t.apply(&[entry(7, 4, Some("{}"))], 1).is_empty());
        assert_eq!(t.apply(&[entry(7, 6, Some("{}"))], 2), vec![entry(7, 6, Some("{}"))]);
    }

    #[test]
    fn table_expires_silent_clients_and_accepts_their_next_renewal() {
        let mut t = AwarenessTable::new();
        t.apply(&[entry(1, 3, Some("{\"n\":1}")), entry(2, 1, Some("{\"n\":2}"))], 0);
        t.apply(&[entry(2, 2, Some("{\"n\":2}"))], 20_000);
        assert_eq!(t.expire(29_999, 30_000), vec![]);
        assert_eq!(t.expire(30_000, 30_000), vec![entry(1, 3, None)]);
        assert_eq!(t.snapshot(), vec![entry(2, 2, Some("{\"n\":2}"))]);
        // The silent client was alive after all: its next renewal is accepted.
        assert_eq!(
            t.apply(&[entry(1, 4, Some("{\"n\":1}"))], 31_000),
            vec![entry(1, 4, Some("{\"n\":1}"))]
        );
        assert_eq!(t.snapshot().len(), 2);
    }

    #[test]
    fn table_forgets_removed_clients_after_the_timeout() {
        let mut t = AwarenessTable::new();
        t.apply(&[entry(1, 3, Some("{}"))], 0);
        assert_eq!(t.expire(30_000, 30_000), vec![entry(1, 3, None)]);
        assert!(t.expire(59_999, 30_000).is_empty());
        assert!(t.clients.contains_key(&1));
        assert!(t.expire(60_000, 30_000).is_empty());
        assert!(t.clients.is_empty());
    }

    #[test]
    fn table_counts_state_bytes_and_the_snapshot_length() {
        let mut t = AwarenessTable::new();
        assert_eq!(
            t.snapshot_encoded_len(),
            YMessage::Awareness(t.snapshot()).encode().len()
        );
        t.apply(
            &[
                entry(1, 3, Some("{\"a\":1}")),
                entry(300, 1, Some("{}")),
                entry(5, 1, None),
            ],
            0,
        );
        assert_eq!(t.state_bytes(), 9);
        assert_eq!((t.clock(1), t.state(1)), (Some(3), Some("{\"a\":1}")));
        assert_eq!((t.clock(5), t.state(5)), (Some(1), None));
        assert_eq!(t.clock(6), None);
        t.apply(&[entry(1, 4, Some(&"x".repeat(200)))], 1);
        assert_eq!(t.state_bytes(), 202);
        assert_eq!(
            t.snapshot_encoded_len(),
            YMessage::Awareness(t.snapshot()).encode().len()
        );
        t.remove(&[1]);
        assert_eq!(t.state_bytes(), 2);
        assert_eq!(t.expire(30_000, 30_000).len(), 1);
        assert_eq!(t.state_bytes(), 0);
        assert_eq!(
            t.snapshot_encoded_len(),
            YMessage::Awareness(t.snapshot()).encode().len()
        );
    }

    #[test]
    fn table_remove_announces_only_clients_with_a_state() {
        let mut t = AwarenessTable::new();
        t.apply(
            &[entry(1, 3, Some("{}")), entry(2, 4, Some("{}")), entry(3, 1, None)],
            0,
        );
        assert_eq!(t.remove(&[1, 3, 99]), vec![entry(1, 3, None)]);
        assert_eq!(t.remove(&[1]), vec![]);
        assert_eq!(t.snapshot(), vec![entry(2, 4, Some("{}"))]);
    }
}
