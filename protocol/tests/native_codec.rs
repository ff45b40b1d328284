//! Tests of the native protocol's codec: round trips of random frames of every variant, hostile
//! input, and the golden frames of `fixtures/wire/`, which every later version must keep
//! decoding (see `fixtures/wire/README.md`).
//!
//! `DRIFTSYNC_BLESS=1 cargo test -p driftsync-protocol --test native_codec golden_native_frames`
//! writes the golden frames instead of checking them. Only ever bless a NEW file.

use std::path::PathBuf;

use driftsync_protocol::{
    ClientFrame, DocId, DocResumed, ErrorCode, InboxMessage, InboxRoom, ResumeDoc, RoomMember, ServerFrame,
    DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION,
};
use proptest::prelude::*;

const MAX: usize = DEFAULT_MAX_FRAME_SIZE;

/// Every `ErrorCode` variant, in declaration order.
const ERROR_CODES: [(&str, ErrorCode); 20] = [
    ("unauthorized", ErrorCode::Unauthorized),
    ("token-expired", ErrorCode::TokenExpired),
    ("forbidden", ErrorCode::Forbidden),
    ("read-only", ErrorCode::ReadOnly),
    ("unsupported-version", ErrorCode::UnsupportedVersion),
    ("frame-too-large", ErrorCode::FrameTooLarge),
    ("malformed", ErrorCode::Malformed),
    ("invalid-update", ErrorCode::InvalidUpdate),
    ("schema-violation", ErrorCode::SchemaViolation),
    ("too-many-documents", ErrorCode::TooManyDocuments),
    ("rate-limited", ErrorCode::RateLimited),
    ("not-subscribed", ErrorCode::NotSubscribed),
    ("too-many-pending", ErrorCode::TooManyPending),
    ("load-failed", ErrorCode::LoadFailed),
    ("store-unavailable", ErrorCode::StoreUnavailable),
    ("unavailable", ErrorCode::Unavailable),
    ("internal", ErrorCode::Internal),
    ("missing-dependencies", ErrorCode::MissingDependencies),
    ("client-id-taken", ErrorCode::ClientIdTaken),
    ("document-too-large", ErrorCode::DocumentTooLarge),
];

/// A match that fails to compile when `ErrorCode` gains a variant, so that `ERROR_CODES` (and
/// the golden frames built from it) are extended at the same time.
#[allow(dead_code)]
fn error_codes_are_all_listed(code: ErrorCode) {
    match code {
        ErrorCode::Unauthorized
        | ErrorCode::TokenExpired
        | ErrorCode::Forbidden
        | ErrorCode::ReadOnly
        | ErrorCode::UnsupportedVersion
        | ErrorCode::FrameTooLarge
        | ErrorCode::Malformed
        | ErrorCode::InvalidUpdate
        | ErrorCode::SchemaViolation
        | ErrorCode::TooManyDocuments
        | ErrorCode::RateLimited
        | ErrorCode::NotSubscribed
        | ErrorCode::TooManyPending
        | ErrorCode::LoadFailed
        | ErrorCode::StoreUnavailable
        | ErrorCode::Unavailable
        | ErrorCode::Internal
        | ErrorCode::MissingDependencies
        | ErrorCode::ClientIdTaken
        | ErrorCode::DocumentTooLarge => {}
    }
}

