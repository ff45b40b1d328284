//! The connection driver: the one place a connection's I/O happens, whatever its protocol.
//!
//! It runs a [`Handler`] on an upgraded socket: starts the writer, reads messages (pings
//! answered and control frames counted by the socket), applies the rate limit, keeps the
//! heartbeat (a peer silent for three intervals is closed), fires the handler's timers (hello
//! deadline, token expiry), carries the handler's requests to the rooms and brings the replies
//! back, paces answers by the peer's reading, and when the connection ends — the peer left, a
//! handler or room closed it, or the server shuts down (the connection's token is a child of
//! the server's) — leaves every room it joined and lets the writer flush.
//!
//! Pushes are pipelined: the driver starts a push (validated, applied, broadcast and queued for
//! its commit by the room) and goes on reading while the commit is in flight; replies come back
//! to the handler in the order the pushes were made. At most [`MAX_PUSHES_IN_FLIGHT`] per
//! connection: beyond, the driver stops reading until the oldest settles.

use std::sync::Arc;
use std::time::Duration;

use driftsync_engine::store::Store;
use driftsync_protocol::CLOSE_PROTOCOL_ERROR;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;

use crate::event::{ConnCtl, Outbound, Outgoing};
use crate::handler::{Action, Actions, Handler, Now, Reply, Request};
use crate::instance::Shared;
use crate::limits::Limiter;
use crate::room::Pusher;
use crate::socket::{next_incoming, Incoming, Reader, Socket, DRAIN_BYTES, DRAIN_TIME};

/// The most pushes of one connection whose commits may be in flight at once.
pub(crate) const MAX_PUSHES_IN_FLIGHT: usize = 64;

/// Runs one connection with `handler` until it ends.
pub(crate) async fn run<S: Store, H: Handler>(shared: Arc<Shared<S>>, socket: Socket, handler: impl FnOnce(u64) -> H) {
    let ctl = Arc::new(ConnCtl::new(shared.shutdown.child_token(), Arc::clone(&shared.metrics)));
    let (stream, out, writer) = socket.start(&shared.tasks, shared.config.outbound_queue, ctl, H::CODEC);
    out.tx.set_max_bytes(shared.config.outbound_queue_bytes);
    let session = shared.next_session();
    let now = Instant::now();
    let mut conn = Conn {
        shared: &shared,
        store: &*shared.store,
        out,
        stream,
        session,
        limiter: Limiter::new(&shared.config.rate_limit, &shared.config.room_opens, now),
        actions: Actions::new(),
        pushes: None,
        inbox: None,
    };
    let mut handler = handler(session);
    // Not boxed: the loop's future holds no store query or room future inline (those are
    // boxed where they are awaited), so it is small, and one allocation less per connection.
    conn.serve(&mut handler).await;
    // Pushes whose commits are in flight still get their acknowledgements, if they come soon
    // (the writer flushes what is queued when the connection closes, unless told to resync).
    let _ = tokio::time::timeout(FINISH_PUSHES, conn.finish_pushes(&mut handler)).await;
    for doc in handler.subscriptions() {
        shared.rooms.get(&doc).leave(session).await;
    }
    if let Some((user, _)) = conn.inbox.take() {
        shared.rooms.ctx().inboxes.unfollow(&user, session);
    }
    if let Some(user) = handler.identity() {
        // "Last seen": when the user's connection ended (kept across instances in the store).
        let seen = [(user.to_string(), crate::presence::unix_ms())];
        if let Err(e) = Box::pin(shared.store.set_seen(&seen)).await {
            tracing::warn!(error = %e, "could not record when a user was last seen");
        }
    }
    conn.out.ctl.close(driftsync_protocol::CLOSE_GOING_AWAY);
    let Conn { out, mut stream, .. } = conn;
    // The reader holds a handle to the queue too (for pongs).
    drop(out);
    let _ = writer.await;
    // Not at shutdown: the process is about to go, and closing fast matters more then.
    if !shared.shutdown.is_cancelled() {
        stream.drain(DRAIN_BYTES, DRAIN_TIME).await;
    }
}

/// One connection, while it runs.
struct Conn<'a, S> {
    shared: &'a Shared<S>,
    store: &'a S,
    out: Outbound,
    stream: Reader,
    session: u64,
    limiter: Limiter,
    /// What the handler asked for and the driver has not done yet.
    actions: Actions,
    /// Pushes whose commits are in flight, in the order they were made (`None` while there are
    /// none: an idle connection keeps no queue).
    pushes: Option<FuturesOrdered<BoxFuture<'a, Reply>>>,
    /// The inbox the connection follows: its user, and what wakes it when it may have changed.
    inbox: Option<(String, Arc<tokio::sync::Notify>)>,
}

