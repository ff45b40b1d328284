//! Clients of the systems, as light as they can be: they frame and recognise messages, and
//! decode only what the handshake needs.
//!
//! * `native`: driftsync's `/v1/sync` (postcard frames of `driftsync-protocol`).
//! * `ds-yjs`, `y-websocket`, `y-sweet`: the y-websocket protocol (y-protocols sync messages, one
//!   per WebSocket message), at `/yjs/{doc}`, `/{doc}` and `/d/{doc}/ws/{doc}`.
//! * `hocuspocus`, `ds-hocuspocus`: the Hocuspocus provider protocol — the same messages, each
//!   prefixed by the document name as a lib0 varString, after an authentication message (the
//!   Auth Token, first for each document) — at `/` of the Hocuspocus server and at driftsync's
//!   `/hocuspocus`. Besides the sync messages, a server sends `Authenticated` (or
//!   `PermissionDenied`) and, after each write it received, a `SyncStatus`; driftsync's
//!   `SyncStatus` follows the durable commit. The generator ignores them for latency (readers
//!   find markers; writers only drain them), and never needs Hocuspocus's `SyncReply` (type 4).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use driftsync_protocol::lib0::{self, Reader};
use driftsync_protocol::{ClientFrame, DocId, ResumeDoc, ServerFrame, PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use yrs::updates::decoder::Decode;
use yrs::{Doc, ReadTxn, StateVector, Transact};

/// A WebSocket connection of the generator.
pub type Ws = WebSocketStream<TcpStream>;

/// The largest frame the generator accepts.
const MAX_FRAME: usize = 64 * 1024 * 1024;

/// The systems under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    /// driftsync, native protocol (`/v1/sync`).
    Native,
    /// driftsync, y-websocket endpoint (`/yjs/{doc}`).
    DsYjs,
    /// The reference y-websocket server (@y/websocket-server).
    YWebsocket,
    /// Hocuspocus (@hocuspocus/server).
    Hocuspocus,
    /// driftsync, Hocuspocus provider endpoint (`/hocuspocus`).
    DsHocuspocus,
    /// y-sweet.
    YSweet,
    /// The bare relay built into this crate (`driftsync-bench relay`): the floor of the machine.
    Relay,
}

impl System {
    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            System::Native => "native",
            System::DsYjs => "ds-yjs",
            System::YWebsocket => "y-websocket",
            System::Hocuspocus => "hocuspocus",
            System::DsHocuspocus => "ds-hocuspocus",
            System::YSweet => "y-sweet",
            System::Relay => "relay",
        }
    }

    /// Whether this is one of the anchors (a sync server Yjs users run), which ratios compare
    /// against: neither driftsync nor the bare relay.
    pub fn is_anchor(self) -> bool {
        !self.is_driftsync() && self != System::Relay
    }

    /// Whether the server acknowledges a write (driftsync's native protocol does, once the
    /// update is durably stored; the y-websocket protocol has no acknowledgement).
    pub fn acknowledges(self) -> bool {
        self == System::Native
    }

    /// Whether this is one of driftsync's endpoints (not an anchor).
    pub fn is_driftsync(self) -> bool {
        matches!(self, System::Native | System::DsYjs | System::DsHocuspocus)
    }

    /// Whether this system speaks the Hocuspocus provider protocol (every message behind the
    /// document's name, an Auth Token first).
    pub fn hocuspocus_framing(self) -> bool {
        matches!(self, System::Hocuspocus | System::DsHocuspocus)
    }
}

/// Where a system listens, and how the generator reaches it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Which protocol.
    pub system: System,
    /// The server's address.
    pub addr: SocketAddr,
    /// Connections are spread over source addresses 127.0.0.1 ..= 127.0.0.`source_ips`, so that
    /// many connections do not run out of ephemeral ports.
    pub source_ips: u8,
}

