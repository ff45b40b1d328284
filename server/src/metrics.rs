//! Prometheus metrics, served as text at `GET /metrics`.
//!
//! One [`Metrics`] per server instance (tests run several in one process), shared by every
//! connection and room.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
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
        Metrics {
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
