//! The client commands of the `driftsync` binary, run as processes against a server in this
//! process: the offline-first story of the README, a client killed in the middle of a sync,
//! and the interactive chat.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use driftsync_engine::store::Store;
use driftsync_tests::{sqlite_store, TestServer, TIMEOUT};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

const ROOM: &str = "chat/team";

/// Runs `driftsync client --store STORE --user USER ARGS…`; returns stdout, failing on a non-zero exit.
async fn run(store: &Path, user: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_driftsync"))
        .arg("client")
        .arg("--store")
        .arg(store)
        .args(["--user", user])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run driftsync");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "driftsync {args:?} failed: {stderr}");
    String::from_utf8(out.stdout).expect("utf-8 output")
}

async fn list(store: &Path, user: &str) -> Vec<Value> {
    let out = run(store, user, &["chat", "list", ROOM, "--json"]).await;
    match serde_json::from_str(out.trim()) {
        Ok(Value::Array(items)) => items,
        other => panic!("chat list --json is not one JSON array: {other:?} from {out:?}"),
    }
}

#[tokio::test]
async fn offline_story_two_stores_write_offline_sync_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let ada = dir.path().join("ada.db");
    let bob = dir.path().join("bob.db");

    // Offline: no server yet.
    let a1 = run(&ada, "ada", &["chat", "send", ROOM, "hi from ada"])
        .await
        .trim()
        .to_string();
    let b1 = run(&bob, "bob", &["chat", "send", ROOM, "hi from bob"])
        .await
        .trim()
        .to_string();
    assert_eq!(a1.len(), 36, "a UUID: {a1}");
    run(&ada, "ada", &["text", "append", "notes/plan", "hello world"]).await;
    run(&ada, "ada", &["text", "insert", "notes/plan", "0", ">> "]).await;
    run(&ada, "ada", &["text", "delete", "notes/plan", "8", "6"]).await;
    assert_eq!(
        run(&ada, "ada", &["text", "show", "notes/plan"]).await.trim(),
        ">> hello"
    );
    let before = list(&ada, "ada").await;
    assert_eq!(before.len(), 1);
    for key in ["id", "author", "text", "time", "delivery", "read_by"] {
        assert!(before[0].get(key).is_some(), "{key} missing in {}", before[0]);
    }
    assert_eq!(before[0]["delivery"], "local");

    let (_server_dir, store) = sqlite_store().await;
    let server = TestServer::start(store, Default::default()).await;
    let url = server.url();
    // Each store syncs as its own user: a sync writes delivery receipts in that user's name.
    let sync = |store: &'static str| {
        let path = dir.path().join(store);
        let user = store.trim_end_matches(".db");
        let url = url.clone();
        async move {
            let out = run(&path, user, &["sync", "--server", &url, "--once"]).await;
            let report: Value = serde_json::from_str(out.trim()).expect("one JSON line");
            for key in ["documents", "bytes_sent", "bytes_received", "round_trips"] {
                assert!(report.get(key).is_some(), "{key} missing in {report}");
            }
            report
        }
    };
    let report = sync("ada.db").await;
    assert_eq!(report["documents"], 2);
    assert_eq!(report["round_trips"], 1);
    sync("bob.db").await;
    sync("ada.db").await;

    // Bob reads Ada's message; Ada sees the receipt after a sync.
    run(&bob, "bob", &["chat", "read", ROOM]).await;
    sync("bob.db").await;
    sync("ada.db").await;
    let on_ada = list(&ada, "ada").await;
    let on_bob = list(&bob, "bob").await;
    let ids = |l: &[Value]| {
        l.iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&on_ada), ids(&on_bob), "the same messages in the same order");
    assert_eq!(on_ada.len(), 2);
    let mut expected = vec![a1.clone(), b1.clone()];
    expected.sort_by_key(|id| ids(&on_ada).iter().position(|x| x == id));
    assert_eq!(ids(&on_ada), expected);
    // Ada's message was read by Bob; Bob's reached Ada's device (her sync wrote a delivery
    // receipt), and both stores agree.
    let field = |l: &[Value], id: &str, key: &str| l.iter().find(|m| m["id"] == id).unwrap()[key].clone();
    assert_eq!(field(&on_ada, &a1, "delivery"), "read", "{on_ada:?}");
    assert_eq!(field(&on_ada, &a1, "read_by"), serde_json::json!(["bob"]));
    assert_eq!(field(&on_ada, &a1, "delivered_to"), serde_json::json!(["bob"]));
    assert_eq!(field(&on_ada, &b1, "delivery"), "delivered", "{on_ada:?}");
    assert_eq!(field(&on_ada, &b1, "delivered_to"), serde_json::json!(["ada"]));
    for key in [
        "read_by",
        "delivered_to",
        "kind",
        "metadata",
        "attachments",
        "reply_to",
        "reactions",
    ] {
        assert_eq!(field(&on_ada, &a1, key), field(&on_bob, &a1, key), "{key}");
    }

    // Errors are one line on stderr and a non-zero exit.
    let out = Command::new(env!("CARGO_BIN_EXE_driftsync"))
        .args(["client", "--store"])
        .arg(&ada)
        .args(["--user", "ada", "chat", "read", ROOM, "no-such-message"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    server.stop().await;
}

#[tokio::test]
async fn a_client_killed_mid_sync_resumes_from_its_store() {
    const PER_ROUND: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phone.db");
    let (_server_dir, store) = sqlite_store().await;
    let server = TestServer::start(store.clone(), Default::default()).await;
    let url = server.url();
    let mut written = Vec::new();
    let mut mid_sync_kills = 0;
    for round in 0..8 {
        // The app writes a batch of messages offline…
        let mut client = driftsync_client::Client::open(&path, "phone").await.unwrap();
        for i in 0..PER_ROUND {
            written.push(
                client
                    .chat_send(ROOM, &format!("round {round} message {i}"))
                    .await
                    .unwrap(),
            );
        }
        drop(client);
        let head = |s: driftsync_engine::store::SqliteStore| async move {
            s.meta(ROOM).await.unwrap().map(|m| m.head).unwrap_or(0)
        };
        let start = head(store.clone()).await;
        // …and is killed while the sync is under way: once the server has stored some of this
        // round's pushes, but (if we are quick enough) not all of them.
        let mut child = Command::new(env!("CARGO_BIN_EXE_driftsync"))
            .arg("client")
            .arg("--store")
            .arg(&path)
            .args(["--user", "phone", "sync", "--server", &url, "--once"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let at_kill = loop {
            let now = head(store.clone()).await;
            if now > start || tokio::time::Instant::now() > deadline {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        child.start_kill().unwrap();
        let _ = child.wait().await;
        let stored = head(store.clone()).await;
        let mid = (stored - start) < PER_ROUND as u64;
        println!(
            "round {round}: killed with {} of {PER_ROUND} pushes stored ({} at the kill)",
            stored - start,
            at_kill - start
        );
        if mid {
            mid_sync_kills += 1;
        }
        if mid_sync_kills >= 3 {
            break;
        }
    }
    assert!(mid_sync_kills > 0, "no kill landed in the middle of a sync");

    // Restarted: the sync completes from the store, and nothing is lost or doubled.
    let out = run(&path, "phone", &["sync", "--server", &url, "--once"]).await;
    assert!(out.contains("\"round_trips\":1"), "{out}");
    let phone = list(&path, "phone").await;
    assert!(phone.iter().all(|m| m["delivery"] == "acknowledged"));
    let fresh = dir.path().join("fresh.db");
    run(&fresh, "fresh", &["sync", "--server", &url, "--once", "--doc", ROOM]).await;
    let seen: Vec<String> = list(&fresh, "fresh")
        .await
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    let mut expected = written.clone();
    expected.sort();
    let mut got = seen.clone();
    got.sort();
    assert_eq!(
        got.len(),
        written.len(),
        "every message written reached the server exactly once"
    );
    assert_eq!(got, expected);
    server.stop().await;
}

const SECRET: &str = "chat-test-secret";

/// An interactive `driftsync chat` process reading stdin line by line.
struct Chat {
    child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Chat {
    fn start(url: &str, store: &Path, user: &str) -> Chat {
        let token = driftsync_server::mint(SECRET, user, &["chat/*".into()], true, Duration::from_secs(600)).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_driftsync"))
            .args([
                "chat", ROOM, "--server", url, "--user", user, "--token", &token, "--store",
            ])
            .arg(store)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start driftsync chat");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Chat { child, stdin, lines }
    }

    async fn say(&mut self, line: &str) {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Reads output until a line contains `needle`; returns it.
    async fn expect(&mut self, needle: &str) -> String {
        let mut seen = Vec::new();
        let found = tokio::time::timeout(TIMEOUT, async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                if line.contains(needle) {
                    return Some(line);
                }
                seen.push(line);
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!("no line with {needle:?}; saw {seen:#?}"),
        }
    }

    /// Reads output until every needle has appeared in some line, in any order.
    async fn expect_all(&mut self, needles: &[&str]) {
        let mut missing: Vec<&str> = needles.to_vec();
        let mut seen = Vec::new();
        let done = tokio::time::timeout(TIMEOUT, async {
            while !missing.is_empty() {
                match self.lines.next_line().await {
                    Ok(Some(line)) => {
                        missing.retain(|n| !line.contains(n));
                        seen.push(line);
                    }
                    _ => return false,
                }
            }
            true
        })
        .await;
        assert!(matches!(done, Ok(true)), "missing {missing:?}; saw {seen:#?}");
    }

    async fn quit(mut self) {
        self.say("/quit").await;
        let status = tokio::time::timeout(TIMEOUT, self.child.wait()).await.unwrap().unwrap();
        assert!(status.success());
    }
}

#[tokio::test]
async fn interactive_chat_live_offline_and_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    // Where the server will listen, once it runs.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("ws://{addr}");

    // Ada starts while the server is down: she can still write.
    let mut ada = Chat::start(&url, &dir.path().join("ada.db"), "ada");
    ada.expect("driftsync chat").await;
    ada.expect("offline").await;
    ada.say("written while offline").await;
    ada.expect("written while offline").await;

    let (_server_dir, store) = sqlite_store().await;
    let config = driftsync_server::Config {
        auth: driftsync_server::Auth::new(Some(SECRET)),
        ..Default::default()
    };
    let server = TestServer::start_at(store, config, addr).await;
    ada.expect("saved on the server").await;

    // Bob joins: he gets the history, then live messages both ways, typing-free line mode.
    let mut bob = Chat::start(&url, &dir.path().join("bob.db"), "bob");
    bob.expect("written while offline").await;
    bob.say("hello ada").await;
    ada.expect_all(&["bob is here", "bob joined", "hello ada", "read by bob"])
        .await;
    // Opening the room joined it: both are members, online, as the server says.
    ada.say("/members").await;
    let members = ada.expect("members:").await;
    assert!(
        members.contains("ada (online)") && members.contains("bob (online)"),
        "{members}"
    );
    ada.say("hello bob").await;
    let line = bob.expect("hello bob").await;
    assert!(line.contains("ada:"), "{line}");
    bob.quit().await;
    ada.expect("bob left").await;
    ada.quit().await;
    server.stop().await;
}

/// The sender's view of one message.
fn state_of(list: &[Value], id: &str) -> (String, Value, Value) {
    let m = list.iter().find(|m| m["id"] == id).expect("the message is listed");
    (
        m["delivery"].as_str().unwrap().to_string(),
        m["delivered_to"].clone(),
        m["read_by"].clone(),
    )
}

/// Three devices of two users, one of them offline for a long stretch: on the sender's side a
/// message moves local → acknowledged → delivered → read, in order, and the offline device's
/// return is what moves the second message on.
#[tokio::test]
async fn delivery_states_move_forward_as_devices_get_and_read_messages() {
    let dir = tempfile::tempdir().unwrap();
    let ada = dir.path().join("ada.db");
    let phone = dir.path().join("bob-phone.db");
    let laptop = dir.path().join("bob-laptop.db");
    let (_server_dir, store) = sqlite_store().await;
    let server = TestServer::start(store, Default::default()).await;
    let url = server.url();
    let sync = |path: &Path, user: &str| {
        let (path, user, url) = (path.to_path_buf(), user.to_string(), url.clone());
        async move { run(&path, &user, &["sync", "--server", &url, "--once", "--doc", ROOM]).await }
    };

    let m1 = run(&ada, "ada", &["chat", "send", ROOM, "first"])
        .await
        .trim()
        .to_string();
    assert_eq!(state_of(&list(&ada, "ada").await, &m1).0, "local");
    sync(&ada, "ada").await;
    assert_eq!(state_of(&list(&ada, "ada").await, &m1).0, "acknowledged");
    // Bob's phone gets it: its sync records a delivery receipt.
    sync(&phone, "bob").await;
    sync(&ada, "ada").await;
    assert_eq!(
        state_of(&list(&ada, "ada").await, &m1),
        ("delivered".into(), serde_json::json!(["bob"]), serde_json::json!([]))
    );

    // The phone goes quiet; a second message reaches only the server.
    let m2 = run(&ada, "ada", &["chat", "send", ROOM, "second"])
        .await
        .trim()
        .to_string();
    sync(&ada, "ada").await;
    assert_eq!(state_of(&list(&ada, "ada").await, &m2).0, "acknowledged");
    // Bob's laptop, offline all along, comes back: both messages reach it…
    sync(&laptop, "bob").await;
    sync(&ada, "ada").await;
    assert_eq!(state_of(&list(&ada, "ada").await, &m2).0, "delivered");
    // …and Bob reads them there.
    run(&laptop, "bob", &["chat", "read", ROOM]).await;
    sync(&laptop, "bob").await;
    sync(&ada, "ada").await;
    let on_ada = list(&ada, "ada").await;
    for id in [&m1, &m2] {
        assert_eq!(
            state_of(&on_ada, id),
            ("read".into(), serde_json::json!(["bob"]), serde_json::json!(["bob"]))
        );
    }
    // The phone, back too, never moves anything back.
    sync(&phone, "bob").await;
    sync(&ada, "ada").await;
    assert_eq!(state_of(&list(&ada, "ada").await, &m2).0, "read");
    server.stop().await;
}

/// Kinds, metadata, attachments, replies and reactions through the CLI, seen on both sides.
#[tokio::test]
async fn rich_messages_and_reactions_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let ada = dir.path().join("ada.db");
    let bob = dir.path().join("bob.db");
    let (_server_dir, store) = sqlite_store().await;
    let server = TestServer::start(store, Default::default()).await;
    let url = server.url();
    let hash = "9f".repeat(32);
    let question = run(&ada, "ada", &["chat", "send", ROOM, "which one?"])
        .await
        .trim()
        .to_string();
    let attach = format!("https://cdn.example/a,b.png,image/png,48213,{hash},800x600");
    let photo = run(
        &ada,
        "ada",
        &[
            "chat",
            "send",
            ROOM,
            "this one",
            "--kind",
            "image",
            "--meta",
            "caption=Lisbon",
            "--meta",
            "album=trip",
            "--attach",
            &attach,
            "--reply-to",
            &question,
        ],
    )
    .await
    .trim()
    .to_string();
    run(&ada, "ada", &["sync", "--server", &url, "--once"]).await;
    run(&bob, "bob", &["sync", "--server", &url, "--once", "--doc", ROOM]).await;
    run(&bob, "bob", &["chat", "react", ROOM, &photo, "👍"]).await;
    run(&bob, "bob", &["chat", "react", ROOM, &photo, "🎉"]).await;
    run(&bob, "bob", &["chat", "react", ROOM, &photo, "🎉", "--remove"]).await;
    run(&bob, "bob", &["sync", "--server", &url, "--once"]).await;
    run(&ada, "ada", &["sync", "--server", &url, "--once"]).await;
    for (store, user) in [(&ada, "ada"), (&bob, "bob")] {
        let listed = list(store, user).await;
        let m = listed.iter().find(|m| m["id"] == photo.as_str()).expect("the photo");
        assert_eq!(m["kind"], "image");
        assert_eq!(m["text"], "this one");
        assert_eq!(m["metadata"], serde_json::json!({"album": "trip", "caption": "Lisbon"}));
        assert_eq!(
            m["attachments"],
            serde_json::json!([{"url": "https://cdn.example/a,b.png", "mime": "image/png", "size": 48213,
                "sha256": hash, "width": 800, "height": 600}])
        );
        assert_eq!(m["reply_to"], question.as_str());
        assert_eq!(m["reactions"], serde_json::json!({"👍": ["bob"]}), "{user}");
    }
    // What the rules refuse is refused before anything is written.
    for bad in [
        vec!["--kind", "system"],
        vec!["--kind", "sticker"],
        vec!["--attach", "https://x,png,1"],
        vec!["--meta", "novalue"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_driftsync"))
            .args(["client", "--store"])
            .arg(&ada)
            .args(["--user", "ada", "chat", "send", ROOM, "x"])
            .args(&bad)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{bad:?} was accepted");
    }
    assert_eq!(list(&ada, "ada").await.len(), 2);
    server.stop().await;
}

/// Membership and the inbox through the CLI: joining offline, a fresh device that finds its
/// rooms (and their unread counts) from its token alone, the server's system messages, leaving.
#[tokio::test]
async fn a_fresh_device_finds_its_rooms_through_the_cli() {
    const SECRET: &str = "cli-inbox-test-secret-of-32-bytes-at-least";
    let dir = tempfile::tempdir().unwrap();
    let (phone, fresh, bob) = (
        dir.path().join("ada-phone.db"),
        dir.path().join("ada-new.db"),
        dir.path().join("bob.db"),
    );
    let (_server_dir, store) = sqlite_store().await;
    let config = driftsync_server::Config {
        auth: driftsync_server::Auth::new(Some(SECRET)),
        ..Default::default()
    };
    let server = TestServer::start(store, config).await;
    let url = server.url();
    let token = |user: &str| {
        driftsync_server::mint(SECRET, user, &["chat/*".to_string()], true, Duration::from_secs(3600)).unwrap()
    };
    let (ada_token, bob_token) = (token("ada"), token("bob"));
    let sync = |path: &Path, user: &str, token: &str| {
        let (path, user, url, token) = (path.to_path_buf(), user.to_string(), url.clone(), token.to_string());
        async move { run(&path, &user, &["sync", "--server", &url, "--token", &token, "--once"]).await }
    };

    // Ada joins three rooms on her phone, offline, and says hello in one.
    for room in ["chat/a", "chat/b", "chat/c"] {
        run(&phone, "ada", &["chat", "join", room]).await;
    }
    run(&phone, "ada", &["chat", "send", "chat/a", "hello"]).await;
    let offline: Value = serde_json::from_str(run(&phone, "ada", &["rooms", "--json"]).await.trim()).unwrap();
    assert_eq!(offline.as_array().unwrap().len(), 3, "known offline: {offline}");
    sync(&phone, "ada", &ada_token).await;
    // Bob joins two of them and writes.
    for room in ["chat/b", "chat/c"] {
        run(&bob, "bob", &["chat", "join", room]).await;
        run(&bob, "bob", &["chat", "send", room, &format!("bob in {room}")]).await;
    }
    run(&bob, "bob", &["chat", "send", "chat/c", "again"]).await;
    sync(&bob, "bob", &bob_token).await;

    // A fresh device of Ada's: its rooms from the server, with unread counts.
    let rooms: Value = serde_json::from_str(
        run(
            &fresh,
            "ada",
            &["rooms", "--server", &url, "--token", &ada_token, "--json"],
        )
        .await
        .trim(),
    )
    .unwrap();
    let unread: Vec<(String, u64)> = rooms
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["room"].as_str().unwrap().to_string(), r["unread"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        unread,
        [
            ("chat/c".to_string(), 2),
            ("chat/b".to_string(), 1),
            ("chat/a".to_string(), 0)
        ],
        "most recently active first: {rooms}"
    );
    assert_eq!(rooms[0]["last"]["text"], "again");
    // One sync brings every room; the server's join messages are there.
    sync(&fresh, "ada", &ada_token).await;
    let c: Value =
        serde_json::from_str(run(&fresh, "ada", &["chat", "list", "chat/c", "--json"]).await.trim()).unwrap();
    let texts: Vec<&str> = c
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["ada joined", "bob joined", "bob in chat/c", "again"]);
    assert_eq!(c[0]["kind"], "system");
    let members: Value = serde_json::from_str(
        run(&fresh, "ada", &["chat", "members", "chat/c", "--json"])
            .await
            .trim(),
    )
    .unwrap();
    assert_eq!(members.as_array().unwrap().len(), 2);

    // Ada leaves one room: gone from her inbox.
    run(&fresh, "ada", &["chat", "leave", "chat/b"]).await;
    sync(&fresh, "ada", &ada_token).await;
    let listed = run(&phone, "ada", &["rooms", "--server", &url, "--token", &ada_token]).await;
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(!listed.contains("chat/b"), "{listed}");
    server.stop().await;
}

/// `sync` (live) follows the user's inbox: a room joined on another device is subscribed and
/// its messages arrive, without naming it.
#[tokio::test]
async fn live_sync_follows_rooms_joined_elsewhere() {
    const SECRET: &str = "cli-live-inbox-secret-of-32-bytes-at-least";
    let dir = tempfile::tempdir().unwrap();
    let (phone, laptop) = (dir.path().join("phone.db"), dir.path().join("laptop.db"));
    let (_server_dir, store) = sqlite_store().await;
    let config = driftsync_server::Config {
        auth: driftsync_server::Auth::new(Some(SECRET)),
        ..Default::default()
    };
    let server = TestServer::start(store, config).await;
    let url = server.url();
    let token =
        driftsync_server::mint(SECRET, "ada", &["chat/*".to_string()], true, Duration::from_secs(3600)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_driftsync"))
        .args(["client", "--store"])
        .arg(&laptop)
        .args(["--user", "ada", "sync", "--server", &url, "--token", &token])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut wait_for = async |what: &str, pick: &dyn Fn(&Value) -> bool| {
        let found = tokio::time::timeout(TIMEOUT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let event: Value = serde_json::from_str(&line).unwrap();
                if pick(&event) {
                    return event;
                }
            }
            panic!("the live sync ended before {what}");
        })
        .await;
        found.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    };
    wait_for("the first inbox", &|e| e["event"] == "inbox").await;
    // On the phone: join a room the laptop never heard of, and write in it.
    run(&phone, "ada", &["chat", "join", "chat/new"]).await;
    run(&phone, "ada", &["chat", "send", "chat/new", "from the phone"]).await;
    run(&phone, "ada", &["sync", "--server", &url, "--token", &token, "--once"]).await;
    wait_for("the room in the inbox", &|e| {
        e["event"] == "inbox"
            && e["rooms"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["room"] == "chat/new"))
    })
    .await;
    wait_for("the room's messages", &|e| {
        e["event"] == "remote_change" && e["doc"] == "chat/new"
    })
    .await;
    child.kill().await.unwrap();
    let listed = run(&laptop, "ada", &["chat", "list", "chat/new"]).await;
    assert!(listed.contains("from the phone"), "{listed}");
    server.stop().await;
}
