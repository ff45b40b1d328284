//! What every WebSocket connection shares, whatever its protocol: the upgrade, a writer task
//! draining the connection's bounded queue, and reading the next binary message (or, for
//! heartbeats, the next sign of life).
//!
//! The WebSocket framing (RFC 6455) is ours; only the accept key comes from tungstenite. The
//! connection's two directions are separate halves of the upgraded TCP stream: the reader
//! parses frames from what each read brought — read through a per-thread 1 KiB scratch buffer,
//! so that a connection waiting for data holds no buffer at all; a larger frame goes straight
//! into its own payload —, the writer frames what is queued — one message, or a backlog of up to
//! [`BATCH_FRAMES`] — with one vectored write straight from the shared encoded bytes. tungstenite kept, per connection, a send buffer as large as the largest
//! message ever sent and a receive buffer as large as the largest frame ever received: a 2.8 KB
//! document synced once cost every idle connection 2.5 KB for the rest of its life, a 1 MB one
//! 1 MB.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::BufMut;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::event::{Codec, ConnCtl, Outbound, Outgoing};
use crate::queue;
use crate::tasks::Tasks;

/// How long a closing connection may take to flush what is queued and send its close frame.
/// A peer that does not read (dead or slow) is cut off after this.
const CLOSE_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// After its close frame, what a connection reads and discards before it is dropped (see
/// [`Reader::drain`]): at most this many bytes…
pub(crate) const DRAIN_BYTES: usize = 1024 * 1024;
/// …for at most this long.
pub(crate) const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// The most one read of a connection's socket takes (into the thread's scratch buffer, see
/// [`Reader`]); a larger frame is read straight into its own payload.
const READ_BUFFER: usize = 1024;

thread_local! {
    /// Where a connection's reads land, for the one poll that reads them: the bytes a read got
    /// are copied out before the poll returns, so a connection keeps none of this while it
    /// waits.
    static SCRATCH: std::cell::RefCell<[u8; READ_BUFFER]> = const { std::cell::RefCell::new([0; READ_BUFFER]) };
}

/// The most payload bytes reserved ahead of their arrival: a peer announcing a large frame gets
/// memory as its bytes come, not as promised.
const RESERVE_AHEAD: usize = 64 * 1024;

/// RFC 6455 close codes for violations of WebSocket itself.
const CLOSE_WS_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_POLICY_VIOLATION: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;

/// Frames the protocol loops never see — pings, pongs and the fragments of a message before its
/// last — allowed per second on average ([`Reader::take_uncounted`] also hands them to the
/// loops' rate limiters). A client pings every few seconds at most and browsers do not fragment
/// what they send; a peer that floods them is closed with 1008 (policy violation).
pub(crate) const UNCOUNTED_FRAMES_PER_SEC: f32 = 1_000.0;
/// Such frames allowed in a burst (a 4 MiB message cut into 1 KiB fragments fits).
pub(crate) const UNCOUNTED_FRAME_BURST: f32 = 4_096.0;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// What a connection runs on: an upgraded HTTP connection, or (in a simulation) any in-memory
/// byte stream.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

type Io = Box<dyn Stream>;

/// A WebSocket upgrade request (HTTP/1.1, RFC 6455 §4.2.1), checked as axum's own extractor
/// checks it; what it upgrades to is ours (see the module documentation).
pub(crate) struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// Why a request is not a WebSocket upgrade.
fn refuse(status: StatusCode, why: &'static str) -> Response {
    (status, why).into_response()
}

/// Whether the comma-separated header `key` lists `token` (case-insensitive).
fn header_lists(headers: &HeaderMap, key: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(key)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

/// What an upgrade asks of the server's state: whether a browser page from `origin` (the
/// request's `Origin` header) may open a WebSocket here.
pub(crate) trait OriginCheck {
    fn origin_allowed(&self, origin: &HeaderValue) -> bool;
}

impl<S: OriginCheck + Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Response;

    /// Also refuses (403, before any upgrade) a request whose `Origin` the server does not
    /// allow: every browser sends one with a WebSocket upgrade, so a page on another site cannot
    /// use the server through the user's browser. Requests without `Origin` (non-browser
    /// clients) are not affected.
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if parts.method != Method::GET {
            return Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket upgrade is a GET request",
            ));
        }
        if !header_lists(&parts.headers, header::CONNECTION, "upgrade")
            || !header_lists(&parts.headers, header::UPGRADE, "websocket")
        {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "this endpoint speaks WebSocket only",
            ));
        }
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            != Some(b"13")
        {
            return Err(refuse(StatusCode::BAD_REQUEST, "Sec-WebSocket-Version must be 13"));
        }
        if let Some(origin) = parts.headers.get(header::ORIGIN) {
            if !state.origin_allowed(origin) {
                tracing::info!(
                    ?origin,
                    "WebSocket upgrade from a page whose origin is not allowed: refused"
                );
                return Err(refuse(StatusCode::FORBIDDEN, "this origin may not connect"));
            }
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Err(refuse(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing"));
        };
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "this connection cannot be upgraded",
            ));
        };
        Ok(Upgrade { key, on_upgrade })
    }
}

impl Upgrade {
    /// Answers `101 Switching Protocols` and, once the connection is upgraded, runs `callback`
    /// on it in a task of its own. Incoming frames and messages are limited to `max_size` bytes.
    pub(crate) fn on_upgrade<F, Fut>(self, tasks: &Arc<Tasks>, max_size: usize, callback: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let accept = derive_accept_key(self.key.as_bytes());
        let on_upgrade = self.on_upgrade;
        tasks.spawn_connection(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "WebSocket upgrade failed");
                    return;
                }
            };
            callback(Socket::new(Box::new(TokioIo::<Upgraded>::new(upgraded)), max_size)).await;
        });
        let Ok(accept) = HeaderValue::from_str(&accept) else {
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, "bad accept key");
        };
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        response
    }
}