fn doc_id() -> impl Strategy<Value = DocId> {
    "[a-z0-9/_-]{1,40}".prop_map(|s| DocId::new(s).unwrap())
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..64)
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(ERROR_CODES.iter().map(|&(_, code)| code).collect::<Vec<_>>())
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    let resume_doc = (doc_id(), any::<u64>(), bytes()).prop_map(|(doc, cursor, state_vector)| ResumeDoc {
        doc,
        cursor,
        state_vector,
    });
    prop_oneof![
        (any::<u16>(), any::<String>(), any::<u64>()).prop_map(|(version, token, client_id)| {
            ClientFrame::Hello {
                version,
                token,
                client_id,
            }
        }),
        prop::collection::vec(resume_doc, 0..6).prop_map(|docs| ClientFrame::Resume { docs }),
        (doc_id(), any::<u64>(), bytes()).prop_map(|(doc, batch, update)| ClientFrame::Push { doc, batch, update }),
        doc_id().prop_map(|doc| ClientFrame::Unsubscribe { doc }),
        (doc_id(), proptest::option::of(any::<String>())).prop_map(|(doc, state)| ClientFrame::Presence { doc, state }),
        (doc_id(), any::<bool>()).prop_map(|(doc, typing)| ClientFrame::Typing { doc, typing }),
        any::<u64>().prop_map(|nonce| ClientFrame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| ClientFrame::Pong { nonce }),
        any::<String>().prop_map(|token| ClientFrame::Reauth { token }),
    ]
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    let doc_resumed = (
        doc_id(),
        any::<u64>(),
        proptest::option::of(bytes()),
        proptest::option::of(bytes()),
    )
        .prop_map(|(doc, cursor, update, state_vector)| DocResumed {
            doc,
            cursor,
            update,
            state_vector,
        });
    prop_oneof![
        (any::<u16>(), any::<u32>(), any::<u64>(), any::<u32>()).prop_map(
            |(version, max_frame_size, session, heartbeat_ms)| ServerFrame::Welcome {
                version,
                max_frame_size,
                session,
                heartbeat_ms,
            }
        ),
        prop::collection::vec(doc_resumed, 0..6).prop_map(|docs| ServerFrame::Resumed { docs }),
        (doc_id(), any::<u64>(), bytes()).prop_map(|(doc, cursor, update)| ServerFrame::Update { doc, cursor, update }),
        (doc_id(), any::<u64>(), any::<u64>()).prop_map(|(doc, batch, cursor)| ServerFrame::Ack { doc, batch, cursor }),
        (
            error_code(),
            proptest::option::of(doc_id()),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(code, doc, batch)| ServerFrame::Error { code, doc, batch }),
        (
            doc_id(),
            any::<u64>(),
            any::<String>(),
            proptest::option::of(any::<String>())
        )
            .prop_map(|(doc, peer, user, state)| ServerFrame::Presence { doc, peer, user, state }),
        (doc_id(), any::<u64>(), any::<String>(), any::<bool>()).prop_map(|(doc, peer, user, typing)| {
            ServerFrame::Typing {
                doc,
                peer,
                user,
                typing,
            }
        }),
        any::<u64>().prop_map(|nonce| ServerFrame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| ServerFrame::Pong { nonce }),
        (doc_id(), bytes()).prop_map(|(doc, bytes)| ServerFrame::ResumePart { doc, bytes }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn client_frames_round_trip(frame in client_frame()) {
        prop_assert_eq!(ClientFrame::decode(&frame.encode(), MAX), Ok(frame));
    }

    #[test]
    fn server_frames_round_trip(frame in server_frame()) {
        prop_assert_eq!(ServerFrame::decode(&frame.encode(), MAX), Ok(frame));
    }

    #[test]
    fn random_bytes_into_client_decode_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(frame) = ClientFrame::decode(&bytes, MAX) {
            prop_assert_eq!(ClientFrame::decode(&frame.encode(), MAX), Ok(frame));
        }
    }

    #[test]
    fn random_bytes_into_server_decode_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(frame) = ServerFrame::decode(&bytes, MAX) {
            prop_assert_eq!(ServerFrame::decode(&frame.encode(), MAX), Ok(frame));
        }
    }

    /// Corrupting one byte of a valid frame reaches deeper into the decoder than random bytes.
    #[test]
    fn corrupted_frames_never_panic(frame in client_frame(), server in server_frame(), at in any::<usize>(), byte in any::<u8>()) {
        for mut bytes in [frame.encode(), server.encode()] {
            let i = at % bytes.len();
            bytes[i] = byte;
            let _ = ClientFrame::decode(&bytes, MAX);
            let _ = ServerFrame::decode(&bytes, MAX);
            let _ = ClientFrame::decode(&bytes[..i], MAX);
            let _ = ServerFrame::decode(&bytes[..i], MAX);
        }
    }
}

/// A golden frame: one direction's frame type.
#[derive(Debug)]
enum Golden {
    Client(ClientFrame),
    Server(ServerFrame),
}

impl Golden {
    fn encode(&self) -> Vec<u8> {
        match self {
            Golden::Client(frame) => frame.encode(),
            Golden::Server(frame) => frame.encode(),
        }
    }

    /// Decodes `bytes` as the same direction and compares.
    fn check(&self, name: &str, bytes: &[u8]) {
        match self {
            Golden::Client(expected) => {
                assert_eq!(ClientFrame::decode(bytes, MAX).as_ref(), Ok(expected), "{name}")
            }
            Golden::Server(expected) => {
                assert_eq!(ServerFrame::decode(bytes, MAX).as_ref(), Ok(expected), "{name}")
            }
        }
    }
}

