//! The live session: a long-running connection that keeps every known document in sync.
//!
//! [`Session::start`] takes a [`Client`] and spawns one task that owns the connection (a
//! WebSocket, or whatever [`Options::connector`] makes). The task connects (asking the token
//! source for a token on every attempt, so a refreshed token is used on reconnect), resumes every
//! known document in one round trip, pushes the outbox, then applies live updates and pushes each
//! local change as soon as it is recorded. A lost connection — an error, a close, or no frame for
//! two heartbeats — is retried with [`Backoff`] (exponential, full jitter, capped); a resync close
//! from the server (4000) reconnects at once and resumes. The protocol itself — handshake,
//! bookkeeping, refusals, heartbeats, when it is synced — is the
//! [`Machine`](crate::machine::Machine)'s, shared with [`Client::sync_once`]; the task does the
//! I/O around it: the transport, timers, commands and events.
//!
//! Local writes go through the session handle (or [`Session::client`] followed by
//! [`Session::changed`]): they are in the store before the call returns, connected or not.
//! Everything that happens is reported on the [`Events`] stream.
//!
//! Mobile lifecycle: call [`Session::pause`] when the app goes to the background (iOS
//! `sceneDidEnterBackground` / `applicationDidEnterBackground`, Android `onStop` or a
//! `ProcessLifecycleOwner` `ON_STOP`): it pushes what is pending, waits a few seconds for the
//! acknowledgements, and closes the connection cleanly, so the OS does not kill a half-open
//! socket and the server drops this device's presence at once. Call [`Session::resume`] when the
//! app comes back (`sceneWillEnterForeground` / `onStart`): it reconnects now, without waiting
//! for a backoff delay, and resumes every document in one round trip. Writes made while paused
//! are stored locally and sent on resume.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use driftsync_protocol::{DocId, ErrorCode};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Mutex, MutexGuard, Notify};
use tokio::time::Instant;

use crate::machine::{Action, End, Machine, MachineOptions};
use crate::sync::{decode, drive, sleep_until_opt};
use crate::transport::{Incoming, Transport, WebSocketTransport};
use crate::{Backoff, Client, Error, Result, Tls};

/// How long connecting and the hello may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many events a slow reader may fall behind before it is told it lagged.
const EVENT_CAPACITY: usize = 1024;
/// Typing is announced at most this often per document while keystrokes continue.
pub const TYPING_THROTTLE: Duration = Duration::from_secs(2);
/// Typing is cleared after this long without a keystroke.
pub const TYPING_TIMEOUT: Duration = Duration::from_secs(4);
/// The longest wait before reconnecting after a resync close.
const RESYNC_JITTER: Duration = Duration::from_millis(250);

/// A future yielding an access token (or why none could be had).
pub type TokenFuture = Pin<Box<dyn Future<Output = std::result::Result<String, String>> + Send>>;
type TokenFn = Arc<dyn Fn() -> TokenFuture + Send + Sync>;
/// A future yielding a connection to a server (or why none could be had).
pub type ConnectFuture = Pin<Box<dyn Future<Output = Result<Box<dyn Transport>>> + Send>>;
type ConnectFn = Arc<dyn Fn(String) -> ConnectFuture + Send + Sync>;

/// How a session connects.
#[derive(Clone)]
pub struct Options {
    url: String,
    token: TokenFn,
    connector: ConnectFn,
    backoff: Backoff,
    flush_timeout: Duration,
    docs: Vec<String>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("url", &self.url)
            .field("backoff", &self.backoff)
            .field("flush_timeout", &self.flush_timeout)
            .field("docs", &self.docs)
            .finish_non_exhaustive()
    }
}

impl Options {
    /// Connects to the server at `url` (`ws://host:port`, or `wss://host:port` trusting Mozilla's
    /// roots; see [`tls`](Options::tls)) with an empty token (an open server).
    pub fn new(url: impl Into<String>) -> Options {
        Options {
            url: url.into(),
            token: Arc::new(|| Box::pin(async { Ok(String::new()) })),
            connector: Arc::new(|url| {
                Box::pin(async move {
                    let transport = WebSocketTransport::connect(&url).await?;
                    Ok(Box::new(transport) as Box<dyn Transport>)
                })
            }),
            backoff: Backoff::default(),
            flush_timeout: Duration::from_secs(5),
            docs: Vec::new(),
        }
    }

    /// Uses this token on every connection.
    pub fn token(mut self, token: impl Into<String>) -> Options {
        let token: String = token.into();
        self.token = Arc::new(move || {
            let token = token.clone();
            Box::pin(async move { Ok(token) })
        });
        self
    }

