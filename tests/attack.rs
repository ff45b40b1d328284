//! Regression tests for attacks on the server, over real loopback sockets: decode bombs, queues
//! that must stay bounded in bytes, refusals that must not cost everyone, the maximum document
//! size, rooms opened too fast, and the same update pushed over and over.
//!
//! Every test checks time and memory with generous bounds (a refusal within a couple of
//! seconds, the process's resident memory growing by less than [`MAX_RSS_GROWTH`]) and that an
//! honest client keeps working during or after the attack.
//!
//! Each test runs in a child process of its own (this binary re-executed for that one test), one
//! at a time: the memory bound is measured on the whole process, so tests must not share it,
//! and a defence that fails by aborting (a stack overflow, an allocation of gigabytes) must fail
//! only its own test. The child runs with glibc's malloc thresholds fixed, so that freed large
//! buffers go back to the system and resident memory tracks what is really held.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use driftsync_engine::doc::{self, new_doc};
use driftsync_engine::store::{SqliteStore, Store};
use driftsync_protocol::yjs::{AuthMessage, AwarenessEntry, YMessage};
use driftsync_protocol::{ClientFrame, Cursor, DocId, ErrorCode, ResumeDoc, ServerFrame, CLOSE_RESYNC};
use driftsync_server::{mint, Auth, Config, RoomOpens};
use driftsync_tests::{sqlite_store, NativeClient, TestServer};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const SECRET: &str = "attack-test-secret";

/// What a refusal may take.
const QUICK: Duration = Duration::from_secs(2);

/// How much the process's resident memory may grow during an attack.
const MAX_RSS_GROWTH: u64 = 32 * 1024 * 1024;

/// The state vector `ff ff ff ff ff ff ff 0f`: it declares 2^56 − 1 entries (yrs reserved a
/// hash map of that many, gigabytes, before noticing they are not there).
const BOMB_SV: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f];

/// An update starting with the same lying count.
const BOMB_UPDATE: &[u8] = &[
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x65, 0x01, 0x1d, 0x01,
];

// ---------------------------------------------------------------------------------------------
// One process per test.

/// Set in the child process that runs one test's body.
const CHILD_ENV: &str = "DRIFTSYNC_ATTACK_CHILD";

/// The longest one child may run before it is killed (the tests themselves aim at ~10 s).
const CHILD_LIMIT: Duration = Duration::from_secs(90);

/// Defines a test whose body runs in a child process of its own.
macro_rules! attack_test {
    ($name:ident, $body:expr) => {
        #[test]
        fn $name() {
            if std::env::var_os(CHILD_ENV).is_some() {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on($body);
            } else {
                run_child(stringify!($name));
            }
        }
    };
}

