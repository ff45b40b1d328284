//! The wire formats of driftsync, and nothing else: this crate owns every type that crosses a
//! socket, so that compatibility promises live in one place.
//!
//! * [`native`]: our own protocol. Every frame is a postcard-encoded [`ClientFrame`] or
//!   [`ServerFrame`] carried in one WebSocket binary message. It multiplexes many documents over
//!   one connection, resumes all of them in one round trip, and acknowledges every batch only
//!   after it is durably stored.
//! * [`yjs`]: the y-protocols (y-websocket) codec, so that stock Yjs clients can connect.
//!
//! Decoding never panics: every bad input is a [`DecodeError`].

mod error;
pub mod hocuspocus;
pub mod lib0;
pub mod native;
pub mod yjs;

pub use error::{DecodeError, Result};
pub use native::*;
