//! The server over real loopback sockets: resume, push, acknowledgement, broadcast.

use driftsync_engine::doc::{self, new_doc};
use driftsync_engine::sync::{apply_remote, Limits};
use driftsync_protocol::{ClientFrame, DocId, ServerFrame};
use driftsync_tests::{sqlite_store, NativeClient, TestServer};

fn doc_id(s: &str) -> DocId {
    DocId::new(s).unwrap()
}

#[tokio::test]
async fn push_is_acknowledged_stored_and_broadcast() {
    let (_dir, store) = sqlite_store().await;
    let server = TestServer::start(store, Default::default()).await;
    let d = doc_id("notes/a");
    let mut a = NativeClient::connect(&server.url(), "", 11).await;
    let mut b = NativeClient::connect(&server.url(), "", 12).await;
    for c in [&mut a, &mut b] {
        let docs = c.resume_from_scratch(&d).await;
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].cursor, 0);
    }
    let local = new_doc(11).unwrap();
    let update = doc::text_insert(&local, 0, "hello").unwrap();
    a.send(&ClientFrame::Push {
        doc: d.clone(),
        batch: 1,
        update: update.clone(),
    })
    .await;
    let ack = a
        .recv_until(|f| matches!(f, ServerFrame::Ack { .. }).then(|| f.clone()))
        .await;
    assert_eq!(
        ack,
        ServerFrame::Ack {
            doc: d.clone(),
            batch: 1,
            cursor: 1
        }
    );
    let got = b
        .recv_until(|f| matches!(f, ServerFrame::Update { .. }).then(|| f.clone()))
        .await;
    let ServerFrame::Update {
        cursor, update: bytes, ..
    } = got
    else {
        unreachable!()
    };
    // Sent before its own commit: the cursor is the one before it (the client's cursor reaches
    // 1 with the next update or resume).
    assert_eq!(cursor, 0);
    let remote = new_doc(12).unwrap();
    apply_remote(&remote, &bytes, &Limits::default()).unwrap();
    assert_eq!(doc::text(&remote), "hello");

    // A re-sent batch (its acknowledgement was lost) is acknowledged again, not stored twice.
    a.send(&ClientFrame::Push {
        doc: d.clone(),
        batch: 1,
        update,
    })
    .await;
    let ack = a
        .recv_until(|f| matches!(f, ServerFrame::Ack { .. }).then(|| f.clone()))
        .await;
    assert_eq!(
        ack,
        ServerFrame::Ack {
            doc: d.clone(),
            batch: 1,
            cursor: 1
        }
    );
    // It changed nothing, so the other subscriber is not sent it again: the next update it gets
    // is a new one, carrying the cursor of the first (now committed).
    let update = doc::text_insert(&local, 5, "!").unwrap();
    a.send(&ClientFrame::Push {
        doc: d.clone(),
        batch: 2,
        update: update.clone(),
    })
    .await;
    let got = b
        .recv_until(|f| matches!(f, ServerFrame::Update { .. }).then(|| f.clone()))
        .await;
    assert_eq!(
        got,
        ServerFrame::Update {
            doc: d.clone(),
            cursor: 1,
            update
        }
    );
    server.stop().await;
}

