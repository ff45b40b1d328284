//! The driftsync engine: everything about documents that does not touch a socket.
//!
//! * [`doc`]: yrs documents with text and map helpers, client ids, safe decoding, and turning a
//!   stored snapshot + log tail back into a document.
//! * [`clock`]: hybrid logical clocks, which give chat messages a deterministic, causal order.
//! * [`chat`]: the chat room schema (messages, edits, tombstones) and read receipts.
//! * [`sync`]: the sans-IO sync core — resume planning on the server, applying remote updates
//!   with bounded pending, computing what a peer lacks. It takes bytes and returns bytes.
//! * [`store`]: the durable store (SQLite and PostgreSQL through sqlx).
//! * [`validate`]: structural checks of untrusted yrs v1 bytes before yrs decodes them (decode
//!   bombs, deep nesting, clock overflows), and what an update depends on.
//!
//! Architecture invariant: nothing outside [`store`] performs I/O.

pub mod chat;
pub mod clock;
pub mod doc;
mod error;
pub mod store;
pub mod sync;
#[cfg(feature = "test-support")]
pub mod trace;
pub mod validate;

/// Fuzz target bodies (see `fuzz/` at the repository root and `tests/fuzz_corpus.rs`).
#[doc(hidden)]
pub mod fuzz;

pub use error::{Error, Result};