/// How long a closing connection waits for the commits of its pushes in flight.
const FINISH_PUSHES: Duration = Duration::from_secs(2);

impl<'a, S: Store> Conn<'a, S> {
    /// Passes the outcomes of the pushes in flight to the handler and queues the frames it
    /// answers them with; nothing else is done any more.
    async fn finish_pushes<H: Handler>(&mut self, handler: &mut H) {
        while let Some(reply) = self.next_push().await {
            handler.reply(reply, Now::read(), &mut self.actions);
            for action in self.actions.drain(..) {
                if let Action::Send(bytes) = action {
                    self.out.frame(bytes);
                }
            }
        }
    }

    async fn serve<H: Handler>(&mut self, handler: &mut H) {
        let heartbeat = self.shared.config.heartbeat;
        // The first tick one interval from now. (`interval` + a first `tick().await` cost every
        // new connection up to a millisecond: an elapsed deadline still waits for the timer
        // wheel's next tick, and the first message was read only after it.)
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        let mut last_heard = Instant::now();
        handler.start(Now::read(), &mut self.actions);
        if !self.act(handler).await {
            return;
        }
        // The handler's timer, re-armed only when its deadline changes.
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        loop {
            let deadline = handler.deadline();
            if deadline != armed {
                if let Some(deadline) = deadline {
                    timer.as_mut().reset(deadline);
                }
                armed = deadline;
            }
            let in_flight = self.pushes.as_ref().map_or(0, FuturesOrdered::len);
            tokio::select! {
                biased;
                () = self.out.ctl.token.cancelled() => return,
                Some(reply) = next_of(&mut self.pushes), if in_flight > 0 => {
                    if self.pushes.as_ref().is_some_and(FuturesOrdered::is_empty) {
                        self.pushes = None;
                    }
                    handler.reply(reply, Now::read(), &mut self.actions);
                }
                () = &mut timer, if armed.is_some() => {
                    armed = None;
                    handler.timer(Now::read(), &mut self.actions);
                }
                _ = ticker.tick() => {
                    if last_heard.elapsed() > heartbeat * 3 {
                        tracing::info!(session = self.session, "peer silent for three heartbeats: closing");
                        return;
                    }
                    handler.heartbeat(&mut self.actions);
                }
                incoming = next_incoming(&mut self.stream), if in_flight < MAX_PUSHES_IN_FLIGHT => {
                    let Some(incoming) = incoming else { return };
                    // Any message, a pong included, shows the peer is alive.
                    last_heard = Instant::now();
                    self.limiter.charge_uncounted(self.stream.take_uncounted(), last_heard);
                    let Incoming::Binary(bytes) = incoming else { continue };
                    if self.limiter.allow(bytes.len(), last_heard) {
                        handler.message(bytes, Now::read(), &mut self.actions);
                    } else {
                        tracing::debug!(session = self.session, "rate limited");
                        handler.rate_limited(bytes, &mut self.actions);
                    }
                }
                // After the peer's messages (the select is biased): wake-ups, however frequent,
                // never keep the connection from being read. The handler reads the inbox at
                // most every `INBOX_READ_EVERY` (native.rs).
                () = inbox_changed(&self.inbox), if self.inbox.is_some() => {
                    handler.inbox_changed(Now::read(), &mut self.actions);
                }
            }
            if !self.act(handler).await {
                return;
            }
        }
    }

    /// The outcome of the oldest push in flight.
    async fn next_push(&mut self) -> Option<Reply> {
        next_of(&mut self.pushes).await
    }

