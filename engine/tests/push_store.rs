//! The push outbox (`Store::push_*`, ARCHITECTURE.md "Push notifications") on every backend:
//! a SQLite file (the write thread), SQLite in memory (sqlx), and PostgreSQL when
//! `DRIFTSYNC_TEST_POSTGRES_URL` is set (a schema of its own; skipped with a line otherwise).

use driftsync_engine::chat::{ChatFacts, MemberFact, MessageFact};
use driftsync_engine::store::{Append, PgStore, PushOutcome, PushSettings, SqliteStore, Store};

const POSTGRES_URL: &str = "DRIFTSYNC_TEST_POSTGRES_URL";
const ROOM: &str = "chat/push";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn members(users: &[&str]) -> Append {
    Append {
        doc: ROOM.into(),
        origin: None,
        update: b"members".to_vec(),
        chat: Some(Box::new(ChatFacts {
            messages: Vec::new(),
            edits: Vec::new(),
            reads: Vec::new(),
            members: users
                .iter()
                .map(|user| MemberFact {
                    user: user.to_string(),
                    joined: true,
                    at_ms: 1,
                })
                .collect(),
        })),
    }
}

fn message(id: &str, author: &str, system: bool) -> MessageFact {
    MessageFact {
        id: id.into(),
        sort: format!("000000000000001.0000000001/0000000000000001/{id}"),
        author: author.into(),
        kind: if system { "system".into() } else { "text".into() },
        preview: format!("text of {id}"),
        created_ms: 1,
        deleted: false,
    }
}

fn messages(list: Vec<MessageFact>) -> Append {
    Append {
        doc: ROOM.into(),
        origin: None,
        update: b"message".to_vec(),
        chat: Some(Box::new(ChatFacts {
            messages: list,
            edits: Vec::new(),
            reads: Vec::new(),
            members: Vec::new(),
        })),
    }
}

async fn users_pending<S: Store>(store: &S) -> Vec<String> {
    let mut users: Vec<String> = store
        .push_pending(100)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.user)
        .collect();
    users.sort();
    users
}

/// The whole life of notifications on one store.
async fn outbox<S: Store>(store: S) {
    store.append(&[members(&["alice", "bob", "carol"])]).await.unwrap();
    // Off: nothing owed.
    store
        .append(&[messages(vec![message("m0", "alice", false)])])
        .await
        .unwrap();
    assert!(store.push_pending(10).await.unwrap().is_empty());

    store.set_push(Some(PushSettings {
        grace_ms: 0,
        include_text: true,
    }));
    // A system message notifies nobody; alice's messages notify bob and carol, not alice.
    store
        .append(&[messages(vec![message("s1", "server", true)])])
        .await
        .unwrap();
    assert!(store.push_pending(10).await.unwrap().is_empty());
    store
        .append(&[messages(vec![message("m1", "alice", false)])])
        .await
        .unwrap();
    store
        .append(&[
            messages(vec![message("m2", "alice", false)]),
            messages(vec![message("m3", "alice", false)]),
        ])
        .await
        .unwrap();
    assert_eq!(users_pending(&store).await, ["bob", "carol"]);
    let stats = store.push_stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead), (2, 0));
    assert!(stats.oldest_created_ms.is_some());

    // Claimed once: a second claim under the lease gets nothing.
    let t = now() + 10;
    let mut claimed = store.push_claim(t, t + 60_000, 10).await.unwrap();
    claimed.sort_by(|a, b| a.user.cmp(&b.user));
    assert_eq!(claimed.len(), 2);
    assert!(store.push_claim(t, t + 60_000, 10).await.unwrap().is_empty());
    let (bob, carol) = (claimed[0].clone(), claimed[1].clone());
    assert_eq!((bob.user.as_str(), bob.unread, bob.attempts), ("bob", 3, 1));
    assert_eq!((bob.first_id.as_str(), bob.latest_id.as_str()), ("m1", "m3"));
    assert_eq!(
        (bob.latest_sender.as_str(), bob.latest_text.as_str()),
        ("alice", "text of m3")
    );

    // Bob's is delivered; carol's fails and waits.
    store.push_finish(&bob, &PushOutcome::Delivered, t).await.unwrap();
    store
        .push_finish(
            &carol,
            &PushOutcome::Retry {
                at_ms: t + 1_000,
                error: "500".into(),
            },
            t,
        )
        .await
        .unwrap();
    assert_eq!(users_pending(&store).await, ["carol"]);
    assert!(store.push_claim(t, t + 60_000, 10).await.unwrap().is_empty());
    // A message meanwhile coalesces into carol's (same id, more unread), starts a new one for bob.
    store
        .append(&[messages(vec![message("m4", "alice", false)])])
        .await
        .unwrap();
    let mut again = store.push_claim(t + 1_000, t + 61_000, 10).await.unwrap();
    again.sort_by(|a, b| a.user.cmp(&b.user));
    assert_eq!(again.len(), 2);
    assert_eq!((again[0].first_id.as_str(), again[0].unread), ("m4", 1));
    assert_eq!(
        (again[1].first_id.as_str(), again[1].unread, again[1].attempts),
        ("m1", 4, 2)
    );
    store.push_finish(&again[0], &PushOutcome::Delivered, t).await.unwrap();

    // Messages coalesced during an attempt become a new notification once it is delivered.
    store
        .append(&[messages(vec![message("m5", "bob", false)])])
        .await
        .unwrap();
    store.push_finish(&again[1], &PushOutcome::Delivered, t).await.unwrap();
    let next = store.push_claim(t + 2_000, t + 62_000, 10).await.unwrap();
    let carol_next = next
        .iter()
        .find(|due| due.user == "carol")
        .expect("carol's next notification");
    assert_eq!((carol_next.first_id.as_str(), carol_next.unread), ("m5", 1));

    // Dead letters show in the stats, and a new message starts over.
    store
        .push_finish(carol_next, &PushOutcome::Dead { error: "400".into() }, t)
        .await
        .unwrap();
    assert_eq!(store.push_stats().await.unwrap().dead, 1);
    // 410 stops alice until she is seen again; bob online drops his.
    let alice = next
        .iter()
        .find(|due| due.user == "alice")
        .expect("alice's notification");
    store.push_finish(alice, &PushOutcome::Gone, t).await.unwrap();
    assert_eq!(store.push_stopped(10).await.unwrap(), ["alice"]);
    store
        .append(&[messages(vec![message("m6", "bob", false)])])
        .await
        .unwrap();
    assert_eq!(
        users_pending(&store).await,
        ["carol"],
        "alice is stopped, carol's dead letter restarted"
    );
    store
        .push_seen(&[(ROOM.into(), "carol".into())], &["alice".into()])
        .await
        .unwrap();
    assert!(store.push_stopped(10).await.unwrap().is_empty());
    assert!(users_pending(&store).await.is_empty());
    store
        .append(&[messages(vec![message("m7", "bob", false)])])
        .await
        .unwrap();
    assert_eq!(users_pending(&store).await, ["alice", "carol"]);

    // The grace: not due before it.
    store.set_push(Some(PushSettings {
        grace_ms: 3_600_000,
        include_text: false,
    }));
    store.push_seen(&[(ROOM.into(), "carol".into())], &[]).await.unwrap();
    store
        .append(&[messages(vec![message("m8", "bob", false)])])
        .await
        .unwrap();
    let claimed = store.push_claim(now() + 60_000, now() + 120_000, 10).await.unwrap();
    assert!(
        claimed.iter().all(|due| due.user != "carol"),
        "carol's new notification waits for its grace"
    );
    let carol_due = store
        .push_pending(10)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.user == "carol")
        .unwrap();
    assert!(carol_due.due_at >= now() + 3_000_000);
}

