//! Hostile presence and hostile chat stamps over real loopback sockets, on a server with a secret.
//!
//! Bob, with a read-only or a read-write token, attacks Ada's presence from a y-websocket
//! connection: he sets her Yjs client's state, freezes it with the largest clock JavaScript can
//! hold, removes it, and sets the entry of her native session. Every attempt is refused; a third
//! user's native connection sees none of it, keeps seeing Ada's renewals, and sees her own removal.
//! In a chat room, a message stamped with an overflowing HLC is refused and never stored.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use driftsync_engine::chat::{Author, ChatRoom, MESSAGES_ROOT};
use driftsync_engine::doc::{self, load_document, new_doc};
use driftsync_engine::store::{SqliteStore, Store};
use driftsync_protocol::yjs::{AwarenessEntry, YMessage};
use driftsync_protocol::{ClientFrame, DocId, ErrorCode, ServerFrame, DEFAULT_MAX_FRAME_SIZE};
use driftsync_server::{mint, Auth, Config};
use driftsync_tests::{sqlite_store, NativeClient, TestServer, TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use yrs::{Any, Map, MapPrelim, Transact};

const SECRET: &str = "hostile-presence-secret";

/// The largest clock a JavaScript number holds exactly: the "freeze" of the attack.
const FROZEN: u64 = (1 << 53) - 1;

/// Ada's Yjs client id (a y-websocket client's random 32-bit id).
const ADA: u64 = 3_141_592_653;
/// Bob's own Yjs client id.
const BOB: u64 = 2_718_281_828;

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

fn entry(client_id: u64, clock: u64, state: Option<&str>) -> AwarenessEntry {
    AwarenessEntry {
        client_id,
        clock,
        state: state.map(str::to_owned),
    }
}

/// A raw y-websocket connection.
struct Yjs {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Yjs {
    /// Connects to `/yjs/{doc}?token=…` and waits for the server's SyncStep1.
    async fn connect(server: &TestServer, doc: &DocId, token: &str) -> Yjs {
        let url = format!("{}/yjs/{}?token={token}", server.url(), doc.as_str());
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
        let mut yjs = Yjs { ws };
        assert!(matches!(yjs.recv().await, Some(YMessage::SyncStep1(_))));
        yjs
    }

    async fn awareness(&mut self, entries: Vec<AwarenessEntry>) {
        let bytes = YMessage::Awareness(entries).encode();
        self.ws.send(Message::Binary(bytes.into())).await.expect("send");
    }

    /// The next y-protocols message (the heartbeat's empty awareness messages skipped), or
    /// `None` once the connection closed.
    async fn recv(&mut self) -> Option<YMessage> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
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
}

/// What a native observer saw: every presence event, and the current state per peer.
struct Observer {
    client: NativeClient,
    /// Every presence event: `(peer, user, state)`.
    log: Vec<(u64, String, Option<String>)>,
    /// The current state per peer (`None`: left).
    states: HashMap<u64, (String, Option<String>)>,
}

impl Observer {
    /// Connects as `user` (read-only) and subscribes `doc`.
    async fn connect(server: &TestServer, doc: &DocId, user: &str, client_id: u64) -> Observer {
        let mut client = NativeClient::connect(&server.url(), &token(user, &["notes/*"], false), client_id).await;
        client.resume_from_scratch(doc).await;
        Observer {
            client,
            log: Vec::new(),
            states: HashMap::new(),
        }
    }

    /// Receives presence events until `done` holds.
    async fn until(&mut self, what: &str, mut done: impl FnMut(&Observer) -> bool) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while !done(self) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.client.recv_within(left).await {
                Ok(Some(ServerFrame::Presence { peer, user, state, .. })) => {
                    self.log.push((peer, user.clone(), state.clone()));
                    self.states.insert(peer, (user, state));
                }
                Ok(Some(_)) => {}
                Ok(None) => panic!("the observer's connection closed while waiting for {what}"),
                Err(()) => panic!("timed out waiting for {what}; saw {:?}", self.log),
            }
        }
    }

    /// The current state of `peer` and the user it was announced for.
    fn state(&self, peer: u64) -> Option<(&str, Option<&str>)> {
        self.states
            .get(&peer)
            .map(|(user, state)| (user.as_str(), state.as_deref()))
    }

    /// Whether any event so far announced `peer` for `user` or with a state containing `text`.
    fn touched(&self, peer: u64, user: &str, text: &str) -> bool {
        self.log
            .iter()
            .any(|(p, u, s)| *p == peer && (u == user || s.as_deref().is_some_and(|s| s.contains(text))))
    }
}