/// The WebSocket layer (our own upgrade and writer): refuses plain HTTP, answers pings, and
/// carries messages of every header length (7-, 16- and 64-bit) intact, live and in a resume.
#[tokio::test]
async fn the_websocket_layer_answers_pings_and_carries_messages_of_every_size() {
    let (_dir, store) = sqlite_store().await;
    let server = TestServer::start(store, Default::default()).await;
    for path in ["/v1/sync", "/yjs/notes"] {
        let status = driftsync_tests::http_status(server.addr, path).await;
        assert!(status.starts_with("HTTP/1.1 426"), "{path}: {status}");
    }
    let d = doc_id("notes/sizes");
    let mut a = NativeClient::connect(&server.url(), "", 21).await;
    let mut b = NativeClient::connect(&server.url(), "", 22).await;
    for payload in [vec![], vec![7u8; 3], vec![9u8; 125]] {
        assert_eq!(b.ws_ping(payload.clone()).await, Some(payload));
    }
    subscribe(&mut a, &d).await;
    subscribe(&mut b, &d).await;
    let local = new_doc(21).unwrap();
    let mut len = 0u32;
    for (batch, size) in [(1u64, 10usize), (2, 300), (3, 70_000), (4, 200_000)] {
        let text = "abcdefghij".repeat(size / 10);
        let update = doc::text_insert(&local, len, &text).unwrap();
        len += text.len() as u32;
        a.send(&ClientFrame::Push {
            doc: d.clone(),
            batch,
            update: update.clone(),
        })
        .await;
        let got = b
            .recv_until(|f| match f {
                ServerFrame::Update { update, .. } => Some(update.clone()),
                _ => None,
            })
            .await;
        assert_eq!(got, update, "an update of {size} characters arrives intact");
    }
    // A fresh connection gets the whole (large) document in its resume answer.
    let mut c = NativeClient::connect(&server.url(), "", 23).await;
    let docs = c.resume_from_scratch(&d).await;
    let update = docs[0].update.clone().expect("the document");
    let remote = new_doc(23).unwrap();
    apply_remote(&remote, &update, &Limits::default()).unwrap();
    assert_eq!(doc::text(&remote), doc::text(&local));
    assert_eq!(c.ws_ping(vec![1, 2, 3]).await, Some(vec![1, 2, 3]));
    server.stop().await;
}

async fn subscribe(c: &mut NativeClient, d: &DocId) {
    c.resume_from_scratch(d).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_told_to_resync_and_others_keep_receiving() {
    let (_dir, store) = sqlite_store().await;
    let config = driftsync_server::Config {
        outbound_queue: 16,
        // 16 MB of text: past the default maximum document size, which this test is not about.
        max_document_bytes: u64::MAX,
        ..Default::default()
    };
    let server = TestServer::start(store, config).await;
    let d = doc_id("notes/slow");
    let mut slow = NativeClient::connect(&server.url(), "", 21).await;
    let mut reader = NativeClient::connect(&server.url(), "", 22).await;
    let mut writer = NativeClient::connect(&server.url(), "", 23).await;
    for c in [&mut slow, &mut reader, &mut writer] {
        subscribe(c, &d).await;
    }
    // Enough data to fill the loopback socket buffers of the client that does not read.
    let local = new_doc(23).unwrap();
    let chunk = "x".repeat(8 * 1024);
    let total = 2000u64;
    let reader_task = tokio::spawn(async move {
        let mut received = 0;
        let mut last_cursor = 0;
        while received < total {
            let cursor = reader
                .recv_until(|f| {
                    if let ServerFrame::Update { cursor, .. } = f {
                        Some(*cursor)
                    } else {
                        None
                    }
                })
                .await;
            // Each update comes with the cursor before its own (it is sent before its commit,
            // after the commit of every earlier one).
            assert_eq!(cursor, received, "updates arrive in cursor order");
            last_cursor = cursor;
            received += 1;
        }
        assert_eq!(last_cursor, total - 1);
        received
    });
    for batch in 1..=total {
        let update = doc::text_insert(&local, 0, &chunk).unwrap();
        writer
            .send(&ClientFrame::Push {
                doc: d.clone(),
                batch,
                update,
            })
            .await;
        // Keep the writer's own queue drained.
        writer
            .recv_until(|f| matches!(f, ServerFrame::Ack { .. }).then_some(()))
            .await;
    }
    assert_eq!(
        reader_task.await.unwrap(),
        total,
        "the reading client received every update"
    );
    assert_eq!(slow.close_code().await, Some(driftsync_protocol::CLOSE_RESYNC));
    server.stop().await;
}

#[tokio::test]
async fn garbage_frames_and_garbage_updates_leave_the_room_healthy() {
    let (_dir, store) = sqlite_store().await;
    let server = TestServer::start(store, Default::default()).await;
    let d = doc_id("notes/garbage");
    let mut bad = NativeClient::connect(&server.url(), "", 31).await;
    let mut good = NativeClient::connect(&server.url(), "", 32).await;
    subscribe(&mut bad, &d).await;
    subscribe(&mut good, &d).await;

    // Random bytes as frames: a typed error each, and the connection stays.
    let mut seed = 0x5eed_u64;
    for len in [1usize, 2, 7, 64, 1000] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (seed >> 56) as u8
            })
            .collect();
        bad.send_raw(bytes).await;
    }
    // A well-formed frame carrying an update that is not a yrs update.
    bad.send(&ClientFrame::Push {
        doc: d.clone(),
        batch: 1,
        update: vec![0xff; 40],
    })
    .await;
    let code = bad
        .recv_until(|f| match f {
            ServerFrame::Error {
                code, batch: Some(1), ..
            } => Some(*code),
            _ => None,
        })
        .await;
    assert_eq!(code, driftsync_protocol::ErrorCode::InvalidUpdate);

    // The room and the other client are unaffected; the bad client's connection still works.
    let local = new_doc(31).unwrap();
    let update = doc::text_insert(&local, 0, "still fine").unwrap();
    bad.send(&ClientFrame::Push {
        doc: d.clone(),
        batch: 2,
        update,
    })
    .await;
    bad.recv_until(|f| matches!(f, ServerFrame::Ack { batch: 2, .. }).then_some(()))
        .await;
    let bytes = good
        .recv_until(|f| {
            if let ServerFrame::Update { update, .. } = f {
                Some(update.clone())
            } else {
                None
            }
        })
        .await;
    let replica = new_doc(32).unwrap();
    apply_remote(&replica, &bytes, &Limits::default()).unwrap();
    assert_eq!(doc::text(&replica), "still fine");
    server.stop().await;
}

