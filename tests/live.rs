//! The client's live session against a real server: live updates, acknowledgements, typing and
//! presence between two devices; reconnection with a fresh token after the server restarts;
//! pause and resume; backoff against a server that is down; a dead connection found by
//! heartbeats.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use driftsync_client::{Backoff, Client, ConnectionState, Event, Events, Options, Session};
use driftsync_engine::store::Store;
use driftsync_tests::{sqlite_store, TestServer, TIMEOUT};

const ROOM: &str = "chat/live";

/// Waits for the first event `pick` accepts.
async fn until<T>(events: &mut Events, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            let event = events.recv().await.expect("the session stopped");
            if let Some(found) = pick(&event) {
                return found;
            }
        }
    })
    .await
    .expect("no such event in time")
}

async fn synced(session: &Session) {
    let state = tokio::time::timeout(TIMEOUT, session.wait_for(|s| s == ConnectionState::Synced))
        .await
        .expect("synced in time");
    assert_eq!(state, ConnectionState::Synced);
}

async fn texts(session: &Session) -> Vec<String> {
    let mut client = session.client().await;
    client
        .chat_messages(ROOM)
        .await
        .unwrap()
        .into_iter()
        .map(|(m, _)| m.text)
        .collect()
}

const SECRET: &str = "live-test-secret";

fn token(user: &str) -> String {
    driftsync_server::mint(SECRET, user, &["*".into()], true, Duration::from_secs(3600)).unwrap()
}

