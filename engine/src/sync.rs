//! The sync core. It does no I/O: it takes bytes (updates, state vectors, log entries that the
//! shell read from the store) and returns bytes to send or store.
//!
//! * [`apply_remote`]: apply an update from a peer. Order and duplicates do not matter; updates
//!   whose predecessors are missing are held by yrs, bounded by [`Limits`], and reported.
//! * [`answer_resume`] (server): what one document of a client's resume lacks — the log tail
//!   after the client's cursor when the log still has it, otherwise a state-vector diff — and
//!   whether the server lacks something of the client's.
//! * [`plan_pushes`] (client): after the answer, what the client sends — its outbox, plus a
//!   recovery update if the server turns out to lack changes the outbox does not hold.
//!
//! The cursor path is what makes a resume cheap: a client that missed nothing pays a few bytes,
//! one that missed K operations pays about their size, and neither receives the document's whole
//! delete set (which a state-vector diff, like a y-protocols SyncStep2, always carries).

use std::panic::{catch_unwind, AssertUnwindSafe};

use driftsync_protocol::Cursor;
use yrs::updates::encoder::{Encode, Encoder, EncoderV1};
use yrs::{ClientID, Doc, IdSet, ReadTxn, StateVector, Transact, Update, ID};

use crate::doc::{apply, decode_state_vector, decode_update, is_empty_update};
use crate::store::{LogEntry, OutboxEntry};
use crate::validate::{check_update, dependencies_satisfied};
use crate::{Error, Result};

/// Bounds on what a document holds back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes of updates that may wait for missing predecessors in one document. An
    /// update that would start waiting beyond this is refused with [`Error::TooManyPending`].
    pub max_pending_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pending_bytes: 1024 * 1024,
        }
    }
}

/// What applying a remote update did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Everything the document knows is integrated, and the update changed it.
    Integrated,
    /// Everything the document knows is integrated, and it held all of the update already (a
    /// re-sent or echoed update): there is nothing new to pass on.
    Unchanged,
    /// Some updates wait for predecessors: `missing` lists, per client id, the clock the
    /// document must reach before they can be integrated.
    Pending {
        /// `(client id, clock)` pairs still missing.
        missing: Vec<(u64, u32)>,
        /// Encoded size of what waits, in bytes.
        bytes: usize,
    },
}

/// Applies a peer's update. Applying the same update twice, or updates in any order, gives the
/// same document (yrs is a CRDT); what cannot be integrated yet is held and reported.
pub fn apply_remote(doc: &Doc, bytes: &[u8], limits: &Limits) -> Result<Applied> {
    let update = decode_update(bytes)?;
    if would_wait(doc, &update) {
        let (_, pending_bytes) = pending(doc);
        if pending_bytes + bytes.len() > limits.max_pending_bytes {
            return Err(Error::TooManyPending {
                pending: pending_bytes + bytes.len(),
                limit: limits.max_pending_bytes,
            });
        }
    }
    let changed = apply(doc, update)?;
    Ok(match pending(doc) {
        (Some(missing), bytes) => Applied::Pending { missing, bytes },
        (None, _) if changed => Applied::Integrated,
        (None, _) => Applied::Unchanged,
    })
}

/// Whether some of `update` starts beyond what `doc` has from the same client (a gap).
fn would_wait(doc: &Doc, update: &Update) -> bool {
    let txn = doc.transact();
    let have = txn.state_vector();
    update
        .state_vector_lower()
        .iter()
        .any(|(client, &clock)| clock > have.get(client))
}

/// What waits in `doc` for predecessors: the missing clocks and the encoded size.
fn pending(doc: &Doc) -> (Option<Vec<(u64, u32)>>, usize) {
    let txn = doc.transact();
    let store = txn.store();
    let mut missing: Vec<(u64, u32)> = Vec::new();
    let mut bytes = 0;
    if let Some(p) = store.pending_update() {
        missing.extend(p.missing.iter().map(|(c, &k)| (c.get(), k)));
        bytes += p.update.encode_v1().len();
    }
    if let Some(ds) = store.pending_ds() {
        let mut enc = EncoderV1::new();
        ds.encode(&mut enc);
        bytes += enc.to_vec().len();
        if missing.is_empty() {
            // Deletions of items that have not arrived yet.
            missing.push((0, 0));
        }
    }
    if missing.is_empty() && bytes == 0 {
        (None, 0)
    } else {
        missing.sort_unstable();
        (Some(missing), bytes)
    }
}

