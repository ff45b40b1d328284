//! Authorship over real loopback sockets: nobody writes, suppresses or unsays as somebody else.
//!
//! Each test is an attack seen on an earlier server, by a member of the room with a valid token:
//! the attacker gets a typed refusal, the victim's acknowledged writes are stored and reach a
//! fresh client, and the replicas converge.

use std::time::Duration;

use driftsync_engine::doc::{self, load_document, new_doc};
use driftsync_engine::store::{SqliteStore, Store};
use driftsync_protocol::yjs::YMessage;
use driftsync_protocol::{ClientFrame, Cursor, DocId, ErrorCode, ServerFrame, CLOSE_UNAUTHORIZED};
use driftsync_server::{mint, Auth, Config};
use driftsync_tests::{sqlite_store, NativeClient, TestServer, TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use yrs::Doc;

const SECRET: &str = "authorship-test-secret-of-32-bytes!";

fn doc_id(s: &str) -> DocId {
    DocId::new(s).unwrap()
}

fn token_for(user: &str, docs: &[&str], write: bool, ttl: Duration) -> String {
    let docs: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
    mint(SECRET, user, &docs, write, ttl).unwrap()
}

fn token(user: &str) -> String {
    token_for(user, &["*"], true, Duration::from_secs(3600))
}

async fn start(config: Config) -> (tempfile::TempDir, SqliteStore, TestServer) {
    let (dir, store) = sqlite_store().await;
    let config = Config {
        auth: Auth::new(Some(SECRET)),
        ..config
    };
    let server = TestServer::start(store.clone(), config).await;
    (dir, store, server)
}

/// The document rebuilt from the store, as a fresh server would serve it.
async fn stored(store: &SqliteStore, doc: &DocId) -> Doc {
    let stored = store.load(doc.as_str()).await.unwrap().unwrap_or_default();
    load_document(doc.as_str(), &stored, 1).unwrap()
}

/// Pushes one batch and waits for its acknowledgement or refusal.
async fn push(c: &mut NativeClient, doc: &DocId, batch: u64, update: Vec<u8>) -> Result<Cursor, ErrorCode> {
    c.push(doc, batch, update).await
}

/// What a fresh client gets for `doc`: the text of its resume answer.
async fn fresh_text(url: &str, doc: &DocId) -> String {
    let mut carol = NativeClient::connect(url, &token("carol"), 777).await;
    let answer = carol.resume_from_scratch(doc).await;
    let replica = new_doc(777).unwrap();
    if let Some(update) = answer.first().and_then(|a| a.update.as_ref()) {
        doc::apply_bytes(&replica, update).unwrap();
    }
    doc::text(&replica)
}

/// Bob writes his own text encoded under Ada's client id, at her next clocks. Before, yrs kept
/// Bob's structs and dropped Ada's later (acknowledged) ones: her writes vanished and replicas
/// diverged for good.
#[tokio::test]
async fn a_push_under_another_users_client_id_is_refused() {
    const ADA: u64 = 1_000_001;
    let (_dir, store, server) = start(Config::default()).await;
    let d = doc_id("notes/squat");
    let mut ada = NativeClient::connect(&server.url(), &token("ada"), ADA).await;
    ada.resume_from_scratch(&d).await;
    let ada_doc = new_doc(ADA).unwrap();
    let first = doc::text_insert(&ada_doc, 0, "ada: one. ").unwrap();
    push(&mut ada, &d, 1, first.clone()).await.unwrap();

    // Bob replays Ada's state into a replica with her client id and writes as her.
    let mut bob = NativeClient::connect(&server.url(), &token("bob"), 2_000_002).await;
    bob.resume_from_scratch(&d).await;
    let forged = new_doc(ADA).unwrap();
    doc::apply_bytes(&forged, &first).unwrap();
    let forged_update = doc::text_insert(&forged, 10, "bob, as ada. ").unwrap();
    assert_eq!(
        push(&mut bob, &d, 1, forged_update).await,
        Err(ErrorCode::ClientIdTaken),
        "new structs under Ada's client id from Bob"
    );

    // Ada's next change, at exactly the clocks Bob tried to take, is stored and served.
    let second = doc::text_insert(&ada_doc, 10, "ada: two.").unwrap();
    push(&mut ada, &d, 2, second).await.unwrap();
    let expected = "ada: one. ada: two.";
    assert_eq!(doc::text(&stored(&store, &d).await), expected);
    assert_eq!(fresh_text(&server.url(), &d).await, expected);

    // Bob may still delete Ada's text (deletions have no author) and write under his own id.
    let bob_doc = new_doc(2_000_002).unwrap();
    doc::apply_bytes(&bob_doc, &doc::encode_state(&stored(&store, &d).await)).unwrap();
    push(&mut bob, &d, 2, doc::text_insert(&bob_doc, 0, "bob: hi. ").unwrap())
        .await
        .unwrap();
    assert_eq!(doc::text(&stored(&store, &d).await), format!("bob: hi. {expected}"));
    server.stop().await;
}

/// Bob says Hello with Ada's client id (to push a batch numbered 2^53 − 1 under it, which made
/// every later batch of Ada's look like a re-send): refused at the hello.
#[tokio::test]
async fn a_hello_with_another_users_client_id_is_refused() {
    const ADA: u64 = 3_000_003;
    let (_dir, store, server) = start(Config::default()).await;
    let d = doc_id("notes/batches");
    let mut ada = NativeClient::connect(&server.url(), &token("ada"), ADA).await;
    ada.resume_from_scratch(&d).await;

    let mut bob = NativeClient::connect_raw(&server.url()).await;
    bob.send(&ClientFrame::Hello {
        version: driftsync_protocol::PROTOCOL_VERSION,
        token: token("bob"),
        client_id: ADA,
    })
    .await;
    assert_eq!(
        bob.recv().await,
        Some(ServerFrame::Error {
            code: ErrorCode::ClientIdTaken,
            doc: None,
            batch: None
        })
    );
    assert_eq!(bob.close_code().await, Some(CLOSE_UNAUTHORIZED));

    // Ada's batches are stored as usual, each once.
    let ada_doc = new_doc(ADA).unwrap();
    for (batch, word) in [(1, "one "), (2, "two ")] {
        let end = doc::text_len(&ada_doc);
        push(&mut ada, &d, batch, doc::text_insert(&ada_doc, end, word).unwrap())
            .await
            .unwrap();
    }
    assert_eq!(doc::text(&stored(&store, &d).await), "one two ");
    // Ada's other devices (same user) may use the id, e.g. after a reinstall restored the store.
    let again = NativeClient::connect(&server.url(), &token("ada"), ADA).await;
    drop(again);
    server.stop().await;
}

/// A stock Yjs client is bound on first use like any other: Bob's y-websocket connection cannot
/// write under Ada's native client id either.
#[tokio::test]
async fn a_yjs_client_cannot_write_under_another_users_client_id() {
    const ADA: u64 = 4_000_004;
    let (_dir, store, server) = start(Config::default()).await;
    let d = doc_id("notes/yjs-squat");
    let mut ada = NativeClient::connect(&server.url(), &token("ada"), ADA).await;
    ada.resume_from_scratch(&d).await;
    let ada_doc = new_doc(ADA).unwrap();
    let first = doc::text_insert(&ada_doc, 0, "ada. ").unwrap();
    push(&mut ada, &d, 1, first.clone()).await.unwrap();

    let url = format!("{}/yjs/{}?token={}", server.url(), d, token("bob"));
    let (mut bob, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let forged = new_doc(ADA).unwrap();
    doc::apply_bytes(&forged, &first).unwrap();
    let forged_update = doc::text_insert(&forged, 5, "bob as ada. ").unwrap();
    bob.send(Message::Binary(YMessage::Update(forged_update).encode().into()))
        .await
        .unwrap();
    // Bob's own client id is his once he uses it.
    let bob_doc = new_doc(5_000_005).unwrap();
    doc::apply_bytes(&bob_doc, &first).unwrap();
    let own = doc::text_insert(&bob_doc, 0, "bob. ").unwrap();
    bob.send(Message::Binary(YMessage::Update(own).encode().into()))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while doc::text(&stored(&store, &d).await) != "bob. ada. " {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Bob's own update was not stored"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Ada's next change at the clocks Bob tried is stored; Bob's forgery never was.
    let second = doc::text_insert(&ada_doc, 5, "ada again.").unwrap();
    push(&mut ada, &d, 2, second).await.unwrap();
    assert_eq!(fresh_text(&server.url(), &d).await, "bob. ada. ada again.");
    let _ = bob.close(None).await;
    server.stop().await;
}

/// A connection whose token expires stops receiving: a native one gets `TokenExpired`, nothing
/// more, and is closed with 4001 unless it reauthenticates within the grace; a Yjs one is closed.
#[tokio::test]
async fn an_expired_token_ends_access() {
    let config = Config {
        token_grace: Duration::from_millis(600),
        ..Default::default()
    };
    let (_dir, _store, server) = start(config).await;
    let d = doc_id("notes/expiry");
    let short = token_for("ada", &["*"], false, Duration::from_secs(1));
    let mut reader = NativeClient::connect(&server.url(), &short, 6_000_006).await;
    reader.resume_from_scratch(&d).await;
    let mut renewing = NativeClient::connect(&server.url(), &short, 6_000_007).await;
    renewing.resume_from_scratch(&d).await;
    let yjs_url = format!("{}/yjs/{}?token={}", server.url(), d, short);
    let (mut yjs, _) = tokio_tungstenite::connect_async(yjs_url).await.unwrap();

    let expired = reader
        .recv_until(|f| match f {
            ServerFrame::Update { .. } => panic!("nothing was written yet"),
            ServerFrame::Error { code, doc: None, .. } => Some(*code),
            _ => None,
        })
        .await;
    assert_eq!(expired, ErrorCode::TokenExpired);
    renewing
        .recv_until(|f| {
            matches!(
                f,
                ServerFrame::Error {
                    code: ErrorCode::TokenExpired,
                    ..
                }
            )
            .then_some(())
        })
        .await;
    renewing
        .send(&ClientFrame::Reauth {
            token: token_for("ada", &["*"], false, Duration::from_secs(3600)),
        })
        .await;
    renewing.resume_from_scratch(&d).await;

    // A write after the expiry reaches the renewed connection only.
    let mut writer = NativeClient::connect(&server.url(), &token("bob"), 6_000_008).await;
    writer.resume_from_scratch(&d).await;
    let w = new_doc(6_000_008).unwrap();
    push(&mut writer, &d, 1, doc::text_insert(&w, 0, "after").unwrap())
        .await
        .unwrap();
    renewing
        .recv_until(|f| matches!(f, ServerFrame::Update { .. }).then_some(()))
        .await;
    loop {
        match reader.recv().await {
            Some(ServerFrame::Update { .. }) => panic!("an expired connection got an update"),
            Some(_) => continue,
            None => break,
        }
    }
    // The Yjs connection was closed with 4001 at the expiry.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let code = loop {
        match tokio::time::timeout_at(deadline, yjs.next()).await.expect("yjs close") {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(Message::Binary(bytes))) => {
                if let Ok(YMessage::Update(_)) = YMessage::decode(&bytes, usize::MAX) {
                    panic!("an expired Yjs connection got an update");
                }
            }
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => break None,
        }
    };
    assert_eq!(code, Some(CLOSE_UNAUTHORIZED));
    server.stop().await;
}

/// The pusher's commit fails after its update was broadcast; the pusher never comes back. The
/// room stores the change itself once the store recovers: the readers that got it never hold a
/// change the server lost, and nobody had to relay another's structs.
#[tokio::test]
async fn a_broadcast_change_whose_commit_failed_is_stored_by_the_room() {
    use driftsync_tests::FlakyStore;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let (_dir, inner) = sqlite_store().await;
    let fail = Arc::new(AtomicBool::new(false));
    let store = FlakyStore {
        inner: inner.clone(),
        fail: Arc::clone(&fail),
    };
    let config = Config {
        auth: Auth::new(Some(SECRET)),
        ..Default::default()
    };
    let server = TestServer::start(store, config).await;
    let d = doc_id("notes/flaky-owned");
    let mut writer = NativeClient::connect(&server.url(), &token("ada"), 7_000_007).await;
    writer.resume_from_scratch(&d).await;
    let mut reader = NativeClient::connect(&server.url(), &token("bob"), 7_000_008).await;
    reader.resume_from_scratch(&d).await;

    fail.store(true, Ordering::SeqCst);
    let w = new_doc(7_000_007).unwrap();
    assert_eq!(
        push(&mut writer, &d, 1, doc::text_insert(&w, 0, "hello").unwrap()).await,
        Err(ErrorCode::StoreUnavailable)
    );
    reader
        .recv_until(|f| matches!(f, ServerFrame::Update { .. }).then_some(()))
        .await;
    drop(writer);
    fail.store(false, Ordering::SeqCst);
    // The next use of the room stores it first (here: a fresh client's resume).
    assert_eq!(fresh_text(&server.url(), &d).await, "hello");
    assert_eq!(doc::text(&stored(&inner, &d).await), "hello");
    server.stop().await;
}

/// Seeded schedules: three honest users edit offline and sync now and then, the store fails
/// from time to time, and a hostile member replays the updates it sees (under its own hello, with
/// other clients' batch numbers and absurd ones), says Hello with the honest clients' ids, and
/// forges changes under their ids at their next clocks. At the end every honest write that was
/// acknowledged is in the store, every honest replica and a fresh client hold the same text, and
/// nothing forged is anywhere. Seeds are printed; rerun one with `DRIFTSYNC_SEED=<seed>`; the
/// number of schedules is `DRIFTSYNC_HOSTILE_SCHEDULES` (default 8).
#[tokio::test]
async fn honest_clients_converge_beside_a_hostile_one_and_a_failing_store() {
    let seeds: Vec<u64> = match std::env::var("DRIFTSYNC_SEED") {
        Ok(seed) => vec![seed.parse().expect("DRIFTSYNC_SEED is a u64")],
        Err(_) => {
            let count: u64 = std::env::var("DRIFTSYNC_HOSTILE_SCHEDULES")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(8);
            let base: u64 = rand::random();
            (0..count).map(|k| base.wrapping_add(k)).collect()
        }
    };
    for seed in seeds {
        eprintln!("hostile schedule: seed {seed} (rerun with DRIFTSYNC_SEED={seed})");
        hostile_schedule(seed).await;
    }
}

async fn hostile_schedule(seed: u64) {
    use driftsync_client::Client;
    use driftsync_engine::sync::new_writers;
    use driftsync_tests::FlakyStore;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const DOC: &str = "notes/hostile";
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let (_server_dir, inner) = sqlite_store().await;
    let fail = Arc::new(AtomicBool::new(false));
    let store = FlakyStore {
        inner: inner.clone(),
        fail: Arc::clone(&fail),
    };
    let config = Config {
        auth: Auth::new(Some(SECRET)),
        ..Default::default()
    };
    let server = TestServer::start(store, config).await;
    let url = server.url();
    let d = doc_id(DOC);

    let users = ["ada", "bob", "cy"];
    let mut honest = Vec::new();
    for user in users {
        let client = Client::open(dir.path().join(format!("{user}.db")), user).await.unwrap();
        honest.push(client);
    }
    // Every honest client knows the document from the start.
    for client in honest.iter_mut() {
        client.text_append(DOC, "").await.unwrap();
    }
    let mut pending: Vec<Vec<String>> = vec![Vec::new(); users.len()];
    let mut acknowledged: Vec<String> = Vec::new();

    let mut mallory = NativeClient::connect(&url, &token("mallory"), 9_999_001).await;
    mallory.resume_from_scratch(&d).await;
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut forged = 0u32;

    let steps = rng.random_range(20..40u32);
    for step in 0..steps {
        match rng.random_range(0..12) {
            0..=4 => {
                let i = rng.random_range(0..users.len());
                let marker = format!("<{}:{step}>", users[i]);
                let len = doc::text_len(&honest[i].document(DOC).await.unwrap());
                // At either end, so that no marker is split by another and each can be found.
                let pos = if rng.random_bool(0.5) { 0 } else { len };
                honest[i].text_insert(DOC, pos, &marker).await.unwrap();
                pending[i].push(marker);
            }
            5..=6 => {
                let i = rng.random_range(0..users.len());
                if honest[i].sync_once(&url, &token(users[i])).await.is_ok()
                    && honest[i].store().outbox(None).await.unwrap().is_empty()
                {
                    acknowledged.append(&mut pending[i]);
                }
            }
            7 => {
                let failing = rng.random_bool(0.5);
                fail.store(failing, Ordering::SeqCst);
            }
            8 if !seen.is_empty() => {
                // Replay something seen, under Mallory's hello, as someone else's batch.
                let update = seen[rng.random_range(0..seen.len())].clone();
                let batch = if rng.random_bool(0.5) {
                    (1 << 53) - 1
                } else {
                    rng.random_range(1..50)
                };
                mallory
                    .send(&ClientFrame::Push {
                        doc: d.clone(),
                        batch,
                        update,
                    })
                    .await;
            }
            9 if !seen.is_empty() => {
                // Forge under a client id seen in an update, at its next clocks.
                let update = &seen[rng.random_range(0..seen.len())];
                let writers = new_writers(&new_doc(1).unwrap(), update).unwrap();
                let Some(&victim) = writers.first() else { continue };
                if victim == 9_999_001 {
                    continue;
                }
                let replica = new_doc(victim).unwrap();
                for u in &seen {
                    let _ = doc::apply_bytes(&replica, u);
                }
                forged += 1;
                let forgery = doc::text_insert(&replica, 0, "FORGED").unwrap();
                let result = push(&mut mallory, &d, 1_000 + u64::from(forged), forgery).await;
                // Refused; or, when every clock it uses is stored already (Mallory had not
                // seen the victim's latest), taken as a re-send that changes nothing.
                assert!(
                    matches!(
                        result,
                        Ok(_)
                            | Err(ErrorCode::ClientIdTaken
                                | ErrorCode::MissingDependencies
                                | ErrorCode::StoreUnavailable)
                    ),
                    "a forgery under client {victim} got {result:?}"
                );
            }
            10 if !seen.is_empty() => {
                // Say Hello with an honest client's id, as seen in an update. (An id is public
                // only once its owner used it, and its owner's first hello bound it.)
                let update = &seen[rng.random_range(0..seen.len())];
                let writers = new_writers(&new_doc(1).unwrap(), update).unwrap();
                let Some(&id) = writers.first() else { continue };
                let mut imposter = NativeClient::connect_raw(&url).await;
                imposter
                    .send(&ClientFrame::Hello {
                        version: driftsync_protocol::PROTOCOL_VERSION,
                        token: token("mallory"),
                        client_id: id,
                    })
                    .await;
                let refused = imposter.recv().await;
                let taken = ServerFrame::Error {
                    code: ErrorCode::ClientIdTaken,
                    doc: None,
                    batch: None,
                };
                assert_eq!(refused, Some(taken), "an imposter's hello with client {id}");
            }
            _ => {
                // Mallory reads what it gets.
                while let Ok(Some(frame)) = mallory.recv_within(Duration::from_millis(20)).await {
                    if let ServerFrame::Update { update, .. } = frame {
                        seen.push(update);
                    }
                }
            }
        }
    }
    // Heal: the store works, everyone syncs until nothing is left to push, then once more.
    fail.store(false, Ordering::SeqCst);
    for _ in 0..3 {
        for (i, client) in honest.iter_mut().enumerate() {
            match client.sync_once(&url, &token(users[i])).await {
                Ok(_) if client.store().outbox(None).await.unwrap().is_empty() => {
                    acknowledged.append(&mut pending[i]);
                }
                Ok(_) => {}
                Err(e) => eprintln!("{} failed to sync: {e}", users[i]),
            }
        }
    }
    for (i, client) in honest.iter_mut().enumerate() {
        assert!(pending[i].is_empty(), "{}'s changes were never acknowledged", users[i]);
        client.sync_once(&url, &token(users[i])).await.unwrap();
    }
    let text = doc::text(&stored(&inner, &d).await);
    for marker in &acknowledged {
        assert!(
            text.contains(marker.as_str()),
            "acknowledged {marker} is not stored: {text}"
        );
    }
    assert!(!text.contains("FORGED"), "a forgery was stored: {text}");
    for (i, client) in honest.iter_mut().enumerate() {
        assert_eq!(client.text(DOC).await.unwrap(), text, "{} diverged", users[i]);
    }
    assert_eq!(fresh_text(&url, &d).await, text);
    server.stop().await;
}