    /// Asks `refresh` for a token before every connection attempt, so an expired token is
    /// replaced on reconnect. An `Err` counts as a failed attempt and is retried with backoff.
    pub fn token_refresh<F, Fut>(mut self, refresh: F) -> Options
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<String, String>> + Send + 'static,
    {
        self.token = Arc::new(move || Box::pin(refresh()));
        self
    }

    /// Verifies `wss://` servers with `tls` (e.g. [`Tls::with_extra_ca`] for a private CA)
    /// instead of Mozilla's roots alone. Replaces any [`connector`](Options::connector).
    pub fn tls(mut self, tls: Tls) -> Options {
        self.connector = Arc::new(move |url| {
            let tls = tls.clone();
            Box::pin(async move {
                let transport = WebSocketTransport::connect_with(&url, Some(&tls)).await?;
                Ok(Box::new(transport) as Box<dyn Transport>)
            })
        });
        self
    }

    /// Connects with `connect` (given the url) instead of a WebSocket to `{url}/v1/sync`: an
    /// in-memory transport in tests and simulations, say. Called for every connection attempt.
    pub fn connector<F, Fut>(mut self, connect: F) -> Options
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Box<dyn Transport>>> + Send + 'static,
    {
        self.connector = Arc::new(move |url| Box::pin(connect(url)));
        self
    }

    /// The reconnection delays (default: 250 ms doubling up to 30 s, full jitter).
    pub fn backoff(mut self, backoff: Backoff) -> Options {
        self.backoff = backoff;
        self
    }

    /// How long [`Session::pause`] waits for outstanding acknowledgements (default 5 s).
    pub fn flush_timeout(mut self, timeout: Duration) -> Options {
        self.flush_timeout = timeout;
        self
    }

    /// Also follows these documents, even if the store has never seen them.
    pub fn documents<I: IntoIterator<Item = S>, S: Into<String>>(mut self, docs: I) -> Options {
        self.docs.extend(docs.into_iter().map(Into::into));
        self
    }
}

/// Where the session's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connecting (or waiting to reconnect).
    Connecting,
    /// Connected; documents are being resumed or changes await acknowledgement.
    Connected,
    /// Connected, every document resumed and every local change acknowledged.
    Synced,
    /// Paused by the application; local writes are stored and wait for [`Session::resume`].
    Paused,
    /// Stopped for good (shut down, or refused in a way a retry cannot fix).
    Stopped,
}

/// What the session reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A connection was established and accepted; `session` is the server's id for it.
    Connected {
        /// The server's session id.
        session: u64,
    },
    /// The connection ended. `retry_in` is the delay before the next attempt, if one is planned.
    Disconnected {
        /// Why.
        reason: String,
        /// When the next attempt starts.
        retry_in: Option<Duration>,
    },
    /// Every document is resumed and every local change acknowledged by the server.
    Synced,
    /// A document changed because of the server (resume answer or live update).
    RemoteChange {
        /// The document.
        doc: String,
    },
    /// The server durably stored a local batch (and every older one of the document).
    Acknowledged {
        /// The document.
        doc: String,
        /// The batch.
        batch: u64,
    },
    /// Another connection's presence in a document changed (`None`: it left).
    Presence {
        /// The document.
        doc: String,
        /// The server's id of the other connection.
        peer: u64,
        /// The other connection's user.
        user: String,
        /// Its state (JSON) or `None`.
        state: Option<String>,
    },
    /// The user's inbox, or what changed in it (after [`Session::follow_inbox`]): rooms most
    /// recently active first; `more` when further pieces of one answer follow. An app keeping
    /// the inbox asks from `version` next time only once a piece without `more` arrived.
    Inbox {
        /// Ask from this version next time.
        version: u64,
        /// The rooms that changed (`joined: false`: left).
        rooms: Vec<driftsync_protocol::InboxRoom>,
        /// More pieces follow.
        more: bool,
    },
    /// The members of a room, asked for with [`Session::members`].
    Members {
        /// The room.
        room: String,
        /// Its members with their status and last seen.
        members: Vec<driftsync_protocol::RoomMember>,
    },
    /// Another connection started or stopped typing.
    Typing {
        /// The document.
        doc: String,
        /// The server's id of the other connection.
        peer: u64,
        /// Its user.
        user: String,
        /// Typing now?
        typing: bool,
    },
    /// Something failed: a refusal by the server, a bad frame, a store error.
    Error {
        /// What happened, as one line.
        message: String,
        /// The server's code, when the server refused something.
        code: Option<ErrorCode>,
        /// The document concerned, if any.
        doc: Option<String>,
    },
    /// This reader fell behind and missed `missed` events; re-read the state it cares about.
    Lagged {
        /// How many events were missed.
        missed: u64,
    },
}

/// The stream of a session's events. Each [`Session::events`] call makes an independent reader.
#[derive(Debug)]
pub struct Events(broadcast::Receiver<Event>);