/// What `doc` has integrated that a peer with state vector `sv` lacks (its whole delete set
/// included, as deletions have no clock).
///
/// Updates still waiting for predecessors are not included: yrs can only ship them merged into
/// the diff, and such merged updates were seen to never integrate on the receiver (the seeded
/// convergence test found it). The server never holds waiting updates — it refuses an update
/// with missing dependencies instead of storing it — so for the server this is everything.
pub fn missing_for(doc: &Doc, sv: &StateVector) -> Vec<u8> {
    doc.transact().encode_diff_v1(sv)
}

/// Merges updates into one and drops what a peer with `sv` already has. Deletions in the
/// updates are kept whole: they have no clock, so `sv` cannot tell whether the peer has them.
pub fn merge_for(updates: &[&[u8]], sv: &StateVector) -> Result<Vec<u8>> {
    let merged = merge(updates)?;
    let sv = sv.encode_v1();
    catch_unwind(AssertUnwindSafe(|| yrs::diff_updates_v1(&merged, &sv)))
        .map_err(|_| Error::InvalidUpdate("diffing updates panicked".into()))?
        .map_err(|e| Error::InvalidUpdate(e.to_string()))
}

/// Merges updates into one.
pub fn merge(updates: &[&[u8]]) -> Result<Vec<u8>> {
    let decoded = updates.iter().map(|u| decode_update(u)).collect::<Result<Vec<_>>>()?;
    catch_unwind(AssertUnwindSafe(|| Update::merge_updates(decoded).encode_v1()))
        .map_err(|_| Error::InvalidUpdate("merging updates panicked".into()))
}

/// What [`check_push`] found out about a pushed update, before anything was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedPush {
    /// The client ids under which the update carries structs — items, or garbage-collected
    /// ranges — that the document does not hold yet: the writers it speaks for. The server lets
    /// only each client id's owner push new structs under it (ARCHITECTURE.md, "Authorship");
    /// structs the document already holds (a re-sent batch, an echo) speak for nobody.
    pub writers: Vec<u64>,
    /// Whether the document holds everything the update builds on — its structs' predecessors,
    /// the items they reference, the items it deletes — so that yrs integrates all of it. An
    /// update that fails this is refused before it is applied: no reload, no partial state.
    pub complete: bool,
    /// What integrating it costs yrs in squashing (see [`MAX_SQUASH_WORK`]).
    pub squash_work: u64,
}

/// Checks `bytes` with [`crate::validate`] — without yrs — against `doc`, which is not touched:
/// what the update would add and under whose client ids, and whether it can be integrated
/// completely. One pass over the bytes; its result holds nothing of yrs, so it can be kept
/// across an await.
pub fn check_push(doc: &Doc, bytes: &[u8]) -> Result<CheckedPush> {
    let summary = check_update(bytes).map_err(|e| Error::InvalidUpdate(e.to_string()))?;
    let have = doc.transact().state_vector();
    let has = |client: u64| have.get(&ClientID::new(client));
    let mut writers: Vec<u64> = summary
        .carried
        .iter()
        .filter(|&&(client, _, end)| end > has(client))
        .map(|&(client, _, _)| client)
        .collect();
    writers.dedup();
    // Deletions of items the document lacks would wait in yrs's pending delete set: for the
    // server, which never holds anything pending, they are missing dependencies too. A range may
    // span items the document has and items the push carries (text written offline, then one
    // deletion across old and new): only its part beyond the document must be carried.
    let deletes_known = summary.deletes.iter().all(|&(client, clock, len)| {
        let end = clock.saturating_add(len);
        let known = has(client);
        end <= known || summary.carries_range(client, clock.max(known), end)
    });
    let complete = deletes_known && dependencies_satisfied(&summary, has);
    Ok(CheckedPush {
        writers,
        complete,
        squash_work: summary.squash_work,
    })
}

/// Decodes and applies an update [`check_push`] found complete. `Ok(Applied::Pending)` or an
/// `Err` means yrs integrated only part of it after all (the check cannot see everything, e.g.
/// reference cycles): `doc` may then hold part of it.
pub fn apply_checked(doc: &Doc, bytes: &[u8]) -> Result<Applied> {
    let changed = apply(doc, decode_update(bytes)?)?;
    Ok(match pending(doc) {
        (Some(missing), bytes) => Applied::Pending { missing, bytes },
        (None, _) if changed => Applied::Integrated,
        (None, _) => Applied::Unchanged,
    })
}

/// The client ids under which `bytes` carries structs that `doc` does not hold yet (see
/// [`CheckedPush::writers`]).
pub fn new_writers(doc: &Doc, bytes: &[u8]) -> Result<Vec<u64>> {
    Ok(check_push(doc, bytes)?.writers)
}

/// Above this many bytes, a log-tail answer is compared with the state diff.
const TAIL_CHECK_BYTES: usize = 16 * 1024;