/// What a client holds of a document when it joins.
#[derive(Default)]
pub struct Holding<'a> {
    /// Its state vector (v1); empty = an empty document.
    pub sv: Vec<u8>,
    /// Its document, to answer the server's SyncStep1 with a real SyncStep2; `None`: an empty
    /// update (what a client without content sends).
    pub doc: Option<&'a Doc>,
    /// The last server cursor (native only).
    pub cursor: u64,
    /// Keep reading until this many bytes came down (a cold load whose content arrives after
    /// the sync answer, as the y-websocket server's does while its persistence loads).
    pub min_down: u64,
}

/// What a join cost and took.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct JoinStats {
    /// WebSocket payload bytes client → server during the sync.
    pub bytes_up: u64,
    /// WebSocket payload bytes server → client during the sync.
    pub bytes_down: u64,
    /// Native only: the `Resume` frame's bytes (the per-document cost, without the hello).
    pub resume_up: u64,
    /// Native only: the `Resumed` frame's bytes.
    pub resume_down: u64,
    /// From the start of the TCP connect to the first server message carrying document content
    /// (the sync answer), in microseconds.
    pub first_content_us: f64,
    /// From the start of the TCP connect until synced (the sync answer received), in microseconds.
    pub synced_us: f64,
    /// From the WebSocket being open until synced, in microseconds.
    pub sync_only_us: f64,
}

/// A joined client: subscribed to one document, handshake done.
pub struct Client {
    /// The connection.
    pub ws: Ws,
    /// The protocol.
    pub system: System,
    /// The document.
    pub doc: String,
    /// Hocuspocus framing only: varString(document name), prepended to every message.
    prefix: Vec<u8>,
    /// Native: the next batch id.
    batch: u64,
}

