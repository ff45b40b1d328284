//! The simulated network: one [`Link`] per connection, over the in-memory byte stream a server
//! instance hands out, speaking RFC 6455 client framing.
//!
//! The simulation owns delivery in both directions. What a client sends is held until its
//! delivery time on the virtual clock and then written to the stream, in order (a connection is
//! a stream). What the server sends is read eagerly into an inbox, stamped with its delivery
//! time (never before the previous message's: order is kept), and handed to the client by the
//! driver once that time has come. Messages of different connections interleave arbitrarily,
//! because each link has its own delays.
//!
//! Cutting a link drops the stream at once: whatever was in flight either way is lost and the
//! server sees the connection end. An abandoned link keeps delivering what the client had sent
//! (an old connection whose frames still arrive after the client has moved to a new one) and
//! drops everything the server sends.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How a link delays messages: each message takes `base` plus a uniform jitter up to `jitter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    /// The least a message takes.
    pub base: Duration,
    /// The most a message takes beyond `base`.
    pub jitter: Duration,
}

impl Latency {
    /// The most a message can take on this link.
    pub fn max(&self) -> Duration {
        self.base + self.jitter
    }

    fn sample(&self, rng: &mut StdRng) -> Duration {
        let jitter = u64::try_from(self.jitter.as_micros()).unwrap_or(u64::MAX);
        self.base + Duration::from_micros(if jitter == 0 { 0 } else { rng.random_range(0..=jitter) })
    }
}

/// What the client side of a link holds in common with its pump task.
#[derive(Debug, Default)]
struct Shared {
    /// Messages from the server, with their delivery times (non-decreasing).
    inbox: VecDeque<(Instant, Message)>,
    /// The stream ended (the server closed it, or it was cut).
    closed: bool,
    /// The client moved on: drop what the server sends.
    abandoned: bool,
}

/// One simulated connection.
#[derive(Debug)]
pub struct Link {
    outgoing: mpsc::UnboundedSender<(Instant, Message)>,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
    latency: Latency,
    rng: StdRng,
    /// Delivery time of the last message sent, so that sends stay in order.
    last_out: Instant,
}

impl Link {
    /// Wraps the client end of a connection and starts its pump task on the current runtime.
    pub async fn open(stream: DuplexStream, latency: Latency, seed: u64) -> Link {
        let ws = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (outgoing, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(pump(ws, rx, Arc::clone(&shared), latency, seed ^ 0x5eed));
        Link {
            outgoing,
            shared,
            task,
            latency,
            rng: StdRng::seed_from_u64(seed),
            last_out: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends a binary message; it reaches the server after this link's latency.
    pub fn send(&mut self, bytes: Vec<u8>) {
        let at = (Instant::now() + self.latency.sample(&mut self.rng)).max(self.last_out);
        self.last_out = at;
        // A closed pump has dropped its receiver: the message is lost with the connection.
        let _ = self.outgoing.send((at, Message::Binary(bytes.into())));
    }

    /// The messages from the server whose delivery time has come, in order.
    pub fn deliverable(&mut self) -> Vec<Message> {
        let now = Instant::now();
        let mut shared = self.lock();
        let mut out = Vec::new();
        while shared.inbox.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, message)) = shared.inbox.pop_front() {
                out.push(message);
            }
        }
        out
    }

    /// Whether the connection has ended and everything it delivered was taken.
    pub fn is_closed(&self) -> bool {
        let shared = self.lock();
        shared.closed && shared.inbox.is_empty()
    }

    /// The largest delay of this link.
    pub fn latency(&self) -> Latency {
        self.latency
    }

    /// Changes the delays of messages sent from now on (a slow patch of network).
    pub fn set_latency(&mut self, latency: Latency) {
        self.latency = latency;
    }

    /// Cuts the connection: the stream is dropped, everything in flight is lost.
    pub fn cut(self) {
        self.task.abort();
        let mut shared = self.lock();
        shared.closed = true;
        shared.inbox.clear();
    }

    /// Leaves the connection behind: what the client sent still arrives (the pump ends once it
    /// has written it, dropping the stream), what the server sends is dropped.
    pub fn abandon(self) {
        let mut shared = self.lock();
        shared.abandoned = true;
        shared.inbox.clear();
        // Dropping the sender lets the pump finish its queue and stop.
    }
}

/// Moves messages between the stream and the link until the stream ends.
async fn pump(
    mut ws: WebSocketStream<DuplexStream>,
    mut rx: mpsc::UnboundedReceiver<(Instant, Message)>,
    shared: Arc<Mutex<Shared>>,
    latency: Latency,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pending: VecDeque<(Instant, Message)> = VecDeque::new();
    let mut sender_gone = false;
    let mut last_in = Instant::now();
    loop {
        let due = pending.front().map(|(at, _)| *at);
        if sender_gone && due.is_none() {
            break;
        }
        tokio::select! {
            biased;
            next = rx.recv(), if !sender_gone => match next {
                Some(message) => pending.push_back(message),
                None => sender_gone = true,
            },
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                if let Some((_, message)) = pending.pop_front() {
                    if ws.send(message).await.is_err() {
                        break;
                    }
                }
            }
            incoming = ws.next() => match incoming {
                Some(Ok(message @ (Message::Binary(_) | Message::Close(_)))) => {
                    let mut shared = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    if !shared.abandoned {
                        let at = (Instant::now() + latency.sample(&mut rng)).max(last_in);
                        last_in = at;
                        shared.inbox.push_back((at, message));
                    }
                }
                // Pings are answered by tungstenite itself; text frames are not ours.
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    shared.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
}
