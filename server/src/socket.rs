//! What every WebSocket connection shares, whatever its protocol: a writer task draining the
//! connection's bounded queue, and reading the next binary message (or, for heartbeats, the
//! next sign of life).

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::room::{ConnCtl, Outgoing, Protocol, RoomEvent};

/// How long a closing connection may take to flush what is queued and send its close frame.
/// A peer that does not read (dead or slow) is cut off after this.
const CLOSE_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Spawns the writer: it sends queued items (room events encoded by `encode`; `None` skips an
/// event) until the queue closes or the connection is told to close, then — within
/// [`CLOSE_FLUSH_TIMEOUT`] — flushes what is still queued (acknowledgements matter) and sends a
/// close frame with the connection's close code. A slow consumer told to resync gets no flush,
/// only the close frame: it will resume anyway. A blocked send never keeps the writer from
/// noticing the close.
pub(crate) fn spawn_writer(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outgoing>,
    ctl: Arc<ConnCtl>,
    protocol: Protocol,
    encode: fn(&RoomEvent) -> Option<Vec<u8>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let message_of = |item: Outgoing| match item {
            Outgoing::Frame(bytes) => Some(Message::Binary(bytes.into())),
            Outgoing::Event(event) => event.encoded(protocol, encode).map(Message::Binary),
            Outgoing::Ping => Some(Message::Ping(Default::default())),
        };
        loop {
            let item = tokio::select! {
                biased;
                () = ctl.token.cancelled() => break,
                item = rx.recv() => match item {
                    Some(item) => item,
                    None => break,
                },
            };
            let Some(message) = message_of(item) else { continue };
            ctl.metrics.frames_out.inc();
            if let Message::Binary(bytes) = &message {
                ctl.metrics.bytes_out.inc_by(bytes.len() as u64);
            }
            tokio::select! {
                sent = sink.send(message) => if sent.is_err() {
                    ctl.close(driftsync_protocol::CLOSE_GOING_AWAY);
                    return;
                },
                () = ctl.token.cancelled() => break,
            }
        }
        let flush = ctl.code() != driftsync_protocol::CLOSE_RESYNC;
        let close = async {
            while let Some(item) = if flush { rx.try_recv().ok() } else { None } {
                let Some(message) = message_of(item) else { continue };
                if sink.send(message).await.is_err() {
                    return;
                }
            }
            let frame = CloseFrame {
                code: ctl.code(),
                reason: "".into(),
            };
            let _ = sink.send(Message::Close(Some(frame))).await;
        };
        let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, close).await;
    })
}

/// What arrived on a connection.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A binary message: one protocol frame.
    Binary(Vec<u8>),
    /// A WebSocket ping or pong: no protocol content, but a sign of life.
    Control,
}

/// The next message; `None` at close or error. Text messages are not part of either protocol:
/// they end the connection.
pub(crate) async fn next_incoming(stream: &mut SplitStream<WebSocket>) -> Option<Incoming> {
    match stream.next().await? {
        Ok(Message::Binary(bytes)) => Some(Incoming::Binary(bytes.to_vec())),
        Ok(Message::Ping(_) | Message::Pong(_)) => Some(Incoming::Control),
        Ok(Message::Text(_) | Message::Close(_)) | Err(_) => None,
    }
}

/// The next binary message, skipping WebSocket pings and pongs; `None` at close or error.
pub(crate) async fn next_binary(stream: &mut SplitStream<WebSocket>) -> Option<Vec<u8>> {
    loop {
        match next_incoming(stream).await? {
            Incoming::Binary(bytes) => return Some(bytes),
            Incoming::Control => continue,
        }
    }
}