/// An upgraded connection, before its writer starts.
pub(crate) struct Socket {
    reader: Reader,
    writer: WriteHalf<Io>,
}

impl Socket {
    /// A WebSocket already upgraded on `io`, reading frames of at most `max_size` bytes.
    pub(crate) fn new(io: Io, max_size: usize) -> Socket {
        let (read, writer) = tokio::io::split(io);
        Socket {
            reader: Reader::new(read, max_size),
            writer,
        }
    }

    /// Starts the connection's writer on a queue of `queue` items, sending room events encoded
    /// by `codec`. Returns the reader and the queue.
    pub(crate) fn start(
        self,
        tasks: &Arc<Tasks>,
        queue: usize,
        ctl: Arc<ConnCtl>,
        codec: Codec,
    ) -> (Reader, Outbound, tokio::task::JoinHandle<()>) {
        let Socket { mut reader, writer } = self;
        let (tx, rx) = queue::channel(queue);
        let out = Outbound { tx, ctl };
        reader.out = Some(out.clone());
        let writer = tasks.spawn_connection(write_loop(writer, rx, Arc::clone(&out.ctl), codec));
        (reader, out, writer)
    }
}

/// A frame header as a client sends it (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    len: usize,
}

impl Header {
    /// The bytes the header took on the wire (a masked client frame, shortest length encoding).
    fn wire_len(&self) -> usize {
        match self.len {
            0..=125 => 6,
            126..=0xFFFF => 8,
            _ => 14,
        }
    }
}

/// Parses a client frame header from the start of `bytes`: `Ok(None)` if incomplete, else the
/// header and its length. Refuses (with the close code) what a client must not send (RFC 6455
/// §5.1–5.5): reserved bits (no extension is negotiated), unmasked frames, unknown opcodes,
/// fragmented or long control frames; and payloads over `max_size` (1009).
fn parse_header(bytes: &[u8], max_size: usize) -> Result<Option<(Header, usize)>, u16> {
    let [first, second, ..] = *bytes else { return Ok(None) };
    let fin = first & 0x80 != 0;
    let opcode = first & 0x0F;
    if first & 0x70 != 0 || second & 0x80 == 0 {
        return Err(CLOSE_WS_PROTOCOL_ERROR);
    }
    let (len, at) = match second & 0x7F {
        126 => match bytes.get(2..4).and_then(|b| <[u8; 2]>::try_from(b).ok()) {
            Some(b) => (u64::from(u16::from_be_bytes(b)), 4),
            None => return Ok(None),
        },
        127 => match bytes.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Ok(None),
        },
        len => (u64::from(len), 2),
    };
    let Some(mask) = bytes.get(at..at + 4).and_then(|b| <[u8; 4]>::try_from(b).ok()) else {
        return Ok(None);
    };
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG if fin && len <= 125 => {}
        _ => return Err(CLOSE_WS_PROTOCOL_ERROR),
    }
    let len = usize::try_from(len)
        .ok()
        .filter(|len| *len <= max_size)
        .ok_or(CLOSE_TOO_BIG)?;
    Ok(Some((Header { fin, opcode, mask, len }, at + 4)))
}

/// The receiving side of a connection: WebSocket frames parsed from what the reads brought,
/// data frames assembled into messages. Nothing it keeps grows with what it has read, and a
/// connection waiting for data keeps no buffer: a read lands in the thread's scratch buffer
/// ([`SCRATCH`]) and only the bytes it got are kept, until they are parsed (at most
/// [`READ_BUFFER`] plus an incomplete header); a frame larger than that is read straight into
/// its own payload, which is handed on. Cancel-safe: a read interrupted by a timer or a close
/// keeps what it has read.
pub(crate) struct Reader<R = ReadHalf<Io>> {
    io: R,
    /// Bytes read and not yet parsed are `buf[start..]`; empty, without an allocation, once
    /// everything read is parsed.
    buf: Vec<u8>,
    start: usize,
    /// The header of the frame being read, once complete.
    header: Option<Header>,
    /// The payload of the frame being read, so far.
    payload: Vec<u8>,
    /// A fragmented message being assembled: its opcode and its payload so far.
    message: Option<(u8, Vec<u8>)>,
    /// The largest frame or message accepted.
    max_size: usize,
    /// The connection's queue (for pongs and close codes), once it exists.
    out: Option<Outbound>,
    /// Frames read that no protocol loop saw (pings, pongs, fragments before a message's last),
    /// and their bytes on the wire, since the last [`Reader::take_uncounted`].
    uncounted_frames: u32,
    uncounted_bytes: usize,
    /// The socket's own bucket for such frames ([`UNCOUNTED_FRAMES_PER_SEC`]): tokens left and
    /// when it was last filled (`None`: full, no such frame yet).
    uncounted_tokens: f32,
    uncounted_at: Option<tokio::time::Instant>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// A reader of `io`, for frames and messages of at most `max_size` bytes.
    fn new(io: R, max_size: usize) -> Self {
        Reader {
            io,
            buf: Vec::new(),
            start: 0,
            header: None,
            payload: Vec::new(),
            message: None,
            max_size,
            out: None,
            uncounted_frames: 0,
            uncounted_bytes: 0,
            uncounted_tokens: UNCOUNTED_FRAME_BURST,
            uncounted_at: None,
        }
    }

