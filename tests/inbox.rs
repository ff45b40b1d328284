//! Membership and the inbox over real loopback sockets, on a server with a secret: joining
//! writes a system message, a fresh device finds its user's rooms with their unread counts in
//! one round trip and opens one, the inbox stays live, members show their status and when
//! they were last seen, and nobody changes another's membership.

use std::collections::BTreeMap;
use std::time::Duration;

use driftsync_engine::chat::{Author, ChatRoom, Kind, MEMBERS_ROOT};
use driftsync_engine::doc::{apply_bytes, new_doc};
use driftsync_engine::store::Store;
use driftsync_protocol::{ClientFrame, DocId, ErrorCode, InboxRoom, ServerFrame};
use driftsync_server::{mint, Auth, Config};
use driftsync_tests::{sqlite_store, NativeClient, TestServer};
use yrs::{Any, Map, Transact};

const SECRET: &str = "integration-test-secret";

fn token(user: &str) -> String {
    mint(SECRET, user, &["chat/*".to_string()], true, Duration::from_secs(3600)).unwrap()
}

/// The wall clock (ms): messages are stamped like a device's, after the server's system
/// messages of the joins.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn author(user: &str, device: &str) -> Author {
    Author {
        user: user.into(),
        device: device.into(),
    }
}

/// A server with a secret; the store is a handle on the server's own database.
async fn start() -> (tempfile::TempDir, driftsync_engine::store::SqliteStore, TestServer) {
    let (dir, store) = sqlite_store().await;
    let config = Config {
        auth: Auth::new(Some(SECRET)),
        ..Default::default()
    };
    let server = TestServer::start(store.clone(), config).await;
    (dir, store, server)
}

/// Asks for the inbox after `since` and collects the answer's pieces: (frames, rooms, version).
async fn inbox(c: &mut NativeClient, since: u64) -> (usize, Vec<InboxRoom>, u64) {
    c.send(&ClientFrame::Inbox { since }).await;
    let (mut frames, mut rooms) = (0, Vec::new());
    loop {
        let (version, piece, more) = c
            .recv_until(|f| match f {
                ServerFrame::Inbox { version, rooms, more } => Some((*version, rooms.clone(), *more)),
                _ => None,
            })
            .await;
        frames += 1;
        rooms.extend(piece);
        if !more {
            return (frames, rooms, version);
        }
    }
}

