//! Engine benchmarks on the B4 editing trace (automerge-paper, 259,778 single-character edits).
//!
//! What they measure, and why:
//!
//! * `b4_replay_engine`: the whole trace through yrs, one transaction per operation, encoding the
//!   update of each transaction — what the crdt-benchmarks B4 measures for Yjs, so the figure
//!   compares with the published Yjs numbers.
//! * `b4_replay_engine_store`: the same, plus appending every update to an SQLite store, 1,000
//!   updates per `Store::append` call (one transaction each), as a server's group commit would.
//! * `b4_load`: loading the stored document (snapshot + log tail) from SQLite and building the
//!   yrs document, before compaction (the log only) and after it (the snapshot only).
//! * Resume bytes (not a timing, printed before the benchmarks run): what a native resume costs
//!   on the wire for a client that missed K operations, next to a y-protocols sync exchange and
//!   the size of the missed operations themselves.
//!
//! The trace is read from `driftsync_engine::trace::default_trace_path()` (override with
//! `DRIFTSYNC_TRACE`); without it, a synthetic trace of the same length stands in, and the output
//! says so. Run with `cargo bench -p driftsync-engine --features test-support --bench engine`
//! (append `-- --quick` for a shorter run). The figures are recorded in `BENCHMARKS.md`.

use std::cell::OnceCell;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use criterion::Criterion;
use driftsync_engine::doc::{apply_bytes, encode_state, load_document, new_doc, state_vector, text, TEXT_ROOT};
use driftsync_engine::store::{Append, CompactionPolicy, LogEntry, SqliteStore, Store, StoredDoc};
use driftsync_engine::sync::answer_resume;
use driftsync_engine::trace::{self, apply_patch, Trace};
use driftsync_protocol::yjs::YMessage;
use driftsync_protocol::{ClientFrame, DocId, DocResumed, ResumeDoc, ServerFrame};
use tokio::runtime::Runtime;
use yrs::updates::decoder::Decode;
use yrs::{Doc, ReadTxn, StateVector, Transact};

/// The writer's client id: a fixed 32-bit value, so that update sizes are reproducible and
/// comparable with Yjs, whose random client ids are 32 bits (a 5-byte varint, like this one).
const WRITER: u64 = 2_654_435_769;
/// The client id of the resuming replica and of the replicas loading from the store.
const READER: u64 = 1_234_567_891;
/// The document id in the store and on the wire.
const DOC: &str = "b4";
/// Updates per `Store::append` call, i.e. per store transaction (a server's group commit).
const GROUP: usize = 1_000;
/// Length and seed of the synthetic stand-in for a missing trace.
const SYNTHETIC_OPS: usize = 259_778;
const SYNTHETIC_SEED: u64 = 4;

/// The trace all benchmarks use, loaded once.
fn b4() -> &'static Trace {
    static TRACE: OnceLock<Trace> = OnceLock::new();
    TRACE.get_or_init(|| {
        let path = trace::default_trace_path();
        let trace = if path.exists() {
            let trace = trace::load(&path).unwrap();
            println!("trace: {} ({} operations)", path.display(), trace.patches.len());
            trace
        } else {
            println!(
                "trace not found at {}: using a synthetic trace of {SYNTHETIC_OPS} random single-character \
                 inserts/deletes (seed {SYNTHETIC_SEED}); figures are NOT comparable with B4",
                path.display()
            );
            trace::synthetic(SYNTHETIC_OPS, SYNTHETIC_SEED)
        };
        assert!(
            trace.is_ascii(),
            "the benchmarks need an ASCII trace (code points = UTF-16 units)"
        );
        trace
    })
}

/// Replays the trace into a fresh document, one transaction per operation; returns the document
/// and every update in order.
fn replay(trace: &Trace) -> (Doc, Vec<Vec<u8>>) {
    let doc = new_doc(WRITER).unwrap();
    let root = doc.get_or_insert_text(TEXT_ROOT);
    let updates = trace
        .patches
        .iter()
        .map(|p| apply_patch(&doc, &root, p).unwrap())
        .collect();
    (doc, updates)
}

