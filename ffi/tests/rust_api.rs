//! The bindings' API called from Rust, as the generated code calls it: a store offline, two
//! sessions over `wss://` to a server with a certificate made now (trusted through the extra CA),
//! listeners, and the typed errors (an untrusted certificate, a refused token, bad arguments).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use driftsync_ffi::{
    ConnectionState, Delivery, DriftsyncError, ErrorKind, Event, EventListener, SessionConfig, Store, TokenProvider,
};
use driftsync_tests::TestServer;

const STEP: Duration = Duration::from_secs(20);

struct Token(String);

impl TokenProvider for Token {
    fn token(&self) -> Result<String, DriftsyncError> {
        Ok(self.0.clone())
    }
}

struct NoToken;

impl TokenProvider for NoToken {
    fn token(&self) -> Result<String, DriftsyncError> {
        Err(DriftsyncError::Unauthorized {
            reason: "signed out".into(),
        })
    }
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Event>>);

impl EventListener for Recorder {
    fn on_event(&self, event: Event) {
        self.0.lock().unwrap().push(event);
    }
}

impl Recorder {
    fn seen(&self, pick: impl Fn(&Event) -> bool) -> bool {
        self.0.lock().unwrap().iter().any(pick)
    }
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn offline_writes_and_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db").to_string_lossy().into_owned();
    let store = Store::open(path, "ada".into()).await.unwrap();
    assert_eq!(store.user(), "ada");
    let id = store.chat_send("chat/x".into(), "hello".into()).await.unwrap();
    let list = store.chat_list("chat/x".into()).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].id.as_str(), list[0].delivery), (id.as_str(), Delivery::Local));
    store.text_append("notes/1".into(), "héllo".into()).await.unwrap();
    store.text_insert("notes/1".into(), 0, "> ".into()).await.unwrap();
    store.text_delete("notes/1".into(), 0, 2).await.unwrap();
    assert_eq!(store.text("notes/1".into()).await.unwrap(), "héllo");
    store
        .map_set("notes/1".into(), "n".into(), "[1,2]".into())
        .await
        .unwrap();
    assert_eq!(store.map_entries("notes/1".into()).await.unwrap()["n"], "[1,2]");
    store.map_remove("notes/1".into(), "n".into()).await.unwrap();
    assert!(store.map_entries("notes/1".into()).await.unwrap().is_empty());

    let invalid = |r: Result<(), DriftsyncError>| r.map_err(|e| e.kind());
    assert_eq!(
        invalid(store.map_set("notes/1".into(), "k".into(), "{oops".into()).await),
        Err(ErrorKind::Invalid)
    );
    assert_eq!(
        invalid(store.chat_edit("chat/x".into(), "nope".into(), "x".into()).await),
        Err(ErrorKind::Invalid)
    );
    assert_eq!(
        invalid(store.text_append("".into(), "x".into()).await),
        Err(ErrorKind::Invalid)
    );
    let bad_ca = store
        .sync_once("wss://127.0.0.1:1".into(), String::new(), Some("not a PEM".into()))
        .await;
    assert_eq!(bad_ca.map(|_| ()).map_err(|e| e.kind()), Err(ErrorKind::Invalid));
    assert!(matches!(
        Store::open(dir.path().join("b.db").to_string_lossy().into_owned(), String::new()).await,
        Err(DriftsyncError::Invalid { .. })
    ));
}

#[tokio::test]
async fn sessions_over_wss_with_an_extra_ca() {
    let (cert, key) = support::self_signed();
    let tls = driftsync_server::tls_server_config(cert.as_bytes(), key.as_bytes()).unwrap();
    let (_server_dir, server_store) = driftsync_tests::sqlite_store().await;
    let config = driftsync_server::Config {
        auth: driftsync_server::Auth::new(Some(support::SECRET)),
        tls: Some(tls),
        ..Default::default()
    };
    let server = TestServer::start(server_store, config).await;
    let url = format!("wss://{}", server.addr);
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| Store::open(dir.path().join(name).to_string_lossy().into_owned(), name.into());

    // Not trusted: a clear TLS error, before any token is looked at.
    let eve = open("eve").await.unwrap();
    match eve.sync_once(url.clone(), support::token("eve"), None).await {
        Err(DriftsyncError::Tls { reason }) => assert!(reason.contains("UnknownIssuer"), "{reason}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    // Trusted, but the token is refused.
    match eve.sync_once(url.clone(), "bad".into(), Some(cert.clone())).await {
        Err(DriftsyncError::Unauthorized { .. }) => {}
        other => panic!("expected Unauthorized, got {other:?}"),
    }

    let config = |docs: &[&str]| SessionConfig {
        server_url: url.clone(),
        documents: docs.iter().map(|d| d.to_string()).collect(),
        ca_certificate_pem: Some(cert.clone()),
    };
    let (ada, bob) = (open("ada").await.unwrap(), open("bob").await.unwrap());
    let sa = ada
        .start_session(config(&["chat/x"]), Arc::new(Token(support::token("ada"))))
        .await
        .unwrap();
    let sb = bob
        .start_session(config(&["chat/x"]), Arc::new(Token(support::token("bob"))))
        .await
        .unwrap();
    assert!(
        ada.start_session(config(&[]), Arc::new(NoToken)).await.is_err(),
        "one session per store"
    );
    let heard = Arc::new(Recorder::default());
    let subscription = sb.add_listener(heard.clone()).unwrap();
    let id = ada.chat_send("chat/x".into(), "over TLS".into()).await.unwrap();
    until("bob hears ada", async || {
        heard.seen(|e| matches!(e, Event::MessageAdded { message, .. } if message.id == id))
    })
    .await;
    until("on bob's device", async || {
        ada.chat_list("chat/x".into()).await.unwrap()[0].delivery == Delivery::Delivered
    })
    .await;
    assert!(heard.seen(|e| matches!(e, Event::StateChanged { .. })));
    subscription.cancel();
    assert!(subscription.is_cancelled());

    // A provider with no token: the attempt fails, typed, and is retried.
    let carol = open("carol").await.unwrap();
    let sc = carol
        .start_session(config(&["chat/x"]), Arc::new(NoToken))
        .await
        .unwrap();
    let told = Arc::new(Recorder::default());
    let _keep = sc.add_listener(told.clone()).unwrap();
    until("carol told", async || {
        told.seen(|e| {
            matches!(
                e,
                Event::Error {
                    kind: ErrorKind::Unauthorized,
                    ..
                }
            )
        })
    })
    .await;

    sa.pause().await.unwrap();
    assert_eq!(sa.state(), ConnectionState::Paused);
    for session in [sa, sb, sc] {
        session.shutdown().await.unwrap();
        assert_eq!(session.state(), ConnectionState::Stopped);
    }
    server.stop().await;
}
