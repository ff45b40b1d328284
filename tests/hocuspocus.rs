//! The Hocuspocus endpoint against the real thing: stock `@hocuspocus/provider` 4.8 (and one
//! check with 3.4) in node, through `tests/js/hpclient.mjs`, beside a stock y-websocket
//! provider and native clients in the same rooms. Without node or npm each test prints
//! "skipped: …" and passes.

use std::time::Duration;

use driftsync_engine::doc::{self, new_doc};
use driftsync_engine::sync::{apply_remote, Limits};
use driftsync_protocol::{ClientFrame, DocId, ServerFrame};
use driftsync_tests::hpclient::{hocuspocus_modules_dir, HpClient};
use driftsync_tests::yclient::YClient;
use driftsync_tests::{sqlite_store, NativeClient, TestServer};

const SECRET: &str = "hocuspocus-secret-hocuspocus-secret";

fn modules() -> Option<std::path::PathBuf> {
    let dir = hocuspocus_modules_dir();
    if dir.is_none() {
        eprintln!("skipped: node/npm not found");
    }
    dir
}

fn url(server: &TestServer) -> String {
    format!("{}/hocuspocus", server.url())
}

fn token(user: &str, docs: &str, write: bool) -> String {
    driftsync_server::mint(SECRET, user, &[docs.to_string()], write, Duration::from_secs(3600)).unwrap()
}

