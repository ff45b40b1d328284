//! The HTTP side of the server: our accept loop (in place of `axum::serve`) and who may talk to
//! the server.
//!
//! Every connection holds one of [`Config::max_connections`] permits for its whole life, an
//! upgraded WebSocket included (the permit lives in its socket); one over the limit is answered
//! at once with `503` and closed, never left hanging, so that the process keeps file descriptors
//! for its store and for `/healthz`. A request's head must arrive within
//! [`Config::header_read_timeout`] — also the longest a keep-alive connection may wait for its
//! next request (hyper restarts that timer whenever a connection goes idle) —, and a connection
//! that has not upgraded is closed after [`Config::idle_timeout`] without a byte read or
//! written. Errors of `accept` (out of file descriptors) are logged once per burst and retried
//! with a growing pause instead of spinning. At shutdown the listener closes, idle connections
//! close, requests in flight finish, and [`serve`] returns when they have (upgraded WebSockets
//! are closed with "going away" by their own loops).
//!
//! An open server (no secret) must not be usable by web pages: it answers only requests whose
//! `Host` is a loopback name (a DNS-rebinding host name is refused), and its WebSocket endpoints
//! accept browser upgrades only from loopback origins unless [`Config::allowed_origins`] says
//! otherwise.

use std::io::{self, IoSlice, Read as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

/// The largest request head (request line and headers) read, in bytes: a browser's upgrade with
/// its cookies fits; hyper's default (~400 KB) let every slow connection hold that much.
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// The first and the longest pause after `accept` failed for want of resources.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long shutdown waits for HTTP requests in flight.
const SHUTDOWN_HTTP_GRACE: Duration = Duration::from_secs(10);

/// The idle watchdog looks this many times per [`Config::idle_timeout`].
const IDLE_CHECKS: u32 = 4;

/// The answer to a connection over [`Config::max_connections`].
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 21\r\nretry-after: 1\r\nconnection: close\r\n\r\ntoo many connections\n";

/// What the accept loop needs of the configuration.
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    /// TLS terminated here: each connection's handshake runs in its own task, within the
    /// header-read timeout.
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Limits {
    pub(crate) fn of(config: &Config) -> Limits {
        Limits {
            max_connections: config.max_connections.clamp(1, Semaphore::MAX_PERMITS),
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            tls: config.tls.clone().map(tokio_rustls::TlsAcceptor::from),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then returns once the HTTP
/// connections have finished (see the module documentation).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    let builder = Arc::new(builder);
    let connections = TaskTracker::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut failing = false;
    let mut refusing = false;
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            // The peer gave up before we took its connection: nothing wrong here.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors (EMFILE, ENFILE) or memory: retrying at once would spin.
                if !failing {
                    tracing::warn!(error = %e, "cannot accept connections; retrying with backoff");
                    failing = true;
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        if failing {
            tracing::info!("accepting connections again");
            failing = false;
        }
        backoff = ACCEPT_BACKOFF_MIN;
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            if !refusing {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "connection limit reached: refusing new connections"
                );
                refusing = true;
            }
            refuse_busy(tcp);
            continue;
        };
        refusing = false;
        // Small frames go out at once: latency matters more than packet count here.
        let _ = tcp.set_nodelay(true);
        let active = Arc::new(AtomicBool::new(true));
        let io = Tracked {
            tcp,
            active: Arc::clone(&active),
            _permit: permit,
        };
        let (builder, app, shutdown) = (Arc::clone(&builder), app.clone(), shutdown.clone());
        match &limits.tls {
            None => connections.spawn(connection(builder, io, app, active, limits.idle_timeout, shutdown)),
            Some(acceptor) => connections.spawn(tls_connection(
                acceptor.clone(),
                limits.header_read_timeout,
                builder,
                io,
                app,
                active,
                limits.idle_timeout,
                shutdown,
            )),
        };
    }
    // No new connections from here on.
    drop(listener);
    connections.close();
    if tokio::time::timeout(SHUTDOWN_HTTP_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after the shutdown grace period");
    }
    Ok(())
}

/// One HTTPS connection: the TLS handshake, within `handshake` (the header-read timeout: a peer
/// that opens a connection and says nothing holds its permit no longer than a plain one), then
/// HTTP over it as [`connection`] serves it.
#[allow(clippy::too_many_arguments)]
async fn tls_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    handshake: Duration,
    builder: Arc<http1::Builder>,
    io: Tracked,
    app: Router,
    active: Arc<AtomicBool>,
    idle: Duration,
    shutdown: CancellationToken,
) {
    let accepted = tokio::select! {
        () = shutdown.cancelled() => return,
        accepted = tokio::time::timeout(handshake, acceptor.accept(io)) => accepted,
    };
    match accepted {
        Ok(Ok(tls)) => connection(builder, tls, app, active, idle, shutdown).await,
        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!("TLS handshake timed out"),
    }
}