    /// Changes the largest frame or message accepted from now on: the native endpoint reads its
    /// hello under a small limit and raises it once the peer is authenticated. A frame whose
    /// header announces more is refused (1009) from its header alone, before its payload is
    /// read.
    pub(crate) fn set_max_size(&mut self, max_size: usize) {
        self.max_size = max_size;
    }

    /// Frames read since the last call that the protocol loops did not receive as
    /// [`Incoming::Binary`] — pings, pongs, and every fragment of a fragmented message but its
    /// last — and their bytes on the wire (headers included), to be charged to the
    /// connection's rate limiter. Resets the count. (An assembled message's payload reaches the
    /// loop as one `Binary` and is charged there; its fragments' headers are counted here.)
    /// [`Incoming::Control`] is only a sign of life: those frames are counted here, not there.
    pub(crate) fn take_uncounted(&mut self) -> (u32, usize) {
        let taken = (self.uncounted_frames, self.uncounted_bytes);
        self.uncounted_frames = 0;
        self.uncounted_bytes = 0;
        taken
    }

    /// Counts a frame the loops will not see, of `bytes` on the wire; `false` if the peer sends
    /// them faster than [`UNCOUNTED_FRAMES_PER_SEC`] (burst [`UNCOUNTED_FRAME_BURST`]).
    fn count_uncounted(&mut self, bytes: usize) -> bool {
        self.uncounted_frames = self.uncounted_frames.saturating_add(1);
        self.uncounted_bytes = self.uncounted_bytes.saturating_add(bytes);
        let now = tokio::time::Instant::now();
        if let Some(at) = self.uncounted_at {
            let refill = now.saturating_duration_since(at).as_secs_f32() * UNCOUNTED_FRAMES_PER_SEC;
            self.uncounted_tokens = (self.uncounted_tokens + refill).min(UNCOUNTED_FRAME_BURST);
        }
        self.uncounted_at = Some(now);
        if self.uncounted_tokens < 1.0 {
            return false;
        }
        self.uncounted_tokens -= 1.0;
        true
    }

    /// The next complete frame (header and unmasked payload); `Ok(None)` at the end of the
    /// stream, `Err(close code)` for a frame that breaks the protocol.
    async fn next_frame(&mut self) -> Result<Option<(Header, Vec<u8>)>, u16> {
        loop {
            let Some(header) = self.header else {
                if let Some((header, used)) = parse_header(&self.buf[self.start..], self.max_size)? {
                    self.start += used;
                    self.header = Some(header);
                    continue;
                }
                // An incomplete header, or nothing: keep only what is unparsed, read more
                // after it.
                self.buf.drain(..self.start);
                self.start = 0;
                if !self.fill().await {
                    return Ok(None);
                }
                continue;
            };
            let need = header.len - self.payload.len();
            let buffered = need.min(self.buf.len() - self.start);
            self.payload
                .extend_from_slice(&self.buf[self.start..self.start + buffered]);
            self.start += buffered;
            if self.start == self.buf.len() {
                // Everything read is parsed: give the buffer back.
                self.buf = Vec::new();
                self.start = 0;
            }
            if buffered == need {
                self.header = None;
                let mut payload = std::mem::take(&mut self.payload);
                for (byte, mask) in payload.iter_mut().zip(header.mask.iter().cycle()) {
                    *byte ^= mask;
                }
                return Ok(Some((header, payload)));
            }
            // The buffer is empty: read the rest of the payload straight into the payload,
            // reserving memory as the bytes arrive, not as the header promised.
            let need = need - buffered;
            reserve_within(&mut self.payload, need.min(RESERVE_AHEAD), header.len);
            match self.io.read_buf(&mut (&mut self.payload).limit(need)).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }

    /// Reads what the socket has (up to [`READ_BUFFER`] bytes) after the unparsed bytes;
    /// `false` at the end of the stream or on an error. The read lands in the thread's scratch
    /// buffer and what it got is copied out within the same poll, so nothing is held while
    /// waiting and a cancelled wait loses nothing.
    async fn fill(&mut self) -> bool {
        let (io, buf) = (&mut self.io, &mut self.buf);
        std::future::poll_fn(|cx| {
            SCRATCH.with_borrow_mut(|scratch| {
                let mut read = tokio::io::ReadBuf::new(&mut scratch[..]);
                match Pin::new(&mut *io).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        buf.extend_from_slice(read.filled());
                        Poll::Ready(!read.filled().is_empty())
                    }
                    Poll::Ready(Err(_)) => Poll::Ready(false),
                    Poll::Pending => Poll::Pending,
                }
            })
        })
        .await
    }

    /// After the close frame went out: reads and discards what the peer still sends, until it
    /// closes its side, `limit` bytes or `patience` have passed. Dropping a socket whose receive
    /// buffer holds unread bytes makes the kernel reset the connection, and a reset discards
    /// what was not yet delivered — the close frame with its code (4000 "resync", say) among
    /// it. Bounded, so a peer that keeps sending cannot keep the connection.
    pub(crate) async fn drain(&mut self, limit: usize, patience: std::time::Duration) {
        self.buf = Vec::new();
        self.start = 0;
        self.payload = Vec::new();
        self.message = None;
        let mut discarded = 0;
        let _ = tokio::time::timeout(patience, async {
            while discarded < limit && self.fill().await {
                discarded += self.buf.len();
                self.buf.clear();
            }
        })
        .await;
        self.buf = Vec::new();
    }

    /// Closes the connection with `code` (a WebSocket violation), saying why in the log.
    fn refuse(&self, code: u16, why: &str) {
        tracing::info!(code, why, "closing a connection that broke the WebSocket protocol");
        if let Some(out) = &self.out {
            out.ctl.close(code);
        }
    }
}

