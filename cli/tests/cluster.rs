//! Several `driftsync serve` processes on one PostgreSQL, sharing rooms through Redis: live
//! updates and presence across instances, an instance killed with SIGKILL during writes, Redis
//! restarted during writes, one instance cut off from Redis (not from PostgreSQL) for a while.
//!
//! Needs `DRIFTSYNC_TEST_POSTGRES_URL` and `DRIFTSYNC_TEST_REDIS_URL` (`.ci/run` sets both);
//! without them each test prints "skipped: …" and passes. Tests that restart or cut Redis
//! start their own `redis-server` on a free port (and a TCP proxy in this process); each test
//! uses its own document ids and Redis channel prefix, so they share the services safely.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use driftsync_engine::doc::{self, new_doc};
use driftsync_engine::sync::{apply_remote, Limits};
use driftsync_protocol::{ClientFrame, DocId, ResumeDoc, ServerFrame};
use driftsync_tests::yclient::{node_modules_dir, YClient};
use driftsync_tests::NativeClient;
use tokio::sync::mpsc;

/// Generous bounds: nothing here is a timing assertion.
const WAIT: Duration = Duration::from_secs(30);

fn services() -> Option<(String, String)> {
    match (
        std::env::var("DRIFTSYNC_TEST_POSTGRES_URL"),
        std::env::var("DRIFTSYNC_TEST_REDIS_URL"),
    ) {
        (Ok(pg), Ok(redis)) => Some((pg, redis)),
        _ => {
            eprintln!("skipped: DRIFTSYNC_TEST_POSTGRES_URL and DRIFTSYNC_TEST_REDIS_URL are needed");
            None
        }
    }
}

