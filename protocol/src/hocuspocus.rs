//! The Hocuspocus provider protocol (`@hocuspocus/provider` 3.x and 4.x), which Tiptap's
//! collaboration extensions speak: y-protocols messages behind a document address, many
//! documents over one WebSocket.
//!
//! * A frame is `varString(address) · varUint(type) · body`; the address is the document name,
//!   or `name + "\0" + sessionId` when the provider's `sessionAwareness` is on. A server echoes
//!   the exact address back.
//! * Ping and Pong are one bare byte each (`0x09`, `0x0A`), with no address. (A 3.x provider
//!   cannot read a bare Ping: never send one to a provider that may be 3.x.)
//! * Types: 0 Sync (y-protocols Step1/Step2/Update), 1 Awareness, 2 Auth (sub-types Token=0,
//!   PermissionDenied=1, Authenticated=2), 3 QueryAwareness, 5 Stateless `varString(payload)`,
//!   7 Close (from a client: empty; from a server: `varString(reason)`), 8 SyncStatus
//!   `varUint(1 | 0)`. Types 4 and 6 are server-internal in Hocuspocus: never sent here, refused
//!   when received.
//!
//! Decoding never trusts the input: every length is checked against the bytes present.

use crate::lib0::{self, Reader};
use crate::yjs::{AwarenessEntry, YMessage};
use crate::{DecodeError, Result};

/// The bare Ping byte.
pub const PING: u8 = 0x09;
/// The bare Pong byte.
pub const PONG: u8 = 0x0A;

const TYPE_SYNC: u64 = 0;
const TYPE_AWARENESS: u64 = 1;
const TYPE_AUTH: u64 = 2;
const TYPE_QUERY_AWARENESS: u64 = 3;
const TYPE_STATELESS: u64 = 5;
const TYPE_CLOSE: u64 = 7;
const TYPE_SYNC_STATUS: u64 = 8;

const AUTH_TOKEN: u64 = 0;
const AUTH_PERMISSION_DENIED: u64 = 1;
const AUTH_AUTHENTICATED: u64 = 2;

/// The scope an `Authenticated` message names for a connection that may write.
pub const SCOPE_READ_WRITE: &str = "read-write";
/// The scope an `Authenticated` message names for a read-only connection.
pub const SCOPE_READ_ONLY: &str = "readonly";

/// A message of one document (after its address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HpMessage {
    /// Sync step 1: the sender's state vector.
    SyncStep1(Vec<u8>),
    /// Sync step 2: what the receiver lacks.
    SyncStep2(Vec<u8>),
    /// A live update.
    Update(Vec<u8>),
    /// Awareness entries.
    Awareness(Vec<AwarenessEntry>),
    /// Client → server: its token, and (4.x) the provider's version.
    /// Server → client with neither: "send your token again".
    Token {
        /// The token (empty when the app gave none).
        token: String,
        /// The provider's version, if it said.
        version: Option<String>,
    },
    /// Server → client: the document was refused.
    PermissionDenied {
        /// Why.
        reason: String,
    },
    /// Server → client: the document was accepted with this scope ([`SCOPE_READ_WRITE`] or
    /// [`SCOPE_READ_ONLY`]).
    Authenticated {
        /// The scope.
        scope: String,
    },
    /// "Send me every awareness state you know."
    QueryAwareness,
    /// An application message with no document semantics.
    Stateless(String),
    /// Client → server: the provider detached from the document (`None`). Server → client: the
    /// document is closed, with a reason.
    Close(Option<String>),
    /// Server → client: one received Step2 or Update was applied (`true`) or refused (`false`).
    SyncStatus(bool),
}

/// A frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HpFrame {
    /// The bare Ping byte.
    Ping,
    /// The bare Pong byte.
    Pong,
    /// A document's message.
    Message {
        /// The document name, or `name + "\0" + sessionId`.
        address: String,
        /// The message.
        message: HpMessage,
    },
}

impl HpFrame {
    /// A document's message.
    pub fn message(address: impl Into<String>, message: HpMessage) -> HpFrame {
        HpFrame::Message {
            address: address.into(),
            message,
        }
    }

