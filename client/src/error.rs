//! The client's error type.

use driftsync_protocol::{DocId, ErrorCode};

/// Everything a client operation can fail with. Network and stored data never cause a panic:
/// they end up here.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store or the engine failed (I/O, corrupt row, invalid edit, unknown message, …).
    #[error(transparent)]
    Engine(#[from] driftsync_engine::Error),
    /// A document id is not valid.
    #[error("invalid document id: {0}")]
    DocId(driftsync_protocol::DecodeError),
    /// The WebSocket failed (connect, send or receive).
    #[error("connection failed: {0}")]
    Connection(Box<tokio_tungstenite::tungstenite::Error>),
    /// The TLS handshake of a `wss://` connection failed: the server's certificate is not
    /// trusted (add its CA with `Tls::with_extra_ca`), names another host, or has expired.
    #[error("TLS failed: {0}")]
    Tls(String),
    /// The server sent something this client cannot understand or did not expect.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server refused something.
    #[error("the server refused: {code:?}{}{}", doc.as_ref().map(|d| format!(" (document {d})")).unwrap_or_default(), batch.map(|b| format!(" (batch {b})")).unwrap_or_default())]
    Server {
        /// Why.
        code: ErrorCode,
        /// The document concerned, if any.
        doc: Option<DocId>,
        /// The batch concerned, if any.
        batch: Option<u64>,
    },
    /// The server closed the connection before the sync finished.
    #[error("the server closed the connection before the sync finished")]
    Closed,
    /// The sync did not finish in time.
    #[error("the sync did not finish within {0:?}")]
    Timeout(std::time::Duration),
    /// The server sent nothing (not even a pong) for this long: the connection is dead.
    #[error("the server was silent for {0:?}")]
    Silent(std::time::Duration),
    /// The live session has stopped.
    #[error("the session has stopped")]
    Stopped,
    /// A caller's argument is not valid.
    #[error("{0}")]
    Invalid(String),
}

impl From<tokio_tungstenite::tungstenite::Error> for Error {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        Error::Connection(Box::new(e))
    }
}

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
