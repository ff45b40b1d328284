//! What flows from rooms to connections: room events, shared by every subscriber and encoded
//! once per protocol, the items of a connection's bounded outbound queue, and the handle that
//! closes a connection from anywhere.
//!
//! Rooms know nothing of protocols: they queue [`RoomEvent`]s; each connection's writer turns
//! them into frames with its protocol's [`Codec`]. Adding a protocol adds a codec (a free
//! [`Codec::slot`]), not a line in the room.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use driftsync_protocol::yjs::AwarenessEntry;
use driftsync_protocol::{Cursor, DocId, ErrorCode, CLOSE_RESYNC};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::queue;

/// What a room sends its subscribers. Each connection's writer encodes it for its protocol.
#[derive(Debug)]
pub(crate) enum RoomEvent {
    /// An update, with the cursor of the last update logged before or at it that the
    /// subscriber may advance to (see ARCHITECTURE.md, "The path of one update").
    Update {
        doc: DocId,
        cursor: Cursor,
        update: Vec<u8>,
    },
    /// An awareness client's presence changed (`None`: it left or expired). `peer` is the
    /// awareness client id: a native connection's session id, or a Yjs client id; `clock` is its
    /// awareness clock.
    Presence {
        doc: DocId,
        peer: u64,
        user: String,
        clock: u64,
        state: Option<String>,
    },
    /// A connection started or stopped typing.
    Typing {
        doc: DocId,
        peer: u64,
        user: String,
        typing: bool,
    },
    /// To the pusher only: its batch is stored at `cursor`. Queued by the room when it settles
    /// the commit, under its lock, so that it reaches the pusher in order with the updates the
    /// room broadcasts: no later update's cursor (nor a resume answer's) overtakes it.
    Ack { doc: DocId, batch: u64, cursor: Cursor },
    /// An application message a Hocuspocus provider sent to the document's other connections
    /// (only Hocuspocus connections receive it).
    Stateless { doc: DocId, payload: String },
}

impl RoomEvent {
    /// The document the event is about.
    pub(crate) fn doc(&self) -> &DocId {
        match self {
            RoomEvent::Update { doc, .. }
            | RoomEvent::Presence { doc, .. }
            | RoomEvent::Typing { doc, .. }
            | RoomEvent::Ack { doc, .. }
            | RoomEvent::Stateless { doc, .. } => doc,
        }
    }
}

/// How many protocols may encode one event (slots of [`SharedEvent`]'s cache).
const MAX_CODECS: usize = 4;

/// A protocol's encoding of room events: `encode` gives the frame (`None`: not sent in this
/// protocol); `slot` (below [`MAX_CODECS`], one per protocol) is where a shared event caches it.
#[derive(Clone, Copy)]
pub(crate) struct Codec {
    pub(crate) slot: usize,
    pub(crate) encode: fn(&RoomEvent) -> Option<Vec<u8>>,
}

/// A room event as every subscriber shares it, with its encoding cached per protocol: a
/// broadcast to N connections encodes the frame once per protocol, not N times, and every
/// connection's writer sends the same bytes.
#[derive(Debug)]
pub(crate) struct SharedEvent {
    pub(crate) event: RoomEvent,
    encoded: [OnceLock<Option<Bytes>>; MAX_CODECS],
}

impl SharedEvent {
    pub(crate) fn new(event: RoomEvent) -> Arc<Self> {
        Arc::new(SharedEvent {
            event,
            encoded: Default::default(),
        })
    }

    /// The event encoded by `codec` (`None`: not sent in that protocol), encoded on first use.
    pub(crate) fn encoded(&self, codec: Codec) -> Option<Bytes> {
        match self.encoded.get(codec.slot) {
            Some(cache) => cache
                .get_or_init(|| (codec.encode)(&self.event).map(Bytes::from))
                .clone(),
            None => (codec.encode)(&self.event).map(Bytes::from),
        }
    }
}

/// What goes into a connection's queue.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// Bytes already encoded for this connection's protocol.
    Frame(Vec<u8>),
    /// A room event, shared by every subscriber.
    Event(Arc<SharedEvent>),
    /// A WebSocket ping frame: Yjs clients answer those, not protocol pings.
    Ping,
    /// A WebSocket pong frame answering the peer's ping, with its payload.
    Pong(Vec<u8>),
}

/// What a queued item costs besides its payload (its slot, the frame header, bookkeeping).
pub(crate) const ITEM_OVERHEAD: usize = 64;

impl Outgoing {
    /// What holding this item in a queue costs, in bytes, for the queue's byte bound. A shared
    /// event counts whole in every queue that holds it: each would keep it alive alone.
    pub(crate) fn weight(&self) -> usize {
        ITEM_OVERHEAD
            + match self {
                Outgoing::Frame(bytes) | Outgoing::Pong(bytes) => bytes.len(),
                Outgoing::Ping => 0,
                Outgoing::Event(shared) => match &shared.event {
                    RoomEvent::Update { doc, update, .. } => doc.as_str().len() + update.len(),
                    RoomEvent::Presence { doc, user, state, .. } => {
                        doc.as_str().len() + user.len() + state.as_ref().map_or(0, String::len)
                    }
                    RoomEvent::Typing { doc, user, .. } => doc.as_str().len() + user.len(),
                    RoomEvent::Ack { doc, .. } => doc.as_str().len(),
                    RoomEvent::Stateless { doc, payload } => doc.as_str().len() + payload.len(),
                },
            }
    }
}

