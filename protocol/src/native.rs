//! The native driftsync protocol.
//!
//! One WebSocket binary message carries exactly one frame: a postcard encoding of a
//! [`ClientFrame`] (client to server) or a [`ServerFrame`] (server to client). The first client
//! frame is always [`ClientFrame::Hello`], which carries the protocol version and the token; the
//! server answers [`ServerFrame::Welcome`] or an [`ServerFrame::Error`] followed by a close.
//!
//! # Resume in one round trip
//! The client sends one [`ClientFrame::Resume`] listing, per document, the last server cursor it
//! has seen and its state vector. The server answers one [`ServerFrame::Resumed`] with, per
//! document, exactly what the client lacks (the log entries after the cursor, trimmed by the
//! state vector), its new cursor, and — only when the client has changes the server lacks —
//! its own state vector. The client then pushes what the server lacks (its outbox). A document
//! that did not change costs its id, a cursor and a short state vector each way: a few dozen
//! bytes, never the document's whole delete set as a y-protocols SyncStep2 does.
//!
//! # Cursors
//! Every update the server stores gets a cursor: a per-document sequence number assigned by the
//! store, strictly increasing in commit order. A client's cursor for a document means "I hold
//! every logged update up to and including this one"; `0` means "nothing yet".
//!
//! # Compatibility
//! Variants are only ever appended, never reordered or removed: postcard encodes a variant by
//! its index. The golden frames in `fixtures/wire/` must keep decoding.

use serde::{Deserialize, Serialize};

use crate::{DecodeError, Result};

/// The protocol version this build speaks; sent in [`ClientFrame::Hello`] and [`ServerFrame::Welcome`].
pub const PROTOCOL_VERSION: u16 = 1;

/// The largest frame either side accepts unless configured otherwise (4 MiB).
pub const DEFAULT_MAX_FRAME_SIZE: usize = 4 * 1024 * 1024;

/// The longest document id, in bytes.
pub const MAX_DOC_ID_LEN: usize = 512;

/// WebSocket close code: the server could not keep up with this connection (its outbound queue
/// overflowed) or lost track of it; reconnect and resume. Nothing acknowledged is lost.
pub const CLOSE_RESYNC: u16 = 4000;
/// WebSocket close code: authentication failed; reconnecting with the same token will not help.
pub const CLOSE_UNAUTHORIZED: u16 = 4001;
/// WebSocket close code: the client speaks a protocol version the server does not.
pub const CLOSE_UNSUPPORTED_VERSION: u16 = 4002;
/// WebSocket close code: the client broke the protocol (bad first frame, oversize frame, …).
pub const CLOSE_PROTOCOL_ERROR: u16 = 4003;
/// WebSocket close code: the server is shutting down; reconnect (with backoff) and resume.
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// A server cursor: the sequence number of an entry in a document's update log (0 = none).
pub type Cursor = u64;

/// Identifies a document. Any non-empty UTF-8 string of at most [`MAX_DOC_ID_LEN`] bytes without
/// control characters; `/` is allowed (`chat/general`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DocId(String);

