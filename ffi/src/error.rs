//! The one error type the bindings see, flat and typed: a kind and a one-line reason.

use driftsync_client::Error as ClientError;
use driftsync_protocol::ErrorCode;

/// What went wrong, as the apps tell it apart (also carried by [`crate::Event::Error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum ErrorKind {
    /// An argument is not valid (a document id, a position, someone else's message, JSON).
    Invalid,
    /// The local store failed (I/O, corrupt data).
    Store,
    /// The server cannot be reached (refused, unknown host, no network, connection lost).
    Unreachable,
    /// The TLS handshake failed: the server's certificate is not trusted, names another host or
    /// has expired.
    Tls,
    /// The token was refused or has expired (or the token provider had none).
    Unauthorized,
    /// The token does not allow this document, or not writing to it.
    Forbidden,
    /// The server refused something else (rate limit, document too large, …).
    Refused,
    /// The server said something this client does not understand.
    Protocol,
    /// It took too long.
    Timeout,
    /// The session has stopped (shut down).
    Stopped,
    /// A bug or a failure of the bindings themselves.
    Internal,
}

/// Every failure of a call, one variant per [`ErrorKind`], each with a readable reason.
/// (Kotlin names it `DriftsyncException`.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, uniffi::Error)]
pub enum DriftsyncError {
    /// See [`ErrorKind::Invalid`].
    #[error("invalid: {reason}")]
    Invalid {
        /// Why.
        reason: String,
    },
    /// See [`ErrorKind::Store`].
    #[error("local store: {reason}")]
    Store {
        /// Why.
        reason: String,
    },
    /// See [`ErrorKind::Unreachable`].
    #[error("server unreachable: {reason}")]
    Unreachable {
        /// Why.
        reason: String,
    },
    /// See [`ErrorKind::Tls`].
    #[error("TLS: {reason}")]
    Tls {
        /// Why.
        reason: String,
    },
    /// See [`ErrorKind::Unauthorized`].
    #[error("unauthorized: {reason}")]
    Unauthorized {
        /// Why.
        reason: String,
    },
    /// See [`ErrorKind::Forbidden`].
    #[error("forbidden: {reason}")]
    Forbidden {
        /// Why.
        reason: String,
    },
    /// See [`ErrorKind::Refused`].
    #[error("refused: {reason}")]
    Refused {
        /// Why.
        reason: String,
    },
    /// See [`ErrorKind::Protocol`].
    #[error("protocol: {reason}")]
    Protocol {
        /// Why.
        reason: String,
    },
    /// See [`ErrorKind::Timeout`].
    #[error("timed out: {reason}")]
    Timeout {
        /// Why.
        reason: String,
    },
    /// See [`ErrorKind::Stopped`].
    #[error("stopped: {reason}")]
    Stopped {
        /// Why.
        reason: String,
    },
    /// See [`ErrorKind::Internal`].
    #[error("internal: {reason}")]
    Internal {
        /// Why.
        reason: String,
    },
}

impl DriftsyncError {
    /// An error of `kind` because of `reason`.
    pub fn new(kind: ErrorKind, reason: impl Into<String>) -> DriftsyncError {
        let reason = reason.into();
        match kind {
            ErrorKind::Invalid => DriftsyncError::Invalid { reason },
            ErrorKind::Store => DriftsyncError::Store { reason },
            ErrorKind::Unreachable => DriftsyncError::Unreachable { reason },
            ErrorKind::Tls => DriftsyncError::Tls { reason },
            ErrorKind::Unauthorized => DriftsyncError::Unauthorized { reason },
            ErrorKind::Forbidden => DriftsyncError::Forbidden { reason },
            ErrorKind::Refused => DriftsyncError::Refused { reason },
            ErrorKind::Protocol => DriftsyncError::Protocol { reason },
            ErrorKind::Timeout => DriftsyncError::Timeout { reason },
            ErrorKind::Stopped => DriftsyncError::Stopped { reason },
            ErrorKind::Internal => DriftsyncError::Internal { reason },
        }
    }

    /// Its kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DriftsyncError::Invalid { .. } => ErrorKind::Invalid,
            DriftsyncError::Store { .. } => ErrorKind::Store,
            DriftsyncError::Unreachable { .. } => ErrorKind::Unreachable,
            DriftsyncError::Tls { .. } => ErrorKind::Tls,
            DriftsyncError::Unauthorized { .. } => ErrorKind::Unauthorized,
            DriftsyncError::Forbidden { .. } => ErrorKind::Forbidden,
            DriftsyncError::Refused { .. } => ErrorKind::Refused,
            DriftsyncError::Protocol { .. } => ErrorKind::Protocol,
            DriftsyncError::Timeout { .. } => ErrorKind::Timeout,
            DriftsyncError::Stopped { .. } => ErrorKind::Stopped,
            DriftsyncError::Internal { .. } => ErrorKind::Internal,
        }
    }

    /// Shorthand for [`ErrorKind::Invalid`].
    pub(crate) fn invalid(reason: impl Into<String>) -> DriftsyncError {
        DriftsyncError::new(ErrorKind::Invalid, reason)
    }

    /// Shorthand for [`ErrorKind::Internal`].
    pub(crate) fn internal(reason: impl Into<String>) -> DriftsyncError {
        DriftsyncError::new(ErrorKind::Internal, reason)
    }
}