/// The most frames gathered into one write.
const BATCH_FRAMES: usize = 64;
/// Frames are gathered into one write until it holds this many payload bytes.
const BATCH_BYTES: usize = 64 * 1024;

/// One frame: its header and its payload.
struct Frame {
    header: [u8; 10],
    header_len: usize,
    payload: Bytes,
}

impl Frame {
    /// A final (unfragmented) frame of `opcode` carrying `payload`.
    fn new(opcode: u8, payload: Bytes) -> Frame {
        let mut header = [0; 10];
        let header_len = encode_header(&mut header, opcode, payload.len());
        Frame {
            header,
            header_len,
            payload,
        }
    }

    fn len(&self) -> usize {
        self.header_len + self.payload.len()
    }
}

/// The frames on their way out, written together with vectored writes — one system call for
/// everything queued, not one per message, when a connection has a backlog — and how much of
/// them is written, so that a write interrupted by a close can be finished before the close
/// frame. The first frame is kept inline: a connection that sends one message at a time
/// allocates nothing, and the list of further frames is given back after each batch.
struct PendingFrames {
    first: Option<Frame>,
    rest: Vec<Frame>,
    /// Frames written whole (the first counts as frame 0).
    done: usize,
    /// Bytes written of frame `done`.
    written: usize,
    /// Payload bytes in the batch.
    bytes: usize,
}

impl PendingFrames {
    fn idle() -> Self {
        PendingFrames {
            first: None,
            rest: Vec::new(),
            done: 0,
            written: 0,
            bytes: 0,
        }
    }

    fn count(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    /// Whether another frame may join the batch before it is written.
    fn has_room(&self) -> bool {
        self.count() < BATCH_FRAMES && self.bytes < BATCH_BYTES
    }

    /// Adds a final (unfragmented) frame of `opcode` carrying `payload` to the batch.
    fn push(&mut self, opcode: u8, payload: Bytes) {
        self.bytes += payload.len();
        let frame = Frame::new(opcode, payload);
        if self.first.is_none() {
            self.first = Some(frame);
        } else {
            self.rest.push(frame);
        }
    }

    fn frames(&self) -> impl Iterator<Item = &Frame> {
        self.first.iter().chain(self.rest.iter())
    }

    fn frame(&self, i: usize) -> Option<&Frame> {
        match i {
            0 => self.first.as_ref(),
            _ => self.rest.get(i - 1),
        }
    }

    /// Writes what is left of the batch, then empties it. Cancel-safe: progress is kept between
    /// calls.
    async fn finish<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> io::Result<()> {
        while self.done < self.count() {
            let n = std::future::poll_fn(|cx| self.poll_write(Pin::new(&mut *io), cx)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.advance(n);
        }
        self.first = None;
        self.rest = Vec::new();
        self.done = 0;
        self.written = 0;
        self.bytes = 0;
        Ok(())
    }

    /// One vectored write of what is left. The slices live only during the call: held across an
    /// await, they would be part of every connection's writer task (2 KiB each, idle or not).
    fn poll_write<W: AsyncWrite + Unpin>(&self, io: Pin<&mut W>, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); 2 * BATCH_FRAMES];
        let mut used = 0;
        let mut skip = self.written;
        for frame in self.frames().skip(self.done) {
            for part in [&frame.header[..frame.header_len], &frame.payload[..]] {
                if skip >= part.len() {
                    skip -= part.len();
                } else {
                    slices[used] = IoSlice::new(&part[skip..]);
                    skip = 0;
                    used += 1;
                }
            }
        }
        io.poll_write_vectored(cx, &slices[..used])
    }

    /// Marks `n` more bytes written.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(len) = self.frame(self.done).map(Frame::len) else {
                return;
            };
            let left = len - self.written;
            if n >= left {
                n -= left;
                self.done += 1;
                self.written = 0;
            } else {
                self.written += n;
                n = 0;
            }
        }
    }
}