impl Events {
    /// The next event; `None` once the session has stopped and every event was read.
    pub async fn recv(&mut self) -> Option<Event> {
        match self.0.recv().await {
            Ok(event) => Some(event),
            Err(broadcast::error::RecvError::Lagged(missed)) => Some(Event::Lagged { missed }),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

enum Command {
    Subscribe(String),
    Presence(String, Option<String>),
    Typing(String, bool),
    Inbox(u64),
    Members(String),
    Pause(oneshot::Sender<()>),
    Resume,
    Shutdown(oneshot::Sender<()>),
}

/// Documents with local changes the task has not looked at yet (bounded by the number of
/// documents), and the wake-up for it.
#[derive(Default)]
struct Dirty {
    docs: std::sync::Mutex<BTreeSet<String>>,
    notify: Notify,
}

impl Dirty {
    fn mark(&self, doc: &str) {
        if let Ok(mut docs) = self.docs.lock() {
            docs.insert(doc.to_string());
        }
        self.notify.notify_one();
    }

    fn take(&self) -> BTreeSet<String> {
        self.docs
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default()
    }
}

/// Throttles typing announcements: while keystrokes keep coming, "typing" is sent at most every
/// [`TYPING_THROTTLE`]; "stopped" is sent [`TYPING_TIMEOUT`] after the last keystroke.
#[derive(Debug, Default)]
struct TypingThrottle {
    /// Per document: when "typing" was last sent and when the last keystroke happened.
    docs: HashMap<String, (Instant, Instant)>,
}

impl TypingThrottle {
    /// A keystroke at `now`: whether to announce "typing".
    fn keystroke(&mut self, doc: &str, now: Instant) -> bool {
        match self.docs.get_mut(doc) {
            Some((sent, last)) => {
                *last = now;
                if now.duration_since(*sent) >= TYPING_THROTTLE {
                    *sent = now;
                    true
                } else {
                    false
                }
            }
            None => {
                self.docs.insert(doc.to_string(), (now, now));
                true
            }
        }
    }

    /// Typing was ended explicitly (message sent): whether "stopped" must be announced.
    fn stop(&mut self, doc: &str) -> bool {
        self.docs.remove(doc).is_some()
    }

    /// Documents whose typing timed out at `now`; they are forgotten.
    fn expired(&mut self, now: Instant) -> Vec<String> {
        let gone: Vec<String> = self
            .docs
            .iter()
            .filter(|(_, (_, last))| now.duration_since(*last) >= TYPING_TIMEOUT)
            .map(|(doc, _)| doc.clone())
            .collect();
        for doc in &gone {
            self.docs.remove(doc);
        }
        gone
    }

    /// When the next timeout is due.
    fn next_deadline(&self) -> Option<Instant> {
        self.docs.values().map(|(_, last)| *last + TYPING_TIMEOUT).min()
    }
}

/// A handle on a live session. Cheap to clone; the session stops when
/// [`shutdown`](Session::shutdown) is called or every handle is dropped.
#[derive(Clone)]
pub struct Session {
    client: Arc<Mutex<Client>>,
    commands: mpsc::Sender<Command>,
    dirty: Arc<Dirty>,
    events: broadcast::Sender<Event>,
    state: watch::Receiver<ConnectionState>,
    typing: Arc<std::sync::Mutex<TypingThrottle>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Starts syncing `client`'s documents with the server in `options`, in a background task.
    /// Must be called inside a tokio runtime.
    pub fn start(client: Client, options: Options) -> Session {
        let (commands, rx) = mpsc::channel(64);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (state_tx, state) = watch::channel(ConnectionState::Connecting);
        let dirty = Arc::new(Dirty::default());
        let typing = Arc::new(std::sync::Mutex::new(TypingThrottle::default()));
        let mut machine = Machine::new(client.identity().client_id, MachineOptions::live());
        for doc in &options.docs {
            // Not connected: the machine only takes note.
            drop(machine.subscribe(doc));
        }
        let client = Arc::new(Mutex::new(client));
        let task = Task {
            client: client.clone(),
            backoff: options.backoff.clone(),
            options,
            commands: rx,
            dirty: dirty.clone(),
            events: events.clone(),
            state: state_tx,
            typing: typing.clone(),
            paused: false,
            machine,
            epoch: Instant::now(),
            sent: 0,
        };
        tokio::spawn(task.run());
        Session {
            client,
            commands,
            dirty,
            events,
            state,
            typing,
        }
    }

    /// A new reader of the session's events (it sees events from now on).
    pub fn events(&self) -> Events {
        Events(self.events.subscribe())
    }

    /// The connection state now.
    pub fn state(&self) -> ConnectionState {
        *self.state.borrow()
    }

    /// Waits until the state satisfies `pick` (e.g. `|s| s == ConnectionState::Synced`).
    pub async fn wait_for(&self, pick: impl Fn(ConnectionState) -> bool) -> ConnectionState {
        let mut state = self.state.clone();
        let reached = match state.wait_for(|s| pick(*s)).await {
            Ok(s) => *s,
            Err(_) => ConnectionState::Stopped,
        };
        reached
    }

    /// The client, for reads and for writes not covered by the handle's own methods. After a
    /// write through it, call [`changed`](Session::changed) so the change is pushed now.
    pub async fn client(&self) -> MutexGuard<'_, Client> {
        self.client.lock().await
    }

    /// Tells the session that `doc` has new local changes in the store; they are pushed at
    /// once when connected (and on the next connection otherwise).
    pub fn changed(&self, doc: &str) {
        self.dirty.mark(doc);
    }

    async fn command(&self, command: Command) -> Result<()> {
        self.commands.send(command).await.map_err(|_| Error::Stopped)
    }

    /// Follows `doc` (resumes it now if connected) even before any change is made to it.
    pub async fn subscribe(&self, doc: &str) -> Result<()> {
        DocId::new(doc).map_err(Error::DocId)?;
        self.client().await.document(doc).await?;
        self.command(Command::Subscribe(doc.to_string())).await
    }

    /// Sets (or with `None`, clears) this device's presence in `doc`: a JSON value. It is sent
    /// again after every reconnect, and removed by the server when the connection ends.
    pub async fn set_presence(&self, doc: &str, state: Option<String>) -> Result<()> {
        DocId::new(doc).map_err(Error::DocId)?;
        self.command(Command::Presence(doc.to_string(), state)).await
    }

    /// Follows the user's inbox from index version `since` (0: all of it): [`Event::Inbox`]
    /// brings it, then every change while connected; after a reconnect, what changed since the
    /// last version received.
    pub async fn follow_inbox(&self, since: u64) -> Result<()> {
        self.command(Command::Inbox(since)).await
    }

    /// Asks for the members of a chat room with their status and when they were last seen
    /// ([`Event::Members`]; best asked once the room is subscribed).
    pub async fn members(&self, room: &str) -> Result<()> {
        self.command(Command::Members(room.to_string())).await
    }

    /// Call on every keystroke in `doc`'s editor: "typing" is announced at most every
    /// [`TYPING_THROTTLE`] and cleared [`TYPING_TIMEOUT`] after the last keystroke.
    pub async fn keystroke(&self, doc: &str) -> Result<()> {
        let announce = match self.typing.lock() {
            Ok(mut t) => t.keystroke(doc, Instant::now()),
            Err(_) => false,
        };
        if announce {
            self.command(Command::Typing(doc.to_string(), true)).await?;
        }
        Ok(())
    }

    /// Ends typing in `doc` now (e.g. the message was sent).
    pub async fn stop_typing(&self, doc: &str) -> Result<()> {
        let announce = self.typing.lock().map(|mut t| t.stop(doc)).unwrap_or(false);
        if announce {
            self.command(Command::Typing(doc.to_string(), false)).await?;
        }
        Ok(())
    }

    /// The app goes to the background: pushes what is pending, waits (up to the flush timeout)
    /// for the acknowledgements, closes the connection cleanly and stays offline until
    /// [`resume`](Session::resume). Local writes keep working meanwhile.
    pub async fn pause(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Pause(tx)).await?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// The app is back: reconnects now (skipping any backoff delay) and resumes every document.
    pub async fn resume(&self) -> Result<()> {
        self.command(Command::Resume).await
    }

    /// Flushes like [`pause`](Session::pause), closes, and stops the session for good.
    pub async fn shutdown(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Shutdown(tx)).await?;
        rx.await.map_err(|_| Error::Stopped)
    }

    // ----- local writes: stored first, then pushed -----

    /// Inserts text (see [`Client::text_insert`]).
    pub async fn text_insert(&self, doc: &str, pos: u32, text: &str) -> Result<()> {
        self.client().await.text_insert(doc, pos, text).await?;
        self.changed(doc);
        Ok(())
    }

    /// Appends text (see [`Client::text_append`]).
    pub async fn text_append(&self, doc: &str, text: &str) -> Result<()> {
        self.client().await.text_append(doc, text).await?;
        self.changed(doc);
        Ok(())
    }

    /// Deletes text (see [`Client::text_delete`]).
    pub async fn text_delete(&self, doc: &str, pos: u32, len: u32) -> Result<()> {
        self.client().await.text_delete(doc, pos, len).await?;
        self.changed(doc);
        Ok(())
    }

    /// Sets a key of the document's root map (see [`Client::map_set`]).
    pub async fn map_set(&self, doc: &str, key: &str, value: serde_json::Value) -> Result<()> {
        self.client().await.map_set(doc, key, value).await?;
        self.changed(doc);
        Ok(())
    }

    /// Removes a key of the document's root map (see [`Client::map_remove`]).
    pub async fn map_remove(&self, doc: &str, key: &str) -> Result<()> {
        self.client().await.map_remove(doc, key).await?;
        self.changed(doc);
        Ok(())
    }

    /// Sends a chat message and returns its id at once (see [`Client::chat_send`]); typing in the
    /// room ends.
    pub async fn chat_send(&self, room: &str, text: &str) -> Result<String> {
        let id = self.client().await.chat_send(room, text).await?;
        self.changed(room);
        self.stop_typing(room).await?;
        Ok(id)
    }

    /// Sends a message with a kind, metadata, attachments or a reply (see
    /// [`Client::chat_send_message`]); typing in the room ends.
    pub async fn chat_send_message(&self, room: &str, message: &driftsync_engine::chat::NewMessage) -> Result<String> {
        let id = self.client().await.chat_send_message(room, message).await?;
        self.changed(room);
        self.stop_typing(room).await?;
        Ok(id)
    }

    /// Adds or takes back this user's reaction to a message (see [`Client::chat_react`]).
    pub async fn chat_react(&self, room: &str, id: &str, reaction: &str, add: bool) -> Result<bool> {
        let changed = self.client().await.chat_react(room, id, reaction, add).await?;
        if changed {
            self.changed(room);
        }
        Ok(changed)
    }

    /// Joins a chat room (see [`Client::chat_join`]).
    pub async fn chat_join(&self, room: &str) -> Result<bool> {
        let changed = self.client().await.chat_join(room).await?;
        if changed {
            self.changed(room);
        }
        Ok(changed)
    }

    /// Leaves a chat room (see [`Client::chat_leave`]).
    pub async fn chat_leave(&self, room: &str) -> Result<bool> {
        let changed = self.client().await.chat_leave(room).await?;
        if changed {
            self.changed(room);
        }
        Ok(changed)
    }

    /// Edits one of this user's messages (see [`Client::chat_edit`]).
    pub async fn chat_edit(&self, room: &str, id: &str, text: &str) -> Result<()> {
        self.client().await.chat_edit(room, id, text).await?;
        self.changed(room);
        Ok(())
    }

    /// Deletes one of this user's messages (see [`Client::chat_delete`]).
    pub async fn chat_delete(&self, room: &str, id: &str) -> Result<()> {
        self.client().await.chat_delete(room, id).await?;
        self.changed(room);
        Ok(())
    }

    /// Marks the room read (see [`Client::chat_mark_read`]).
    pub async fn chat_mark_read(&self, room: &str, id: Option<&str>) -> Result<Option<String>> {
        let marked = self.client().await.chat_mark_read(room, id).await?;
        self.changed(room);
        Ok(marked)
    }
}

/// How one connection ended.
enum Ended {
    /// Shut down by the application.
    Shutdown,
    /// Paused by the application.
    Paused,
    /// The server asked for a resync (close 4000): reconnect at once.
    Resync,
    /// Failed; `connected` says whether the connection got as far as synced.
    Failed { error: Error, connected: bool },
    /// Refused in a way a retry cannot fix.
    Fatal(Error),
}

impl Ended {
    /// A connection that failed with `error`.
    fn failed(error: Error, connected: bool) -> Ended {
        match &error {
            Error::Server {
                code: ErrorCode::UnsupportedVersion,
                ..
            } => Ended::Fatal(error),
            // Only a connection that got as far as synced resets the backoff, so a server that
            // accepts and then drops every connection is not hammered.
            _ => Ended::Failed { error, connected },
        }
    }
}

/// The background task that owns the connection: the I/O around the [`Machine`] — the
/// transport, timers, commands and events. Every protocol decision is the machine's.
struct Task {
    client: Arc<Mutex<Client>>,
    options: Options,
    backoff: Backoff,
    commands: mpsc::Receiver<Command>,
    dirty: Arc<Dirty>,
    events: broadcast::Sender<Event>,
    state: watch::Sender<ConnectionState>,
    typing: Arc<std::sync::Mutex<TypingThrottle>>,
    paused: bool,
    /// The protocol state machine (live mode); it keeps the documents followed and the presence
    /// across connections.
    machine: Machine,
    /// The machine's time zero.
    epoch: Instant,
    /// Bytes of frames sent (counted by the driver; not reported).
    sent: u64,
}

impl Task {
    fn emit(&self, event: Event) {
        // No reader is not an error: events are for whoever listens.
        let _ = self.events.send(event);
    }

