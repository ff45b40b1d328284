//! driftsync client
