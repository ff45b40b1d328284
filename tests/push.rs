//! Push notifications (`Config::push`, ARCHITECTURE.md "Push notifications") end to end: a server
//! on loopback, native clients, and the in-process webhook receiver of `webhook.rs`, which
//! checks every signature and fails, throttles, hangs or answers 410 when told to.
//!
//! Timing is configured short (grace, poll, backoff) and only ever bounds from below what the
//! tests measure; every wait has a deadline.

use std::time::{Duration, Instant};

use driftsync_engine::store::{PgStore, Store};
use driftsync_server::push::{PushConfig, PushSecret};
use driftsync_server::{Auth, Config};
use driftsync_tests::webhook::{verify, ChatMember, Plan, Received, WebhookReceiver, WEBHOOK_SECRET};
use driftsync_tests::{http_get, NativeClient, TestServer};

use driftsync_tests::webhook::TOKEN_SECRET as SECRET;
const GRACE: Duration = Duration::from_millis(1200);
const BACKOFF: Duration = Duration::from_millis(300);
/// How long a test waits for a webhook that must come.
const WITHIN: Duration = Duration::from_secs(20);

fn push_config(receiver: &WebhookReceiver) -> PushConfig {
    let mut push = PushConfig::new(&receiver.url(), PushSecret::parse(WEBHOOK_SECRET).unwrap()).unwrap();
    push.grace = GRACE;
    push.poll = Duration::from_millis(50);
    push.backoff_base = BACKOFF;
    push.jitter = false;
    push.timeout = Duration::from_secs(3);
    push
}

fn config(push: PushConfig) -> Config {
    Config {
        auth: Auth::new(Some(SECRET)),
        push: Some(push),
        ..Config::default()
    }
}

fn now_ms() -> u64 {
    driftsync_tests::webhook::now_ms()
}

/// A metric's value from `/metrics` (the first line starting with `name`).
async fn metric(server: &TestServer, name: &str) -> Option<f64> {
    let text = http_get(server.addr, "/metrics").await;
    text.lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with([' ', '{']))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Waits until `/metrics` shows `name` at `value` (at most 10 s).
