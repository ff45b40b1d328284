//! [`RedisFanout`]: the fan-out between server processes over Redis pub/sub (see
//! [`crate::fanout`] for what a fan-out must and need not do).
//!
//! - Each document has its channel, `{prefix}:doc:{id}`; an instance subscribes to the documents
//!   of its live rooms only. Heartbeats go to `{prefix}:instances`.
//! - Publishing never waits: messages go into a queue bounded in messages and bytes
//!   ([`PUBLISH_QUEUE`], [`PUBLISH_QUEUE_BYTES`]) that one task drains into pipelined `PUBLISH`es
//!   over a multiplexed connection (the `redis` crate's `ConnectionManager`, which reconnects).
//!   What cannot be queued or sent is dropped and counted: the receivers repair from the store.
//! - Each instance has its own subscriber connection. The crate's pub/sub connection does not
//!   restore subscriptions after a reconnect, so the task here does: it keeps the set of
//!   documents wanted, (re)subscribes to it after every connect, pings to find a dead link
//!   within [`PING_EVERY`] + [`REDIS_TIMEOUT`], and after every reconnect tells its instance to
//!   resynchronise ([`Inbound::Resync`]).
//! - The crate hands pub/sub messages over through an unbounded queue; the task drains it at
//!   once into the instance's bounded inbox (which, when full, drops and owes a resync), so
//!   nothing grows without bound while an instance is busy.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use driftsync_protocol::DocId;
use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};

use crate::fanout::{self, Fanout, FanoutEvent, Inbound, Inbox};

/// Most messages waiting to be published.
pub const PUBLISH_QUEUE: usize = 16 * 1024;

/// Most bytes waiting to be published.
pub const PUBLISH_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// Most messages sent in one pipeline.
const PIPELINE: usize = 256;

/// How long connecting, subscribing, a ping or a pipeline may take.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// How often an idle subscriber connection is pinged.
pub const PING_EVERY: Duration = Duration::from_secs(2);

/// Longest wait between reconnection attempts (they start at 100 ms and double, with jitter).
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Documents per `SUBSCRIBE` command.
const SUBSCRIBE_CHUNK: usize = 256;

/// Counters of a [`RedisFanout`], for logs and metrics.
#[derive(Debug, Default)]
pub struct RedisStats {
    /// Messages published.
    pub published: AtomicU64,
    /// Messages dropped: queue full, or Redis unreachable.
    pub dropped: AtomicU64,
    /// Connections (re)established by subscriber tasks.
    pub connects: AtomicU64,
    /// Messages received that were not understood.
    pub malformed: AtomicU64,
}

/// Server instances connected through Redis pub/sub.
#[derive(Debug, Clone)]
pub struct RedisFanout {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: redis::Client,
    prefix: String,
    queue: mpsc::Sender<(String, Vec<u8>)>,
    queued_bytes: Arc<AtomicUsize>,
    /// The subscriptions each joined instance wants, and the signal to its task.
    instances: Mutex<Vec<(u64, Arc<Wanted>)>>,
    stats: Arc<RedisStats>,
}

/// The documents an instance wants to receive.
#[derive(Debug, Default)]
struct Wanted {
    docs: Mutex<BTreeSet<String>>,
    changed: Notify,
}

impl RedisFanout {
    /// A fan-out through the Redis at `url` (`redis://[user:password@]host[:port][/db]`, or
    /// `rediss://…` is not supported in this build), with channels named `{prefix}:…`. Only
    /// parses the URL: connecting happens in the background, and Redis being down is never an
    /// error here (it is logged, and the instances catch up from the store meanwhile). Must
    /// be called within a tokio runtime.
    pub fn new(url: &str, prefix: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let (queue, rx) = mpsc::channel(PUBLISH_QUEUE);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(RedisStats::default());
        tokio::spawn(publisher(
            client.clone(),
            rx,
            Arc::clone(&queued_bytes),
            Arc::clone(&stats),
        ));
        Ok(RedisFanout {
            inner: Arc::new(Inner {
                client,
                prefix: prefix.to_owned(),
                queue,
                queued_bytes,
                instances: Mutex::default(),
                stats,
            }),
        })
    }