    fn error(&self, error: &Error) {
        let (code, doc) = match error {
            Error::Server { code, doc, .. } => (Some(*code), doc.as_ref().map(|d| d.as_str().to_string())),
            _ => (None, None),
        };
        self.emit(Event::Error {
            message: error.to_string(),
            code,
            doc,
        });
    }

    /// The machine's clock.
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    async fn run(mut self) {
        loop {
            if self.paused {
                self.state.send_replace(ConnectionState::Paused);
                match self.commands.recv().await {
                    None => break,
                    Some(Command::Resume) => {
                        self.paused = false;
                        self.backoff.reset();
                    }
                    Some(Command::Shutdown(done)) => {
                        let _ = done.send(());
                        break;
                    }
                    Some(other) => self.note(other),
                }
                continue;
            }
            self.state.send_replace(ConnectionState::Connecting);
            let ended = self.connection().await;
            self.machine.disconnected();
            // Offline from here on: readers of the state must not see the old connection's.
            self.state.send_replace(ConnectionState::Connecting);
            let delay = match ended {
                Ended::Shutdown => break,
                Ended::Paused => {
                    self.paused = true;
                    self.emit(Event::Disconnected {
                        reason: "paused".into(),
                        retry_in: None,
                    });
                    continue;
                }
                Ended::Resync => {
                    // Not a failure: reconnect almost at once (a little jitter spreads the
                    // clients of a server that shed many at the same moment).
                    self.backoff.reset();
                    let delay = Backoff::new(RESYNC_JITTER, RESYNC_JITTER).next_delay();
                    self.emit(Event::Disconnected {
                        reason: "the server asked for a resync".into(),
                        retry_in: Some(delay),
                    });
                    delay
                }
                Ended::Failed { error, connected } => {
                    if connected {
                        self.backoff.reset();
                    }
                    let delay = self.backoff.next_delay();
                    tracing::debug!(%error, ?delay, "connection lost; retrying");
                    self.emit(Event::Disconnected {
                        reason: error.to_string(),
                        retry_in: Some(delay),
                    });
                    delay
                }
                Ended::Fatal(error) => {
                    tracing::warn!(%error, "session stopped");
                    self.error(&error);
                    self.emit(Event::Disconnected {
                        reason: error.to_string(),
                        retry_in: None,
                    });
                    break;
                }
            };
            if !self.wait(delay).await {
                break;
            }
        }
        self.state.send_replace(ConnectionState::Stopped);
    }

