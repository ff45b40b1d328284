//! Replays a real editing history through the engine and the SQLite store and checks that the
//! text survives every step unchanged.
//!
//! The history is the automerge-paper trace (crdt-benchmarks "B4": 259,778 single-character
//! edits of a LaTeX paper). Each edit is one yrs transaction producing one update, as in an
//! editor; the updates go to a `SqliteStore` 1,000 per `append` call (one transaction each, like
//! a server's group commit). The test then checks the text of the live document, of the document
//! loaded back from the log, and of the document loaded after compaction — three independent
//! paths that must all give the trace's `endContent`.
//!
//! The trace lives outside the repository (see `driftsync_engine::trace::default_trace_path`,
//! overridable with `DRIFTSYNC_TRACE`); without it the real-trace test prints a `skipped:` line
//! and passes, while a short synthetic trace still exercises the same path.

use std::time::Instant;

use driftsync_engine::doc::{load_document, new_doc, text, TEXT_ROOT};
use driftsync_engine::store::{Append, Appended, CompactionPolicy, SqliteStore, Store};
use driftsync_engine::trace::{self, apply_patch, Trace};

/// Updates per `Store::append` call: one store transaction per 1,000 updates.
const GROUP: usize = 1_000;
/// The document the trace is stored as.
const DOC: &str = "trace/b4";
/// The writer's client id, and that of the replicas that load the document back.
const WRITER: u64 = 2_654_435_769;
const READER: u64 = 7;

/// Replays `trace` into a live document and a fresh SQLite store, then checks the text after
/// the replay, after loading from the store, and after compacting and loading again.
///
/// The editing runs on a blocking thread and hands each group of 1,000 updates to this task,
/// which appends it while the editing goes on — as a server commits one group while the next
/// one arrives — so the test takes about as long as the slower of the two, not their sum.
async fn replay_through_store(trace: Trace) {
    assert!(
        trace.is_ascii(),
        "code-point positions equal UTF-16 positions only for ASCII text"
    );
    let n = trace.patches.len() as u64;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("trace.db")).await.unwrap();

    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Append>>(4);
    let editor = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let doc = new_doc(WRITER).unwrap();
        let root = doc.get_or_insert_text(TEXT_ROOT);
        let mut batch: Vec<Append> = Vec::with_capacity(GROUP);
        for (i, patch) in trace.patches.iter().enumerate() {
            let update = apply_patch(&doc, &root, patch).unwrap_or_else(|e| panic!("patch {i} {patch:?}: {e}"));
            batch.push(Append {
                doc: DOC.to_string(),
                origin: None,
                update,
                chat: None,
            });
            if batch.len() == GROUP {
                tx.blocking_send(std::mem::replace(&mut batch, Vec::with_capacity(GROUP)))
                    .unwrap();
            }
        }
        if !batch.is_empty() {
            tx.blocking_send(batch).unwrap();
        }
        (text(&doc), started.elapsed(), trace)
    });
    let mut next_cursor = 1;
    while let Some(batch) = rx.recv().await {
        let appended = store.append(&batch).await.unwrap();
        assert_eq!(appended.len(), batch.len());
        for outcome in appended {
            assert_eq!(outcome, Appended::Stored(next_cursor), "cursors are gap-free");
            next_cursor += 1;
        }
    }
    let (live_text, edit_time, trace) = editor.await.unwrap();
    let replayed = started.elapsed();
    assert_eq!(next_cursor, n + 1, "every update was appended");
    assert_eq!(live_text, trace.end, "live document after the replay");

    let started = Instant::now();
    let stored = store.load(DOC).await.unwrap().expect("the document is stored");
    assert_eq!(stored.head, n);
    assert_eq!(
        stored.tail.len() as u64,
        n - stored.snapshot_cursor,
        "the log holds every update"
    );
    let loaded = load_document(DOC, &stored, READER).unwrap();
    let load_log = started.elapsed();
    assert_eq!(text(&loaded), trace.end, "document loaded from the log");

    let started = Instant::now();
    let compacted = store.compact(DOC, &CompactionPolicy::default()).await.unwrap();
    let compact_time = started.elapsed();
    assert!(
        compacted.is_some(),
        "a log of {n} updates is due for compaction under the default policy"
    );
    let started = Instant::now();
    let stored = store.load(DOC).await.unwrap().expect("the document is still stored");
    assert_eq!(stored.head, n);
    assert!(stored.snapshot.is_some(), "compaction wrote a snapshot");
    let reloaded = load_document(DOC, &stored, READER).unwrap();
    let load_compacted = started.elapsed();
    assert_eq!(text(&reloaded), trace.end, "document loaded after compaction");

    println!(
        "{} operations: edits {:.2} s, edits + appends (overlapped) {:.2} s, load from log {:.2} s, compact {:.2} s ({compacted:?}), \
         load after compaction {:.3} s (snapshot {} B, {} log entries)",
        n,
        edit_time.as_secs_f64(),
        replayed.as_secs_f64(),
        load_log.as_secs_f64(),
        compact_time.as_secs_f64(),
        load_compacted.as_secs_f64(),
        stored.snapshot.as_ref().map_or(0, Vec::len),
        stored.tail.len(),
    );
}

#[tokio::test]
async fn automerge_paper_trace_survives_engine_and_store() {
    let path = trace::default_trace_path();
    if !path.exists() {
        println!("skipped: trace not found at {}", path.display());
        return;
    }
    let started = Instant::now();
    let trace = trace::load(&path).unwrap();
    println!("loaded {} in {:.2} s", path.display(), started.elapsed().as_secs_f64());
    assert_eq!(
        trace.replay_plain(),
        trace.end,
        "the trace is consistent on a plain string"
    );
    replay_through_store(trace).await;
}

#[tokio::test]
async fn synthetic_trace_survives_engine_and_store() {
    replay_through_store(trace::synthetic(5_500, 11)).await;
}
