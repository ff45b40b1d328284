//! One server instance: what every connection shares ([`Shared`]) and the background tasks
//! that keep it (the committer, presence expiry, fan-in from other instances, sweeps). `serve`
//! runs one behind its accept loop; the simulation runs several on in-memory streams.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use driftsync_engine::store::Store;
use tokio_util::sync::CancellationToken;

use crate::commit::Committer;
use crate::config::Config;
use crate::limits::UserOpens;
use crate::metrics::Metrics;
use crate::room::RoomCtx;
use crate::rooms::Rooms;
use crate::tasks::Tasks;
use crate::{fanout, native, presence};

/// What every connection shares.
pub(crate) struct Shared<S> {
    pub(crate) store: Arc<S>,
    /// Writes pushed updates in groups (one transaction for many batches).
    pub(crate) committer: Committer,
    pub(crate) config: Config,
    /// What native connections need of `config`.
    pub(crate) native: Arc<native::Settings>,
    pub(crate) rooms: Rooms,
    /// Prometheus metrics, served at `/metrics`.
    pub(crate) metrics: Arc<Metrics>,
    /// Rooms opened per user, across connections.
    pub(crate) opens: UserOpens,
    /// Session ids, unique per process: they name connections in presence and logs.
    pub(crate) next_session: AtomicU64,
    /// Cancelled at shutdown; every connection's token is a child of it.
    pub(crate) shutdown: CancellationToken,
    /// Every task of the instance (connections tracked for shutdown).
    pub(crate) tasks: Arc<Tasks>,
}

impl<S> Shared<S> {
    /// A new connection's session id.
    pub(crate) fn next_session(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }
}

