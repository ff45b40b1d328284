//! The one error type of the protocol crate: everything that can be wrong with bytes from the wire.

/// Why a frame could not be decoded. Decoders return this for every bad input; they never panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame is larger than the negotiated maximum; it was not decoded at all.
    #[error("frame of {size} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Size of the rejected frame in bytes.
        size: usize,
        /// The maximum that was in force.
        max: usize,
    },
    /// The frame has no bytes.
    #[error("empty frame")]
    Empty,
    /// The input ended in the middle of a value.
    #[error("unexpected end of frame")]
    UnexpectedEof,
    /// A lib0 variable-length integer does not fit in 53 bits (what JavaScript can hold).
    #[error("variable-length integer overflows 53 bits")]
    VarIntOverflow,
    /// A message type or sub-type this codec does not know.
    #[error("unknown message type {0}")]
    UnknownMessageType(u64),
    /// A string field is not valid UTF-8.
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// Bytes remained after a complete message.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// A structurally valid frame with a field value that is not allowed (the text says which).
    #[error("invalid field: {0}")]
    Invalid(&'static str),
    /// The postcard decoder rejected the native frame.
    #[error("malformed native frame: {0}")]
    Postcard(#[from] postcard::Error),
}

/// Result alias for this crate.
pub type Result<T, E = DecodeError> = std::result::Result<T, E>;
