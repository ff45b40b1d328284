//! The inbox of a user with many rooms: what a fresh device's first inbox costs (bytes and
//! time, from the hello to the last piece), and what a returning device's costs after some
//! rooms changed.
//!
//! In one process: the rooms are written straight into a SQLite store the way the server
//! stores them (each update with the facts its chat guard finds), then a real server
//! (`driftsync_server::serve`, with a secret) answers devices over loopback WebSockets.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use driftsync_engine::chat::{Author, ChatGuard, ChatRoom};
use driftsync_engine::doc::{apply_bytes, new_doc};
use driftsync_engine::store::{Append, SqliteStore, Store};
use driftsync_protocol::{ClientFrame, DocId, ServerFrame, DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "inbox-benchmark-secret-of-at-least-32-bytes";

/// One measured inbox read.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Read {
    /// Rooms in the answer.
    pub rooms: usize,
    /// Frames of the answer.
    pub frames: usize,
    /// Bytes the device sent (hello, inbox request).
    pub bytes_sent: usize,
    /// Bytes of frames it received (welcome and inbox pieces).
    pub bytes_received: usize,
    /// From opening the connection to the last piece.
    pub ms: f64,
}

/// Fills a store with `rooms` rooms that `me` and `other` joined, `other` wrote one message in
/// each and `me` read every fourth; then measures a fresh device's inbox and, after `changed`
/// rooms got a new message (pushed over the network), a returning device's.
pub async fn run(rooms: usize, changed: usize) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile_dir()?;
    let store = SqliteStore::open(dir.join("server.db")).await?;
    let (me, other) = (author("me"), author("other"));
    let started = Instant::now();
    let mut batch = Vec::new();
    for i in 0..rooms {
        let id = room_id(i);
        let server = new_doc(1)?;
        let guard = ChatGuard::attach(&server);
        let (mine, theirs) = (ChatRoom::new(new_doc(11)?), ChatRoom::new(new_doc(22)?));
        let join_me = mine.join(&me, 1_000).context("join")?;
        let join_other = theirs.join(&other, 1_000).context("join")?;
        let (_, message) = theirs.send(&other, &format!("the news of room {i}"), 2_000 + i as u64);
        apply_bytes(mine.doc(), &message)?;
        let mut updates = vec![("me", join_me), ("other", join_other), ("other", message)];
        if i % 4 == 0 {
            let last = mine.messages().last().map(|m| m.id.clone()).context("a message")?;
            updates.push(("me", mine.mark_read(&me, &last, 3_000)?.context("a receipt")?));
        }
        for (user, update) in updates {
            guard.reset();
            apply_bytes(&server, &update)?;
            guard
                .check(Some(user), u64::MAX / 4)
                .map_err(|v| anyhow::anyhow!("{v}"))?;
            let facts = guard.take_facts();
            batch.push(Append {
                doc: id.clone(),
                origin: None,
                update,
                chat: Some(Box::new(facts)),
            });
        }
        if batch.len() >= 2_000 {
            store.append(&batch).await?;
            batch.clear();
        }
    }
    store.append(&batch).await?;
    let filled_ms = started.elapsed().as_secs_f64() * 1e3;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}", listener.local_addr()?);
    let config = driftsync_server::Config {
        auth: driftsync_server::Auth::new(Some(SECRET)),
        ..Default::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(driftsync_server::serve(listener, store, config, async move {
        let _ = stopped.await;
    }));

    // A fresh device: everything (twice: the first also warms the server's caches).
    let _ = read(&url, "me", 101, 0).await?;
    let (fresh, version) = read(&url, "me", 102, 0).await?;
    if fresh.rooms != rooms {
        bail!("the inbox listed {} of {rooms} rooms", fresh.rooms);
    }
    // `changed` rooms get a message, pushed like any client's.
    write(&url, changed).await?;
    let (returning, _) = read(&url, "me", 103, version).await?;
    if returning.rooms != changed {
        bail!("after {changed} rooms changed the inbox listed {}", returning.rooms);
    }
    let _ = stop.send(());
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "rooms": rooms,
        "changed": changed,
        "fill_ms": filled_ms,
        "fresh": fresh,
        "returning": returning,
    }))
}

fn author(user: &str) -> Author {
    Author {
        user: user.into(),
        device: "bench".into(),
    }
}

fn room_id(i: usize) -> String {
    format!("chat/bench-room-{i:06}")
}

fn token(user: &str) -> anyhow::Result<String> {
    Ok(driftsync_server::mint(
        SECRET,
        user,
        &["chat/*".to_string()],
        true,
        Duration::from_secs(3600),
    )?)
}

