//! The server over real loopback sockets: resume, push, acknowledgement, broadcast.

use driftsync_engine::doc::{self, new_doc};
use driftsync_engine::sync::{apply_remote, Limits};
use driftsync_protocol::{ClientFrame, DocId, ResumeDoc, ServerFrame};
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
        c.send(&ClientFrame::Resume { docs: vec![ResumeDoc { doc: d.clone(), cursor: 0, state_vector: vec![0] }] })
            .await;
        let ServerFrame::Resumed { docs } = c.recv().await.unwrap() else { panic!() };
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].cursor, 0);
    }
    let local = new_doc(11).unwrap();
    let update = doc::text_insert(&local, 0, "hello").unwrap();
    a.send(&ClientFrame::Push { doc: d.clone(), batch: 1, update: update.clone() }).await;
    let ack = a.recv_until(|f| matches!(f, ServerFrame::Ack { .. }).then(|| f.clone())).await;
    assert_eq!(ack, ServerFrame::Ack { doc: d.clone(), batch: 1, cursor: 1 });
    let got = b.recv_until(|f| matches!(f, ServerFrame::Update { .. }).then(|| f.clone())).await;
    let ServerFrame::Update { cursor, update: bytes, .. } = got else { unreachable!() };
    assert_eq!(cursor, 1);
    let remote = new_doc(12).unwrap();
    apply_remote(&remote, &bytes, &Limits::default()).unwrap();
    assert_eq!(doc::text(&remote), "hello");

    // A re-sent batch (its acknowledgement was lost) is acknowledged again, not stored twice.
    a.send(&ClientFrame::Push { doc: d.clone(), batch: 1, update }).await;
    let ack = a.recv_until(|f| matches!(f, ServerFrame::Ack { .. }).then(|| f.clone())).await;
    assert_eq!(ack, ServerFrame::Ack { doc: d.clone(), batch: 1, cursor: 1 });
    server.stop().await;
}