/// The text a native client finds in the store for `doc`.
async fn stored_text(server: &TestServer, doc: &str, token: &str) -> String {
    let mut c = NativeClient::connect(&server.url(), token, 990_001).await;
    let docs = c.resume_from_scratch(&DocId::new(doc).unwrap()).await;
    let local = new_doc(990_001).unwrap();
    if let Some(update) = docs.first().and_then(|d| d.update.as_ref()) {
        apply_remote(&local, update, &Limits::default()).unwrap();
    }
    doc::text(&local)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_a_yjs_client_and_a_native_client_share_one_room() {
    let Some(modules) = modules() else { return };
    let (_dir, store) = sqlite_store().await;
    let server = TestServer::start(store, Default::default()).await;
    // Two sockets, two documents each; the second follows the shared document with
    // sessionAwareness (its address is "notes/hp\0<session>").
    let mut one = HpClient::start(&modules, &url(&server), false).await;
    one.command("attach p1 notes/hp -");
    one.command("attach p2 notes/side -");
    let mut two = HpClient::start(&modules, &url(&server), false).await;
    two.command("attach q1 notes/hp - session");
    two.command("attach q2 notes/side -");
    for (c, names) in [(&mut one, ["p1", "p2"]), (&mut two, ["q1", "q2"])] {
        c.until("every provider authenticated and synced", |c| {
            names.iter().all(|n| {
                let p = c.provider(n);
                p.scope.as_deref() == Some("read-write") && p.synced
            })
        })
        .await;
    }
    let mut yjs = YClient::start_at(&modules, &server.url(), "notes/hp").await;
    let mut native = NativeClient::connect(&server.url(), "", 4242).await;
    let d = DocId::new("notes/hp").unwrap();
    native.resume_from_scratch(&d).await;
    let native_doc = new_doc(4242).unwrap();

    // An edit through a provider reaches the other socket's session-aware provider, the
    // y-websocket client and the native client; "unsynced" goes back to 0 once stored.
    one.command("insert p1 0 hello ");
    one.until("p1 stored", |c| c.provider("p1").settled.as_deref() == Some("hello "))
        .await;
    two.until("q1 got it", |c| c.provider("q1").text == "hello ").await;
    yjs.until("the Yjs client got it", |y| y.text == "hello ").await;
    let update = native
        .recv_until(|f| match f {
            ServerFrame::Update { update, .. } => Some(update.clone()),
            _ => None,
        })
        .await;
    apply_remote(&native_doc, &update, &Limits::default()).unwrap();
    assert_eq!(doc::text(&native_doc), "hello ");
    // The other document on the same sockets stays apart.
    assert_eq!(two.provider("q2").text, "");

    // A native edit reaches the providers.
    let mine = doc::text_insert(&native_doc, 6, "native ").unwrap();
    native.push(&d, 1, mine).await.unwrap();
    one.until("p1 got the native edit", |c| c.provider("p1").text == "hello native ")
        .await;
    two.until("q1 got the native edit", |c| c.provider("q1").text == "hello native ")
        .await;

    // Awareness: q1's state reaches p1 and the Yjs client; the native client's presence
    // reaches the providers.
    two.command(r#"awareness q1 {"user":{"name":"quinn"}}"#);
    let q1_id = two.provider("q1").client_id;
    one.until("p1 sees quinn", |c| {
        c.provider("p1")
            .awareness
            .get(&q1_id)
            .is_some_and(|s| s.to_string().contains("quinn"))
    })
    .await;
    yjs.until("the Yjs client sees quinn", |y| {
        y.awareness.get(&q1_id).is_some_and(|s| s.to_string().contains("quinn"))
    })
    .await;
    native
        .send(&ClientFrame::Presence {
            doc: d.clone(),
            state: Some(r#"{"user":{"name":"nat"}}"#.into()),
        })
        .await;
    let nat = native.session;
    two.until("q1 sees the native client", |c| {
        c.provider("q1").awareness.contains_key(&nat)
    })
    .await;

    // Stateless messages reach the document's other providers.
    one.command("stateless p1 {\"kind\":\"ping\"}");
    two.until("q1 got the stateless message", |c| {
        c.provider("q1").stateless == vec!["{\"kind\":\"ping\"}".to_string()]
    })
    .await;

    // Offline: the first socket disconnects, edits, reconnects; everyone converges.
    one.command("disconnect");
    one.until("the socket closed", |c| c.socket_closes > 0).await;
    one.command("insert p1 0 offline ");
    one.command("connect");
    two.until("q1 got the offline edit", |c| {
        c.provider("q1").text == "offline hello native "
    })
    .await;
    yjs.until("the Yjs client got the offline edit", |y| {
        y.text == "offline hello native "
    })
    .await;
    assert_eq!(stored_text(&server, "notes/hp", "").await, "offline hello native ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_per_document_read_only_is_refused_and_chat_rules_hold() {
    let Some(modules) = modules() else { return };
    let (_dir, store) = sqlite_store().await;
    let config = driftsync_server::Config {
        auth: driftsync_server::Auth::new(Some(SECRET)),
        ..Default::default()
    };
    let server = TestServer::start(store, config).await;
    let mut c = HpClient::start(&modules, &url(&server), false).await;
    let write = token("ada", "notes/*", true);
    let read = token("ada", "wiki/*", false);
    let chat = token("ada", "chat/*", true);
    c.command(&format!("attach w notes/1 {write}"));
    c.command(&format!("attach r wiki/1 {read}"));
    c.command(&format!("attach x secret/1 {write}")); // a document the token does not name
    c.command("attach f notes/2 forged.token.here");
    c.command(&format!("attach chat chat/1 {chat}"));
    c.until("scopes and refusals", |c| {
        c.provider("w").scope.as_deref() == Some("read-write")
            && c.provider("r").scope.as_deref() == Some("readonly")
            && c.provider("x").denied.is_some()
            && c.provider("f").denied.is_some()
            && c.provider("chat").scope.is_some()
    })
    .await;
    // A read-only write is answered SyncStatus(0): it stays unsynced, nothing is stored.
    c.command("insert r 0 not stored");
    // A chat-rule violation: a message that is not a map.
    c.command(r#"mapset chat messages m1 "just a string""#);
    // Then a write on the writable document: answered after the two above (pushes are answered
    // in order), and stored.
    c.command("insert w 0 stored");
    c.until("w stored", |c| c.provider("w").settled.as_deref() == Some("stored"))
        .await;
    assert!(c.provider("r").unsynced > 0, "the read-only write was acknowledged");
    assert!(c.provider("chat").unsynced > 0, "the chat violation was acknowledged");
    assert_eq!(stored_text(&server, "notes/1", &write).await, "stored");
    assert_eq!(stored_text(&server, "wiki/1", &read).await, "");
    // Nothing of the refused chat write was stored.
    let mut native = NativeClient::connect(&server.url(), &chat, 990_002).await;
    let docs = native.resume_from_scratch(&DocId::new("chat/1").unwrap()).await;
    let holds_message = docs
        .first()
        .and_then(|d| d.update.as_ref())
        .is_some_and(|u| u.windows(b"just a string".len()).any(|w| w == b"just a string"));
    assert!(!holds_message, "the refused chat write was stored");
    // Another user's token on the same socket is refused; the socket's documents go on.
    c.command(&format!("attach b notes/3 {}", token("bo", "*", true)));
    c.until("bo refused", |c| c.provider("b").denied.is_some()).await;
    c.command("insert w 6 !");
    c.until("w still works", |c| {
        c.provider("w").settled.as_deref() == Some("stored!")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3x_provider_syncs_and_never_gets_a_frame_it_cannot_read() {
    let Some(modules) = modules() else { return };
    let (_dir, store) = sqlite_store().await;
    let config = driftsync_server::Config {
        // Heartbeats (an empty awareness message, never a bare Ping) every second.
        heartbeat: Duration::from_secs(1),
        ..Default::default()
    };
    let server = TestServer::start(store, config).await;
    let mut old = HpClient::start(&modules, &url(&server), true).await;
    assert_eq!(old.major, 3);
    let mut new = HpClient::start(&modules, &url(&server), false).await;
    old.command("attach o notes/v3 -");
    new.command("attach n notes/v3 -");
    old.until("o synced", |c| c.provider("o").synced).await;
    new.until("n synced", |c| c.provider("n").synced).await;
    old.command("insert o 0 from three ");
    old.until("o stored", |c| {
        c.provider("o").settled.as_deref() == Some("from three ")
    })
    .await;
    new.until("n got it", |c| c.provider("n").text == "from three ").await;
    new.command("insert n 0 from four ");
    old.until("o got it", |c| c.provider("o").text == "from four from three ")
        .await;
    // A few heartbeats pass: a frame the 3.x provider could not read would have failed the
    // test (the client reports the provider's throw as an error).
    tokio::time::sleep(Duration::from_secs(3)).await;
    old.command("insert o 0 still ");
    new.until("n still gets o's edits", |c| c.provider("n").text.starts_with("still "))
        .await;
}
