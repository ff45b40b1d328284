//! The live session: a long-running connection that keeps every known document in sync.
//!
//! [`Session::start`] takes a [`Client`] and spawns one task that owns the WebSocket. The task
//! connects (asking the token source for a token on every attempt, so a refreshed token is used
//! on reconnect), resumes every known document in one round trip, pushes the outbox, then applies
//! live updates and pushes each local change as soon as it is recorded. A lost connection — an
//! error, a close, or no frame for two heartbeats — is retried with [`Backoff`] (exponential, full
//! jitter, capped); a resync close from the server (4000) reconnects at once and resumes.
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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use driftsync_engine::store::Store;
use driftsync_engine::sync::{merge_outbox, Limits};
use driftsync_protocol::{
    ClientFrame, DocId, ErrorCode, ServerFrame, CLOSE_RESYNC, CLOSE_UNAUTHORIZED, CLOSE_UNSUPPORTED_VERSION,
    DEFAULT_MAX_FRAME_SIZE, PROTOCOL_VERSION,
};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Mutex, MutexGuard, Notify};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::sync::push_budget;
use crate::{Backoff, Client, Error, Result};

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
/// How soon a push the server refused for a passing reason is tried again (through a new resume
/// of its document).
const RETRY_REFUSED: Duration = Duration::from_secs(1);

/// A future yielding an access token (or why none could be had).
pub type TokenFuture = Pin<Box<dyn Future<Output = std::result::Result<String, String>> + Send>>;
type TokenFn = Arc<dyn Fn() -> TokenFuture + Send + Sync>;