/// One HTTP connection, until it closes, upgrades (the upgraded socket then lives on in the
/// WebSocket's task, with the connection's permit), stays idle for `idle`, or shuts down.
async fn connection<I: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    builder: Arc<http1::Builder>,
    io: I,
    app: Router,
    active: Arc<AtomicBool>,
    idle: Duration,
    shutdown: CancellationToken,
) {
    let conn = builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app))
        .with_upgrades();
    let mut conn = pin!(conn);
    let every = (idle / IDLE_CHECKS).max(Duration::from_millis(1));
    let mut watchdog = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut quiet = 0;
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP connection ended");
                }
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = watchdog.tick() => {
                if active.swap(false, Ordering::Relaxed) {
                    quiet = 0;
                } else {
                    quiet += 1;
                    if quiet >= IDLE_CHECKS {
                        tracing::debug!("closing an idle HTTP connection");
                        return;
                    }
                }
            }
        }
    }
}

/// Whether `accept` failed because of the one connection it was taking (not the listener).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// Answers a connection over the limit with `503` and closes it, without waiting for anything:
/// what the client already sent is read (so the close is not a reset that could discard the
/// answer) and the answer written, each once, as far as the socket takes it at once.
fn refuse_busy(tcp: TcpStream) {
    let Ok(mut tcp) = tcp.into_std() else { return };
    // Non-blocking, as tokio left it: neither call waits.
    let mut scratch = [0u8; 1024];
    for _ in 0..8 {
        match tcp.read(&mut scratch) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let _ = tcp.write(BUSY);
    let _ = tcp.shutdown(std::net::Shutdown::Write);
}

/// A connection's socket with its permit (released when the socket is dropped, upgraded or not)
/// and a flag set whenever a byte is read or written (for the idle watchdog).
struct Tracked {
    tcp: TcpStream,
    active: Arc<AtomicBool>,
    _permit: OwnedSemaphorePermit,
}

impl Tracked {
    fn note<T>(&self, result: &Poll<io::Result<T>>, moved: bool) {
        if moved && matches!(result, Poll::Ready(Ok(_))) {
            self.active.store(true, Ordering::Relaxed);
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.tcp).poll_read(cx, buf);
        self.note(&result, buf.filled().len() > before);
        result
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.note(&result, matches!(result, Poll::Ready(Ok(n)) if n > 0));
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.note(&result, matches!(result, Poll::Ready(Ok(n)) if n > 0));
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Middleware of an open server: refuses (403) a request whose `Host` is not a loopback name
/// (`localhost`, `127.0.0.0/8`, `[::1]`, any port). A web page that had its own host name
/// resolve to 127.0.0.1 (DNS rebinding) sends its own name; a request without `Host` (not a
/// browser's) passes.
pub(crate) async fn require_loopback_host(request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .map(|value| value.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| Some(a.as_str())));
    match host {
        Some(Some(host)) if is_loopback_authority(host) => next.run(request).await,
        None => next.run(request).await,
        Some(_) => {
            tracing::info!(
                ?host,
                "request to an open server under a non-loopback host name: refused"
            );
            (
                StatusCode::FORBIDDEN,
                "this server runs without a secret and answers only requests to localhost",
            )
                .into_response()
        }
    }
}

/// Whether a browser page from `origin` may open a WebSocket on a server with `config`: one of
/// [`Config::allowed_origins`] (`*` for any) if set; otherwise any origin with a secret, and only
/// loopback origins (`http(s)://localhost`, `127.0.0.1`, `[::1]`, any port) without one.
pub(crate) fn origin_allowed(config: &Config, origin: &HeaderValue) -> bool {
    let Ok(origin) = origin.to_str() else { return false };
    let origin = origin.trim();
    match &config.allowed_origins {
        Some(allowed) => allowed
            .iter()
            .any(|a| a == "*" || a.trim().trim_end_matches('/').eq_ignore_ascii_case(origin)),
        None if config.auth.is_open() => is_loopback_origin(origin),
        None => true,
    }
}

/// `http(s)://` and a loopback authority, nothing else (`null` and other schemes are not).
fn is_loopback_origin(origin: &str) -> bool {
    let lower = origin.to_ascii_lowercase();
    let rest = lower.strip_prefix("http://").or_else(|| lower.strip_prefix("https://"));
    rest.is_some_and(is_loopback_authority)
}

/// `host[:port]` where host is `localhost`, an IPv4 loopback address or `[::1]`.
pub(crate) fn is_loopback_authority(authority: &str) -> bool {
    let (host, port, bracketed) = match authority.strip_prefix('[') {
        Some(rest) => {
            let Some((host, after)) = rest.split_once(']') else {
                return false;
            };
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(port) => Some(port),
                    None => return false,
                },
            };
            (host, port, true)
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port), false),
            None => (authority, None, false),
        },
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    if bracketed {
        host.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback())
    } else {
        host.eq_ignore_ascii_case("localhost") || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_authorities() {
        for good in [
            "localhost",
            "LOCALHOST:8787",
            "127.0.0.1",
            "127.0.0.1:1",
            "127.1.2.3:65535",
            "[::1]",
            "[::1]:8787",
        ] {
            assert!(is_loopback_authority(good), "{good}");
        }
        for bad in [
            "evil.example",
            "evil.example:8787",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "10.0.0.1:8787",
            "[::2]:80",
            "[::1",
            "::1",
            "localhost:",
            "localhost:80x",
            "127.0.0.1:123456",
            "",
        ] {
            assert!(!is_loopback_authority(bad), "{bad}");
        }
    }

    #[test]
    fn origins_of_an_open_server_and_of_one_with_a_secret() {
        let open = Config::default();
        let allowed = |config: &Config, origin: &str| origin_allowed(config, &HeaderValue::from_str(origin).unwrap());
        for good in ["http://localhost:3000", "https://127.0.0.1", "http://[::1]:8787"] {
            assert!(allowed(&open, good), "{good}");
        }
        for bad in [
            "https://evil.example",
            "null",
            "file://",
            "http://localhost:3000/path",
            "ws://localhost",
        ] {
            assert!(!allowed(&open, bad), "{bad}");
        }
        let secret = Config {
            auth: crate::Auth::new(Some("a-secret-of-at-least-32-bytes-long")),
            ..Config::default()
        };
        assert!(allowed(&secret, "https://evil.example"));
        let listed = Config {
            allowed_origins: Some(vec!["https://app.example".into()]),
            ..secret.clone()
        };
        assert!(allowed(&listed, "https://app.example"));
        assert!(allowed(&listed, "HTTPS://APP.EXAMPLE"));
        assert!(!allowed(&listed, "https://evil.example"));
        assert!(!allowed(&listed, "http://localhost"));
        let any = Config {
            allowed_origins: Some(vec!["*".into()]),
            ..open.clone()
        };
        assert!(allowed(&any, "https://evil.example"));
    }
}
