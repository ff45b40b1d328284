//! Fuzz target bodies: one function per target of the cargo-fuzz crate in `fuzz/` at the
//! repository root, also run over the fixtures and a seeded mutation loop by
//! `engine/tests/fuzz_corpus.rs`.
//!
//! Every function takes arbitrary bytes and must return without panicking. They panic only when
//! an invariant breaks — a decoded frame that does not re-encode to itself, a checker summary
//! that disagrees with yrs, or a panic inside yrs (decoding or applying) on bytes
//! [`crate::validate`] accepted, even one that [`doc::apply`] catches — which is what a fuzzer
//! reports as a crash. (libfuzzer's panic hook aborts on caught panics too, so under cargo-fuzz a
//! yrs panic anywhere is a crash.)

use std::panic::{catch_unwind, AssertUnwindSafe};

use driftsync_protocol::yjs::YMessage;
use driftsync_protocol::{ClientFrame, ServerFrame, DEFAULT_MAX_FRAME_SIZE};
use yrs::updates::decoder::Decode;
use yrs::{ReadTxn, Transact, Update};

use crate::validate::{self, UpdateSummary};
use crate::{doc, Error};

/// `ClientFrame::decode`; a frame that decodes must re-encode to bytes that decode to itself.
pub fn native_client_frame(data: &[u8]) {
    if let Ok(frame) = ClientFrame::decode(data, DEFAULT_MAX_FRAME_SIZE) {
        let again = ClientFrame::decode(&frame.encode(), usize::MAX).expect("a re-encoded ClientFrame decodes");
        assert_eq!(again, frame, "ClientFrame round trip");
    }
}

/// `ServerFrame::decode`; a frame that decodes must re-encode to bytes that decode to itself.
pub fn native_server_frame(data: &[u8]) {
    if let Ok(frame) = ServerFrame::decode(data, DEFAULT_MAX_FRAME_SIZE) {
        let again = ServerFrame::decode(&frame.encode(), usize::MAX).expect("a re-encoded ServerFrame decodes");
        assert_eq!(again, frame, "ServerFrame round trip");
    }
}

/// `YMessage::decode` (y-websocket frames); a message that decodes must re-encode to bytes that
/// decode to itself. The state vector or update a sync message carries goes on through
/// [`state_vector`] or [`update_apply`], as the server's `/yjs` endpoint would take it.
pub fn yjs_message(data: &[u8]) {
    if let Ok(message) = YMessage::decode(data, DEFAULT_MAX_FRAME_SIZE) {
        let again = YMessage::decode(&message.encode(), usize::MAX).expect("a re-encoded YMessage decodes");
        assert_eq!(again, message, "YMessage round trip");
        match &message {
            YMessage::SyncStep1(sv) => state_vector(sv),
            YMessage::SyncStep2(update) | YMessage::Update(update) => update_apply(update),
            _ => {}
        }
    }
}

/// [`doc::decode_state_vector`]: accepted exactly when [`validate::check_state_vector`] accepts,
/// with the same number of distinct clients at most.
pub fn state_vector(data: &[u8]) {
    let checked = validate::check_state_vector(data);
    match doc::decode_state_vector(data) {
        Ok(sv) => {
            let entries = checked.expect("decode_state_vector accepted what the checker refused");
            assert!(sv.len() <= entries, "state vector has more clients than entries");
        }
        Err(e) => {
            assert!(matches!(e, Error::InvalidStateVector(_)), "unexpected error type: {e}");
            // yrs reads every prefix the checker accepts.
            assert!(checked.is_err(), "yrs refused a state vector the checker accepted: {e}");
        }
    }
}

