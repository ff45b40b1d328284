//! The y-websocket endpoint against the real thing: a stock Yjs client (yjs + y-websocket 3.x in
//! node, driven through `tests/js/yclient.mjs`) and native clients editing one document, plus
//! raw y-protocols connections for what a stock client never sends (garbage, silence).
//!
//! The node packages are installed at pinned versions on first use into `target/node-yjs/`
//! (git-ignored), so the repository holds no `node_modules`. Without `node` or `npm` the
//! interoperability test prints `skipped: node/npm not found` and passes; the raw-protocol tests
//! need neither.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use driftsync_engine::doc::{self, new_doc};
use driftsync_engine::sync::{apply_remote, Limits};
use driftsync_protocol::lib0;
use driftsync_protocol::yjs::{AwarenessEntry, YMessage};
use driftsync_protocol::{ClientFrame, DocId, ResumeDoc, ServerFrame, DEFAULT_MAX_FRAME_SIZE};
use driftsync_tests::{sqlite_store, NativeClient, TestServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::Doc;

use driftsync_tests::yclient::{node_modules_dir, YClient, STEP};

// ---------------------------------------------------------------------------------------------
// Native clients with a local document.

/// A native client with its replica of one document.
struct Native {
    /// The connection; `None` while offline.
    client: Option<NativeClient>,
    client_id: u64,
    doc_id: DocId,
    doc: Doc,
    /// The last server cursor seen for the document.
    cursor: u64,
    /// Batches acknowledged so far.
    acked: Vec<u64>,
    next_batch: u64,
    /// Presence states of others, by peer.
    presence: HashMap<u64, Option<Value>>,
}

impl Native {
    async fn connect(server: &TestServer, client_id: u64, doc_id: &DocId) -> Native {
        let client = NativeClient::connect(&server.url(), "", client_id).await;
        let doc = new_doc(client_id).expect("client id in range");
        let mut native = Native {
            client: Some(client),
            client_id,
            doc_id: doc_id.clone(),
            doc,
            cursor: 0,
            acked: Vec::new(),
            next_batch: 1,
            presence: HashMap::new(),
        };
        native.resume(None).await;
        native
    }

    /// The connection.
    fn conn(&mut self) -> &mut NativeClient {
        self.client.as_mut().expect("the client is online")
    }

    /// The connection's session id.
    fn session(&self) -> u64 {
        self.client.as_ref().expect("the client is online").session
    }

    /// Resumes the document from the local cursor and state vector, and pushes `offline` (an
    /// edit made while disconnected) if the server turns out to lack it.
    async fn resume(&mut self, offline: Option<Vec<u8>>) {
        let state_vector = doc::state_vector(&self.doc);
        let resume = ResumeDoc {
            doc: self.doc_id.clone(),
            cursor: self.cursor,
            state_vector,
        };
        self.conn().send(&ClientFrame::Resume { docs: vec![resume] }).await;
        let entry = loop {
            match self.conn().recv().await.expect("connection open") {
                ServerFrame::Resumed { mut docs } => break docs.pop().expect("one document resumed"),
                other => self.handle(other),
            }
        };
        if let Some(update) = &entry.update {
            apply_remote(&self.doc, update, &Limits::default()).expect("valid resume update");
        }
        self.cursor = self.cursor.max(entry.cursor);
        if let (Some(_), Some(update)) = (entry.state_vector, offline) {
            self.push(update).await;
        }
    }

    /// Pushes an update and waits for its acknowledgement.
    async fn push(&mut self, update: Vec<u8>) {
        let batch = self.next_batch;
        self.next_batch += 1;
        let doc = self.doc_id.clone();
        self.conn().send(&ClientFrame::Push { doc, batch, update }).await;
        self.until("an acknowledgement", |n| n.acked.contains(&batch)).await;
    }

    /// Edits the local text and pushes the change.
    async fn insert(&mut self, at: u32, chunk: &str) {
        let update = doc::text_insert(&self.doc, at, chunk).expect("insert");
        self.push(update).await;
    }

    fn text(&self) -> String {
        doc::text(&self.doc)
    }

    fn handle(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::Update { cursor, update, .. } => {
                apply_remote(&self.doc, &update, &Limits::default()).expect("valid broadcast update");
                self.cursor = self.cursor.max(cursor);
            }
            ServerFrame::Ack { batch, cursor, .. } => {
                self.acked.push(batch);
                self.cursor = self.cursor.max(cursor);
            }
            ServerFrame::Presence { peer, state, .. } => {
                let state = state.map(|s| serde_json::from_str(&s).expect("presence states are JSON"));
                self.presence.insert(peer, state);
            }
            ServerFrame::Error { code, .. } => panic!("client {} got an error: {code:?}", self.client_id),
            _ => {}
        }
    }

    /// Processes frames until `done` holds, failing the test after [`STEP`].
    async fn until(&mut self, what: &str, mut done: impl FnMut(&Native) -> bool) {
        let deadline = tokio::time::Instant::now() + STEP;
        while !done(self) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.conn().recv_within(left).await {
                Ok(Some(frame)) => self.handle(frame),
                Ok(None) => panic!("client {}: connection closed while waiting for {what}", self.client_id),
                Err(()) => panic!(
                    "client {}: timed out waiting for {what} (text {:?})",
                    self.client_id,
                    self.text()
                ),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A raw y-protocols connection, for what a stock client never sends.

struct RawYjs {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl RawYjs {
    async fn connect(server: &TestServer, room: &str) -> RawYjs {
        let (ws, _) = tokio_tungstenite::connect_async(format!("{}/yjs/{room}", server.url()))
            .await
            .expect("connect");
        RawYjs { ws }
    }

    async fn send(&mut self, message: &YMessage) {
        self.send_raw(message.encode()).await;
    }

    async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).await.expect("send");
    }

    /// The next y-protocols message (the heartbeat's empty awareness messages skipped), or
    /// `None` once the connection closed.
    async fn recv(&mut self) -> Option<YMessage> {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("timed out waiting for a message");
            match next {
                Some(Ok(Message::Binary(bytes))) => {
                    let message = YMessage::decode(&bytes, DEFAULT_MAX_FRAME_SIZE).expect("one message per frame");
                    if message == YMessage::Awareness(Vec::new()) {
                        continue;
                    }
                    return Some(message);
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Receives until `pick` returns `Some`.
    async fn recv_until<T>(&mut self, mut pick: impl FnMut(&YMessage) -> Option<T>) -> T {
        loop {
            let message = self.recv().await.expect("connection closed while waiting");
            if let Some(found) = pick(&message) {
                return found;
            }
        }
    }

    /// The close code, skipping everything before the close.
    async fn close_code(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await.ok()? {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }
}

fn doc_id(s: &str) -> DocId {
    DocId::new(s).expect("valid id")
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// Two native clients and a stock Yjs client converge on one document, also across an offline
/// edit and a resume, and see each other's presence until the Yjs client is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_and_stock_yjs_clients_converge_and_share_presence() {
    let Some(modules) = tokio::task::spawn_blocking(node_modules_dir).await.expect("setup task") else {
        println!("skipped: node/npm not found");
        return;
    };
    let started = Instant::now();
    let (_dir, store) = sqlite_store().await;
    let server = TestServer::start(store, Default::default()).await;
    let room = "notes/interop";
    let d = doc_id(room);

    let mut a = Native::connect(&server, 11, &d).await;
    let mut b = Native::connect(&server, 12, &d).await;
    let mut y = YClient::start(&modules, &server, room).await;
    y.until("the first sync", |y| y.synced).await;

    // Native to Yjs and native.
    a.insert(0, "hello").await;
    b.until("a's edit", |b| b.text() == "hello").await;
    y.until("a's edit", |y| y.text == "hello").await;

    // Yjs to native.
    y.command("insert 5  world");
    a.until("y's edit", |a| a.text() == "hello world").await;
    b.until("y's edit", |b| b.text() == "hello world").await;

    // Presence, both ways: the Yjs client's awareness reaches both native clients as presence
    // frames (peer = its client id); a native client's presence reaches the Yjs client as an
    // awareness state (client id = the native session id).
    y.command(r#"awareness {"name":"yjs","cursor":3}"#);
    let yjs_state = serde_json::json!({"name": "yjs", "cursor": 3});
    let yid = y.client_id;
    a.until("y's awareness", |a| {
        a.presence.get(&yid) == Some(&Some(yjs_state.clone()))
    })
    .await;
    b.until("y's awareness", |b| {
        b.presence.get(&yid) == Some(&Some(yjs_state.clone()))
    })
    .await;
    a.conn()
        .send(&ClientFrame::Presence {
            doc: d.clone(),
            state: Some(r#"{"name":"a"}"#.into()),
        })
        .await;
    let a_session = a.session();
    y.until("a's presence", |y| {
        y.awareness.get(&a_session) == Some(&serde_json::json!({"name": "a"}))
    })
    .await;
    b.until("a's presence", |b| {
        b.presence.get(&a_session).is_some_and(Option::is_some)
    })
    .await;

    // b goes offline; meanwhile a and the Yjs client edit, and b edits offline.
    let b_session = b.session();
    b.client = None;
    a.insert(0, "A: ").await;
    y.until("a's offline-time edit", |y| y.text == "A: hello world").await;
    y.command("insert 14 !");
    a.until("y's offline-time edit", |a| a.text() == "A: hello world!")
        .await;
    let offline = doc::text_insert(&b.doc, 0, "B: ").expect("offline edit");
    assert_eq!(b.text(), "B: hello world");

    // b reconnects and resumes from its cursor and state vector, then pushes its offline edit.
    b.client = Some(NativeClient::connect(&server.url(), "", 12).await);
    assert_ne!(b.session(), b_session);
    b.presence.clear();
    b.resume(Some(offline)).await;
    let merged = b.text();
    assert!(
        merged.contains("A: ") && merged.contains("B: ") && merged.ends_with("hello world!"),
        "{merged:?}"
    );
    a.until("the merged text", |a| a.text() == merged).await;
    y.until("the merged text", |y| y.text == merged).await;

    // A resumed client is told who is there right after its Resumed frame.
    b.until("the current presence", |b| {
        b.presence.get(&yid) == Some(&Some(yjs_state.clone()))
            && b.presence.get(&a_session).is_some_and(Option::is_some)
    })
    .await;

    // The Yjs client dies without a goodbye: its awareness state is removed and announced.
    y.kill();
    a.until("y's departure", |a| a.presence.get(&yid) == Some(&None)).await;
    b.until("y's departure", |b| b.presence.get(&yid) == Some(&None)).await;

    // A new stock client syncs the document from the server alone, and gets the presence of
    // those there (the awareness message in its own frame after the SyncStep1).
    let mut y2 = YClient::start(&modules, &server, room).await;
    y2.until("the stored document", |y| y.synced && y.text == merged).await;
    y2.until("a's presence", |y| {
        y.awareness.get(&a_session) == Some(&serde_json::json!({"name": "a"}))
    })
    .await;
    drop(y2);
    server.stop().await;
    println!(
        "interop scenario took {:.1} s (after the npm setup)",
        started.elapsed().as_secs_f64()
    );
}

/// Garbage on `/yjs` (random frames, unknown message types, an invalid update inside
/// `[0,2,…]`, a bad state vector, bad awareness) leaves the connection, the room and the other
/// clients healthy; an update the server cannot integrate closes only the sender, for a resync.
#[tokio::test]
async fn garbage_on_yjs_leaves_the_room_and_other_clients_healthy() {
    let (_dir, store) = sqlite_store().await;
    let server = TestServer::start(store, Default::default()).await;
    let room = "notes/yjs-garbage";
    let d = doc_id(room);
    let mut native = Native::connect(&server, 41, &d).await;
    let mut bad = RawYjs::connect(&server, room).await;
    assert!(matches!(bad.recv().await, Some(YMessage::SyncStep1(_))));

    let mut seed = 0x0bad_5eed_u64;
    let mut random = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (seed >> 56) as u8
            })
            .collect()
    };
    for len in [1usize, 2, 3, 7, 64, 1000] {
        bad.send_raw(random(len)).await;
    }
    let wrapped = |prefix: &[u8], payload: &[u8]| {
        let mut frame = prefix.to_vec();
        lib0::write_var_buf(&mut frame, payload);
        frame
    };
    bad.send_raw(wrapped(&[0, 2], &[0xff; 40])).await; // An update that is not a yrs update.
    bad.send_raw(wrapped(&[0, 1], &random(50))).await; // A SyncStep2 of random bytes.
    bad.send_raw(wrapped(&[0, 0], &[0xff; 12])).await; // A state vector that is not one.
    bad.send_raw(wrapped(&[0, 9], &[1, 2, 3])).await; // An unknown sync sub-type.
    bad.send_raw(wrapped(&[1], &[1, 7, 1, 3, b'{', b'x', b'x'])).await; // Awareness, state not JSON.
    bad.send_raw(vec![1, 10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f])
        .await; // A huge count.
    bad.send_raw(vec![0, 2, 5, 0, 0]).await; // A length beyond the frame.
    bad.send_raw(vec![2, 7]).await; // An unknown auth sub-type.
    bad.send_raw(Vec::new()).await;

    // The bad connection still works: its next real update is stored and reaches the native
    // client, and it still answers a SyncStep1.
    let local = new_doc(42).expect("client id");
    let update = doc::text_insert(&local, 0, "still fine").expect("insert");
    bad.send(&YMessage::Update(update)).await;
    native.until("the good update", |n| n.text() == "still fine").await;
    bad.send(&YMessage::SyncStep1(vec![0])).await;
    let step2 = bad
        .recv_until(|m| {
            if let YMessage::SyncStep2(u) = m {
                Some(u.clone())
            } else {
                None
            }
        })
        .await;
    let replica = new_doc(43).expect("client id");
    apply_remote(&replica, &step2, &Limits::default()).expect("valid SyncStep2");
    assert_eq!(doc::text(&replica), "still fine");

    // Native edits keep flowing to it as `[0,2]` updates.
    native.insert(10, "!").await;
    let update = bad
        .recv_until(|m| {
            if let YMessage::Update(u) = m {
                Some(u.clone())
            } else {
                None
            }
        })
        .await;
    apply_remote(&replica, &update, &Limits::default()).expect("valid update");
    assert_eq!(doc::text(&replica), "still fine!");

    // An update whose predecessors the server lacks cannot be stored; the sender is closed with
    // "resync" (its next sync repairs it), everyone else carries on.
    let ahead = new_doc(44).expect("client id");
    doc::text_insert(&ahead, 0, "first").expect("insert");
    let gap = doc::text_insert(&ahead, 5, " second").expect("insert");
    bad.send(&YMessage::Update(gap)).await;
    assert_eq!(bad.close_code().await, Some(driftsync_protocol::CLOSE_RESYNC));
    native.insert(0, ">").await;
    let mut fresh = RawYjs::connect(&server, room).await;
    let sv = fresh
        .recv_until(|m| {
            if let YMessage::SyncStep1(sv) = m {
                Some(sv.clone())
            } else {
                None
            }
        })
        .await;
    assert_eq!(
        doc::decode_state_vector(&sv).expect("a state vector"),
        doc::decode_state_vector(&doc::state_vector(&native.doc)).expect("a state vector")
    );
    fresh.send(&YMessage::SyncStep1(vec![0])).await;
    let step2 = fresh
        .recv_until(|m| {
            if let YMessage::SyncStep2(u) = m {
                Some(u.clone())
            } else {
                None
            }
        })
        .await;
    let replica = new_doc(45).expect("client id");
    apply_remote(&replica, &step2, &Limits::default()).expect("valid SyncStep2");
    assert_eq!(doc::text(&replica), ">still fine!");
    server.stop().await;
}

/// The document id is the raw rest of the path; one that is not a valid id is refused with a
/// protocol-error close. Awareness from a raw client reaches native clients and is removed when
/// it disconnects; a SyncStep2 that adds nothing is not stored.
#[tokio::test]
async fn yjs_paths_awareness_and_redundant_sync() {
    let (_dir, store) = sqlite_store().await;
    let server = TestServer::start(store, Default::default()).await;

    let mut refused = RawYjs::connect(&server, &"x".repeat(600)).await;
    assert_eq!(
        refused.close_code().await,
        Some(driftsync_protocol::CLOSE_PROTOCOL_ERROR)
    );

    // Percent escapes are part of the name, as with the reference server.
    let room = "team/a%20b/notes";
    let d = doc_id(room);
    let mut native = Native::connect(&server, 51, &d).await;
    let mut raw = RawYjs::connect(&server, room).await;
    assert!(matches!(raw.recv().await, Some(YMessage::SyncStep1(_))));
    let state = r#"{"user":"raw"}"#;
    raw.send(&YMessage::Awareness(vec![AwarenessEntry {
        client_id: 777,
        clock: 1,
        state: Some(state.into()),
    }]))
    .await;
    native
        .until("the raw client's awareness", |n| {
            n.presence.get(&777).is_some_and(Option::is_some)
        })
        .await;
    // The sender gets its own state back, as from the reference server.
    let echoed = raw
        .recv_until(|m| {
            if let YMessage::Awareness(e) = m {
                Some(e.clone())
            } else {
                None
            }
        })
        .await;
    assert_eq!(
        echoed,
        vec![AwarenessEntry {
            client_id: 777,
            clock: 1,
            state: Some(state.into())
        }]
    );

    native.insert(0, "abc").await;
    let head = native.cursor;
    // A SyncStep2 holding only what the server has (deletions included) is not stored.
    let copy = new_doc(52).expect("client id");
    apply_remote(&copy, &doc::encode_state(&native.doc), &Limits::default()).expect("copy");
    let deletion = doc::text_delete(&native.doc, 0, 1).expect("delete");
    native.push(deletion.clone()).await;
    apply_remote(&copy, &deletion, &Limits::default()).expect("copy");
    raw.send(&YMessage::SyncStep2(doc::encode_state(&copy))).await;
    // A query answers with every state, proving the SyncStep2 was handled before it.
    raw.send(&YMessage::QueryAwareness).await;
    let states = raw
        .recv_until(|m| {
            if let YMessage::Awareness(e) = m {
                Some(e.clone())
            } else {
                None
            }
        })
        .await;
    assert_eq!(states.len(), 1);
    native.insert(0, "z").await;
    assert_eq!(native.cursor, head + 2, "the redundant SyncStep2 took no cursor");

    drop(raw);
    native
        .until("the raw client's departure", |n| n.presence.get(&777) == Some(&None))
        .await;
    server.stop().await;
}

/// The server pings y-websocket connections with WebSocket pings (and an empty awareness
/// message the client's watchdog sees), and closes a connection silent for three heartbeats.
#[tokio::test]
async fn yjs_heartbeat_keeps_live_peers_and_closes_silent_ones() {
    let (_dir, store) = sqlite_store().await;
    let config = driftsync_server::Config {
        heartbeat: Duration::from_millis(100),
        ..Default::default()
    };
    let server = TestServer::start(store, config).await;

    // A live peer (tungstenite answers pings while it reads) outlives several heartbeats.
    let mut live = RawYjs::connect(&server, "hb/live").await;
    let (mut pings, mut keepalives) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(next) = tokio::time::timeout_at(deadline, live.ws.next()).await {
        match next {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Binary(bytes))) => {
                if YMessage::decode(&bytes, DEFAULT_MAX_FRAME_SIZE) == Ok(YMessage::Awareness(Vec::new())) {
                    keepalives += 1;
                }
            }
            other => panic!("the live connection ended: {other:?}"),
        }
    }
    assert!(pings >= 3 && keepalives >= 3, "{pings} pings, {keepalives} keepalives");

    // A peer that never reads never answers pings: it is closed, which a native client of the
    // same document sees as the removal of the peer's awareness state. (Reading would answer the
    // pings, so the silent peer is observed only through the native client until it is closed.)
    let d = doc_id("hb/silent");
    let mut native = Native::connect(&server, 61, &d).await;
    let mut silent = RawYjs::connect(&server, "hb/silent").await;
    silent
        .send(&YMessage::Awareness(vec![AwarenessEntry {
            client_id: 888,
            clock: 0,
            state: Some("{}".into()),
        }]))
        .await;
    native
        .until("the silent peer's awareness", |n| {
            n.presence.get(&888).is_some_and(Option::is_some)
        })
        .await;
    native
        .until("the silent peer's removal", |n| n.presence.get(&888) == Some(&None))
        .await;
    // Its connection is over: a close frame, or (its late pongs having met a closed socket) a
    // reset before it.
    let code = silent.close_code().await;
    assert!(
        matches!(code, None | Some(driftsync_protocol::CLOSE_GOING_AWAY)),
        "{code:?}"
    );
    server.stop().await;
}

/// The stock client closes a connection that brought it no message for 30 s, and WebSocket pings
/// are not messages to it: the server's heartbeat must reach its message handler even when the
/// document and the awareness are quiet (here the client has no awareness state, so nothing is
/// echoed to it either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_client_watchdog_is_fed_by_the_heartbeat() {
    let Some(modules) = tokio::task::spawn_blocking(node_modules_dir).await.expect("setup task") else {
        println!("skipped: node/npm not found");
        return;
    };
    let (_dir, store) = sqlite_store().await;
    let config = driftsync_server::Config {
        heartbeat: Duration::from_millis(100),
        ..Default::default()
    };
    let server = TestServer::start(store, config).await;
    let mut y = YClient::start(&modules, &server, "quiet/doc").await;
    y.until("the first sync", |y| y.synced).await;
    y.command("awareness null");
    y.command("watchdog");
    y.until("a watchdog report", |y| y.watchdog.is_some()).await;
    let (first, _) = y.watchdog.expect("reported");
    // Poll until the last-message time has moved on by a second of heartbeats, on one connection.
    let deadline = Instant::now() + STEP;
    loop {
        y.watchdog = None;
        y.command("watchdog");
        y.until("a watchdog report", |y| y.watchdog.is_some()).await;
        let (last, connected) = y.watchdog.expect("reported");
        assert!(connected, "the stock client lost its connection");
        if last >= first + 1_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stock client received nothing since {first} (last {last})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(y);
    server.stop().await;
}

/// Typing crosses protocols both ways: a native connection's typing shows in its awareness
/// state (`"typing": true`) for Yjs clients, and a Yjs client's `typing` field reaches native
/// connections as typing frames (the web app relies on both).
#[tokio::test]
async fn typing_crosses_between_native_and_yjs_clients() {
    let (_dir, store) = sqlite_store().await;
    let server = TestServer::start(store, Default::default()).await;
    let d = doc_id("chat/typing");
    let mut native = NativeClient::connect(&server.url(), "", 31).await;
    native
        .send(&ClientFrame::Resume {
            docs: vec![ResumeDoc {
                doc: d.clone(),
                cursor: 0,
                state_vector: vec![0],
            }],
        })
        .await;
    native
        .recv_until(|f| matches!(f, ServerFrame::Resumed { .. }).then_some(()))
        .await;
    let mut yjs = RawYjs::connect(&server, "chat/typing").await;
    yjs.recv_until(|m| matches!(m, YMessage::SyncStep1(_)).then_some(()))
        .await;
    let session = native.session;

    // Native → Yjs: the session's awareness entry says it is typing, then no longer.
    native
        .send(&ClientFrame::Presence {
            doc: d.clone(),
            state: Some(r#"{"user":"ada"}"#.into()),
        })
        .await;
    native
        .send(&ClientFrame::Typing {
            doc: d.clone(),
            typing: true,
        })
        .await;
    let state_of = |m: &YMessage| match m {
        YMessage::Awareness(entries) => entries
            .iter()
            .find(|e| e.client_id == session)
            .and_then(|e| e.state.as_deref())
            .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()),
        _ => None,
    };
    let typing = yjs.recv_until(|m| state_of(m).filter(|s| s["typing"] == true)).await;
    assert_eq!(typing["user"], "ada");
    native
        .send(&ClientFrame::Typing {
            doc: d.clone(),
            typing: false,
        })
        .await;
    let idle = yjs
        .recv_until(|m| state_of(m).filter(|s| s.get("typing").is_none()))
        .await;
    assert_eq!(idle, serde_json::json!({"user": "ada"}));

    // Yjs → native: typing frames from the Yjs client's awareness, on changes only.
    let entry = |clock: u64, state: &str| {
        YMessage::Awareness(vec![AwarenessEntry {
            client_id: 4242,
            clock,
            state: Some(state.into()),
        }])
    };
    yjs.send(&entry(1, r#"{"user":{"name":"bob"},"typing":true}"#)).await;
    let typing = |f: &ServerFrame| match f {
        ServerFrame::Typing { peer, typing, .. } => Some((*peer, *typing)),
        _ => None,
    };
    assert_eq!(native.recv_until(typing).await, (4242, true));
    yjs.send(&entry(2, r#"{"user":{"name":"bob"},"typing":false}"#)).await;
    assert_eq!(native.recv_until(typing).await, (4242, false));
    server.stop().await;
}