/// The value of an unlabelled metric in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn metrics_count_connections_updates_and_rooms_and_idle_rooms_are_unloaded() {
    let (_dir, store) = sqlite_store().await;
    let config = driftsync_server::Config {
        sweep_interval: std::time::Duration::from_millis(50),
        ..Default::default()
    };
    let server = TestServer::start(store, config).await;
    let d = doc_id("notes/metrics");
    let mut a = NativeClient::connect(&server.url(), "", 41).await;
    subscribe(&mut a, &d).await;
    let local = new_doc(41).unwrap();
    let update = doc::text_insert(&local, 0, "counted").unwrap();
    a.send(&ClientFrame::Push {
        doc: d.clone(),
        batch: 1,
        update,
    })
    .await;
    a.recv_until(|f| matches!(f, ServerFrame::Ack { .. }).then_some(()))
        .await;
    let text = driftsync_tests::http_get(server.addr, "/metrics").await;
    assert_eq!(metric(&text, "driftsync_connections"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "driftsync_rooms"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "driftsync_updates_in_total"), Some(1.0), "{text}");
    assert_eq!(
        metric(&text, "driftsync_ack_latency_seconds_count"),
        Some(1.0),
        "{text}"
    );
    assert!(
        metric(&text, "driftsync_frames_out_total").unwrap_or(0.0) >= 3.0,
        "{text}"
    );
    // Once the last subscriber is gone, the room is unloaded after two sweeps.
    drop(a);
    let addr = server.addr;
    assert!(
        driftsync_tests::eventually(|| async move {
            let text = driftsync_tests::http_get(addr, "/metrics").await;
            metric(&text, "driftsync_rooms") == Some(0.0) && metric(&text, "driftsync_connections") == Some(0.0)
        })
        .await,
        "the idle room was not unloaded"
    );
    // And it loads again, with its content, on next use.
    let mut b = NativeClient::connect(&server.url(), "", 42).await;
    let docs = b.resume_from_scratch(&d).await;
    let replica = new_doc(42).unwrap();
    apply_remote(&replica, docs[0].update.as_ref().unwrap(), &Limits::default()).unwrap();
    assert_eq!(doc::text(&replica), "counted");
    server.stop().await;
}

