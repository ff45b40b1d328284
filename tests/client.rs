//! The client library against a real server: offline edits on two devices converge after each
//! syncs, a fresh device catches up, and an unchanged resume is cheap.

use driftsync_client::Client;
use driftsync_engine::store::Store;
use driftsync_tests::{sqlite_store, TestServer};

const ROOM: &str = "chat/general";
const NOTES: &str = "notes/1";

/// Messages as (id, author, text, deleted), in display order.
async fn messages(c: &mut Client) -> Vec<(String, String, String, bool)> {
    c.chat_messages(ROOM)
        .await
        .unwrap()
        .into_iter()
        .map(|(m, _)| (m.id, m.author, m.text, m.deleted))
        .collect()
}

#[tokio::test]
async fn offline_edits_converge_after_sync() {
    let dir = tempfile::tempdir().unwrap();
    let mut ada = Client::open(dir.path().join("ada.db"), "ada").await.unwrap();
    let mut bob = Client::open(dir.path().join("bob.db"), "bob").await.unwrap();

    // Offline: no server is running yet.
    let a1 = ada.chat_send(ROOM, "hello from ada").await.unwrap();
    let b1 = bob.chat_send(ROOM, "hello from bob").await.unwrap();
    let a2 = ada.chat_send(ROOM, "typo here").await.unwrap();
    ada.chat_edit(ROOM, &a2, "fixed").await.unwrap();
    let b2 = bob.chat_send(ROOM, "to be deleted").await.unwrap();
    bob.chat_delete(ROOM, &b2).await.unwrap();
    assert_eq!(
        ada.chat_mark_read(ROOM, None).await.unwrap().as_deref(),
        Some(a2.as_str())
    );
    bob.chat_mark_read(ROOM, Some(&b1)).await.unwrap();
    ada.text_append(NOTES, "world").await.unwrap();
    ada.text_insert(NOTES, 0, "hello ").await.unwrap();
    bob.text_append(NOTES, "!").await.unwrap();
    assert_eq!(ada.text(NOTES).await.unwrap(), "hello world");
    ada.map_set(NOTES, "title", serde_json::json!("Plan")).await.unwrap();
    ada.map_set(NOTES, "draft", serde_json::json!(true)).await.unwrap();
    bob.map_set(NOTES, "owner", serde_json::json!({"name": "bob", "since": 2026}))
        .await
        .unwrap();
    bob.map_set(NOTES, "draft", serde_json::json!(false)).await.unwrap();
    ada.map_remove(NOTES, "draft").await.unwrap();
    // Nothing has reached a server: every own message is still local.
    assert!(ada
        .chat_messages(ROOM)
        .await
        .unwrap()
        .iter()
        .all(|(_, delivered)| !delivered));
    assert!(ada.chat_edit(ROOM, &b1, "not mine").await.is_err());

    let (_server_dir, store) = sqlite_store().await;
    let server = TestServer::start(store, Default::default()).await;
    let url = server.url();
    for _ in 0..2 {
        let ra = ada.sync_once(&url, "").await.unwrap();
        assert_eq!(ra.documents, 2);
        assert_eq!(ra.round_trips, 1);
        bob.sync_once(&url, "").await.unwrap();
    }

    let ma = messages(&mut ada).await;
    let mb = messages(&mut bob).await;
    assert_eq!(ma, mb);
    assert_eq!(ma.len(), 4);
    let ids: Vec<&str> = ma.iter().map(|m| m.0.as_str()).collect();
    for id in [&a1, &a2, &b1, &b2] {
        assert!(ids.contains(&id.as_str()));
    }
    assert!(ma.iter().any(|m| m.2 == "fixed"));
    assert!(ma.iter().any(|m| m.0 == b2 && m.3 && m.2.is_empty()));
    // Every message is acknowledged now.
    assert!(ada.chat_messages(ROOM).await.unwrap().iter().all(|(_, d)| *d));
    assert!(bob.chat_messages(ROOM).await.unwrap().iter().all(|(_, d)| *d));

    let ra = ada.chat_receipts(ROOM).await.unwrap();
    assert_eq!(ra, bob.chat_receipts(ROOM).await.unwrap());
    assert_eq!(ra.len(), 2);
    assert_eq!(ra["ada"].message, a2);
    assert_eq!(ra["bob"].message, b1);

    let ta = ada.text(NOTES).await.unwrap();
    assert_eq!(ta, bob.text(NOTES).await.unwrap());
    assert!(ta.contains("hello world") && ta.contains('!'), "{ta}");
    let map = ada.map(NOTES).await.unwrap();
    assert_eq!(map, bob.map(NOTES).await.unwrap());
    assert_eq!(map["title"], serde_json::json!("Plan"));
    assert_eq!(map["owner"]["name"], serde_json::json!("bob"));

    // A third, empty device opens the documents and catches up in one sync.
    let mut cy = Client::open(dir.path().join("cy.db"), "cy").await.unwrap();
    assert!(cy.text(NOTES).await.unwrap().is_empty());
    assert!(cy.chat_messages(ROOM).await.unwrap().is_empty());
    cy.sync_once(&url, "").await.unwrap();
    assert_eq!(messages(&mut cy).await, ma);
    assert_eq!(cy.chat_receipts(ROOM).await.unwrap(), ra);
    assert_eq!(cy.text(NOTES).await.unwrap(), ta);
    assert_eq!(cy.chat_unread_count(ROOM).await.unwrap(), 3);

    // Reopened from disk, the third device still holds everything.
    drop(cy);
    let mut cy = Client::open(dir.path().join("cy.db"), "cy").await.unwrap();
    assert_eq!(messages(&mut cy).await, ma);

    // A resume with nothing changed costs a handful of bytes. (Cy's sync wrote a delivery
    // receipt — the messages reached Cy's device — which Ada's next sync brings: then nothing
    // has changed.)
    ada.sync_once(&url, "").await.unwrap();
    let quiet = ada.sync_once(&url, "").await.unwrap();
    assert_eq!(quiet.documents, 2);
    assert!(
        quiet.bytes_sent + quiet.bytes_received < 256,
        "an unchanged resume cost {quiet:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn unreachable_server_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Client::open(dir.path().join("c.db"), "c").await.unwrap();
    c.text_append(NOTES, "x").await.unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    assert!(c.sync_once(&format!("ws://{addr}"), "").await.is_err());
    // The edit is still there and still waiting to be pushed.
    assert_eq!(c.text(NOTES).await.unwrap(), "x");
    assert_eq!(c.store().outbox(None).await.unwrap().len(), 1);
}

/// A phone holding 100 documents is offline while 3 of them change on the server: its resume
/// takes one round trip, and what it receives is a small constant per unchanged document plus
/// the changes themselves.
#[tokio::test]
async fn resume_of_100_documents_with_3_changed() {
    const DOCS: usize = 100;
    const CHANGED: usize = 3;
    /// Bytes the answer may spend on a document that did not change.
    const PER_UNCHANGED: u64 = 24;
    /// Bytes the answer may spend per changed document beyond the changes themselves.
    const PER_CHANGED: u64 = 64;

    let dir = tempfile::tempdir().unwrap();
    let (_server_dir, store) = sqlite_store().await;
    let server = TestServer::start(store, Default::default()).await;
    let url = server.url();
    let ids: Vec<String> = (0..DOCS).map(|i| format!("docs/{i:03}")).collect();

    let mut phone = Client::open(dir.path().join("phone.db"), "phone").await.unwrap();
    for (i, id) in ids.iter().enumerate() {
        phone
            .text_append(id, &format!("Document {i}: some notes written on the phone. "))
            .await
            .unwrap();
    }
    phone.sync_once(&url, "").await.unwrap();
    // Nothing changed: the resume costs a small constant per document.
    let idle = phone.sync_once(&url, "").await.unwrap();
    assert_eq!((idle.documents, idle.round_trips), (DOCS, 1));
    assert!(idle.bytes_received <= DOCS as u64 * PER_UNCHANGED, "{idle:?}");

    // Meanwhile, a laptop edits three of the documents.
    let mut laptop = Client::open(dir.path().join("laptop.db"), "laptop").await.unwrap();
    for id in &ids[..CHANGED] {
        laptop.document(id).await.unwrap();
    }
    laptop.sync_once(&url, "").await.unwrap();
    for id in &ids[..CHANGED] {
        laptop
            .text_append(id, "Edited on the laptop while the phone slept.")
            .await
            .unwrap();
        laptop.text_insert(id, 0, "[laptop] ").await.unwrap();
    }
    let changes: u64 = laptop
        .store()
        .outbox(None)
        .await
        .unwrap()
        .iter()
        .map(|e| e.update.len() as u64)
        .sum();
    laptop.sync_once(&url, "").await.unwrap();

    let report = phone.sync_once(&url, "").await.unwrap();
    let bound = (DOCS - CHANGED) as u64 * PER_UNCHANGED + CHANGED as u64 * PER_CHANGED + changes;
    println!(
        "resume of {DOCS} documents, {CHANGED} changed ({changes} bytes of changes): {} bytes received \
         (bound {bound}), {} bytes sent, {} round trip(s); unchanged resume: {} received, {} sent",
        report.bytes_received, report.bytes_sent, report.round_trips, idle.bytes_received, idle.bytes_sent
    );
    assert_eq!(report.round_trips, 1);
    assert_eq!(report.documents, DOCS);
    assert!(report.bytes_received <= bound, "{report:?} > {bound}");
    for id in &ids[..CHANGED] {
        assert!(phone.text(id).await.unwrap().starts_with("[laptop] Document"));
    }
    server.stop().await;
}

/// A device that sat offline through a long editing session: thousands of changes, each its
/// own batch in the outbox. Its next sync sends them as a few merged pushes — one round trip,
/// a few durable commits, fewer bytes than the batches themselves — instead of one push and
/// one commit per keystroke (which also ran into the server's frame rate limit).
#[tokio::test]
async fn a_long_offline_session_goes_up_in_a_few_merged_pushes() {
    const EDITS: usize = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let (_server_dir, store) = sqlite_store().await;
    let server = TestServer::start(store, Default::default()).await;
    let url = server.url();

    let mut phone = Client::open(dir.path().join("phone.db"), "phone").await.unwrap();
    phone.text_append(NOTES, "Notes: ").await.unwrap();
    phone.sync_once(&url, "").await.unwrap();
    // Offline: one keystroke per change, with a deletion now and then.
    let mut expected = String::from("Notes: ");
    for i in 0..EDITS {
        if i % 10 == 9 {
            phone.text_delete(NOTES, 7, 1).await.unwrap();
            expected.remove(7);
        } else {
            let c = char::from(b'a' + (i % 26) as u8);
            phone.text_append(NOTES, &c.to_string()).await.unwrap();
            expected.push(c);
        }
    }
    let outbox = phone.store().outbox(Some(NOTES)).await.unwrap();
    assert_eq!(outbox.len(), EDITS);
    let outbox_bytes: u64 = outbox.iter().map(|e| e.update.len() as u64).sum();

    let started = std::time::Instant::now();
    let report = phone.sync_once(&url, "").await.unwrap();
    let took = started.elapsed();
    println!(
        "offline session of {EDITS} changes ({outbox_bytes} bytes of batches): {} push(es), {} bytes sent, \
         {} round trip(s), synced in {took:?}",
        report.pushes, report.bytes_sent, report.round_trips
    );
    assert_eq!(report.round_trips, 1);
    assert!(report.pushes <= 4, "{report:?}");
    assert!(
        report.bytes_sent < outbox_bytes * 3 / 4,
        "{report:?} vs {outbox_bytes} bytes of batches"
    );
    assert!(
        phone.store().outbox(Some(NOTES)).await.unwrap().is_empty(),
        "everything acknowledged"
    );
    assert_eq!(phone.text(NOTES).await.unwrap(), expected);

    // Another device sees every change.
    let mut laptop = Client::open(dir.path().join("laptop.db"), "laptop").await.unwrap();
    laptop.document(NOTES).await.unwrap();
    laptop.sync_once(&url, "").await.unwrap();
    assert_eq!(laptop.text(NOTES).await.unwrap(), expected);
    server.stop().await;
}