async fn await_metric(server: &TestServer, name: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = metric(server, name).await;
        if now == Some(value) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} stayed at {now:?}, expected {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Disconnects a client and waits until the server counts `left` connections.
async fn disconnect(server: &TestServer, client: NativeClient, left: usize) {
    drop(client);
    await_metric(server, "driftsync_connections", left as f64).await;
}

/// Checks nothing more arrives for twice the grace plus a few polls.
async fn assert_quiet(receiver: &WebhookReceiver, count: usize) {
    tokio::time::sleep(GRACE * 2 + Duration::from_millis(500)).await;
    let received = receiver.received();
    assert_eq!(received.len(), count, "unexpected webhooks: {received:#?}");
}

/// Alice, and carol who joined and went away (paused): the usual start.
async fn alice_and_paused_carol(server: &TestServer) -> (ChatMember, NativeClient, ChatMember) {
    let mut alice = ChatMember::new("alice", 11);
    let mut carol = ChatMember::new("carol", 13);
    let alice_conn = alice.connect(&server.url()).await;
    alice.join(&server.url()).await;
    let carol_conn = carol.connect(&server.url()).await;
    carol.join(&server.url()).await;
    // The membership side connections are gone when `join` returns; carol goes too.
    disconnect(server, carol_conn, 1).await;
    (alice, alice_conn, carol)
}

fn single(received: &[Received]) -> &Received {
    assert_eq!(received.len(), 1, "{received:#?}");
    &received[0]
}

#[tokio::test]
async fn a_paused_member_gets_one_webhook_for_a_burst_and_nobody_else_any() {
    let receiver = WebhookReceiver::start().await;
    let (_dir, store) = driftsync_tests::sqlite_store().await;
    let server = TestServer::start(store, config(push_config(&receiver))).await;
    let mut alice = ChatMember::new("alice", 21);
    let mut bob = ChatMember::new("bob", 22);
    let mut carol = ChatMember::new("carol", 23);
    let mut dave = ChatMember::new("dave", 24);
    let mut alice_conn = alice.connect(&server.url()).await;
    alice.join(&server.url()).await;
    let bob_conn = bob.connect(&server.url()).await;
    bob.join(&server.url()).await;
    let carol_conn = carol.connect(&server.url()).await;
    carol.join(&server.url()).await;
    let dave_conn = dave.connect(&server.url()).await;
    dave.join(&server.url()).await;
    // Carol and dave put their apps in the background: no connection.
    drop(carol_conn);
    disconnect(&server, dave_conn, 2).await;

    // A burst from alice.
    let mut ids = Vec::new();
    for text in ["one", "two", "three"] {
        ids.push(alice.send(&mut alice_conn, text).await);
    }
    // Dave comes back at once (within the grace): he gets none.
    let _dave_back = dave.connect(&server.url()).await;

    let received = receiver.wait_for(1, WITHIN).await;
    let hook = single(&received);
    assert!(hook.verified, "signature: {hook:#?}");
    assert_eq!(hook.json["type"], "chat.unread");
    assert_eq!(hook.json["room"], "chat/push-room");
    assert_eq!(hook.json["user"], "carol");
    assert_eq!(hook.json["unread"], 3);
    assert_eq!(hook.json["latest"]["id"], ids[2].as_str());
    assert_eq!(hook.json["latest"]["sender"], "alice");
    assert!(
        hook.json["latest"].get("text").is_none(),
        "no text without --push-include-text"
    );
    assert_eq!(hook.json["id"], hook.id.as_str());
    assert!(hook.id.starts_with("msg_"));
    // Bob (online), alice (the author) and dave (back within the grace): none.
    assert_quiet(&receiver, 1).await;
    await_metric(&server, "driftsync_push_queue_depth", 0.0).await;
    assert_eq!(
        metric(&server, "driftsync_push_attempts_total{result=\"delivered\"}").await,
        Some(1.0)
    );
    drop(bob_conn);
    server.stop().await;
}

/// What an app does: its session's `pause()` (going to the background) makes the member
/// offline, so the next message brings a webhook; the push wakes the app, `resume()` brings
/// everything in one round trip, and while it is connected nothing more is sent.
#[tokio::test]
async fn a_paused_session_is_notified_and_a_resumed_one_is_not() {
    use driftsync_client::{Client, ConnectionState, Options, Session};
    let receiver = WebhookReceiver::start().await;
    let (_dir, store) = driftsync_tests::sqlite_store().await;
    let server = TestServer::start(store, config(push_config(&receiver))).await;
    let mut alice = ChatMember::new("alice", 51);
    let mut carol = ChatMember::new("carol", 53);
    let mut alice_conn = alice.connect(&server.url()).await;
    alice.join(&server.url()).await;
    carol.join(&server.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let session = Session::start(
        Client::open(dir.path().join("carol.db"), "carol").await.unwrap(),
        Options::new(server.url())
            .token(carol.token())
            .documents([driftsync_tests::webhook::chat_room().as_str()]),
    );
    async fn synced(session: &Session) {
        let wait = session.wait_for(|s| s == ConnectionState::Synced);
        tokio::time::timeout(WITHIN, wait).await.expect("synced in time");
    }
    synced(&session).await;
    alice.send(&mut alice_conn, "while carol is here").await;
    assert_quiet(&receiver, 0).await;

    session.pause().await.unwrap();
    await_metric(&server, "driftsync_connections", 1.0).await;
    let id = alice.send(&mut alice_conn, "carol, are you there?").await;
    let received = receiver.wait_for(1, WITHIN).await;
    let hook = single(&received);
    assert!(hook.verified);
    assert_eq!(
        (hook.json["user"].as_str(), hook.json["unread"].as_u64()),
        (Some("carol"), Some(1))
    );
    assert_eq!(hook.json["latest"]["id"], id.as_str());

    // The push wakes the app.
    session.resume().await.unwrap();
    synced(&session).await;
    let texts: Vec<String> = session
        .client()
        .await
        .chat_messages("chat/push-room")
        .await
        .unwrap()
        .into_iter()
        .map(|(message, _)| message.text)
        .collect();
    // After the server's "… joined" system messages.
    assert!(
        texts.ends_with(&["while carol is here".to_string(), "carol, are you there?".to_string()]),
        "{texts:?}"
    );
    alice.send(&mut alice_conn, "welcome back").await;
    assert_quiet(&receiver, 1).await;
    session.shutdown().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn failures_are_retried_under_one_id_with_growing_delays() {
    let receiver = WebhookReceiver::start().await;
    receiver.plan([
        Plan::Status(500, None),
        Plan::Status(500, None),
        Plan::Status(200, None),
    ]);
    let (_dir, store) = driftsync_tests::sqlite_store().await;
    let server = TestServer::start(store, config(push_config(&receiver))).await;
    let (mut alice, mut alice_conn, _carol) = alice_and_paused_carol(&server).await;
    alice.send(&mut alice_conn, "are you there?").await;
    let received = receiver.wait_for(3, WITHIN).await;
    assert_eq!(received.len(), 3, "{received:#?}");
    assert!(
        received.iter().all(|r| r.verified && r.id == received[0].id),
        "{received:#?}"
    );
    assert_eq!(
        received.iter().map(|r| r.answered).collect::<Vec<_>>(),
        [Some(500), Some(500), Some(200)]
    );
    let (first, second) = (received[1].at - received[0].at, received[2].at - received[1].at);
    // Exponential: the base, then twice the base (no jitter in this test).
    assert!(first >= BACKOFF, "{first:?}");
    assert!(second >= BACKOFF * 2, "{second:?}");
    assert_quiet(&receiver, 3).await;
    assert_eq!(
        metric(&server, "driftsync_push_attempts_total{result=\"retry\"}").await,
        Some(2.0)
    );
    server.stop().await;
}

#[tokio::test]
async fn gone_stops_notifications_until_the_user_connects_again() {
    let receiver = WebhookReceiver::start().await;
    receiver.plan([Plan::Status(410, None)]);
    let (_dir, store) = driftsync_tests::sqlite_store().await;
    let server = TestServer::start(store, config(push_config(&receiver))).await;
    let (mut alice, mut alice_conn, carol) = alice_and_paused_carol(&server).await;
    alice.send(&mut alice_conn, "first").await;
    assert_eq!(receiver.wait_for(1, WITHIN).await.len(), 1);
    alice.send(&mut alice_conn, "second").await;
    assert_quiet(&receiver, 1).await;
    // Carol opens the app (connects to the room) and leaves again: notifications resume.
    let carol_conn = carol.connect(&server.url()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    disconnect(&server, carol_conn, 1).await;
    alice.send(&mut alice_conn, "third").await;
    let received = receiver.wait_for(2, WITHIN).await;
    assert_eq!(received.len(), 2, "{received:#?}");
    assert_eq!(received[1].json["unread"], 1, "a fresh notification");
    assert_eq!(received[1].answered, Some(200));
    server.stop().await;
}

#[tokio::test]
async fn a_hanging_receiver_is_timed_out_and_retried() {
    let receiver = WebhookReceiver::start().await;
    receiver.plan([Plan::Hang, Plan::Status(200, None)]);
    let (_dir, store) = driftsync_tests::sqlite_store().await;
    let mut push = push_config(&receiver);
    push.timeout = Duration::from_millis(500);
    let server = TestServer::start(store, config(push)).await;
    let (mut alice, mut alice_conn, _carol) = alice_and_paused_carol(&server).await;
    alice.send(&mut alice_conn, "hello?").await;
    let received = receiver.wait_for(2, WITHIN).await;
    assert_eq!(received.len(), 2, "{received:#?}");
    assert_eq!(received[0].id, received[1].id);
    assert!(received[1].at - received[0].at >= Duration::from_millis(500));
    assert_eq!(
        metric(&server, "driftsync_push_attempts_total{result=\"timeout\"}").await,
        Some(1.0)
    );
    server.stop().await;
}

#[tokio::test]
async fn a_refusal_is_a_dead_letter_and_retry_after_is_honoured() {
    let receiver = WebhookReceiver::start().await;
    receiver.plan([Plan::Status(429, Some(1)), Plan::Status(400, None)]);
    let (_dir, store) = driftsync_tests::sqlite_store().await;
    let server = TestServer::start(store, config(push_config(&receiver))).await;
    let (mut alice, mut alice_conn, _carol) = alice_and_paused_carol(&server).await;
    alice.send(&mut alice_conn, "hi").await;
    let received = receiver.wait_for(2, WITHIN).await;
    assert_eq!(received.len(), 2, "{received:#?}");
    assert!(
        received[1].at - received[0].at >= Duration::from_secs(1),
        "Retry-After: 1"
    );
    assert_quiet(&receiver, 2).await;
    await_metric(&server, "driftsync_push_dead_letters", 1.0).await;
    server.stop().await;
}

#[tokio::test]
async fn the_text_is_sent_only_when_asked() {
    let receiver = WebhookReceiver::start().await;
    let (_dir, store) = driftsync_tests::sqlite_store().await;
    let mut push = push_config(&receiver);
    push.include_text = true;
    let server = TestServer::start(store, config(push)).await;
    let (mut alice, mut alice_conn, _carol) = alice_and_paused_carol(&server).await;
    alice.send(&mut alice_conn, "lunch at noon?").await;
    let received = receiver.wait_for(1, WITHIN).await;
    assert_eq!(single(&received).json["latest"]["text"], "lunch at noon?");
    server.stop().await;
}

/// An `https://` webhook: the same request over TLS (here with a private CA in
/// `PushConfig::tls`; `serve` trusts Mozilla's roots).
#[tokio::test]
async fn an_https_webhook_is_delivered_over_tls() {
    let (receiver, tls) = WebhookReceiver::start_tls().await;
    assert!(receiver.url().starts_with("https://"));
    let (_dir, store) = driftsync_tests::sqlite_store().await;
    let mut push = push_config(&receiver);
    push.tls = Some(tls);
    let server = TestServer::start(store, config(push)).await;
    let (mut alice, mut alice_conn, _carol) = alice_and_paused_carol(&server).await;
    alice.send(&mut alice_conn, "over TLS").await;
    let received = receiver.wait_for(1, WITHIN).await;
    let hook = single(&received);
    assert!(hook.verified);
    assert_eq!(hook.json["user"], "carol");
    server.stop().await;
}

/// Two instances on one PostgreSQL: a member connected to the other instance gets nothing, an
/// offline one gets exactly one webhook (one instance claims it).
#[tokio::test]
async fn two_instances_deliver_once_and_know_who_is_online() {
    let Ok(url) = std::env::var("DRIFTSYNC_TEST_POSTGRES_URL") else {
        eprintln!("skipped: DRIFTSYNC_TEST_POSTGRES_URL is not set");
        return;
    };
    let schema = format!("push_two_{}", std::process::id());
    let store_a = PgStore::connect_isolated(&url, &schema).await.unwrap();
    let store_b = PgStore::connect_isolated(&url, &schema).await.unwrap();
    let receiver = WebhookReceiver::start().await;
    let head_check = Config {
        head_check: Some(Duration::from_millis(200)),
        ..config(push_config(&receiver))
    };
    let a = TestServer::start(store_a, head_check.clone()).await;
    let b = TestServer::start(store_b, head_check).await;
    let mut alice = ChatMember::new("alice", 31);
    let mut alice_conn = alice.connect(&a.url()).await;
    alice.join(&a.url()).await;
    let mut carol = ChatMember::new("carol", 33);
    let carol_conn = carol.connect(&a.url()).await;
    carol.join(&a.url()).await;
    disconnect(&a, carol_conn, 1).await;
    let mut bob = ChatMember::new("bob", 32);
    let bob_conn = bob.connect(&b.url()).await;
    bob.join(&b.url()).await;
    for text in ["x", "y"] {
        alice.send(&mut alice_conn, text).await;
    }
    let received = receiver.wait_for(1, WITHIN).await;
    let hook = single(&received);
    assert!(hook.verified);
    assert_eq!(hook.json["user"], "carol");
    assert_eq!(hook.json["unread"], 2);
    assert_quiet(&receiver, 1).await;
    drop(bob_conn);
    a.stop().await;
    b.stop().await;
    // The schema is left to the test database (dropped with it); named per process.
    let _ = Store::push_stats(&PgStore::connect_isolated(&url, &schema).await.unwrap()).await;
}

/// The Python `standardwebhooks` package (PyPI, installed by `.ci/run`) verifies what the server
/// sent, and rejects a tampered body and a stale timestamp.
#[tokio::test]
async fn an_independent_verifier_accepts_the_signatures() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let available = std::process::Command::new("python3")
        .args(["-c", "import standardwebhooks"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !available {
        assert!(
            !ci,
            "CI=true: python3 with the standardwebhooks package is required (pip install standardwebhooks)"
        );
        eprintln!("skipped: python3 with the standardwebhooks package (pip install standardwebhooks) is missing");
        return;
    }
    let receiver = WebhookReceiver::start().await;
    let (_dir, store) = driftsync_tests::sqlite_store().await;
    let mut push = push_config(&receiver);
    push.include_text = true;
    let server = TestServer::start(store, config(push)).await;
    let (mut alice, mut alice_conn, _carol) = alice_and_paused_carol(&server).await;
    alice.send(&mut alice_conn, "verify me: ünïcødé ✓").await;
    let received = receiver.wait_for(1, WITHIN).await;
    let hook = single(&received).clone();
    assert!(verify(
        WEBHOOK_SECRET,
        &hook.id,
        &hook.timestamp,
        &hook.body,
        &hook.signature
    ));
    server.stop().await;

    // A stale timestamp, correctly signed (by the server's own signer) ten minutes ago.
    let stale_ts = (now_ms() / 1000 - 600).to_string();
    let stale_sig = PushSecret::parse(WEBHOOK_SECRET)
        .unwrap()
        .sign(&hook.id, stale_ts.parse().unwrap(), &hook.body);
    let dir = tempfile::tempdir().unwrap();
    let body_path = dir.path().join("body");
    std::fs::write(&body_path, &hook.body).unwrap();
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
secret, body_path, wid, ts, sig, stale_ts, stale_sig = sys.argv[1:8]
body = open(body_path, 'rb').read()
wh = Webhook(secret)
headers = {"webhook-id": wid, "webhook-timestamp": ts, "webhook-signature": sig}
payload = wh.verify(body, headers)
assert payload["user"] == "carol", payload
def rejected(data, hdrs):
    try:
        wh.verify(data, hdrs)
    except WebhookVerificationError:
        return True
    return False
assert rejected(body.replace(b'carol', b'mallory'), headers), "tampered body accepted"
assert rejected(body, dict(headers, **{"webhook-id": wid + "x"})), "other id accepted"
assert rejected(body, {"webhook-id": wid, "webhook-timestamp": stale_ts, "webhook-signature": stale_sig}), "stale timestamp accepted"
print("verified")
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args([
            WEBHOOK_SECRET,
            body_path.to_str().unwrap(),
            &hook.id,
            &hook.timestamp,
            &hook.signature,
            &stale_ts,
            &stale_sig,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python verifier: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "verified");
}
