//! Tests of the y-protocols codec against golden frames written by the real JavaScript packages
//! (see `fixtures/yjs/README.md`), round trips of random messages, and hostile input.

use std::path::PathBuf;

use driftsync_protocol::lib0::{self, Reader, MAX_SAFE_INTEGER};
use driftsync_protocol::yjs::{AuthMessage, AwarenessEntry, YMessage};
use driftsync_protocol::DecodeError;
use proptest::prelude::*;

const MAX: usize = 1 << 20;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/yjs")
}

fn read_fixture(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every golden frame and the message it holds.
fn golden() -> Vec<(&'static str, YMessage)> {
    vec![
        // State vector: one client, 1234567890, at clock 42.
        (
            "sync-step1.bin",
            YMessage::SyncStep1(vec![0x01, 0xd2, 0x85, 0xd8, 0xcc, 0x04, 0x2a]),
        ),
        ("sync-step1-empty.bin", YMessage::SyncStep1(vec![0x00])),
        // Client 1 inserts "hi" at the start of Y.Text "text".
        (
            "update.bin",
            YMessage::Update(vec![
                0x01, 0x01, 0x01, 0x00, 0x04, 0x01, 0x04, b't', b'e', b'x', b't', 0x02, b'h', b'i', 0x00,
            ]),
        ),
        // The same document after deleting the "h", against an empty state vector.
        (
            "sync-step2.bin",
            YMessage::SyncStep2(vec![
                0x01, 0x02, 0x01, 0x00, 0x01, 0x01, 0x04, b't', b'e', b'x', b't', 0x01, 0x84, 0x01, 0x00, 0x01, b'i',
                0x01, 0x01, 0x01, 0x00, 0x01,
            ]),
        ),
        (
            "awareness.bin",
            YMessage::Awareness(vec![
                AwarenessEntry {
                    client_id: 10,
                    clock: 1,
                    state: Some(r#"{"user":{"name":"ada"}}"#.to_owned()),
                },
                AwarenessEntry {
                    client_id: 20,
                    clock: 1,
                    state: None,
                },
            ]),
        ),
        (
            "auth-denied.bin",
            YMessage::Auth(AuthMessage::PermissionDenied {
                reason: "read-only".to_owned(),
            }),
        ),
        ("query-awareness.bin", YMessage::QueryAwareness),
    ]
}

#[test]
fn golden_frames_decode_and_reencode_identically() {
    for (name, expected) in golden() {
        let bytes = read_fixture(name);
        assert_eq!(YMessage::decode(&bytes, MAX).as_ref(), Ok(&expected), "{name}");
        assert_eq!(expected.encode(), bytes, "{name} re-encodes differently");
    }
}

#[test]
fn every_fixture_file_is_checked() {
    let known: Vec<&str> = golden().into_iter().map(|(name, _)| name).collect();
    for entry in std::fs::read_dir(fixture_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".bin") {
            assert!(known.contains(&name.as_str()), "fixtures/yjs/{name} is not in golden()");
        }
    }
}

#[test]
fn truncated_fixtures_are_errors() {
    for (name, _) in golden() {
        let bytes = read_fixture(name);
        for len in 0..bytes.len() {
            assert!(
                YMessage::decode(&bytes[..len], MAX).is_err(),
                "{name} cut at {len} decoded"
            );
        }
    }
}

#[test]
fn trailing_bytes_are_refused() {
    for (name, _) in golden() {
        let mut bytes = read_fixture(name);
        bytes.push(0);
        assert_eq!(
            YMessage::decode(&bytes, MAX),
            Err(DecodeError::TrailingBytes(1)),
            "{name}"
        );
    }
    // Two messages in one frame: the second is trailing bytes, not a second message.
    let mut two = read_fixture("sync-step1.bin");
    two.extend(read_fixture("awareness.bin"));
    assert_eq!(YMessage::decode(&two, MAX), Err(DecodeError::TrailingBytes(36)));
    // Bytes after the last awareness entry, inside the awareness array.
    let frame = [1, 5, 1, 7, 1, 1, b'1'];
    assert_eq!(
        YMessage::decode(&frame, MAX),
        Ok(YMessage::Awareness(vec![entry(7, 1, "1")]))
    );
    let frame = [1, 6, 1, 7, 1, 1, b'1', 0];
    assert_eq!(YMessage::decode(&frame, MAX), Err(DecodeError::TrailingBytes(1)));
}

fn entry(client_id: u64, clock: u64, state: &str) -> AwarenessEntry {
    AwarenessEntry {
        client_id,
        clock,
        state: Some(state.to_owned()),
    }
}

#[test]
fn oversize_and_empty_frames_are_refused() {
    let bytes = read_fixture("awareness.bin");
    assert_eq!(
        YMessage::decode(&bytes, bytes.len() - 1),
        Err(DecodeError::TooLarge {
            size: bytes.len(),
            max: bytes.len() - 1
        })
    );
    assert_eq!(YMessage::decode(&bytes, bytes.len()).map(|_| ()), Ok(()));
    assert_eq!(YMessage::decode(&[], MAX), Err(DecodeError::Empty));
}

#[test]
fn unknown_types_and_sub_types_are_refused() {
    assert_eq!(YMessage::decode(&[4], MAX), Err(DecodeError::UnknownMessageType(4)));
    assert_eq!(
        YMessage::decode(&[0x80, 0x01], MAX),
        Err(DecodeError::UnknownMessageType(128))
    );
    assert_eq!(
        YMessage::decode(&[0, 3, 0], MAX),
        Err(DecodeError::UnknownMessageType(3))
    );
    assert_eq!(
        YMessage::decode(&[2, 1, 0], MAX),
        Err(DecodeError::UnknownMessageType(1))
    );
}

#[test]
fn var_uint_beyond_53_bits_is_refused() {
    let mut max = Vec::new();
    lib0::write_var_uint(&mut max, MAX_SAFE_INTEGER);
    assert_eq!(Reader::new(&max).read_var_uint(), Ok(MAX_SAFE_INTEGER));

    let mut over = Vec::new();
    lib0::write_var_uint(&mut over, MAX_SAFE_INTEGER + 1);
    assert_eq!(Reader::new(&over).read_var_uint(), Err(DecodeError::VarIntOverflow));
    let mut top = Vec::new();
    lib0::write_var_uint(&mut top, u64::MAX);
    assert_eq!(Reader::new(&top).read_var_uint(), Err(DecodeError::VarIntOverflow));

    // As a message type, and as an awareness clock.
    assert_eq!(YMessage::decode(&over, MAX), Err(DecodeError::VarIntOverflow));
    let mut payload = vec![1, 1];
    payload.extend(&over);
    payload.push(0);
    let mut frame = vec![1];
    lib0::write_var_buf(&mut frame, &payload);
    assert_eq!(YMessage::decode(&frame, MAX), Err(DecodeError::VarIntOverflow));

    // An endless continuation is refused after nine bytes, not read to the end.
    let endless = vec![0x80; 1000];
    assert_eq!(Reader::new(&endless).read_var_uint(), Err(DecodeError::VarIntOverflow));
}

#[test]
fn byte_array_longer_than_the_frame_is_refused() {
    assert_eq!(YMessage::decode(&[0, 2, 5, 1, 2], MAX), Err(DecodeError::UnexpectedEof));
    // A length of 2^53 - 1 must fail without allocating.
    let mut frame = vec![0, 1];
    lib0::write_var_uint(&mut frame, MAX_SAFE_INTEGER);
    assert_eq!(YMessage::decode(&frame, MAX), Err(DecodeError::UnexpectedEof));
    assert_eq!(Reader::new(&frame[2..]).read_var_buf(), Err(DecodeError::UnexpectedEof));
    // The same inside an awareness entry: the state string's length overruns the array.
    assert_eq!(
        YMessage::decode(&[1, 4, 1, 7, 1, 9], MAX),
        Err(DecodeError::UnexpectedEof)
    );
    // An awareness count that the array cannot hold.
    assert_eq!(
        YMessage::decode(&[1, 4, 2, 7, 1, 0], MAX),
        Err(DecodeError::UnexpectedEof)
    );
}

#[test]
fn invalid_utf8_is_refused() {
    assert_eq!(
        YMessage::decode(&[1, 5, 1, 7, 1, 1, 0xff], MAX),
        Err(DecodeError::InvalidUtf8)
    );
    assert_eq!(
        YMessage::decode(&[2, 0, 2, 0xc3, 0x28], MAX),
        Err(DecodeError::InvalidUtf8)
    );
}

fn is_json_null(s: &str) -> bool {
    s.trim_matches([' ', '\t', '\n', '\r']) == "null"
}

fn awareness_entry() -> impl Strategy<Value = AwarenessEntry> {
    let state = prop_oneof![
        Just(None),
        any::<String>()
            .prop_filter("not JSON null", |s| !is_json_null(s))
            .prop_map(Some),
        "\\{\"user\":\\{\"name\":\"[a-z]{0,12}\"\\}\\}".prop_map(Some),
    ];
    (0..=MAX_SAFE_INTEGER, 0..=MAX_SAFE_INTEGER, state).prop_map(|(client_id, clock, state)| AwarenessEntry {
        client_id,
        clock,
        state,
    })
}

fn message() -> impl Strategy<Value = YMessage> {
    let bytes = || prop::collection::vec(any::<u8>(), 0..200);
    prop_oneof![
        bytes().prop_map(YMessage::SyncStep1),
        bytes().prop_map(YMessage::SyncStep2),
        bytes().prop_map(YMessage::Update),
        prop::collection::vec(awareness_entry(), 0..8).prop_map(YMessage::Awareness),
        any::<String>().prop_map(|reason| YMessage::Auth(AuthMessage::PermissionDenied { reason })),
        Just(YMessage::QueryAwareness),
    ]
}

/// Random bytes, half of them behind a valid message type and sub-type so that the payload
/// decoders are reached, not only the type check.
fn hostile_frame() -> impl Strategy<Value = Vec<u8>> {
    let tail = prop::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        tail.clone(),
        (0u8..4, 0u8..3, tail).prop_map(|(t, sub, tail)| {
            let mut frame = vec![t];
            if t != 1 {
                frame.push(sub);
            }
            frame.extend(tail);
            frame
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_message_round_trips(msg in message()) {
        let bytes = msg.encode();
        prop_assert_eq!(YMessage::decode(&bytes, MAX), Ok(msg));
    }

    #[test]
    fn random_bytes_never_panic(bytes in hostile_frame()) {
        if let Ok(msg) = YMessage::decode(&bytes, MAX) {
            // Whatever decodes must encode back to a frame that decodes to the same message.
            prop_assert_eq!(YMessage::decode(&msg.encode(), MAX), Ok(msg));
        }
    }

    #[test]
    fn reader_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300), ops in prop::collection::vec(0u8..3, 1..40)) {
        let mut r = Reader::new(&bytes);
        for op in ops {
            let before = r.remaining();
            let ok = match op {
                0 => r.read_var_uint().is_ok(),
                1 => r.read_var_buf().is_ok(),
                _ => r.read_var_string().is_ok(),
            };
            if !ok {
                break;
            }
            prop_assert!(r.remaining() < before);
        }
    }

    #[test]
    fn var_uint_round_trips(values in prop::collection::vec(0..=MAX_SAFE_INTEGER, 0..20)) {
        let mut buf = Vec::new();
        for &v in &values {
            lib0::write_var_uint(&mut buf, v);
        }
        let mut r = Reader::new(&buf);
        for &v in &values {
            prop_assert_eq!(r.read_var_uint(), Ok(v));
        }
        prop_assert!(r.is_empty());
    }
}