/// How a session connects.
#[derive(Clone)]
pub struct Options {
    url: String,
    token: TokenFn,
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
    /// Connects to the server at `url` (`ws://host:port`) with an empty token (an open server).
    pub fn new(url: impl Into<String>) -> Options {
        Options {
            url: url.into(),
            token: Arc::new(|| Box::pin(async { Ok(String::new()) })),
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
        let client = Arc::new(Mutex::new(client));
        let (commands, rx) = mpsc::channel(64);
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (state_tx, state) = watch::channel(ConnectionState::Connecting);
        let dirty = Arc::new(Dirty::default());
        let typing = Arc::new(std::sync::Mutex::new(TypingThrottle::default()));
        let task = Task {
            client: client.clone(),
            backoff: options.backoff.clone(),
            subscribed: options.docs.iter().cloned().collect(),
            options,
            commands: rx,
            dirty: dirty.clone(),
            events: events.clone(),
            state: state_tx,
            presence: BTreeMap::new(),
            typing: typing.clone(),
            paused: false,
            nonce: 0,
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

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The background task that owns the connection.
struct Task {
    client: Arc<Mutex<Client>>,
    options: Options,
    backoff: Backoff,
    commands: mpsc::Receiver<Command>,
    dirty: Arc<Dirty>,
    events: broadcast::Sender<Event>,
    state: watch::Sender<ConnectionState>,
    /// Documents followed beyond the stored ones.
    subscribed: BTreeSet<String>,
    /// This device's presence per document, restored after every reconnect.
    presence: BTreeMap<String, Option<String>>,
    typing: Arc<std::sync::Mutex<TypingThrottle>>,
    paused: bool,
    nonce: u64,
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
            Command::Subscribe(doc) => {
                self.subscribed.insert(doc);
            }
            Command::Presence(doc, state) => {
                self.presence.insert(doc, state);
            }
            Command::Pause(done) => {
                self.paused = true;
                let _ = done.send(());
            }
            // Typing is not worth delivering late; shutdown and resume are handled by callers.
            Command::Typing(..) | Command::Resume | Command::Shutdown(_) => {}
        }
    }

    /// Connects and says hello; returns the socket, the session id, the heartbeat interval and
    /// the most bytes of outbox batches one push may merge (see [`push_budget`]).
    async fn connect(&mut self) -> Result<(Ws, u64, Duration, usize)> {
        let token = (self.options.token)()
            .await
            .map_err(|e| Error::Invalid(format!("no token: {e}")))?;
        let endpoint = format!("{}/v1/sync", self.options.url.trim_end_matches('/'));
        let (mut ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(endpoint))
            .await
            .map_err(|_| Error::Timeout(CONNECT_TIMEOUT))??;
        let client_id = self.client.lock().await.identity().client_id;
        let hello = ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            token,
            client_id,
        };
        ws.send(WsMessage::Binary(hello.encode().into())).await?;
        let welcome = tokio::time::timeout(CONNECT_TIMEOUT, async {
            loop {
                match next_frame(&mut ws).await? {
                    Incoming::Frame(ServerFrame::Welcome {
                        session,
                        heartbeat_ms,
                        max_frame_size,
                        ..
                    }) => {
                        return Ok((
                            session,
                            Duration::from_millis(u64::from(heartbeat_ms).max(500)),
                            push_budget(max_frame_size),
                        ))
                    }
                    Incoming::Frame(ServerFrame::Error { code, doc, batch }) => {
                        return Err(Error::Server { code, doc, batch })
                    }
                    Incoming::Frame(other) => {
                        return Err(Error::Protocol(format!("expected a welcome, got {other:?}")));
                    }
                    Incoming::Closed(code) => return Err(closed_error(code)),
                    Incoming::Other => continue,
                }
            }
        })
        .await
        .map_err(|_| Error::Timeout(CONNECT_TIMEOUT))??;
        Ok((ws, welcome.0, welcome.1, welcome.2))
    }

    async fn connection(&mut self) -> Ended {
        let (ws, session, heartbeat, max_push_bytes) = match self.connect().await {
            Ok(connected) => connected,
            Err(error) => {
                return match &error {
                    Error::Server {
                        code: ErrorCode::UnsupportedVersion,
                        ..
                    } => Ended::Fatal(error),
                    _ => Ended::Failed {
                        error,
                        connected: false,
                    },
                }
            }
        };
        self.state.send_replace(ConnectionState::Connected);
        self.emit(Event::Connected { session });
        // Pieces of an answer from an earlier connection belong to no answer of this one.
        self.client.lock().await.reset_parts();
        let mut live = Live {
            ws,
            resumed: HashSet::new(),
            awaiting: HashSet::new(),
            pushed: HashMap::new(),
            unacked: HashMap::new(),
            synced: false,
            was_synced: false,
            retry: BTreeSet::new(),
            retry_at: None,
            limits: Limits::default(),
            max_push_bytes,
        };
        match self.serve(&mut live, heartbeat).await {
            Ok(ended) => ended,
            Err(error) => {
                close(&mut live.ws).await;
                match &error {
                    Error::Server {
                        code: ErrorCode::UnsupportedVersion,
                        ..
                    } => Ended::Fatal(error),
                    // Only a connection that got as far as synced resets the backoff, so a
                    // server that accepts and then drops every connection is not hammered.
                    _ => Ended::Failed {
                        error,
                        connected: live.was_synced,
                    },
                }
            }
        }
    }

    /// Runs one accepted connection until it ends.
    async fn serve(&mut self, live: &mut Live, heartbeat: Duration) -> Result<Ended> {
        // One resume of every known document.
        let mut ids = self.client.lock().await.documents().await?;
        ids.extend(self.subscribed.iter().cloned());
        ids.extend(self.presence.keys().cloned());
        ids.sort();
        ids.dedup();
        self.dirty.take();
        self.resume(live, &ids).await?;
        for (doc, state) in self.presence.clone() {
            if let Ok(doc) = DocId::new(doc) {
                live.send(&ClientFrame::Presence { doc, state }).await?;
            }
        }

        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        let mut last_heard = Instant::now();
        loop {
            self.check_synced(live);
            let typing_deadline = self.typing.lock().ok().and_then(|t| t.next_deadline());
            tokio::select! {
                incoming = next_frame(&mut live.ws) => {
                    last_heard = Instant::now();
                    match incoming? {
                        Incoming::Frame(frame) => self.frame(live, frame).await?,
                        Incoming::Closed(Some(code)) if code == CLOSE_RESYNC => return Ok(Ended::Resync),
                        Incoming::Closed(code) => return Err(closed_error(code)),
                        Incoming::Other => {}
                    }
                }
                _ = self.dirty.notify.notified() => {
                    let docs = self.dirty.take();
                    self.push_changes(live, docs).await?;
                }
                _ = ticker.tick() => {
                    if last_heard.elapsed() > heartbeat * 2 {
                        return Err(Error::Silent(last_heard.elapsed()));
                    }
                    self.nonce += 1;
                    live.send(&ClientFrame::Ping { nonce: self.nonce }).await?;
                }
                _ = sleep_until_opt(live.retry_at) => {
                    live.retry_at = None;
                    let docs: Vec<String> = std::mem::take(&mut live.retry).into_iter().collect();
                    self.resume(live, &docs).await?;
                }
                _ = sleep_until_opt(typing_deadline) => {
                    let expired = self.typing.lock().map(|mut t| t.expired(Instant::now())).unwrap_or_default();
                    for doc in expired {
                        if let Ok(doc) = DocId::new(doc) {
                            live.send(&ClientFrame::Typing { doc, typing: false }).await?;
                        }
                    }
                }
                command = self.commands.recv() => match command {
                    None => {
                        self.flush(live).await;
                        return Ok(Ended::Shutdown);
                    }
                    Some(Command::Shutdown(done)) => {
                        self.flush(live).await;
                        let _ = done.send(());
                        return Ok(Ended::Shutdown);
                    }
                    Some(Command::Pause(done)) => {
                        self.flush(live).await;
                        let _ = done.send(());
                        return Ok(Ended::Paused);
                    }
                    Some(Command::Resume) => {}
                    Some(Command::Subscribe(doc)) => {
                        self.subscribed.insert(doc.clone());
                        if !live.resumed.contains(&doc) && !live.awaiting.contains(&doc) {
                            self.resume(live, &[doc]).await?;
                        }
                    }
                    Some(Command::Presence(doc, state)) => {
                        self.presence.insert(doc.clone(), state.clone());
                        if !live.resumed.contains(&doc) && !live.awaiting.contains(&doc) {
                            self.resume(live, std::slice::from_ref(&doc)).await?;
                        }
                        if let Ok(doc) = DocId::new(doc) {
                            live.send(&ClientFrame::Presence { doc, state }).await?;
                        }
                    }
                    Some(Command::Typing(doc, typing)) => {
                        if live.resumed.contains(&doc) || live.awaiting.contains(&doc) {
                            if let Ok(doc) = DocId::new(doc) {
                                live.send(&ClientFrame::Typing { doc, typing }).await?;
                            }
                        }
                    }
                },
            }
        }
    }

    /// Emits `Synced` when every document is resumed and every push acknowledged.
    fn check_synced(&self, live: &mut Live) {
        let synced = live.awaiting.is_empty() && live.retry.is_empty() && live.unacked.values().all(BTreeSet::is_empty);
        if synced && !live.synced {
            self.state.send_replace(ConnectionState::Synced);
            self.emit(Event::Synced);
        } else if !synced && live.synced {
            self.state.send_replace(ConnectionState::Connected);
        }
        live.synced = synced;
        live.was_synced |= synced;
    }

    /// Sends one resume for `ids`.
    async fn resume(&mut self, live: &mut Live, ids: &[String]) -> Result<()> {
        let request = self.client.lock().await.resume_request(ids).await?;
        if request.is_empty() {
            return Ok(());
        }
        for doc in &request {
            live.awaiting.insert(doc.doc.as_str().to_string());
            live.resumed.remove(doc.doc.as_str());
        }
        live.send(&ClientFrame::Resume { docs: request }).await
    }

    /// Pushes the outbox entries of `docs` not pushed on this connection yet (merged, when
    /// several wait); documents not resumed on it are resumed (their answer pushes the outbox).
    async fn push_changes(&mut self, live: &mut Live, docs: BTreeSet<String>) -> Result<()> {
        let mut resume = Vec::new();
        for id in docs {
            if live.awaiting.contains(&id) || live.retry.contains(&id) {
                continue;
            }
            if !live.resumed.contains(&id) {
                resume.push(id);
                continue;
            }
            let floor = live.pushed.get(&id).copied().unwrap_or(0);
            let outbox = self.client.lock().await.store().outbox(Some(&id)).await?;
            let doc = DocId::new(id.as_str()).map_err(Error::DocId)?;
            let new: Vec<_> = outbox.into_iter().filter(|e| e.batch > floor).collect();
            for entry in merge_outbox(new, live.max_push_bytes)? {
                live.push(&doc, entry.batch, entry.update).await?;
            }
        }
        if !resume.is_empty() {
            self.resume(live, &resume).await?;
        }
        Ok(())
    }

    async fn frame(&mut self, live: &mut Live, frame: ServerFrame) -> Result<()> {
        match frame {
            ServerFrame::Resumed { docs } => {
                for answer in docs {
                    let id = answer.doc.as_str().to_string();
                    let doc = answer.doc.clone();
                    let (changed, pushes) = self
                        .client
                        .lock()
                        .await
                        .take_resumed(answer, &live.limits, live.max_push_bytes)
                        .await?;
                    live.awaiting.remove(&id);
                    live.resumed.insert(id.clone());
                    for (batch, update) in pushes {
                        live.push(&doc, batch, update).await?;
                    }
                    if changed {
                        self.emit(Event::RemoteChange { doc: id });
                    }
                }
            }
            ServerFrame::Update { doc, cursor, update } => {
                let id = doc.as_str().to_string();
                let answered = live.resumed.contains(&id);
                self.client
                    .lock()
                    .await
                    .take_update(&id, cursor, update, answered, &live.limits)
                    .await?;
                self.emit(Event::RemoteChange { doc: id });
            }
            ServerFrame::Ack { doc, batch, cursor } => {
                let id = doc.as_str().to_string();
                let answered = live.resumed.contains(&id);
                self.client.lock().await.take_ack(&id, batch, cursor, answered).await?;
                if let Some(pending) = live.unacked.get_mut(&id) {
                    pending.retain(|&b| b > batch);
                }
                self.emit(Event::Acknowledged { doc: id, batch });
            }
            ServerFrame::Error { code, doc, batch } => {
                let error = Error::Server {
                    code,
                    doc: doc.clone(),
                    batch,
                };
                tracing::info!(%error, "the server refused");
                self.error(&error);
                if code == ErrorCode::TokenExpired {
                    // The token ran out (the server stops delivering and closes the connection
                    // after a short grace): reconnect now, which asks for a fresh token.
                    return Err(error);
                }
                if let Some(doc) = doc {
                    let id = doc.as_str().to_string();
                    if error.is_retryable() {
                        // Resume the document again shortly: the answer shows what the server
                        // has, and the pushes are planned from it (recovering missing parts).
                        if let Some(pending) = live.unacked.get_mut(&id) {
                            pending.clear();
                        }
                        live.pushed.remove(&id);
                        live.resumed.remove(&id);
                        live.retry.insert(id);
                        live.retry_at.get_or_insert(Instant::now() + RETRY_REFUSED);
                    } else if batch.is_none() {
                        // The document itself is refused (forbidden, not found…): stop waiting.
                        live.awaiting.remove(&id);
                    }
                }
            }
            ServerFrame::Presence { doc, peer, user, state } => self.emit(Event::Presence {
                doc: doc.as_str().to_string(),
                peer,
                user,
                state,
            }),
            ServerFrame::Typing {
                doc,
                peer,
                user,
                typing,
            } => self.emit(Event::Typing {
                doc: doc.as_str().to_string(),
                peer,
                user,
                typing,
            }),
            ServerFrame::Ping { nonce } => live.send(&ClientFrame::Pong { nonce }).await?,
            ServerFrame::ResumePart { doc, bytes } => self.client.lock().await.take_part(doc.as_str(), &bytes)?,
            ServerFrame::Pong { .. } | ServerFrame::Welcome { .. } => {}
        }
        Ok(())
    }

    /// Pushes whatever is pending and waits, up to the flush timeout, for the acknowledgements;
    /// then closes the connection cleanly.
    async fn flush(&mut self, live: &mut Live) {
        let docs = self.dirty.take();
        let timeout = self.options.flush_timeout;
        let flushed = async {
            self.push_changes(live, docs).await?;
            loop {
                let pending = !live.awaiting.is_empty() || live.unacked.values().any(|b| !b.is_empty());
                if !pending {
                    return Ok::<(), Error>(());
                }
                match next_frame(&mut live.ws).await? {
                    Incoming::Frame(frame) => self.frame(live, frame).await?,
                    Incoming::Closed(code) => return Err(closed_error(code)),
                    Incoming::Other => {}
                }
            }
        };
        match tokio::time::timeout(timeout, flushed).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::info!(%error, "flush failed; the outbox is kept for the next connection"),
            Err(_) => tracing::info!(?timeout, "flush timed out; the outbox is kept for the next connection"),
        }
        close(&mut live.ws).await;
    }
}

