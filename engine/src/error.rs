//! The engine's error type.

/// Everything that can go wrong in the engine and its store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stored row of this document cannot be decoded. The document is refused, never served
    /// empty.
    #[error("document {doc:?}: stored data is corrupt: {reason}")]
    Corrupt {
        /// The document.
        doc: String,
        /// What was wrong.
        reason: String,
    },
    /// The database failed.
    #[error("store: {0}")]
    Store(#[from] sqlx::Error),
    /// The database failed, on the SQLite store's write thread (see `store::write_thread`).
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A schema migration failed.
    #[error("store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database URL names no supported backend.
    #[error("unsupported database URL {0:?}: use sqlite:… or postgres://…")]
    UnsupportedUrl(String),
    /// Bytes that should be a yrs update are not one.
    #[error("invalid update: {0}")]
    InvalidUpdate(String),
    /// Bytes that should be a yrs state vector are not one.
    #[error("invalid state vector: {0}")]
    InvalidStateVector(String),
    /// Too many updates wait for missing predecessors; the update was not applied.
    #[error("{pending} updates wait for missing predecessors (limit {limit})")]
    TooManyPending {
        /// How many are waiting.
        pending: usize,
        /// The limit.
        limit: usize,
    },
    /// Only a message's author may edit or delete it.
    #[error("only the author may change message {0}")]
    NotAuthor(String),
    /// No message with this id in the room.
    #[error("no message {0}")]
    NoSuchMessage(String),
    /// An argument is out of range (the text says which).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An update breaks a document's schema rules (see [`crate::chat::ChatGuard`]); the text
    /// says which rule.
    #[error("schema violation: {0}")]
    SchemaViolation(String),
}

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;
