//! Serialized bit strings (bytes, bit `j` of byte `k` is bit `8k + j`) to and
//! from `u64` words.
//!
//! With bit `i` in bit `i % 64` of word `i / 64`, the byte string is exactly
//! the words stored little-endian, so on little-endian hosts both directions
//! compile to a copy. [`le_bytes_to_words`] is the one function in the crate
//! allowed to read little-endian integers. This module knows nothing about
//! where the bytes come from.

/// Fills `out[..ceil(bytes.len() / 8)]` from `bytes`, byte `k` of word `w`
/// being `bytes[8w + k]`; a partial last word is zero-padded.
///
/// Precondition: `out.len() >= bytes.len().div_ceil(8)`. If `out` is shorter,
/// only the words that fit are written. Words of `out` past the filled
/// prefix are left unchanged.
#[expect(
    clippy::little_endian_bytes,
    reason = "the serialized bitmap is a little-endian bit string; this is the one conversion point"
)]
pub fn le_bytes_to_words(bytes: &[u8], out: &mut [u64]) {
    let mut chunks = bytes.chunks_exact(8);
    let mut outs = out.iter_mut();
    // `chunks` first: zip must not consume an output word when bytes run out.
    for (c, o) in chunks.by_ref().zip(outs.by_ref()) {
        *o = u64::from_le_bytes(<[u8; 8]>::try_from(c).unwrap_or_default());
    }
    let rest = chunks.remainder();
    if let Some(o) = outs.next().filter(|_| !rest.is_empty()) {
        let mut buf = [0u8; 8];
        buf[..rest.len()].copy_from_slice(rest);
        *o = u64::from_le_bytes(buf);
    }
}

/// Set bits among the first `nbits` bits of a serialized bit string
/// (clipped to `bytes`), counted on the bytes themselves with the
/// dispatched popcount: no conversion to words.
pub fn count_ones(bytes: &[u8], nbits: u64) -> u64 {
    let full = usize::try_from(nbits / 8)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let mut n = super::words::popcount::count_bytes(&bytes[..full]);
    let partial = (nbits % 8) as u32;
    if let Some(&b) = bytes.get(full).filter(|_| partial > 0) {
        n += u64::from((b & ((1u8 << partial) - 1)).count_ones());
    }
    n
}

/// Writes the first `min(out.len(), 8 * words.len())` bytes of the
/// serialized form of `words` into `out`. Bytes of `out` past that are left
/// unchanged.
///
/// Byte `k` is extracted with shifts (`(w >> 8k) as u8`) rather than a
/// little-endian conversion, keeping [`le_bytes_to_words`] the single
/// endianness-sensitive function; LLVM folds the shifts into plain stores.
pub fn words_to_le_bytes(words: &[u64], out: &mut [u8]) {
    let mut chunks = out.chunks_exact_mut(8);
    let mut ws = words.iter();
    for (c, &w) in chunks.by_ref().zip(ws.by_ref()) {
        for (k, b) in c.iter_mut().enumerate() {
            *b = byte_of(w, k);
        }
    }
    let rest = chunks.into_remainder();
    if let Some(&w) = ws.next() {
        for (k, b) in rest.iter_mut().enumerate() {
            *b = byte_of(w, k);
        }
    }
}

/// Byte `k` (0 = least significant) of `w`.
fn byte_of(w: u64, k: usize) -> u8 {
    // Truncation to the low byte is the point.
    (w >> (8 * k)) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Prefix counts against a bit-at-a-time count, `nbits` mid-byte,
        /// mid-word and past the end.
        #[test]
        fn count_ones_matches_bit_at_a_time(
            bytes in prop::collection::vec(any::<u8>(), 0..100),
            nbits in 0u64..900,
        ) {
            let expect = (0..nbits.min(bytes.len() as u64 * 8))
                .filter(|&i| bytes[(i / 8) as usize] >> (i % 8) & 1 == 1)
                .count() as u64;
            prop_assert_eq!(count_ones(&bytes, nbits), expect);
        }
    }

    #[test]
    fn fixed_vector() {
        let mut out = [0u64; 1];
        le_bytes_to_words(&[0x01, 0x00, 0x80], &mut out);
        assert_eq!(out[0], 1 | 1 << 23);
    }

    #[test]
    fn full_and_partial_words() {
        let bytes: Vec<u8> = (1..=11).collect();
        let mut out = [!0u64; 3];
        le_bytes_to_words(&bytes, &mut out);
        assert_eq!(out, [0x0807_0605_0403_0201, 0x0B_0A09, !0]);
        let mut back = [0xEEu8; 12];
        words_to_le_bytes(&out[..2], &mut back);
        assert_eq!(&back[..11], &bytes[..]);
        assert_eq!(back[11], 0);
    }

    #[test]
    fn short_outputs_fill_what_fits() {
        let mut out = [0u64; 1];
        le_bytes_to_words(&[0xFF; 20], &mut out);
        assert_eq!(out, [!0]);
        let mut b = [0u8; 3];
        words_to_le_bytes(&[0x03_0201], &mut b);
        assert_eq!(b, [1, 2, 3]);
        let mut b = [9u8; 10];
        words_to_le_bytes(&[0x03_0201], &mut b);
        assert_eq!(b, [1, 2, 3, 0, 0, 0, 0, 0, 9, 9]);
    }
}
