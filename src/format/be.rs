//! Big-endian field access with errors that know the field and its file offset.
//!
//! [`Cursor`] reads fields from a slice that was read from file offset
//! `base`; every failure names the structure (`what`), the field, the
//! absolute offset and the problem. [`Put`] appends fields when encoding.
//! No I/O happens here.

use crate::error::{Error, Result};

/// A reading position over bytes that came from absolute file offset `base`.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    base: u64,
    pos: usize,
    what: &'a str,
}

impl<'a> Cursor<'a> {
    /// A cursor over `buf`, which starts at file offset `base`, for structure `what`.
    pub fn new(buf: &'a [u8], base: u64, what: &'a str) -> Self {
        Cursor {
            buf,
            base,
            pos: 0,
            what,
        }
    }

    /// Absolute file offset of the next byte.
    pub fn offset(&self) -> u64 {
        self.base.saturating_add(self.pos as u64)
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// An error about `field` at the current position.
    pub fn error(&self, field: &str, message: impl Into<String>) -> Error {
        Error::corrupt(format!("{} {field}", self.what), self.offset(), message)
    }

    /// Takes the next `n` bytes of `field`.
    ///
    /// # Errors
    /// `Corrupt` when fewer than `n` bytes are left.
    pub fn bytes(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            let msg = format!("needs {n} bytes but only {} remain", self.remaining());
            return Err(self.error(field, msg));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        let b = self.bytes(N, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    /// Reads a `u8`.
    ///
    /// # Errors
    /// `Corrupt` when the buffer is exhausted.
    pub fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.array::<1>(field)?[0])
    }

    /// Reads a big-endian `u16`.
    ///
    /// # Errors
    /// `Corrupt` when the buffer is exhausted.
    pub fn u16(&mut self, field: &str) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    /// Reads a big-endian `u32`.
    ///
    /// # Errors
    /// `Corrupt` when the buffer is exhausted.
    pub fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    /// Reads a big-endian `u64`.
    ///
    /// # Errors
    /// `Corrupt` when the buffer is exhausted.
    pub fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// Skips to the next multiple of `align` (relative to the buffer start).
    ///
    /// Returns the skipped padding bytes so callers can check they are zero.
    ///
    /// # Errors
    /// `Corrupt` when the padding runs past the buffer.
    pub fn pad_to(&mut self, align: usize, field: &str) -> Result<&'a [u8]> {
        let target = self.pos.next_multiple_of(align);
        self.bytes(target - self.pos, field)
    }
}

/// An append-only big-endian encoder.
#[derive(Debug, Default, Clone)]
pub struct Put {
    buf: Vec<u8>,
}

impl Put {
    /// An empty encoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// An encoder with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Self {
        Put {
            buf: Vec::with_capacity(n),
        }
    }

    /// Appends a `u8`.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Appends a big-endian `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    /// Appends zeros up to the next multiple of `align`.
    pub fn pad_to(&mut self, align: usize) -> &mut Self {
        let target = self.buf.len().next_multiple_of(align);
        self.buf.resize(target, 0);
        self
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The encoded bytes.
    pub fn into_vec(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_reads_big_endian_and_reports_offsets() {
        let buf = [0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0, 0, 0, 0, 9, 0xff];
        let mut c = Cursor::new(&buf, 0x1000, "test record");
        assert_eq!(c.u16("a").unwrap(), 0x1234);
        assert_eq!(c.u16("b").unwrap(), 0x5678);
        assert_eq!(c.u64("c").unwrap(), 9);
        assert_eq!(c.offset(), 0x100c);
        let e = c.u32("d").unwrap_err();
        assert_eq!(
            e.to_string(),
            "test record d at offset 4108 (0x100c): needs 4 bytes but only 1 remain"
        );
        assert_eq!(c.u8("e").unwrap(), 0xff);
    }

    #[test]
    fn padding_round_trip() {
        let mut p = Put::new();
        p.u32(7).u8(1).pad_to(8);
        assert_eq!(p.len(), 8);
        let v = p.into_vec();
        let mut c = Cursor::new(&v, 0, "x");
        assert_eq!(c.u32("a").unwrap(), 7);
        assert_eq!(c.u8("b").unwrap(), 1);
        assert_eq!(c.pad_to(8, "pad").unwrap(), &[0, 0, 0]);
        assert_eq!(c.remaining(), 0);
    }
}