/// The server's answer for one document of a resume (see [`answer_resume`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeAnswer {
    /// The server's cursor after the answer.
    pub cursor: Cursor,
    /// What the client lacks, if anything.
    pub update: Option<Vec<u8>>,
    /// The server's state vector, when the client has changes the server lacks.
    pub state_vector: Option<Vec<u8>>,
    /// Whether the answer came from the log tail (cheap) or a state-vector diff.
    pub from_log: bool,
}

/// Plans the server's answer to one document of a resume.
///
/// `doc` is the live document at cursor `head`. `tail` is what the store holds after the
/// client's cursor: `Some(entries)` (entries after `client_cursor`, in order) or `None` when the
/// log no longer reaches back that far. The shell need not read the store when the client is
/// already at `head`.
pub fn answer_resume(
    doc: &Doc,
    head: Cursor,
    client_cursor: Cursor,
    client_sv: &[u8],
    tail: Option<&[LogEntry]>,
) -> Result<ResumeAnswer> {
    answer(doc, head, Some(client_cursor), client_sv, tail)
}

/// Answers one document of a resume with the state-vector diff of `doc`, whatever the client's
/// cursor: for a live document that holds more than the store's log up to `head` says (updates
/// whose commit failed and that the server has not stored yet), where an answer from the log,
/// or "nothing" at the head, would leave the client without them for good.
pub fn answer_resume_from_state(doc: &Doc, head: Cursor, client_sv: &[u8]) -> Result<ResumeAnswer> {
    answer(doc, head, None, client_sv, None)
}

/// [`answer_resume`], or with `client_cursor` `None` the state diff in any case.
fn answer(
    doc: &Doc,
    head: Cursor,
    client_cursor: Option<Cursor>,
    client_sv: &[u8],
    tail: Option<&[LogEntry]>,
) -> Result<ResumeAnswer> {
    let client_sv = decode_state_vector(client_sv)?;
    let server_sv = doc.transact().state_vector();
    let server_lacks = client_sv.iter().any(|(client, &clock)| clock > server_sv.get(client));
    let state_vector = server_lacks.then(|| server_sv.encode_v1());

    let (update, from_log) = if client_cursor == Some(head) {
        (None, true)
    } else if let (Some(client_cursor), true, Some(entries)) =
        (client_cursor, client_cursor.is_some_and(|c| c > 0 && c < head), tail)
    {
        let parts: Vec<&[u8]> = entries
            .iter()
            .filter(|e| e.cursor > client_cursor)
            .map(|e| e.update.as_slice())
            .collect();
        let tail = merge_for(&parts, &client_sv)?;
        // A long tail can be bigger than the state diff: it keeps the content of items inserted
        // and deleted again within it, which the document has garbage-collected. Past a size
        // where computing the diff is worth it, send the smaller of the two (both are correct).
        if tail.len() > TAIL_CHECK_BYTES {
            let diff = missing_for(doc, &client_sv);
            if diff.len() < tail.len() {
                return Ok(ResumeAnswer {
                    cursor: head,
                    update: Some(diff),
                    state_vector,
                    from_log: false,
                });
            }
        }
        (Some(tail), true)
    } else {
        // A new client, a log that was compacted past the client's cursor, or a cursor from
        // another history (the server lost data or the client talks to another deployment):
        // the state-vector diff is always correct.
        (Some(missing_for(doc, &client_sv)), false)
    };
    let update = update.filter(|u| !is_empty_update(u));
    Ok(ResumeAnswer {
        cursor: head,
        update,
        state_vector,
        from_log,
    })
}

/// Consecutive outbox batches of a document go up merged into pushes of at most this many bytes
/// of batches (a larger single batch goes alone); see [`merge_outbox`].
pub const MERGED_PUSH_BYTES: usize = 256 * 1024;

/// The most squashing work a push may cost yrs (`validate::UpdateSummary::squash_work`, in
/// clocks copied); the server refuses more ([`check_push`]). yrs spends memory and time
/// quadratic in the length of an update's runs of consecutive items while integrating it — it
/// copies the growing content of each run it squashes: 10,000 one-character items typed in a
/// row cost 71 MB, 40,000 cost 914 MB and a second, 200,000 tens of GB (see
/// `fixtures/crashers/README.md`) — and our own outbox merge produced such updates from a day of
/// offline typing. This bound is a run of about 4,000 one-character items (a few MB); editors'
/// updates carry runs already squashed (yrs and Yjs squash a typed run into one item when its
/// transaction ends), and [`merge_outbox`] keeps its merges under it.
pub const MAX_SQUASH_WORK: u64 = 8 * 1024 * 1024;

