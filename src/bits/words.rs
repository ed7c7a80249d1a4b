//! Kernels over plain `u64` word slices: bitwise algebra, counting, searching
//! and range fills.
//!
//! Bit `i` of a slice is bit `i % 64` of word `i / 64` (LSB first). Whole-slice
//! kernels are plain `zip`/fold loops that LLVM vectorises; range kernels are
//! loops over the `Masks` primitive (`mask.rs`). Ranges that reach past the slice are
//! clipped to it; an empty or reversed range is a no-op. No kernel allocates
//! or panics. This module does not know about lengths shorter than the slice
//! (that is [`Bitmap`](super::Bitmap)'s job) nor about byte order.

use std::ops::Range;

use super::mask::{Masks, WORD_BITS, below_bit, clip, from_bit, word_index};

#[path = "popcount.rs"]
pub(super) mod popcount;

/// Words scanned per early-exit check in the search loops.
const CHUNK: usize = 8;

/// `dst[k] |= src[k]` over the common prefix of the two slices.
pub fn or_into(dst: &mut [u64], src: &[u64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
}

/// `dst[k] &= src[k]` over the common prefix of the two slices.
///
/// Words of `dst` past `src.len()` are left unchanged.
pub fn and_into(dst: &mut [u64], src: &[u64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d &= *s;
    }
}

/// `dst[k] &= !src[k]` (set difference) over the common prefix of the two slices.
pub fn andnot_into(dst: &mut [u64], src: &[u64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d &= !*s;
    }
}

/// `dst[k] ^= src[k]` over the common prefix of the two slices.
pub fn xor_into(dst: &mut [u64], src: &[u64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= *s;
    }
}

/// Number of set bits in the slice.
///
/// Uses the CPU's popcount instruction when it has one (detected at run
/// time), else [`count_ones_portable`].
pub fn count_ones(words: &[u64]) -> u64 {
    popcount::count(words)
}

/// [`count_ones`] without run-time dispatch: the portable software popcount
/// that CPUs without a popcount instruction get. Public so that benchmarks
/// can measure the two side by side.
pub fn count_ones_portable(words: &[u64]) -> u64 {
    popcount::portable(words)
}

/// Number of set bits with index in `range` (clipped to the slice).
///
/// Not a `Masks` loop like the other range kernels: the whole middle
/// words go to [`count_ones`] as one slice so they get its dispatched
/// popcount; only the partial first and last words are masked here.
pub fn count_ones_range(words: &[u64], range: Range<u64>) -> u64 {
    let r = clip(range, words.len());
    if r.is_empty() {
        return 0;
    }
    let (first, last) = (word_index(r.start), word_index(r.end - 1));
    let (head, tail) = (from_bit(r.start), below_bit(r.end));
    if first == last {
        return u64::from((words[first] & head & tail).count_ones());
    }
    u64::from((words[first] & head).count_ones())
        + count_ones(&words[first + 1..last])
        + u64::from((words[last] & tail).count_ones())
}

/// Index of the first set bit in `[from, end)`, or `None`.
pub fn next_one(words: &[u64], from: u64, end: u64) -> Option<u64> {
    next_differing(words, from..end, 0)
}

/// Index of the first clear bit in `[from, end)`, or `None`.
///
/// Only bits inside the slice are considered: a range reaching past the
/// slice does not find "clear" bits there.
pub fn next_zero(words: &[u64], from: u64, end: u64) -> Option<u64> {
    next_differing(words, from..end, !0)
}

/// True if no bit of the slice is set (true for an empty slice).
pub fn is_all_zero(words: &[u64]) -> bool {
    first_word_not(words, 0).is_none()
}

/// True if every bit of the slice is set (true for an empty slice).
pub fn is_all_ones(words: &[u64]) -> bool {
    first_word_not(words, !0).is_none()
}

/// Sets every bit in `range` (clipped to the slice).
pub fn set_range(words: &mut [u64], range: Range<u64>) {
    for (i, m) in Masks::new(range, words.len()) {
        words[i] |= m;
    }
}

/// Clears every bit in `range` (clipped to the slice).
pub fn clear_range(words: &mut [u64], range: Range<u64>) {
    for (i, m) in Masks::new(range, words.len()) {
        words[i] &= !m;
    }
}

/// Index of the first word not equal to `boring`.
///
/// Scans [`CHUNK`] words per branch: the OR of `w ^ boring` over a chunk is
/// a branch-free, vectorisable reduction, so long runs of boring words (the
/// common case: all-zero regions of a sparse dirty bitmap) cost little more
/// than reading them.
#[inline]
pub(crate) fn first_word_not(words: &[u64], boring: u64) -> Option<usize> {
    let mut chunks = words.chunks_exact(CHUNK);
    let mut base = 0;
    for chunk in &mut chunks {
        if chunk.iter().fold(0, |acc, &w| acc | (w ^ boring)) != 0 {
            return chunk.iter().position(|&w| w != boring).map(|p| base + p);
        }
        base += CHUNK;
    }
    let rest = chunks.remainder();
    rest.iter().position(|&w| w != boring).map(|p| base + p)
}

/// First bit in `range` whose value differs from the bits of `boring`
/// (`0`: find a one; `!0`: find a zero).
fn next_differing(words: &[u64], range: Range<u64>, boring: u64) -> Option<u64> {
    let r = clip(range, words.len());
    if r.is_empty() {
        return None;
    }
    let first = word_index(r.start);
    let last = word_index(r.end - 1);
    let head = (words[first] ^ boring) & from_bit(r.start);
    let (word, bits) = if head != 0 {
        (first, head)
    } else {
        let tail = &words[first + 1..=last];
        let k = first + 1 + first_word_not(tail, boring)?;
        (k, words[k] ^ boring)
    };
    let found = word_start(word) + u64::from(bits.trailing_zeros());
    (found < r.end).then_some(found)
}

/// Index of bit 0 of word `i`.
#[inline]
pub(crate) fn word_start(i: usize) -> u64 {
    // A slice index always fits in u64 on supported hosts (usize <= 64 bits).
    (i as u64) * WORD_BITS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algebra_on_common_prefix() {
        let mut d = vec![0b1100, 0b1010, 7];
        or_into(&mut d, &[0b0011, 0b0101]);
        assert_eq!(d, [0b1111, 0b1111, 7]);
        and_into(&mut d, &[0b0110]);
        assert_eq!(d, [0b0110, 0b1111, 7]);
        andnot_into(&mut d, &[0b0010, 0b0001, 1]);
        assert_eq!(d, [0b0100, 0b1110, 6]);
        xor_into(&mut d, &[!0]);
        assert_eq!(d, [!0b0100, 0b1110, 6]);
    }

    #[test]
    fn counts() {
        let w = [!0, 0b101, 1 << 63];
        assert_eq!(count_ones(&w), 67);
        assert_eq!(count_ones_range(&w, 63..129), 3);
        assert_eq!(count_ones_range(&w, 130..1000), 1);
        assert_eq!(count_ones_range(&w, 7..7), 0);
    }

    #[test]
    fn searches() {
        let w = [0, 0, 1 << 5, !0, !0 ^ (1 << 9)];
        assert_eq!(next_one(&w, 0, 500), Some(133));
        assert_eq!(next_one(&w, 0, 133), None);
        assert_eq!(next_one(&w, 134, 200), Some(192));
        assert_eq!(next_zero(&w, 192, 400), Some(265));
        assert_eq!(next_zero(&w, 266, u64::MAX), None);
        assert_eq!(next_one(&[], 0, 10), None);
    }

    #[test]
    fn all_zero_all_ones() {
        assert!(is_all_zero(&[]) && is_all_ones(&[]));
        let mut w = vec![0; 40];
        assert!(is_all_zero(&w));
        w[37] = 1;
        assert!(!is_all_zero(&w));
        let mut o = vec![!0; 40];
        assert!(is_all_ones(&o));
        o[9] = !1;
        assert!(!is_all_ones(&o));
    }

    #[test]
    fn fills() {
        let mut w = vec![0; 3];
        set_range(&mut w, 62..130);
        assert_eq!(w, [0b11 << 62, !0, 0b11]);
        clear_range(&mut w, 63..129);
        assert_eq!(w, [1 << 62, 0, 0b10]);
        set_range(&mut w, 190..10_000);
        assert_eq!(w[2], 0b11 << 62 | 0b10);
    }
}