/// [`doc::decode_update`] and [`doc::apply`] to a fresh document, checking the checker against
/// yrs on the way: when [`validate::check_update`] accepts, yrs's decoder must not panic, must
/// accept (unless an `Embed`/`Format` JSON text is invalid, which the checker leaves to yrs), and
/// must see the same clock ranges and delete set as the summary.
pub fn update_apply(data: &[u8]) {
    let checked = validate::check_update(data);
    if let Ok(summary) = &checked {
        let decoded = catch_unwind(AssertUnwindSafe(|| Update::decode_v1(data)))
            .unwrap_or_else(|_| panic!("yrs panicked decoding an update the checker accepted"));
        match decoded {
            Ok(update) => {
                if let Err(why) = compare_with_yrs(summary, &update) {
                    panic!("checker summary disagrees with yrs: {why}");
                }
            }
            Err(yrs::encoding::read::Error::InvalidJSON(_)) => {}
            Err(e) => panic!("yrs refused an update the checker accepted: {e}"),
        }
    }
    match doc::decode_update(data) {
        Ok(update) => {
            assert!(checked.is_ok(), "decode_update accepted what the checker refused");
            let Ok(fresh) = doc::new_doc(1) else { return };
            // Errors are fine; a panic inside yrs (which `apply` catches and reports) is not.
            let applied = doc::apply(&fresh, update);
            if let Err(Error::InvalidUpdate(why)) = &applied {
                assert!(
                    !why.contains("panicked"),
                    "yrs panicked applying an update the checker accepted"
                );
            }
            if applied.is_ok() {
                // The document must still encode (it is what the server would serve next).
                let state = fresh.transact().encode_state_as_update_v1(&yrs::StateVector::default());
                validate::check_update(&state).expect("yrs's own encoding passes the checker");
            }
        }
        Err(e) => assert!(matches!(e, Error::InvalidUpdate(_)), "unexpected error type: {e}"),
    }
}

/// Compares a checker summary with yrs's decoding of the same bytes: the first carried clock of
/// every client (`Update::state_vector_lower`), the carried ranges (`Update::insertions(true)`),
/// and the delete set (each client's ranges sorted and merged on both sides).
pub fn compare_with_yrs(summary: &UpdateSummary, update: &Update) -> Result<(), String> {
    // First carried clock per client.
    let mut lower: Vec<(u64, u32)> = update.state_vector_lower().iter().map(|(c, &k)| (c.get(), k)).collect();
    lower.sort_unstable();
    let mut ours: Vec<(u64, u32)> = Vec::new();
    for &(client, start, _) in &summary.carried {
        if ours.last().map(|&(c, _)| c) != Some(client) {
            ours.push((client, start));
        }
    }
    if lower != ours {
        return Err(format!("state_vector_lower {lower:?}, checker {ours:?}"));
    }
    // Carried ranges.
    let mut inserted: Vec<(u64, u32, u32)> = Vec::new();
    for (client, ranges) in update.insertions(true).iter() {
        for r in ranges.iter() {
            inserted.push((client.get(), r.start, r.end));
        }
    }
    inserted.sort_unstable();
    if inserted != summary.carried {
        return Err(format!("insertions {inserted:?}, checker {:?}", summary.carried));
    }
    // Delete set.
    let mut theirs: Vec<(u64, u32, u32)> = Vec::new();
    for (client, ranges) in update.delete_set().iter() {
        for r in ranges.iter() {
            theirs.push((client.get(), r.start, r.end));
        }
    }
    let ours: Vec<(u64, u32, u32)> = summary
        .deletes
        .iter()
        .map(|&(c, clock, len)| (c, clock, clock + len))
        .collect();
    let (theirs, ours) = (normalize(theirs), normalize(ours));
    if theirs != ours {
        return Err(format!("delete set {theirs:?}, checker {ours:?}"));
    }
    Ok(())
}

/// Sorts `(client, start, end)` ranges and merges overlapping and adjacent ones; drops empty ones.
fn normalize(mut ranges: Vec<(u64, u32, u32)>) -> Vec<(u64, u32, u32)> {
    ranges.retain(|&(_, s, e)| s < e);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u32, u32)> = Vec::with_capacity(ranges.len());
    for (c, s, e) in ranges {
        match out.last_mut() {
            Some((lc, _, le)) if *lc == c && s <= *le => *le = (*le).max(e),
            _ => out.push((c, s, e)),
        }
    }
    out
}