/// What a client pushes after a resume answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlannedPush {
    /// Outbox entries merged into one (see [`merge_outbox`]), pushed with the last one's batch id.
    Outbox(OutboxEntry),
    /// The server lacks changes the outbox does not hold (it lost data, or this client received
    /// them from elsewhere): this update restores them. The shell records it in the outbox to get
    /// a batch id, then pushes it.
    Recovery(Vec<u8>),
}

/// Plans what a client sends after the server's answer for one document: its outbox, oldest
/// first, merged into pushes of at most `max_bytes` bytes of batches (see [`merge_outbox`]), and
/// a recovery update when the server's state vector shows a gap in this client's own changes that
/// the outbox does not fill. Changes of other clients are never pushed: only a client id's owner
/// may write under it.
pub fn plan_pushes(
    doc: &Doc,
    outbox: Vec<OutboxEntry>,
    server_sv: Option<&[u8]>,
    max_bytes: usize,
) -> Result<Vec<PlannedPush>> {
    let Some(server_sv) = server_sv else {
        return Ok(merge_outbox(outbox, max_bytes)?
            .into_iter()
            .map(PlannedPush::Outbox)
            .collect());
    };
    let server_sv = decode_state_vector(server_sv)?;
    let (local_sv, me) = {
        let txn = doc.transact();
        (txn.state_vector(), doc.client_id())
    };
    // The lowest clock of this client's own changes in the outbox: the server must hold
    // everything below it, or the outbox cannot be integrated there.
    let mut outbox_floor: Option<u32> = None;
    for entry in &outbox {
        let update = decode_update(&entry.update)?;
        if let Some(&low) = update
            .state_vector_lower()
            .iter()
            .find(|(c, _)| **c == me)
            .map(|(_, k)| k)
        {
            outbox_floor = Some(outbox_floor.map_or(low, |f| f.min(low)));
        }
    }
    // Only this client's own changes are this client's to restore: the server takes new structs
    // under a client id from its owner alone (ARCHITECTURE.md, "Authorship"), so a recovery that
    // carried another replica's changes would be refused whole. Theirs are restored by them.
    let own = local_sv.get(&me);
    let gap = server_sv.get(&me) < outbox_floor.unwrap_or(own).min(own);
    let mut plan: Vec<PlannedPush> = merge_outbox_for(outbox, max_bytes, Some((&server_sv, ClientID::get(&me))))?
        .into_iter()
        .map(PlannedPush::Outbox)
        .collect();
    if gap {
        // The diff against the server's state vector, with every other client's clock raised to
        // ours so that none of their structs is included.
        let mut only_mine = server_sv.clone();
        for (client, &clock) in local_sv.iter() {
            if *client != me {
                only_mine.set_max(*client, clock);
            }
        }
        let diff = missing_for(doc, &only_mine);
        plan.push(PlannedPush::Recovery(deletions_known_to(&diff, &server_sv, me.get())?));
    }
    Ok(plan)
}

/// `update` with its delete set cut down to deletions of items the server holds (below its
/// state vector `server_sv`) or `me`'s own (carried by a recovery): the server refuses, as a
/// missing dependency, an update deleting items it lacks — and those are other clients' to
/// restore (their deletions come with them, from whoever holds them).
fn deletions_known_to(update: &[u8], server_sv: &StateVector, me: u64) -> Result<Vec<u8>> {
    let summary = check_update(update).map_err(|e| Error::InvalidUpdate(e.to_string()))?;
    let mut kept = IdSet::new();
    for &(client, clock, len) in &summary.deletes {
        let end = if client == me {
            clock.saturating_add(len)
        } else {
            clock.saturating_add(len).min(server_sv.get(&ClientID::new(client)))
        };
        if clock < end {
            kept.insert(ID::new(ClientID::new(client), clock), end - clock);
        }
    }
    let mut bytes = update
        .get(..summary.delete_set_at)
        .ok_or_else(|| Error::InvalidUpdate("delete set offset out of range".into()))?
        .to_vec();
    bytes.extend_from_slice(&kept.encode_v1());
    Ok(bytes)
}

/// Merges consecutive outbox entries (oldest first, one document) into entries of at most
/// `max_bytes` bytes of batches each; a larger entry stays alone. A merged entry carries the
/// batch id of the last entry in it: the server acknowledges a batch and every older one, and
/// takes a batch id it has stored already as a re-send, so a merged push is acknowledged,
/// deduplicated and removed from the outbox like a single one.
///
/// A device that was offline for a day may hold thousands of batches, one per keystroke; sent
/// one by one they cost one durable commit each on the server, and the frame rate limit; merged
/// they are a few pushes, about half their size (yrs keeps an item per keystroke). The price: a
/// push the server refuses for good (a chat rule broken, say) is refused with every batch merged
/// into it; all of them stay in the outbox, as the refused batch alone did before.
pub fn merge_outbox(outbox: Vec<OutboxEntry>, max_bytes: usize) -> Result<Vec<OutboxEntry>> {
    merge_outbox_for(outbox, max_bytes, None)
}