    /// Carries out the handler's actions, feeding replies back, until none is left. Returns
    /// false when the connection is closing.
    async fn act<H: Handler>(&mut self, handler: &mut H) -> bool {
        let patience = self.shared.config.heartbeat * 3;
        while let Some(action) = self.actions.pop_front() {
            match action {
                Action::Send(bytes) => {
                    self.out.frame(bytes);
                }
                Action::Answer { bytes, charge } => {
                    if charge {
                        self.limiter.charge(bytes.len(), Instant::now());
                    }
                    if !self.out.answer(bytes, patience).await {
                        return false;
                    }
                }
                Action::Ping => {
                    self.out.send(Outgoing::Ping);
                }
                Action::FrameLimit(size) => self.stream.set_max_size(size),
                Action::ChargeReload(cost) => {
                    if !self.limiter.pay_reload(cost, Instant::now()) {
                        tracing::info!(
                            session = self.session,
                            "too many refused updates costing reloads: closing"
                        );
                        self.out.ctl.close(CLOSE_PROTOCOL_ERROR);
                        return false;
                    }
                }
                Action::Close(code) => {
                    self.out.ctl.close(code);
                    return false;
                }
                Action::Addresses { doc, addresses } => {
                    let mut table = self
                        .out
                        .ctl
                        .addresses
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if addresses.is_empty() {
                        table.remove(&doc);
                    } else {
                        table.insert(doc, addresses);
                    }
                }
                Action::Request(Request::Push {
                    doc,
                    origin,
                    update,
                    skip_redundant,
                    tag,
                }) => {
                    let room = self.shared.rooms.get(&doc);
                    let pusher = Pusher {
                        session: self.session,
                        user: handler.identity(),
                        origin,
                    };
                    // Boxed, as every future that may query the store: a connection's task is
                    // allocated at the size of its largest await, for its whole life, and the
                    // store's futures are large.
                    let outcome = Box::pin(room.push(
                        &self.shared.store,
                        &self.shared.committer,
                        pusher,
                        update,
                        skip_redundant,
                    ))
                    .await;
                    self.pushes
                        .get_or_insert_with(FuturesOrdered::new)
                        .push_back(outcome.map(move |result| Reply::Pushed { doc, tag, result }).boxed());
                }
                Action::Request(request) => {
                    let reply = Box::pin(self.execute(handler, request)).await;
                    handler.reply(reply, Now::read(), &mut self.actions);
                }
            }
            if self.out.ctl.token.is_cancelled() {
                return false;
            }
        }
        // An idle connection keeps no actions queue: a resume leaves it holding dozens.
        if self.actions.capacity() > 4 {
            self.actions = Actions::new();
        }
        true
    }

    /// Records the connection's user (the token's subject) before it subscribes to a room.
    fn identify(&self, user: Option<&str>) {
        if let Some(user) = user {
            self.out.ctl.user.get_or_init(|| user.into());
        }
    }

    /// Carries out one request (not a push) for the connection.
    async fn execute<H: Handler>(&mut self, handler: &H, request: Request) -> Reply {
        let shared = self.shared;
        match request {
            Request::Claim { client_id, user } => {
                let claimed = shared.rooms.ctx().owners.claim(self.store, client_id, &user).await;
                Reply::Claimed(claimed.map_err(|e| {
                    tracing::error!(session = self.session, error = %e, "store failed binding a client id");
                }))
            }
            Request::Resume {
                doc,
                cursor,
                state_vector,
                opening,
            } => {
                if opening && !self.may_open(handler.identity()) {
                    return Reply::Resumed {
                        doc,
                        result: Err(driftsync_protocol::ErrorCode::RateLimited),
                    };
                }
                self.identify(handler.identity());
                let room = shared.rooms.get(&doc);
                let result = room
                    .resume(self.store, self.session, &self.out, cursor, &state_vector)
                    .await;
                Reply::Resumed { doc, result }
            }
            Request::Join { doc } => {
                if !self.may_open(handler.identity()) {
                    tracing::info!(session = self.session, doc = %doc, "connection refused: opening rooms too fast");
                    return Reply::Joined(Err(driftsync_protocol::ErrorCode::RateLimited));
                }
                self.identify(handler.identity());
                let room = shared.rooms.get(&doc);
                Reply::Joined(room.join(self.store, self.session, &self.out).await)
            }
            Request::Diff { doc, state_vector } => {
                Reply::Diff(shared.rooms.get(&doc).diff(self.store, &state_vector).await)
            }
            Request::Leave { doc } => {
                shared.rooms.get(&doc).leave(self.session).await;
                Reply::Done
            }
            Request::Presence { doc, state } => {
                let result = shared
                    .rooms
                    .get(&doc)
                    .presence(self.session, handler.user(), state)
                    .await;
                Reply::Presence { doc, result }
            }
            Request::Awareness { doc, entries } => {
                shared
                    .rooms
                    .get(&doc)
                    .awareness(self.session, handler.user(), &entries)
                    .await;
                Reply::Done
            }
            Request::Relay { doc, event } => {
                shared.rooms.get(&doc).relay(self.session, event).await;
                Reply::Done
            }
            Request::SendPresence { doc } => {
                shared.rooms.get(&doc).send_presence(self.session).await;
                Reply::Done
            }
            Request::AwarenessSnapshot { doc } => Reply::AwarenessSnapshot(
                shared
                    .rooms
                    .get(&doc)
                    .awareness_snapshot()
                    .await
                    .map(|(entries, _)| entries),
            ),
            Request::Inbox { since } => {
                let user = handler.user().to_string();
                if self.inbox.is_none() {
                    let notify = shared.rooms.ctx().inboxes.follow(&user, self.session);
                    self.inbox = Some((user.clone(), notify));
                }
                let inbox = Box::pin(self.store.inbox(&user, since)).await;
                Reply::Inbox(inbox.map_err(|e| {
                    tracing::error!(error = %e, "store failed reading an inbox");
                    shared.metrics.store_errors.inc();
                    driftsync_protocol::ErrorCode::StoreUnavailable
                }))
            }
            Request::Members { room } => {
                let members = match Box::pin(self.store.members(room.as_str())).await {
                    Ok(members) => members,
                    Err(e) => {
                        tracing::error!(error = %e, "store failed reading a room's members");
                        shared.metrics.store_errors.inc();
                        return Reply::Members {
                            room,
                            result: Err(driftsync_protocol::ErrorCode::StoreUnavailable),
                        };
                    }
                };
                // Presence is known where the room is live (its states from every instance
                // arrive once it is subscribed here): a client asks after resuming the room.
                let statuses = match shared.rooms.existing(&room) {
                    Some(live) => live.statuses().await,
                    None => Default::default(),
                };
                let now = crate::presence::unix_ms();
                let result = Ok(members
                    .into_iter()
                    .map(|member| {
                        let status = statuses.get(&member.user).cloned();
                        driftsync_protocol::RoomMember {
                            last_seen_ms: if status.is_some() {
                                Some(now)
                            } else {
                                member.last_seen_ms
                            },
                            status,
                            user: member.user,
                            joined: member.joined,
                            at_ms: member.at_ms,
                        }
                    })
                    .collect());
                Reply::Members { room, result }
            }
            Request::Push { .. } => {
                // Pushes are pipelined by `act`; never sent here.
                Reply::Done
            }
        }
    }

