//! The lib0 encoding primitives that y-protocols messages are built from.
//!
//! Yjs clients encode their messages with the JavaScript library lib0, so the y-websocket codec in
//! [`crate::yjs`] needs its three primitives: `varUint` (7 bits per byte, least-significant group
//! first, high bit set when more bytes follow), `varUint8Array` (a `varUint` length followed by
//! that many bytes) and `varString` (a `varUint8Array` of UTF-8). The writers append to a
//! `Vec<u8>`; the [`Reader`] borrows its input and never allocates, so a hostile length prefix
//! cannot make it reserve memory, and every bad input is a [`DecodeError`], never a panic.

use crate::{DecodeError, Result};

/// The largest integer a JavaScript number holds exactly (2^53 - 1). lib0 peers never write a
/// larger `varUint`, and [`Reader::read_var_uint`] rejects one.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// The most continuation bytes (bytes with the high bit set) one `varUint` may have. Eight bytes
/// already hold 53 bits; one more allows for a redundant zero group, which lib0 accepts, and
/// anything longer is refused whatever its value.
const MAX_CONTINUATION_BYTES: usize = 8;

/// Appends `n` as a lib0 `varUint`.
///
/// Values above [`MAX_SAFE_INTEGER`] are written faithfully (up to 10 bytes), but neither a
/// JavaScript peer nor [`Reader::read_var_uint`] accepts them: keep protocol values below 2^53.
pub fn write_var_uint(buf: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        // The cast keeps the low 7 bits, which the mask selects anyway.
        buf.push((n & 0x7f) as u8 | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

/// Appends `bytes` as a lib0 `varUint8Array`: its length as a `varUint`, then the bytes.
pub fn write_var_buf(buf: &mut Vec<u8>, bytes: &[u8]) {
    write_var_uint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// Appends `s` as a lib0 `varString`: a `varUint8Array` of its UTF-8 bytes.
pub fn write_var_string(buf: &mut Vec<u8>, s: &str) {
    write_var_buf(buf, s.as_bytes());
}

/// The number of bytes [`write_var_uint`] writes for `n`.
pub(crate) fn var_uint_len(n: u64) -> usize {
    let bits = 64 - n.leading_zeros() as usize;
    bits.div_ceil(7).max(1)
}

/// Reads lib0 primitives from the front of a byte slice.
///
/// Every method either consumes one complete value or fails; after a failure the reader's
/// position is unspecified and it should be dropped. Byte arrays and strings are returned as
/// slices of the input, so reading never allocates.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader positioned at the first byte of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    /// Reads a `varUint`.
    ///
    /// Fails with [`DecodeError::UnexpectedEof`] if the input ends inside it, and with
    /// [`DecodeError::VarIntOverflow`] if its value exceeds [`MAX_SAFE_INTEGER`] or it has more
    /// than eight continuation bytes.
    pub fn read_var_uint(&mut self) -> Result<u64> {
        let mut value: u64 = 0;
        for (i, &byte) in self.rest.iter().enumerate() {
            if i > MAX_CONTINUATION_BYTES {
                return Err(DecodeError::VarIntOverflow);
            }
            // The shift is at most 7 * 8 = 56 and the group below 2^7, so this cannot overflow.
            value |= u64::from(byte & 0x7f) << (7 * i);
            if value > MAX_SAFE_INTEGER {
                return Err(DecodeError::VarIntOverflow);
            }
            if byte & 0x80 == 0 {
                self.rest = self.rest.get(i + 1..).unwrap_or_default();
                return Ok(value);
            }
        }
        if self.rest.len() > MAX_CONTINUATION_BYTES {
            return Err(DecodeError::VarIntOverflow);
        }
        Err(DecodeError::UnexpectedEof)
    }

    /// Reads a `varUint8Array` and returns its bytes as a slice of the input.
    ///
    /// The length prefix is checked against the remaining input before anything else happens:
    /// a length larger than what is left is [`DecodeError::UnexpectedEof`].
    pub fn read_var_buf(&mut self) -> Result<&'a [u8]> {
        let len = self.read_var_uint()?;
        let len = usize::try_from(len).map_err(|_| DecodeError::UnexpectedEof)?;
        if len > self.rest.len() {
            return Err(DecodeError::UnexpectedEof);
        }
        let (bytes, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(bytes)
    }

    /// Reads a `varString`; fails with [`DecodeError::InvalidUtf8`] if it is not UTF-8.
    pub fn read_var_string(&mut self) -> Result<&'a str> {
        std::str::from_utf8(self.read_var_buf()?).map_err(|_| DecodeError::InvalidUtf8)
    }

    /// The number of bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Whether every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Ends reading: fails with [`DecodeError::TrailingBytes`] if any input is left.
    pub fn finish(self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.rest.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(n: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        write_var_uint(&mut buf, n);
        buf
    }

    #[test]
    fn var_uint_matches_lib0_examples() {
        assert_eq!(encoded(0), [0]);
        assert_eq!(encoded(127), [0x7f]);
        assert_eq!(encoded(128), [0x80, 0x01]);
        assert_eq!(encoded(300), [0xac, 0x02]);
        assert_eq!(encoded(1_234_567_890), [0xd2, 0x85, 0xd8, 0xcc, 0x04]);
        assert_eq!(
            encoded(MAX_SAFE_INTEGER),
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]
        );
    }

    #[test]
    fn var_uint_len_matches_the_writer() {
        for n in [0, 1, 127, 128, 16_383, 16_384, MAX_SAFE_INTEGER, u64::MAX] {
            assert_eq!(var_uint_len(n), encoded(n).len(), "{n}");
        }
    }

    #[test]
    fn reads_back_and_tracks_position() {
        let mut buf = Vec::new();
        write_var_uint(&mut buf, MAX_SAFE_INTEGER);
        write_var_buf(&mut buf, &[1, 2, 3]);
        write_var_string(&mut buf, "héllo");
        let mut r = Reader::new(&buf);
        assert_eq!(r.read_var_uint(), Ok(MAX_SAFE_INTEGER));
        assert_eq!(r.read_var_buf(), Ok(&[1u8, 2, 3][..]));
        assert_eq!(r.remaining(), 7);
        assert_eq!(r.read_var_string(), Ok("héllo"));
        assert!(r.is_empty());
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn accepts_redundant_zero_groups_like_lib0() {
        // lib0 accepts a value padded with zero groups; eight continuation bytes are the limit.
        let mut r = Reader::new(&[0x81, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00]);
        assert_eq!(r.read_var_uint(), Ok(1));
        let mut r = Reader::new(&[0x81, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00]);
        assert_eq!(r.read_var_uint(), Err(DecodeError::VarIntOverflow));
    }

    #[test]
    fn rejects_overflow_eof_and_bad_utf8() {
        let mut r = Reader::new(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10]);
        assert_eq!(r.read_var_uint(), Err(DecodeError::VarIntOverflow));
        assert_eq!(Reader::new(&[0x80]).read_var_uint(), Err(DecodeError::UnexpectedEof));
        assert_eq!(Reader::new(&[]).read_var_uint(), Err(DecodeError::UnexpectedEof));
        assert_eq!(Reader::new(&[3, 1, 2]).read_var_buf(), Err(DecodeError::UnexpectedEof));
        assert_eq!(Reader::new(&[1, 0xff]).read_var_string(), Err(DecodeError::InvalidUtf8));
        assert_eq!(Reader::new(&[1]).finish(), Err(DecodeError::TrailingBytes(1)));
    }
}