/// The kind of a server's refusal.
pub(crate) fn code_kind(code: ErrorCode) -> ErrorKind {
    match code {
        ErrorCode::Unauthorized | ErrorCode::TokenExpired => ErrorKind::Unauthorized,
        ErrorCode::Forbidden | ErrorCode::ReadOnly => ErrorKind::Forbidden,
        ErrorCode::UnsupportedVersion | ErrorCode::Malformed | ErrorCode::FrameTooLarge => ErrorKind::Protocol,
        _ => ErrorKind::Refused,
    }
}

impl From<ClientError> for DriftsyncError {
    fn from(error: ClientError) -> DriftsyncError {
        DriftsyncError::from(&error)
    }
}

impl From<&ClientError> for DriftsyncError {
    fn from(error: &ClientError) -> DriftsyncError {
        use driftsync_engine::Error as EngineError;
        let reason = error.to_string();
        let kind = match error {
            ClientError::Engine(
                EngineError::NotAuthor(_)
                | EngineError::NoSuchMessage(_)
                | EngineError::Invalid(_)
                | EngineError::SchemaViolation(_),
            ) => ErrorKind::Invalid,
            ClientError::Engine(_) => ErrorKind::Store,
            ClientError::DocId(_) | ClientError::Invalid(_) => ErrorKind::Invalid,
            ClientError::Connection(_) | ClientError::Closed => ErrorKind::Unreachable,
            ClientError::Tls(_) => ErrorKind::Tls,
            ClientError::Server { code, .. } => code_kind(*code),
            ClientError::Protocol(_) => ErrorKind::Protocol,
            ClientError::Timeout(_) | ClientError::Silent(_) => ErrorKind::Timeout,
            ClientError::Stopped => ErrorKind::Stopped,
        };
        DriftsyncError::new(kind, reason)
    }
}

/// A foreign callback (token provider) failed in a way its signature does not allow.
impl From<uniffi::UnexpectedUniFFICallbackError> for DriftsyncError {
    fn from(error: uniffi::UnexpectedUniFFICallbackError) -> DriftsyncError {
        DriftsyncError::internal(format!("a callback failed: {}", error.reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        for kind in [
            ErrorKind::Invalid,
            ErrorKind::Store,
            ErrorKind::Unreachable,
            ErrorKind::Tls,
            ErrorKind::Unauthorized,
            ErrorKind::Forbidden,
            ErrorKind::Refused,
            ErrorKind::Protocol,
            ErrorKind::Timeout,
            ErrorKind::Stopped,
            ErrorKind::Internal,
        ] {
            let error = DriftsyncError::new(kind, "why");
            assert_eq!(error.kind(), kind);
            assert!(error.to_string().ends_with("why"));
        }
    }

    #[test]
    fn client_errors_are_typed() {
        let server = |code| ClientError::Server {
            code,
            doc: None,
            batch: None,
        };
        let kind = |e: ClientError| DriftsyncError::from(e).kind();
        assert_eq!(kind(server(ErrorCode::Unauthorized)), ErrorKind::Unauthorized);
        assert_eq!(kind(server(ErrorCode::TokenExpired)), ErrorKind::Unauthorized);
        assert_eq!(kind(server(ErrorCode::ReadOnly)), ErrorKind::Forbidden);
        assert_eq!(kind(server(ErrorCode::RateLimited)), ErrorKind::Refused);
        assert_eq!(kind(server(ErrorCode::UnsupportedVersion)), ErrorKind::Protocol);
        assert_eq!(kind(ClientError::Tls("UnknownIssuer".into())), ErrorKind::Tls);
        assert_eq!(kind(ClientError::Closed), ErrorKind::Unreachable);
        assert_eq!(
            kind(ClientError::Timeout(std::time::Duration::from_secs(1))),
            ErrorKind::Timeout
        );
        assert_eq!(
            kind(ClientError::Engine(driftsync_engine::Error::NoSuchMessage("m".into()))),
            ErrorKind::Invalid
        );
        assert_eq!(
            kind(ClientError::Engine(driftsync_engine::Error::Corrupt {
                doc: "d".into(),
                reason: "r".into()
            })),
            ErrorKind::Store
        );
        assert_eq!(kind(ClientError::Stopped), ErrorKind::Stopped);
    }
}