/// Alice's first device joins 200 rooms; Bob joins them and sends `i % 4` messages in room `i`;
/// Alice reads room 0 to its end. A fresh device of Alice's, given only her token, finds the
/// 200 rooms with their unread counts in one frame, then opens one.
#[tokio::test]
async fn a_fresh_device_finds_its_rooms_and_unread_counts_in_one_round_trip() {
    let (_dir, _store, server) = start().await;
    let url = server.url();
    let (alice, bob) = (author("alice", "phone"), author("bob", "laptop"));
    let mut a = NativeClient::connect(&url, &token("alice"), 101).await;
    let mut b = NativeClient::connect(&url, &token("bob"), 202).await;
    let rooms: Vec<DocId> = (0..200)
        .map(|i| DocId::new(format!("chat/room-{i:03}")).unwrap())
        .collect();
    let mut expected = BTreeMap::new();
    let mut batch = 0;
    for (i, room) in rooms.iter().enumerate() {
        let (mine, theirs) = (
            ChatRoom::new(new_doc(101).unwrap()),
            ChatRoom::new(new_doc(202).unwrap()),
        );
        a.resume_from_scratch(room).await;
        b.resume_from_scratch(room).await;
        batch += 1;
        a.push(room, batch, mine.join(&alice, 1_000).unwrap()).await.unwrap();
        b.push(room, batch, theirs.join(&bob, 1_000).unwrap()).await.unwrap();
        for n in 0..(i % 4) {
            batch += 1;
            let (_, update) = theirs.send(&bob, &format!("message {n} in room {i}"), now_ms());
            apply_bytes(mine.doc(), &update).unwrap();
            b.push(room, batch, update).await.unwrap();
        }
        let mut unread = (i % 4) as u64;
        if i == 0 || i == 3 {
            if let Some(last) = mine.messages().last() {
                batch += 1;
                let update = mine.mark_read(&alice, &last.id, now_ms()).unwrap().unwrap();
                a.push(room, batch, update).await.unwrap();
            }
            unread = 0;
        }
        expected.insert(room.clone(), unread);
    }

    // The server wrote "joined" system messages (they never count as unread).
    let resumed = b.resume_from_scratch(&rooms[2]).await;
    let replica = ChatRoom::new(new_doc(9).unwrap());
    apply_bytes(replica.doc(), resumed[0].update.as_deref().unwrap()).unwrap();
    let system: Vec<_> = replica
        .messages()
        .into_iter()
        .filter(|m| m.kind == Kind::System)
        .collect();
    assert_eq!(system.len(), 2, "one system message per join");
    assert!(system.iter().any(|m| m.author == "alice" && m.text == "alice joined"));
    assert_eq!(system[0].metadata.get("event").map(String::as_str), Some("joined"));
    assert_eq!(replica.unread_count("alice"), 2);

    // A fresh device: one request, one frame, 200 rooms with the right unread counts.
    let mut fresh = NativeClient::connect(&url, &token("alice"), 303).await;
    let (frames, found, version) = inbox(&mut fresh, 0).await;
    assert_eq!(frames, 1, "200 rooms in one frame");
    assert_eq!(found.len(), 200);
    let unread: BTreeMap<DocId, u64> = found.iter().map(|r| (r.room.clone(), r.unread)).collect();
    assert_eq!(unread, expected);
    assert!(found.iter().all(|r| r.joined));
    // Most recently active first: the rooms with Bob's latest messages lead.
    let last = |r: &InboxRoom| r.last.as_ref().map(|m| m.sort.clone()).unwrap_or_default();
    assert!(found.windows(2).all(|w| last(&w[0]) >= last(&w[1])));
    let busiest = found.iter().find(|r| r.room == rooms[199]).unwrap();
    assert_eq!(busiest.last.as_ref().unwrap().text, "message 2 in room 199");
    assert_eq!(busiest.last.as_ref().unwrap().author, "bob");

    // Then it opens one room and sees what the inbox said.
    let resumed = fresh.resume_from_scratch(&rooms[199]).await;
    let opened = ChatRoom::new(new_doc(303).unwrap());
    apply_bytes(opened.doc(), resumed[0].update.as_deref().unwrap()).unwrap();
    assert_eq!(opened.unread_count("alice"), 3);

    // The inbox stays live: Bob writes in a room the fresh device has not opened.
    // (A replica of its own: a fresh document under the client id 202 would re-use clocks.)
    let theirs = ChatRoom::new(new_doc(204).unwrap());
    let (_, update) = theirs.send(&bob, "are you there?", now_ms());
    batch += 1;
    b.push(&rooms[7], batch, update).await.unwrap();
    let (changed, changed_version) = fresh
        .recv_until(|f| match f {
            ServerFrame::Inbox { rooms, version, .. } => Some((rooms.clone(), *version)),
            _ => None,
        })
        .await;
    assert!(changed_version > version);
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].room, rooms[7]);
    assert_eq!(changed[0].unread, 4);
    assert_eq!(changed[0].last.as_ref().unwrap().text, "are you there?");
    // Asked again from the last version: nothing new, one (empty) frame.
    let (frames, nothing, _) = inbox(&mut fresh, changed_version).await;
    assert_eq!((frames, nothing.len()), (1, 0));

    // Members: status from presence, last seen kept by the server.
    b.send(&ClientFrame::Presence {
        doc: rooms[7].clone(),
        state: Some(r#"{"name":"Bob","status":"away"}"#.into()),
    })
    .await;
    fresh.resume_from_scratch(&rooms[7]).await;
    drop(a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let members = loop {
        fresh.send(&ClientFrame::Members { room: rooms[7].clone() }).await;
        let members = fresh
            .recv_until(|f| match f {
                ServerFrame::Members { members, .. } => Some(members.clone()),
                _ => None,
            })
            .await;
        let alice_seen = members.iter().any(|m| m.user == "alice" && m.last_seen_ms.is_some());
        let bob_away = members
            .iter()
            .any(|m| m.user == "bob" && m.status.as_deref() == Some("away"));
        if (alice_seen && bob_away) || tokio::time::Instant::now() > deadline {
            break members;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let by_user: BTreeMap<&str, _> = members.iter().map(|m| (m.user.as_str(), m)).collect();
    assert_eq!(by_user.len(), 2, "{members:?}");
    assert!(by_user["alice"].joined && by_user["bob"].joined);
    assert_eq!(by_user["bob"].status.as_deref(), Some("away"), "{members:?}");
    assert_eq!(
        by_user["alice"].status, None,
        "alice has no presence there: {members:?}"
    );
    assert!(by_user["alice"].last_seen_ms.is_some(), "{members:?}");
    server.stop().await;
}

/// Leaving writes a system message and takes the room out of the inbox; nobody joins or
/// leaves for somebody else.
#[tokio::test]
async fn leaving_and_forged_memberships() {
    let (_dir, store, server) = start().await;
    let url = server.url();
    let room = DocId::new("chat/lobby").unwrap();
    let mut a = NativeClient::connect(&url, &token("alice"), 111).await;
    let mine = ChatRoom::new(new_doc(111).unwrap());
    a.resume_from_scratch(&room).await;
    a.push(&room, 1, mine.join(&author("alice", "p"), 10).unwrap())
        .await
        .unwrap();
    assert_eq!(store.inbox("alice", 0).await.unwrap().rooms.len(), 1);

    // Mallory writes Alice's membership: refused, nothing stored.
    let mut m = NativeClient::connect(&url, &token("mallory"), 222).await;
    m.resume_from_scratch(&room).await;
    let forged = new_doc(222).unwrap();
    let members = forged.get_or_insert_map(MEMBERS_ROOT);
    let update = {
        let mut txn = forged.transact_mut();
        members.insert(
            &mut txn,
            "alice",
            Any::from(std::collections::HashMap::from([
                ("state".to_string(), Any::from("left")),
                ("at".to_string(), Any::from(20.0)),
            ])),
        );
        txn.encode_update_v1()
    };
    assert_eq!(m.push(&room, 1, update).await, Err(ErrorCode::SchemaViolation));
    assert_eq!(store.inbox("alice", 0).await.unwrap().rooms.len(), 1);
    assert!(store
        .members("chat/lobby")
        .await
        .unwrap()
        .iter()
        .all(|m| m.user != "mallory"));

    // Alice leaves: a system message, and the room is gone from her inbox.
    a.push(&room, 2, mine.leave(&author("alice", "p"), 30).unwrap())
        .await
        .unwrap();
    let mut checked = false;
    for _ in 0..100 {
        let resumed = m.resume_from_scratch(&room).await;
        let replica = ChatRoom::new(new_doc(5).unwrap());
        apply_bytes(replica.doc(), resumed[0].update.as_deref().unwrap_or(&[0, 0])).unwrap();
        let texts: Vec<String> = replica.messages().into_iter().map(|m| m.text).collect();
        if texts == ["alice joined", "alice left"] {
            checked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(checked, "the system messages of the join and the leave");
    assert!(store.inbox("alice", 0).await.unwrap().rooms.is_empty());
    let members = store.members("chat/lobby").await.unwrap();
    assert_eq!(members.len(), 1);
    assert!(!members[0].joined);
    server.stop().await;
}

/// A peer repeating its inbox request as fast as it can costs one read of the store per
/// pacing interval, not one per frame: the requests are answered together.
#[tokio::test]
async fn repeated_inbox_requests_are_answered_together() {
    let (_dir, _store, server) = start().await;
    let url = server.url();
    let mut a = NativeClient::connect(&url, &token("alice"), 121).await;
    let room = DocId::new("chat/busy").unwrap();
    a.resume_from_scratch(&room).await;
    let mine = ChatRoom::new(new_doc(121).unwrap());
    a.push(&room, 1, mine.join(&author("alice", "p"), 10).unwrap())
        .await
        .unwrap();
    for _ in 0..300 {
        a.send(&ClientFrame::Inbox { since: 0 }).await;
    }
    // Every answer that comes within a second, each the whole (one-room) inbox.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut answers = 0;
    while let Ok(Some(frame)) = a.recv_within(deadline - tokio::time::Instant::now()).await {
        if let ServerFrame::Inbox { rooms, .. } = frame {
            assert_eq!(rooms.len(), 1);
            answers += 1;
        }
    }
    assert!(
        (1..=6).contains(&answers),
        "300 requests in a burst were answered {answers} times"
    );
    // Still served: a later request is answered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (frames, rooms, _) = inbox(&mut a, 0).await;
    assert_eq!((frames, rooms.len()), (1, 1));
    server.stop().await;
}