fn doc(id: &str) -> DocId {
    DocId::new(id).unwrap()
}

/// The golden frames: file name (without `.bin`) and the value the file must decode to. Append
/// new entries; never change an existing one.
fn golden_frames() -> Vec<(String, Golden)> {
    // A one-client state vector (client 1234567890 at clock 42) and a small v1 update.
    let sv = vec![0x01, 0xd2, 0x85, 0xd8, 0xcc, 0x04, 0x2a];
    let update = vec![
        0x01, 0x01, 0x01, 0x00, 0x04, 0x01, 0x04, b't', b'e', b'x', b't', 0x02, b'h', b'i', 0x00,
    ];
    let mut frames: Vec<(String, Golden)> = vec![
        (
            "client-hello".into(),
            Golden::Client(ClientFrame::Hello {
                version: PROTOCOL_VERSION,
                token: "eyJhbGciOiJIUzI1NiJ9.e30.sig".into(),
                client_id: (1 << 53) - 1,
            }),
        ),
        (
            "client-resume".into(),
            Golden::Client(ClientFrame::Resume {
                docs: vec![
                    ResumeDoc {
                        doc: doc("notes/0042"),
                        cursor: 1_000_000,
                        state_vector: sv.clone(),
                    },
                    ResumeDoc {
                        doc: doc("chat/general"),
                        cursor: 0,
                        state_vector: vec![0],
                    },
                ],
            }),
        ),
        (
            "client-push".into(),
            Golden::Client(ClientFrame::Push {
                doc: doc("notes/0042"),
                batch: 7,
                update: update.clone(),
            }),
        ),
        (
            "client-unsubscribe".into(),
            Golden::Client(ClientFrame::Unsubscribe {
                doc: doc("chat/general"),
            }),
        ),
        (
            "client-presence".into(),
            Golden::Client(ClientFrame::Presence {
                doc: doc("chat/general"),
                state: Some(r#"{"user":{"name":"ada"},"cursor":12}"#.into()),
            }),
        ),
        (
            "client-presence-leave".into(),
            Golden::Client(ClientFrame::Presence {
                doc: doc("chat/general"),
                state: None,
            }),
        ),
        (
            "client-typing".into(),
            Golden::Client(ClientFrame::Typing {
                doc: doc("chat/general"),
                typing: true,
            }),
        ),
        (
            "client-ping".into(),
            Golden::Client(ClientFrame::Ping { nonce: 0xdead_beef }),
        ),
        ("client-pong".into(), Golden::Client(ClientFrame::Pong { nonce: 42 })),
        (
            "client-reauth".into(),
            Golden::Client(ClientFrame::Reauth {
                token: "eyJhbGciOiJIUzI1NiJ9.e30.new".into(),
            }),
        ),
        (
            "server-welcome".into(),
            Golden::Server(ServerFrame::Welcome {
                version: PROTOCOL_VERSION,
                max_frame_size: DEFAULT_MAX_FRAME_SIZE as u32,
                session: 99,
                heartbeat_ms: 15_000,
            }),
        ),
        (
            "server-resumed".into(),
            Golden::Server(ServerFrame::Resumed {
                docs: vec![
                    DocResumed {
                        doc: doc("notes/0042"),
                        cursor: 1_000_000,
                        update: None,
                        state_vector: None,
                    },
                    DocResumed {
                        doc: doc("chat/general"),
                        cursor: 17,
                        update: Some(update.clone()),
                        state_vector: Some(sv.clone()),
                    },
                ],
            }),
        ),
        (
            "server-update".into(),
            Golden::Server(ServerFrame::Update {
                doc: doc("notes/0042"),
                cursor: 1_000_001,
                update: update.clone(),
            }),
        ),
        (
            "server-ack".into(),
            Golden::Server(ServerFrame::Ack {
                doc: doc("notes/0042"),
                batch: 7,
                cursor: 1_000_001,
            }),
        ),
        (
            "server-error".into(),
            Golden::Server(ServerFrame::Error {
                code: ErrorCode::ReadOnly,
                doc: Some(doc("notes/0042")),
                batch: Some(7),
            }),
        ),
        (
            "server-presence".into(),
            Golden::Server(ServerFrame::Presence {
                doc: doc("chat/general"),
                peer: 3,
                user: "ada".into(),
                state: Some(r#"{"user":{"name":"ada"}}"#.into()),
            }),
        ),
        (
            "server-presence-left".into(),
            Golden::Server(ServerFrame::Presence {
                doc: doc("chat/general"),
                peer: 3,
                user: "ada".into(),
                state: None,
            }),
        ),
        (
            "server-typing".into(),
            Golden::Server(ServerFrame::Typing {
                doc: doc("chat/general"),
                peer: 3,
                user: "ada".into(),
                typing: false,
            }),
        ),
        ("server-ping".into(), Golden::Server(ServerFrame::Ping { nonce: 1 })),
        (
            "server-pong".into(),
            Golden::Server(ServerFrame::Pong { nonce: 0xdead_beef }),
        ),
        (
            "server-resume-part".into(),
            Golden::Server(ServerFrame::ResumePart {
                doc: DocId::new("notes/big").unwrap(),
                bytes: vec![1, 2, 3, 4],
            }),
        ),
        (
            "client-inbox".into(),
            Golden::Client(ClientFrame::Inbox { since: 4_242 }),
        ),
        (
            "client-members".into(),
            Golden::Client(ClientFrame::Members {
                room: doc("chat/general"),
            }),
        ),
        (
            "server-inbox".into(),
            Golden::Server(ServerFrame::Inbox {
                version: 4_243,
                rooms: vec![
                    InboxRoom {
                        room: doc("chat/general"),
                        joined: true,
                        at_ms: 1_733_000_000_000,
                        last: Some(InboxMessage {
                            id: "0193f1c2-7c1e-7cc3-a9b1-5d0c1e7b2a10".into(),
                            sort: "001733000000500.0000000000/0000000000000042/0193f1c2-7c1e-7cc3-a9b1-5d0c1e7b2a10"
                                .into(),
                            author: "bob".into(),
                            kind: "text".into(),
                            text: "lunch?".into(),
                            deleted: false,
                            at_ms: 1_733_000_000_500,
                        }),
                        unread: 3,
                        read_sort: String::new(),
                    },
                    InboxRoom {
                        room: doc("chat/old"),
                        joined: false,
                        at_ms: 1_733_000_000_001,
                        last: None,
                        unread: 0,
                        read_sort: String::new(),
                    },
                ],
                more: false,
            }),
        ),
        (
            "server-members".into(),
            Golden::Server(ServerFrame::Members {
                room: doc("chat/general"),
                members: vec![
                    RoomMember {
                        user: "ada".into(),
                        joined: true,
                        at_ms: 1_733_000_000_000,
                        status: Some("away".into()),
                        last_seen_ms: Some(1_733_000_100_000),
                    },
                    RoomMember {
                        user: "bob".into(),
                        joined: false,
                        at_ms: 1_733_000_000_002,
                        status: None,
                        last_seen_ms: None,
                    },
                ],
            }),
        ),
    ];
    // One error frame per error code pins every code's index on the wire.
    for (name, code) in ERROR_CODES {
        frames.push((
            format!("error-code-{name}"),
            Golden::Server(ServerFrame::Error {
                code,
                doc: None,
                batch: None,
            }),
        ));
    }
    frames
}

fn wire_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/wire")
}

#[test]
fn golden_native_frames() {
    let dir = wire_dir();
    let bless = std::env::var("DRIFTSYNC_BLESS").is_ok_and(|v| v == "1");
    for (name, frame) in golden_frames() {
        let path = dir.join(format!("{name}.bin"));
        let encoded = frame.encode();
        if bless {
            let old = std::fs::read(&path).ok();
            if old.as_deref() != Some(encoded.as_slice()) {
                let what = if old.is_some() { "CHANGED" } else { "created" };
                eprintln!("bless: {what} {}", path.display());
                std::fs::write(&path, &encoded).unwrap();
            }
            continue;
        }
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "golden frame {} is missing ({e}); for a NEW frame run with DRIFTSYNC_BLESS=1",
                path.display()
            )
        });
        frame.check(&name, &bytes);
        // Old peers decode what this build encodes only if the encoding of a value never changes.
        assert_eq!(
            encoded, bytes,
            "{name}: this build encodes the golden value differently"
        );
    }
}

#[test]
fn every_wire_fixture_is_checked() {
    let names: Vec<String> = golden_frames()
        .into_iter()
        .map(|(name, _)| format!("{name}.bin"))
        .collect();
    let Ok(entries) = std::fs::read_dir(wire_dir()) else {
        return;
    };
    for entry in entries {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".bin") {
            assert!(
                names.contains(&name),
                "fixtures/wire/{name} is not in golden_frames(): it must stay checked"
            );
        }
    }
}
