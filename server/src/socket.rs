//! What every WebSocket connection shares, whatever its protocol: a writer task draining the
//! connection's bounded queue, and reading the next binary message.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::room::{ConnCtl, Outgoing, RoomEvent};

/// How long a closing connection may take to flush what is queued and send its close frame.
/// A peer that does not read (dead or slow) is cut off after this.
const CLOSE_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Spawns the writer: it sends queued items (room events encoded by `encode`; `None` skips an
/// event) until the queue closes or the connection is told to close, then — within
/// [`CLOSE_FLUSH_TIMEOUT`] — flushes what is still queued (acknowledgements matter) and sends a
/// close frame with the connection's close code. A blocked send never keeps it from noticing
/// the close.
pub(crate) fn spawn_writer(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outgoing>,
    ctl: Arc<ConnCtl>,
    encode: fn(&RoomEvent) -> Option<Vec<u8>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let bytes_of = |item: Outgoing| match item {
            Outgoing::Frame(bytes) => Some(bytes),
            Outgoing::Event(event) => encode(&event),
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
            let Some(bytes) = bytes_of(item) else { continue };
            tokio::select! {
                sent = sink.send(Message::Binary(bytes.into())) => if sent.is_err() {
                    ctl.close(driftsync_protocol::CLOSE_GOING_AWAY);
                    return;
                },
                () = ctl.token.cancelled() => break,
            }
        }
        let close = async {
            while let Ok(item) = rx.try_recv() {
                let Some(bytes) = bytes_of(item) else { continue };
                if sink.send(Message::Binary(bytes.into())).await.is_err() {
                    return;
                }
            }
            let frame = CloseFrame { code: ctl.code(), reason: "".into() };
            let _ = sink.send(Message::Close(Some(frame))).await;
        };
        let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, close).await;
    })
}

/// The next binary message, skipping WebSocket pings and pongs; `None` at close or error.
/// Text messages are not part of either protocol: they end the connection.
pub(crate) async fn next_binary(stream: &mut SplitStream<WebSocket>) -> Option<Vec<u8>> {
    loop {
        match stream.next().await? {
            Ok(Message::Binary(bytes)) => return Some(bytes.to_vec()),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Text(_) | Message::Close(_)) | Err(_) => return None,
        }
    }
}
