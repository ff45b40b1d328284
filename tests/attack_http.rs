//! Regression tests for attacks over HTTP and WebSocket on real loopback sockets: connections
//! that hold the server without finishing a request, more connections than the server takes,
//! large frames and floods of control frames before or after the hello, and cross-site use of an
//! open server (foreign `Origin`, DNS-rebinding `Host`). In each, an honest client connected
//! beside the attackers keeps working. The bounds are generous: these check behaviour, not speed.

use std::time::{Duration, Instant};

use driftsync_protocol::{ClientFrame, DocId, ServerFrame, DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION};
use driftsync_server::{Auth, Config};
use driftsync_tests::{eventually, http_status, sqlite_store, NativeClient, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The tests run one at a time: one of them measures the process's memory.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a test waits for the server to close a connection it should close.
const CLOSE_BOUND: Duration = Duration::from_secs(5);

const SECRET: &str = "attack-test-secret-of-32-bytes-or-more";

/// Small HTTP timeouts, so that the tests run fast.
fn config() -> Config {
    Config {
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(600),
        ..Config::default()
    }
}

async fn start(config: Config) -> (tempfile::TempDir, TestServer) {
    let (dir, store) = sqlite_store().await;
    (dir, TestServer::start(store, config).await)
}

/// An honest native client's round trip: a resume answered by the server.
async fn honest_round_trip(client: &mut NativeClient, n: u32) {
    let doc = DocId::new(format!("notes/honest-{n}")).unwrap();
    let answer = client.resume_from_scratch(&doc).await;
    assert_eq!(answer.len(), 1, "the honest client got its answer");
}

/// Waits until the server closes `stream` (end of stream or reset), reading and discarding what
/// it sends; `Some(elapsed)` if it did within `bound`.
async fn closed_within(stream: &mut TcpStream, bound: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(tokio::time::Instant::from_std(start + bound), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// Sends `request` (a request head without its final empty line) and returns the answer's head.
async fn request_head(addr: std::net::SocketAddr, request: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("{request}\r\n").as_bytes())
        .await
        .expect("write request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let deadline = tokio::time::Instant::now() + CLOSE_BOUND;
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    (stream, String::from_utf8_lossy(&head).into_owned())
}

/// A WebSocket upgrade request's head for `path`, with `extra` header lines.
fn upgrade_request(host: &str, path: &str, extra: &[&str]) -> String {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for line in extra {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request
}

/// The status code of an answer's head.
fn status(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// A raw WebSocket client connection, upgraded on `path`.
async fn raw_ws(addr: std::net::SocketAddr, path: &str) -> TcpStream {
    let (stream, head) = request_head(addr, &upgrade_request(&addr.to_string(), path, &[])).await;
    assert_eq!(status(&head), 101, "{head}");
    stream
}

/// A masked client frame header (RFC 6455 §5.2) for a payload of `len` bytes.
fn frame_header(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
    let mut header = vec![if fin { 0x80 } else { 0 } | opcode];
    match len {
        0..=125 => header.push(0x80 | len as u8),
        126..=0xFFFF => {
            header.push(0x80 | 126);
            header.extend((len as u16).to_be_bytes());
        }
        _ => {
            header.push(0x80 | 127);
            header.extend((len as u64).to_be_bytes());
        }
    }
    // A zero mask: the payload goes as it is.
    header.extend([0, 0, 0, 0]);
    header
}

/// A whole masked client frame.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = frame_header(fin, opcode, payload.len());
    bytes.extend_from_slice(payload);
    bytes
}

/// Reads one server frame (unmasked): its opcode and payload.
async fn read_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.ok()?;
    let len = match head[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).await.ok()?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).await.ok()?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).ok()?];
    stream.read_exact(&mut payload).await.ok()?;
    Some((head[0] & 0x0F, payload))
}

