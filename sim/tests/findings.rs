//! Minimal reproductions of what the simulation found, outside the simulation: each asserts the
//! correct behaviour and stays as a regression test once the bug is fixed.

use driftsync_engine::doc::{new_doc, text_delete, text_insert};
use driftsync_engine::sync::{apply_checked, check_push, merge};

/// Seed 9 (and most "not synced … outbox […]" and Yjs "connected false" failures): a push whose
/// delete set holds one range spanning items the server has *and* items the push itself carries
/// is judged incomplete (`MissingDependencies`) by `check_push`, for ever: the client's merged
/// outbox (or a Yjs client's SyncStep2) is refused on every reconnect and never drains.
#[test]
fn a_deletion_spanning_stored_and_carried_items_is_complete() {
    let server = new_doc(1).expect("doc");
    let client = new_doc(2).expect("doc");
    let stored = text_insert(&client, 0, "abcdefg").expect("insert");
    apply_checked(&server, &stored).expect("apply");
    // Offline: more text, then one deletion across the old and the new text.
    let more = text_insert(&client, 7, "hijklmn").expect("insert");
    let delete = text_delete(&client, 1, 10).expect("delete");
    let outbox = merge(&[&more, &delete]).expect("merge");
    let checked = check_push(&server, &outbox).expect("check");
    assert!(
        checked.complete,
        "the server has clocks 0..7 of client 2 and the push carries 7..14, yet its deletion of 1..11 is called missing"
    );
}
