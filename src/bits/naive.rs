//! Bit-at-a-time oracles for every kernel of `bits/`, over a `Vec<bool>` model
//! (test only).
//!
//! Each function is a direct transcription of the kernel's definition with
//! no word tricks, so that the property tests in `prop.rs` can compare the
//! fast code against something obviously right. Speed does not matter here.

use std::ops::Range;

/// The model of a word slice: bit `i` is bit `i % 64` of word `i / 64`.
pub fn bits_of(words: &[u64]) -> Vec<bool> {
    (0..words.len() * 64)
        .map(|i| words[i / 64] >> (i % 64) & 1 == 1)
        .collect()
}

/// Words holding `bits` (inverse of [`bits_of`]), zero-padded to whole words.
pub fn words_of(bits: &[bool]) -> Vec<u64> {
    let mut words = vec![0u64; bits.len().div_ceil(64)];
    for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
        words[i / 64] |= 1 << (i % 64);
    }
    words
}

/// `dst[i] = f(dst[i], src[i])` over the common prefix.
pub fn combine(dst: &mut [bool], src: &[bool], f: impl Fn(bool, bool) -> bool) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f(*d, *s);
    }
}

/// `range` clipped to `0..len`, as `usize` indices (empty if reversed).
pub fn clip(range: &Range<u64>, len: usize) -> Range<usize> {
    let end = usize::try_from(range.end).unwrap_or(usize::MAX).min(len);
    let start = usize::try_from(range.start).unwrap_or(usize::MAX).min(end);
    start..end
}

/// Number of set bits in `range`.
pub fn count_ones_range(bits: &[bool], range: Range<u64>) -> u64 {
    bits[clip(&range, bits.len())]
        .iter()
        .filter(|b| **b)
        .count() as u64
}

/// First index in `[from, end)` holding `value`.
pub fn next(bits: &[bool], from: u64, end: u64, value: bool) -> Option<u64> {
    clip(&(from..end), bits.len())
        .find(|&i| bits[i] == value)
        .map(|i| i as u64)
}

/// Sets every bit of `range` to `value`.
pub fn fill(bits: &mut [bool], range: Range<u64>, value: bool) {
    let r = clip(&range, bits.len());
    bits[r].iter_mut().for_each(|b| *b = value);
}

/// Maximal runs of set bits within `range`.
pub fn runs(bits: &[bool], range: Range<u64>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for i in clip(&range, bits.len()).filter(|&i| bits[i]) {
        let i = i as u64;
        match out.last_mut() {
            Some(last) if last.end == i => last.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// Serialized form: bit `j` of byte `k` is `bits[8k + j]`.
pub fn to_le_bytes(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
        out[i / 8] |= 1 << (i % 8);
    }
    out
}

/// Bits of a serialized string.
pub fn from_le_bytes(bytes: &[u8]) -> Vec<bool> {
    (0..bytes.len() * 8)
        .map(|i| bytes[i / 8] >> (i % 8) & 1 == 1)
        .collect()
}

/// Target bit `j` (units `[j << dst, (j + 1) << dst)`) is set iff some set
/// source bit `i` (units `[i << src, (i + 1) << src)`) overlaps it. Unit
/// coordinates are computed exactly in `u128`.
pub fn resample(bits: &[bool], src: u32, dst: u32, dst_len: u64) -> Vec<bool> {
    let unit_lo = |j: u64| u128::from(j) << dst;
    (0..dst_len)
        .map(|j| {
            // Source bits overlapping [lo, hi): i in [lo >> src, ceil(hi / 2^src)).
            let lo = unit_lo(j) >> src;
            let hi = (unit_lo(j + 1) + (1u128 << src) - 1) >> src;
            let n = bits.len() as u128;
            (lo.min(n)..hi.min(n)).any(|i| bits[i as usize])
        })
        .collect()
}