/// Replays the trace and appends every update to `store`, `GROUP` updates per append.
fn replay_into_store(rt: &Runtime, store: &SqliteStore, trace: &Trace) -> Doc {
    let doc = new_doc(WRITER).unwrap();
    let root = doc.get_or_insert_text(TEXT_ROOT);
    let mut batch = Vec::with_capacity(GROUP);
    for patch in &trace.patches {
        batch.push(Append {
            doc: DOC.to_string(),
            origin: None,
            update: apply_patch(&doc, &root, patch).unwrap(),
            chat: None,
        });
        if batch.len() == GROUP {
            rt.block_on(store.append(&batch)).unwrap();
            batch.clear();
        }
    }
    if !batch.is_empty() {
        rt.block_on(store.append(&batch)).unwrap();
    }
    doc
}

/// A new runtime for driving the store from synchronous benchmark code.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Opens a fresh SQLite store in `dir`.
fn open_store(rt: &Runtime, dir: &Path) -> SqliteStore {
    rt.block_on(SqliteStore::open(dir.join("b4.db"))).unwrap()
}

/// Loads the stored document and rebuilds it; returns the document and what was read.
fn load(rt: &Runtime, store: &SqliteStore) -> (Doc, StoredDoc) {
    let stored = rt.block_on(store.load(DOC)).unwrap().unwrap();
    (load_document(DOC, &stored, READER).unwrap(), stored)
}

/// Prints sizes and one-off timings of the trace's document, comparable with the Yjs figures
/// of the trace's README. `replay_time` is the time of the replay that built `doc`.
fn print_facts(trace: &Trace, doc: &Doc, updates: &[Vec<u8>], replay_time: Duration) {
    let total: usize = updates.iter().map(Vec::len).sum();
    let started = Instant::now();
    let state = encode_state(doc);
    let encode_time = started.elapsed();
    let started = Instant::now();
    let parsed = new_doc(READER).unwrap();
    apply_bytes(&parsed, &state).unwrap();
    let parse_time = started.elapsed();
    assert_eq!(text(&parsed), trace.end);
    println!();
    println!("## Trace facts (one run, not a criterion measurement)");
    println!("| what | value |");
    println!("|---|---|");
    println!("| operations | {} |", updates.len());
    println!(
        "| replay, one transaction and one encoded update per operation | {:.0} ms |",
        replay_time.as_secs_f64() * 1e3
    );
    println!(
        "| updates, total v1 bytes | {total} B ({:.1} B average) |",
        total as f64 / updates.len() as f64
    );
    println!("| final document, v1 | {} B |", state.len());
    println!("| encode document | {:.1} ms |", encode_time.as_secs_f64() * 1e3);
    println!("| parse document | {:.1} ms |", parse_time.as_secs_f64() * 1e3);
    println!("| final text | {} characters |", trace.end.chars().count());
    println!();
}

/// The y-protocols exchange one side sends when a connection opens: its SyncStep1 (state
/// vector) and its SyncStep2 answering the peer's step 1, i.e. `encodeStateAsUpdate(doc,
/// peerStateVector)`, as y-websocket does. (Neither document here holds updates waiting for
/// predecessors, so this equals `sync::missing_for`.)
fn yjs_side(own: &Doc, peer_sv: &[u8]) -> usize {
    let peer_sv = StateVector::decode_v1(peer_sv).unwrap();
    let step1 = YMessage::SyncStep1(state_vector(own)).encode();
    let step2 = YMessage::SyncStep2(own.transact().encode_state_as_update_v1(&peer_sv)).encode();
    step1.len() + step2.len()
}

/// The replay everything else starts from: the server's document after all N operations, every
/// update in order, and the client replicas that hold only the first N − K operations.
struct Prepared {
    server: Doc,
    updates: Vec<Vec<u8>>,
    /// `(K, replica holding the first N − K operations)`, K descending.
    clients: Vec<(usize, Doc)>,
    replay_time: Duration,
}

/// The K values of the resume table that the trace is long enough for.
fn resume_ks(n: usize) -> Vec<usize> {
    [0, 10, 100, 1_000, 10_000].into_iter().filter(|&k| k <= n).collect()
}

