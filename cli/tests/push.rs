//! Push notifications survive `kill -9` of `driftsync serve` between the commit of a message
//! and the webhook's delivery: the restarted server delivers it, once. The server is the real
//! binary; the webhook receiver runs in this test process (`driftsync_tests::webhook`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use driftsync_tests::webhook::{ChatMember, WebhookReceiver, TOKEN_SECRET, WEBHOOK_SECRET};

/// Starts `driftsync serve` on a free loopback port with push notifications to `hook`; returns
/// the child and its base URL.
fn start(data: &str, hook: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_driftsync"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--data-dir", data, "--secret", TOKEN_SECRET])
        .args(["--push-webhook-url", hook, "--push-grace", "2s"])
        .env("DRIFTSYNC_PUSH_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start driftsync serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the listening line");
    let addr = line
        .trim()
        .strip_prefix("driftsync listening on ")
        .unwrap_or_else(|| panic!("unexpected: {line:?}"));
    (child, format!("ws://{addr}"))
}

#[tokio::test]
async fn a_notification_committed_before_kill_9_is_delivered_after_restart_once() {
    let receiver = WebhookReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let (mut server, url) = start(&data, &receiver.url());
    let mut alice = ChatMember::new("alice", 41);
    let mut carol = ChatMember::new("carol", 43);
    alice.join(&url).await;
    carol.join(&url).await;
    let mut alice_conn = alice.connect(&url).await;
    let id = alice.send(&mut alice_conn, "still there?").await;
    // Acknowledged, so committed with carol's due notification; killed within the grace.
    server.kill().expect("kill -9");
    server.wait().expect("reap");
    drop(alice_conn);
    assert!(receiver.received().is_empty(), "killed before the grace ended");

    let (mut server, _url) = start(&data, &receiver.url());
    let received = receiver.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(received.len(), 1, "{received:#?}");
    assert!(received[0].verified);
    assert_eq!(received[0].json["user"], "carol");
    assert_eq!(received[0].json["latest"]["id"], id.as_str());
    // Once: nothing more comes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(receiver.received().len(), 1, "{:#?}", receiver.received());
    server.kill().expect("kill");
    server.wait().expect("reap");
}