impl DocId {
    /// Validates and wraps a document id.
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        if id.is_empty() {
            return Err(DecodeError::Invalid("document id is empty"));
        }
        if id.len() > MAX_DOC_ID_LEN {
            return Err(DecodeError::Invalid("document id is too long"));
        }
        if id.chars().any(char::is_control) {
            return Err(DecodeError::Invalid("document id contains a control character"));
        }
        Ok(DocId(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DocId {
    type Error = DecodeError;
    fn try_from(value: String) -> Result<Self> {
        DocId::new(value)
    }
}

impl TryFrom<&str> for DocId {
    type Error = DecodeError;
    fn try_from(value: &str) -> Result<Self> {
        DocId::new(value)
    }
}

impl From<DocId> for String {
    fn from(value: DocId) -> Self {
        value.0
    }
}

impl std::fmt::Display for DocId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for DocId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// One document in a [`ClientFrame::Resume`]: what the client already holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeDoc {
    /// The document.
    pub doc: DocId,
    /// The last server cursor the client has seen for it (0 if it never synced it).
    pub cursor: Cursor,
    /// The client's state vector (yrs v1 encoding).
    #[serde(with = "serde_bytes")]
    pub state_vector: Vec<u8>,
}

/// The server's answer for one document of a resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocResumed {
    /// The document.
    pub doc: DocId,
    /// The server's cursor for the document, including everything in `update`.
    pub cursor: Cursor,
    /// What the client lacks (a yrs v1 update), or `None` when it lacks nothing. Empty when the
    /// update was too large for a frame and came ahead in [`ServerFrame::ResumePart`] pieces.
    #[serde(with = "opt_bytes")]
    pub update: Option<Vec<u8>>,
    /// The server's state vector, sent only when the client has changes the server lacks; the
    /// client answers with pushes of those changes.
    #[serde(with = "opt_bytes")]
    pub state_vector: Option<Vec<u8>>,
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// Always the first frame: protocol version and credentials.
    Hello {
        /// The protocol version the client speaks ([`PROTOCOL_VERSION`]).
        version: u16,
        /// A bearer token (HS256 JWT); empty when the server runs open.
        token: String,
        /// The client's yrs client id (below 2^53), so the server can recognise re-sent batches.
        client_id: u64,
    },
    /// Subscribe to documents and resume each from what the client holds, in one round trip.
    Resume {
        /// The documents, each with its cursor and state vector.
        docs: Vec<ResumeDoc>,
    },
    /// A batch of local changes to one document (a yrs v1 update, usually several merged).
    Push {
        /// The document.
        doc: DocId,
        /// Client-chosen, unique per client id and document, increasing; the server
        /// deduplicates a re-sent batch and acknowledges it again with its original cursor.
        batch: u64,
        /// The changes.
        #[serde(with = "serde_bytes")]
        update: Vec<u8>,
    },
    /// Stop receiving a document's updates and presence.
    Unsubscribe {
        /// The document.
        doc: DocId,
    },
    /// Set (or with `None`, clear) this connection's ephemeral presence state in a document.
    Presence {
        /// The document.
        doc: DocId,
        /// A JSON value chosen by the application, or `None` to leave.
        state: Option<String>,
    },
    /// This connection started or stopped typing in a document.
    Typing {
        /// The document.
        doc: DocId,
        /// Whether the user is typing now.
        typing: bool,
    },
    /// Liveness probe; the peer answers with [`ServerFrame::Pong`] carrying the same nonce.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to a [`ServerFrame::Ping`].
    Pong {
        /// The nonce of the ping.
        nonce: u64,
    },
    /// Replace the connection's token (before the old one expires).
    Reauth {
        /// The new token.
        token: String,
    },
    /// Send the user's inbox — the chat rooms they belong to — changed after index version
    /// `since` (0: all of it), answered with [`ServerFrame::Inbox`] frames; then keep sending
    /// what changes while the connection lasts.
    Inbox {
        /// The version of the last inbox received (0: none).
        since: u64,
    },
    /// Send the members of a chat room with their presence status and when they were last seen
    /// ([`ServerFrame::Members`]). The room must be one the token covers.
    Members {
        /// The room.
        room: DocId,
    },
}

/// Frames a server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// Answer to a good [`ClientFrame::Hello`].
    Welcome {
        /// The protocol version the server will speak on this connection.
        version: u16,
        /// The largest frame the server accepts.
        max_frame_size: u32,
        /// This connection's id; presence and typing of this connection carry it as `peer`.
        session: u64,
        /// How often the server pings, in milliseconds; a peer silent for three intervals is dead.
        heartbeat_ms: u32,
    },
    /// Answer to a [`ClientFrame::Resume`]: one entry per document that was resumed. Refused
    /// documents get an [`ServerFrame::Error`] with the document set instead.
    Resumed {
        /// Per document: what the client lacks and the server's state.
        docs: Vec<DocResumed>,
    },
    /// Another connection's change to a subscribed document, sent as soon as the server has
    /// validated it — while it is being committed, so it may be logged only after this frame.
    Update {
        /// The document.
        doc: DocId,
        /// Every update logged up to this cursor has been sent on this connection, so the
        /// client's cursor may advance to it. For a change pushed to this server it is the
        /// cursor before the change's own (which is not assigned until its commit); for a
        /// change from another instance, the change's own. Never decreases.
        cursor: Cursor,
        /// The change (yrs v1 update).
        #[serde(with = "serde_bytes")]
        update: Vec<u8>,
    },
    /// A pushed batch is durably stored. Sent after every update logged before it for this
    /// document has been sent on this connection, so the client may advance its cursor.
    Ack {
        /// The document.
        doc: DocId,
        /// The client's batch id.
        batch: u64,
        /// The cursor the batch was stored at.
        cursor: Cursor,
    },
    /// Something the client sent was refused. The connection stays open unless the error is fatal
    /// (then a close frame follows).
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// The document concerned, if any.
        doc: Option<DocId>,
        /// The batch concerned, if any: it was not stored and will never be acknowledged.
        batch: Option<u64>,
    },
    /// Another connection's presence state in a document changed (`None`: it left).
    Presence {
        /// The document.
        doc: DocId,
        /// The other connection's session id.
        peer: u64,
        /// The other connection's user id.
        user: String,
        /// Its state (JSON), or `None` when it left or expired.
        state: Option<String>,
    },
    /// Another connection started or stopped typing.
    Typing {
        /// The document.
        doc: DocId,
        /// The other connection's session id.
        peer: u64,
        /// The other connection's user id.
        user: String,
        /// Whether it is typing now.
        typing: bool,
    },
    /// Liveness probe; answer with [`ClientFrame::Pong`].
    Ping {
        /// Echo it back.
        nonce: u64,
    },
    /// Answer to a [`ClientFrame::Ping`].
    Pong {
        /// The nonce of the ping.
        nonce: u64,
    },
    /// A piece of a resume answer too large for one frame. The pieces of a document, in order,
    /// are its update: they come before the [`ServerFrame::Resumed`] entry for the document,
    /// whose `update` is then `Some` and **empty** (no update is empty: an update without
    /// changes is two bytes). A client keeps at most what its own bound on a document allows.
    ResumePart {
        /// The document.
        doc: DocId,
        /// The next bytes of its update.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The user's inbox, or what changed in it: an answer to [`ClientFrame::Inbox`] (in pieces
    /// when large: every piece but the last has `more`), and later each change while the
    /// connection lasts.
    Inbox {
        /// The index version this is current at: ask with `since` = this next time.
        version: u64,
        /// Rooms whose entry changed, most recently active first; a room with `joined: false`
        /// was left.
        rooms: Vec<InboxRoom>,
        /// More pieces of this answer follow.
        more: bool,
    },
    /// Answer to [`ClientFrame::Members`].
    Members {
        /// The room.
        room: DocId,
        /// Everyone who joined it (and may have left since), in user order.
        members: Vec<RoomMember>,
    },
}

