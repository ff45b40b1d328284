//! driftsync server