    /// Whether the connection may open one more room now: paced per connection and, for an
    /// authenticated user, across their connections.
    fn may_open(&mut self, identity: Option<&str>) -> bool {
        let now = Instant::now();
        let shared = self.shared;
        self.limiter.allow_open(now)
            && identity.is_none_or(|user| shared.opens.allow(&shared.config.room_opens, user, now))
    }
}

/// Resolves when the inbox the connection follows may have changed (never without one).
async fn inbox_changed(inbox: &Option<(String, Arc<tokio::sync::Notify>)>) {
    match inbox {
        Some((_, notify)) => notify.notified().await,
        None => std::future::pending().await,
    }
}

/// The next outcome of `pushes`, if there are any.
async fn next_of<F: std::future::Future>(pushes: &mut Option<FuturesOrdered<F>>) -> Option<F::Output> {
    match pushes {
        Some(pushes) => pushes.next().await,
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use driftsync_engine::store::SqliteStore;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::config::Config;
    use crate::instance::start_instance;
    use crate::native::NativeHandler;

    #[tokio::test]
    async fn a_connection_stays_small() {
        let store = Arc::new(SqliteStore::open_in_memory().await.unwrap());
        let (shared, _committer) = start_instance(
            store,
            Config::default(),
            1,
            CancellationToken::new(),
            crate::tasks::Tasks::default(),
        );
        let socket = Socket::new(Box::new(tokio::io::duplex(64).0), 1024);
        let settings = Arc::clone(&shared.native);
        let run = run(Arc::clone(&shared), socket, move |session| {
            NativeHandler::new(settings, session)
        });
        let socket = Socket::new(Box::new(tokio::io::duplex(64).0), 1024);
        let ctl = Arc::new(ConnCtl::new(CancellationToken::new(), Arc::clone(&shared.metrics)));
        let (stream, out, _writer) = socket.start(&shared.tasks, 8, ctl, NativeHandler::CODEC);
        let mut conn = Conn {
            shared: &shared,
            store: &*shared.store,
            out,
            stream,
            session: 1,
            limiter: Limiter::new(&shared.config.rate_limit, &shared.config.room_opens, Instant::now()),
            actions: Actions::new(),
            pushes: None,
            inbox: None,
        };
        let mut handler = NativeHandler::new(Arc::clone(&shared.native), 1);
        let serve = conn.serve(&mut handler);
        // Every connection holds both for its whole life, idle or not (BENCHMARKS.md, "per idle
        // connection"): the store's futures held inline once made every connection pay for them.
        let (run, serve) = (std::mem::size_of_val(&run), std::mem::size_of_val(&serve));
        eprintln!("connection task {run} B, its loop {serve} B (inside it)");
        assert!(run <= 2560, "a connection's task takes {run} bytes");
        assert!(serve <= 1536, "a connection's loop takes {serve} bytes");
    }
}
