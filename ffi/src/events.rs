//! Events for the app's listener: the session's events made typed and app-shaped (a chat
//! room's remote change becomes the messages added and changed), delivered on a thread of the
//! subscription's own, until it is cancelled or the session stops.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use driftsync_client::{
    ChatEntry, ConnectionState as ClientState, Delivery as ClientDelivery, Event as ClientEvent, Incoming, Session,
    Transport, TransportFuture,
};
use driftsync_protocol::{ServerFrame, CLOSE_UNAUTHORIZED, CLOSE_UNSUPPORTED_VERSION, DEFAULT_MAX_FRAME_SIZE};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::error::{code_kind, DriftsyncError, ErrorKind};
use crate::Result;

/// How many typed failures a slow listener may fall behind on (older ones are dropped).
const FAILURE_CAPACITY: usize = 64;

/// Where a session's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum ConnectionState {
    /// Connecting, or offline and waiting to reconnect.
    Connecting,
    /// Connected; documents are being resumed or changes await acknowledgement.
    Connected,
    /// Connected, every document resumed and every local change acknowledged.
    Synced,
    /// Paused by the app; writes are stored and wait for `resume`.
    Paused,
    /// Shut down.
    Stopped,
}

/// Where a message is on its way to the others, as its sender sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Delivery {
    /// Only on this device so far (sending).
    Local,
    /// Durably stored by the server (sent).
    Acknowledged,
    /// On at least one other member's device.
    Delivered,
    /// Read by at least one other member.
    Read,
}

/// One chat message as the app shows it.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ChatMessage {
    /// Its id (a UUIDv7).
    pub id: String,
    /// Its author's user id.
    pub author: String,
    /// `text`, `image`, `video`, `file` or `system`.
    pub kind: String,
    /// Its text (empty once deleted).
    pub text: String,
    /// When it was sent, in milliseconds since the Unix epoch (the sender's clock).
    pub sent_at_ms: u64,
    /// When it was last edited, if ever.
    pub edited_at_ms: Option<u64>,
    /// Whether it was deleted (a tombstone).
    pub deleted: bool,
    /// The id of the message it answers, if any.
    pub reply_to: Option<String>,
    /// Its small string metadata.
    pub metadata: HashMap<String, String>,
    /// Its reactions: reaction → the users who reacted so.
    pub reactions: HashMap<String, Vec<String>>,
    /// Where it is on its way to the others.
    pub delivery: Delivery,
    /// The users other than its author whose devices have it.
    pub delivered_to: Vec<String>,
    /// The users other than its author who have read it.
    pub read_by: Vec<String>,
}

impl ChatMessage {
    pub(crate) fn from_entry(entry: &ChatEntry) -> ChatMessage {
        let m = &entry.message;
        ChatMessage {
            id: m.id.clone(),
            author: m.author.clone(),
            kind: m.kind.as_str().to_string(),
            text: m.text.clone(),
            sent_at_ms: m.created_ms,
            edited_at_ms: m.edited_ms,
            deleted: m.deleted,
            reply_to: m.reply_to.clone(),
            metadata: m.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            reactions: entry.reactions.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            delivery: match entry.state() {
                ClientDelivery::Local => Delivery::Local,
                ClientDelivery::Acknowledged => Delivery::Acknowledged,
                ClientDelivery::Delivered => Delivery::Delivered,
                ClientDelivery::Read => Delivery::Read,
            },
            delivered_to: entry.delivered_to.clone(),
            read_by: entry.read_by.clone(),
        }
    }
}

/// What a session tells its listeners.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum Event {
    /// The connection state changed (the first event of every subscription is the current one).
    StateChanged {
        /// The new state.
        state: ConnectionState,
    },
    /// The connection ended; `retry_in_ms` is when the next attempt starts, if one is planned.
    Disconnected {
        /// Why, as one line.
        reason: String,
        /// Milliseconds until the next attempt.
        retry_in_ms: Option<u64>,
    },
    /// A message appeared in a chat room: someone else's (or this user's, from another device)
    /// when it arrives; one sent from this device once the server has stored it.
    MessageAdded {
        /// The room.
        room: String,
        /// The message.
        message: ChatMessage,
    },
    /// A message changed: edited, deleted, reacted to, stored, delivered or read.
    MessageChanged {
        /// The room.
        room: String,
        /// The message as it is now.
        message: ChatMessage,
    },
    /// A document other than a chat room (its text or map) changed because of the server.
    DocumentChanged {
        /// The document.
        doc: String,
    },
    /// The server durably stored this device's changes to `doc` so far.
    Saved {
        /// The document.
        doc: String,
    },
    /// Someone's presence in `doc` changed (`state_json` empty: they left).
    Presence {
        /// The document.
        doc: String,
        /// The server's id of their connection.
        peer: u64,
        /// Their user id.
        user: String,
        /// Their state (JSON text), or nothing when they left.
        state_json: Option<String>,
    },
    /// Someone started or stopped typing in `doc`.
    Typing {
        /// The document.
        doc: String,
        /// The server's id of their connection.
        peer: u64,
        /// Their user id.
        user: String,
        /// Typing now?
        typing: bool,
    },
    /// Something failed: a connection attempt (unreachable, TLS, no token), or a refusal.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// What happened, as one line.
        message: String,
        /// The document concerned, if any.
        doc: Option<String>,
    },
    /// This listener fell behind and missed `missed` events: re-read what it shows.
    Lagged {
        /// How many.
        missed: u64,
    },
}