    /// Encodes the frame.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            HpFrame::Ping => vec![PING],
            HpFrame::Pong => vec![PONG],
            HpFrame::Message { address, message } => encode_message(address, message),
        }
    }

    /// Decodes a frame of at most `max_frame_size` bytes.
    pub fn decode(bytes: &[u8], max_frame_size: usize) -> Result<HpFrame> {
        if bytes.len() > max_frame_size {
            return Err(DecodeError::TooLarge {
                size: bytes.len(),
                max: max_frame_size,
            });
        }
        match bytes {
            [] => return Err(DecodeError::Empty),
            [PING] => return Ok(HpFrame::Ping),
            [PONG] => return Ok(HpFrame::Pong),
            _ => {}
        }
        let mut r = Reader::new(bytes);
        let address = r.read_var_string()?.to_owned();
        let body_at = bytes.len() - r.remaining();
        let message = match r.read_var_uint()? {
            TYPE_SYNC | TYPE_AWARENESS | TYPE_QUERY_AWARENESS => {
                // The y-protocols part, after the address.
                match YMessage::decode(&bytes[body_at..], max_frame_size)? {
                    YMessage::SyncStep1(sv) => HpMessage::SyncStep1(sv),
                    YMessage::SyncStep2(update) => HpMessage::SyncStep2(update),
                    YMessage::Update(update) => HpMessage::Update(update),
                    YMessage::Awareness(entries) => HpMessage::Awareness(entries),
                    YMessage::QueryAwareness => HpMessage::QueryAwareness,
                    YMessage::Auth(_) => {
                        return Err(DecodeError::Invalid("y-protocols auth inside a Hocuspocus frame"))
                    }
                }
            }
            TYPE_AUTH => {
                let message = match r.read_var_uint()? {
                    AUTH_TOKEN if r.is_empty() => HpMessage::Token {
                        token: String::new(),
                        version: None,
                    },
                    AUTH_TOKEN => {
                        let token = r.read_var_string()?.to_owned();
                        // 4.x adds its version; a 3.x provider does not.
                        let version = if r.is_empty() {
                            None
                        } else {
                            Some(r.read_var_string()?.to_owned())
                        };
                        HpMessage::Token { token, version }
                    }
                    AUTH_PERMISSION_DENIED => HpMessage::PermissionDenied {
                        reason: r.read_var_string()?.to_owned(),
                    },
                    AUTH_AUTHENTICATED => HpMessage::Authenticated {
                        scope: r.read_var_string()?.to_owned(),
                    },
                    other => return Err(DecodeError::UnknownMessageType(other)),
                };
                r.finish()?;
                message
            }
            TYPE_STATELESS => {
                let payload = r.read_var_string()?.to_owned();
                r.finish()?;
                HpMessage::Stateless(payload)
            }
            TYPE_CLOSE => {
                let reason = if r.is_empty() {
                    None
                } else {
                    Some(r.read_var_string()?.to_owned())
                };
                r.finish()?;
                HpMessage::Close(reason)
            }
            TYPE_SYNC_STATUS => {
                let applied = match r.read_var_uint()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Invalid("sync status other than 0 or 1")),
                };
                r.finish()?;
                HpMessage::SyncStatus(applied)
            }
            other => return Err(DecodeError::UnknownMessageType(other)),
        };
        Ok(HpFrame::Message { address, message })
    }
}

/// Encodes a document's message behind `address`.
pub fn encode_message(address: &str, message: &HpMessage) -> Vec<u8> {
    let mut buf = Vec::new();
    lib0::write_var_string(&mut buf, address);
    match message {
        HpMessage::SyncStep1(sv) => buf.extend(YMessage::SyncStep1(sv.clone()).encode()),
        HpMessage::SyncStep2(update) => buf.extend(YMessage::SyncStep2(update.clone()).encode()),
        HpMessage::Update(update) => buf.extend(YMessage::Update(update.clone()).encode()),
        HpMessage::Awareness(entries) => buf.extend(YMessage::Awareness(entries.clone()).encode()),
        HpMessage::QueryAwareness => buf.extend(YMessage::QueryAwareness.encode()),
        HpMessage::Token { token, version } => {
            lib0::write_var_uint(&mut buf, TYPE_AUTH);
            lib0::write_var_uint(&mut buf, AUTH_TOKEN);
            if !token.is_empty() || version.is_some() {
                lib0::write_var_string(&mut buf, token);
            }
            if let Some(version) = version {
                lib0::write_var_string(&mut buf, version);
            }
        }
        HpMessage::PermissionDenied { reason } => {
            lib0::write_var_uint(&mut buf, TYPE_AUTH);
            lib0::write_var_uint(&mut buf, AUTH_PERMISSION_DENIED);
            lib0::write_var_string(&mut buf, reason);
        }
        HpMessage::Authenticated { scope } => {
            lib0::write_var_uint(&mut buf, TYPE_AUTH);
            lib0::write_var_uint(&mut buf, AUTH_AUTHENTICATED);
            lib0::write_var_string(&mut buf, scope);
        }
        HpMessage::Stateless(payload) => {
            lib0::write_var_uint(&mut buf, TYPE_STATELESS);
            lib0::write_var_string(&mut buf, payload);
        }
        HpMessage::Close(reason) => {
            lib0::write_var_uint(&mut buf, TYPE_CLOSE);
            if let Some(reason) = reason {
                lib0::write_var_string(&mut buf, reason);
            }
        }
        HpMessage::SyncStatus(applied) => {
            lib0::write_var_uint(&mut buf, TYPE_SYNC_STATUS);
            lib0::write_var_uint(&mut buf, u64::from(*applied));
        }
    }
    buf
}