/// Says hello on a raw native connection (open server) and waits for the welcome.
async fn raw_hello(stream: &mut TcpStream) {
    let hello = ClientFrame::Hello {
        version: PROTOCOL_VERSION,
        token: String::new(),
        client_id: 99,
    }
    .encode();
    stream.write_all(&frame(true, 0x2, &hello)).await.unwrap();
    let (opcode, payload) = tokio::time::timeout(CLOSE_BOUND, read_frame(stream))
        .await
        .expect("a welcome in time")
        .expect("a welcome");
    assert_eq!(opcode, 0x2);
    let welcome = ServerFrame::decode(&payload, DEFAULT_MAX_FRAME_SIZE).unwrap();
    assert!(matches!(welcome, ServerFrame::Welcome { .. }), "{welcome:?}");
}

/// The close code in the server's close frame, if the connection ends with one within the bound
/// (frames before it are skipped); `None` if it ends without one (a reset, say).
async fn close_code(stream: &mut TcpStream) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + CLOSE_BOUND;
    loop {
        match tokio::time::timeout_at(deadline, read_frame(stream)).await {
            Ok(Some((0x8, payload))) => return payload.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])),
            Ok(Some(_)) => continue,
            _ => return None,
        }
    }
}

/// The process's resident memory, in bytes (the server runs in this process).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test]
async fn connections_that_never_finish_a_request_are_closed() {
    let _serial = SERIAL.lock().await;
    let (_dir, server) = start(config()).await;
    let mut honest = NativeClient::connect(&server.url(), "", 1).await;

    // A partial request head, nothing at all, and a keep-alive connection left idle after one
    // request.
    let mut partial = TcpStream::connect(server.addr).await.unwrap();
    partial
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {}\r\nX-Slow: ", server.addr).as_bytes())
        .await
        .unwrap();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let (mut idle, head) = request_head(
        server.addr,
        &format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n", server.addr),
    )
    .await;
    assert_eq!(status(&head), 200, "{head}");

    honest_round_trip(&mut honest, 1).await;
    for (name, stream) in [
        ("partial head", &mut partial),
        ("silent", &mut silent),
        ("idle keep-alive", &mut idle),
    ] {
        let closed = closed_within(stream, CLOSE_BOUND).await;
        assert!(closed.is_some(), "{name}: still open after {CLOSE_BOUND:?}");
    }
    honest_round_trip(&mut honest, 2).await;
    assert!(http_status(server.addr, "/healthz").await.contains("200"));
    server.stop().await;
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_at_once_and_healthz_recovers() {
    let _serial = SERIAL.lock().await;
    let max = 6;
    let (_dir, server) = start(Config {
        max_connections: max,
        // The attackers hold their connections for the whole test.
        header_read_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        ..Config::default()
    })
    .await;
    // The honest client holds one of the permits, upgraded.
    let mut honest = NativeClient::connect(&server.url(), "", 1).await;
    let mut attackers = Vec::new();
    for _ in 0..max - 1 {
        attackers.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // Let the server take them all.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // One more: answered 503 (or closed) at once, not left hanging.
    let started = Instant::now();
    let (mut refused, head) = request_head(
        server.addr,
        &format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n", server.addr),
    )
    .await;
    assert!(head.is_empty() || status(&head) == 503, "{head}");
    assert!(closed_within(&mut refused, CLOSE_BOUND).await.is_some());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused in {:?}",
        started.elapsed()
    );

    honest_round_trip(&mut honest, 1).await;
    drop(attackers);
    assert!(
        eventually(|| async { http_status(server.addr, "/healthz").await.contains("200") }).await,
        "/healthz answers again once the attackers are gone"
    );
    honest_round_trip(&mut honest, 2).await;
    server.stop().await;
}

#[tokio::test]
async fn large_frames_before_the_hello_are_refused_from_their_header() {
    let _serial = SERIAL.lock().await;
    let (_dir, server) = start(config()).await;
    let mut honest = NativeClient::connect(&server.url(), "", 1).await;
    const ATTACKERS: usize = 50;
    const FRAME: usize = 4 * 1024 * 1024;
    let data = std::sync::Arc::new(vec![0x55u8; FRAME]);
    let mut sockets = Vec::new();
    for _ in 0..ATTACKERS {
        sockets.push(raw_ws(server.addr, "/v1/sync").await);
    }
    let before = rss();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = std::sync::Arc::clone(&peak);
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let started = Instant::now();
    let attacks: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            let data = std::sync::Arc::clone(&data);
            tokio::spawn(async move {
                // The header of a 4 MiB frame, then as much of its payload as the server takes.
                let _ = socket.write_all(&frame_header(true, 0x2, FRAME)).await;
                let _ = tokio::time::timeout(CLOSE_BOUND, socket.write_all(&data)).await;
                closed_within(&mut socket, CLOSE_BOUND).await
            })
        })
        .collect();
    honest_round_trip(&mut honest, 1).await;
    for attack in attacks {
        assert!(
            attack.await.unwrap().is_some(),
            "an attacker's connection was not closed"
        );
    }
    sampler.abort();
    let grown = peak.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(before);
    eprintln!("resident memory grew by {} KiB during the attack", grown / 1024);
    assert!(
        grown < 24 * 1024 * 1024,
        "the server grew by {} MB for {ATTACKERS} unauthenticated 4 MiB frames",
        grown / (1024 * 1024)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    // The refusal is a close with 1009 when the client can read it.
    let mut one = raw_ws(server.addr, "/v1/sync").await;
    one.write_all(&frame_header(true, 0x2, FRAME)).await.unwrap();
    assert_eq!(close_code(&mut one).await, Some(1009));
    // A hello of honest size still works, and after it frames up to the full size are read.
    let mut after = raw_ws(server.addr, "/v1/sync").await;
    raw_hello(&mut after).await;
    let doc = DocId::new("notes/never-opened").unwrap();
    let push = ClientFrame::Push {
        doc: doc.clone(),
        batch: 1,
        update: vec![0; 100_000],
    }
    .encode();
    after.write_all(&frame(true, 0x2, &push)).await.unwrap();
    let (_, answer) = tokio::time::timeout(CLOSE_BOUND, read_frame(&mut after))
        .await
        .unwrap()
        .expect("an answer, not a close");
    assert_eq!(
        ServerFrame::decode(&answer, DEFAULT_MAX_FRAME_SIZE).unwrap(),
        ServerFrame::Error {
            code: driftsync_protocol::ErrorCode::NotSubscribed,
            doc: Some(doc),
            batch: Some(1)
        }
    );
    honest_round_trip(&mut honest, 2).await;
    server.stop().await;
}

