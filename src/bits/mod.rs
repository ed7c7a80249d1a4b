//! Word-parallel bitmaps: the owned [`Bitmap`] and the slice kernels under it.
//!
//! Bit `i` is bit `i % 64` of word `i / 64` (LSB first), which is also the
//! serialized order: bit `j` of byte `k` is bit `8k + j`, and the bytes are the
//! words stored little-endian. This module knows nothing about qcow2; it does
//! no I/O.
//!
//! - [`words`]: kernels over `&[u64]` (algebra, counts, searches, range fills).
//! - [`runs`]: maximal runs of set bits ([`runs::Runs`]).
//! - [`bytes`]: serialized bytes to and from words.
//! - [`resample`]: change the granularity a bitmap is expressed in.
//!
//! [`Bitmap`] adds a bit length to a word vector and keeps one invariant:
//! **bits at index `>= len` are always zero**, so whole-word kernels (counts,
//! algebra, equality) need no tail handling.

use std::fmt;
use std::ops::Range;

pub mod bytes;
mod mask;
#[cfg(test)]
mod naive;
#[cfg(test)]
mod prop;
pub mod resample;
pub mod runs;
pub mod words;

use mask::{WORD_BITS, below_bit, word_index};

/// Number of `u64` words needed to hold `len` bits: `ceil(len / 64)`,
/// saturating to `usize::MAX` on hosts where it does not fit.
pub fn words_for(len: u64) -> usize {
    usize::try_from(len.div_ceil(WORD_BITS)).unwrap_or(usize::MAX)
}

/// Two bitmaps combined by a binary operation had different lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LengthMismatch {
    /// Length in bits of the bitmap being modified.
    pub left: u64,
    /// Length in bits of the other operand.
    pub right: u64,
}

impl fmt::Display for LengthMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bitmap length mismatch: {} bits vs {} bits",
            self.left, self.right
        )
    }
}

impl std::error::Error for LengthMismatch {}