/// What a received message is, as far as the generator cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind<'a> {
    /// y-protocols SyncStep1 (the peer's state vector).
    Step1(&'a [u8]),
    /// y-protocols SyncStep2 (an update).
    Step2(&'a [u8]),
    /// y-protocols update.
    Update(&'a [u8]),
    /// Anything else.
    Other,
}

/// Classifies a y-protocols message (after the Hocuspocus prefix, if any). Hocuspocus's
/// `SyncReply` (type 4) counts as a sync message.
pub fn classify(bytes: &[u8]) -> Kind<'_> {
    let mut r = Reader::new(bytes);
    match r.read_var_uint() {
        Ok(0 | 4) => {}
        _ => return Kind::Other,
    }
    let sub = r.read_var_uint();
    let Ok(payload) = r.read_var_buf() else {
        return Kind::Other;
    };
    match sub {
        Ok(0) => Kind::Step1(payload),
        Ok(1) => Kind::Step2(payload),
        Ok(2) => Kind::Update(payload),
        _ => Kind::Other,
    }
}

/// A Hocuspocus server message other than a sync message, as far as the generator cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Control<'a> {
    /// Auth / Authenticated: the document was accepted, with this scope.
    Authenticated(&'a str),
    /// Auth / PermissionDenied: the document was refused, for this reason.
    Denied(&'a str),
    /// SyncStatus: one Step2 or Update the server received was applied (`true`; driftsync sends
    /// it after the durable commit) or refused.
    SyncStatus(bool),
}

/// Classifies a Hocuspocus message (after the prefix) that is not a sync message: `None` for
/// sync messages and anything else (awareness, stateless, …).
pub fn hocuspocus_control(body: &[u8]) -> Option<Control<'_>> {
    let mut r = Reader::new(body);
    match r.read_var_uint().ok()? {
        // Auth: Token = 0 (a server asking again), PermissionDenied = 1, Authenticated = 2.
        2 => match r.read_var_uint().ok()? {
            1 => Some(Control::Denied(r.read_var_string().ok()?)),
            2 => Some(Control::Authenticated(r.read_var_string().ok()?)),
            _ => None,
        },
        8 => Some(Control::SyncStatus(r.read_var_uint().ok()? == 1)),
        _ => None,
    }
}

/// The Hocuspocus Auth Token message: `[prefix, Auth = 2, Token = 0, varString(token)]`.
pub fn hocuspocus_auth(prefix: &[u8], token: &str) -> Vec<u8> {
    let mut buf = prefix.to_vec();
    lib0::write_var_uint(&mut buf, 2);
    lib0::write_var_uint(&mut buf, 0);
    lib0::write_var_string(&mut buf, token);
    buf
}

/// The varString(document name) that prefixes every message of the Hocuspocus framing.
pub fn hocuspocus_prefix(doc: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(doc.len() + 2);
    lib0::write_var_string(&mut p, doc);
    p
}

/// Strips the Hocuspocus document-name prefix.
pub fn strip_prefix(bytes: &[u8]) -> &[u8] {
    let mut r = Reader::new(bytes);
    match r.read_var_string() {
        Ok(_) => &bytes[bytes.len() - r.remaining()..],
        Err(_) => bytes,
    }
}

/// A y-protocols message `[0, sub, varUint8Array(payload)]`, with `prefix` in front.
pub fn y_sync(prefix: &[u8], sub: u64, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(prefix.len() + payload.len() + 8);
    buf.extend_from_slice(prefix);
    lib0::write_var_uint(&mut buf, 0);
    lib0::write_var_uint(&mut buf, sub);
    lib0::write_var_buf(&mut buf, payload);
    buf
}

/// The empty v1 update: no structs, empty delete set.
pub const EMPTY_UPDATE: [u8; 2] = [0, 0];
/// The empty v1 state vector.
pub const EMPTY_SV: [u8; 1] = [0];

impl Endpoint {
    /// The request path for a connection to `doc`.
    fn path(&self, doc: &str) -> String {
        match self.system {
            System::Native => "/v1/sync".into(),
            System::DsYjs => format!("/yjs/{doc}"),
            System::YWebsocket | System::Relay => format!("/{doc}"),
            System::Hocuspocus => "/".into(),
            System::DsHocuspocus => "/hocuspocus".into(),
            System::YSweet => format!("/d/{doc}/ws/{doc}"),
        }
    }

    /// Opens a WebSocket for `doc`; `n` picks the source address.
    pub async fn connect(&self, doc: &str, n: usize) -> anyhow::Result<Ws> {
        let socket = TcpSocket::new_v4()?;
        if self.source_ips > 1 {
            let last = 1 + (n % usize::from(self.source_ips)) as u8;
            socket.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, last), 0)))?;
        }
        let stream = socket.connect(self.addr).await.context("connect")?;
        stream.set_nodelay(true)?;
        let url = format!("ws://{}{}", self.addr, self.path(doc));
        let config = WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0)
            .max_message_size(Some(MAX_FRAME))
            .max_frame_size(Some(MAX_FRAME));
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
            .await
            .context("websocket handshake")?;
        Ok(ws)
    }

    /// Connects and joins `doc` holding `holding`: native hello and resume; y-protocols sync
    /// steps 1 and 2 both ways (after the Auth Token message for the Hocuspocus framing). Returns
    /// when the client has the server's answer and has answered the server's SyncStep1.
    pub async fn join(&self, doc: &str, n: usize, holding: &Holding<'_>) -> anyhow::Result<(Client, JoinStats)> {
        let start = Instant::now();
        let ws = self.connect(doc, n).await?;
        let open = Instant::now();
        let prefix = if self.system.hocuspocus_framing() {
            hocuspocus_prefix(doc)
        } else {
            Vec::new()
        };
        let mut client = Client {
            ws,
            system: self.system,
            doc: doc.to_string(),
            prefix,
            batch: 0,
        };
        let mut stats = JoinStats::default();
        let sv: &[u8] = if holding.sv.is_empty() { &EMPTY_SV } else { &holding.sv };
        if self.system == System::Native {
            let hello = ClientFrame::Hello {
                version: PROTOCOL_VERSION,
                token: String::new(),
                client_id: rand::random_range(1..(1u64 << 53)),
            }
            .encode();
            let resume = ClientFrame::Resume {
                docs: vec![ResumeDoc {
                    doc: DocId::new(doc)?,
                    cursor: holding.cursor,
                    state_vector: sv.to_vec(),
                }],
            }
            .encode();
            stats.bytes_up = (hello.len() + resume.len()) as u64;
            stats.resume_up = resume.len() as u64;
            client.send(hello).await?;
            client.send(resume).await?;
            loop {
                let bytes = client.recv().await?;
                stats.bytes_down += bytes.len() as u64;
                match ServerFrame::decode(&bytes, MAX_FRAME)? {
                    ServerFrame::Welcome { .. } => {}
                    ServerFrame::Resumed { .. } => {
                        stats.resume_down = bytes.len() as u64;
                        let now = Instant::now();
                        stats.first_content_us = (now - start).as_secs_f64() * 1e6;
                        stats.synced_us = stats.first_content_us;
                        stats.sync_only_us = (now - open).as_secs_f64() * 1e6;
                        return Ok((client, stats));
                    }
                    ServerFrame::Ping { nonce } => client.send(ClientFrame::Pong { nonce }.encode()).await?,
                    ServerFrame::Error { code, .. } => bail!("server refused the resume: {code:?}"),
                    _ => {}
                }
            }
        }
        if self.system.hocuspocus_framing() {
            // First for the document; the SyncStep1 follows without waiting, as a provider's
            // does (driftsync holds it until the token is checked). Either server accepts any
            // token as configured here.
            let auth = hocuspocus_auth(&client.prefix, "bench");
            stats.bytes_up += auth.len() as u64;
            client.send(auth).await?;
        }
        let step1 = y_sync(&client.prefix, 0, sv);
        stats.bytes_up += step1.len() as u64;
        client.send(step1).await?;
        let (mut synced, mut answered) = (false, false);
        // When the client had everything (the server's SyncStep2, and `min_down` bytes); the
        // loop goes on until the client has also answered the server's SyncStep1, for the bytes.
        let mut synced_at: Option<Instant> = None;
        while !(synced && answered && stats.bytes_down >= holding.min_down) {
            if synced_at.is_none() && synced && stats.bytes_down >= holding.min_down {
                synced_at = Some(Instant::now());
            }
            let bytes = client.recv().await?;
            stats.bytes_down += bytes.len() as u64;
            let body = if client.system.hocuspocus_framing() {
                let body = strip_prefix(&bytes);
                if let Some(Control::Denied(reason)) = hocuspocus_control(body) {
                    bail!("the server refused the document: {reason}");
                }
                body
            } else {
                &bytes[..]
            };
            match classify(body) {
                Kind::Step1(server_sv) => {
                    let diff = match holding.doc {
                        Some(doc) => {
                            let sv = StateVector::decode_v1(server_sv).map_err(|e| anyhow!("bad state vector: {e}"))?;
                            doc.transact().encode_diff_v1(&sv)
                        }
                        None => EMPTY_UPDATE.to_vec(),
                    };
                    let step2 = y_sync(&client.prefix, 1, &diff);
                    stats.bytes_up += step2.len() as u64;
                    client.send(step2).await?;
                    answered = true;
                }
                Kind::Step2(update) | Kind::Update(update) => {
                    if stats.first_content_us == 0.0 && update.len() > 64 {
                        stats.first_content_us = start.elapsed().as_secs_f64() * 1e6;
                    }
                    if matches!(classify(body), Kind::Step2(_)) {
                        synced = true;
                    }
                }
                Kind::Other => {}
            }
        }
        let now = synced_at.unwrap_or_else(Instant::now);
        stats.synced_us = (now - start).as_secs_f64() * 1e6;
        stats.sync_only_us = (now - open).as_secs_f64() * 1e6;
        if stats.first_content_us == 0.0 {
            stats.first_content_us = stats.synced_us;
        }
        Ok((client, stats))
    }
}

