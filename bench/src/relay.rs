//! The bare relay: a WebSocket server that applies nothing and stores nothing, and writes each
//! binary message once to every other connection of the same room (the URL path). It is the
//! floor of the machine for the fan-out workload: what moving the bytes alone costs.
//!
//! It speaks just enough of the y-websocket protocol for the generator's clients: it sends an
//! empty sync step 1 when a connection opens, answers a client's sync step 1 with an empty
//! sync step 2, and relays nothing of the sync handshake (everything else is relayed as is).
//!
//! One task reads each connection and broadcasts by cloning the message's `Bytes` into every
//! other member's unbounded channel; one task per connection writes what its channel holds,
//! flushing once per batch it finds there.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::clients::{classify, y_sync, Kind, EMPTY_SV, EMPTY_UPDATE};

/// The members of one room: connection id and the channel its writer drains.
type Members = Vec<(u64, UnboundedSender<Message>)>;

/// Every open room by path. A room is dropped with its last member.
#[derive(Default)]
struct Rooms {
    /// Rooms by URL path.
    rooms: Mutex<HashMap<String, Arc<Mutex<Members>>>>,
    /// The next connection id.
    next: AtomicU64,
}

impl Rooms {
    /// Adds a member to the room at `path`; returns its id and the room.
    fn join(&self, path: &str, tx: UnboundedSender<Message>) -> (u64, Arc<Mutex<Members>>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut rooms = self.rooms.lock().unwrap_or_else(PoisonError::into_inner);
        let room = Arc::clone(rooms.entry(path.to_string()).or_default());
        room.lock().unwrap_or_else(PoisonError::into_inner).push((id, tx));
        (id, room)
    }

    /// Removes member `id` from the room at `path`, and the room if it is left empty.
    fn leave(&self, path: &str, id: u64, room: &Mutex<Members>) {
        let mut rooms = self.rooms.lock().unwrap_or_else(PoisonError::into_inner);
        let mut members = room.lock().unwrap_or_else(PoisonError::into_inner);
        members.retain(|(m, _)| *m != id);
        if members.is_empty() {
            rooms.remove(path);
        }
    }
}

/// What the relay does with one message from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Answer the sender with this message (an empty sync step 2 for its sync step 1).
    Reply(Vec<u8>),
    /// Drop it (the client's sync step 2: the relay holds no document).
    Ignore,
    /// Write it to every other member of the room.
    Relay,
}

/// Decides what to do with a binary message from a client.
pub fn action(bytes: &[u8]) -> Action {
    match classify(bytes) {
        Kind::Step1(_) => Action::Reply(y_sync(&[], 1, &EMPTY_UPDATE)),
        Kind::Step2(_) => Action::Ignore,
        Kind::Update(_) | Kind::Other => Action::Relay,
    }
}

/// Serves the relay on `addr` until the process ends.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!("relay listening on {}", listener.local_addr()?);
    let rooms = Arc::new(Rooms::default());
    loop {
        let (stream, _) = listener.accept().await?;
        let rooms = Arc::clone(&rooms);
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &rooms).await {
                eprintln!("relay: connection: {e:#}");
            }
        });
    }
}

/// One connection: handshake, join the room of the path, relay until it ends.
// The handshake callback's error type is tungstenite's, whatever its size.
#[allow(clippy::result_large_err)]
async fn connection(stream: TcpStream, rooms: &Rooms) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let mut path = String::new();
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        path = req.uri().path().to_string();
        Ok(resp)
    };
    let config = WebSocketConfig::default().read_buffer_size(4 * 1024);
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await?;
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = unbounded_channel::<Message>();
    // The server's sync step 1 (it holds nothing), which the client answers.
    let _ = tx.send(Message::Binary(y_sync(&[], 0, &EMPTY_SV).into()));
    let (id, room) = rooms.join(&path, tx.clone());
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if sink.feed(msg).await.is_err() {
                return;
            }
            while let Ok(msg) = rx.try_recv() {
                if sink.feed(msg).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    while let Some(Ok(msg)) = source.next().await {
        let bytes = match msg {
            Message::Binary(bytes) => bytes,
            Message::Close(_) => break,
            _ => continue,
        };
        match action(&bytes) {
            Action::Reply(answer) => {
                let _ = tx.send(Message::Binary(answer.into()));
            }
            Action::Ignore => {}
            Action::Relay => {
                let members = room.lock().unwrap_or_else(PoisonError::into_inner);
                for (m, peer) in members.iter() {
                    if *m != id {
                        let _ = peer.send(Message::Binary(bytes.clone()));
                    }
                }
            }
        }
    }
    rooms.leave(&path, id, &room);
    writer.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handshake_is_answered_and_updates_relayed() {
        assert_eq!(action(&y_sync(&[], 0, &[1, 5, 3])), Action::Reply(vec![0, 1, 2, 0, 0]));
        assert_eq!(action(&y_sync(&[], 1, &[0, 0])), Action::Ignore);
        assert_eq!(action(&y_sync(&[], 2, &[1, 2, 3])), Action::Relay);
        // Awareness and anything unknown go through untouched.
        assert_eq!(action(&[1, 3, 0, 0, 0]), Action::Relay);
        assert_eq!(action(&[]), Action::Relay);
    }

    #[test]
    fn rooms_are_dropped_with_their_last_member() {
        let rooms = Rooms::default();
        let (tx, _rx) = unbounded_channel();
        let (a, room) = rooms.join("/x", tx.clone());
        let (b, same) = rooms.join("/x", tx.clone());
        let (c, other) = rooms.join("/y", tx);
        assert!(Arc::ptr_eq(&room, &same));
        assert_eq!(room.lock().unwrap().len(), 2);
        rooms.leave("/x", a, &room);
        assert_eq!(rooms.rooms.lock().unwrap().len(), 2);
        rooms.leave("/x", b, &room);
        rooms.leave("/y", c, &other);
        assert!(rooms.rooms.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_message_reaches_every_other_member_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        tokio::spawn(serve(addr));
        let ep = crate::clients::Endpoint {
            system: crate::clients::System::Relay,
            addr,
            source_ips: 1,
        };
        let holding = crate::clients::Holding::default();
        let mut tries = 0;
        let (mut a, _) = loop {
            match ep.join("room", 0, &holding).await {
                Ok(joined) => break joined,
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => panic!("{e:#}"),
            }
        };
        let (mut b, _) = ep.join("room", 1, &holding).await.unwrap();
        let (mut c, _) = ep.join("other", 2, &holding).await.unwrap();
        let update = y_sync(&[], 2, b"dsb!00000001;");
        a.send(update.clone()).await.unwrap();
        assert_eq!(b.recv().await.unwrap(), update);
        // Neither the sender nor another room gets it.
        let quiet = std::time::Duration::from_millis(100);
        assert!(tokio::time::timeout(quiet, a.recv()).await.is_err());
        assert!(tokio::time::timeout(quiet, c.recv()).await.is_err());
    }
}