#[tokio::test]
async fn floods_of_pings_or_empty_continuations_are_closed() {
    let _serial = SERIAL.lock().await;
    let (_dir, server) = start(config()).await;
    let mut honest = NativeClient::connect(&server.url(), "", 1).await;
    let pings: Vec<u8> = (0..20_000).flat_map(|_| frame(true, 0x9, b"")).collect();
    let mut continuations = frame(false, 0x2, b"");
    continuations.extend((0..20_000).flat_map(|_| frame(false, 0x0, b"")));
    for (name, flood) in [("pings", pings), ("empty continuations", continuations)] {
        for path in ["/v1/sync", "/yjs/notes/flood"] {
            let mut attacker = raw_ws(server.addr, path).await;
            if path == "/v1/sync" {
                raw_hello(&mut attacker).await;
            }
            let _ = attacker.write_all(&flood).await;
            let code = close_code(&mut attacker).await;
            // 1008 for the flood; 4000 (resync) when the pongs it asks for fill the outbound
            // queue first; none when the reset comes before the close frame is read.
            assert!(
                matches!(code, Some(1008 | 4000) | None),
                "{name} on {path}: closed with {code:?}"
            );
            assert!(
                closed_within(&mut attacker, CLOSE_BOUND).await.is_some(),
                "{name} on {path}: not closed"
            );
            honest_round_trip(&mut honest, 1).await;
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn an_open_server_refuses_foreign_origins_and_host_names() {
    let _serial = SERIAL.lock().await;
    let (_dir, server) = start(config()).await;
    let mut honest = NativeClient::connect(&server.url(), "", 1).await;
    let host = server.addr.to_string();
    let loopback_origin = format!("Origin: http://127.0.0.1:{}", server.addr.port());
    for path in ["/v1/sync", "/yjs/notes/1"] {
        let (_, head) = request_head(
            server.addr,
            &upgrade_request(&host, path, &["Origin: https://evil.example"]),
        )
        .await;
        assert_eq!(status(&head), 403, "{path}: {head}");
        let (_, head) = request_head(server.addr, &upgrade_request(&host, path, &["Origin: null"])).await;
        assert_eq!(status(&head), 403, "{path}: {head}");
        let (_, head) = request_head(server.addr, &upgrade_request(&host, path, &[&loopback_origin])).await;
        assert_eq!(status(&head), 101, "{path}: {head}");
        let (_, head) = request_head(
            server.addr,
            &upgrade_request(&host, path, &["Origin: http://localhost:3000"]),
        )
        .await;
        assert_eq!(status(&head), 101, "{path}: {head}");
        let (_, head) = request_head(server.addr, &upgrade_request(&host, path, &[])).await;
        assert_eq!(status(&head), 101, "{path}: {head}");
        // DNS rebinding: the page's own host name, resolved to 127.0.0.1.
        let rebound = format!("evil.example:{}", server.addr.port());
        let (_, head) = request_head(server.addr, &upgrade_request(&rebound, path, &[])).await;
        assert_eq!(status(&head), 403, "{path}: {head}");
        let (_, head) = request_head(
            server.addr,
            &upgrade_request(&format!("localhost:{}", server.addr.port()), path, &[]),
        )
        .await;
        assert_eq!(status(&head), 101, "{path}: {head}");
    }
    let (_, head) = request_head(server.addr, "GET /healthz HTTP/1.1\r\nHost: evil.example\r\n").await;
    assert_eq!(status(&head), 403, "{head}");
    let (_, head) = request_head(server.addr, "GET /metrics HTTP/1.1\r\nHost: evil.example\r\n").await;
    assert_eq!(status(&head), 403, "{head}");
    let (_, head) = request_head(server.addr, &format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n")).await;
    assert_eq!(status(&head), 200, "{head}");
    honest_round_trip(&mut honest, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn with_a_secret_any_origin_may_connect_unless_a_list_is_set() {
    let _serial = SERIAL.lock().await;
    let (_dir, server) = start(Config {
        auth: Auth::new(Some(SECRET)),
        ..config()
    })
    .await;
    let host = server.addr.to_string();
    for path in ["/v1/sync", "/yjs/notes/1"] {
        let (_, head) = request_head(
            server.addr,
            &upgrade_request(&host, path, &["Origin: https://evil.example"]),
        )
        .await;
        assert_eq!(status(&head), 101, "{path}: {head}");
        // Not an open server: its host names are its own business.
        let (_, head) = request_head(server.addr, &upgrade_request("sync.example", path, &[])).await;
        assert_eq!(status(&head), 101, "{path}: {head}");
    }
    server.stop().await;

    let (_dir, server) = start(Config {
        auth: Auth::new(Some(SECRET)),
        allowed_origins: Some(vec!["https://app.example".into()]),
        ..config()
    })
    .await;
    let host = server.addr.to_string();
    for path in ["/v1/sync", "/yjs/notes/1"] {
        let (_, head) = request_head(
            server.addr,
            &upgrade_request(&host, path, &["Origin: https://evil.example"]),
        )
        .await;
        assert_eq!(status(&head), 403, "{path}: {head}");
        let (_, head) = request_head(
            server.addr,
            &upgrade_request(&host, path, &["Origin: https://app.example"]),
        )
        .await;
        assert_eq!(status(&head), 101, "{path}: {head}");
        let (_, head) = request_head(server.addr, &upgrade_request(&host, path, &[])).await;
        assert_eq!(status(&head), 101, "{path}: {head}");
    }
    server.stop().await;
}