impl Client {
    /// Sends one binary message.
    pub async fn send(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.ws.send(Message::Binary(bytes.into())).await?;
        Ok(())
    }

    /// The next binary message (pings are answered by tungstenite).
    pub async fn recv(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Binary(b))) => return Ok(b.to_vec()),
                Some(Ok(Message::Close(frame))) => bail!("closed by the server: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => bail!("connection ended"),
            }
        }
    }

    /// The message that writes `update` to the document in this client's protocol.
    pub fn update_message(&mut self, update: &[u8]) -> Vec<u8> {
        update_message(self.system, &self.prefix, &self.doc, &mut self.batch, update)
    }

    /// Splits into what the writer needs to send and the stream to drain.
    pub fn into_parts(self) -> (Writer, futures_util::stream::SplitStream<Ws>) {
        let (sink, stream) = self.ws.split();
        (
            Writer {
                sink,
                system: self.system,
                prefix: self.prefix,
                doc: self.doc,
                batch: self.batch,
            },
            stream,
        )
    }
}

/// The sending half of a client.
pub struct Writer {
    sink: futures_util::stream::SplitSink<Ws, Message>,
    system: System,
    prefix: Vec<u8>,
    doc: String,
    batch: u64,
}

impl Writer {
    /// Sends `update` in this client's protocol.
    pub async fn push(&mut self, update: &[u8]) -> anyhow::Result<()> {
        let msg = update_message(self.system, &self.prefix, &self.doc, &mut self.batch, update);
        self.sink.send(Message::Binary(msg.into())).await?;
        Ok(())
    }