#[tokio::test]
async fn a_flood_is_rate_limited_with_an_error() {
    let (_dir, store) = sqlite_store().await;
    let rate_limit = driftsync_server::RateLimit {
        frames_per_sec: 1.0,
        frame_burst: 5.0,
        bytes_per_sec: 1e6,
        byte_burst: 1e6,
    };
    let server = TestServer::start(
        store,
        driftsync_server::Config {
            rate_limit,
            ..Default::default()
        },
    )
    .await;
    let mut a = NativeClient::connect(&server.url(), "", 51).await;
    for nonce in 0..20 {
        a.send(&ClientFrame::Ping { nonce }).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    while pongs + limited < 20 {
        match a.recv().await {
            Some(ServerFrame::Pong { .. }) => pongs += 1,
            Some(ServerFrame::Error {
                code: driftsync_protocol::ErrorCode::RateLimited,
                ..
            }) => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pongs <= 6 && limited >= 14, "pongs {pongs}, limited {limited}");
    server.stop().await;
}

#[tokio::test]
async fn two_instances_sharing_a_store_serve_one_document_through_the_fanout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let fanout = std::sync::Arc::new(driftsync_server::LocalFanout::default());
    let config = || driftsync_server::Config {
        fanout: fanout.clone(),
        ..Default::default()
    };
    let one = TestServer::start(
        driftsync_engine::store::SqliteStore::open(&path).await.unwrap(),
        config(),
    )
    .await;
    let two = TestServer::start(
        driftsync_engine::store::SqliteStore::open(&path).await.unwrap(),
        config(),
    )
    .await;
    let d = doc_id("notes/shared");
    let mut a = NativeClient::connect(&one.url(), "", 61).await;
    let mut b = NativeClient::connect(&two.url(), "", 62).await;
    subscribe(&mut a, &d).await;
    subscribe(&mut b, &d).await;
    let (la, lb) = (new_doc(61).unwrap(), new_doc(62).unwrap());
    for round in 0..5u64 {
        let ua = doc::text_insert(&la, doc::text_len(&la), "a").unwrap();
        a.send(&ClientFrame::Push {
            doc: d.clone(),
            batch: round + 1,
            update: ua,
        })
        .await;
        let (cursor, update) = b
            .recv_until(|f| {
                if let ServerFrame::Update { cursor, update, .. } = f {
                    Some((*cursor, update.clone()))
                } else {
                    None
                }
            })
            .await;
        assert_eq!(
            cursor,
            2 * round + 1,
            "instance two relays instance one's update in cursor order"
        );
        apply_remote(&lb, &update, &Limits::default()).unwrap();
        let ub = doc::text_insert(&lb, doc::text_len(&lb), "b").unwrap();
        b.send(&ClientFrame::Push {
            doc: d.clone(),
            batch: round + 1,
            update: ub,
        })
        .await;
        let (cursor, update) = a
            .recv_until(|f| {
                if let ServerFrame::Update { cursor, update, .. } = f {
                    Some((*cursor, update.clone()))
                } else {
                    None
                }
            })
            .await;
        assert_eq!(cursor, 2 * round + 2);
        apply_remote(&la, &update, &Limits::default()).unwrap();
    }
    assert_eq!(doc::text(&la), "ababababab");
    assert_eq!(doc::text(&la), doc::text(&lb));

    // Presence crosses instances too, and so does its removal when the connection closes.
    a.send(&ClientFrame::Presence {
        doc: d.clone(),
        state: Some(r#"{"name":"ada"}"#.into()),
    })
    .await;
    let state = b
        .recv_until(|f| {
            if let ServerFrame::Presence { state, .. } = f {
                Some(state.clone())
            } else {
                None
            }
        })
        .await;
    assert_eq!(state.as_deref(), Some(r#"{"name":"ada"}"#));
    drop(a);
    let state = b
        .recv_until(|f| {
            if let ServerFrame::Presence { state, .. } = f {
                Some(state.clone())
            } else {
                None
            }
        })
        .await;
    assert_eq!(state, None, "no ghost on the other instance");
    one.stop().await;
    two.stop().await;
}

/// Two instances on one store and no fan-out between them: an update stored through the other
/// instance reaches this one's subscribers as soon as this instance commits after it (the gap in
/// cursors is read from the store), before the pusher's `Ack`, so nobody here misses it.
#[tokio::test]
async fn an_update_stored_by_another_instance_is_read_from_the_store_at_the_next_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let one = TestServer::start(
        driftsync_engine::store::SqliteStore::open(&path).await.unwrap(),
        Default::default(),
    )
    .await;
    let two = TestServer::start(
        driftsync_engine::store::SqliteStore::open(&path).await.unwrap(),
        Default::default(),
    )
    .await;
    let d = doc_id("notes/gap");
    let mut reader = NativeClient::connect(&one.url(), "", 71).await;
    let mut writer = NativeClient::connect(&one.url(), "", 72).await;
    let mut elsewhere = NativeClient::connect(&two.url(), "", 73).await;
    for c in [&mut reader, &mut writer, &mut elsewhere] {
        subscribe(c, &d).await;
    }
    // Stored through instance two (cursor 1); instance one hears nothing of it.
    let x = doc::text_insert(&new_doc(73).unwrap(), 0, "x").unwrap();
    elsewhere
        .send(&ClientFrame::Push {
            doc: d.clone(),
            batch: 1,
            update: x.clone(),
        })
        .await;
    elsewhere
        .recv_until(|f| matches!(f, ServerFrame::Ack { .. }).then_some(()))
        .await;
    // Instance one commits after it (cursor 2).
    let y = doc::text_insert(&new_doc(72).unwrap(), 0, "y").unwrap();
    writer
        .send(&ClientFrame::Push {
            doc: d.clone(),
            batch: 1,
            update: y.clone(),
        })
        .await;
    let mut writer_got = Vec::new();
    let ack = writer
        .recv_until(|f| match f {
            ServerFrame::Update { cursor, update, .. } => {
                writer_got.push((*cursor, update.clone()));
                None
            }
            ServerFrame::Ack { cursor, .. } => Some(*cursor),
            _ => None,
        })
        .await;
    assert_eq!(ack, 2);
    assert_eq!(
        writer_got,
        vec![(1, x.clone())],
        "the pusher gets the gap before its Ack"
    );
    let mut reader_got = Vec::new();
    while reader_got.len() < 2 {
        let got = reader
            .recv_until(|f| match f {
                ServerFrame::Update { cursor, update, .. } => Some((*cursor, update.clone())),
                _ => None,
            })
            .await;
        reader_got.push(got);
    }
    assert_eq!(reader_got, vec![(0, y), (1, x)]);
    // Instance one's document holds both: a new client gets them.
    let mut fresh = NativeClient::connect(&one.url(), "", 74).await;
    let answer = fresh.resume_from_scratch(&d).await;
    assert_eq!(answer[0].cursor, 2);
    let local = new_doc(74).unwrap();
    doc::apply_bytes(&local, answer[0].update.as_ref().unwrap()).unwrap();
    let text = doc::text(&local);
    assert!(text == "xy" || text == "yx", "{text}");
    one.stop().await;
    two.stop().await;
}

/// A fan-out between instances of this process that loses what `lose` says.
#[derive(Debug, Clone)]
struct Lossy {
    inner: driftsync_server::LocalFanout,
    /// Drop every update (the head check alone carries them).
    drop_updates: bool,
}

impl driftsync_server::Fanout for Lossy {
    fn join(&self, instance: u64) -> tokio::sync::mpsc::Receiver<driftsync_server::Inbound> {
        self.inner.join(instance)
    }

    fn publish(&self, instance: u64, doc: &DocId, event: driftsync_server::FanoutEvent) {
        if self.drop_updates && matches!(event, driftsync_server::FanoutEvent::Update { .. }) {
            return;
        }
        self.inner.publish(instance, doc, event);
    }

    fn heartbeat(&self, instance: u64) {
        self.inner.heartbeat(instance);
    }

    fn subscribe(&self, instance: u64, doc: &DocId) {
        self.inner.subscribe(instance, doc);
    }

    fn unsubscribe(&self, instance: u64, doc: &DocId) {
        self.inner.unsubscribe(instance, doc);
    }
}

/// Two instances on one SQLite file, with a fan-out and a head check as configured.
async fn two_instances(
    fanout: std::sync::Arc<dyn driftsync_server::Fanout>,
    head_check: Option<std::time::Duration>,
) -> (tempfile::TempDir, TestServer, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let config = || driftsync_server::Config {
        fanout: fanout.clone(),
        head_check,
        ..Default::default()
    };
    let one = TestServer::start(
        driftsync_engine::store::SqliteStore::open(&path).await.unwrap(),
        config(),
    )
    .await;
    let two = TestServer::start(
        driftsync_engine::store::SqliteStore::open(&path).await.unwrap(),
        config(),
    )
    .await;
    (dir, one, two)
}

/// Receives updates on `c` until its replica `local` holds `text`.
async fn receive_until_text(c: &mut NativeClient, local: &yrs::Doc, text: &str) -> Vec<u64> {
    let mut cursors = Vec::new();
    while doc::text(local) != text {
        let (cursor, update) = c
            .recv_until(|f| match f {
                ServerFrame::Update { cursor, update, .. } => Some((*cursor, update.clone())),
                _ => None,
            })
            .await;
        apply_remote(local, &update, &Limits::default()).unwrap();
        cursors.push(cursor);
    }
    cursors
}

#[tokio::test]
async fn a_fanout_losing_every_update_is_repaired_by_the_head_check() {
    let fanout = std::sync::Arc::new(Lossy {
        inner: driftsync_server::LocalFanout::default(),
        drop_updates: true,
    });
    let (_dir, one, two) = two_instances(fanout, Some(std::time::Duration::from_millis(100))).await;
    let d = doc_id("notes/lossy");
    let mut a = NativeClient::connect(&one.url(), "", 71).await;
    let mut b = NativeClient::connect(&two.url(), "", 72).await;
    subscribe(&mut a, &d).await;
    subscribe(&mut b, &d).await;
    let writer = new_doc(71).unwrap();
    for (batch, chunk) in ["one ", "two ", "three"].iter().enumerate() {
        let update = doc::text_insert(&writer, doc::text_len(&writer), chunk).unwrap();
        a.push(&d, batch as u64 + 1, update).await.unwrap();
    }
    // The last update too: no later message reveals a gap, only the head check finds it.
    let reader = new_doc(72).unwrap();
    let cursors = receive_until_text(&mut b, &reader, "one two three").await;
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "in cursor order: {cursors:?}");
    assert_eq!(cursors.last(), Some(&3));
}

#[tokio::test]
async fn an_update_too_large_to_carry_is_read_from_the_store_by_the_other_instance() {
    let fanout = std::sync::Arc::new(driftsync_server::LocalFanout::default());
    // No head check: only the announcement by cursor brings it.
    let (_dir, one, two) = two_instances(fanout, None).await;
    let d = doc_id("notes/large");
    let mut a = NativeClient::connect(&one.url(), "", 73).await;
    let mut b = NativeClient::connect(&two.url(), "", 74).await;
    subscribe(&mut a, &d).await;
    subscribe(&mut b, &d).await;
    let writer = new_doc(73).unwrap();
    let big = "x".repeat(driftsync_server::fanout::MAX_CARRIED_UPDATE + 1000);
    let update = doc::text_insert(&writer, 0, &big).unwrap();
    a.push(&d, 1, update).await.unwrap();
    let reader = new_doc(74).unwrap();
    let cursors = receive_until_text(&mut b, &reader, &big).await;
    assert_eq!(cursors, vec![1]);
}

#[tokio::test]
async fn typing_crosses_instances() {
    let fanout = std::sync::Arc::new(driftsync_server::LocalFanout::default());
    let (_dir, one, two) = two_instances(fanout, None).await;
    let d = doc_id("chat/typing");
    let mut a = NativeClient::connect(&one.url(), "", 75).await;
    let mut b = NativeClient::connect(&two.url(), "", 76).await;
    subscribe(&mut a, &d).await;
    subscribe(&mut b, &d).await;
    // Once b's instance has the room loaded (its subscription made it so), a's typing reaches b.
    a.send(&ClientFrame::Typing {
        doc: d.clone(),
        typing: true,
    })
    .await;
    let (peer, typing) = b
        .recv_until(|f| match f {
            ServerFrame::Typing { peer, typing, .. } => Some((*peer, *typing)),
            _ => None,
        })
        .await;
    assert_eq!((peer, typing), (a.session, true));
}