/// One accepted connection's state.
struct Live {
    ws: Ws,
    /// Documents whose resume answer arrived on this connection.
    resumed: HashSet<String>,
    /// Documents resumed on this connection whose answer has not arrived.
    awaiting: HashSet<String>,
    /// The highest batch pushed per document on this connection.
    pushed: HashMap<String, u64>,
    /// Pushed batches not acknowledged yet, per document.
    unacked: HashMap<String, BTreeSet<u64>>,
    synced: bool,
    /// Whether this connection was ever synced.
    was_synced: bool,
    /// Documents to resume again at `retry_at`, after a refusal for a passing reason.
    retry: BTreeSet<String>,
    retry_at: Option<Instant>,
    limits: Limits,
    /// The most bytes of outbox batches merged into one push.
    max_push_bytes: usize,
}

impl Live {
    async fn send(&mut self, frame: &ClientFrame) -> Result<()> {
        self.ws.send(WsMessage::Binary(frame.encode().into())).await?;
        Ok(())
    }

    async fn push(&mut self, doc: &DocId, batch: u64, update: Vec<u8>) -> Result<()> {
        let id = doc.as_str().to_string();
        self.unacked.entry(id.clone()).or_default().insert(batch);
        let pushed = self.pushed.entry(id).or_default();
        *pushed = (*pushed).max(batch);
        self.send(&ClientFrame::Push {
            doc: doc.clone(),
            batch,
            update,
        })
        .await
    }
}