/// The frame `encoded` (a document's message behind some address) behind `address` instead:
/// a message encoded once for a document is sent to each address a connection uses for it.
/// `None` if `encoded` does not start with an address.
pub fn readdress(encoded: &[u8], address: &str) -> Option<Vec<u8>> {
    let mut r = Reader::new(encoded);
    r.read_var_string().ok()?;
    let body = &encoded[encoded.len() - r.remaining()..];
    let mut buf = Vec::with_capacity(address.len() + 4 + body.len());
    lib0::write_var_string(&mut buf, address);
    buf.extend_from_slice(body);
    Some(buf)
}

/// Splits an address into the document name and the session id of a `sessionAwareness`
/// provider, if any.
pub fn split_address(address: &str) -> (&str, Option<&str>) {
    match address.split_once('\0') {
        Some((name, session)) => (name, Some(session)),
        None => (address, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let messages = [
            HpMessage::SyncStep1(vec![0]),
            HpMessage::SyncStep2(vec![0, 0]),
            HpMessage::Update(vec![0, 0]),
            HpMessage::Awareness(vec![AwarenessEntry {
                client_id: 7,
                clock: 1,
                state: Some("{\"user\":\"a\"}".into()),
            }]),
            HpMessage::Token {
                token: "t0k".into(),
                version: Some("4.8.0".into()),
            },
            HpMessage::Token {
                token: "t0k".into(),
                version: None,
            },
            HpMessage::Token {
                token: String::new(),
                version: None,
            },
            HpMessage::PermissionDenied {
                reason: "Forbidden".into(),
            },
            HpMessage::Authenticated {
                scope: SCOPE_READ_WRITE.into(),
            },
            HpMessage::QueryAwareness,
            HpMessage::Stateless("{\"kind\":\"ping\"}".into()),
            HpMessage::Close(None),
            HpMessage::Close(Some("bye".into())),
            HpMessage::SyncStatus(true),
            HpMessage::SyncStatus(false),
        ];
        for address in ["notes/a", "notes/a\0abc123", ""] {
            for message in &messages {
                let frame = HpFrame::message(address, message.clone());
                let bytes = frame.encode();
                assert_eq!(HpFrame::decode(&bytes, 1 << 20), Ok(frame), "{message:?}");
            }
        }
        assert_eq!(HpFrame::decode(&[PING], 10), Ok(HpFrame::Ping));
        assert_eq!(HpFrame::decode(&[PONG], 10), Ok(HpFrame::Pong));
    }

    #[test]
    fn the_wire_matches_the_provider() {
        // What a 4.x provider sends first for document "d" with token "t": Auth Token with its
        // version, then SyncStep1 of an empty document.
        let token = [1, b'd', 2, 0, 1, b't', 5, b'4', b'.', b'8', b'.', b'0'];
        assert_eq!(
            HpFrame::decode(&token, 100),
            Ok(HpFrame::message(
                "d",
                HpMessage::Token {
                    token: "t".into(),
                    version: Some("4.8.0".into())
                }
            ))
        );
        assert_eq!(
            HpFrame::decode(&[1, b'd', 0, 0, 1, 0], 100),
            Ok(HpFrame::message("d", HpMessage::SyncStep1(vec![0])))
        );
        assert_eq!(encode_message("d", &HpMessage::SyncStatus(true)), vec![1, b'd', 8, 1]);
        assert_eq!(
            encode_message(
                "d",
                &HpMessage::Authenticated {
                    scope: "readonly".into()
                }
            ),
            [&[1, b'd', 2, 2, 8][..], b"readonly"].concat()
        );
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert_eq!(HpFrame::decode(&[], 10), Err(DecodeError::Empty));
        assert!(matches!(
            HpFrame::decode(&[0; 11], 10),
            Err(DecodeError::TooLarge { .. })
        ));
        // Server-internal types, unknown types and sub-types.
        for body in [&[4u8][..], &[6], &[9], &[2, 3], &[8, 2]] {
            let frame = [&[1, b'd'][..], body].concat();
            assert!(HpFrame::decode(&frame, 100).is_err(), "{body:?}");
        }
        // Every prefix of a good frame is an error, never a panic.
        let good = encode_message(
            "notes",
            &HpMessage::Token {
                token: "abc".into(),
                version: Some("4".into()),
            },
        );
        for cut in 1..good.len() - 2 {
            let _ = HpFrame::decode(&good[..cut], 100);
        }
        // An address longer than the frame.
        assert!(HpFrame::decode(&[50, b'a', 0], 100).is_err());
    }

    #[test]
    fn readdressing_keeps_the_body() {
        let encoded = encode_message("notes/a", &HpMessage::Update(vec![1, 2, 3]));
        let moved = readdress(&encoded, "notes/a\0s1").unwrap();
        assert_eq!(
            HpFrame::decode(&moved, 100),
            Ok(HpFrame::message("notes/a\0s1", HpMessage::Update(vec![1, 2, 3])))
        );
        assert_eq!(split_address("notes/a\0s1"), ("notes/a", Some("s1")));
        assert_eq!(split_address("notes/a"), ("notes/a", None));
        // A bare Ping has no address to replace.
        assert_eq!(readdress(&[PING], "x"), None);
    }
}