/// An instance of the server without its HTTP listener: the shared state and the background
/// tasks (committer, presence expiry, fan-in from other instances, sweeps). `serve` runs one
/// behind the accept loop; the simulation runs several on in-memory streams.
///
/// Also returns the committer's task, which ends once every handle to the committer (the
/// shared state's) is gone, after writing what was queued.
pub(crate) fn start_instance<S: Store>(
    store: Arc<S>,
    config: Config,
    instance: u64,
    token: CancellationToken,
    tasks: Tasks,
) -> (Arc<Shared<S>>, tokio::task::JoinHandle<()>) {
    let tasks = Arc::new(tasks);
    let mut committer_task = None;
    let committer = Committer::start(Arc::clone(&store), |run| {
        committer_task = Some(tasks.spawn(run.run()));
    });
    let committer_task = committer_task.unwrap_or_else(|| tokio::spawn(async {}));
    let metrics = Arc::new(Metrics::new());
    let mut remote = config.fanout.join(instance);
    let rooms = Rooms::new(RoomCtx::new(
        Arc::clone(&metrics),
        Arc::clone(&config.fanout),
        instance,
        config.max_document_bytes,
        u64::try_from(config.max_clock_skew.as_millis()).unwrap_or(u64::MAX),
        Arc::clone(&tasks),
    ));
    let shared = Arc::new(Shared {
        store,
        committer,
        native: Arc::new(native::Settings::of(&config)),
        config,
        rooms,
        metrics,
        opens: UserOpens::default(),
        // Session ids name awareness clients across instances too: 21 random bits of the
        // instance's id, never zero, above 32 bits of counter keep them apart from other
        // instances' (three instances collide with odds of about 3 in a million), from Yjs
        // clients' 32-bit awareness ids, and below 2^53 (a JavaScript number).
        next_session: AtomicU64::new(((instance % 0x1F_FFFF + 1) << 32) | 1),
        shutdown: token,
        tasks,
    });
    // Expires silent presence until shutdown.
    let expiry = Arc::clone(&shared);
    shared.tasks.spawn(async move {
        let mut ticker = tokio::time::interval(presence::PRESENCE_SWEEP);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = expiry.shutdown.cancelled() => return,
                _ = ticker.tick() => expiry.rooms.expire_presence(),
            }
        }
    });
    // What other instances publish, for the rooms loaded here; this instance's heartbeat; the
    // other instances' liveness.
    let fan_in = Arc::clone(&shared);
    let catch_up = Arc::new(tokio::sync::Notify::new());
    let resync = Arc::clone(&catch_up);
    shared.tasks.spawn(async move {
        let mut peers = fanout::Peers::default();
        let mut heartbeat = tokio::time::interval(fanout::HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = tokio::select! {
                biased;
                () = fan_in.shutdown.cancelled() => break,
                next = remote.recv() => next,
                _ = heartbeat.tick() => {
                    fan_in.config.fanout.heartbeat(instance);
                    let now = tokio::time::Instant::now();
                    for dead in peers.expire(now) {
                        tracing::warn!(instance = dead, "another instance went silent: removing its connections' presence");
                        fan_in.rooms.drop_origin(dead).await;
                    }
                    fan_in.metrics.peer_instances.set(i64::try_from(peers.len()).unwrap_or(i64::MAX));
                    continue;
                }
            };
            let Some(message) = next else { break };
            fan_in.metrics.fanout_in.inc();
            let now = tokio::time::Instant::now();
            match message {
                fanout::Inbound::Event { origin, doc, event } => {
                    if origin == instance {
                        continue;
                    }
                    if peers.seen(origin, now) {
                        fan_in.rooms.exchange_presence().await;
                    }
                    match event {
                        fanout::FanoutEvent::Update { cursor, update } => {
                            fan_in.rooms.remote_update(&*fan_in.store, &doc, cursor, update.as_deref()).await;
                        }
                        fanout::FanoutEvent::Presence {
                            peer,
                            user,
                            clock,
                            state,
                            age_ms,
                        } => {
                            fan_in
                                .rooms
                                .remote_presence(&doc, origin, peer, user, clock, state, age_ms)
                                .await;
                        }
                        fanout::FanoutEvent::PresenceQuery => fan_in.rooms.presence_query(&doc).await,
                        fanout::FanoutEvent::Typing { peer, user, typing } => {
                            let event = crate::event::RoomEvent::Typing {
                                doc: doc.clone(),
                                peer,
                                user,
                                typing,
                            };
                            fan_in.rooms.remote_relay(&doc, event).await;
                        }
                        fanout::FanoutEvent::Stateless { payload } => {
                            let event = crate::event::RoomEvent::Stateless {
                                doc: doc.clone(),
                                payload,
                            };
                            fan_in.rooms.remote_relay(&doc, event).await;
                        }
                    }
                }
                fanout::Inbound::Alive { origin } => {
                    if origin != instance && peers.seen(origin, now) {
                        // New, or back after it was thought dead: exchange presence with it.
                        fan_in.rooms.exchange_presence().await;
                    }
                }
                fanout::Inbound::Subscribed { doc } => fan_in.rooms.subscribed(&*fan_in.store, &doc).await,
                fanout::Inbound::Inbox { origin, users } => {
                    if origin != instance {
                        fan_in.rooms.ctx().inboxes.wake(&users);
                    }
                }
                fanout::Inbound::Resync => {
                    tracing::info!("fan-out resync: catching up every live room and exchanging presence");
                    // Inbox nudges may have been lost too: every follower reads what changed.
                    fan_in.rooms.ctx().inboxes.wake_all();
                    resync.notify_one();
                    fan_in.rooms.exchange_presence().await;
                }
            }
        }
    });
    // The head check: the repair path for what the fan-out lost (or, without one, the only way
    // other instances' updates reach the live rooms here).
    let checker = Arc::clone(&shared);
    shared.tasks.spawn(async move {
        let period = checker.config.head_check;
        let mut tick = tokio::time::interval(period.unwrap_or(std::time::Duration::from_secs(3600)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                biased;
                () = checker.shutdown.cancelled() => break,
                () = catch_up.notified() => {}
                _ = tick.tick() => {
                    if period.is_none() {
                        continue;
                    }
                }
            }
            checker.rooms.catch_up_all(&*checker.store).await;
        }
    });
    // Unloads idle rooms and compacts grown logs.
    let sweeper = Arc::clone(&shared);
    shared.tasks.spawn(async move {
        let mut tick = tokio::time::interval(sweeper.config.sweep_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                biased;
                () = sweeper.shutdown.cancelled() => break,
                _ = tick.tick() => sweeper.rooms.sweep(&*sweeper.store, &sweeper.config.compaction).await,
            }
        }
    });
    (shared, committer_task)
}