    /// Sends raw bytes.
    pub async fn send(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.sink.send(Message::Binary(bytes.into())).await?;
        Ok(())
    }

    /// Closes the connection.
    pub async fn close(&mut self) {
        let _ = self.sink.close().await;
    }
}

fn update_message(system: System, prefix: &[u8], doc: &str, batch: &mut u64, update: &[u8]) -> Vec<u8> {
    match system {
        System::Native => {
            *batch += 1;
            ClientFrame::Push {
                doc: DocId::new(doc).unwrap_or_else(|_| DocId::new("invalid").expect("valid id")),
                batch: *batch,
                update: update.to_vec(),
            }
            .encode()
        }
        _ => y_sync(prefix, 2, update),
    }
}

/// If `bytes` is a native server ping, the pong to answer it with.
pub fn native_pong(bytes: &[u8]) -> Option<Vec<u8>> {
    // Variant index 7 of ServerFrame is Ping.
    if bytes.first() != Some(&7) {
        return None;
    }
    match ServerFrame::decode(bytes, MAX_FRAME) {
        Ok(ServerFrame::Ping { nonce }) => Some(ClientFrame::Pong { nonce }.encode()),
        _ => None,
    }
}

/// The marker the writers put in every inserted string: `dsb!` and eight hex digits of a
/// sequence number.
pub const MARKER: &[u8; 4] = b"dsb!";

/// The inserted text carrying sequence number `seq`.
pub fn marker_text(seq: u32) -> String {
    format!("dsb!{seq:08x};")
}

/// Finds the sequence number of the first marker in `bytes`, without decoding anything.
pub fn find_marker(bytes: &[u8]) -> Option<u32> {
    find_markers(bytes).next()
}