/// One room of a user's inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxRoom {
    /// The room.
    pub room: DocId,
    /// A member now (`false`: they left).
    pub joined: bool,
    /// When they joined or left (milliseconds since the Unix epoch, their device's clock).
    pub at_ms: u64,
    /// The room's last message.
    pub last: Option<InboxMessage>,
    /// Messages of others after the user's read receipt, neither deleted nor system messages.
    pub unread: u64,
    /// The sort key the user has read up to (empty: nothing).
    pub read_sort: String,
}

/// A room's last message, as an inbox shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxMessage {
    /// Its id.
    pub id: String,
    /// Its sort key.
    pub sort: String,
    /// Its author.
    pub author: String,
    /// Its kind (`text`, `image`, `video`, `file`, `system`).
    pub kind: String,
    /// The start of its text (at most 280 bytes).
    pub text: String,
    /// Deleted.
    pub deleted: bool,
    /// Its sender's clock at sending (milliseconds since the Unix epoch).
    pub at_ms: u64,
}

/// A member of a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomMember {
    /// The user.
    pub user: String,
    /// A member now (`false`: left).
    pub joined: bool,
    /// When they joined or left (their clock, milliseconds since the Unix epoch).
    pub at_ms: u64,
    /// Their presence status in the room: `online`, `away` or `busy` while a connection of
    /// theirs is there, `None` (offline) otherwise.
    pub status: Option<String>,
    /// When a connection of theirs was last seen (the server's clock), if ever.
    pub last_seen_ms: Option<u64>,
}

/// Why the server refused something. Details go to the server log, not to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// No token, a malformed token or a bad signature.
    Unauthorized,
    /// The token has expired; ask for a fresh one and reconnect.
    TokenExpired,
    /// The token does not grant access to this document.
    Forbidden,
    /// The token is read-only; the write was not stored.
    ReadOnly,
    /// The client's protocol version is not supported.
    UnsupportedVersion,
    /// The frame exceeded the maximum frame size.
    FrameTooLarge,
    /// The frame could not be decoded, or came out of order (e.g. no Hello first).
    Malformed,
    /// The update is not a valid yrs update; nothing of it was stored.
    InvalidUpdate,
    /// The update breaks the document's schema rules (forged author, someone else's receipt,
    /// editing another user's message); nothing of it was stored.
    SchemaViolation,
    /// The connection has subscribed the maximum number of documents.
    TooManyDocuments,
    /// The connection sends faster than its rate limit allows; slow down.
    RateLimited,
    /// The document is not subscribed on this connection (send a Resume first).
    NotSubscribed,
    /// The document has too many updates waiting for missing predecessors.
    TooManyPending,
    /// The document could not be loaded from the store; it is refused rather than served empty.
    LoadFailed,
    /// The store failed; the batch was not acknowledged. Retry later.
    StoreUnavailable,
    /// The server is shutting down or overloaded; retry later.
    Unavailable,
    /// An unexpected server-side failure.
    Internal,
    /// The update depends on changes the server does not have; it was not stored. The client
    /// should resume (the server's state vector shows what it lacks) and push those first.
    MissingDependencies,
    /// The yrs client id belongs to another user: a `Hello` naming it, or a push carrying new
    /// changes under it, is refused (a client id has one owner; see ARCHITECTURE.md,
    /// "Authorship"). Nothing of the push was stored.
    ClientIdTaken,
    /// Storing the update would make the document larger than the server's maximum document
    /// size; nothing of it was stored.
    DocumentTooLarge,
}