/// One device of `user` asks for its inbox after `since`: the measured read.
async fn read(url: &str, user: &str, client_id: u64, since: u64) -> anyhow::Result<(Read, u64)> {
    let started = Instant::now();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}/v1/sync")).await?;
    let hello = ClientFrame::Hello {
        version: PROTOCOL_VERSION,
        token: token(user)?,
        client_id,
    }
    .encode();
    let ask = ClientFrame::Inbox { since }.encode();
    let bytes_sent = hello.len() + ask.len();
    ws.send(Message::Binary(hello.into())).await?;
    ws.send(Message::Binary(ask.into())).await?;
    let (mut frames, mut rooms, mut bytes_received) = (0, 0, 0);
    loop {
        let Some(message) = ws.next().await else {
            bail!("the server closed")
        };
        let Message::Binary(bytes) = message? else { continue };
        bytes_received += bytes.len();
        match ServerFrame::decode(&bytes, DEFAULT_MAX_FRAME_SIZE)? {
            ServerFrame::Inbox {
                version,
                rooms: piece,
                more,
            } => {
                frames += 1;
                rooms += piece.len();
                if !more {
                    let ms = started.elapsed().as_secs_f64() * 1e3;
                    let _ = ws.close(None).await;
                    let read = Read {
                        rooms,
                        frames,
                        bytes_sent,
                        bytes_received,
                        ms,
                    };
                    return Ok((read, version));
                }
            }
            ServerFrame::Error { code, .. } => bail!("the server refused: {code:?}"),
            _ => {}
        }
    }
}

/// "other" writes a message in each of the first `count` rooms, over the network.
async fn write(url: &str, count: usize) -> anyhow::Result<()> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}/v1/sync")).await?;
    let hello = ClientFrame::Hello {
        version: PROTOCOL_VERSION,
        token: token("other")?,
        client_id: 23,
    };
    ws.send(Message::Binary(hello.encode().into())).await?;
    let other = author("other");
    for i in 0..count {
        // A replica per room: a client id's structs start at clock 0 in every document.
        let writer = ChatRoom::new(new_doc(1_000 + i as u64)?);
        let doc = DocId::new(room_id(i))?;
        let resume = ClientFrame::Resume {
            docs: vec![driftsync_protocol::ResumeDoc {
                doc: doc.clone(),
                cursor: 0,
                state_vector: vec![0],
            }],
        };
        ws.send(Message::Binary(resume.encode().into())).await?;
        let (_, update) = writer.send(&other, "something new", 10_000);
        let push = ClientFrame::Push {
            doc,
            batch: i as u64 + 1,
            update,
        };
        ws.send(Message::Binary(push.encode().into())).await?;
    }
    let mut acked = 0;
    while acked < count {
        let Some(message) = ws.next().await else {
            bail!("the server closed")
        };
        let Message::Binary(bytes) = message? else { continue };
        match ServerFrame::decode(&bytes, DEFAULT_MAX_FRAME_SIZE)? {
            ServerFrame::Ack { .. } => acked += 1,
            ServerFrame::Error { code, .. } => bail!("a push was refused: {code:?}"),
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("driftsync-bench-inbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// What the chat index costs a write: `messages` chat messages appended one transaction each
/// (as a quiet room commits them) to a SQLite file, in a room of two members, with their index
/// facts and without (the same updates), and with them and the push outbox on (a due row for
/// the other member). Returns the mean per append of each, in µs (two runs each, interleaved).
pub async fn append_cost(messages: usize) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile_dir()?.join("append");
    std::fs::create_dir_all(&dir)?;
    let mut means = Vec::new();
    let modes = [0u8, 1, 2, 0, 1, 2];
    for (run, mode) in modes.into_iter().enumerate() {
        let indexed = mode > 0;
        let store = SqliteStore::open(dir.join(format!("run-{run}.db"))).await?;
        if mode == 2 {
            store.set_push(Some(driftsync_engine::store::PushSettings {
                grace_ms: 3_000,
                include_text: false,
            }));
        }
        let server = new_doc(1)?;
        let guard = ChatGuard::attach(&server);
        let (a, b) = (ChatRoom::new(new_doc(31)?), ChatRoom::new(new_doc(32)?));
        let mut appends = Vec::new();
        for (user, update) in [
            ("a", a.join(&author("a"), 1_000).context("join")?),
            ("b", b.join(&author("b"), 1_000).context("join")?),
        ]
        .into_iter()
        .chain((0..messages).map(|i| ("a", a.send(&author("a"), &format!("message {i}"), 2_000 + i as u64).1)))
        {
            guard.reset();
            apply_bytes(&server, &update)?;
            guard
                .check(Some(user), u64::MAX / 4)
                .map_err(|v| anyhow::anyhow!("{v}"))?;
            let facts = guard.take_facts();
            appends.push(Append {
                doc: "chat/cost".into(),
                origin: None,
                update,
                chat: indexed.then(|| Box::new(facts)),
            });
        }
        let (joins, rest) = appends.split_at(2);
        store.append(joins).await?;
        let started = Instant::now();
        for append in rest {
            store.append(std::slice::from_ref(append)).await?;
        }
        means.push((mode, started.elapsed().as_secs_f64() * 1e6 / messages as f64));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mean = |mode: u8| {
        let runs: Vec<f64> = means.iter().filter(|m| m.0 == mode).map(|m| m.1).collect();
        runs.iter().sum::<f64>() / runs.len() as f64
    };
    Ok(json!({
        "messages": messages,
        "append_us_without_index": mean(0),
        "append_us_with_index": mean(1),
        "append_us_with_index_and_push": mean(2),
    }))
}