/// Closes a connection from anywhere, with a WebSocket close code.
pub(crate) struct ConnCtl {
    pub(crate) token: CancellationToken,
    code: AtomicU16,
    /// The server's metrics (frames and bytes out, slow consumers).
    pub(crate) metrics: Arc<Metrics>,
    /// The addresses a Hocuspocus connection uses for a document when they are not just the
    /// document's name (`sessionAwareness` providers): its writer sends each event of such a
    /// document once per address. Empty for every other connection.
    pub(crate) addresses: std::sync::Mutex<std::collections::BTreeMap<DocId, Vec<String>>>,
    /// The authenticated user of the connection, once known (set when it subscribes to a
    /// room): push notifications skip members connected to the room.
    pub(crate) user: std::sync::OnceLock<Box<str>>,
}

impl ConnCtl {
    pub(crate) fn new(token: CancellationToken, metrics: Arc<Metrics>) -> Self {
        metrics.connections.inc();
        ConnCtl {
            token,
            code: AtomicU16::new(driftsync_protocol::CLOSE_GOING_AWAY),
            metrics,
            addresses: std::sync::Mutex::default(),
            user: std::sync::OnceLock::new(),
        }
    }

    /// Asks the connection to close with `code` (the first code asked for wins).
    pub(crate) fn close(&self, code: u16) {
        if !self.token.is_cancelled() {
            self.code.store(code, Ordering::Relaxed);
            self.token.cancel();
        }
    }

    pub(crate) fn code(&self) -> u16 {
        self.code.load(Ordering::Relaxed)
    }
}

impl Drop for ConnCtl {
    fn drop(&mut self) {
        self.metrics.connections.dec();
    }
}

/// A connection's bounded outbound queue.
#[derive(Clone)]
pub(crate) struct Outbound {
    pub(crate) tx: queue::Sender<Outgoing>,
    pub(crate) ctl: Arc<ConnCtl>,
}

impl Outbound {
    /// Queues an item; on overflow (in frames or bytes) closes the connection with
    /// [`CLOSE_RESYNC`] and returns false: a slow consumer is disconnected with a reason, never
    /// silently left behind.
    pub(crate) fn send(&self, item: Outgoing) -> bool {
        let weight = item.weight();
        match self.tx.try_send_weighted(item, weight) {
            Ok(()) => true,
            Err(queue::TrySendError::Full) => {
                tracing::warn!("slow consumer: outbound queue full, closing with resync");
                self.ctl.metrics.slow_consumers.inc();
                self.ctl.close(CLOSE_RESYNC);
                false
            }
            Err(queue::TrySendError::Closed) => false,
        }
    }

    /// Queues an encoded frame.
    pub(crate) fn frame(&self, bytes: Vec<u8>) -> bool {
        self.send(Outgoing::Frame(bytes))
    }

    /// Queues the answer to this connection's own request once its queue has room (see
    /// [`queue::Sender::send_waiting`]): a large answer goes out as fast as the peer reads it,
    /// never all at once into memory, and never crowds out broadcasts. A peer that reads
    /// nothing for `patience` is closed with [`CLOSE_RESYNC`]. Returns false if the frame was
    /// not queued (the connection is closing).
    pub(crate) async fn answer(&self, bytes: Vec<u8>, patience: std::time::Duration) -> bool {
        let weight = bytes.len() + ITEM_OVERHEAD;
        tokio::select! {
            biased;
            () = self.ctl.token.cancelled() => false,
            sent = tokio::time::timeout(patience, self.tx.send_waiting(Outgoing::Frame(bytes), weight)) => match sent {
                Ok(Ok(())) => true,
                Ok(Err(_)) => false,
                Err(_) => {
                    tracing::info!("peer reads none of its answers: closing with resync");
                    self.ctl.metrics.slow_consumers.inc();
                    self.ctl.close(CLOSE_RESYNC);
                    false
                }
            }
        }
    }
}

/// Why a request to a room was refused.
#[derive(Debug, Clone)]
pub(crate) struct Refused {
    pub(crate) code: ErrorCode,
    /// The stored bytes of the document the room had to reload because of the refused update
    /// (0: no reload). A reload costs the whole document, so the sender pays for it: the
    /// connection charges it to its rate limit and closes a peer that keeps causing them.
    pub(crate) reload_cost: u64,
}

impl Refused {
    pub(crate) fn new(code: ErrorCode) -> Self {
        Refused { code, reload_cost: 0 }
    }
}

/// What a Yjs connection is greeted with once subscribed.
#[derive(Debug)]
pub(crate) struct Joined {
    /// The document's state vector (for SyncStep1).
    pub(crate) state_vector: Vec<u8>,
    /// The current awareness states.
    pub(crate) awareness: Vec<AwarenessEntry>,
}