/// Replays the trace once, taking a copy of the document at each checkpoint N − K (by a
/// full-state update, which gives the same state vector and delete set as the replay itself).
/// The copies are taken outside the timed part.
fn prepare(trace: &Trace) -> Prepared {
    let n = trace.patches.len();
    let ks = resume_ks(n);
    let server = new_doc(WRITER).unwrap();
    let root = server.get_or_insert_text(TEXT_ROOT);
    let mut updates = Vec::with_capacity(n);
    let mut clients: Vec<(usize, Doc)> = Vec::new();
    let copy = |doc: &Doc| {
        let client = new_doc(READER).unwrap();
        apply_bytes(&client, &encode_state(doc)).unwrap();
        client
    };
    let mut replay_time = Duration::ZERO;
    for (i, patch) in trace.patches.iter().enumerate() {
        if ks.contains(&(n - i)) {
            clients.push((n - i, copy(&server)));
        }
        let started = Instant::now();
        updates.push(apply_patch(&server, &root, patch).unwrap());
        replay_time += started.elapsed();
    }
    if ks.contains(&0) {
        clients.push((0, copy(&server)));
    }
    assert_eq!(text(&server), trace.end);
    Prepared {
        server,
        updates,
        clients,
        replay_time,
    }
}

/// Prints the resume-bytes table: for a client that missed the last K operations, the native
/// resume's bytes each way, a y-protocols exchange's bytes each way, and the missed operations'
/// own encoded size (the floor any protocol must carry).
fn print_resume_bytes(trace: &Trace, prepared: &Prepared) {
    let Prepared {
        server,
        updates,
        clients,
        ..
    } = prepared;
    let n = updates.len();
    // The whole log, one entry per operation, cursors 1..=N.
    let log: Vec<LogEntry> = updates
        .iter()
        .enumerate()
        .map(|(i, u)| LogEntry {
            cursor: i as u64 + 1,
            update: u.clone(),
        })
        .collect();
    let head = n as u64;
    let doc_id = DocId::new(DOC).unwrap();
    let server_sv = state_vector(server);

    println!("## Resume bytes (the trace's document, one document resumed; bytes on the wire, frames only)");
    println!(
        "| K missed | answer from | native c→s | native s→c | native total | y-protocols c→s | y-protocols s→c | y-protocols total | missed ops (floor) | native / floor | y-protocols / floor |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (k, client) in clients.iter().rev() {
        let k = *k;
        let cursor = head - k as u64;
        let client_sv = state_vector(client);
        let tail = &log[n - k..];
        let answer = answer_resume(server, head, cursor, &client_sv, Some(tail)).unwrap();
        let request = ClientFrame::Resume {
            docs: vec![ResumeDoc {
                doc: doc_id.clone(),
                cursor,
                state_vector: client_sv.clone(),
            }],
        }
        .encode();
        let response = ServerFrame::Resumed {
            docs: vec![DocResumed {
                doc: doc_id.clone(),
                cursor: answer.cursor,
                update: answer.update.clone(),
                state_vector: answer.state_vector.clone(),
            }],
        }
        .encode();
        // The answer must bring the client exactly to the server's text.
        if let Some(update) = &answer.update {
            let check = new_doc(READER).unwrap();
            apply_bytes(&check, &encode_state(client)).unwrap();
            apply_bytes(&check, update).unwrap();
            assert_eq!(text(&check), trace.end, "K = {k}: the resume answer is incomplete");
        }
        let yjs_up = yjs_side(client, &server_sv);
        let yjs_down = yjs_side(server, &client_sv);
        let floor: usize = tail.iter().map(|e| e.update.len()).sum();
        let native = request.len() + response.len();
        let ratio = |x: usize| {
            if floor == 0 {
                "—".to_string()
            } else {
                format!("{:.2}", x as f64 / floor as f64)
            }
        };
        println!(
            "| {k} | {} | {} | {} | {native} | {yjs_up} | {yjs_down} | {} | {floor} | {} | {} |",
            if answer.from_log { "log tail" } else { "state diff" },
            request.len(),
            response.len(),
            yjs_up + yjs_down,
            ratio(native),
            ratio(yjs_up + yjs_down),
        );
    }
    println!();
}

