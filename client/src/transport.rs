//! How a client's frames travel: the [`Transport`] trait, message by message, with the
//! WebSocket implementation used against a server ([`WebSocketTransport`]) and an in-memory one
//! for tests and simulations ([`MemoryTransport`]).
//!
//! A transport carries opaque binary messages (one encoded frame each); decoding, the protocol
//! and every bookkeeping decision belong to [`Machine`](crate::machine::Machine).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::{Error, Result, Tls};

/// A boxed future returned by [`Transport`] methods (boxed so that the trait is object safe).
pub type TransportFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a transport received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// One binary message: one encoded server frame.
    Binary(Vec<u8>),
    /// The connection ended, with the peer's close code if it sent one.
    Closed(Option<u16>),
}

/// A message-level connection to a server.
pub trait Transport: Send {
    /// Sends one binary message.
    fn send(&mut self, message: Vec<u8>) -> TransportFuture<'_, Result<()>>;
    /// The next message, skipping control messages. Must be cancel-safe: a `recv` dropped
    /// before it completes loses nothing. Once the connection ended it keeps answering
    /// [`Incoming::Closed`].
    fn recv(&mut self) -> TransportFuture<'_, Result<Incoming>>;
    /// Closes the connection cleanly, without waiting long on a dead peer.
    fn close(&mut self) -> TransportFuture<'_, ()>;
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn send(&mut self, message: Vec<u8>) -> TransportFuture<'_, Result<()>> {
        (**self).send(message)
    }

    fn recv(&mut self) -> TransportFuture<'_, Result<Incoming>> {
        (**self).recv()
    }

    fn close(&mut self) -> TransportFuture<'_, ()> {
        (**self).close()
    }
}

/// The native protocol over a WebSocket (`{url}/v1/sync`), as a server speaks it.
#[derive(Debug)]
pub struct WebSocketTransport {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WebSocketTransport {
    /// Connects to the server at `url` (`ws://host:port`, or `wss://host:port` trusting
    /// Mozilla's roots): its `/v1/sync` endpoint.
    pub async fn connect(url: &str) -> Result<WebSocketTransport> {
        let tls = if is_tls(url) { Some(Tls::mozilla()?) } else { None };
        Self::connect_with(url, tls.as_ref()).await
    }

    /// Connects to the server at `url`; a `wss://` url is verified with `tls` (Mozilla's roots
    /// when `None`).
    pub async fn connect_with(url: &str, tls: Option<&Tls>) -> Result<WebSocketTransport> {
        let endpoint = format!("{}/v1/sync", url.trim_end_matches('/'));
        let connector = if is_tls(url) {
            let tls = match tls {
                Some(tls) => tls.clone(),
                None => Tls::mozilla()?,
            };
            Connector::Rustls(tls.config())
        } else {
            Connector::Plain
        };
        let connected = tokio_tungstenite::connect_async_tls_with_config(endpoint, None, false, Some(connector)).await;
        match connected {
            Ok((ws, _)) => Ok(WebSocketTransport { ws }),
            Err(e) => match crate::tls::tls_failure(&e) {
                Some(reason) => Err(Error::Tls(reason)),
                None => Err(e.into()),
            },
        }
    }
}

/// Whether `url` asks for TLS (`wss://` or `https://`).
fn is_tls(url: &str) -> bool {
    let lower = url.trim_start().to_ascii_lowercase();
    lower.starts_with("wss://") || lower.starts_with("https://")
}

impl Transport for WebSocketTransport {
    fn send(&mut self, message: Vec<u8>) -> TransportFuture<'_, Result<()>> {
        Box::pin(async move {
            self.ws.send(WsMessage::Binary(message.into())).await?;
            Ok(())
        })
    }

    fn recv(&mut self) -> TransportFuture<'_, Result<Incoming>> {
        // Cancel-safe: each iteration only awaits the stream, which is.
        Box::pin(async move {
            loop {
                match self.ws.next().await {
                    Some(Ok(WsMessage::Binary(bytes))) => return Ok(Incoming::Binary(bytes.to_vec())),
                    Some(Ok(WsMessage::Close(frame))) => return Ok(Incoming::Closed(frame.map(|f| u16::from(f.code)))),
                    None => return Ok(Incoming::Closed(None)),
                    // Pings are answered by tungstenite; text and pongs mean nothing here.
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.into()),
                }
            }
        })
    }

    fn close(&mut self) -> TransportFuture<'_, ()> {
        Box::pin(async move {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.close(None)).await;
        })
    }
}

/// How many messages an in-memory transport holds in each direction before a sender waits.
const MEMORY_CAPACITY: usize = 1024;

/// One end of an in-memory connection (a pair of bounded channels): for tests and simulations,
/// the client on one end and a scripted server on the other.
#[derive(Debug)]
pub struct MemoryTransport {
    tx: Option<mpsc::Sender<Incoming>>,
    rx: mpsc::Receiver<Incoming>,
}

impl MemoryTransport {
    /// Two connected ends: what one sends, the other receives.
    pub fn pair() -> (MemoryTransport, MemoryTransport) {
        let (a_tx, a_rx) = mpsc::channel(MEMORY_CAPACITY);
        let (b_tx, b_rx) = mpsc::channel(MEMORY_CAPACITY);
        (
            MemoryTransport {
                tx: Some(a_tx),
                rx: b_rx,
            },
            MemoryTransport {
                tx: Some(b_tx),
                rx: a_rx,
            },
        )
    }

    /// Closes this end, telling the peer `code` (as a WebSocket close frame would).
    pub async fn close_with(&mut self, code: Option<u16>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Incoming::Closed(code)).await;
        }
    }
}

impl Transport for MemoryTransport {
    fn send(&mut self, message: Vec<u8>) -> TransportFuture<'_, Result<()>> {
        Box::pin(async move {
            let tx = self.tx.as_ref().ok_or(Error::Closed)?;
            tx.send(Incoming::Binary(message)).await.map_err(|_| Error::Closed)
        })
    }

    fn recv(&mut self) -> TransportFuture<'_, Result<Incoming>> {
        // Cancel-safe: `mpsc::Receiver::recv` is.
        Box::pin(async move { Ok(self.rx.recv().await.unwrap_or(Incoming::Closed(None))) })
    }

    fn close(&mut self) -> TransportFuture<'_, ()> {
        Box::pin(self.close_with(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_ends_carry_messages_and_the_close() {
        let (mut a, mut b) = MemoryTransport::pair();
        a.send(vec![1, 2]).await.unwrap();
        assert_eq!(b.recv().await.unwrap(), Incoming::Binary(vec![1, 2]));
        b.close_with(Some(4000)).await;
        assert_eq!(a.recv().await.unwrap(), Incoming::Closed(Some(4000)));
        assert!(b.send(vec![3]).await.is_err(), "a closed end sends nothing");
        drop(b);
        assert_eq!(a.recv().await.unwrap(), Incoming::Closed(None), "and stays closed");
    }
}