#[tokio::test]
async fn sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    outbox(SqliteStore::open(dir.path().join("s.db")).await.unwrap()).await;
}

#[tokio::test]
async fn sqlite_memory() {
    outbox(SqliteStore::open_in_memory().await.unwrap()).await;
}

async fn postgres(name: &str) -> Option<(PgStore, String)> {
    let Ok(url) = std::env::var(POSTGRES_URL) else {
        eprintln!("skipped: {POSTGRES_URL} is not set");
        return None;
    };
    let schema = format!("push_{name}_{}", std::process::id());
    Some((PgStore::connect_isolated(&url, &schema).await.unwrap(), schema))
}

async fn drop_schema(schema: &str) {
    use sqlx::{Connection, Executor};
    let url = std::env::var(POSTGRES_URL).unwrap();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    conn.execute(sqlx::raw_sql(&format!("DROP SCHEMA \"{schema}\" CASCADE")))
        .await
        .unwrap();
}

#[tokio::test]
async fn postgres_outbox() {
    let Some((store, schema)) = postgres("outbox").await else {
        return;
    };
    outbox(store).await;
    drop_schema(&schema).await;
}

/// Several instances claiming at once each get different notifications (SKIP LOCKED), and
/// every one is claimed exactly once.
#[tokio::test]
async fn postgres_claims_are_disjoint() {
    let Some((store, schema)) = postgres("claims").await else {
        return;
    };
    let url = std::env::var(POSTGRES_URL).unwrap();
    let users: Vec<String> = (0..60).map(|i| format!("u{i}")).collect();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    store.append(&[members(&names)]).await.unwrap();
    store.set_push(Some(PushSettings {
        grace_ms: 0,
        include_text: false,
    }));
    store
        .append(&[messages(vec![message("m1", "nobody", false)])])
        .await
        .unwrap();
    let mut handles = Vec::new();
    for _ in 0..4 {
        let other = PgStore::connect_isolated(&url, &schema).await.unwrap();
        handles.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let t = now() + 10;
                let claimed = other.push_claim(t, t + 60_000, 7).await.unwrap();
                if claimed.is_empty() {
                    return got;
                }
                got.extend(claimed.into_iter().map(|due| due.user));
            }
        }));
    }
    let mut all = Vec::new();
    for handle in handles {
        all.extend(handle.await.unwrap());
    }
    all.sort();
    let mut expected = users.clone();
    expected.sort();
    assert_eq!(all, expected, "each notification claimed once");
    drop_schema(&schema).await;
}