/// Runs the test `name` alone in a child process (one child at a time) and fails if it fails.
fn run_child(name: &str) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let exe = std::env::current_exe().expect("the test binary");
    let started = Instant::now();
    let mut child = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env("RUST_BACKTRACE", "0")
        // Fixed thresholds: large buffers are mmapped and given back when freed.
        .env(
            "GLIBC_TUNABLES",
            "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=262144",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the child test process");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break Some(status);
        }
        if started.elapsed() > CHILD_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    println!("{out}");
    eprintln!("{err}");
    match status {
        None => panic!("{name} did not finish within {CHILD_LIMIT:?}: killed"),
        Some(status) => assert!(
            status.success() && out.contains("1 passed"),
            "{name} failed in its child process ({status}), after {:.1} s",
            started.elapsed().as_secs_f64()
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Memory.

/// A line of `/proc/self/status`, in bytes.
fn status_bytes(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn rss() -> u64 {
    status_bytes("VmRSS:")
}

/// Watches the process's resident memory from now on: its peak, sampled every 2 ms (and read
/// from the kernel's high-water mark when it can be reset).
struct RssWatch {
    base: u64,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
    hwm_reset: bool,
}

impl RssWatch {
    fn start() -> RssWatch {
        // "5" resets VmHWM to the current RSS (Linux ≥ 4.0).
        let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let base = rss();
        let peak = Arc::new(AtomicU64::new(base));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, stop) = (Arc::clone(&peak), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        RssWatch {
            base,
            peak,
            stop,
            sampler: Some(sampler),
            hwm_reset,
        }
    }

    /// The growth of the peak over the start so far.
    fn growth(&self) -> u64 {
        let mut peak = self.peak.load(Ordering::Relaxed).max(rss());
        if self.hwm_reset {
            peak = peak.max(status_bytes("VmHWM:"));
        }
        peak.saturating_sub(self.base)
    }

    /// Asserts the growth is below [`MAX_RSS_GROWTH`].
    fn check(&self, what: &str) {
        let growth = self.growth();
        eprintln!("{what}: RSS peak growth {:.1} MiB", growth as f64 / (1024.0 * 1024.0));
        assert!(
            growth < MAX_RSS_GROWTH,
            "{what}: resident memory grew by {:.1} MiB (bound {} MiB)",
            growth as f64 / (1024.0 * 1024.0),
            MAX_RSS_GROWTH / (1024 * 1024)
        );
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sampler) = self.sampler.take() {
            let _ = sampler.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server, tokens, native helpers.

fn doc_id(s: &str) -> DocId {
    DocId::new(s).unwrap()
}

fn token(user: &str, docs: &[&str], write: bool) -> String {
    let docs: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
    mint(SECRET, user, &docs, write, Duration::from_secs(3600)).unwrap()
}

fn secret_config() -> Config {
    Config {
        auth: Auth::with_secret(SECRET),
        ..Default::default()
    }
}

async fn start(config: Config) -> (tempfile::TempDir, SqliteStore, TestServer) {
    let (dir, store) = sqlite_store().await;
    let server = TestServer::start(store.clone(), config).await;
    (dir, store, server)
}

async fn head(store: &SqliteStore, doc: &DocId) -> Cursor {
    store.meta(doc.as_str()).await.unwrap().map_or(0, |m| m.head)
}

fn resume_entry(doc: &DocId) -> ResumeDoc {
    ResumeDoc {
        doc: doc.clone(),
        cursor: 0,
        state_vector: vec![0],
    }
}

/// Sends one `Resume` of `docs` and reads until its (last) `Resumed` frame: the documents
/// resumed (with their answers) and the per-document errors. `None` if the connection closed.
async fn resume_docs(
    c: &mut NativeClient,
    docs: Vec<ResumeDoc>,
) -> Option<(Vec<driftsync_protocol::DocResumed>, Vec<(ErrorCode, DocId)>)> {
    c.send(&ClientFrame::Resume { docs }).await;
    let mut errors = Vec::new();
    loop {
        match c.recv().await? {
            ServerFrame::Error {
                code, doc: Some(doc), ..
            } => errors.push((code, doc)),
            ServerFrame::Resumed { docs } => return Some((docs, errors)),
            _ => continue,
        }
    }
}

/// Resumes `docs` from nothing and expects every one of them resumed.
async fn subscribe(c: &mut NativeClient, docs: &[&DocId]) {
    let (resumed, errors) = resume_docs(c, docs.iter().map(|d| resume_entry(d)).collect())
        .await
        .expect("connection closed during a resume");
    assert!(errors.is_empty(), "resume refused: {errors:?}");
    assert_eq!(resumed.len(), docs.len());
}

/// Pushes one batch and waits for its acknowledgement or refusal.
async fn push(c: &mut NativeClient, doc: &DocId, batch: u64, update: Vec<u8>) -> Result<Cursor, ErrorCode> {
    c.push(doc, batch, update).await
}

async fn await_push(c: &mut NativeClient, doc: &DocId, batch: u64) -> Result<Cursor, ErrorCode> {
    c.await_push(doc, batch).await
}

/// Pushes and asserts the acknowledgement arrives within [`QUICK`]; returns the latency.
async fn push_fast(c: &mut NativeClient, doc: &DocId, batch: u64, update: Vec<u8>) -> Duration {
    let t = Instant::now();
    let result = push(c, doc, batch, update).await;
    let took = t.elapsed();
    assert!(result.is_ok(), "honest push to {doc} refused: {result:?}");
    assert!(took < QUICK, "honest push to {doc} took {took:?}");
    took
}

/// Waits for an `Update` of `doc` and returns its bytes.
async fn next_update(c: &mut NativeClient, doc: &DocId) -> Vec<u8> {
    c.recv_until(|f| match f {
        ServerFrame::Update { doc: d, update, .. } if d == doc => Some(update.clone()),
        _ => None,
    })
    .await
}

/// A text update from a fresh replica.
fn text_update(client: u64, text: &str) -> Vec<u8> {
    doc::text_insert(&new_doc(client).unwrap(), 0, text).unwrap()
}

/// The text a replica holds after applying `update`.
fn text_of(update: &[u8]) -> String {
    let local = new_doc(1_000_001).unwrap();
    doc::apply_bytes(&local, update).unwrap();
    doc::text(&local)
}

/// A map-set update whose value is `depth` nested lib0 arrays (tag 117, length 1) around a
/// null (tag 126). Built from yrs's own encoding of a map-set of a marker string.
fn nested_any_update(client: u64, depth: usize) -> Vec<u8> {
    let marker = b"NESTMARK";
    let plain = doc::map_set(&new_doc(client).unwrap(), "k", yrs::Any::from("NESTMARK"));
    let mut needle = vec![119u8, marker.len() as u8];
    needle.extend_from_slice(marker);
    let at = plain
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .expect("the marker string in the encoded update");
    let mut bomb = plain[..at].to_vec();
    for _ in 0..depth {
        bomb.extend_from_slice(&[117, 1]);
    }
    bomb.push(126);
    bomb.extend_from_slice(&plain[at + needle.len()..]);
    bomb
}

// ---------------------------------------------------------------------------------------------
// A raw y-websocket connection.

struct YConn {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl YConn {
    async fn connect(server: &TestServer, doc: &DocId, token: &str) -> YConn {
        let url = format!("{}/yjs/{}?token={}", server.url(), doc, token);
        let (ws, _) = tokio::time::timeout(QUICK * 5, tokio_tungstenite::connect_async(url))
            .await
            .expect("y-websocket connect timed out")
            .expect("y-websocket connect");
        YConn { ws }
    }

    async fn send(&mut self, message: &YMessage) {
        self.send_raw(message.encode()).await;
    }

    async fn send_raw(&mut self, bytes: Vec<u8>) {
        tokio::time::timeout(QUICK * 5, self.ws.send(Message::Binary(bytes.into())))
            .await
            .expect("y-websocket send timed out")
            .expect("y-websocket send");
    }

    /// The next message: `Ok(Some(Ok(m)))`, `Ok(Some(Err(code)))` when the server closed
    /// (with its close code, 0 if none), `Ok(None)` on a dropped connection, `Err(())` after
    /// `timeout`.
    async fn recv_within(&mut self, timeout: Duration) -> Result<Option<Result<YMessage, u16>>, ()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| ())?;
            match msg {
                Some(Ok(Message::Binary(bytes))) => {
                    let m = YMessage::decode(&bytes, usize::MAX).expect("server sent a bad y-protocols message");
                    return Ok(Some(Ok(m)));
                }
                Some(Ok(Message::Close(frame))) => return Ok(Some(Err(frame.map_or(0, |f| u16::from(f.code))))),
                Some(Err(e)) => {
                    eprintln!("y-websocket connection error: {e}");
                    return Ok(None);
                }
                None => return Ok(None),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Receives until `pick` returns `Some` (skipping other messages) within `timeout`.
    async fn recv_until<T>(&mut self, timeout: Duration, mut pick: impl FnMut(&YMessage) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await {
                Ok(Some(Ok(m))) => {
                    if let Some(t) = pick(&m) {
                        return t;
                    }
                }
                Ok(Some(Err(code))) => panic!("y-websocket connection closed ({code}) while waiting"),
                Ok(None) => panic!("y-websocket connection dropped while waiting"),
                Err(()) => panic!("timed out after {timeout:?} waiting on a y-websocket connection"),
            }
        }
    }

    /// Reads (discarding) until the server closes; the close code and how many messages
    /// `count` matched.
    async fn drain_to_close(&mut self, timeout: Duration, count: impl Fn(&YMessage) -> bool) -> (Option<u16>, usize) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut n = 0;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await {
                Ok(Some(Ok(m))) => n += usize::from(count(&m)),
                Ok(Some(Err(code))) => return (Some(code), n),
                Ok(None) => return (None, n),
                Err(()) => panic!("the server did not close the connection within {timeout:?} ({n} counted)"),
            }
        }
    }
}

/// The close code a connection ended with must be 4000 ("resync").
fn assert_closed_with_resync(code: Option<u16>) {
    assert!(
        code.is_some(),
        "the connection was reset instead of closed with {CLOSE_RESYNC}: the server closed its \
         socket with unread input (a TCP RST), and the close frame was lost"
    );
    assert_eq!(code, Some(CLOSE_RESYNC));
}

fn is_step2(m: &YMessage) -> bool {
    matches!(m, YMessage::SyncStep2(_))
}

fn is_denied(m: &YMessage) -> bool {
    matches!(m, YMessage::Auth(AuthMessage::PermissionDenied { .. }))
}

// ---------------------------------------------------------------------------------------------
// 1. Decode bombs.

attack_test!(native_decode_bombs_are_refused_quickly, async {
    let (_dir, store, server) = start(secret_config()).await;
    let d = doc_id("notes/bomb");
    let mut writer = NativeClient::connect(&server.url(), &token("ada", &["notes/*"], true), 101).await;
    let mut reader = NativeClient::connect(&server.url(), &token("bob", &["notes/*"], false), 102).await;
    subscribe(&mut writer, &[&d]).await;
    assert_eq!(push(&mut writer, &d, 1, text_update(101, "hello")).await, Ok(1));
    let watch = RssWatch::start();

    // A resume entry with the bomb state vector: refused alone, quickly.
    let t = Instant::now();
    let (resumed, errors) = resume_docs(
        &mut reader,
        vec![ResumeDoc {
            doc: d.clone(),
            cursor: 0,
            state_vector: BOMB_SV.to_vec(),
        }],
    )
    .await
    .expect("the connection survives a bomb state vector");
    let took = t.elapsed();
    assert_eq!(errors, vec![(ErrorCode::Malformed, d.clone())]);
    assert!(resumed.is_empty(), "{resumed:?}");
    assert!(took < QUICK, "the bomb state vector took {took:?}");
    watch.check("bomb state vector in a Resume");

    // Resumed properly, the reader may not write: refused before anything is decoded.
    subscribe(&mut reader, &[&d]).await;
    let t = Instant::now();
    assert_eq!(
        push(&mut reader, &d, 1, BOMB_UPDATE.to_vec()).await,
        Err(ErrorCode::ReadOnly)
    );
    assert!(t.elapsed() < QUICK, "read-only bomb push took {:?}", t.elapsed());

    // From a writer: an invalid update.
    let t = Instant::now();
    assert_eq!(
        push(&mut writer, &d, 2, BOMB_UPDATE.to_vec()).await,
        Err(ErrorCode::InvalidUpdate)
    );
    assert!(t.elapsed() < QUICK, "bomb push took {:?}", t.elapsed());
    watch.check("bomb update pushed");

    // 100,000 nested arrays inside a map-set (a stack overflow in a recursive decoder).
    let nested = nested_any_update(101, 100_000);
    let t = Instant::now();
    assert_eq!(push(&mut writer, &d, 3, nested).await, Err(ErrorCode::InvalidUpdate));
    assert!(t.elapsed() < QUICK, "nested Any push took {:?}", t.elapsed());
    // A shallow one of the same shape is fine (the construction is right).
    assert!(push(&mut writer, &d, 4, nested_any_update(1_102, 3)).await.is_ok());
    watch.check("nested Any pushed");

    // Nothing of the bombs stored; both connections keep working.
    assert_eq!(head(&store, &d).await, 2);
    let w2 = text_update(1_101, "after");
    let mut writer2 = NativeClient::connect(&server.url(), &token("ada", &["notes/*"], true), 1_101).await;
    subscribe(&mut writer2, &[&d]).await;
    push_fast(&mut writer2, &d, 1, w2).await;
    loop {
        let update = next_update(&mut reader, &d).await;
        if text_of(&update) == "after" {
            break;
        }
    }
    assert_eq!(head(&store, &d).await, 3);
    watch.check("native decode bombs");
    server.stop().await;
});

attack_test!(yjs_decode_bombs_are_refused_quickly, async {
    let (_dir, store, server) = start(secret_config()).await;
    let d = doc_id("notes/ybomb");
    let mut writer = NativeClient::connect(&server.url(), &token("ada", &["notes/*"], true), 111).await;
    subscribe(&mut writer, &[&d]).await;
    assert_eq!(push(&mut writer, &d, 1, text_update(111, "hello")).await, Ok(1));
    let mut ro = YConn::connect(&server, &d, &token("bob", &["notes/*"], false)).await;
    let mut rw = YConn::connect(&server, &d, &token("carol", &["notes/*"], true)).await;
    for c in [&mut ro, &mut rw] {
        c.recv_until(QUICK, |m| matches!(m, YMessage::SyncStep1(_)).then_some(()))
            .await;
    }
    let watch = RssWatch::start();

    // SyncStep1 with the bomb state vector: no answer; the connection survives (a SyncStep1
    // after it is answered) or is closed, quickly.
    let t = Instant::now();
    ro.send(&YMessage::SyncStep1(BOMB_SV.to_vec())).await;
    ro.send(&YMessage::SyncStep1(vec![0])).await;
    let mut ro_alive = true;
    match ro.recv_within(QUICK).await {
        Ok(Some(Ok(YMessage::SyncStep2(update)))) => assert_eq!(text_of(&update), "hello"),
        Ok(Some(Ok(other))) => panic!("unexpected answer to a bomb SyncStep1: {other:?}"),
        Ok(Some(Err(_)) | None) => ro_alive = false,
        Err(()) => panic!("no answer to the SyncStep1 after the bomb within {QUICK:?}"),
    }
    assert!(t.elapsed() < QUICK, "{:?}", t.elapsed());
    eprintln!(
        "after a bomb SyncStep1 the connection is {}",
        if ro_alive { "open" } else { "closed" }
    );
    watch.check("bomb SyncStep1");
    if !ro_alive {
        ro = YConn::connect(&server, &d, &token("bob", &["notes/*"], false)).await;
    }

    // The bomb update from a read-only connection: permission denied, for each message.
    let t = Instant::now();
    ro.send(&YMessage::SyncStep2(BOMB_UPDATE.to_vec())).await;
    ro.recv_until(QUICK, |m| is_denied(m).then_some(())).await;
    ro.send(&YMessage::Update(BOMB_UPDATE.to_vec())).await;
    ro.recv_until(QUICK, |m| is_denied(m).then_some(())).await;
    assert!(t.elapsed() < QUICK, "{:?}", t.elapsed());

    // From a read-write connection: refused, nothing stored, nothing passed on; the
    // connection still answers a SyncStep1 right after.
    let t = Instant::now();
    rw.send(&YMessage::SyncStep2(BOMB_UPDATE.to_vec())).await;
    rw.send(&YMessage::Update(BOMB_UPDATE.to_vec())).await;
    rw.send(&YMessage::Update(nested_any_update(112, 100_000))).await;
    rw.send(&YMessage::SyncStep1(vec![0])).await;
    match rw.recv_within(QUICK).await {
        Ok(Some(Ok(YMessage::SyncStep2(update)))) => assert_eq!(text_of(&update), "hello"),
        other => panic!("expected the SyncStep2 after the bombs, got {other:?}"),
    }
    assert!(t.elapsed() < QUICK, "{:?}", t.elapsed());
    assert_eq!(head(&store, &d).await, 1, "nothing of the bombs is stored");
    assert_eq!(
        writer.recv_within(Duration::from_millis(300)).await,
        Err(()),
        "the writer received nothing"
    );
    watch.check("bomb updates over /yjs");

    // Honest clients keep working: the writer's push is acknowledged and reaches both.
    push_fast(
        &mut writer,
        &d,
        2,
        doc::text_insert(&new_doc(1_111).unwrap(), 0, "more").unwrap(),
    )
    .await;
    for c in [&mut ro, &mut rw] {
        let update = c
            .recv_until(QUICK, |m| match m {
                YMessage::Update(u) => Some(u.clone()),
                _ => None,
            })
            .await;
        assert_eq!(text_of(&update), "more");
    }
    watch.check("/yjs decode bombs");
    server.stop().await;
});

// ---------------------------------------------------------------------------------------------
// 2. Queues bounded in bytes.

/// 256 KiB of text.
fn quarter_mib() -> String {
    "q".repeat(256 * 1024)
}

attack_test!(a_resume_listing_one_document_many_times_is_bounded, async {
    let (_dir, store, server) = start(secret_config()).await;
    let d = doc_id("notes/q");
    let mut writer = NativeClient::connect(&server.url(), &token("ada", &["notes/*"], true), 201).await;
    subscribe(&mut writer, &[&d]).await;
    assert_eq!(push(&mut writer, &d, 1, text_update(201, &quarter_mib())).await, Ok(1));
    let repeated: Vec<ResumeDoc> = (0..1500).map(|_| resume_entry(&d)).collect();

    // A client that never reads.
    let watch = RssWatch::start();
    let mut silent = NativeClient::connect(&server.url(), &token("bob", &["notes/*"], false), 202).await;
    silent.send(&ClientFrame::Resume { docs: repeated.clone() }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    watch.check("1,500-fold resume, not read");

    // Meanwhile an honest subscriber and the writer keep working.
    let mut honest = NativeClient::connect(&server.url(), &token("carl", &["notes/*"], false), 203).await;
    subscribe(&mut honest, &[&d]).await;
    let more = doc::text_insert(&new_doc(1_201).unwrap(), 0, "more").unwrap();
    push_fast(&mut writer, &d, 2, more).await;
    assert!(next_update(&mut honest, &d).await.len() < 1024);
    watch.check("1,500-fold resume, honest clients");
    drop(silent);

    // A client that reads: the first entry is answered, every repeat refused with Malformed.
    let mut reading = NativeClient::connect(&server.url(), &token("bob", &["notes/*"], false), 204).await;
    let t = Instant::now();
    reading.send(&ClientFrame::Resume { docs: repeated }).await;
    let mut errors = Vec::new();
    let resumed = loop {
        match reading.recv().await {
            Some(ServerFrame::Error {
                code, doc: Some(doc), ..
            }) => errors.push((code, doc)),
            Some(ServerFrame::Resumed { docs }) => break docs,
            Some(_) => {}
            None => {
                let malformed = errors.iter().filter(|(c, _)| *c == ErrorCode::Malformed).count();
                panic!(
                    "the reading client was disconnected during its 1,500-fold resume after {:?}, \
                     having received {} errors ({malformed} Malformed) and no Resumed",
                    t.elapsed(),
                    errors.len()
                );
            }
        }
    };
    eprintln!("1,500-fold resume answered in {:?}", t.elapsed());
    assert_eq!(resumed.len(), 1, "the document is answered once");
    assert_eq!(text_of(resumed[0].update.as_deref().unwrap()).len(), 256 * 1024 + 4);
    assert_eq!(errors.len(), 1499);
    assert!(
        errors.iter().all(|e| *e == (ErrorCode::Malformed, d.clone())),
        "{:?}",
        &errors[..3]
    );
    assert!(t.elapsed() < QUICK * 2, "{:?}", t.elapsed());
    assert_eq!(head(&store, &d).await, 2);
    watch.check("1,500-fold resume");
    server.stop().await;
});

attack_test!(yjs_sync_step1_flood_from_a_non_reader_is_bounded, async {
    let (_dir, _store, server) = start(secret_config()).await;
    let d = doc_id("notes/y");
    let mut writer = NativeClient::connect(&server.url(), &token("ada", &["notes/*"], true), 211).await;
    subscribe(&mut writer, &[&d]).await;
    assert_eq!(push(&mut writer, &d, 1, text_update(211, &quarter_mib())).await, Ok(1));
    let mut honest = YConn::connect(&server, &d, &token("carl", &["notes/*"], false)).await;
    honest
        .recv_until(QUICK, |m| matches!(m, YMessage::SyncStep1(_)).then_some(()))
        .await;

    let watch = RssWatch::start();
    let mut silent = YConn::connect(&server, &d, &token("bob", &["notes/*"], false)).await;
    let step1 = YMessage::SyncStep1(vec![0]).encode();
    let t = Instant::now();
    for _ in 0..1000 {
        silent.send_raw(step1.clone()).await;
    }
    eprintln!("1,000 SyncStep1 sent in {:?}", t.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    watch.check("1,000 SyncStep1 of a 256 KiB document, not read");

    // Honest clients keep working meanwhile.
    let more = doc::text_insert(&new_doc(1_211).unwrap(), 0, "more").unwrap();
    push_fast(&mut writer, &d, 2, more).await;
    let update = honest
        .recv_until(QUICK, |m| match m {
            YMessage::Update(u) => Some(u.clone()),
            _ => None,
        })
        .await;
    assert_eq!(text_of(&update), "more");

    // When it reads, it gets far fewer answers than it asked for, then a close with 4000.
    let (code, answers) = silent.drain_to_close(Duration::from_secs(10), is_step2).await;
    eprintln!("the flooding client got {answers} answers, then close {code:?}");
    assert_closed_with_resync(code);
    assert!(answers < 1000, "{answers} answers");
    watch.check("1,000 SyncStep1 of a 256 KiB document");
    server.stop().await;
});

/// An awareness state (JSON) of about `bytes` bytes.
fn big_state(bytes: usize) -> String {
    format!("{{\"pad\":\"{}\"}}", "p".repeat(bytes))
}

attack_test!(yjs_query_awareness_flood_from_a_non_reader_is_bounded, async {
    let (_dir, _store, server) = start(secret_config()).await;
    let d = doc_id("notes/aw");
    let mut writer = NativeClient::connect(&server.url(), &token("ada", &["notes/*"], true), 221).await;
    let mut honest = NativeClient::connect(&server.url(), &token("carl", &["notes/*"], false), 222).await;
    subscribe(&mut writer, &[&d]).await;
    subscribe(&mut honest, &[&d]).await;

    let watch = RssWatch::start();
    let mut silent = YConn::connect(&server, &d, &token("bob", &["notes/*"], false)).await;
    // Eight states of 256 KiB (presence states may be capped smaller: then refused).
    let eight: Vec<AwarenessEntry> = (0..8)
        .map(|i| AwarenessEntry {
            client_id: 7_000 + i,
            clock: 1,
            state: Some(big_state(256 * 1024)),
        })
        .collect();
    silent.send(&YMessage::Awareness(eight)).await;
    // And the room filled as far as the caps allow, by eight other connections of 4 × 60 KiB.
    let mut setters = Vec::new();
    for s in 0..8u64 {
        let mut c = YConn::connect(&server, &d, &token(&format!("setter{s}"), &["notes/*"], false)).await;
        let entries = (0..4)
            .map(|i| AwarenessEntry {
                client_id: 8_000 + s * 10 + i,
                clock: 1,
                state: Some(big_state(60 * 1024)),
            })
            .collect();
        c.send(&YMessage::Awareness(entries)).await;
        // The setters read what they get: only the attacker is a slow reader.
        setters.push(tokio::spawn(async move {
            while let Ok(Some(Ok(_))) = c.recv_within(Duration::from_secs(60)).await {}
        }));
    }
    // The honest subscriber sees the states arrive (and reads them all).
    let mut seen = 0usize;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match honest.recv_within(Duration::from_millis(300)).await {
            Ok(Some(ServerFrame::Presence { state: Some(s), .. })) => seen += s.len(),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the honest subscriber was disconnected"),
            Err(()) => break,
        }
    }
    eprintln!("presence bytes the honest subscriber received: {seen}");
    watch.check("large awareness states set");

    // What the flood itself costs, from here.
    let watch = RssWatch::start();
    let t = Instant::now();
    for _ in 0..200 {
        silent.send(&YMessage::QueryAwareness).await;
    }
    eprintln!("200 QueryAwareness sent in {:?}", t.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    watch.check("200 QueryAwareness, not read");

    // Honest clients keep working meanwhile.
    let more = doc::text_insert(&new_doc(1_221).unwrap(), 0, "more").unwrap();
    push_fast(&mut writer, &d, 1, more).await;
    assert_eq!(text_of(&next_update(&mut honest, &d).await), "more");

    let (code, answers) = silent
        .drain_to_close(
            Duration::from_secs(10),
            |m| matches!(m, YMessage::Awareness(e) if !e.is_empty()),
        )
        .await;
    eprintln!("the querying client got {answers} awareness messages, then close {code:?}");
    // Answers of a couple of MiB each, charged to its rate limit: it is closed with 4000
    // (unless the states were refused and every answer is tiny).
    if seen > 4 * 1024 * 1024 / 4 {
        assert_closed_with_resync(code);
    }
    for setter in setters {
        setter.abort();
    }
    watch.check("200 QueryAwareness");
    server.stop().await;
});

// ---------------------------------------------------------------------------------------------
// 3. Refusals that cost everyone.

attack_test!(missing_dependency_refusals_do_not_stall_others, async {
    let (_dir, store, server) = start(secret_config()).await;
    let big = doc_id("notes/big");
    let other = doc_id("notes/other");
    let mut writer = NativeClient::connect(&server.url(), &token("ada", &["notes/*"], true), 301).await;
    subscribe(&mut writer, &[&big]).await;
    assert_eq!(
        push(&mut writer, &big, 1, text_update(301, &"m".repeat(1024 * 1024))).await,
        Ok(1)
    );
    let mut attacker = NativeClient::connect(&server.url(), &token("mallory", &["notes/*"], true), 302).await;
    subscribe(&mut attacker, &[&big]).await;
    // Mallory's second insert, without her first: it depends on a change the server lacks.
    let replica = new_doc(302).unwrap();
    let _first = doc::text_insert(&replica, 0, "a").unwrap();
    let second = doc::text_insert(&replica, 1, "b").unwrap();

    // An honest client on another document, pushing every 50 ms throughout.
    let mut honest = NativeClient::connect(&server.url(), &token("hal", &["notes/*"], true), 303).await;
    subscribe(&mut honest, &[&other]).await;
    let honest_replica = new_doc(303).unwrap();
    let honest_updates: Vec<Vec<u8>> = (0..40)
        .map(|_| doc::text_insert(&honest_replica, 0, "h").unwrap())
        .collect();
    drop(honest_replica);
    let stop = Arc::new(AtomicBool::new(false));
    let honest_task = {
        let (stop, other) = (Arc::clone(&stop), other.clone());
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let mut acked = 0;
            for (i, update) in honest_updates.into_iter().enumerate() {
                if stop.load(Ordering::Relaxed) && i >= 5 {
                    break;
                }
                let t = Instant::now();
                let result = push(&mut honest, &other, i as u64 + 1, update).await;
                assert!(result.is_ok(), "honest push refused: {result:?}");
                worst = worst.max(t.elapsed());
                acked += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (worst, acked)
        })
    };

    let watch = RssWatch::start();
    let t = Instant::now();
    for batch in 1..=200u64 {
        attacker
            .send(&ClientFrame::Push {
                doc: big.clone(),
                batch,
                update: second.clone(),
            })
            .await;
    }
    let mut codes = std::collections::HashMap::new();
    for batch in 1..=200u64 {
        let code = await_push(&mut attacker, &big, batch).await.expect_err("refused");
        *codes.entry(code).or_insert(0) += 1;
    }
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    eprintln!("200 refusals in {took:?}: {codes:?}");
    let (worst, acked) = honest_task.await.expect("the honest task");
    eprintln!("honest pushes: {acked} acknowledged, slowest {worst:?}");
    assert_eq!(codes.get(&ErrorCode::MissingDependencies), Some(&200), "{codes:?}");
    assert!(took < Duration::from_secs(5), "200 refusals took {took:?}");
    assert!(worst < Duration::from_secs(1), "an honest push took {worst:?}");
    // The big document still works, and holds nothing of Mallory's.
    let t = Instant::now();
    let more = doc::text_insert(&new_doc(1_301).unwrap(), 0, "more").unwrap();
    let mut writer2 = NativeClient::connect(&server.url(), &token("ada", &["notes/*"], true), 1_301).await;
    subscribe(&mut writer2, &[&big]).await;
    assert_eq!(push(&mut writer2, &big, 1, more).await, Ok(2));
    assert!(t.elapsed() < QUICK, "{:?}", t.elapsed());
    assert_eq!(head(&store, &big).await, 2);
    watch.check("200 pushes with missing dependencies");
    drop(writer);
    server.stop().await;
});

// ---------------------------------------------------------------------------------------------
// 4. Document size.

attack_test!(a_document_stops_growing_at_its_maximum_size, async {
    // 7 MiB: two 3 MiB pushes fit, one more of 2 MiB does not; the answer to a resume of the
    // document (over 6 MiB) is larger than a frame (4 MiB) and goes in pieces.
    let config = Config {
        max_document_bytes: 7 * 1024 * 1024,
        ..secret_config()
    };
    let (_dir, store, server) = start(config).await;
    let huge = doc_id("notes/huge");
    let small = doc_id("notes/small");
    let mut writer = NativeClient::connect(&server.url(), &token("ada", &["notes/*"], true), 401).await;
    subscribe(&mut writer, &[&huge, &small]).await;
    let (three, again, two) = {
        let replica = new_doc(401).unwrap();
        let three = doc::text_insert(&replica, 0, &"3".repeat(3 * 1024 * 1024)).unwrap();
        let again = doc::text_insert(&replica, 0, &"3".repeat(3 * 1024 * 1024)).unwrap();
        let two = doc::text_insert(&replica, 0, &"2".repeat(2 * 1024 * 1024)).unwrap();
        (three, again, two)
    };
    assert_eq!(push(&mut writer, &huge, 1, three).await, Ok(1));
    assert_eq!(push(&mut writer, &huge, 4, again).await, Ok(2));
    // What the refusal costs (the test's own 2 MiB update is already held).
    let watch = RssWatch::start();
    let t = Instant::now();
    assert_eq!(push(&mut writer, &huge, 2, two).await, Err(ErrorCode::DocumentTooLarge));
    assert!(t.elapsed() < QUICK, "{:?}", t.elapsed());
    assert_eq!(head(&store, &huge).await, 2);
    watch.check("a push beyond the maximum document size");
    drop(watch);

    // A fresh native client still resumes it: in pieces, then an entry with an empty update.
    let mut fresh = NativeClient::connect(&server.url(), &token("bob", &["notes/*"], false), 402).await;
    fresh
        .send(&ClientFrame::Resume {
            docs: vec![ResumeDoc {
                doc: huge.clone(),
                cursor: 0,
                state_vector: vec![0],
            }],
        })
        .await;
    let mut pieces: Vec<Vec<u8>> = Vec::new();
    let docs = loop {
        match fresh.recv().await {
            Some(ServerFrame::ResumePart { doc, bytes }) if doc == huge => pieces.push(bytes),
            Some(ServerFrame::Resumed { docs }) => break docs,
            Some(_) => continue,
            None => panic!("closed during the resume"),
        }
    };
    assert!(pieces.len() >= 2, "{} pieces", pieces.len());
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].update.as_deref(), Some(&[][..]), "the update came in pieces");
    let text = text_of(&pieces.concat());
    assert_eq!(text.len(), 6 * 1024 * 1024);
    assert!(text.bytes().all(|b| b == b'3'));
    // So does the client library.
    let dir = tempfile::tempdir().unwrap();
    let mut library = driftsync_client::Client::open(dir.path().join("bob.db"), "bob")
        .await
        .unwrap();
    library.text_append(huge.as_str(), "").await.unwrap();
    library
        .sync_once(&server.url(), &token("bob", &["notes/*"], false))
        .await
        .unwrap();
    assert_eq!(library.text(huge.as_str()).await.unwrap().len(), 6 * 1024 * 1024);

    // And a y-websocket client syncs it.
    let mut y = YConn::connect(&server, &huge, &token("carl", &["notes/*"], false)).await;
    y.send(&YMessage::SyncStep1(vec![0])).await;
    let update = y
        .recv_until(QUICK * 3, |m| match m {
            YMessage::SyncStep2(u) => Some(u.clone()),
            _ => None,
        })
        .await;
    assert_eq!(text_of(&update).len(), 6 * 1024 * 1024);

    // The writer's other document works.
    push_fast(&mut writer, &small, 3, text_update(1_401, "fine")).await;
    server.stop().await;
});

// ---------------------------------------------------------------------------------------------
// 5. Rooms opened too fast.

attack_test!(rooms_opened_too_fast_are_rate_limited, async {
    let opens = RoomOpens {
        per_sec: 2.0,
        burst: 50.0,
    };
    let config = Config {
        room_opens: opens,
        ..secret_config()
    };
    let (_dir, _store, server) = start(config).await;
    let eve = token("eve", &["chat/*"], false);
    let started = Instant::now();
    let watch = RssWatch::start();

    /// Resumes `n` new rooms in frames of 1,000; how many were opened and refused.
    async fn open_rooms(c: &mut NativeClient, prefix: &str, n: usize) -> (usize, usize) {
        let (mut opened, mut limited) = (0, 0);
        for chunk in 0..n.div_ceil(1000) {
            let docs = (chunk * 1000..((chunk + 1) * 1000).min(n))
                .map(|i| resume_entry(&doc_id(&format!("chat/{prefix}-{i}"))))
                .collect();
            let (resumed, errors) = resume_docs(c, docs).await.expect("connection closed during a resume");
            opened += resumed.len();
            for (code, doc) in errors {
                assert_eq!(code, ErrorCode::RateLimited, "{doc}");
                limited += 1;
            }
        }
        (opened, limited)
    }

    let mut first = NativeClient::connect(&server.url(), &eve, 501).await;
    let t = Instant::now();
    let (opened1, limited1) = open_rooms(&mut first, "a", 5000).await;
    eprintln!(
        "first connection: {opened1} opened, {limited1} refused in {:?}",
        t.elapsed()
    );
    assert_eq!(opened1 + limited1, 5000);
    let refill = |since: Instant| (opens.per_sec * since.elapsed().as_secs_f64()).ceil() as usize + 1;
    assert!(opened1 >= 50, "the burst is allowed: {opened1}");
    assert!(opened1 <= 50 + refill(started), "{opened1} rooms opened");

    // Another connection of the same user: the user's bucket (twice the connection's) is
    // half spent, and a third connection gets next to nothing.
    let mut second = NativeClient::connect(&server.url(), &eve, 502).await;
    let (opened2, _) = open_rooms(&mut second, "b", 1000).await;
    let mut third = NativeClient::connect(&server.url(), &eve, 503).await;
    let (opened3, _) = open_rooms(&mut third, "c", 1000).await;
    eprintln!("second connection: {opened2} opened; third: {opened3}");
    assert!(opened2 <= 50 + refill(started), "{opened2}");
    assert!(
        opened1 + opened2 + opened3 <= 100 + 2 * refill(started),
        "{opened1} + {opened2} + {opened3} rooms opened by one user"
    );
    assert!(opened3 < 25, "a third connection of the user opened {opened3} rooms");

    // Another user is not affected.
    let mut honest = NativeClient::connect(&server.url(), &token("gus", &["notes/*"], true), 504).await;
    let mine: Vec<DocId> = (0..10).map(|i| doc_id(&format!("notes/gus-{i}"))).collect();
    subscribe(&mut honest, &mine.iter().collect::<Vec<_>>()).await;
    push_fast(&mut honest, &mine[0], 1, text_update(504, "hi")).await;
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    watch.check("5,000 rooms opened");
    server.stop().await;
});

// ---------------------------------------------------------------------------------------------
// 6. The same update pushed again and again.

attack_test!(the_same_update_pushed_200_times_is_stored_once, async {
    let (_dir, store, server) = start(secret_config()).await;
    let d = doc_id("notes/same");
    let mut writer = NativeClient::connect(&server.url(), &token("ada", &["notes/*"], true), 601).await;
    let mut sub = NativeClient::connect(&server.url(), &token("bob", &["notes/*"], false), 602).await;
    subscribe(&mut writer, &[&d]).await;
    subscribe(&mut sub, &[&d]).await;
    let watch = RssWatch::start();
    let update = text_update(601, "same");
    let t = Instant::now();
    for batch in 1..=200u64 {
        let result = push(&mut writer, &d, batch, update.clone()).await;
        assert_eq!(result, Ok(1), "batch {batch}");
    }
    eprintln!("200 identical pushes acknowledged in {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(head(&store, &d).await, 1, "stored once");
    // The subscriber received it once.
    let mut updates = 0;
    while let Ok(frame) = sub.recv_within(Duration::from_millis(500)).await {
        match frame {
            Some(ServerFrame::Update { .. }) => updates += 1,
            Some(_) => {}
            None => panic!("the subscriber was disconnected"),
        }
    }
    assert_eq!(updates, 1);
    // And a new change still goes through.
    let more = doc::text_insert(&new_doc(1_601).unwrap(), 0, "more").unwrap();
    let mut writer2 = NativeClient::connect(&server.url(), &token("ada", &["notes/*"], true), 1_601).await;
    subscribe(&mut writer2, &[&d]).await;
    push_fast(&mut writer2, &d, 1, more).await;
    assert_eq!(text_of(&next_update(&mut sub, &d).await), "more");
    assert_eq!(head(&store, &d).await, 2);
    watch.check("the same update 200 times");
    server.stop().await;
});

// ---------------------------------------------------------------------------------------------
// The close code of a connection closed for flooding reaches the client.

attack_test!(a_flooding_yjs_client_receives_its_close_code, async {
    let config = Config {
        rate_limit: driftsync_server::RateLimit {
            frames_per_sec: 1.0,
            frame_burst: 5.0,
            ..Default::default()
        },
        ..secret_config()
    };
    let (_dir, _store, server) = start(config).await;
    let d = doc_id("notes/flood");
    let mut flooder = YConn::connect(&server, &d, &token("bob", &["notes/*"], false)).await;
    // 50 messages of 8 KiB (of an unknown type, ignored), sent at once: the sixth is over the
    // limit, and the rest are still unread when the server closes.
    for _ in 0..50 {
        flooder.send_raw(vec![9; 8 * 1024]).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let (code, _) = flooder.drain_to_close(Duration::from_secs(5), |_| false).await;
    assert!(t.elapsed() < QUICK, "{:?}", t.elapsed());
    assert_closed_with_resync(code);
    // Others are unaffected.
    let mut honest = YConn::connect(&server, &d, &token("carl", &["notes/*"], false)).await;
    honest.send(&YMessage::SyncStep1(vec![0])).await;
    honest.recv_until(QUICK, |m| is_step2(m).then_some(())).await;
    server.stop().await;
});

// ---------------------------------------------------------------------------------------------
// An update yrs would take quadratic memory to integrate: a long run of one-character items (what
// merging a day of offline keystrokes with `Update::merge_updates` gives). Refused before yrs
// sees it; the same keystrokes as the client library now pushes them go through.

attack_test!(
    an_update_too_costly_to_squash_is_refused_and_its_honest_form_accepted,
    async {
        use driftsync_engine::store::OutboxEntry;
        use driftsync_engine::sync::{merge, merge_outbox, MERGED_PUSH_BYTES};

        let (_dir, store, server) = start(secret_config()).await;
        let d = doc_id("notes/keystrokes");
        let mut writer = NativeClient::connect(&server.url(), &token("ada", &["notes/*"], true), 701).await;
        subscribe(&mut writer, &[&d]).await;
        let typist = new_doc(701).unwrap();
        let outbox: Vec<OutboxEntry> = (0..20_000u32)
            .map(|i| OutboxEntry {
                doc: d.as_str().into(),
                batch: u64::from(i) + 1,
                update: doc::text_insert(&typist, i, "x").unwrap(),
            })
            .collect();
        let parts: Vec<&[u8]> = outbox.iter().map(|e| e.update.as_slice()).collect();
        let whole = merge(&parts).unwrap();
        let watch = RssWatch::start();
        let t = Instant::now();
        assert_eq!(
            push(&mut writer, &d, 20_000, whole).await,
            Err(ErrorCode::InvalidUpdate)
        );
        assert!(t.elapsed() < QUICK, "{:?}", t.elapsed());
        watch.check("a 20,000-item run");
        assert_eq!(head(&store, &d).await, 0, "nothing stored");
        // The client library's merged pushes of the same outbox: each accepted.
        for entry in merge_outbox(outbox, MERGED_PUSH_BYTES).unwrap() {
            assert!(push(&mut writer, &d, entry.batch, entry.update).await.is_ok());
        }
        let stored = store.load(d.as_str()).await.unwrap().unwrap_or_default();
        let rebuilt = doc::load_document(d.as_str(), &stored, 1).unwrap();
        assert_eq!(doc::text(&rebuilt), "x".repeat(20_000));
        server.stop().await;
    }
);