/// A fixed-length bitmap of `len` bits stored in `u64` words.
///
/// Invariant: `words.len() == words_for(len)` and bits at index `>= len` are
/// zero. Indexing past `len` is not an error: reads return `false`, writes
/// are ignored, ranges are clipped.
///
/// Constructors allocate `words_for(len)` words; like `Vec`, they abort on
/// allocation failure, so callers taking `len` from untrusted input must
/// bound it first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    /// A bitmap of `len` clear bits.
    pub fn zeros(len: u64) -> Bitmap {
        Bitmap {
            words: vec![0; words_for(len)],
            len,
        }
    }

    /// A bitmap of `len` set bits.
    pub fn ones(len: u64) -> Bitmap {
        Bitmap::from_words(vec![!0; words_for(len)], len)
    }

    /// A bitmap of `len` bits taken from `words` (bit `i` in bit `i % 64` of
    /// `words[i / 64]`). `words` is truncated or zero-extended to
    /// [`words_for(len)`](words_for) words and bits past `len` are cleared.
    pub fn from_words(mut words: Vec<u64>, len: u64) -> Bitmap {
        words.resize(words_for(len), 0);
        let mut b = Bitmap { words, len };
        b.clear_tail();
        b
    }

    /// A bitmap of `len` bits from its serialized form (bit `j` of byte `k` is
    /// bit `8k + j`). Missing bytes read as zero, extra bytes and bits past
    /// `len` are ignored.
    pub fn from_le_bytes(bytes: &[u8], len: u64) -> Bitmap {
        let mut b = Bitmap::zeros(len);
        let nbytes = usize::try_from(len.div_ceil(8)).unwrap_or(usize::MAX);
        bytes::le_bytes_to_words(&bytes[..bytes.len().min(nbytes)], &mut b.words);
        b.clear_tail();
        b
    }

    /// The serialized form: exactly `ceil(len / 8)` bytes, bit `i` in bit
    /// `i % 8` of byte `i / 8`; bits past `len` in the last byte are zero.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let nbytes = usize::try_from(self.len.div_ceil(8)).unwrap_or(usize::MAX);
        let mut out = vec![0; nbytes];
        bytes::words_to_le_bytes(&self.words, &mut out);
        out
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if the bitmap has no bits (`len == 0`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The words, `words_for(len)` of them; bits past `len` are zero.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The words, consuming the bitmap.
    pub fn into_words(self) -> Vec<u64> {
        self.words
    }

    /// Bit `i`; `false` when `i >= len`.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[word_index(i)] >> (i % WORD_BITS) & 1 == 1
    }

    /// Sets bit `i`; no-op when `i >= len`.
    pub fn set(&mut self, i: u64) {
        if i < self.len {
            self.words[word_index(i)] |= 1 << (i % WORD_BITS);
        }
    }

    /// Clears bit `i`; no-op when `i >= len`.
    pub fn clear(&mut self, i: u64) {
        if i < self.len {
            self.words[word_index(i)] &= !(1 << (i % WORD_BITS));
        }
    }

    /// Sets the bits in `r`, clipped to `len`.
    pub fn set_range(&mut self, r: Range<u64>) {
        words::set_range(&mut self.words, r.start..r.end.min(self.len));
    }

    /// Clears the bits in `r`, clipped to `len`.
    pub fn clear_range(&mut self, r: Range<u64>) {
        words::clear_range(&mut self.words, r);
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        words::count_ones(&self.words)
    }

    /// Number of set bits in `r`, clipped to `len`.
    pub fn count_ones_in(&self, r: Range<u64>) -> u64 {
        words::count_ones_range(&self.words, r)
    }

    /// True if no bit is set (true when empty).
    pub fn is_all_zero(&self) -> bool {
        words::is_all_zero(&self.words)
    }

    /// True if all `len` bits are set (true when empty).
    pub fn is_all_ones(&self) -> bool {
        let full = word_index(self.len);
        let (body, tail) = self.words.split_at(full.min(self.words.len()));
        words::is_all_ones(body) && tail.iter().all(|&w| w == below_bit(self.len))
    }

    /// `self |= other` (union).
    ///
    /// # Errors
    /// [`LengthMismatch`] if the lengths differ; `self` is then unchanged.
    pub fn or_assign(&mut self, other: &Bitmap) -> Result<(), LengthMismatch> {
        self.check_len(other)?;
        words::or_into(&mut self.words, &other.words);
        Ok(())
    }

    /// `self &= other` (intersection).
    ///
    /// # Errors
    /// [`LengthMismatch`] if the lengths differ; `self` is then unchanged.
    pub fn and_assign(&mut self, other: &Bitmap) -> Result<(), LengthMismatch> {
        self.check_len(other)?;
        words::and_into(&mut self.words, &other.words);
        Ok(())
    }

    /// `self &= !other` (difference).
    ///
    /// # Errors
    /// [`LengthMismatch`] if the lengths differ; `self` is then unchanged.
    pub fn andnot_assign(&mut self, other: &Bitmap) -> Result<(), LengthMismatch> {
        self.check_len(other)?;
        words::andnot_into(&mut self.words, &other.words);
        Ok(())
    }

    /// `self ^= other` (symmetric difference).
    ///
    /// # Errors
    /// [`LengthMismatch`] if the lengths differ; `self` is then unchanged.
    pub fn xor_assign(&mut self, other: &Bitmap) -> Result<(), LengthMismatch> {
        self.check_len(other)?;
        words::xor_into(&mut self.words, &other.words);
        Ok(())
    }

    /// The maximal runs of set bits, in increasing order.
    pub fn runs(&self) -> runs::Runs<'_> {
        runs::Runs::new(&self.words, 0..self.len)
    }

    /// The maximal runs of set bits within `r` (clipped to `len`); runs
    /// crossing the edges of `r` are cut there.
    pub fn runs_in(&self, r: Range<u64>) -> runs::Runs<'_> {
        runs::Runs::new(&self.words, r)
    }

    /// Overwrites bits `[first_bit, first_bit + 8 * bytes.len())`, clipped to
    /// `len`, with the serialized bits `bytes` (bit `j` of `bytes[k]` becomes
    /// bit `first_bit + 8k + j`). Bits outside that range are unchanged.
    ///
    /// This is the bulk path for loading a bitmap piece by piece. It is fast
    /// (a word copy) when `first_bit` is a multiple of 64, which callers
    /// should ensure; any other `first_bit` is handled correctly, bit by bit.
    pub fn fill_from_le_bytes(&mut self, first_bit: u64, bytes: &[u8]) {
        if first_bit >= self.len {
            return;
        }
        let avail = usize::try_from((self.len - first_bit).div_ceil(8)).unwrap_or(usize::MAX);
        let bytes = &bytes[..bytes.len().min(avail)];
        if first_bit % WORD_BITS == 0 {
            self.fill_aligned(word_index(first_bit), bytes);
        } else {
            self.fill_bitwise(first_bit, bytes);
        }
        self.clear_tail();
    }

    /// [`Self::fill_from_le_bytes`] at word `w0`; `bytes` ends inside the bitmap.
    fn fill_aligned(&mut self, w0: usize, bytes: &[u8]) {
        let whole = bytes.len() / 8 * 8;
        let dst = &mut self.words[w0..];
        bytes::le_bytes_to_words(&bytes[..whole], dst);
        let rest = &bytes[whole..];
        if let Some(w) = dst.get_mut(whole / 8).filter(|_| !rest.is_empty()) {
            let mut new = [0u64];
            bytes::le_bytes_to_words(rest, &mut new);
            let keep = !0u64 << (8 * rest.len()); // rest.len() < 8
            *w = (*w & keep) | new[0];
        }
    }

    /// [`Self::fill_from_le_bytes`] for an unaligned `first_bit`, bit by bit.
    fn fill_bitwise(&mut self, first_bit: u64, bytes: &[u8]) {
        let bits = (0u64..)
            .zip(bytes)
            .flat_map(|(k, &b)| (0..8).map(move |j| (8 * k + j, b >> j & 1)));
        for (off, bit) in bits {
            let i = first_bit.saturating_add(off);
            if bit == 1 {
                self.set(i);
            } else {
                self.clear(i);
            }
        }
    }

    /// Restores the invariant: clears the bits of the last word past `len`.
    fn clear_tail(&mut self) {
        if let Some(last) = self.words.last_mut() {
            *last &= below_bit(self.len);
        }
    }

    fn check_len(&self, other: &Bitmap) -> Result<(), LengthMismatch> {
        if self.len == other.len {
            Ok(())
        } else {
            Err(LengthMismatch {
                left: self.len,
                right: other.len,
            })
        }
    }
}