    /// Sleeps `delay` before the next attempt, handling commands meanwhile. Returns false when
    /// the session must stop.
    async fn wait(&mut self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return true,
                command = self.commands.recv() => match command {
                    None => return false,
                    Some(Command::Resume) => {
                        self.backoff.reset();
                        return true;
                    }
                    Some(Command::Shutdown(done)) => {
                        let _ = done.send(());
                        return false;
                    }
                    Some(Command::Pause(done)) => {
                        self.paused = true;
                        let _ = done.send(());
                        return true;
                    }
                    Some(other) => self.note(other),
                },
            }
        }
    }

    /// Remembers what a command asks for while there is no connection.
    fn note(&mut self, command: Command) {
        match command {
            // Without a connection the machine only takes note: no actions.
            Command::Subscribe(doc) => drop(self.machine.subscribe(&doc)),
            Command::Presence(doc, state) => drop(self.machine.presence(&doc, state)),
            Command::Inbox(since) => drop(self.machine.follow_inbox(since)),
            Command::Pause(done) => {
                self.paused = true;
                let _ = done.send(());
            }
            // Typing is not worth delivering late; shutdown and resume are handled by callers.
            Command::Typing(..) | Command::Members(_) | Command::Resume | Command::Shutdown(_) => {}
        }
    }

    /// Asks for a token and connects; returns the transport and the token.
    async fn connect(&mut self) -> Result<(Box<dyn Transport>, String)> {
        let token = (self.options.token)()
            .await
            .map_err(|e| Error::Invalid(format!("no token: {e}")))?;
        let transport = tokio::time::timeout(CONNECT_TIMEOUT, (self.options.connector)(self.options.url.clone()))
            .await
            .map_err(|_| Error::Timeout(CONNECT_TIMEOUT))??;
        Ok((transport, token))
    }

    /// Performs the machine's `actions` (see [`drive`]); the connection state follows the
    /// events, set before each is sent.
    async fn perform(&mut self, transport: &mut dyn Transport, actions: Vec<Action>) -> Result<Option<End>> {
        let (state, events) = (&self.state, &self.events);
        let mut emit = |event: Event| {
            match event {
                Event::Connected { .. } => {
                    state.send_replace(ConnectionState::Connected);
                }
                Event::Synced => {
                    state.send_replace(ConnectionState::Synced);
                }
                _ => {}
            }
            let _ = events.send(event);
        };
        let end = drive(
            &self.client,
            &mut self.machine,
            transport,
            actions,
            &mut self.sent,
            &mut emit,
        )
        .await?;
        if self.machine.is_connected() && !self.machine.is_synced() {
            self.state.send_if_modified(|s| {
                let unsynced = *s == ConnectionState::Synced;
                if unsynced {
                    *s = ConnectionState::Connected;
                }
                unsynced
            });
        }
        Ok(end)
    }

    async fn connection(&mut self) -> Ended {
        let (mut transport, token) = match self.connect().await {
            Ok(connected) => connected,
            Err(error) => return Ended::failed(error, false),
        };
        // Changes recorded from here on are pushed by the first resume or marked again.
        self.dirty.take();
        let actions = self.machine.connected(token, self.now());
        let ended = match self.serve(&mut *transport, actions).await {
            Ok(ended) => ended,
            Err(error) => Ended::failed(error, self.machine.was_synced()),
        };
        if !matches!(ended, Ended::Shutdown | Ended::Paused) {
            transport.close().await;
        }
        ended
    }

    /// Runs one connection until it ends.
    async fn serve(&mut self, transport: &mut dyn Transport, mut actions: Vec<Action>) -> Result<Ended> {
        loop {
            match self.perform(transport, actions).await? {
                None => {}
                Some(End::Resync) => return Ok(Ended::Resync),
                Some(End::Done) => return Err(Error::Closed),
                Some(End::Failed(error)) => return Err(error),
            }
            let deadline = self.machine.next_deadline().map(|d| self.epoch + d);
            let typing_deadline = self.typing.lock().ok().and_then(|t| t.next_deadline());
            actions = tokio::select! {
                incoming = transport.recv() => match incoming? {
                    Incoming::Binary(bytes) => {
                        let (frame, now) = (decode(&bytes)?, self.now());
                        self.machine.receive(frame, now)
                    }
                    Incoming::Closed(code) => self.machine.closed(code),
                },
                _ = self.dirty.notify.notified() => {
                    let docs = self.dirty.take();
                    self.machine.local_changes(docs)
                }
                () = sleep_until_opt(deadline) => {
                    let now = self.now();
                    self.machine.tick(now)
                }
                () = sleep_until_opt(typing_deadline) => {
                    let expired = self.typing.lock().map(|mut t| t.expired(Instant::now())).unwrap_or_default();
                    expired.iter().flat_map(|doc| self.machine.typing(doc, false)).collect()
                }
                command = self.commands.recv() => match command {
                    None => {
                        self.flush(transport).await;
                        return Ok(Ended::Shutdown);
                    }
                    Some(Command::Shutdown(done)) => {
                        self.flush(transport).await;
                        let _ = done.send(());
                        return Ok(Ended::Shutdown);
                    }
                    Some(Command::Pause(done)) => {
                        self.flush(transport).await;
                        let _ = done.send(());
                        return Ok(Ended::Paused);
                    }
                    Some(Command::Resume) => Vec::new(),
                    Some(Command::Subscribe(doc)) => self.machine.subscribe(&doc),
                    Some(Command::Presence(doc, state)) => self.machine.presence(&doc, state),
                    Some(Command::Typing(doc, typing)) => self.machine.typing(&doc, typing),
                    Some(Command::Inbox(since)) => self.machine.follow_inbox(since),
                    Some(Command::Members(room)) => self.machine.members(&room),
                },
            };
        }
    }

    /// Pushes whatever is pending and waits, up to the flush timeout, for the answers and
    /// acknowledgements; then closes the connection cleanly.
    async fn flush(&mut self, transport: &mut dyn Transport) {
        let timeout = self.options.flush_timeout;
        let flushed = async {
            let docs = self.dirty.take();
            let mut actions = self.machine.local_changes(docs);
            loop {
                match self.perform(transport, actions).await? {
                    None => {}
                    Some(End::Failed(error)) => return Err(error),
                    Some(End::Resync | End::Done) => return Err(Error::Closed),
                }
                if !self.machine.pending() {
                    return Ok::<(), Error>(());
                }
                actions = match transport.recv().await? {
                    Incoming::Binary(bytes) => {
                        let (frame, now) = (decode(&bytes)?, self.now());
                        self.machine.receive(frame, now)
                    }
                    Incoming::Closed(code) => self.machine.closed(code),
                };
            }
        };
        match tokio::time::timeout(timeout, flushed).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::info!(%error, "flush failed; the outbox is kept for the next connection"),
            Err(_) => tracing::info!(?timeout, "flush timed out; the outbox is kept for the next connection"),
        }
        transport.close().await;
    }
}