#[tokio::test]
async fn live_updates_acks_typing_and_presence() {
    let dir = tempfile::tempdir().unwrap();
    let (_server_dir, store) = sqlite_store().await;
    let config = driftsync_server::Config {
        auth: driftsync_server::Auth::new(Some(SECRET)),
        ..Default::default()
    };
    let server = TestServer::start(store, config).await;
    let ada = Client::open(dir.path().join("ada.db"), "ada").await.unwrap();
    let bob = Client::open(dir.path().join("bob.db"), "bob").await.unwrap();
    let ada = Session::start(ada, Options::new(server.url()).token(token("ada")).documents([ROOM]));
    let bob = Session::start(bob, Options::new(server.url()).token(token("bob")).documents([ROOM]));
    let mut ada_events = ada.events();
    let mut bob_events = bob.events();
    synced(&ada).await;
    synced(&bob).await;

    // A message: acknowledged for the sender, delivered live to the other device.
    let id = ada.chat_send(ROOM, "hello bob").await.unwrap();
    until(&mut ada_events, |e| {
        matches!(e, Event::Acknowledged { doc, .. } if doc == ROOM).then_some(())
    })
    .await;
    until(&mut bob_events, |e| {
        matches!(e, Event::RemoteChange { doc } if doc == ROOM).then_some(())
    })
    .await;
    assert_eq!(texts(&bob).await, vec!["hello bob"]);
    let listed = ada.client().await.chat_list(ROOM).await.unwrap();
    assert!(listed[0].delivered, "acknowledged messages are delivered");

    // Bob's device recorded that it has the message (a delivery receipt), and read receipts
    // travel the same way: each is a remote change for Ada, in either order.
    bob.chat_mark_read(ROOM, Some(&id)).await.unwrap();
    loop {
        until(&mut ada_events, |e| {
            matches!(e, Event::RemoteChange { doc } if doc == ROOM).then_some(())
        })
        .await;
        let listed = ada.client().await.chat_list(ROOM).await.unwrap();
        if listed[0].read_by == vec!["bob".to_string()] {
            assert_eq!(listed[0].delivered_to, vec!["bob".to_string()]);
            assert_eq!(listed[0].delivery(), "read");
            break;
        }
    }

    // Typing: announced on the first keystroke, throttled afterwards, cleared on send.
    bob.keystroke(ROOM).await.unwrap();
    bob.keystroke(ROOM).await.unwrap();
    let (user, typing) = until(&mut ada_events, |e| match e {
        Event::Typing { user, typing, .. } => Some((user.clone(), *typing)),
        _ => None,
    })
    .await;
    assert_eq!((user.as_str(), typing), ("bob", true));
    bob.chat_send(ROOM, "hi ada").await.unwrap();
    let typing = until(&mut ada_events, |e| match e {
        Event::Typing { typing, .. } => Some(*typing),
        _ => None,
    })
    .await;
    assert!(!typing, "sending a message ends typing");

    // Presence: set, seen by the other device, removed when the session ends.
    ada.set_presence(ROOM, Some(r#"{"status":"here"}"#.into()))
        .await
        .unwrap();
    let state = until(&mut bob_events, |e| match e {
        Event::Presence { user, state, .. } if user == "ada" => Some(state.clone()),
        _ => None,
    })
    .await;
    assert_eq!(state.as_deref(), Some(r#"{"status":"here"}"#));
    ada.shutdown().await.unwrap();
    let state = until(&mut bob_events, |e| match e {
        Event::Presence { user, state, .. } if user == "ada" => Some(state.clone()),
        _ => None,
    })
    .await;
    assert_eq!(state, None, "no ghost: presence leaves with the connection");
    assert_eq!(ada.state(), ConnectionState::Stopped);
    bob.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn reconnects_with_a_fresh_token_and_sends_offline_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (_server_dir, store) = sqlite_store().await;
    let server = TestServer::start(store.clone(), Default::default()).await;
    let addr = server.addr;
    let url = server.url();
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let options = Options::new(url.clone())
        .backoff(Backoff::new(Duration::from_millis(20), Duration::from_millis(200)))
        .token_refresh(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok(format!("token-{n}")) }
        });
    let ada = Session::start(Client::open(dir.path().join("ada.db"), "ada").await.unwrap(), options);
    let mut events = ada.events();
    ada.chat_send(ROOM, "before").await.unwrap();
    synced(&ada).await;
    assert_eq!(asked.load(Ordering::SeqCst), 1);

    // The server goes away; writes keep working and are stored.
    server.stop().await;
    until(&mut events, |e| matches!(e, Event::Disconnected { .. }).then_some(())).await;
    ada.chat_send(ROOM, "while offline 1").await.unwrap();
    ada.text_append("notes/offline", "written offline").await.unwrap();
    ada.chat_send(ROOM, "while offline 2").await.unwrap();
    assert_ne!(ada.state(), ConnectionState::Synced);

    // It comes back where it was: the session reconnects with a new token and catches up.
    let server = TestServer::start_at(store, Default::default(), addr).await;
    until(&mut events, |e| matches!(e, Event::Connected { .. }).then_some(())).await;
    synced(&ada).await;
    assert!(
        asked.load(Ordering::SeqCst) >= 2,
        "the token source is asked on every attempt"
    );

    // A fresh device sees everything the first one wrote.
    let carl = Client::open(dir.path().join("carl.db"), "carl").await.unwrap();
    let carl = Session::start(carl, Options::new(url.clone()).documents([ROOM, "notes/offline"]));
    synced(&carl).await;
    assert_eq!(texts(&carl).await, vec!["before", "while offline 1", "while offline 2"]);
    assert_eq!(
        carl.client().await.text("notes/offline").await.unwrap(),
        "written offline"
    );
    ada.shutdown().await.unwrap();
    carl.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn pause_flushes_and_resume_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let (_server_dir, store) = sqlite_store().await;
    let server = TestServer::start(store, Default::default()).await;
    let ada = Session::start(
        Client::open(dir.path().join("ada.db"), "ada").await.unwrap(),
        Options::new(server.url()).documents([ROOM]),
    );
    let bob = Session::start(
        Client::open(dir.path().join("bob.db"), "bob").await.unwrap(),
        Options::new(server.url()).documents([ROOM]),
    );
    synced(&ada).await;
    synced(&bob).await;

    // Written just before going to the background: pause pushes it and waits for the ack.
    ada.chat_send(ROOM, "last words").await.unwrap();
    ada.pause().await.unwrap();
    assert_eq!(ada.state(), ConnectionState::Paused);
    let outbox = ada.client().await.store().outbox(Some(ROOM)).await.unwrap();
    assert!(outbox.is_empty(), "pause flushed the outbox: {} left", outbox.len());

    // In the background: others write, and so does the app (stored, not sent).
    let mut bob_events = bob.events();
    while texts(&bob).await.is_empty() {
        until(&mut bob_events, |e| {
            matches!(e, Event::RemoteChange { .. }).then_some(())
        })
        .await;
    }
    bob.chat_send(ROOM, "while ada was away").await.unwrap();
    until(&mut bob_events, |e| {
        matches!(e, Event::Acknowledged { .. }).then_some(())
    })
    .await;
    ada.chat_send(ROOM, "queued in background").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ada.state(), ConnectionState::Paused, "paused sessions stay offline");
    assert_eq!(texts(&bob).await, vec!["last words", "while ada was away"]);

    let mut bob_events = bob.events();
    ada.resume().await.unwrap();
    synced(&ada).await;
    until(&mut bob_events, |e| {
        matches!(e, Event::RemoteChange { .. }).then_some(())
    })
    .await;
    // The two background messages are concurrent (neither device had seen the other's): their
    // order is the deterministic HLC order, the same on both devices, whatever it is.
    let on_ada = texts(&ada).await;
    assert_eq!(on_ada, texts(&bob).await);
    assert_eq!(on_ada.len(), 3);
    assert_eq!(on_ada[0], "last words", "causally first");
    assert!(on_ada.contains(&"while ada was away".to_string()));
    assert!(on_ada.contains(&"queued in background".to_string()));
    ada.shutdown().await.unwrap();
    bob.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn backoff_against_a_server_that_is_down() {
    // A port nothing listens on.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let options = Options::new(format!("ws://{addr}"))
        .backoff(Backoff::new(Duration::from_millis(10), Duration::from_millis(80)))
        .token_refresh(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok(String::new()) }
        });
    let session = Session::start(Client::open(dir.path().join("c.db"), "c").await.unwrap(), options);
    let mut events = session.events();
    let mut delays = Vec::new();
    while delays.len() < 12 {
        let delay = until(&mut events, |e| match e {
            Event::Disconnected { retry_in, .. } => Some(*retry_in),
            _ => None,
        })
        .await;
        delays.push(delay.expect("a retry is planned while the server is down"));
    }
    // Ceilings 10, 20, 40, 80, 80, … ms; every delay is random below its ceiling.
    let ceilings = [10u64, 20, 40, 80, 80, 80, 80, 80, 80, 80, 80, 80];
    for (delay, ceiling) in delays.iter().zip(ceilings) {
        assert!(delay.as_millis() as u64 <= ceiling, "{delays:?}");
    }
    let capped = &delays[4..];
    assert!(
        capped.iter().any(|d| *d != capped[0]),
        "jittered, not fixed: {delays:?}"
    );
    assert!(
        asked.load(Ordering::SeqCst) >= 12,
        "a token is asked for on every attempt"
    );
    // resume() skips the wait; writes still work offline.
    session.chat_send(ROOM, "offline").await.unwrap();
    session.resume().await.unwrap();
    session.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_silent_server_is_detected_by_heartbeats() {
    use driftsync_protocol::{ClientFrame, ServerFrame, DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION};
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    // A server that welcomes with a 500 ms heartbeat, then never says anything again.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            if let Some(Ok(Message::Binary(hello))) = ws.next().await {
                assert!(matches!(
                    ClientFrame::decode(&hello, DEFAULT_MAX_FRAME_SIZE),
                    Ok(ClientFrame::Hello { .. })
                ));
                let welcome = ServerFrame::Welcome {
                    version: PROTOCOL_VERSION,
                    max_frame_size: DEFAULT_MAX_FRAME_SIZE as u32,
                    session: 7,
                    heartbeat_ms: 500,
                };
                ws.send(Message::Binary(welcome.encode().into())).await.unwrap();
            }
            held.push(ws); // keep the socket open, read nothing
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let session = Session::start(
        Client::open(dir.path().join("c.db"), "c").await.unwrap(),
        Options::new(format!("ws://{addr}")),
    );
    let mut events = session.events();
    until(&mut events, |e| {
        matches!(e, Event::Connected { session: 7 }).then_some(())
    })
    .await;
    let reason = until(&mut events, |e| match e {
        Event::Disconnected { reason, .. } => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert!(reason.contains("silent"), "{reason}");
    session.shutdown().await.unwrap();
    silent.abort();
}

#[tokio::test]
async fn a_resync_close_is_answered_by_resuming_at_once() {
    use driftsync_protocol::{ClientFrame, ServerFrame, CLOSE_RESYNC, DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION};
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    use tokio_tungstenite::tungstenite::Message;

    // A server that welcomes, waits for the resume, then closes with 4000 "resync"; it reports
    // each resume it receives.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (resumes_tx, mut resumes) = tokio::sync::mpsc::channel::<usize>(16);
    let server = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let _hello = ws.next().await;
            let welcome = ServerFrame::Welcome {
                version: PROTOCOL_VERSION,
                max_frame_size: DEFAULT_MAX_FRAME_SIZE as u32,
                session: 1,
                heartbeat_ms: 15_000,
            };
            ws.send(Message::Binary(welcome.encode().into())).await.unwrap();
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Binary(bytes) = msg {
                    if let Ok(ClientFrame::Resume { docs }) = ClientFrame::decode(&bytes, DEFAULT_MAX_FRAME_SIZE) {
                        let _ = resumes_tx.send(docs.len()).await;
                        let close = CloseFrame {
                            code: CloseCode::from(CLOSE_RESYNC),
                            reason: "resync".into(),
                        };
                        let _ = ws.send(Message::Close(Some(close))).await;
                        break;
                    }
                }
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut client = Client::open(dir.path().join("c.db"), "c").await.unwrap();
    client.text_append("notes/a", "x").await.unwrap();
    // A slow backoff: only a resync may reconnect quickly.
    let options =
        Options::new(format!("ws://{addr}")).backoff(Backoff::new(Duration::from_secs(30), Duration::from_secs(60)));
    let session = Session::start(client, options);
    let mut events = session.events();
    for _ in 0..3 {
        let docs = tokio::time::timeout(TIMEOUT, resumes.recv()).await.unwrap().unwrap();
        assert_eq!(docs, 1, "every connection resumes every known document");
        let (reason, retry_in) = until(&mut events, |e| match e {
            Event::Disconnected { reason, retry_in } => Some((reason.clone(), *retry_in)),
            _ => None,
        })
        .await;
        assert!(reason.contains("resync"), "{reason}");
        assert!(
            retry_in.unwrap() <= Duration::from_millis(250),
            "a resync reconnects at once, not after the backoff: {retry_in:?}"
        );
    }
    session.shutdown().await.unwrap();
    server.abort();
}

/// Updates reach other subscribers before their commit. When the commit then fails, a reader
/// holds a change the store lacks; the pusher (never acknowledged) may never come back. The room
/// keeps the change and stores it itself at its next use once the store works again (here the
/// reader's resume), so no reader keeps a change the server lost — and nobody relays another's
/// changes (ARCHITECTURE.md, "Authorship").
#[tokio::test]
async fn a_change_whose_commit_failed_is_stored_though_its_pusher_is_gone() {
    use driftsync_engine::doc::{self, new_doc};
    use driftsync_protocol::{ClientFrame, DocId, ErrorCode, ServerFrame};
    use driftsync_tests::{eventually, FlakyStore, NativeClient};
    use std::sync::atomic::AtomicBool;

    const DOC: &str = "notes/flaky";
    let dir = tempfile::tempdir().unwrap();
    let (_server_dir, inner) = sqlite_store().await;
    let fail = Arc::new(AtomicBool::new(false));
    let store = FlakyStore {
        inner,
        fail: Arc::clone(&fail),
    };
    let server = TestServer::start(store, Default::default()).await;
    let d = DocId::new(DOC).unwrap();
    let mut writer = NativeClient::connect(&server.url(), "", 71).await;
    writer.resume_from_scratch(&d).await;
    let bob = Client::open(dir.path().join("bob.db"), "bob").await.unwrap();
    let bob = Session::start(bob, Options::new(server.url()).documents([DOC]));
    let mut bob_events = bob.events();
    synced(&bob).await;

    fail.store(true, Ordering::SeqCst);
    let local = new_doc(71).unwrap();
    let update = doc::text_insert(&local, 0, "hello").unwrap();
    writer
        .send(&ClientFrame::Push {
            doc: d.clone(),
            batch: 1,
            update,
        })
        .await;
    let refused = writer
        .recv_until(|f| matches!(f, ServerFrame::Error { .. }).then(|| f.clone()))
        .await;
    assert_eq!(
        refused,
        ServerFrame::Error {
            code: ErrorCode::StoreUnavailable,
            doc: Some(d.clone()),
            batch: Some(1)
        }
    );
    until(&mut bob_events, |e| {
        matches!(e, Event::RemoteChange { doc } if doc == DOC).then_some(())
    })
    .await;
    assert_eq!(bob.client().await.text(DOC).await.unwrap(), "hello");

    // The writer is gone for good with its batch unacknowledged; the disk recovers.
    drop(writer);
    fail.store(false, Ordering::SeqCst);
    bob.pause().await.unwrap();
    bob.resume().await.unwrap();
    synced(&bob).await;

    // The server has it again: a new device gets it.
    let url = server.url();
    let stored = eventually(|| {
        let (url, d) = (url.clone(), d.clone());
        async move {
            let mut carol = NativeClient::connect(&url, "", 73).await;
            let answer = carol.resume_from_scratch(&d).await;
            let carol_doc = new_doc(73).unwrap();
            if let Some(update) = answer.first().and_then(|a| a.update.as_ref()) {
                doc::apply_bytes(&carol_doc, update).unwrap();
            }
            doc::text(&carol_doc) == "hello"
        }
    })
    .await;
    assert!(stored, "the room stored the change");
    bob.shutdown().await.unwrap();
    server.stop().await;
}