/// Implemented by the app to receive a session's events. Called on a thread of the
/// subscription's own, one event at a time, in order; return quickly (hop to the UI thread to
/// update it). A listener that throws loses that event only.
#[uniffi::export(with_foreign)]
pub trait EventListener: Send + Sync {
    /// One event.
    fn on_event(&self, event: Event);
}

/// A listener's subscription: [`cancel`](Subscription::cancel) stops the deliveries.
#[derive(uniffi::Object)]
pub struct Subscription {
    cancel: CancellationToken,
}

impl Subscription {
    pub(crate) fn new(cancel: CancellationToken) -> Subscription {
        Subscription { cancel }
    }
}

#[uniffi::export]
impl Subscription {
    /// Stops delivering events (at most the one being delivered still arrives). Never blocks;
    /// safe to call from the listener itself, and more than once.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Whether [`cancel`](Subscription::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// Failures the bindings see before the session does (connection attempts, the token
/// provider), typed, for the listeners.
#[derive(Clone)]
pub(crate) struct Failures(broadcast::Sender<Event>);

impl Failures {
    pub(crate) fn new() -> Failures {
        Failures(broadcast::channel(FAILURE_CAPACITY).0)
    }

    pub(crate) fn report(&self, error: &DriftsyncError, doc: Option<String>) {
        // Nobody listening is fine.
        let _ = self.0.send(Event::Error {
            kind: error.kind(),
            message: error.to_string(),
            doc,
        });
    }
}

/// A connection that tells [`Failures`] when the server refuses it for a reason the app must act
/// on (the token refused, this client too old): by an `Error` frame before the welcome, or by
/// closing with 4001 or 4002. Only the handshake's few small frames are looked at.
pub(crate) struct Watched<T> {
    inner: T,
    failures: Failures,
    handshake: bool,
}

impl<T> Watched<T> {
    pub(crate) fn new(inner: T, failures: Failures) -> Watched<T> {
        Watched {
            inner,
            failures,
            handshake: true,
        }
    }
}

impl<T: Transport> Transport for Watched<T> {
    fn send(&mut self, message: Vec<u8>) -> TransportFuture<'_, driftsync_client::Result<()>> {
        self.inner.send(message)
    }

    fn recv(&mut self) -> TransportFuture<'_, driftsync_client::Result<Incoming>> {
        Box::pin(async move {
            let incoming = self.inner.recv().await?;
            let refused = match &incoming {
                Incoming::Binary(bytes) if self.handshake => match ServerFrame::decode(bytes, DEFAULT_MAX_FRAME_SIZE) {
                    Ok(ServerFrame::Error { code, doc: None, .. }) => {
                        Some((code_kind(code), format!("the server refused: {code:?}")))
                    }
                    _ => {
                        self.handshake = false;
                        None
                    }
                },
                Incoming::Closed(Some(CLOSE_UNAUTHORIZED)) if self.handshake => {
                    Some((ErrorKind::Unauthorized, "the server refused the token".to_string()))
                }
                Incoming::Closed(Some(CLOSE_UNSUPPORTED_VERSION)) => Some((
                    ErrorKind::Protocol,
                    "the server does not support this client's version".to_string(),
                )),
                _ => None,
            };
            if let Some((kind, reason)) = refused {
                // One report per connection.
                self.handshake = false;
                self.failures.report(&DriftsyncError::new(kind, reason), None);
            }
            Ok(incoming)
        })
    }

    fn close(&mut self) -> TransportFuture<'_, ()> {
        self.inner.close()
    }
}

/// Starts delivering `session`'s events to `listener` on a new thread.
pub(crate) fn spawn_pump(
    runtime: &'static tokio::runtime::Runtime,
    session: Session,
    failures: Failures,
    listener: Arc<dyn EventListener>,
    cancel: CancellationToken,
) -> Result<()> {
    // Subscribed here, before the caller gets its handle, so nothing from now on is missed.
    let events = session.events();
    let failed = failures.0.subscribe();
    std::thread::Builder::new()
        .name("driftsync-events".into())
        .spawn(move || {
            let pump = Pump {
                session,
                listener,
                rooms: HashMap::new(),
            };
            runtime.block_on(pump.run(events, failed, cancel));
        })
        .map(|_| ())
        .map_err(|e| DriftsyncError::internal(format!("cannot start the event thread: {e}")))
}

struct Pump {
    session: Session,
    listener: Arc<dyn EventListener>,
    /// The messages of each chat room as last told, to tell what a remote change added.
    rooms: HashMap<String, HashMap<String, ChatMessage>>,
}