#[cfg(test)]
mod tests {
    use driftsync_protocol::{ClientFrame, DocResumed, ServerFrame, DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION};

    use super::*;
    use crate::MemoryTransport;

    const WAIT: Duration = Duration::from_secs(10);

    async fn recv(server: &mut MemoryTransport) -> ClientFrame {
        match tokio::time::timeout(WAIT, server.recv()).await.unwrap().unwrap() {
            Incoming::Binary(bytes) => ClientFrame::decode(&bytes, DEFAULT_MAX_FRAME_SIZE).unwrap(),
            Incoming::Closed(code) => panic!("closed ({code:?})"),
        }
    }

    async fn send(server: &mut MemoryTransport, frame: ServerFrame) {
        server.send(frame.encode()).await.unwrap();
    }

    async fn until(events: &mut Events, pick: impl Fn(&Event) -> bool) {
        tokio::time::timeout(WAIT, async {
            while let Some(event) = events.recv().await {
                if pick(&event) {
                    return;
                }
            }
            panic!("the session stopped");
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_session_over_memory_carries_on_past_a_forbidden_document() {
        let dir = tempfile::tempdir().unwrap();
        let mut client = Client::open(dir.path().join("c.db"), "ada").await.unwrap();
        client.text_append("secret/1", "hidden").await.unwrap();
        let (ends_tx, mut ends) = mpsc::channel::<MemoryTransport>(4);
        let options = Options::new("memory:").documents(["notes/1"]).connector(move |_url| {
            let ends_tx = ends_tx.clone();
            async move {
                let (near, far) = MemoryTransport::pair();
                ends_tx.send(far).await.map_err(|_| Error::Closed)?;
                Ok(Box::new(near) as Box<dyn Transport>)
            }
        });
        let session = Session::start(client, options);
        let mut events = session.events();
        let mut server = tokio::time::timeout(WAIT, ends.recv()).await.unwrap().unwrap();
        assert!(matches!(recv(&mut server).await, ClientFrame::Hello { .. }));
        send(
            &mut server,
            ServerFrame::Welcome {
                version: PROTOCOL_VERSION,
                max_frame_size: DEFAULT_MAX_FRAME_SIZE as u32,
                session: 3,
                heartbeat_ms: 15_000,
            },
        )
        .await;
        let ClientFrame::Resume { docs } = recv(&mut server).await else {
            panic!("expected a resume")
        };
        let names: Vec<&str> = docs.iter().map(|d| d.doc.as_str()).collect();
        assert_eq!(names, ["notes/1", "secret/1"]);
        let (notes, secret) = (docs[0].doc.clone(), docs[1].doc.clone());
        send(
            &mut server,
            ServerFrame::Error {
                code: ErrorCode::Forbidden,
                doc: Some(secret),
                batch: None,
            },
        )
        .await;
        send(
            &mut server,
            ServerFrame::Resumed {
                docs: vec![DocResumed {
                    doc: notes.clone(),
                    cursor: 0,
                    update: None,
                    state_vector: None,
                }],
            },
        )
        .await;
        until(&mut events, |e| *e == Event::Synced).await;
        assert_eq!(session.state(), ConnectionState::Synced);

        // A local change goes up at once and is synced once acknowledged.
        session.text_append("notes/1", "x").await.unwrap();
        let ClientFrame::Push { doc, batch, .. } = recv(&mut server).await else {
            panic!("expected a push")
        };
        assert_eq!(doc, notes);
        send(&mut server, ServerFrame::Ack { doc, batch, cursor: 1 }).await;
        until(&mut events, |e| *e == Event::Synced).await;
        // Shutting down flushes (nothing is pending) and closes the connection.
        session.shutdown().await.unwrap();
        assert_eq!(server.recv().await.unwrap(), Incoming::Closed(None));
        let stopped = tokio::time::timeout(WAIT, session.wait_for(|s| s == ConnectionState::Stopped));
        assert_eq!(stopped.await.unwrap(), ConnectionState::Stopped);
    }

    #[test]
    fn typing_is_throttled_and_times_out() {
        let mut t = TypingThrottle::default();
        let start = Instant::now();
        assert!(t.keystroke("d", start), "the first keystroke announces typing");
        assert!(!t.keystroke("d", start + Duration::from_millis(500)));
        assert!(!t.keystroke("d", start + Duration::from_millis(1900)));
        assert!(
            t.keystroke("d", start + TYPING_THROTTLE),
            "re-announced after the throttle"
        );
        let last = start + TYPING_THROTTLE;
        assert_eq!(t.next_deadline(), Some(last + TYPING_TIMEOUT));
        assert!(t.expired(last + TYPING_TIMEOUT - Duration::from_millis(1)).is_empty());
        assert_eq!(t.expired(last + TYPING_TIMEOUT), vec!["d".to_string()]);
        assert_eq!(t.next_deadline(), None);
        assert!(!t.stop("d"), "already cleared");
        assert!(t.keystroke("d", last + Duration::from_secs(10)));
        assert!(t.stop("d"), "an explicit stop is announced once");
    }
}
