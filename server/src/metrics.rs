//! Prometheus metrics, served as text at `GET /metrics`.
//!
//! One [`Metrics`] per server instance (tests run several in one process), shared by every
//! connection and room.

use prometheus_client::encoding::text::encode;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The server's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    /// Open WebSocket connections (both protocols).
    pub(crate) connections: Gauge,
    /// Rooms loaded in memory.
    pub(crate) rooms: Gauge,
    /// Updates received from clients (both protocols), before validation.
    pub(crate) updates_in: Counter,
    /// Bytes of those updates.
    pub(crate) bytes_in: Counter,
    /// Frames written to clients.
    pub(crate) frames_out: Counter,
    /// Bytes of those frames.
    pub(crate) bytes_out: Counter,
    /// Seconds from receiving a pushed update to its durable commit (the acknowledgement).
    pub(crate) ack_latency: Histogram,
    /// Failed store operations (loads, commits).
    pub(crate) store_errors: Counter,
    /// Connections closed because their outbound queue overflowed.
    pub(crate) slow_consumers: Counter,
    /// Updates refused (invalid, unauthorized, schema violations, missing dependencies).
    pub(crate) refused: Counter,
    /// Messages received from other instances through the fan-out.
    pub(crate) fanout_in: Counter,
    /// Gaps in the fan-out filled from the store (a lost or oversized update).
    pub(crate) fanout_repairs: Counter,
    /// Rooms found behind the store by the periodic head check or a resync, and caught up.
    pub(crate) head_check_repairs: Counter,
    /// Other instances heard from within the instance timeout.
    pub(crate) peer_instances: Gauge,
    /// Push webhook attempts by result (`delivered`, `retry`, `throttled`, `timeout`, `error`,
    /// `gone`, `dead`, `expired`, `online`).
    pub(crate) push_attempts: Family<Vec<(String, String)>, Counter>,
    /// Push notifications waiting for delivery (first attempt or retry), store-wide.
    pub(crate) push_queue: Gauge,
    /// Push notifications in the dead-letter state, store-wide.
    pub(crate) push_dead_letters: Gauge,
    /// Age of the oldest pending push notification (since its first message), in seconds.
    pub(crate) push_oldest_age: Gauge<f64, AtomicU64>,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("driftsync");
        let connections = Gauge::default();
        let rooms = Gauge::default();
        let updates_in = Counter::default();
        let bytes_in = Counter::default();
        let frames_out = Counter::default();
        let bytes_out = Counter::default();
        // 100 µs to about 3 s.
        let ack_latency = Histogram::new([
            0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 3.0,
        ]);
        let store_errors = Counter::default();
        let slow_consumers = Counter::default();
        let refused = Counter::default();
        let fanout_in = Counter::default();
        let fanout_repairs = Counter::default();
        let head_check_repairs = Counter::default();
        let peer_instances = Gauge::default();
        registry.register("connections", "Open WebSocket connections", connections.clone());
        registry.register("rooms", "Rooms loaded in memory", rooms.clone());
        registry.register("updates_in", "Updates received from clients", updates_in.clone());
        registry.register(
            "update_bytes_in",
            "Bytes of updates received from clients",
            bytes_in.clone(),
        );
        registry.register("frames_out", "Frames sent to clients", frames_out.clone());
        registry.register("bytes_out", "Bytes of frames sent to clients", bytes_out.clone());
        registry.register(
            "ack_latency_seconds",
            "From receiving an update to its durable commit",
            ack_latency.clone(),
        );
        registry.register("store_errors", "Failed store operations", store_errors.clone());
        registry.register(
            "slow_consumer_disconnects",
            "Connections closed for a full outbound queue",
            slow_consumers.clone(),
        );
        registry.register("updates_refused", "Updates refused and not stored", refused.clone());
        registry.register(
            "fanout_messages_in",
            "Messages received from other instances",
            fanout_in.clone(),
        );
        registry.register(
            "fanout_repairs",
            "Fan-out gaps filled from the store",
            fanout_repairs.clone(),
        );
        registry.register(
            "head_check_repairs",
            "Rooms found behind the store and caught up",
            head_check_repairs.clone(),
        );
        registry.register(
            "peer_instances",
            "Other instances heard from recently",
            peer_instances.clone(),
        );
        let push_attempts = Family::<Vec<(String, String)>, Counter>::default();
        let push_queue = Gauge::default();
        let push_dead_letters = Gauge::default();
        let push_oldest_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "push_attempts",
            "Push webhook attempts by result",
            push_attempts.clone(),
        );
        registry.register(
            "push_queue_depth",
            "Push notifications waiting for delivery",
            push_queue.clone(),
        );
        registry.register(
            "push_dead_letters",
            "Push notifications in the dead-letter state",
            push_dead_letters.clone(),
        );
        registry.register(
            "push_oldest_age_seconds",
            "Age of the oldest pending push notification",
            push_oldest_age.clone(),
        );
        Metrics {
            push_attempts,
            push_queue,
            push_dead_letters,
            push_oldest_age,
            registry,
            connections,
            rooms,
            updates_in,
            bytes_in,
            frames_out,
            bytes_out,
            ack_latency,
            store_errors,
            slow_consumers,
            refused,
            fanout_in,
            fanout_repairs,
            head_check_repairs,
            peer_instances,
        }
    }

    /// The metrics in the Prometheus text exposition format.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
