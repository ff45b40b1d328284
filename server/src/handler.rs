//! What a protocol handler is: a sans-IO state machine per connection. Bytes and events go in
//! (a message, the reply to one of its requests, a heartbeat, a timer); frames and requests
//! come out as [`Action`]s. The connection driver ([`crate::driver`]) does the I/O: it reads
//! and writes the socket, keeps the heartbeat and the rate limit, carries requests to the rooms
//! and brings their replies back. A handler never touches a room, a socket or the store, so a
//! protocol is tested with bytes alone, and adding one touches neither the driver nor the room.

use std::collections::VecDeque;

use driftsync_engine::store::Origin;
use driftsync_engine::sync::ResumeAnswer;
use driftsync_protocol::yjs::AwarenessEntry;
use driftsync_protocol::{Cursor, DocId, ErrorCode};
use tokio::time::Instant;
use yrs::StateVector;

use crate::event::{Codec, Joined, Refused, RoomEvent};
use crate::owners::Ownership;

/// The time as a handler sees it: tokio's monotonic clock (virtual in a simulation) and the
/// wall clock in Unix seconds (for token expiry).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub(crate) at: Instant,
    pub(crate) unix: u64,
}

impl Now {
    pub(crate) fn read() -> Now {
        Now {
            at: Instant::now(),
            unix: crate::auth::now_secs(),
        }
    }
}

/// What a handler asks of the driver, in order.
#[derive(Debug)]
pub(crate) enum Action {
    /// Queue a frame now (a connection whose queue is full is closed as a slow consumer).
    Send(Vec<u8>),
    /// Queue the answer to the peer's own request once its queue has room (paced by its
    /// reading); with `charge`, its size is charged to the connection's rate limit.
    Answer { bytes: Vec<u8>, charge: bool },
    /// Send a WebSocket ping.
    Ping,
    /// Carry a request to the rooms; its [`Reply`] comes back through [`Handler::reply`] before
    /// the next message is read — except a push's, which comes once its commit settled, pushes
    /// answered in the order they were made.
    Request(Request),
    /// Accept frames up to this size from now on.
    FrameLimit(usize),
    /// A refusal cost the room a reload of this many bytes: charge it (the connection is
    /// closed after too many).
    ChargeReload(u64),
    /// Close the connection with this code.
    Close(u16),
    /// Send the events of `doc` to these addresses (Hocuspocus `sessionAwareness` providers);
    /// empty: to the document's name alone, as every protocol's codec encodes them.
    Addresses { doc: DocId, addresses: Vec<String> },
}

/// A request to the rooms (or the store), carried out by the driver for the connection.
#[derive(Debug)]
pub(crate) enum Request {
    /// Bind yrs client id `client_id` to `user`, or find whose it is.
    Claim { client_id: u64, user: String },
    /// One document of a native resume: answer it and subscribe. With `opening`, the document
    /// is new to the connection and counts against its room-opening limits.
    Resume {
        doc: DocId,
        cursor: Cursor,
        state_vector: Vec<u8>,
        opening: bool,
    },
    /// Subscribe a Yjs connection to its document (counts as opening a room).
    Join { doc: DocId },
    /// What a client with this state vector lacks.
    Diff { doc: DocId, state_vector: StateVector },
    /// Push an update, written by the handler's [`Handler::identity`].
    Push {
        doc: DocId,
        origin: Option<Origin>,
        update: Vec<u8>,
        /// Answer at once, unchecked, if the document holds all of it already.
        skip_redundant: bool,
        /// The handler's own tag for it, given back in the reply (a native batch id).
        tag: u64,
    },
    /// Unsubscribe from a document (and drop the connection's presence there).
    Leave { doc: DocId },
    /// Set or clear the connection's native presence in a document.
    Presence { doc: DocId, state: Option<String> },
    /// Apply a Yjs connection's awareness entries.
    Awareness { doc: DocId, entries: Vec<AwarenessEntry> },
    /// Pass an ephemeral event (typing) to the other subscribers.
    Relay { doc: DocId, event: RoomEvent },
    /// Queue the current presence states of a document's other connections.
    SendPresence { doc: DocId },
    /// The awareness states of a document.
    AwarenessSnapshot { doc: DocId },
    /// The handler's user's inbox changed after index version `since`; the connection follows
    /// the inbox from now on ([`Handler::inbox_changed`]).
    Inbox { since: u64 },
    /// The members of a chat room, with their status and when they were last seen.
    Members { room: DocId },
}

/// The answer to a [`Request`].
#[derive(Debug)]
pub(crate) enum Reply {
    /// To `Claim` (`Err`: the store failed).
    Claimed(Result<Ownership, ()>),
    /// To `Resume`.
    Resumed {
        doc: DocId,
        result: Result<ResumeAnswer, ErrorCode>,
    },
    /// To `Join`.
    Joined(Result<Joined, ErrorCode>),
    /// To `Diff`: the update the client lacks.
    Diff(Result<Vec<u8>, ErrorCode>),
    /// To `Push`, once its commit settled.
    Pushed {
        doc: DocId,
        tag: u64,
        result: Result<Cursor, Refused>,
    },
    /// To `Presence`.
    Presence { doc: DocId, result: Result<(), Refused> },
    /// To `AwarenessSnapshot` (`None`: the room is not loaded).
    AwarenessSnapshot(Option<Vec<AwarenessEntry>>),
    /// To `Inbox`.
    Inbox(Result<driftsync_engine::store::Inbox, ErrorCode>),
    /// To `Members`.
    Members {
        room: DocId,
        result: Result<Vec<driftsync_protocol::RoomMember>, ErrorCode>,
    },
    /// To requests that have nothing to say (`Leave`, `Awareness`, `Relay`, `SendPresence`).
    Done,
}

/// Actions a handler emits, in order.
pub(crate) type Actions = VecDeque<Action>;

/// A protocol: a sans-IO state machine per connection (see the module documentation).
pub(crate) trait Handler: Send {
    /// How room events are encoded for this protocol.
    const CODEC: Codec;

    /// The connection is open (and upgraded).
    fn start(&mut self, now: Now, out: &mut Actions);

    /// A binary message arrived (within the rate limit).
    fn message(&mut self, bytes: Vec<u8>, now: Now, out: &mut Actions);

    /// The reply to one of the handler's requests.
    fn reply(&mut self, reply: Reply, now: Now, out: &mut Actions);

    /// The heartbeat interval passed (the driver closes a peer silent for three).
    fn heartbeat(&mut self, out: &mut Actions);

    /// A message was refused by the rate limit (and not given to [`Handler::message`]).
    fn rate_limited(&mut self, bytes: Vec<u8>, out: &mut Actions);

    /// When [`Handler::timer`] is next due (a hello's deadline, a token's expiry), if ever.
    fn deadline(&self) -> Option<Instant>;

    /// [`Handler::deadline`] has come.
    fn timer(&mut self, now: Now, out: &mut Actions);

    /// The user the connection's pushes are written by, for authorship and the chat rules
    /// (`None`: an open server vouches for no one).
    fn identity(&self) -> Option<&str>;

    /// The user name shown in presence (`anonymous` on an open server).
    fn user(&self) -> &str;

    /// The documents the connection is subscribed to (left when it closes).
    fn subscriptions(&self) -> Vec<DocId>;

    /// The inbox the connection follows (after a [`Request::Inbox`]) may have changed.
    fn inbox_changed(&mut self, _now: Now, _out: &mut Actions) {}
}