    /// Its counters.
    pub fn stats(&self) -> &RedisStats {
        &self.inner.stats
    }

    fn doc_channel(&self, doc: &str) -> String {
        doc_channel(&self.inner.prefix, doc)
    }

    fn enqueue(&self, channel: String, payload: Vec<u8>) {
        let inner = &self.inner;
        let size = channel.len() + payload.len();
        if inner.queued_bytes.fetch_add(size, Ordering::Relaxed) + size > PUBLISH_QUEUE_BYTES {
            inner.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            self.dropped("publish queue full (bytes)");
            return;
        }
        if inner.queue.try_send((channel, payload)).is_err() {
            inner.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            self.dropped("publish queue full");
        }
    }

    fn dropped(&self, why: &'static str) {
        let n = self.inner.stats.dropped.fetch_add(1, Ordering::Relaxed);
        // The first, then one in a thousand: a Redis outage drops many.
        if n % 1000 == 0 {
            tracing::warn!(
                dropped = n + 1,
                why,
                "fan-out message dropped: other instances will catch up from the store"
            );
        }
    }

    fn wanted(&self, instance: u64) -> Option<Arc<Wanted>> {
        let instances = self.inner.instances.lock().unwrap_or_else(PoisonError::into_inner);
        instances
            .iter()
            .find(|(id, _)| *id == instance)
            .map(|(_, wanted)| Arc::clone(wanted))
    }
}

fn doc_channel(prefix: &str, doc: &str) -> String {
    format!("{prefix}:doc:{doc}")
}

fn instances_channel(prefix: &str) -> String {
    format!("{prefix}:instances")
}

impl Fanout for RedisFanout {
    fn join(&self, instance: u64) -> mpsc::Receiver<Inbound> {
        let (inbox, rx) = Inbox::new();
        let wanted = Arc::new(Wanted::default());
        {
            let mut instances = self.inner.instances.lock().unwrap_or_else(PoisonError::into_inner);
            instances.retain(|(_, wanted)| Arc::strong_count(wanted) > 1);
            instances.push((instance, Arc::clone(&wanted)));
        }
        tokio::spawn(subscriber(
            self.inner.client.clone(),
            self.inner.prefix.clone(),
            instance,
            inbox,
            wanted,
            Arc::clone(&self.inner.stats),
        ));
        rx
    }

    fn publish(&self, instance: u64, doc: &DocId, event: FanoutEvent) {
        self.enqueue(
            self.doc_channel(doc.as_str()),
            fanout::encode_event(instance, doc, &event),
        );
    }

    fn heartbeat(&self, instance: u64) {
        self.enqueue(
            instances_channel(&self.inner.prefix),
            fanout::encode_heartbeat(instance),
        );
    }

    fn publish_inbox(&self, instance: u64, users: &[String]) {
        // On the channel every instance listens to (heartbeats'): inbox nudges are few and
        // small, and an instance cannot know which others follow a user.
        self.enqueue(
            instances_channel(&self.inner.prefix),
            fanout::encode_inbox(instance, users),
        );
    }

    fn subscribe(&self, instance: u64, doc: &DocId) {
        if let Some(wanted) = self.wanted(instance) {
            wanted
                .docs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(doc.as_str().to_owned());
            wanted.changed.notify_one();
        }
    }

    fn metrics_text(&self) -> String {
        let stats = &self.inner.stats;
        let mut out = String::new();
        for (name, help, value) in [
            ("published", "Fan-out messages published to Redis", &stats.published),
            (
                "dropped",
                "Fan-out messages dropped (queue full or Redis unreachable)",
                &stats.dropped,
            ),
            ("connects", "Redis subscriber connections established", &stats.connects),
            (
                "malformed",
                "Fan-out messages received that were not understood",
                &stats.malformed,
            ),
        ] {
            out.push_str(&format!(
                "# HELP driftsync_redis_{name} {help}.\n# TYPE driftsync_redis_{name} counter\ndriftsync_redis_{name}_total {}\n",
                value.load(Ordering::Relaxed)
            ));
        }
        out.push_str(&format!(
            "# HELP driftsync_redis_queued_bytes Bytes waiting to be published.\n# TYPE driftsync_redis_queued_bytes gauge\ndriftsync_redis_queued_bytes {}\n",
            self.inner.queued_bytes.load(Ordering::Relaxed)
        ));
        out
    }