enum Incoming {
    Frame(ServerFrame),
    /// The connection closed (with the close code, if any).
    Closed(Option<u16>),
    /// A control or text message: nothing to do.
    Other,
}

/// Reads the next message. Cancel-safe: it only awaits the stream.
async fn next_frame(ws: &mut Ws) -> Result<Incoming> {
    match ws.next().await {
        Some(Ok(WsMessage::Binary(bytes))) => ServerFrame::decode(&bytes, DEFAULT_MAX_FRAME_SIZE)
            .map(Incoming::Frame)
            .map_err(|e| Error::Protocol(format!("undecodable frame: {e}"))),
        Some(Ok(WsMessage::Close(frame))) => Ok(Incoming::Closed(frame.map(|f| u16::from(f.code)))),
        None => Ok(Incoming::Closed(None)),
        Some(Ok(_)) => Ok(Incoming::Other),
        Some(Err(e)) => Err(e.into()),
    }
}

/// Closes the WebSocket cleanly, without waiting long on a dead peer.
async fn close(ws: &mut Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
}

fn closed_error(code: Option<u16>) -> Error {
    match code {
        Some(c) if c == CLOSE_UNAUTHORIZED => Error::Server {
            code: ErrorCode::Unauthorized,
            doc: None,
            batch: None,
        },
        Some(c) if c == CLOSE_UNSUPPORTED_VERSION => Error::Server {
            code: ErrorCode::UnsupportedVersion,
            doc: None,
            batch: None,
        },
        _ => Error::Closed,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