impl Pump {
    fn deliver(&self, event: Event) {
        // A foreign exception or a panic in the listener loses this event, not the thread.
        let listener = &self.listener;
        if std::panic::catch_unwind(AssertUnwindSafe(|| listener.on_event(event))).is_err() {
            tracing::warn!("an event listener failed; the event is dropped");
        }
    }

    async fn run(
        mut self,
        mut events: driftsync_client::Events,
        mut failed: broadcast::Receiver<Event>,
        cancel: CancellationToken,
    ) {
        // What the rooms hold now is not news.
        // (The client's lock is released before the rooms are listed, each under it again.)
        let docs = self.session.client().await.documents().await;
        if let Ok(docs) = docs {
            for room in docs.into_iter().filter(|d| is_chat(d)) {
                let messages = self.messages(&room).await;
                self.rooms.insert(room, messages);
            }
        }
        let mut state = self.session.state();
        self.deliver(Event::StateChanged { state: state.into() });
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                event = events.recv() => match event {
                    Some(event) => self.convert(event).await,
                    None => return,
                },
                failure = failed.recv() => match failure {
                    Ok(event) => self.deliver(event),
                    Err(broadcast::error::RecvError::Lagged(missed)) => self.deliver(Event::Lagged { missed }),
                    Err(broadcast::error::RecvError::Closed) => {}
                },
                now = self.session.wait_for(|s| s != state) => {
                    state = now;
                    if cancel.is_cancelled() {
                        return;
                    }
                    self.deliver(Event::StateChanged { state: now.into() });
                    if now == ClientState::Stopped {
                        return;
                    }
                }
            }
        }
    }

    async fn convert(&mut self, event: ClientEvent) {
        match event {
            // The state changes say it.
            ClientEvent::Connected { .. } | ClientEvent::Synced => {}
            ClientEvent::Disconnected { reason, retry_in } => self.deliver(Event::Disconnected {
                reason,
                retry_in_ms: retry_in.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            }),
            ClientEvent::RemoteChange { doc } if is_chat(&doc) => self.chat_changed(&doc).await,
            ClientEvent::RemoteChange { doc } => self.deliver(Event::DocumentChanged { doc }),
            ClientEvent::Acknowledged { doc, .. } => {
                if is_chat(&doc) {
                    // Delivery states changed.
                    self.chat_changed(&doc).await;
                }
                self.deliver(Event::Saved { doc });
            }
            ClientEvent::Presence { doc, peer, user, state } => self.deliver(Event::Presence {
                doc,
                peer,
                user,
                state_json: state,
            }),
            ClientEvent::Typing {
                doc,
                peer,
                user,
                typing,
            } => self.deliver(Event::Typing {
                doc,
                peer,
                user,
                typing,
            }),
            ClientEvent::Error { message, code, doc } => self.deliver(Event::Error {
                kind: code.map(code_kind).unwrap_or(ErrorKind::Refused),
                message,
                doc,
            }),
            ClientEvent::Lagged { missed } => {
                self.deliver(Event::Lagged { missed });
                let rooms: Vec<String> = self.rooms.keys().cloned().collect();
                for room in rooms {
                    self.chat_changed(&room).await;
                }
            }
            // Not followed through this API yet (the inbox and members are in the Rust client
            // library and the CLI).
            ClientEvent::Inbox { .. } | ClientEvent::Members { .. } => {}
        }
    }

    async fn messages(&self, room: &str) -> HashMap<String, ChatMessage> {
        let listed = self.session.client().await.chat_list(room).await;
        match listed {
            Ok(entries) => entries
                .iter()
                .map(|e| (e.message.id.clone(), ChatMessage::from_entry(e)))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, room, "cannot list the room's messages");
                HashMap::new()
            }
        }
    }

    /// Tells what changed in `room` since it was last looked at: messages added, then changed.
    async fn chat_changed(&mut self, room: &str) {
        let listed = self.session.client().await.chat_list(room).await;
        let entries = match listed {
            Ok(entries) => entries,
            Err(e) => {
                let error = DriftsyncError::from(e);
                self.deliver(Event::Error {
                    kind: error.kind(),
                    message: error.to_string(),
                    doc: Some(room.to_string()),
                });
                return;
            }
        };
        let known = self.rooms.remove(room).unwrap_or_default();
        let mut now = HashMap::with_capacity(entries.len());
        for entry in &entries {
            let message = ChatMessage::from_entry(entry);
            match known.get(&message.id) {
                None => self.deliver(Event::MessageAdded {
                    room: room.to_string(),
                    message: message.clone(),
                }),
                Some(before) if *before != message => self.deliver(Event::MessageChanged {
                    room: room.to_string(),
                    message: message.clone(),
                }),
                Some(_) => {}
            }
            now.insert(message.id.clone(), message);
        }
        self.rooms.insert(room.to_string(), now);
    }
}

fn is_chat(doc: &str) -> bool {
    doc.starts_with("chat/")
}