    fn unsubscribe(&self, instance: u64, doc: &DocId) {
        if let Some(wanted) = self.wanted(instance) {
            wanted
                .docs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(doc.as_str());
            wanted.changed.notify_one();
        }
    }
}

/// Drains the publish queue into pipelines of `PUBLISH`es until the fan-out is dropped.
async fn publisher(
    client: redis::Client,
    mut rx: mpsc::Receiver<(String, Vec<u8>)>,
    queued_bytes: Arc<AtomicUsize>,
    stats: Arc<RedisStats>,
) {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(MAX_BACKOFF);
    let mut conn: Option<redis::aio::ConnectionManager> = None;
    let mut next_attempt = tokio::time::Instant::now();
    let mut batch = Vec::with_capacity(PIPELINE);
    while rx.recv_many(&mut batch, PIPELINE).await > 0 {
        let bytes: usize = batch.iter().map(|(c, p): &(String, Vec<u8>)| c.len() + p.len()).sum();
        if conn.is_none() && tokio::time::Instant::now() >= next_attempt {
            let connect = redis::aio::ConnectionManager::new_with_config(client.clone(), config.clone());
            match tokio::time::timeout(REDIS_TIMEOUT, connect).await {
                Ok(Ok(c)) => {
                    tracing::info!("fan-out: publishing to Redis");
                    conn = Some(c);
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "fan-out: cannot connect to Redis to publish"),
                Err(_) => tracing::warn!("fan-out: connecting to Redis to publish timed out"),
            }
            next_attempt = tokio::time::Instant::now() + MAX_BACKOFF;
        }
        let sent = match conn.as_mut() {
            Some(c) => {
                let mut pipe = redis::pipe();
                for (channel, payload) in &batch {
                    pipe.publish(channel, payload).ignore();
                }
                match tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async::<()>(c)).await {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "fan-out: publishing failed");
                        false
                    }
                    Err(_) => false,
                }
            }
            None => false,
        };
        let n = batch.len() as u64;
        if sent {
            stats.published.fetch_add(n, Ordering::Relaxed);
        } else {
            let before = stats.dropped.fetch_add(n, Ordering::Relaxed);
            if before / 1000 != (before + n) / 1000 || before == 0 {
                tracing::warn!(
                    dropped = before + n,
                    "fan-out: Redis unreachable, messages dropped: other instances will catch up from the store"
                );
            }
        }
        queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        batch.clear();
    }
}