/// `b4_replay_engine`: the trace through yrs, one transaction and one encoded update per
/// operation.
fn bench_replay(c: &mut Criterion, trace: &Trace) {
    c.bench_function("b4_replay_engine", |b| b.iter_with_large_drop(|| replay(trace)));
}

/// A store holding the whole trace, one log entry per operation, and the directory it lives in.
type FilledStore = (tempfile::TempDir, SqliteStore);

/// `b4_replay_engine_store`: the replay plus appending every update to a fresh SQLite store,
/// `GROUP` updates per transaction, the appends interleaved with the editing. Opening the store
/// is not timed. Returns the store of the last iteration, which `b4_load` reuses.
fn bench_replay_store(c: &mut Criterion, rt: &Runtime, trace: &Trace) -> Option<FilledStore> {
    let mut last: Option<FilledStore> = None;
    c.bench_function("b4_replay_engine_store", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().unwrap();
                let store = open_store(rt, dir.path());
                let started = Instant::now();
                let doc = replay_into_store(rt, &store, trace);
                total += started.elapsed();
                drop(doc);
                last = Some((dir, store));
            }
            total
        });
    });
    last
}

/// `b4_load`: loading the stored document and building it, before compaction (the log only:
/// every operation an entry) and after a compaction with the default policy (which folds the
/// whole log into the snapshot: a load reads the snapshot only, while the newest entries stay
/// in the log for cheap resumes).
fn bench_load(c: &mut Criterion, rt: &Runtime, trace: &Trace, filled: Option<FilledStore>) {
    // Filled here only when `b4_replay_engine_store` did not run (a filter skipped it), and only
    // when a load benchmark runs.
    let fill = || {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(rt, dir.path());
        replay_into_store(rt, &store, trace);
        (dir, store)
    };
    let store: OnceCell<FilledStore> = OnceCell::new();
    if let Some(filled) = filled {
        let _ = store.set(filled);
    }
    let describe = |label: &str, store: &SqliteStore| {
        let started = Instant::now();
        let stored = rt.block_on(store.load(DOC)).unwrap().unwrap();
        let read = started.elapsed();
        let started = Instant::now();
        let doc = load_document(DOC, &stored, READER).unwrap();
        let build = started.elapsed();
        assert_eq!(text(&doc), trace.end);
        println!(
            "b4_load/{label}: snapshot {} B at cursor {}, {} log entries ({} B), head {}; \
             one run: store.load {:.1} ms + load_document {:.1} ms",
            stored.snapshot.as_ref().map_or(0, Vec::len),
            stored.snapshot_cursor,
            stored.tail.len(),
            stored.tail.iter().map(|e| e.update.len()).sum::<usize>(),
            stored.head,
            read.as_secs_f64() * 1e3,
            build.as_secs_f64() * 1e3,
        );
    };

    let mut group = c.benchmark_group("b4_load");
    let log_only = OnceCell::new();
    group.bench_function("log_only", |b| {
        let store = log_only.get_or_init(|| {
            let (_, store) = store.get_or_init(fill);
            describe("log_only", store);
            store
        });
        b.iter_with_large_drop(|| load(rt, store));
    });
    let compacted = OnceCell::new();
    group.bench_function("after_compaction", |b| {
        let store = compacted.get_or_init(|| {
            let (_, store) = store.get_or_init(fill);
            let done = rt.block_on(store.compact(DOC, &CompactionPolicy::default())).unwrap();
            println!("b4_load/after_compaction: {done:?}");
            describe("after_compaction", store);
            store
        });
        b.iter_with_large_drop(|| load(rt, store));
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let trace = b4();
    let prepared = prepare(trace);
    print_facts(trace, &prepared.server, &prepared.updates, prepared.replay_time);
    print_resume_bytes(trace, &prepared);
    drop(prepared);
    let rt = runtime();
    bench_replay(&mut c, trace);
    let filled = bench_replay_store(&mut c, &rt, trace);
    bench_load(&mut c, &rt, trace, filled);
    c.final_summary();
}
