//! Acknowledged updates survive `kill -9` of the server process and a restart on the same data,
//! on SQLite and on PostgreSQL. The server runs as the real `driftsync serve` binary.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use driftsync_engine::doc::{self, new_doc};
use driftsync_engine::sync::{apply_remote, Limits};
use driftsync_protocol::{ClientFrame, DocId, ResumeDoc, ServerFrame};
use driftsync_tests::NativeClient;

/// Starts `driftsync serve` on a free loopback port; returns the child and its base URL.
fn start(store_args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_driftsync"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(store_args)
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

/// Pushes `count` edits to `doc`, waiting for every acknowledgement; returns the expected text.
async fn push_acknowledged(url: &str, doc: &DocId, count: usize) -> String {
    let mut client = NativeClient::connect(url, "", 77).await;
    client
        .send(&ClientFrame::Resume {
            docs: vec![ResumeDoc {
                doc: doc.clone(),
                cursor: 0,
                state_vector: vec![0],
            }],
        })
        .await;
    client
        .recv_until(|f| matches!(f, ServerFrame::Resumed { .. }).then_some(()))
        .await;
    let local = new_doc(77).unwrap();
    for i in 0..count {
        let update = doc::text_insert(&local, doc::text_len(&local), &format!("[{i}]")).unwrap();
        client
            .send(&ClientFrame::Push {
                doc: doc.clone(),
                batch: i as u64 + 1,
                update,
            })
            .await;
    }
    for i in 0..count {
        let batch = client
            .recv_until(|f| {
                if let ServerFrame::Ack { batch, .. } = f {
                    Some(*batch)
                } else {
                    None
                }
            })
            .await;
        assert_eq!(batch, i as u64 + 1, "acknowledgements come in order");
    }
    doc::text(&local)
}

/// Reads the document back from a fresh connection.
async fn read_back(url: &str, doc: &DocId) -> String {
    let mut client = NativeClient::connect(url, "", 78).await;
    client
        .send(&ClientFrame::Resume {
            docs: vec![ResumeDoc {
                doc: doc.clone(),
                cursor: 0,
                state_vector: vec![0],
            }],
        })
        .await;
    let docs = client
        .recv_until(|f| {
            if let ServerFrame::Resumed { docs } = f {
                Some(docs.clone())
            } else {
                None
            }
        })
        .await;
    let replica = new_doc(78).unwrap();
    if let Some(update) = &docs[0].update {
        apply_remote(&replica, update, &Limits::default()).unwrap();
    }
    doc::text(&replica)
}

async fn survives_kill_9(store_args: &[&str], doc: DocId) {
    let (mut server, url) = start(store_args);
    let expected = push_acknowledged(&url, &doc, 50).await;
    // SIGKILL: no shutdown path runs.
    server.kill().expect("kill -9");
    server.wait().expect("reap");
    let (mut server, url) = start(store_args);
    assert_eq!(read_back(&url, &doc).await, expected);
    server.kill().expect("kill");
    server.wait().expect("reap");
}

#[tokio::test]
async fn acknowledged_updates_survive_kill_9_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    survives_kill_9(&["--data-dir", &data], DocId::new("notes/durable").unwrap()).await;
}

#[tokio::test]
async fn acknowledged_updates_survive_kill_9_on_postgres() {
    let Ok(url) = std::env::var("DRIFTSYNC_TEST_POSTGRES_URL") else {
        eprintln!("skipped: DRIFTSYNC_TEST_POSTGRES_URL is not set");
        return;
    };
    // A fresh document id per run: the server uses the database's default schema.
    let doc = DocId::new(format!("notes/durable-{}", uuid_like())).unwrap();
    survives_kill_9(&["--database-url", &url], doc).await;
}

fn uuid_like() -> String {
    format!("{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}

/// A Hocuspocus provider's `unsyncedChanges` reaches 0 only once the server has stored its
/// changes: `kill -9` right after it does loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_hocuspocus_provider_sees_as_synced_survives_kill_9() {
    let Some(modules) = driftsync_tests::hpclient::hocuspocus_modules_dir() else {
        eprintln!("skipped: node/npm not found");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let doc = DocId::new("notes/hocuspocus-kill").unwrap();
    let (mut server, url) = start(&["--data-dir", &data]);
    let mut provider = driftsync_tests::hpclient::HpClient::start(&modules, &format!("{url}/hocuspocus"), false).await;
    provider.command("attach p notes/hocuspocus-kill -");
    provider.until("synced", |c| c.provider("p").synced).await;
    // Edits made while connected, each sent at once; "unsynced" back at 0 means all stored.
    let mut expected = String::new();
    for i in 0..20 {
        let chunk = format!("[{i}]");
        provider.command(&format!("insert p {} {chunk}", expected.len()));
        expected.push_str(&chunk);
    }
    let want = expected.clone();
    provider
        .until("every edit acknowledged", |c| {
            c.provider("p").settled.as_deref() == Some(want.as_str())
        })
        .await;
    server.kill().unwrap();
    server.wait().unwrap();
    drop(provider);
    let (mut server, url) = start(&["--data-dir", &data]);
    assert_eq!(read_back(&url, &doc).await, expected);
    server.kill().unwrap();
    server.wait().unwrap();
}