/// Writes the header of a final, unmasked frame into `header`; returns its length.
fn encode_header(header: &mut [u8; 10], opcode: u8, len: usize) -> usize {
    header[0] = 0x80 | opcode;
    match len {
        0..=125 => {
            header[1] = len as u8;
            2
        }
        126..=0xFFFF => {
            header[1] = 126;
            header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            header[1] = 127;
            header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    }
}

/// The frames one queued item becomes: usually one, none for an event the protocol does not
/// send, several for an event of a document a Hocuspocus connection follows under several
/// addresses.
enum Frames {
    None,
    One(u8, Bytes),
    Many(Vec<Bytes>),
}

impl Iterator for Frames {
    type Item = (u8, Bytes);

    fn next(&mut self) -> Option<(u8, Bytes)> {
        match std::mem::replace(self, Frames::None) {
            Frames::None => None,
            Frames::One(opcode, bytes) => Some((opcode, bytes)),
            Frames::Many(mut frames) => {
                let next = frames.pop().map(|bytes| (OP_BINARY, bytes));
                if !frames.is_empty() {
                    *self = Frames::Many(frames);
                }
                next
            }
        }
    }
}

/// An event's frame (`encoded`, behind the document's name) once per address the connection
/// uses for the document, if those are not just its name (see `ConnCtl::addresses`).
fn readdressed(ctl: &ConnCtl, event: &crate::event::RoomEvent, encoded: &Bytes) -> Option<Vec<Bytes>> {
    let table = ctl.addresses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if table.is_empty() {
        return None;
    }
    let addresses = table.get(event.doc())?;
    // In reverse: `Frames` pops from the end.
    Some(
        addresses
            .iter()
            .rev()
            .filter_map(|address| driftsync_protocol::hocuspocus::readdress(encoded, address))
            .map(Bytes::from)
            .collect(),
    )
}

/// The writer: it sends queued items (room events encoded by its codec) until the queue closes
/// or the connection is told to close, then — within [`CLOSE_FLUSH_TIMEOUT`] — finishes the frame
/// it was writing, flushes what is still queued (acknowledgements matter) and sends a close frame
/// with the connection's close code. A slow consumer told to resync gets no flush, only the close
/// frame: it will resume anyway. A blocked write never keeps the writer from noticing the close.
/// Every connection holds one for its whole life, idle or not:
/// its size is part of the memory of an idle connection.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut io: W,
    mut rx: queue::Receiver<Outgoing>,
    ctl: Arc<ConnCtl>,
    codec: Codec,
) {
    let frame_of = |item: Outgoing| match item {
        Outgoing::Frame(bytes) => Frames::One(OP_BINARY, Bytes::from(bytes)),
        Outgoing::Event(event) => match event.encoded(codec) {
            None => Frames::None,
            Some(bytes) => match readdressed(&ctl, &event.event, &bytes) {
                Some(frames) => Frames::Many(frames),
                None => Frames::One(OP_BINARY, bytes),
            },
        },
        Outgoing::Ping => Frames::One(OP_PING, Bytes::new()),
        Outgoing::Pong(payload) => Frames::One(OP_PONG, Bytes::from(payload)),
    };
    let count = |opcode: u8, payload: &Bytes| {
        ctl.metrics.frames_out.inc();
        if opcode == OP_BINARY {
            ctl.metrics.bytes_out.inc_by(payload.len() as u64);
        }
    };
    let mut pending = PendingFrames::idle();
    loop {
        let item = tokio::select! {
            biased;
            () = ctl.token.cancelled() => break,
            item = rx.recv() => match item {
                Some(item) => item,
                None => break,
            },
        };
        // What is queued behind it goes out with it, in one write.
        let mut next = Some(item);
        while let Some(item) = next.take() {
            for (opcode, payload) in frame_of(item) {
                count(opcode, &payload);
                pending.push(opcode, payload);
            }
            if pending.has_room() {
                next = rx.try_recv();
            }
        }
        tokio::select! {
            sent = pending.finish(&mut io) => if sent.is_err() {
                ctl.close(driftsync_protocol::CLOSE_GOING_AWAY);
                return;
            },
            () = ctl.token.cancelled() => break,
        }
    }
    let flush = ctl.code() != driftsync_protocol::CLOSE_RESYNC;
    let close = async {
        pending.finish(&mut io).await?;
        while let Some(item) = if flush { rx.try_recv() } else { None } {
            for (opcode, payload) in frame_of(item) {
                pending.push(opcode, payload);
                if !pending.has_room() {
                    pending.finish(&mut io).await?;
                }
            }
        }
        pending.push(OP_CLOSE, Bytes::copy_from_slice(&ctl.code().to_be_bytes()));
        pending.finish(&mut io).await?;
        io.flush().await?;
        // Half-close: the peer reads the close frame, then end of stream; the reader drains
        // what the peer still sends (see `Reader::drain`) before the socket is dropped.
        io.shutdown().await
    };
    let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, close).await;
}

/// What arrived on a connection.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A binary message: one protocol frame.
    Binary(Vec<u8>),
    /// A WebSocket ping or pong: no protocol content, but a sign of life.
    Control,
}

/// The next message; `None` at close, at error, or when the peer breaks the protocol (the
/// connection is then closed with the RFC 6455 code). Text messages are not part of either
/// protocol: they end the connection. Pings are answered with a pong. Cancel-safe.
pub(crate) async fn next_incoming<R: AsyncRead + Unpin>(reader: &mut Reader<R>) -> Option<Incoming> {
    loop {
        let (header, payload) = match reader.next_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return None,
            Err(code) => {
                reader.refuse(code, "bad frame header");
                return None;
            }
        };
        // Every frame but a message's last is invisible to the protocol loops: count it, and
        // close a connection that floods them.
        // Control frames are counted whole; a fragment only by its header, its payload being
        // charged with the assembled message.
        let control = header.opcode & 0x8 != 0;
        let seen = header.fin && (!control || header.opcode == OP_CLOSE);
        let bytes = header.wire_len() + if control { payload.len() } else { 0 };
        if !seen && !reader.count_uncounted(bytes) {
            reader.refuse(CLOSE_POLICY_VIOLATION, "too many control frames or fragments");
            return None;
        }
        let (opcode, message) = match (header.opcode, reader.message.take()) {
            (OP_PING, message) => {
                reader.message = message;
                if let Some(out) = &reader.out {
                    out.send(Outgoing::Pong(payload));
                }
                return Some(Incoming::Control);
            }
            (OP_PONG, message) => {
                reader.message = message;
                return Some(Incoming::Control);
            }
            (OP_CLOSE, _) => return None,
            (OP_TEXT | OP_BINARY, None) => (header.opcode, payload),
            (OP_CONTINUATION, Some((opcode, mut message))) => {
                if message.len() + payload.len() > reader.max_size {
                    reader.refuse(CLOSE_TOO_BIG, "message over the size limit");
                    return None;
                }
                reserve_within(&mut message, payload.len(), reader.max_size);
                message.extend_from_slice(&payload);
                (opcode, message)
            }
            _ => {
                reader.refuse(CLOSE_WS_PROTOCOL_ERROR, "continuation frame out of place");
                return None;
            }
        };
        if !header.fin {
            reader.message = Some((opcode, message));
            continue;
        }
        return match opcode {
            OP_BINARY => Some(Incoming::Binary(message)),
            _ => None,
        };
    }
}