/// [`merge_outbox`], knowing what the server holds (its state vector, and `me`, this replica's
/// client id): an entry that builds on another client's changes the server lacks — references
/// or deletes their items — starts a new push. Those changes came by an early broadcast whose
/// commit was lost, and their owner re-sends them; but they may build on this replica's older
/// entries in turn (A's batch 1, then B's batch on it, then A's batch 2 on B's): merged with
/// those, this push would need B's, B's would need this one, and neither would ever be stored.
/// Split there, every push builds only on pushes begun earlier, and some order stores them all
/// (found by the simulation: two outboxes that never drained).
fn merge_outbox_for(
    outbox: Vec<OutboxEntry>,
    max_bytes: usize,
    server: Option<(&StateVector, u64)>,
) -> Result<Vec<OutboxEntry>> {
    let mut merged: Vec<OutboxEntry> = Vec::new();
    let mut group: Vec<OutboxEntry> = Vec::new();
    let mut group_bytes = 0;
    let mut flush = |group: &mut Vec<OutboxEntry>| -> Result<()> {
        match group.len() {
            0 => {}
            1 => merged.append(group),
            _ => {
                let updates: Vec<&[u8]> = group.iter().map(|e| e.update.as_slice()).collect();
                let update = merge(&updates)?;
                if let Some(last) = group.pop() {
                    merged.push(OutboxEntry { update, ..last });
                }
                group.clear();
            }
        }
        Ok(())
    };
    let mut group_clocks: u64 = 0;
    for entry in outbox {
        // yrs's merge keeps every keystroke's item, one after another, and the server bounds
        // what squashing them costs (`MAX_SQUASH_WORK`, quadratic in a run's length): a group
        // also ends before its items could cost more, counted as if they all formed one run.
        let summary = check_update(&entry.update).ok();
        let clocks = summary.as_ref().map_or(0, |summary| {
            summary
                .carried
                .iter()
                .map(|&(_, start, end)| u64::from(end - start))
                .sum::<u64>()
        });
        let lacked = |client: u64, clock: u32| {
            server.is_some_and(|(sv, me)| client != me && clock >= sv.get(&ClientID::new(client)))
        };
        let builds_on_lacked = summary.as_ref().is_some_and(|summary| {
            summary.references.iter().any(|&(client, clock)| lacked(client, clock))
                || summary
                    .deletes
                    .iter()
                    .any(|&(client, clock, len)| lacked(client, clock.saturating_add(len).saturating_sub(1)))
        });
        let run = group_clocks + clocks;
        if !group.is_empty()
            && (builds_on_lacked
                || group_bytes + entry.update.len() > max_bytes
                || run.saturating_mul(run + 1) / 2 > MAX_SQUASH_WORK)
        {
            flush(&mut group)?;
            group_bytes = 0;
            group_clocks = 0;
        }
        group_bytes += entry.update.len();
        group_clocks += clocks;
        group.push(entry);
    }
    flush(&mut group)?;
    Ok(merged)
}

