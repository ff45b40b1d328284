//! Authorization and the chat rules over real loopback sockets, on a server with a secret.
//!
//! Every refusal is checked three ways: the sender gets the typed error, the store holds nothing
//! of the refused write, and the connection's other documents keep working.

use std::time::Duration;

use driftsync_engine::chat::{Author, ChatRoom, MESSAGES_ROOT};
use driftsync_engine::doc::{self, load_document, new_doc};
use driftsync_engine::store::{SqliteStore, Store};
use driftsync_protocol::yjs::{AuthMessage, YMessage};
use driftsync_protocol::{
    ClientFrame, Cursor, DocId, ErrorCode, ResumeDoc, ServerFrame, CLOSE_UNAUTHORIZED, DEFAULT_MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
};
use driftsync_server::auth::{now_secs, sign};
use driftsync_server::{mint, Auth, Claims, Config};
use driftsync_tests::{sqlite_store, NativeClient, TestServer, TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use yrs::{Doc, Map, Out, Transact};

const SECRET: &str = "integration-test-secret";

fn doc_id(s: &str) -> DocId {
    DocId::new(s).unwrap()
}

/// A token signed with the server's secret, valid for an hour.
fn token(user: &str, docs: &[&str], write: bool) -> String {
    let docs: Vec<String> = docs.iter().map(|d| d.to_string()).collect();
    mint(SECRET, user, &docs, write, Duration::from_secs(3600)).unwrap()
}

/// A server with a secret; the returned store is a handle on the server's own database.
async fn start() -> (tempfile::TempDir, SqliteStore, TestServer) {
    let (dir, store) = sqlite_store().await;
    let config = Config {
        auth: Auth::new(Some(SECRET)),
        ..Default::default()
    };
    let server = TestServer::start(store.clone(), config).await;
    (dir, store, server)
}

/// The stored head cursor of a document and the document rebuilt from the store.
async fn stored(store: &SqliteStore, doc: &DocId) -> (Cursor, Doc) {
    let stored = store.load(doc.as_str()).await.unwrap().unwrap_or_default();
    let rebuilt = load_document(doc.as_str(), &stored, 1).unwrap();
    (stored.head, rebuilt)
}

/// Resumes `docs` from nothing; returns the documents resumed and the per-document errors.
async fn resume(c: &mut NativeClient, docs: &[&DocId]) -> (Vec<DocId>, Vec<(ErrorCode, DocId)>) {
    let docs = docs
        .iter()
        .map(|&d| ResumeDoc {
            doc: d.clone(),
            cursor: 0,
            state_vector: vec![0],
        })
        .collect();
    c.send(&ClientFrame::Resume { docs }).await;
    let mut errors = Vec::new();
    loop {
        match c.recv().await {
            Some(ServerFrame::Error {
                code, doc: Some(doc), ..
            }) => errors.push((code, doc)),
            Some(ServerFrame::Resumed { docs }) => return (docs.into_iter().map(|d| d.doc).collect(), errors),
            Some(_) => continue,
            None => panic!("connection closed during a resume"),
        }
    }
}

/// Pushes one batch and waits for its acknowledgement or refusal.
async fn push(c: &mut NativeClient, doc: &DocId, batch: u64, update: Vec<u8>) -> Result<Cursor, ErrorCode> {
    c.push(doc, batch, update).await
}

/// A text update from a fresh replica.
fn text_update(client: u64, text: &str) -> Vec<u8> {
    doc::text_insert(&new_doc(client).unwrap(), 0, text).unwrap()
}

fn who(user: &str, device: &str) -> Author {
    Author {
        user: user.into(),
        device: device.into(),
    }
}

/// The messages of a stored chat room: `(author, text)`, in order.
fn messages(doc: Doc) -> Vec<(String, String)> {
    ChatRoom::new(doc)
        .messages()
        .into_iter()
        .map(|m| (m.author, m.text))
        .collect()
}

/// Says hello with `token` and pushes right away (pipelined, before any answer); expects the
/// refusal `code`, a close with [`CLOSE_UNAUTHORIZED`], and nothing stored.
async fn refused_at_hello(server: &TestServer, store: &SqliteStore, token: &str, code: ErrorCode) {
    let d = doc_id("notes/hello");
    let mut c = NativeClient::connect_raw(&server.url()).await;
    c.send(&ClientFrame::Hello {
        version: PROTOCOL_VERSION,
        token: token.into(),
        client_id: 7,
    })
    .await;
    c.send(&ClientFrame::Resume {
        docs: vec![ResumeDoc {
            doc: d.clone(),
            cursor: 0,
            state_vector: vec![0],
        }],
    })
    .await;
    c.send(&ClientFrame::Push {
        doc: d.clone(),
        batch: 1,
        update: text_update(7, "sneaky"),
    })
    .await;
    assert_eq!(
        c.recv().await,
        Some(ServerFrame::Error {
            code,
            doc: None,
            batch: None
        })
    );
    assert_eq!(c.close_code().await, Some(CLOSE_UNAUTHORIZED));
    assert_eq!(stored(store, &d).await.0, 0, "nothing stored");
}

#[tokio::test]
async fn hello_without_a_valid_token_is_refused() {
    let (_dir, store, server) = start().await;
    refused_at_hello(&server, &store, "", ErrorCode::Unauthorized).await;
    refused_at_hello(&server, &store, "not-a-token", ErrorCode::Unauthorized).await;
    let expired = Claims {
        sub: "ada".into(),
        docs: vec!["*".into()],
        write: true,
        exp: now_secs() - 10,
        iat: None,
    };
    refused_at_hello(
        &server,
        &store,
        &sign(SECRET, &expired).unwrap(),
        ErrorCode::TokenExpired,
    )
    .await;
    let forged = mint("another-secret", "ada", &["*".into()], true, Duration::from_secs(3600)).unwrap();
    refused_at_hello(&server, &store, &forged, ErrorCode::Unauthorized).await;
    // A good token still gets in.
    let mut ok = NativeClient::connect(&server.url(), &token("ada", &["*"], true), 8).await;
    let d = doc_id("notes/hello");
    resume(&mut ok, &[&d]).await;
    assert_eq!(push(&mut ok, &d, 1, text_update(8, "hi")).await, Ok(1));
    server.stop().await;
}

#[tokio::test]
async fn a_document_outside_the_token_is_forbidden_and_the_others_work() {
    let (_dir, store, server) = start().await;
    let mine = doc_id("notes/mine");
    let theirs = doc_id("notes/theirs");
    let mut c = NativeClient::connect(&server.url(), &token("ada", &["notes/mine", "chat/*"], true), 11).await;
    let (resumed, errors) = resume(&mut c, &[&theirs, &mine]).await;
    assert_eq!(resumed, vec![mine.clone()]);
    assert_eq!(errors, vec![(ErrorCode::Forbidden, theirs.clone())]);
    // Not subscribed, so a push is refused; nothing is stored.
    assert_eq!(
        push(&mut c, &theirs, 1, text_update(11, "x")).await,
        Err(ErrorCode::NotSubscribed)
    );
    assert_eq!(stored(&store, &theirs).await.0, 0);
    assert_eq!(push(&mut c, &mine, 2, text_update(12, "y")).await, Ok(1));
    server.stop().await;
}

#[tokio::test]
async fn a_read_only_token_receives_but_cannot_write() {
    let (_dir, store, server) = start().await;
    let shared = doc_id("notes/shared");
    let other = doc_id("notes/other");
    let mut writer = NativeClient::connect(&server.url(), &token("ada", &["notes/*"], true), 21).await;
    let mut reader = NativeClient::connect(&server.url(), &token("bob", &["notes/*"], false), 22).await;
    resume(&mut writer, &[&shared, &other]).await;
    let (resumed, errors) = resume(&mut reader, &[&shared, &other]).await;
    assert_eq!((resumed.len(), errors), (2, vec![]));

    assert_eq!(
        push(&mut reader, &shared, 1, text_update(22, "nope")).await,
        Err(ErrorCode::ReadOnly)
    );
    assert_eq!(stored(&store, &shared).await.0, 0, "the read-only write is not stored");

    // The reader still receives the others' updates, on both documents.
    for (d, client, text) in [(&shared, 23, "from ada"), (&other, 24, "more")] {
        assert_eq!(push(&mut writer, d, 1, text_update(client, text)).await, Ok(1));
        let update = reader
            .recv_until(|f| match f {
                ServerFrame::Update { doc, update, .. } if doc == d => Some(update.clone()),
                _ => None,
            })
            .await;
        let local = new_doc(99).unwrap();
        doc::apply_bytes(&local, &update).unwrap();
        assert_eq!(doc::text(&local), text);
    }
    assert_eq!(doc::text(&stored(&store, &shared).await.1), "from ada");
    server.stop().await;
}

/// Ada and Mallory in `chat/room`, each also subscribed to a notes document.
struct Chat {
    server_url: String,
    room: DocId,
    notes: DocId,
    ada: NativeClient,
    mallory: NativeClient,
    /// Ada's replica of the room.
    ada_room: ChatRoom,
    /// The id of Ada's first message, stored at cursor 1.
    first: String,
}

async fn chat(server: &TestServer) -> Chat {
    let room = doc_id("chat/room");
    let notes = doc_id("notes/side");
    let mut ada = NativeClient::connect(&server.url(), &token("ada", &["chat/*", "notes/*"], true), 31).await;
    let mut mallory = NativeClient::connect(&server.url(), &token("mallory", &["chat/*", "notes/*"], true), 32).await;
    resume(&mut ada, &[&room, &notes]).await;
    resume(&mut mallory, &[&room, &notes]).await;
    let ada_room = ChatRoom::new(new_doc(31).unwrap());
    let (first, update) = ada_room.send(&who("ada", "laptop"), "hello", 1_000);
    assert_eq!(push(&mut ada, &room, 1, update).await, Ok(1));
    Chat {
        server_url: server.url(),
        room,
        notes,
        ada,
        mallory,
        ada_room,
        first,
    }
}

/// Mallory's replica of the room, holding what Ada has sent, editing as `client`.
fn mallory_replica(chat: &Chat, client: u64) -> ChatRoom {
    let replica = ChatRoom::new(new_doc(client).unwrap());
    doc::apply_bytes(replica.doc(), &doc::encode_state(chat.ada_room.doc())).unwrap();
    replica
}

/// After a refusal: nothing more is stored in the room, Ada saw nothing, and Mallory's
/// connection still works — on the notes document and, with a legitimate message, in the room.
async fn after_refusal(chat: &mut Chat, store: &SqliteStore, client: u64) {
    let (head, doc) = stored(store, &chat.room).await;
    assert_eq!(head, 1, "nothing of the refused update is stored");
    assert_eq!(messages(doc), vec![("ada".to_string(), "hello".to_string())]);
    assert_eq!(
        chat.ada.recv_within(Duration::from_millis(200)).await,
        Err(()),
        "Ada received nothing"
    );

    assert_eq!(
        push(&mut chat.mallory, &chat.notes, 100, text_update(client, "notes"))
            .await
            .map(|_| ()),
        Ok(())
    );
    // A fresh replica: the refused update's successors from the old one would depend on it.
    let legit = mallory_replica(chat, client + 1);
    let (_, update) = legit.send(&who("mallory", "phone"), "my own words", 2_000);
    assert_eq!(push(&mut chat.mallory, &chat.room, 101, update).await, Ok(2));
    let expected = vec![
        ("ada".to_string(), "hello".to_string()),
        ("mallory".to_string(), "my own words".to_string()),
    ];
    assert_eq!(messages(stored(store, &chat.room).await.1), expected);
    // The live room was reloaded from the store: a newcomer receives only what is stored.
    let mut newcomer = NativeClient::connect(&chat.server_url, &token("carol", &["chat/*"], false), client + 2).await;
    newcomer
        .send(&ClientFrame::Resume {
            docs: vec![ResumeDoc {
                doc: chat.room.clone(),
                cursor: 0,
                state_vector: vec![0],
            }],
        })
        .await;
    let ServerFrame::Resumed { docs } = newcomer
        .recv_until(|f| matches!(f, ServerFrame::Resumed { .. }).then(|| f.clone()))
        .await
    else {
        unreachable!()
    };
    let replica = new_doc(client + 3).unwrap();
    doc::apply_bytes(&replica, docs[0].update.as_deref().unwrap()).unwrap();
    let seen = ChatRoom::new(replica);
    assert_eq!(
        seen.messages()
            .into_iter()
            .map(|m| (m.author, m.text))
            .collect::<Vec<_>>(),
        expected
    );
    assert!(seen.receipts().is_empty());
}

#[tokio::test]
async fn a_chat_message_with_a_forged_author_is_refused() {
    let (_dir, store, server) = start().await;
    let mut chat = chat(&server).await;
    let replica = mallory_replica(&chat, 41);
    let (_, forged) = replica.send(&who("ada", "phone"), "I am ada", 1_500);
    assert_eq!(
        push(&mut chat.mallory, &chat.room, 1, forged).await,
        Err(ErrorCode::SchemaViolation)
    );
    after_refusal(&mut chat, &store, 42).await;
    server.stop().await;
}

#[tokio::test]
async fn a_receipt_written_for_another_user_is_refused() {
    let (_dir, store, server) = start().await;
    let mut chat = chat(&server).await;
    let replica = mallory_replica(&chat, 51);
    let forged = replica
        .mark_read(&who("ada", "phone"), &chat.first, 1_500)
        .unwrap()
        .unwrap();
    assert_eq!(
        push(&mut chat.mallory, &chat.room, 1, forged).await,
        Err(ErrorCode::SchemaViolation)
    );
    assert!(ChatRoom::new(stored(&store, &chat.room).await.1).receipts().is_empty());
    after_refusal(&mut chat, &store, 52).await;
    // Her own receipt is fine. (From a replica of her own: in `after_refusal` client id 53 wrote
    // "my own words" and 54 is Carol's; a new replica under 53 would rewrite those clocks, which
    // yrs ignores, and the server acknowledges as a change to nothing.)
    let own = mallory_replica(&chat, 55);
    let receipt = own
        .mark_read(&who("mallory", "phone"), &chat.first, 3_000)
        .unwrap()
        .unwrap();
    assert_eq!(push(&mut chat.mallory, &chat.room, 102, receipt).await, Ok(3));
    server.stop().await;
}

#[tokio::test]
async fn editing_or_deleting_someone_elses_message_is_refused() {
    let (_dir, store, server) = start().await;
    let mut chat = chat(&server).await;
    for (client, fields) in [
        (61, vec![("text", yrs::Any::from("forged words"))]),
        (
            62,
            vec![("text", yrs::Any::from("")), ("deleted", yrs::Any::from(true))],
        ),
        (63, vec![("author", yrs::Any::from("mallory"))]),
    ] {
        // ChatRoom refuses to edit another's message, so Mallory writes the map directly.
        let replica = mallory_replica(&chat, client);
        let root = replica.doc().get_or_insert_map(MESSAGES_ROOT);
        let message = match root.get(&replica.doc().transact(), &chat.first) {
            Some(Out::YMap(message)) => message,
            other => panic!("no message map: {other:?}"),
        };
        let mut txn = replica.doc().transact_mut();
        for (key, value) in fields {
            message.insert(&mut txn, key, value);
        }
        let update = txn.encode_update_v1();
        drop(txn);
        assert_eq!(
            push(&mut chat.mallory, &chat.room, client, update).await,
            Err(ErrorCode::SchemaViolation)
        );
        let (head, doc) = stored(&store, &chat.room).await;
        assert_eq!(
            (head, messages(doc)),
            (1, vec![("ada".to_string(), "hello".to_string())])
        );
    }
    after_refusal(&mut chat, &store, 64).await;
    // Ada edits and deletes her own message.
    let edit = chat
        .ada_room
        .edit(&who("ada", "laptop"), &chat.first, "hello!", 3_000)
        .unwrap();
    assert_eq!(push(&mut chat.ada, &chat.room, 2, edit).await, Ok(3));
    let delete = chat.ada_room.delete(&who("ada", "laptop"), &chat.first, 4_000).unwrap();
    assert_eq!(push(&mut chat.ada, &chat.room, 3, delete).await, Ok(4));
    server.stop().await;
}

#[tokio::test]
async fn an_expired_token_refuses_writes_until_reauth() {
    let (_dir, store, server) = start().await;
    let d = doc_id("notes/expiring");
    let other = doc_id("notes/kept");
    let claims = Claims {
        sub: "ada".into(),
        docs: vec!["notes/*".into()],
        write: true,
        exp: now_secs() + 1,
        iat: None,
    };
    let mut c = NativeClient::connect(&server.url(), &sign(SECRET, &claims).unwrap(), 71).await;
    resume(&mut c, &[&d, &other]).await;
    // Wait until the token is past its expiry second.
    while now_secs() <= claims.exp {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Refused as expired, or — if the server's expiry timer has fired already (it fires within
    // the second after `exp`) — as not subscribed any more: access ended with the token.
    let late = push(&mut c, &d, 1, text_update(71, "late")).await;
    assert!(
        matches!(late, Err(ErrorCode::TokenExpired | ErrorCode::NotSubscribed)),
        "{late:?}"
    );
    assert_eq!(stored(&store, &d).await.0, 0);

    // A fresh token for the same user restores writing; one covering fewer documents
    // unsubscribes the others (`Forbidden` each), and no resume opens them again. (Resumed
    // again here because the expiry may have unsubscribed everything already.)
    c.send(&ClientFrame::Reauth {
        token: token("ada", &["notes/expiring"], true),
    })
    .await;
    let (resumed, refused) = resume(&mut c, &[&d, &other]).await;
    assert_eq!(resumed, vec![d.clone()]);
    assert!(!refused.is_empty(), "the other document is refused");
    assert!(
        refused.iter().all(|r| r == &(ErrorCode::Forbidden, other.clone())),
        "{refused:?}"
    );
    assert_eq!(push(&mut c, &d, 2, text_update(72, "on time")).await, Ok(1));
    assert_eq!(
        push(&mut c, &other, 3, text_update(73, "gone")).await,
        Err(ErrorCode::NotSubscribed)
    );

    // A token for another user ends the connection.
    c.send(&ClientFrame::Reauth {
        token: token("mallory", &["*"], true),
    })
    .await;
    assert_eq!(
        c.recv().await,
        Some(ServerFrame::Error {
            code: ErrorCode::Unauthorized,
            doc: None,
            batch: None
        })
    );
    assert_eq!(c.close_code().await, Some(CLOSE_UNAUTHORIZED));
    assert_eq!(stored(&store, &d).await.0, 1);
    server.stop().await;
}

/// A raw y-websocket connection: the next y-protocols message, skipping pings.
async fn next_y(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
) -> Option<YMessage> {
    loop {
        match tokio::time::timeout(TIMEOUT, ws.next()).await.expect("timed out") {
            Some(Ok(Message::Binary(bytes))) => return Some(YMessage::decode(&bytes, DEFAULT_MAX_FRAME_SIZE).unwrap()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn yjs_connections_are_authorized_too() {
    let (_dir, store, server) = start().await;
    let url = |doc: &str, token: &str| format!("{}/yjs/{doc}?token={token}", server.url());
    let d = doc_id("notes/yjs");
    let denied = |m: &Option<YMessage>| matches!(m, Some(YMessage::Auth(AuthMessage::PermissionDenied { .. })));

    // No token, a forged one, and a token for other documents: permission denied, then closed.
    let forged = mint("another-secret", "ada", &["*".into()], true, Duration::from_secs(3600)).unwrap();
    for url in [
        format!("{}/yjs/notes/yjs", server.url()),
        url("notes/yjs", &forged),
        url("notes/yjs", &token("ada", &["chat/*"], true)),
    ] {
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        assert!(denied(&next_y(&mut ws).await));
        assert_eq!(next_y(&mut ws).await, None);
    }

    // Read-only: it syncs, but its writes are denied and never stored.
    let (mut ws, _) = tokio_tungstenite::connect_async(url("notes/yjs", &token("bob", &["notes/*"], false)))
        .await
        .unwrap();
    assert!(matches!(next_y(&mut ws).await, Some(YMessage::SyncStep1(_))));
    let update = text_update(81, "from yjs");
    for message in [YMessage::Update(update.clone()), YMessage::SyncStep2(update)] {
        ws.send(Message::Binary(message.encode().into())).await.unwrap();
        loop {
            let next = next_y(&mut ws).await;
            if denied(&next) {
                break;
            }
            assert!(next.is_some(), "connection closed");
        }
    }
    assert_eq!(stored(&store, &d).await.0, 0);

    // A writable token writes.
    let (mut ws, _) = tokio_tungstenite::connect_async(url("notes/yjs", &token("ada", &["notes/*"], true)))
        .await
        .unwrap();
    assert!(matches!(next_y(&mut ws).await, Some(YMessage::SyncStep1(_))));
    ws.send(Message::Binary(
        YMessage::Update(text_update(82, "written")).encode().into(),
    ))
    .await
    .unwrap();
    assert!(
        driftsync_tests::eventually(|| {
            let store = store.clone();
            let d = d.clone();
            async move { stored(&store, &d).await.0 == 1 }
        })
        .await
    );
    server.stop().await;
}

/// The chat rules of "Chat as users expect it" on a real server: a delivery receipt for another
/// user, a reaction in someone else's name, a system message written by a client, and metadata
/// or attachments of someone else's message are each refused, and nothing of them is stored.
#[tokio::test]
async fn forged_deliveries_reactions_system_messages_and_details_are_refused() {
    use driftsync_engine::chat::{Attachment, Kind, NewMessage, DELIVERED_ROOT, REACTIONS_ROOT};
    let (_dir, store, server) = start().await;
    let mut chat = chat(&server).await;
    let mallory = who("mallory", "phone");
    let replica = mallory_replica(&chat, 71);
    let delivered = replica
        .mark_delivered(&who("ada", "phone"), &chat.first, 1_500)
        .unwrap()
        .unwrap();
    let replica = mallory_replica(&chat, 72);
    let reaction = replica
        .react(&who("ada", "phone"), &chat.first, "👎", true, 1_500)
        .unwrap()
        .unwrap();
    let replica = mallory_replica(&chat, 73);
    let system = NewMessage {
        kind: Kind::System,
        ..NewMessage::text("ada left")
    };
    let (_, system) = replica.send_message(&mallory, &system, 1_500).unwrap();
    let details = |client: u64, key: &str, value: yrs::Any| {
        let replica = mallory_replica(&chat, client);
        let root = replica.doc().get_or_insert_map(MESSAGES_ROOT);
        let Some(Out::YMap(message)) = root.get(&replica.doc().transact(), &chat.first) else {
            panic!("no message map")
        };
        let mut txn = replica.doc().transact_mut();
        message.insert(&mut txn, key, value);
        txn.encode_update_v1()
    };
    let picture = Attachment {
        url: "https://evil.example/x.png".into(),
        mime: "image/png".into(),
        size: 1,
        ..Attachment::default()
    };
    let meta = details(
        74,
        "meta",
        yrs::Any::from(std::collections::HashMap::from([(
            "k".to_string(),
            yrs::Any::from("v"),
        )])),
    );
    let attachments = details(75, "attachments", yrs::Any::from(vec![picture.to_any()]));
    for (batch, update) in [delivered, reaction, system, meta, attachments].into_iter().enumerate() {
        assert_eq!(
            push(&mut chat.mallory, &chat.room, batch as u64 + 1, update).await,
            Err(ErrorCode::SchemaViolation),
            "update {batch}"
        );
        let (head, doc) = stored(&store, &chat.room).await;
        assert_eq!(head, 1, "nothing of update {batch} is stored");
        for root in [DELIVERED_ROOT, REACTIONS_ROOT] {
            let map = doc.get_or_insert_map(root);
            assert_eq!(map.len(&doc.transact()), 0, "{root} after update {batch}");
        }
    }
    // Her own reaction and delivery receipt are fine.
    let own = mallory_replica(&chat, 76);
    let reaction = own.react(&mallory, &chat.first, "👍", true, 2_000).unwrap().unwrap();
    assert_eq!(push(&mut chat.mallory, &chat.room, 10, reaction).await, Ok(2));
    let receipt = own.mark_delivered(&mallory, &chat.first, 2_001).unwrap().unwrap();
    assert_eq!(push(&mut chat.mallory, &chat.room, 11, receipt).await, Ok(3));
    server.stop().await;
}
