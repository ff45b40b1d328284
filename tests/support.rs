//! Shared helpers for the cross-crate tests: a server on a loopback port, and a small native
//! protocol client over a real WebSocket.

pub mod hpclient;
pub mod webhook;
pub mod yclient;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use driftsync_engine::store::Store;
use driftsync_protocol::{
    ClientFrame, Cursor, DocId, DocResumed, ErrorCode, ResumeDoc, ServerFrame, DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION,
};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for a frame before failing.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A server running in this process on 127.0.0.1 and a free port.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Starts a server on `store` with `config`.
    pub async fn start<S: Store>(store: S, config: driftsync_server::Config) -> TestServer {
        TestServer::start_at(store, config, "127.0.0.1:0".parse().expect("address")).await
    }

    /// Starts a server on `store` with `config` at `addr` (to restart one where it was).
    pub async fn start_at<S: Store>(store: S, config: driftsync_server::Config, addr: SocketAddr) -> TestServer {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind the test server");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(driftsync_server::serve(listener, store, config, shutdown));
        TestServer {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `ws://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(TIMEOUT * 2, task).await;
        }
    }
}

/// A native-protocol client for tests: sends frames, receives frames.
pub struct NativeClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The session id the server gave this connection.
    pub session: u64,
}

impl NativeClient {
    /// Connects to `base` (`ws://host:port`), says hello with `token` and `client_id`, and waits
    /// for the welcome. Panics (failing the test) if the server refuses.
    pub async fn connect(base: &str, token: &str, client_id: u64) -> NativeClient {
        let mut client = Self::connect_raw(base).await;
        client
            .send(&ClientFrame::Hello {
                version: PROTOCOL_VERSION,
                token: token.into(),
                client_id,
            })
            .await;
        match client.recv().await {
            Some(ServerFrame::Welcome { session, .. }) => client.session = session,
            other => panic!("expected a welcome, got {other:?}"),
        }
        client
    }

    /// Opens the WebSocket without saying hello.
    pub async fn connect_raw(base: &str) -> NativeClient {
        let (ws, _) = tokio_tungstenite::connect_async(format!("{base}/v1/sync"))
            .await
            .expect("connect");
        NativeClient { ws, session: 0 }
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &ClientFrame) {
        self.send_raw(frame.encode()).await;
    }

    /// Sends arbitrary bytes as one binary message.
    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).await.expect("send");
    }

    /// The next frame (answering server pings), or `None` when the connection closed.
    /// Fails the test after [`TIMEOUT`].
    pub async fn recv(&mut self) -> Option<ServerFrame> {
        self.recv_within(TIMEOUT).await.expect("timed out waiting for a frame")
    }

    /// Like [`recv`](Self::recv) but `Err(())` after `timeout` instead of failing.
    pub async fn recv_within(&mut self, timeout: Duration) -> Result<Option<ServerFrame>, ()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| ())?;
            match msg {
                Some(Ok(Message::Binary(bytes))) => {
                    let frame = ServerFrame::decode(&bytes, DEFAULT_MAX_FRAME_SIZE).expect("server sent a bad frame");
                    if let ServerFrame::Ping { nonce } = frame {
                        self.send(&ClientFrame::Pong { nonce }).await;
                        continue;
                    }
                    return Ok(Some(frame));
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(None),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Receives until `pick` returns `Some`, skipping other frames.
    pub async fn recv_until<T>(&mut self, mut pick: impl FnMut(&ServerFrame) -> Option<T>) -> T {
        loop {
            match self.recv().await {
                Some(frame) => {
                    if let Some(t) = pick(&frame) {
                        return t;
                    }
                }
                None => panic!("connection closed while waiting"),
            }
        }
    }

    /// Pushes one batch and waits for its acknowledgement (the cursor) or refusal (the code).
    pub async fn push(&mut self, doc: &DocId, batch: u64, update: Vec<u8>) -> Result<Cursor, ErrorCode> {
        self.send(&ClientFrame::Push {
            doc: doc.clone(),
            batch,
            update,
        })
        .await;
        self.await_push(doc, batch).await
    }

    /// Waits for the acknowledgement or refusal of a batch pushed already.
    pub async fn await_push(&mut self, doc: &DocId, batch: u64) -> Result<Cursor, ErrorCode> {
        self.recv_until(|f| match f {
            ServerFrame::Ack {
                doc: d,
                batch: b,
                cursor,
            } if d == doc && *b == batch => Some(Ok(*cursor)),
            ServerFrame::Error {
                code,
                doc: Some(d),
                batch: Some(b),
            } if d == doc && *b == batch => Some(Err(*code)),
            _ => None,
        })
        .await
    }

    /// Opens `doc` as a client holding nothing of it (cursor 0, empty state vector) and
    /// returns the `Resumed` answer's entries.
    pub async fn resume_from_scratch(&mut self, doc: &DocId) -> Vec<DocResumed> {
        self.send(&ClientFrame::Resume {
            docs: vec![ResumeDoc {
                doc: doc.clone(),
                cursor: 0,
                state_vector: vec![0],
            }],
        })
        .await;
        self.recv_until(|f| match f {
            ServerFrame::Resumed { docs } => Some(docs.clone()),
            _ => None,
        })
        .await
    }

    /// Sends a WebSocket ping with `payload` and returns the payload of the pong that answers
    /// it (skipping other messages), or `None` if the connection closed first.
    pub async fn ws_ping(&mut self, payload: Vec<u8>) -> Option<Vec<u8>> {
        self.ws.send(Message::Ping(payload.into())).await.expect("send ping");
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("timed out waiting for a pong")
            {
                Some(Ok(Message::Pong(payload))) => return Some(payload.to_vec()),
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The close code the server sent, waiting for the close (skipping other frames).
    pub async fn close_code(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await.ok()? {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }
}

/// Runs `f` with a fresh SQLite store in a temporary directory, returning the directory too.
pub async fn sqlite_store() -> (tempfile::TempDir, driftsync_engine::store::SqliteStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = driftsync_engine::store::SqliteStore::open(dir.path().join("server.db"))
        .await
        .expect("open sqlite");
    (dir, store)
}

/// Polls `check` until it returns true or [`TIMEOUT`] passes.
pub async fn eventually<F: Future<Output = bool>>(mut check: impl FnMut() -> F) -> bool {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The status line of the answer to a plain `GET path` (no upgrade).
pub async fn http_status(addr: SocketAddr, path: &str) -> String {
    let response = http_raw(addr, path).await;
    response.lines().next().unwrap_or_default().to_string()
}

/// The whole answer to a bare HTTP/1.1 `GET path`.
async fn http_raw(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read response");
    response
}

/// `GET path` on the server with a bare HTTP/1.1 request; returns the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    http_raw(addr, path)
        .await
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// A store whose appends fail while `fail` is set (a full disk, say); everything else is the
/// wrapped store's.
pub struct FlakyStore<S> {
    /// The store underneath.
    pub inner: S,
    /// Appends fail while this is `true`.
    pub fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<S: Store> Store for FlakyStore<S> {
    async fn append(
        &self,
        batch: &[driftsync_engine::store::Append],
    ) -> driftsync_engine::Result<Vec<driftsync_engine::store::Appended>> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(driftsync_engine::Error::Invalid("appends are failing (test)".into()));
        }
        self.inner.append(batch).await
    }
    async fn load(&self, doc: &str) -> driftsync_engine::Result<Option<driftsync_engine::store::StoredDoc>> {
        self.inner.load(doc).await
    }
    async fn log_after(
        &self,
        doc: &str,
        after: driftsync_protocol::Cursor,
    ) -> driftsync_engine::Result<driftsync_engine::store::LogTail> {
        self.inner.log_after(doc, after).await
    }
    async fn meta(&self, doc: &str) -> driftsync_engine::Result<Option<driftsync_engine::store::DocMeta>> {
        self.inner.meta(doc).await
    }
    async fn compact(
        &self,
        doc: &str,
        policy: &driftsync_engine::store::CompactionPolicy,
    ) -> driftsync_engine::Result<Option<driftsync_engine::store::Compacted>> {
        self.inner.compact(doc, policy).await
    }
    async fn documents(&self) -> driftsync_engine::Result<Vec<String>> {
        self.inner.documents().await
    }
    async fn claim_client(&self, client_id: u64, owner: &str) -> driftsync_engine::Result<String> {
        self.inner.claim_client(client_id, owner).await
    }
    async fn device(&self) -> driftsync_engine::Result<driftsync_engine::store::DeviceIdentity> {
        self.inner.device().await
    }
    async fn record_local(&self, doc: &str, update: &[u8]) -> driftsync_engine::Result<u64> {
        self.inner.record_local(doc, update).await
    }
    async fn outbox(&self, doc: Option<&str>) -> driftsync_engine::Result<Vec<driftsync_engine::store::OutboxEntry>> {
        self.inner.outbox(doc).await
    }
    async fn acknowledge(&self, doc: &str, batch: u64) -> driftsync_engine::Result<()> {
        self.inner.acknowledge(doc, batch).await
    }
    async fn server_cursor(&self, doc: &str) -> driftsync_engine::Result<driftsync_protocol::Cursor> {
        self.inner.server_cursor(doc).await
    }
    async fn record_remote(
        &self,
        doc: &str,
        cursor: driftsync_protocol::Cursor,
        updates: &[Vec<u8>],
    ) -> driftsync_engine::Result<()> {
        self.inner.record_remote(doc, cursor, updates).await
    }
}