/// Bob (read-only or read-write) tries every hijack of Ada's presence; each is refused.
async fn hijack_is_refused(bob_writes: bool) {
    let (_dir, _store, server) = start().await;
    let d = doc_id("notes/presence");
    let mut carol = Observer::connect(&server, &d, "carol", 9).await;

    // Ada: a Yjs client and a native session.
    let ada_token = token("ada", &["notes/*"], true);
    let mut ada = Yjs::connect(&server, &d, &ada_token).await;
    ada.awareness(vec![entry(ADA, 1, Some(r#"{"user":"ada","n":1}"#))])
        .await;
    let mut ada_native = NativeClient::connect(&server.url(), &ada_token, 11).await;
    ada_native.resume_from_scratch(&d).await;
    let native = ada_native.session;
    ada_native
        .send(&ClientFrame::Presence {
            doc: d.clone(),
            state: Some(r#"{"user":"ada-native","n":1}"#.into()),
        })
        .await;
    carol
        .until("Ada's two states", |c| {
            c.state(ADA) == Some(("ada", Some(r#"{"user":"ada","n":1}"#)))
                && c.state(native) == Some(("ada", Some(r#"{"user":"ada-native","n":1}"#)))
        })
        .await;

    // Bob attacks, one message per attempt, then sets his own state: once Carol sees that, every
    // attempt before it has been handled (one connection's messages are handled in order, and
    // the room broadcasts in order).
    let mut bob = Yjs::connect(&server, &d, &token("bob", &["notes/*"], bob_writes)).await;
    let forged = Some(r#"{"user":"bob-as-ada"}"#);
    for attack in [
        vec![entry(ADA, 2, forged)],
        vec![entry(ADA, FROZEN, forged)],
        vec![entry(ADA, 1, None)],
        vec![entry(ADA, 2, None)],
        vec![entry(ADA, FROZEN, None)],
        vec![entry(native, 2, forged)],
        vec![entry(native, FROZEN, forged)],
        vec![entry(native, 1, None)],
        // Hidden behind an entry of his own, in one message.
        vec![entry(BOB, 0, Some(r#"{"user":"bob","n":0}"#)), entry(ADA, 3, forged)],
    ] {
        bob.awareness(attack).await;
    }
    bob.awareness(vec![entry(BOB, 1, Some(r#"{"user":"bob","n":1}"#))])
        .await;
    carol
        .until("Bob's own state", |c| {
            c.state(BOB) == Some(("bob", Some(r#"{"user":"bob","n":1}"#)))
        })
        .await;
    assert!(
        !carol.touched(ADA, "bob", "bob-as-ada"),
        "Ada's Yjs entry was touched: {:?}",
        carol.log
    );
    assert!(
        !carol.touched(native, "bob", "bob-as-ada"),
        "Ada's native entry was touched: {:?}",
        carol.log
    );
    assert_eq!(carol.state(ADA), Some(("ada", Some(r#"{"user":"ada","n":1}"#))));

    // Ada's renewals keep being seen: the freeze did not take.
    ada.awareness(vec![entry(ADA, 2, Some(r#"{"user":"ada","n":2}"#))])
        .await;
    ada_native
        .send(&ClientFrame::Presence {
            doc: d.clone(),
            state: Some(r#"{"user":"ada-native","n":2}"#.into()),
        })
        .await;
    carol
        .until("Ada's renewals", |c| {
            c.state(ADA) == Some(("ada", Some(r#"{"user":"ada","n":2}"#)))
                && c.state(native) == Some(("ada", Some(r#"{"user":"ada-native","n":2}"#)))
        })
        .await;

    // A removal at her current clock is still not Bob's to make.
    bob.awareness(vec![entry(ADA, 2, None)]).await;
    bob.awareness(vec![entry(BOB, 2, Some(r#"{"user":"bob","n":2}"#))])
        .await;
    carol
        .until("Bob's second state", |c| {
            c.state(BOB) == Some(("bob", Some(r#"{"user":"bob","n":2}"#)))
        })
        .await;
    assert_eq!(carol.state(ADA), Some(("ada", Some(r#"{"user":"ada","n":2}"#))));

    // Ada's own removals work.
    ada.awareness(vec![entry(ADA, 3, None)]).await;
    ada_native
        .send(&ClientFrame::Presence {
            doc: d.clone(),
            state: None,
        })
        .await;
    carol
        .until("Ada's removals", |c| {
            c.state(ADA) == Some(("ada", None)) && c.state(native) == Some(("ada", None))
        })
        .await;

    // Her id stays hers while the server remembers it: Bob cannot take it now either.
    bob.awareness(vec![entry(ADA, 4, forged)]).await;
    bob.awareness(vec![entry(BOB, 3, Some(r#"{"user":"bob","n":3}"#))])
        .await;
    carol
        .until("Bob's third state", |c| {
            c.state(BOB) == Some(("bob", Some(r#"{"user":"bob","n":3}"#)))
        })
        .await;
    assert!(!carol.touched(ADA, "bob", "bob-as-ada"), "{:?}", carol.log);

    // What a newcomer is greeted with is the server's table: only Bob's own state.
    let mut dave = Yjs::connect(&server, &d, &token("dave", &["notes/*"], false)).await;
    assert_eq!(
        dave.recv().await,
        Some(YMessage::Awareness(vec![entry(
            BOB,
            3,
            Some(r#"{"user":"bob","n":3}"#)
        )]))
    );
    drop((ada, bob, dave));
    server.stop().await;
}

#[tokio::test]
async fn a_read_only_user_cannot_hijack_presence() {
    hijack_is_refused(false).await;
}

#[tokio::test]
async fn a_read_write_user_cannot_hijack_presence() {
    hijack_is_refused(true).await;
}

/// Wall-clock milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// An update inserting, from a fresh replica `client`, a message by `author` stamped `hlc`
/// (its sort key consistent with it), written field by field as a JavaScript client would.
fn stamped_message(client: u64, author: &str, hlc: &str) -> (String, Vec<u8>) {
    let replica = new_doc(client).unwrap();
    let id = uuid::Uuid::now_v7().to_string();
    let sort = format!("{hlc}/{client:016}/{id}");
    let fields = MapPrelim::from([
        ("id", Any::from(id.as_str())),
        ("author", Any::from(author)),
        ("device", Any::from("laptop")),
        ("client", Any::from(client as f64)),
        ("text", Any::from("I sort after everything, forever")),
        ("created", Any::from(now_ms() as f64)),
        ("hlc", Any::from(hlc)),
        ("sort", Any::from(sort)),
    ]);
    let messages = replica.get_or_insert_map(MESSAGES_ROOT);
    let mut txn = replica.transact_mut();
    messages.insert(&mut txn, id.as_str(), fields);
    let update = txn.encode_update_v1();
    (id, update)
}

/// Pushes one batch and waits for its acknowledgement or refusal.
async fn push(c: &mut NativeClient, doc: &DocId, batch: u64, update: Vec<u8>) -> Result<u64, ErrorCode> {
    c.push(doc, batch, update).await
}

/// The messages of a chat room document: `(author, text)`, in order.
fn messages(doc: yrs::Doc) -> Vec<(String, String)> {
    ChatRoom::new(doc)
        .messages()
        .into_iter()
        .map(|m| (m.author, m.text))
        .collect()
}

/// A message stamped with an overflowing HLC (or far ahead of the server's clock), pushed by its
/// own author, is refused and not stored; a normal one is acknowledged.
#[tokio::test]
async fn a_chat_message_with_an_overflowing_stamp_is_refused() {
    let (_dir, store, server) = start().await;
    let room = doc_id("chat/general");
    let mut ada = NativeClient::connect(&server.url(), &token("ada", &["chat/*"], true), 21).await;
    ada.resume_from_scratch(&room).await;

    let (_, overflow) = stamped_message(22, "ada", "999999999999999.4294967295");
    assert_eq!(
        push(&mut ada, &room, 1, overflow).await,
        Err(ErrorCode::SchemaViolation)
    );
    // A well-formed stamp an hour ahead of the server's clock is refused too.
    let ahead = format!("{:015}.{:010}", now_ms() + 3_600_000, 0);
    let (_, early) = stamped_message(23, "ada", &ahead);
    assert_eq!(push(&mut ada, &room, 2, early).await, Err(ErrorCode::SchemaViolation));

    // A message sent now is acknowledged.
    let ada_room = ChatRoom::new(new_doc(24).unwrap());
    let author = Author {
        user: "ada".into(),
        device: "laptop".into(),
    };
    let (_, hello) = ada_room.send(&author, "hello", now_ms());
    assert_eq!(push(&mut ada, &room, 3, hello).await, Ok(1));

    // Nothing of the refused messages is stored, and a fresh client sees only the normal one.
    let stored = store.load(room.as_str()).await.unwrap().unwrap_or_default();
    assert_eq!(stored.head, 1);
    let rebuilt = load_document(room.as_str(), &stored, 1).unwrap();
    let expected = vec![("ada".to_string(), "hello".to_string())];
    assert_eq!(messages(rebuilt), expected);
    let mut carol = NativeClient::connect(&server.url(), &token("carol", &["chat/*"], false), 25).await;
    let resumed = carol.resume_from_scratch(&room).await;
    let replica = new_doc(26).unwrap();
    doc::apply_bytes(&replica, resumed[0].update.as_deref().unwrap()).unwrap();
    assert_eq!(messages(replica), expected);
    server.stop().await;
}