/// A name no other test run uses.
fn unique(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{what}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

// ----- processes -----

/// A `driftsync serve` process.
struct Instance {
    child: Child,
    addr: SocketAddr,
    url: String,
    name: &'static str,
}

impl Instance {
    fn start(name: &'static str, pg: &str, redis: &str, prefix: &str) -> Instance {
        let mut child = Command::new(env!("CARGO_BIN_EXE_driftsync"))
            .args(["serve", "--listen", "127.0.0.1:0", "--database-url", pg])
            .args(["--redis-url", redis, "--redis-prefix", prefix])
            .env_remove("DRIFTSYNC_SECRET")
            .env("RUST_LOG", "warn,driftsync_server=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start driftsync serve");
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read the listening line");
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("driftsync listening on ")
            .unwrap_or_else(|| panic!("{name}: unexpected first line {line:?}"))
            .parse()
            .expect("an address");
        Instance {
            child,
            addr,
            url: format!("ws://{addr}"),
            name,
        }
    }

    /// SIGKILL: no goodbye, no flush, no leaving the rooms.
    fn kill(&mut self) {
        eprintln!("killing {} with SIGKILL", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` of this test on a port of its own, which the test may stop and restart.
struct OwnRedis {
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    /// `None` (the test skips) when `redis-server` is not installed.
    async fn start() -> Option<OwnRedis> {
        if Command::new("redis-server").arg("--version").output().is_err() {
            eprintln!("skipped: redis-server not found");
            return None;
        }
        let mut redis = OwnRedis {
            port: free_port(),
            child: None,
        };
        redis.up().await;
        Some(redis)
    }

    async fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        assert!(
            eventually(|| async { ping(&addr).await }).await,
            "redis-server did not answer on {addr}"
        );
    }

    fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.down();
    }
}

/// Whether a Redis answers `PING` at `addr`.
async fn ping(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
    else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut buf)).await,
        Ok(Ok(_))
    ) && &buf == b"+PONG\r\n"
}

/// A TCP proxy in front of a Redis that can black-hole everyone: while cut, nothing is
/// forwarded either way and new connections are accepted and left hanging (no reset, no FIN:
/// only timeouts and pings can tell); when the cut ends, the connections held meanwhile are
/// closed.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    changes: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let (changes, _) = tokio::sync::watch::channel(false);
        let (is_cut, watch) = (Arc::clone(&cut), changes.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut_rx = watch.subscribe();
                let is_cut = Arc::clone(&is_cut);
                tokio::spawn(async move {
                    if is_cut.load(Ordering::SeqCst) {
                        // Held open, silent, until the cut ends; then closed.
                        let _ = cut_rx.wait_for(|cut| !*cut).await;
                        return;
                    }
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                        _ = cut_rx.wait_for(|cut| *cut) => {}
                    }
                    // Black-holed: both sockets stay open and unread until the cut ends.
                    let _ = cut_rx.wait_for(|cut| !*cut).await;
                    drop((inbound, outbound));
                });
            }
        });
        Proxy { port, cut, changes }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        self.changes.send_replace(cut);
    }
}

async fn eventually<F: std::future::Future<Output = bool>>(mut check: impl FnMut() -> F) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

// ----- native replicas and writers -----

/// What a live replica has seen.
#[derive(Default)]
struct Seen {
    text: String,
    /// Presence states of other connections, by peer.
    presence: BTreeMap<u64, String>,
    /// Whether its connection is up.
    connected: bool,
}

/// A native client holding a replica of one document, live: it applies every update it is
/// sent, and when its instance dies it waits to be pointed at another one, where it resumes
/// from its cursor and state vector.
struct Replica {
    seen: Arc<Mutex<Seen>>,
    reconnect: mpsc::Sender<String>,
    session: Arc<AtomicU64>,
}

impl Replica {
    async fn start(url: &str, doc_id: &DocId, client_id: u64, presence: Option<&str>) -> Replica {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (reconnect, mut urls) = mpsc::channel::<String>(4);
        let session = Arc::new(AtomicU64::new(0));
        let (task_seen, task_session, doc_id) = (Arc::clone(&seen), Arc::clone(&session), doc_id.clone());
        let presence = presence.map(str::to_owned);
        let mut url = url.to_owned();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        tokio::spawn(async move {
            let doc = new_doc(client_id).unwrap();
            let mut cursor = 0;
            loop {
                let mut client = NativeClient::connect(&url, "", client_id).await;
                task_session.store(client.session, Ordering::SeqCst);
                let resume = ResumeDoc {
                    doc: doc_id.clone(),
                    cursor,
                    state_vector: doc::state_vector(&doc),
                };
                client.send(&ClientFrame::Resume { docs: vec![resume] }).await;
                if let Some(state) = &presence {
                    client
                        .send(&ClientFrame::Presence {
                            doc: doc_id.clone(),
                            state: Some(state.clone()),
                        })
                        .await;
                }
                task_seen.lock().unwrap().connected = true;
                while let Some(frame) = client.recv().await {
                    match frame {
                        ServerFrame::Resumed { docs } => {
                            for entry in docs {
                                if let Some(update) = entry.update {
                                    apply_remote(&doc, &update, &Limits::default()).unwrap();
                                }
                                cursor = cursor.max(entry.cursor);
                            }
                            if let Some(ready) = ready_tx.take() {
                                let _ = ready.send(());
                            }
                        }
                        ServerFrame::Update { update, cursor: c, .. } => {
                            apply_remote(&doc, &update, &Limits::default()).unwrap();
                            cursor = cursor.max(c);
                        }
                        ServerFrame::Presence { peer, state, .. } => {
                            let mut seen = task_seen.lock().unwrap();
                            match state {
                                Some(state) => seen.presence.insert(peer, state),
                                None => seen.presence.remove(&peer),
                            };
                        }
                        _ => {}
                    }
                    task_seen.lock().unwrap().text = doc::text(&doc);
                }
                task_seen.lock().unwrap().connected = false;
                match urls.recv().await {
                    Some(next) => url = next,
                    None => return,
                }
            }
        });
        let _ = tokio::time::timeout(WAIT, ready).await;
        Replica {
            seen,
            reconnect,
            session,
        }
    }

    fn text(&self) -> String {
        self.seen.lock().unwrap().text.clone()
    }

    fn presence(&self) -> BTreeMap<u64, String> {
        self.seen.lock().unwrap().presence.clone()
    }

    fn connected(&self) -> bool {
        self.seen.lock().unwrap().connected
    }
}

/// A native writer: appends `tag-N;` tokens to its own text, one push at a time, re-pushing a
/// batch whose acknowledgement it did not get on the next instance it is pointed at. Records
/// the tokens acknowledged.
struct Writer {
    acked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    urls: mpsc::Sender<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(url: &str, doc_id: &DocId, client_id: u64, tag: &str, every: Duration) -> Writer {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (urls, mut next_url) = mpsc::channel::<String>(4);
        let (task_acked, task_stop, doc_id, tag) =
            (Arc::clone(&acked), Arc::clone(&stop), doc_id.clone(), tag.to_owned());
        let mut url = url.to_owned();
        let task = tokio::spawn(async move {
            let doc = new_doc(client_id).unwrap();
            let mut batch = 0u64;
            // The batch sent and not yet acknowledged: (batch, token, update).
            let mut pending: Option<(u64, String, Vec<u8>)> = None;
            'connection: loop {
                let mut client = NativeClient::connect(&url, "", client_id).await;
                // Subscribed first (pushes need it); the writer keeps its own text only, so
                // what the resume brings is not applied.
                let resume = ResumeDoc {
                    doc: doc_id.clone(),
                    cursor: 0,
                    state_vector: doc::state_vector(&doc),
                };
                client.send(&ClientFrame::Resume { docs: vec![resume] }).await;
                loop {
                    match client.recv_within(Duration::from_secs(5)).await {
                        Ok(Some(ServerFrame::Resumed { .. })) => break,
                        Ok(Some(other)) => eprintln!("{tag}: while resuming: {other:?}"),
                        Ok(None) | Err(()) => {
                            match next_url.recv().await {
                                Some(next) => url = next,
                                None => return,
                            }
                            continue 'connection;
                        }
                    }
                }
                loop {
                    if pending.is_none() {
                        if task_stop.load(Ordering::SeqCst) {
                            return;
                        }
                        batch += 1;
                        let token = format!("{tag}-{batch};");
                        let update = doc::text_insert(&doc, doc::text_len(&doc), &token).unwrap();
                        pending = Some((batch, token, update));
                    }
                    let (b, token, update) = pending.clone().unwrap();
                    client
                        .send(&ClientFrame::Push {
                            doc: doc_id.clone(),
                            batch: b,
                            update,
                        })
                        .await;
                    let acked = loop {
                        match client.recv_within(Duration::from_secs(5)).await {
                            Ok(Some(ServerFrame::Ack { batch, .. })) if batch == b => break true,
                            Ok(Some(ServerFrame::Error {
                                batch: Some(batch),
                                code,
                                ..
                            })) if batch == b => {
                                eprintln!("{tag}: batch {b} refused: {code:?}; retrying");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                break false;
                            }
                            Ok(Some(_)) => {}
                            Ok(None) | Err(()) => {
                                // The instance is gone (or silent): wait to be moved.
                                match next_url.recv().await {
                                    Some(next) => url = next,
                                    None => return,
                                }
                                continue 'connection;
                            }
                        }
                    };
                    if acked {
                        task_acked.lock().unwrap().push(token);
                        pending = None;
                        tokio::time::sleep(every).await;
                    }
                }
            }
        });
        Writer {
            acked,
            stop,
            urls,
            task,
        }
    }

    fn acked(&self) -> Vec<String> {
        self.acked.lock().unwrap().clone()
    }

    /// Stops after the push in flight is acknowledged.
    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the writer finished its last push")
            .unwrap();
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

/// Waits until every replica holds every token and they hold the same text.
async fn converged(replicas: &[&Replica], tokens: &BTreeSet<String>) -> bool {
    eventually(|| async {
        let texts: Vec<String> = replicas.iter().map(|r| r.text()).collect();
        texts.windows(2).all(|w| w[0] == w[1]) && tokens.iter().all(|t| texts[0].contains(t.as_str()))
    })
    .await
}

/// Waits until every replica holds every token (writers may still be writing).
async fn hold_all(replicas: &[&Replica], tokens: &BTreeSet<String>) -> bool {
    eventually(|| async {
        replicas
            .iter()
            .all(|r| tokens.iter().all(|t| r.text().contains(t.as_str())))
    })
    .await
}

fn report(replicas: &[&Replica], tokens: &BTreeSet<String>) -> String {
    replicas
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let text = r.text();
            let missing: Vec<&String> = tokens.iter().filter(|t| !text.contains(t.as_str())).collect();
            format!("replica {i}: {} bytes, missing {missing:?}", text.len())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ----- the tests -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_room_live_with_native_and_yjs_clients() {
    let Some((pg, redis)) = services() else { return };
    let prefix = unique("ds-test");
    let room = unique("cluster-live");
    let doc_id = DocId::new(room.as_str()).unwrap();
    let a = Instance::start("a", &pg, &redis, &prefix);
    let b = Instance::start("b", &pg, &redis, &prefix);
    let c = Instance::start("c", &pg, &redis, &prefix);

    // A native client with presence on A, a native reader on B and C.
    let on_a = Replica::start(&a.url, &doc_id, 7001, Some(r#"{"name":"ana on A"}"#)).await;
    let on_b = Replica::start(&b.url, &doc_id, 7002, None).await;
    let on_c = Replica::start(&c.url, &doc_id, 7003, None).await;
    let a_session = on_a.session.load(Ordering::SeqCst);
    // Sessions (awareness ids) are unique across instances.
    let sessions: BTreeSet<u64> = [&on_a, &on_b, &on_c]
        .iter()
        .map(|r| r.session.load(Ordering::SeqCst))
        .collect();
    assert_eq!(sessions.len(), 3, "session ids collide across instances: {sessions:?}");

    // Live updates from a writer on A reach the readers on B and C without any resume.
    let writer = Writer::start(&a.url, &doc_id, 7010, "a", Duration::from_millis(20));
    assert!(
        eventually(|| async { writer.acked().len() >= 20 }).await,
        "the writer on A got 20 acknowledgements"
    );
    let tokens: BTreeSet<String> = writer.finish().await.into_iter().collect();
    assert!(
        converged(&[&on_a, &on_b, &on_c], &tokens).await,
        "live updates did not reach every instance:\n{}",
        report(&[&on_a, &on_b, &on_c], &tokens)
    );
    // A published through Redis and C received through it.
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or(0)
    };
    let on_a_metrics = driftsync_tests::http_get(a.addr, "/metrics").await;
    assert!(
        metric(&on_a_metrics, "driftsync_redis_published_total ") >= 20,
        "{on_a_metrics}"
    );
    let on_c_metrics = driftsync_tests::http_get(c.addr, "/metrics").await;
    assert!(
        metric(&on_c_metrics, "driftsync_fanout_messages_in_total ") >= 20,
        "{on_c_metrics}"
    );
    // A's presence reached the readers on B and C.
    for (name, r) in [("B", &on_b), ("C", &on_c)] {
        assert!(
            eventually(|| async { r.presence().get(&a_session).is_some_and(|s| s.contains("ana on A")) }).await,
            "the reader on {name} does not see A's presence: {:?}",
            r.presence()
        );
    }

    // Stock Yjs clients: one on B, then one joining on C sees the native client on A and the
    // Yjs client on B, and the text.
    let Some(modules) = node_modules_dir() else {
        eprintln!("skipped (the Yjs part): node/npm not found");
        return;
    };
    let mut y_b = YClient::start_at(&modules, &b.url, &room).await;
    y_b.command(r#"awareness {"user":{"name":"yan on B"}}"#);
    let expected_text = on_a.text();
    y_b.until("the text on B", |y| y.synced && y.text == expected_text)
        .await;
    let y_b_id = y_b.client_id;
    let mut y_c = YClient::start_at(&modules, &c.url, &room).await;
    y_c.until("the text on C", |y| y.synced && y.text == expected_text)
        .await;
    y_c.until("the presence of A's native client and B's Yjs client", |y| {
        y.awareness
            .get(&a_session)
            .is_some_and(|s| s.to_string().contains("ana on A"))
            && y.awareness
                .get(&y_b_id)
                .is_some_and(|s| s.to_string().contains("yan on B"))
    })
    .await;
    // A Yjs edit on C reaches the native replicas on A and B and the Yjs client on B.
    y_c.command("insert 0 yjs-from-C;");
    let with_c: BTreeSet<String> = tokens.iter().cloned().chain(["yjs-from-C;".to_owned()]).collect();
    assert!(
        converged(&[&on_a, &on_b, &on_c], &with_c).await,
        "the Yjs edit on C did not reach every native replica:\n{}",
        report(&[&on_a, &on_b, &on_c], &with_c)
    );
    y_b.until("C's edit on B", |y| y.text.starts_with("yjs-from-C;")).await;
    drop((a, b, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_during_writes_loses_nothing_acknowledged_and_its_presence_goes() {
    let Some((pg, redis)) = services() else { return };
    let prefix = unique("ds-test");
    let doc_id = DocId::new(unique("cluster-kill")).unwrap();
    let mut a = Instance::start("a", &pg, &redis, &prefix);
    let b = Instance::start("b", &pg, &redis, &prefix);
    let c = Instance::start("c", &pg, &redis, &prefix);
    let on_a = Replica::start(&a.url, &doc_id, 7101, Some(r#"{"name":"on A"}"#)).await;
    let on_b = Replica::start(&b.url, &doc_id, 7102, None).await;
    let on_c = Replica::start(&c.url, &doc_id, 7103, None).await;
    let a_session = on_a.session.load(Ordering::SeqCst);
    assert!(
        eventually(|| async { on_c.presence().contains_key(&a_session) }).await,
        "C sees the presence of A's client"
    );
    let writers = [
        Writer::start(&a.url, &doc_id, 7111, "wa", Duration::from_millis(5)),
        Writer::start(&b.url, &doc_id, 7112, "wb", Duration::from_millis(5)),
        Writer::start(&c.url, &doc_id, 7113, "wc", Duration::from_millis(5)),
    ];
    assert!(
        eventually(|| async { writers.iter().all(|w| w.acked().len() >= 15) }).await,
        "every writer got acknowledgements"
    );
    a.kill();
    // A's clients move to the other instances and resume there.
    writers[0].urls.send(b.url.clone()).await.unwrap();
    on_a.reconnect.send(c.url.clone()).await.unwrap();
    // A's presence disappears from C within the instance timeout (no ghosts).
    assert!(
        eventually(|| async { !on_c.presence().contains_key(&a_session) }).await,
        "A's client is still present on C after A died: {:?}",
        on_c.presence()
    );
    let before = writers[0].acked().len();
    assert!(
        eventually(|| async { writers[0].acked().len() >= before + 10 }).await,
        "A's writer goes on writing on B"
    );
    let mut tokens = BTreeSet::new();
    for w in writers {
        tokens.extend(w.finish().await);
    }
    assert!(
        eventually(|| async { on_a.connected() }).await,
        "A's reader resumed on C"
    );
    assert!(
        converged(&[&on_a, &on_b, &on_c], &tokens).await,
        "replicas lack acknowledged writes after A was killed:\n{}",
        report(&[&on_a, &on_b, &on_c], &tokens)
    );
    // And the store has them: a fresh replica resuming from nothing.
    let fresh = Replica::start(&b.url, &doc_id, 7120, None).await;
    assert!(converged(&[&fresh], &tokens).await, "{}", report(&[&fresh], &tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_and_an_instance_cut_off_from_it_lose_nothing() {
    let Some((pg, _)) = services() else { return };
    let Some(mut redis) = OwnRedis::start().await else {
        return;
    };
    let prefix = unique("ds-test");
    let doc_id = DocId::new(unique("cluster-redis")).unwrap();
    // C reaches Redis through a proxy that can cut it off.
    let proxy = Proxy::start(redis.port).await;
    let a = Instance::start("a", &pg, &redis.url(), &prefix);
    let b = Instance::start("b", &pg, &redis.url(), &prefix);
    let c = Instance::start("c", &pg, &proxy.url(), &prefix);
    let replicas = [
        Replica::start(&a.url, &doc_id, 7201, None).await,
        Replica::start(&b.url, &doc_id, 7202, None).await,
        Replica::start(&c.url, &doc_id, 7203, None).await,
    ];
    let all: Vec<&Replica> = replicas.iter().collect();
    let writers = [
        Writer::start(&a.url, &doc_id, 7211, "wa", Duration::from_millis(20)),
        Writer::start(&b.url, &doc_id, 7212, "wb", Duration::from_millis(20)),
        Writer::start(&c.url, &doc_id, 7213, "wc", Duration::from_millis(20)),
    ];
    let counts = |writers: &[Writer; 3]| -> Vec<usize> { writers.iter().map(|w| w.acked().len()).collect() };
    assert!(
        eventually(|| async { counts(&writers).iter().all(|&n| n >= 10) }).await,
        "every writer got acknowledgements"
    );

    // Redis down for two seconds: local writes keep being acknowledged on every instance.
    redis.down();
    let during = counts(&writers);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = counts(&writers);
    for (i, (d, a)) in during.iter().zip(&after).enumerate() {
        assert!(
            a > d,
            "writer {i} got no acknowledgement while Redis was down ({d} → {a})"
        );
    }
    redis.up().await;
    let tokens: BTreeSet<String> = writers.iter().flat_map(Writer::acked).collect();
    assert!(
        hold_all(&all, &tokens).await,
        "replicas did not catch up after Redis came back:\n{}",
        report(&all, &tokens)
    );

    // C cut off from Redis (not from PostgreSQL) for six seconds, silently (packets vanish, no
    // connection closes): C's writer keeps being acknowledged, and the replicas converge even
    // meanwhile (the head check).
    // What C caught up on from the store: the head check's repairs, and the gaps its own
    // writer's commits found (a commit's cursor beyond the room's head reads the gap first; with
    // C's writer busy, that often comes before the next head check).
    let store_repairs = || async {
        let metrics = driftsync_tests::http_get(c.addr, "/metrics").await;
        let value = |name: &str| -> u64 {
            metrics
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0)
        };
        (
            value("driftsync_head_check_repairs_total "),
            value("driftsync_fanout_repairs_total "),
            metrics,
        )
    };
    let (head_before, gaps_before, _) = store_repairs().await;
    proxy.set_cut(true);
    let during = counts(&writers);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let cut_tokens: BTreeSet<String> = writers.iter().flat_map(Writer::acked).collect();
    assert!(
        counts(&writers)[2] > during[2],
        "C's writer was not acknowledged while cut off"
    );
    assert!(
        hold_all(&all, &cut_tokens).await,
        "the head check did not carry updates across the cut:\n{}",
        report(&all, &cut_tokens)
    );
    // What C caught up on while cut off came from the store, not from Redis.
    let (head_after, gaps_after, metrics) = store_repairs().await;
    assert!(
        head_after + gaps_after > head_before + gaps_before,
        "C repaired nothing from the store while cut off:\n{metrics}"
    );
    println!(
        "while cut off, C repaired {} times by the head check and {} gaps at its own commits",
        head_after - head_before,
        gaps_after - gaps_before
    );
    proxy.set_cut(false);
    // C found the silent cut (its pings went unanswered) and subscribed again once it ended.
    let connects = || async {
        let text = driftsync_tests::http_get(c.addr, "/metrics").await;
        text.lines()
            .find_map(|line| line.strip_prefix("driftsync_redis_connects_total "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(
        eventually(|| async { connects().await >= 2 }).await,
        "C did not reconnect to Redis after the cut ({} connects)",
        connects().await
    );

    let mut tokens = BTreeSet::new();
    for w in writers {
        tokens.extend(w.finish().await);
    }
    assert!(
        converged(&all, &tokens).await,
        "replicas did not converge after C got back:\n{}",
        report(&all, &tokens)
    );
    let per_writer: HashMap<&str, usize> = ["wa", "wb", "wc"]
        .iter()
        .map(|tag| (*tag, tokens.iter().filter(|t| t.starts_with(tag)).count()))
        .collect();
    eprintln!("acknowledged writes: {per_writer:?}");
    drop((a, b, c));
}