/// Makes room for `additional` more bytes in `vec`, growing it as `Vec::reserve` does (doubling,
/// so that many small additions cost their bytes) but never past a capacity of `max` (the
/// frame or message size limit): a message assembled from fragments, or a payload read as it
/// arrives, never holds twice the limit.
fn reserve_within(vec: &mut Vec<u8>, additional: usize, max: usize) {
    let needed = vec.len() + additional;
    if needed <= vec.capacity() {
        return;
    }
    let target = needed.max(vec.capacity() * 2).min(max).max(needed);
    vec.reserve_exact(target - vec.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `chunk` bytes per call, as a socket whose buffer is nearly
    /// full does, and counts its calls.
    struct Trickle {
        got: Vec<u8>,
        chunk: usize,
        writes: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            let mut left = self.chunk;
            for buf in bufs {
                let n = buf.len().min(left);
                self.got.extend_from_slice(&buf[..n]);
                left -= n;
            }
            self.writes += 1;
            std::task::Poll::Ready(Ok(self.chunk - left))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_batch_of_frames_goes_out_whole_in_order_however_the_writes_are_cut() {
        let payloads: Vec<Vec<u8>> = [0usize, 5, 125, 126, 300, 1, 70_000]
            .iter()
            .enumerate()
            .map(|(i, &len)| (0..len).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        let mut expected = Vec::new();
        for (i, payload) in payloads.iter().enumerate() {
            let mut header = [0; 10];
            let opcode = if i == 0 { OP_PING } else { OP_BINARY };
            let len = encode_header(&mut header, opcode, payload.len());
            expected.extend_from_slice(&header[..len]);
            expected.extend_from_slice(payload);
        }
        for chunk in [1, 2, 3, 7, 1000, 1 << 20] {
            let mut pending = PendingFrames::idle();
            for (i, payload) in payloads.iter().enumerate() {
                assert!(pending.has_room());
                let opcode = if i == 0 { OP_PING } else { OP_BINARY };
                pending.push(opcode, Bytes::from(payload.clone()));
            }
            let mut out = Trickle {
                got: Vec::new(),
                chunk,
                writes: 0,
            };
            pending.finish(&mut out).await.unwrap();
            assert_eq!(out.got, expected, "chunk {chunk}");
            if chunk == 1 << 20 {
                assert_eq!(out.writes, 1, "one write for the whole batch");
            }
            // Empty again, the list of further frames given back; finishing again writes nothing.
            assert_eq!((pending.count(), pending.rest.capacity(), pending.bytes), (0, 0, 0));
            pending.finish(&mut out).await.unwrap();
            assert_eq!(out.got.len(), expected.len());
        }
    }

    #[tokio::test]
    async fn a_writer_stays_small() {
        let (_, write) = tokio::io::split(tokio::io::duplex(64).0);
        let (_tx, rx) = queue::channel(8);
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let ctl = Arc::new(ConnCtl::new(tokio_util::sync::CancellationToken::new(), metrics));
        let writer = write_loop(
            write,
            rx,
            ctl,
            Codec {
                slot: 0,
                encode: |_| None,
            },
        );
        // Every connection holds one, idle or not (BENCHMARKS.md, "per idle connection"): the
        // slices of a vectored write held across an await once made it 2 KiB larger.
        let size = std::mem::size_of_val(&writer);
        assert!(size <= 1024, "the writer's future takes {size} bytes");
    }

    #[test]
    fn a_batch_is_bounded_in_frames_and_bytes() {
        let mut pending = PendingFrames::idle();
        for _ in 0..BATCH_FRAMES {
            assert!(pending.has_room());
            pending.push(OP_BINARY, Bytes::from_static(b"x"));
        }
        assert!(!pending.has_room());
        let mut pending = PendingFrames::idle();
        pending.push(OP_BINARY, Bytes::from(vec![0; BATCH_BYTES]));
        assert!(!pending.has_room());
    }

    #[test]
    fn headers_use_the_shortest_length_encoding() {
        let mut header = [0; 10];
        for (len, expect) in [
            (0usize, vec![0x82, 0]),
            (125, vec![0x82, 125]),
            (126, vec![0x82, 126, 0, 126]),
            (65_535, vec![0x82, 126, 0xFF, 0xFF]),
            (65_536, vec![0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ] {
            let n = encode_header(&mut header, OP_BINARY, len);
            assert_eq!(&header[..n], &expect[..], "length {len}");
        }
    }

    /// A client frame: masked with a fixed key.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xFA, 0x21, 0x3D];
        let mut header = [0; 10];
        let n = encode_header(&mut header, opcode, payload.len());
        header[0] = if fin { header[0] } else { header[0] & 0x7F };
        header[1] |= 0x80;
        let mut frame = header[..n].to_vec();
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        frame
    }

    /// Reads every message of `bytes`, delivered in pieces of the given sizes (cycled).
    async fn read_all(bytes: &[u8], pieces: &[usize], max_size: usize) -> Vec<Option<Incoming>> {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut at = 0;
        for size in pieces.iter().cycle() {
            if at >= bytes.len() {
                break;
            }
            let end = (at + size.max(&1)).min(bytes.len());
            tx.write_all(&bytes[at..end]).await.unwrap();
            at = end;
        }
        drop(tx);
        let mut reader = Reader::new(rx, max_size);
        let mut got = Vec::new();
        loop {
            let next = next_incoming(&mut reader).await;
            let done = next.is_none();
            got.push(next);
            if done {
                return got;
            }
        }
    }

    fn binary(got: &Option<Incoming>) -> Option<&[u8]> {
        match got {
            Some(Incoming::Binary(bytes)) => Some(bytes),
            _ => None,
        }
    }

    #[tokio::test]
    async fn messages_of_every_size_arrive_whole_however_the_bytes_are_cut() {
        let sizes = [0usize, 1, 125, 126, 1_000, 1_024, 65_535, 65_536, 200_000];
        let payloads: Vec<Vec<u8>> = sizes
            .iter()
            .map(|n| (0..*n).map(|i| (i % 251) as u8).collect())
            .collect();
        let bytes: Vec<u8> = payloads.iter().flat_map(|p| client_frame(true, OP_BINARY, p)).collect();
        for pieces in [&[1usize][..], &[3, 7, 1_500], &[1 << 20]] {
            let got = read_all(&bytes, pieces, 1 << 20).await;
            assert_eq!(got.len(), payloads.len() + 1, "pieces {pieces:?}");
            for (got, want) in got.iter().zip(&payloads) {
                assert_eq!(binary(got), Some(&want[..]), "pieces {pieces:?}");
            }
        }
    }

    #[tokio::test]
    async fn fragments_are_assembled_around_control_frames() {
        let mut bytes = client_frame(false, OP_BINARY, b"frag");
        bytes.extend(client_frame(true, OP_PING, b"p"));
        bytes.extend(client_frame(false, OP_CONTINUATION, &[b'x'; 2_000]));
        bytes.extend(client_frame(true, OP_PONG, b""));
        bytes.extend(client_frame(true, OP_CONTINUATION, b"end"));
        bytes.extend(client_frame(true, OP_BINARY, b"next"));
        let got = read_all(&bytes, &[5], 1 << 20).await;
        assert!(matches!(got[0], Some(Incoming::Control)));
        assert!(matches!(got[1], Some(Incoming::Control)));
        let mut want = b"frag".to_vec();
        want.extend([b'x'; 2_000]);
        want.extend(b"end");
        assert_eq!(binary(&got[2]), Some(&want[..]));
        assert_eq!(binary(&got[3]), Some(&b"next"[..]));
        assert!(got[4].is_none());
    }

    #[tokio::test]
    async fn violations_end_the_connection() {
        let unmasked = {
            let mut header = [0; 10];
            let n = encode_header(&mut header, OP_BINARY, 3);
            let mut frame = header[..n].to_vec();
            frame.extend(b"abc");
            frame
        };
        let mut reserved = client_frame(true, OP_BINARY, b"abc");
        reserved[0] |= 0x40;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unmasked", unmasked),
            ("reserved bits", reserved),
            ("unknown opcode", client_frame(true, 0x3, b"abc")),
            ("fragmented ping", client_frame(false, OP_PING, b"")),
            ("long ping", client_frame(true, OP_PING, &[0; 126])),
            ("lone continuation", client_frame(true, OP_CONTINUATION, b"abc")),
            ("text", client_frame(true, OP_TEXT, b"hello")),
            ("too big", client_frame(true, OP_BINARY, &[0; 101])),
            ("assembled too big", {
                let mut b = client_frame(false, OP_BINARY, &[0; 60]);
                b.extend(client_frame(true, OP_CONTINUATION, &[0; 60]));
                b
            }),
            ("data frame inside a fragmented message", {
                let mut b = client_frame(false, OP_BINARY, b"a");
                b.extend(client_frame(true, OP_BINARY, b"b"));
                b
            }),
        ];
        for (name, mut bytes) in cases {
            // A good message after the bad one is never read.
            bytes.extend(client_frame(true, OP_BINARY, b"after"));
            let got = read_all(&bytes, &[4], 100).await;
            assert!(got.iter().all(|g| binary(g).is_none()), "{name}: {got:?}");
        }
    }

    #[tokio::test]
    async fn a_cancelled_read_loses_nothing() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut reader = Reader::new(rx, 1 << 20);
        let payload: Vec<u8> = (0..5_000u32).map(|i| i as u8).collect();
        let frame = client_frame(true, OP_BINARY, &payload);
        for cut in [1, 5, 9, 1_030, 4_000] {
            tx.write_all(&frame[..cut]).await.unwrap();
            let early = tokio::time::timeout(std::time::Duration::from_millis(5), next_incoming(&mut reader)).await;
            assert!(early.is_err(), "cut {cut}: nothing complete yet");
            tx.write_all(&frame[cut..]).await.unwrap();
            let got = next_incoming(&mut reader).await;
            assert_eq!(binary(&got), Some(&payload[..]), "cut {cut}");
        }
    }

    /// A connection waiting for data holds no read buffer: not before its first message, not
    /// after one, not after a read that brought several frames, and not while the next frame's
    /// header has yet to arrive in full (then only its bytes are kept).
    #[tokio::test]
    async fn a_waiting_reader_holds_no_buffer() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut reader = Reader::new(rx, 1 << 20);
        // Waits a little for a message that does not come.
        async fn wait(reader: &mut Reader<tokio::io::DuplexStream>) -> bool {
            tokio::time::timeout(std::time::Duration::from_millis(5), next_incoming(reader))
                .await
                .is_err()
        }
        assert!(wait(&mut reader).await);
        assert_eq!(reader.buf.capacity(), 0);
        let mut bytes = client_frame(true, OP_BINARY, b"one");
        bytes.extend(client_frame(true, OP_BINARY, &[7; 300]));
        bytes.extend(client_frame(true, OP_BINARY, b"three"));
        let next = client_frame(true, OP_BINARY, &[9; 2_000]);
        bytes.extend(&next[..1]);
        tx.write_all(&bytes).await.unwrap();
        assert_eq!(binary(&next_incoming(&mut reader).await), Some(&b"one"[..]));
        assert!(reader.buf.capacity() > 0, "the rest of the read waits to be parsed");
        assert_eq!(binary(&next_incoming(&mut reader).await).map(<[u8]>::len), Some(300));
        assert_eq!(binary(&next_incoming(&mut reader).await), Some(&b"three"[..]));
        assert!(wait(&mut reader).await);
        assert_eq!(reader.buf.len() - reader.start, 1, "the header's first byte is kept");
        tx.write_all(&next[1..]).await.unwrap();
        assert_eq!(binary(&next_incoming(&mut reader).await), Some(&[9; 2_000][..]));
        assert!(wait(&mut reader).await);
        assert_eq!(reader.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn the_size_limit_can_be_raised_after_the_hello() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut reader = Reader::new(rx, 100);
        tx.write_all(&client_frame(true, OP_BINARY, &[1; 100])).await.unwrap();
        assert_eq!(binary(&next_incoming(&mut reader).await).map(<[u8]>::len), Some(100));
        reader.set_max_size(1_000);
        tx.write_all(&client_frame(true, OP_BINARY, &[2; 1_000])).await.unwrap();
        assert_eq!(binary(&next_incoming(&mut reader).await).map(<[u8]>::len), Some(1_000));
        // Over the limit: refused from the header alone, without waiting for the payload.
        reader.set_max_size(100);
        let big = client_frame(true, OP_BINARY, &[3; 4_000]);
        tx.write_all(&big[..8]).await.unwrap();
        let refused = tokio::time::timeout(std::time::Duration::from_secs(5), next_incoming(&mut reader)).await;
        assert!(matches!(refused, Ok(None)));
        assert!(reader.payload.capacity() == 0);
    }

    #[tokio::test]
    async fn frames_the_loops_do_not_see_are_counted() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut reader = Reader::new(rx, 1 << 20);
        let mut bytes = client_frame(false, OP_BINARY, b"frag");
        bytes.extend(client_frame(true, OP_PING, b"p"));
        bytes.extend(client_frame(false, OP_CONTINUATION, &[b'x'; 2_000]));
        bytes.extend(client_frame(true, OP_PONG, b""));
        bytes.extend(client_frame(true, OP_CONTINUATION, b"end"));
        tx.write_all(&bytes).await.unwrap();
        assert!(matches!(next_incoming(&mut reader).await, Some(Incoming::Control)));
        assert!(matches!(next_incoming(&mut reader).await, Some(Incoming::Control)));
        assert_eq!(binary(&next_incoming(&mut reader).await).map(<[u8]>::len), Some(2_007));
        // The first fragment and the continuation by their headers (their payload comes with
        // the message), the ping (6 + 1) and the pong (6) whole.
        assert_eq!(reader.take_uncounted(), (4, 6 + 7 + 8 + 6));
        assert_eq!(reader.take_uncounted(), (0, 0));
        tx.write_all(&client_frame(true, OP_BINARY, b"plain")).await.unwrap();
        assert_eq!(binary(&next_incoming(&mut reader).await), Some(&b"plain"[..]));
        assert_eq!(reader.take_uncounted(), (0, 0));
    }

    // On a paused clock: the bucket must not refill while a loaded machine runs the test.
    #[tokio::test(start_paused = true)]
    async fn a_flood_of_pings_or_empty_fragments_is_closed() {
        let burst = UNCOUNTED_FRAME_BURST as usize;
        let pings: Vec<u8> = (0..burst * 2).flat_map(|_| client_frame(true, OP_PING, b"")).collect();
        let mut fragments = client_frame(false, OP_BINARY, b"");
        fragments.extend((0..burst * 2).flat_map(|_| client_frame(false, OP_CONTINUATION, b"")));
        for (name, mut bytes) in [("pings", pings), ("fragments", fragments)] {
            bytes.extend(client_frame(true, OP_BINARY, b"after"));
            let got = read_all(&bytes, &[1 << 20], 1 << 20).await;
            assert!(got.len() <= burst + 2, "{name}: {} frames read", got.len());
            assert!(got.iter().all(|g| binary(g).is_none()), "{name}");
        }
        // A few hundred pings are fine.
        let mut bytes: Vec<u8> = (0..300).flat_map(|_| client_frame(true, OP_PING, b"")).collect();
        bytes.extend(client_frame(true, OP_BINARY, b"after"));
        let got = read_all(&bytes, &[1 << 20], 1 << 20).await;
        assert_eq!(binary(&got[300]), Some(&b"after"[..]));
    }

    #[tokio::test]
    async fn an_assembled_message_never_holds_more_than_the_limit() {
        let max = 50_000;
        let mut bytes = client_frame(false, OP_BINARY, &[1; 1_000]);
        for _ in 0..48 {
            bytes.extend(client_frame(false, OP_CONTINUATION, &[2; 1_000]));
        }
        bytes.extend(client_frame(true, OP_CONTINUATION, &[3; 1_000]));
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        tx.write_all(&bytes).await.unwrap();
        let mut reader = Reader::new(rx, max);
        match next_incoming(&mut reader).await {
            Some(Incoming::Binary(message)) => {
                assert_eq!(message.len(), 50_000);
                assert!(message.capacity() <= max, "capacity {}", message.capacity());
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn random_bytes_never_panic() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..300 {
            let len = (next() % 2_000) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Half the cases start with a plausible header, to get past the first checks.
            if next() % 2 == 0 && bytes.len() > 2 {
                bytes[0] = 0x80 | (bytes[0] & 0x0F);
                bytes[1] |= 0x80;
            }
            let pieces = [(next() % 300) as usize + 1];
            let got = read_all(&bytes, &pieces, 1_000).await;
            assert!(got.last().is_some_and(Option::is_none));
        }
    }
}