/// Every marker's sequence number in `bytes`, in order (a server that merges updates before
/// sending them puts several in one message).
pub fn find_markers(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    let mut from = 0;
    std::iter::from_fn(move || loop {
        let at = from + bytes.get(from..)?.windows(4).position(|w| w == MARKER)?;
        from = at + 4;
        let hex = bytes.get(at + 4..at + 12)?;
        if let Some(seq) = std::str::from_utf8(hex)
            .ok()
            .and_then(|h| u32::from_str_radix(h, 16).ok())
        {
            from = at + 12;
            return Some(seq);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftsync_protocol::yjs::YMessage;

    #[test]
    fn markers_are_found_in_real_updates_of_every_framing() {
        let doc = driftsync_engine::doc::new_doc(42).unwrap();
        driftsync_engine::doc::text_insert(&doc, 0, "hello").unwrap();
        let update = driftsync_engine::doc::text_insert(&doc, 5, &marker_text(0xabc)).unwrap();
        let mut batch = 0;
        let mut prefix = Vec::new();
        lib0::write_var_string(&mut prefix, "room");
        for system in [System::Native, System::DsYjs, System::Hocuspocus, System::DsHocuspocus] {
            let p = if system.hocuspocus_framing() {
                &prefix[..]
            } else {
                &[][..]
            };
            let msg = update_message(system, p, "room", &mut batch, &update);
            assert_eq!(find_marker(&msg), Some(0xabc), "{system:?}");
        }
        assert_eq!(find_marker(b"nothing here"), None);
        assert_eq!(find_marker(b"dsb!12"), None);
    }

    #[test]
    fn every_marker_is_found() {
        let text = format!("x{}dsb!zz{}{}", marker_text(1), marker_text(0xff), marker_text(7));
        let found: Vec<u32> = find_markers(text.as_bytes()).collect();
        assert_eq!(found, vec![1, 0xff, 7]);
        assert_eq!(find_markers(b"dsb!").count(), 0);
        assert_eq!(find_markers(b"").count(), 0);
        // A marker cut short at the end ends the search.
        let cut = format!("{}dsb!0000", marker_text(3));
        assert_eq!(find_markers(cut.as_bytes()).collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn classify_matches_the_codec() {
        let step1 = YMessage::SyncStep1(vec![1, 2, 3]).encode();
        assert_eq!(classify(&step1), Kind::Step1(&[1, 2, 3]));
        let step2 = YMessage::SyncStep2(vec![0, 0]).encode();
        assert_eq!(classify(&step2), Kind::Step2(&[0, 0]));
        assert_eq!(y_sync(&[], 2, &[5]), YMessage::Update(vec![5]).encode());
        assert_eq!(classify(&[1, 0]), Kind::Other);
        // Hocuspocus: prefix, SyncReply (4) carrying a step 1.
        let mut msg = Vec::new();
        lib0::write_var_string(&mut msg, "doc/a");
        msg.extend_from_slice(&[4, 0, 1, 0]);
        assert_eq!(classify(strip_prefix(&msg)), Kind::Step1(&[0]));
    }

    #[test]
    fn the_hocuspocus_framing_matches_driftsyncs_codec() {
        use driftsync_protocol::hocuspocus::{encode_message, HpFrame, HpMessage};
        let decode = |bytes: &[u8]| match HpFrame::decode(bytes, MAX_FRAME).unwrap() {
            HpFrame::Message { address, message } => (address, message),
            other => panic!("not a document's message: {other:?}"),
        };
        let prefix = hocuspocus_prefix("doc/a");
        // What the generator sends, as driftsync's /hocuspocus reads it.
        assert_eq!(
            decode(&hocuspocus_auth(&prefix, "bench")),
            (
                "doc/a".to_string(),
                HpMessage::Token {
                    token: "bench".into(),
                    version: None
                }
            )
        );
        assert_eq!(
            decode(&y_sync(&prefix, 0, &EMPTY_SV)),
            ("doc/a".to_string(), HpMessage::SyncStep1(EMPTY_SV.to_vec()))
        );
        assert_eq!(
            decode(&y_sync(&prefix, 1, &EMPTY_UPDATE)),
            ("doc/a".to_string(), HpMessage::SyncStep2(EMPTY_UPDATE.to_vec()))
        );
        let mut batch = 0;
        let update = update_message(System::DsHocuspocus, &prefix, "doc/a", &mut batch, &[1, 2, 3]);
        assert_eq!(decode(&update), ("doc/a".to_string(), HpMessage::Update(vec![1, 2, 3])));
        assert_eq!(batch, 0, "no batches outside the native protocol");
        // What it receives from driftsync's /hocuspocus.
        let received = |m: &HpMessage| {
            let bytes = encode_message("doc/a", m);
            let body = strip_prefix(&bytes).to_vec();
            (
                classify(&body) == Kind::Other,
                hocuspocus_control(&body).map(|c| format!("{c:?}")),
            )
        };
        let authenticated = HpMessage::Authenticated {
            scope: "read-write".into(),
        };
        assert_eq!(
            received(&authenticated),
            (true, Some(format!("{:?}", Control::Authenticated("read-write"))))
        );
        let denied = HpMessage::PermissionDenied {
            reason: "Forbidden".into(),
        };
        assert_eq!(
            received(&denied),
            (true, Some(format!("{:?}", Control::Denied("Forbidden"))))
        );
        for applied in [true, false] {
            assert_eq!(
                received(&HpMessage::SyncStatus(applied)),
                (true, Some(format!("{:?}", Control::SyncStatus(applied))))
            );
        }
        // Sync messages are not control messages; awareness (the heartbeat) is neither.
        assert_eq!(received(&HpMessage::SyncStep1(vec![0])), (false, None));
        assert_eq!(received(&HpMessage::Awareness(Vec::new())), (true, None));
        let step2 = encode_message("doc/a", &HpMessage::SyncStep2(vec![0, 0]));
        assert_eq!(classify(strip_prefix(&step2)), Kind::Step2(&[0, 0]));
        let live = encode_message("doc/a", &HpMessage::Update(marker_text(5).into_bytes()));
        assert_eq!(classify(strip_prefix(&live)), Kind::Update(marker_text(5).as_bytes()));
        assert_eq!(find_marker(&live), Some(5));
        // Where each system is reached.
        let ep = |system| Endpoint {
            system,
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            source_ips: 1,
        };
        assert_eq!(ep(System::DsHocuspocus).path("doc/a"), "/hocuspocus");
        assert_eq!(ep(System::Hocuspocus).path("doc/a"), "/");
        assert!(System::DsHocuspocus.is_driftsync() && !System::DsHocuspocus.is_anchor());
        assert!(!System::DsHocuspocus.acknowledges());
    }

    /// A scripted server answering as driftsync's `/hocuspocus` does: it checks what the client
    /// sends, in order, and answers each document's token then its SyncStep1 (Step1 + Step2),
    /// with `SyncStatus` frames where driftsync sends them, or refuses the document.
    // The handshake callback's error type is tungstenite's, large; it never fails here.
    #[allow(clippy::result_large_err)]
    async fn scripted_hocuspocus(refuse: bool) -> (SocketAddr, tokio::task::JoinHandle<Vec<Vec<u8>>>) {
        use driftsync_protocol::hocuspocus::{encode_message, HpFrame, HpMessage};
        use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let path = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
            let seen = std::sync::Arc::clone(&path);
            // The callback's signature is tungstenite's.
            #[allow(clippy::result_large_err)]
            let mut ws = tokio_tungstenite::accept_hdr_async(stream, move |req: &Request, resp: Response| {
                *seen.lock().unwrap() = req.uri().path().to_string();
                Ok(resp)
            })
            .await
            .unwrap();
            assert_eq!(*path.lock().unwrap(), "/hocuspocus");
            let mut got = Vec::new();
            async fn next(ws: &mut WebSocketStream<TcpStream>) -> Option<Vec<u8>> {
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Binary(b))) => return Some(b.to_vec()),
                        Some(Ok(_)) => continue,
                        _ => return None,
                    }
                }
            }
            let send = |m: HpMessage| Message::Binary(encode_message("doc/a", &m).into());
            // The token first, then the SyncStep1 without waiting for the answer.
            let token = next(&mut ws).await.unwrap();
            assert!(matches!(
                HpFrame::decode(&token, MAX_FRAME).unwrap(),
                HpFrame::Message {
                    message: HpMessage::Token { .. },
                    ..
                }
            ));
            got.push(token);
            let step1 = next(&mut ws).await.unwrap();
            got.push(step1);
            if refuse {
                ws.send(send(HpMessage::PermissionDenied {
                    reason: "Forbidden".into(),
                }))
                .await
                .unwrap();
                let _ = next(&mut ws).await;
                return got;
            }
            ws.send(send(HpMessage::Authenticated {
                scope: "read-write".into(),
            }))
            .await
            .unwrap();
            ws.send(send(HpMessage::SyncStep1(vec![0]))).await.unwrap();
            // A SyncStatus between the steps (another write's) is not the sync answer.
            ws.send(send(HpMessage::SyncStatus(true))).await.unwrap();
            ws.send(send(HpMessage::SyncStep2(vec![0, 0]))).await.unwrap();
            // The client's SyncStep2 (empty: nothing is stored), then its update, each answered
            // with a SyncStatus once "stored".
            while let Some(bytes) = next(&mut ws).await {
                got.push(bytes);
                ws.send(send(HpMessage::SyncStatus(true))).await.unwrap();
                if got.len() == 4 {
                    ws.send(send(HpMessage::Update(marker_text(7).into_bytes())))
                        .await
                        .unwrap();
                }
            }
            got
        });
        (addr, server)
    }

    #[tokio::test]
    async fn ds_hocuspocus_joins_with_the_token_first_and_skips_sync_statuses() {
        use driftsync_protocol::hocuspocus::{HpFrame, HpMessage};
        let (addr, server) = scripted_hocuspocus(false).await;
        let ep = Endpoint {
            system: System::DsHocuspocus,
            addr,
            source_ips: 1,
        };
        let (mut client, stats) = ep.join("doc/a", 0, &Holding::default()).await.unwrap();
        assert!(stats.synced_us > 0.0 && stats.bytes_up > 0 && stats.bytes_down > 0);
        let msg = client.update_message(&[1, 2, 3]);
        client.send(msg).await.unwrap();
        // Whatever comes before the relayed update (SyncStatus acks) carries no marker.
        loop {
            let bytes = client.recv().await.unwrap();
            if let Some(seq) = find_marker(&bytes) {
                assert_eq!(seq, 7);
                break;
            }
            assert!(matches!(
                hocuspocus_control(strip_prefix(&bytes)),
                Some(Control::SyncStatus(true))
            ));
        }
        drop(client);
        let got: Vec<HpMessage> = server
            .await
            .unwrap()
            .iter()
            .map(|b| match HpFrame::decode(b, MAX_FRAME).unwrap() {
                HpFrame::Message { address, message } => {
                    assert_eq!(address, "doc/a");
                    message
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                HpMessage::Token {
                    token: "bench".into(),
                    version: None
                },
                HpMessage::SyncStep1(EMPTY_SV.to_vec()),
                HpMessage::SyncStep2(EMPTY_UPDATE.to_vec()),
                HpMessage::Update(vec![1, 2, 3]),
            ]
        );
    }

    #[tokio::test]
    async fn a_refused_hocuspocus_document_fails_the_join() {
        let (addr, server) = scripted_hocuspocus(true).await;
        let ep = Endpoint {
            system: System::DsHocuspocus,
            addr,
            source_ips: 1,
        };
        let err = match ep.join("doc/a", 0, &Holding::default()).await {
            Ok(_) => panic!("joined a refused document"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("refused the document: Forbidden"), "{err}");
        assert_eq!(server.await.unwrap().len(), 2);
    }

    #[test]
    fn native_pings_are_answered() {
        let ping = ServerFrame::Ping { nonce: 9 }.encode();
        assert_eq!(native_pong(&ping), Some(ClientFrame::Pong { nonce: 9 }.encode()));
        let ack = ServerFrame::Ack {
            doc: DocId::new("d").unwrap(),
            batch: 1,
            cursor: 1,
        }
        .encode();
        assert_eq!(native_pong(&ack), None);
    }
}