/// One instance's subscriber: connects, subscribes to what it wants, passes messages to its
/// inbox, and starts over (with a resync) whenever the connection fails; ends once the
/// instance stops reading.
async fn subscriber(
    client: redis::Client,
    prefix: String,
    instance: u64,
    inbox: Inbox,
    wanted: Arc<Wanted>,
    stats: Arc<RedisStats>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut connected_before = false;
    loop {
        if inbox.is_closed() {
            return;
        }
        match session(&client, &prefix, instance, &inbox, &wanted, &stats, connected_before).await {
            Ended::InstanceGone => return,
            Ended::Lost { was_up } => {
                if was_up {
                    connected_before = true;
                    backoff = Duration::from_millis(100);
                    tracing::warn!("fan-out: lost the Redis subscriber connection; reconnecting");
                }
            }
        }
        // Full jitter, so that instances cut off together do not come back in step.
        let nanos = u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX);
        let jitter = fanout::instance_id() % nanos.max(1);
        tokio::time::sleep(Duration::from_nanos(nanos / 2 + jitter / 2)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How a subscriber connection ended.
enum Ended {
    /// The instance stopped reading: the task ends.
    InstanceGone,
    /// The connection failed (or never came up).
    Lost {
        /// Whether it had been up and subscribed.
        was_up: bool,
    },
}

/// One subscriber connection, from connecting to its failure.
async fn session(
    client: &redis::Client,
    prefix: &str,
    instance: u64,
    inbox: &Inbox,
    wanted: &Wanted,
    stats: &RedisStats,
    reconnect: bool,
) -> Ended {
    let lost = Ended::Lost { was_up: false };
    let pubsub = match tokio::time::timeout(REDIS_TIMEOUT, client.get_async_pubsub()).await {
        Ok(Ok(pubsub)) => pubsub,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "fan-out: cannot connect to Redis");
            return lost;
        }
        Err(_) => return lost,
    };
    let (mut sink, mut stream) = pubsub.split();
    let mut active: BTreeSet<String> = BTreeSet::new();
    if !within(sink.subscribe(instances_channel(prefix))).await {
        return lost;
    }
    // Everything wanted now; later changes arrive through `wanted.changed`.
    let mut added = Vec::new();
    if !sync_subscriptions(&mut sink, prefix, wanted, &mut active, &mut added).await {
        return lost;
    }
    stats.connects.fetch_add(1, Ordering::Relaxed);
    tracing::info!(documents = active.len(), "fan-out: subscribed on Redis");
    if reconnect || !active.is_empty() {
        // Messages published while we were away are lost: catch up every live room.
        inbox.deliver(Inbound::Resync);
    }
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else { return Ended::Lost { was_up: true } };
                match fanout::decode(message.get_payload_bytes()) {
                    Ok(Inbound::Event { origin, .. } | Inbound::Alive { origin }) if origin == instance => {}
                    Ok(inbound) => {
                        if !inbox.deliver(inbound) {
                            return Ended::InstanceGone;
                        }
                    }
                    Err(e) => {
                        let n = stats.malformed.fetch_add(1, Ordering::Relaxed);
                        if n % 1000 == 0 {
                            tracing::warn!(error = %e, channel = message.get_channel_name(), "fan-out: message not understood, ignored");
                        }
                    }
                }
            }
            () = wanted.changed.notified() => {
                added.clear();
                if !sync_subscriptions(&mut sink, prefix, wanted, &mut active, &mut added).await {
                    return Ended::Lost { was_up: true };
                }
                for doc in added.drain(..) {
                    if let Ok(doc) = DocId::new(doc) {
                        if !inbox.deliver(Inbound::Subscribed { doc }) {
                            return Ended::InstanceGone;
                        }
                    }
                }
            }
            _ = ping.tick() => {
                if inbox.is_closed() {
                    return Ended::InstanceGone;
                }
                if !within(sink.ping::<redis::Value>()).await {
                    return Ended::Lost { was_up: true };
                }
            }
        }
    }
}

/// Brings the connection's subscriptions to what is wanted; the documents newly subscribed
/// go to `added`. Returns `false` if the connection failed.
async fn sync_subscriptions(
    sink: &mut redis::aio::PubSubSink,
    prefix: &str,
    wanted: &Wanted,
    active: &mut BTreeSet<String>,
    added: &mut Vec<String>,
) -> bool {
    let want = wanted.docs.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let new: Vec<String> = want.difference(active).cloned().collect();
    let gone: Vec<String> = active.difference(&want).cloned().collect();
    for chunk in new.chunks(SUBSCRIBE_CHUNK) {
        let channels: Vec<String> = chunk.iter().map(|doc| doc_channel(prefix, doc)).collect();
        if !within(sink.subscribe(channels)).await {
            return false;
        }
        active.extend(chunk.iter().cloned());
        added.extend(chunk.iter().cloned());
    }
    for chunk in gone.chunks(SUBSCRIBE_CHUNK) {
        let channels: Vec<String> = chunk.iter().map(|doc| doc_channel(prefix, doc)).collect();
        if !within(sink.unsubscribe(channels)).await {
            return false;
        }
        for doc in chunk {
            active.remove(doc);
        }
    }
    true
}

/// Whether a Redis call succeeded within [`REDIS_TIMEOUT`].
async fn within<T>(call: impl std::future::Future<Output = redis::RedisResult<T>>) -> bool {
    matches!(tokio::time::timeout(REDIS_TIMEOUT, call).await, Ok(Ok(_)))
}