impl ErrorCode {
    /// Whether the refusal passes: the same request may succeed later (the store or the
    /// server failed for a while, the connection was rate limited, a dependency has not arrived
    /// yet). A client resumes the document and pushes again; a server that refused a push for
    /// such a reason stores none of that connection's later pushes of the document until it
    /// resumed, since an `Ack` covers every older batch of the document.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorCode::StoreUnavailable
                | ErrorCode::Unavailable
                | ErrorCode::RateLimited
                | ErrorCode::Internal
                | ErrorCode::MissingDependencies
        )
    }
}

impl ClientFrame {
    /// Encodes the frame as one WebSocket binary message.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes one frame, refusing frames larger than `max_frame_size` before reading them.
    pub fn decode(bytes: &[u8], max_frame_size: usize) -> Result<Self> {
        decode(bytes, max_frame_size)
    }
}

impl ServerFrame {
    /// Encodes the frame as one WebSocket binary message.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes one frame, refusing frames larger than `max_frame_size` before reading them.
    pub fn decode(bytes: &[u8], max_frame_size: usize) -> Result<Self> {
        decode(bytes, max_frame_size)
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these types into a Vec cannot fail: they hold only strings, integers, byte
    // strings and enums, all of which postcard supports. An empty Vec would be refused by the
    // peer's decoder rather than misread, so even an impossible failure stays harmless.
    postcard::to_allocvec(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], max_frame_size: usize) -> Result<T> {
    if bytes.len() > max_frame_size {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            max: max_frame_size,
        });
    }
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let (value, rest) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

/// serde helpers for `Option<Vec<u8>>` as an optional byte string.
mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_deref().map(serde_bytes::Bytes::new).serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<serde_bytes::ByteBuf>::deserialize(d)?.map(serde_bytes::ByteBuf::into_vec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(s: &str) -> DocId {
        DocId::new(s).expect("valid id")
    }

    #[test]
    fn hello_round_trips() {
        let f = ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            token: "t".into(),
            client_id: (1 << 53) - 1,
        };
        assert_eq!(ClientFrame::decode(&f.encode(), 1024).unwrap(), f);
    }

    #[test]
    fn unchanged_resume_is_a_few_bytes_per_document() {
        // A document that did not change: id, cursor and a one-client state vector each way.
        let sv = vec![1, 0xd2, 0x85, 0xd8, 0xcc, 0x04, 0x80, 0x80, 0x0b];
        let req = ClientFrame::Resume {
            docs: vec![ResumeDoc {
                doc: doc("notes/0042"),
                cursor: 1_000_000,
                state_vector: sv,
            }],
        };
        let resp = ServerFrame::Resumed {
            docs: vec![DocResumed {
                doc: doc("notes/0042"),
                cursor: 1_000_000,
                update: None,
                state_vector: None,
            }],
        };
        let total = req.encode().len() + resp.encode().len();
        assert!(total <= 64, "resume of an unchanged document costs {total} bytes");
    }

    #[test]
    fn rejects_oversize_empty_and_trailing() {
        let f = ClientFrame::Ping { nonce: 7 }.encode();
        assert!(matches!(ClientFrame::decode(&f, 1), Err(DecodeError::TooLarge { .. })));
        assert_eq!(ClientFrame::decode(&[], 10), Err(DecodeError::Empty));
        let mut g = f.clone();
        g.push(0);
        assert_eq!(ClientFrame::decode(&g, 10), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn rejects_invalid_doc_ids() {
        assert!(DocId::new("").is_err());
        assert!(DocId::new("a\nb").is_err());
        assert!(DocId::new("x".repeat(MAX_DOC_ID_LEN + 1)).is_err());
        assert!(DocId::new("chat/general").is_ok());
        // A frame carrying an invalid id fails to decode instead of producing one.
        let bytes = postcard::to_allocvec(&(3u8, String::new())).unwrap();
        assert!(ClientFrame::decode(&bytes, 100).is_err());
    }

    #[test]
    fn unknown_variant_is_an_error() {
        assert!(ClientFrame::decode(&[200], 10).is_err());
        assert!(ServerFrame::decode(&[0x7f, 1, 2], 10).is_err());
    }
}
