//! What every WebSocket connection shares, whatever its protocol: a writer task draining the
//! connection's bounded queue, and reading the next binary message.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::room::{ConnCtl, Outgoing, RoomEvent};

/// Spawns the writer: it sends queued items (room events encoded by `encode`; `None` skips an
/// event) until the queue closes or the connection is told to close, then flushes what is still
/// queued — acknowledgements matter — and sends a close frame with the connection's close code.
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
            tokio::select! {
                biased;
                item = rx.recv() => match item {
                    Some(item) => {
                        let Some(bytes) = bytes_of(item) else { continue };
                        if sink.send(Message::Binary(bytes.into())).await.is_err() {
                            ctl.close(driftsync_protocol::CLOSE_GOING_AWAY);
                            return;
                        }
                    }
                    None => break,
                },
                () = ctl.token.cancelled() => break,
            }
        }
        while let Ok(item) = rx.try_recv() {
            let Some(bytes) = bytes_of(item) else { continue };
            if sink.send(Message::Binary(bytes.into())).await.is_err() {
                return;
            }
        }
        let frame = CloseFrame { code: ctl.code(), reason: "".into() };
        let _ = sink.send(Message::Close(Some(frame))).await;
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