/// The client id of a document as a plain number.
pub fn client_id(doc: &Doc) -> u64 {
    ClientID::get(&doc.client_id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::{encode_state, new_doc, state_vector, text, text_delete, text_insert};

    fn log(updates: &[Vec<u8>]) -> Vec<LogEntry> {
        updates
            .iter()
            .enumerate()
            .map(|(i, u)| LogEntry {
                cursor: i as u64 + 1,
                update: u.clone(),
            })
            .collect()
    }

    #[test]
    fn out_of_order_updates_are_held_and_reported() {
        let a = new_doc(1).unwrap();
        let u1 = text_insert(&a, 0, "ab").unwrap();
        let u2 = text_insert(&a, 2, "cd").unwrap();
        let b = new_doc(2).unwrap();
        let limits = Limits::default();
        match apply_remote(&b, &u2, &limits).unwrap() {
            Applied::Pending { missing, bytes } => {
                assert_eq!(missing.iter().map(|m| m.0).collect::<Vec<_>>(), vec![1]);
                assert!(bytes > 0);
            }
            other => panic!("expected pending, got {other:?}"),
        }
        assert_eq!(apply_remote(&b, &u1, &limits).unwrap(), Applied::Integrated);
        assert_eq!(apply_remote(&b, &u1, &limits).unwrap(), Applied::Unchanged);
        assert_eq!(apply_remote(&b, &u2, &limits).unwrap(), Applied::Unchanged);
        assert_eq!(text(&b), "abcd");
    }

    #[test]
    fn a_deletion_changes_the_document_once() {
        let a = new_doc(1).unwrap();
        let insert = text_insert(&a, 0, "abc").unwrap();
        let delete = crate::doc::text_delete(&a, 1, 1).unwrap();
        let b = new_doc(2).unwrap();
        let limits = Limits::default();
        assert_eq!(apply_remote(&b, &insert, &limits).unwrap(), Applied::Integrated);
        // A deletion moves no clock, yet it changes the document the first time only.
        assert_eq!(apply_remote(&b, &delete, &limits).unwrap(), Applied::Integrated);
        assert_eq!(apply_remote(&b, &delete, &limits).unwrap(), Applied::Unchanged);
        assert_eq!(text(&b), "ac");
    }

    #[test]
    fn pending_is_bounded() {
        let a = new_doc(1).unwrap();
        let _first = text_insert(&a, 0, "x").unwrap();
        let later: Vec<Vec<u8>> = (0..50).map(|i| text_insert(&a, 1 + i, "y").unwrap()).collect();
        let b = new_doc(2).unwrap();
        let limits = Limits { max_pending_bytes: 200 };
        let mut refused = false;
        for u in &later {
            match apply_remote(&b, u, &limits) {
                Err(Error::TooManyPending { .. }) => refused = true,
                Err(e) => panic!("{e}"),
                Ok(_) => {}
            }
        }
        assert!(refused, "the pending bound was never hit");
        assert!(pending(&b).1 <= 200 + later[0].len());
    }

    #[test]
    fn resume_sends_only_the_tail() {
        let server = new_doc(1).unwrap();
        let client = new_doc(2).unwrap();
        let mut updates = Vec::new();
        for i in 0..200u32 {
            updates.push(text_insert(&server, i, "x").unwrap());
        }
        // Many deletions: a state-vector diff would carry all of them again.
        for _ in 0..100 {
            updates.push(text_delete(&server, 0, 1).unwrap());
        }
        for u in &updates {
            apply_remote(&client, u, &Limits::default()).unwrap();
        }
        let entries = log(&updates);
        let head = entries.len() as u64;

        // Nothing missed: nothing sent.
        let nothing = answer_resume(&server, head, head, &state_vector(&client), Some(&[])).unwrap();
        assert_eq!((nothing.update, nothing.state_vector), (None, None));

        // Missed three operations: about their size, not the delete set.
        let more = [
            text_insert(&server, 0, "a").unwrap(),
            text_delete(&server, 5, 1).unwrap(),
            text_insert(&server, 2, "b").unwrap(),
        ];
        let tail: Vec<LogEntry> = more
            .iter()
            .enumerate()
            .map(|(i, u)| LogEntry {
                cursor: head + 1 + i as u64,
                update: u.clone(),
            })
            .collect();
        let answer = answer_resume(&server, head + 3, head, &state_vector(&client), Some(&tail)).unwrap();
        assert!(answer.from_log);
        let bytes = answer.update.unwrap();
        let missed: usize = more.iter().map(Vec::len).sum();
        let full = missing_for(&server, &decode_state_vector(&state_vector(&client)).unwrap());
        assert!(bytes.len() <= missed + 16, "tail {} vs missed {missed}", bytes.len());
        assert!(
            bytes.len() < full.len(),
            "tail {} vs full diff {}",
            bytes.len(),
            full.len()
        );
        apply_remote(&client, &bytes, &Limits::default()).unwrap();
        assert_eq!(text(&client), text(&server));

        // Pruned log: falls back to the diff, still correct.
        let c2 = new_doc(3).unwrap();
        let answer = answer_resume(&server, head + 3, 5, &state_vector(&c2), None).unwrap();
        assert!(!answer.from_log);
        apply_remote(&c2, &answer.update.unwrap(), &Limits::default()).unwrap();
        assert_eq!(text(&c2), text(&server));
    }

    #[test]
    fn a_long_tail_of_churn_falls_back_to_the_smaller_diff() {
        let server = new_doc(1).unwrap();
        let client = new_doc(2).unwrap();
        let base = text_insert(&server, 0, "base").unwrap();
        apply_remote(&client, &base, &Limits::default()).unwrap();
        // 40 KiB typed and deleted again: the tail carries it all, the diff only the deletions.
        let mut tail = Vec::new();
        for i in 0..40u64 {
            let u = text_insert(&server, 4, &"y".repeat(1024)).unwrap();
            tail.push(LogEntry {
                cursor: 2 + 2 * i,
                update: u,
            });
            let d = text_delete(&server, 4, 1024).unwrap();
            tail.push(LogEntry {
                cursor: 3 + 2 * i,
                update: d,
            });
        }
        let head = 81;
        let answer = answer_resume(&server, head, 1, &state_vector(&client), Some(&tail)).unwrap();
        assert!(!answer.from_log);
        let bytes = answer.update.unwrap();
        assert!(bytes.len() < 16 * 1024, "answer of {} bytes", bytes.len());
        apply_remote(&client, &bytes, &Limits::default()).unwrap();
        assert_eq!(text(&client), "base");
    }

    #[test]
    fn server_state_vector_only_when_it_lacks_something() {
        let server = new_doc(1).unwrap();
        let client = new_doc(2).unwrap();
        let u = text_insert(&client, 0, "offline").unwrap();
        let answer = answer_resume(&server, 0, 0, &state_vector(&client), Some(&[])).unwrap();
        let sv = answer.state_vector.expect("server lacks the offline edit");
        let outbox = vec![OutboxEntry {
            doc: "d".into(),
            batch: 1,
            update: u.clone(),
        }];
        let plan = plan_pushes(&client, outbox.clone(), Some(&sv), MERGED_PUSH_BYTES).unwrap();
        assert_eq!(plan, vec![PlannedPush::Outbox(outbox[0].clone())]);
        // The outbox was lost (or acknowledged by a server that later lost the data): recover.
        let plan = plan_pushes(&client, Vec::new(), Some(&sv), MERGED_PUSH_BYTES).unwrap();
        let [PlannedPush::Recovery(update)] = plan.as_slice() else {
            panic!("{plan:?}")
        };
        apply_remote(&server, update, &Limits::default()).unwrap();
        assert_eq!(text(&server), "offline");
    }

    #[test]
    fn a_recovery_restores_only_the_clients_own_changes() {
        let server = new_doc(1).unwrap();
        let ada = new_doc(2).unwrap();
        let bob = new_doc(3).unwrap();
        let mine = text_insert(&ada, 0, "ada ").unwrap();
        let theirs = text_insert(&bob, 0, "bob ").unwrap();
        apply_remote(&ada, &theirs, &Limits::default()).unwrap();
        // Ada deleted a character of Bob's: the server, lacking Bob's text, could not take
        // that deletion (a missing dependency), so her recovery leaves it to whoever has it.
        let at = text(&ada).find("bob").unwrap() as u32;
        let theirs_deleted = text_delete(&ada, at, 1).unwrap();
        // The server lost both (say, restored from an old backup).
        let plan = plan_pushes(&ada, Vec::new(), Some(&state_vector(&server)), MERGED_PUSH_BYTES).unwrap();
        let [PlannedPush::Recovery(update)] = plan.as_slice() else {
            panic!("{plan:?}")
        };
        let checked = check_push(&server, update).unwrap();
        assert_eq!(checked.writers, vec![2], "Bob's structs are Bob's to push");
        assert!(checked.complete, "nothing in it the server lacks");
        apply_checked(&server, update).unwrap();
        assert_eq!(text(&server), "ada ");
        // Only Bob's are missing now: nothing for Ada to restore.
        let plan = plan_pushes(&ada, Vec::new(), Some(&state_vector(&server)), MERGED_PUSH_BYTES).unwrap();
        assert!(plan.is_empty(), "{plan:?}");
        apply_remote(&server, &theirs, &Limits::default()).unwrap();
        apply_remote(&server, &theirs_deleted, &Limits::default()).unwrap();
        assert_eq!(text(&server), text(&ada));
        let _ = mine;
    }

    #[test]
    fn a_day_of_offline_typing_goes_up_in_pushes_yrs_integrates_cheaply() {
        let server = new_doc(1).unwrap();
        let client = new_doc(2).unwrap();
        // 10,000 keystrokes, each its own batch: merged whole, one run of 10,000 items that
        // would cost yrs about 70 MB to squash.
        let outbox: Vec<OutboxEntry> = (0..10_000u32)
            .map(|i| OutboxEntry {
                doc: "d".into(),
                batch: u64::from(i) + 1,
                update: text_insert(&client, i, "x").unwrap(),
            })
            .collect();
        let all: Vec<&[u8]> = outbox.iter().map(|e| e.update.as_slice()).collect();
        let whole = merge(&all).unwrap();
        assert!(check_push(&server, &whole).unwrap().squash_work > MAX_SQUASH_WORK);
        let pushes = merge_outbox(outbox, MERGED_PUSH_BYTES).unwrap();
        assert!(pushes.len() > 1 && pushes.len() < 10, "{} pushes", pushes.len());
        for push in &pushes {
            let checked = check_push(&server, &push.update).unwrap();
            assert!(checked.squash_work <= MAX_SQUASH_WORK && checked.complete);
            apply_checked(&server, &push.update).unwrap();
        }
        assert_eq!(text(&server), text(&client));
        // A document's own state carries its runs squashed: no work at all.
        assert_eq!(
            check_push(&new_doc(3).unwrap(), &encode_state(&server))
                .unwrap()
                .squash_work,
            0
        );
    }

    #[test]
    fn a_push_is_found_incomplete_before_it_is_applied() {
        let server = new_doc(1).unwrap();
        let ada = new_doc(2).unwrap();
        let a = text_insert(&ada, 0, "hello").unwrap();
        let b = text_insert(&ada, 5, " world").unwrap();
        let bob = new_doc(3).unwrap();
        apply_remote(&bob, &a, &Limits::default()).unwrap();
        let c = text_insert(&bob, 2, "!").unwrap();
        let d = text_delete(&bob, 0, 1).unwrap();
        // A gap in Ada's clocks, an item referencing one the server lacks, a deletion of one:
        // all refused untouched.
        for (what, update) in [("gap", &b), ("reference", &c), ("deletion", &d)] {
            let checked = check_push(&server, update).unwrap();
            assert!(!checked.complete, "{what}");
        }
        assert_eq!(
            encode_state(&server),
            encode_state(&new_doc(1).unwrap()),
            "nothing applied"
        );
        assert!(check_push(&server, &a).unwrap().complete);
        assert_eq!(apply_checked(&server, &a).unwrap(), Applied::Integrated);
        for update in [&b, &c, &d] {
            assert!(check_push(&server, update).unwrap().complete);
            apply_checked(&server, update).unwrap();
        }
        assert_eq!(text(&server), "e!llo world");
        assert_eq!(apply_checked(&server, &c).unwrap(), Applied::Unchanged);
    }

    #[test]
    fn new_writers_are_the_clients_with_structs_the_document_lacks() {
        let server = new_doc(1).unwrap();
        let ada = new_doc(2).unwrap();
        let a = text_insert(&ada, 0, "hello").unwrap();
        assert_eq!(new_writers(&server, &a).unwrap(), vec![2]);
        apply_remote(&server, &a, &Limits::default()).unwrap();
        // A re-sent update speaks for nobody; a deletion of Ada's text by Bob speaks for nobody
        // either (deletions carry no author).
        assert!(new_writers(&server, &a).unwrap().is_empty());
        let bob = new_doc(3).unwrap();
        apply_remote(&bob, &a, &Limits::default()).unwrap();
        let delete = text_delete(&bob, 0, 2).unwrap();
        assert!(new_writers(&server, &delete).unwrap().is_empty());
        let both = merge(&[&text_insert(&bob, 0, "x").unwrap(), &text_insert(&ada, 5, "!").unwrap()]).unwrap();
        assert_eq!(new_writers(&server, &both).unwrap(), vec![2, 3]);
        assert!(new_writers(&server, &[0xff, 0xff]).is_err());
    }

    #[test]
    fn an_outbox_goes_up_merged_within_the_byte_budget() {
        let server = new_doc(1).unwrap();
        let client = new_doc(2).unwrap();
        let mut outbox = Vec::new();
        for (i, word) in ["one ", "two ", "three ", "four ", "five "].iter().enumerate() {
            let end = text(&client).len() as u32;
            outbox.push(OutboxEntry {
                doc: "d".into(),
                batch: 10 + i as u64,
                update: text_insert(&client, end, word).unwrap(),
            });
        }
        let big = OutboxEntry {
            doc: "d".into(),
            batch: 20,
            update: text_insert(&client, 0, &"x".repeat(300)).unwrap(),
        };
        outbox.push(big.clone());
        let sizes: Vec<usize> = outbox.iter().map(|e| e.update.len()).collect();
        // A budget that holds the first three small batches but not a fourth.
        let budget = sizes[..3].iter().sum::<usize>();
        let merged = merge_outbox(outbox.clone(), budget).unwrap();
        let batches: Vec<u64> = merged.iter().map(|e| e.batch).collect();
        assert_eq!(batches, vec![12, 14, 20], "each push carries its last batch id");
        assert_eq!(merged[2], big, "a batch over the budget goes alone, untouched");
        assert!(merged[0].update.len() < sizes[..3].iter().sum::<usize>());
        for entry in &merged {
            apply_remote(&server, &entry.update, &Limits::default()).unwrap();
        }
        assert_eq!(text(&server), text(&client));
        // Everything in one push when the budget allows; nothing to push, nothing planned.
        assert_eq!(merge_outbox(outbox, usize::MAX).unwrap().len(), 1);
        assert!(merge_outbox(Vec::new(), budget).unwrap().is_empty());
    }

    #[test]
    fn garbage_state_vector_is_an_error() {
        let server = new_doc(1).unwrap();
        assert!(answer_resume(&server, 0, 0, &[0xff, 0xff], None).is_err());
    }
}
