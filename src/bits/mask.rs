//! The one range primitive of `bits/`: a bit range over a word slice, as
//! `(word index, mask)` pairs.
//!
//! Every range kernel ([`set_range`](super::words::set_range),
//! [`count_ones_range`](super::words::count_ones_range), ...) is a loop over
//! [`Masks`]: the partial first word, the full middle words (mask `!0`), the
//! partial last word. Clipping to the slice happens here, once. This module
//! knows nothing about what the bits mean.

use std::ops::Range;

/// Number of bits in a word.
pub(crate) const WORD_BITS: u64 = 64;

/// The word index holding bit `bit`, saturating to `usize::MAX` on narrow hosts.
pub(crate) fn word_index(bit: u64) -> usize {
    usize::try_from(bit / WORD_BITS).unwrap_or(usize::MAX)
}

/// Number of bits addressable by `nwords` words, saturating at `u64::MAX`.
pub(crate) fn slice_bits(nwords: usize) -> u64 {
    u64::try_from(nwords)
        .unwrap_or(u64::MAX)
        .saturating_mul(WORD_BITS)
}

/// Mask of the bits at positions `>= (bit % 64)` within a word.
pub(crate) fn from_bit(bit: u64) -> u64 {
    !0u64 << (bit % WORD_BITS)
}

/// Mask of the low `n % 64` bits of a word, or all bits when `n % 64 == 0`.
///
/// This is the mask of the last word of a range ending (exclusively) at `n`.
pub(crate) fn below_bit(n: u64) -> u64 {
    match n % WORD_BITS {
        0 => !0,
        r => !(!0u64 << r),
    }
}

/// `range` clipped to the bits of a slice of `nwords` words.
pub(crate) fn clip(range: Range<u64>, nwords: usize) -> Range<u64> {
    let end = range.end.min(slice_bits(nwords));
    range.start.min(end)..end
}

/// Iterator over the words touched by a bit range, each with the mask of the
/// range's bits in that word. Words are yielded in increasing order; every
/// yielded mask is non-zero.
#[derive(Debug, Clone)]
pub(crate) struct Masks {
    next: usize,
    last: usize,
    first_mask: u64,
    last_mask: u64,
    done: bool,
}

impl Masks {
    /// The masks of `range` over a slice of `nwords` words. The part of the
    /// range past the slice is dropped; an empty (or reversed) range yields
    /// nothing.
    pub(crate) fn new(range: Range<u64>, nwords: usize) -> Masks {
        let r = clip(range, nwords);
        if r.is_empty() {
            return Masks {
                next: 1,
                last: 0,
                first_mask: 0,
                last_mask: 0,
                done: true,
            };
        }
        // `r.end - 1` is the last bit in range; `r.end >= 1` here.
        Masks {
            next: word_index(r.start),
            last: word_index(r.end - 1),
            first_mask: from_bit(r.start),
            last_mask: below_bit(r.end),
            done: false,
        }
    }
}

impl Iterator for Masks {
    type Item = (usize, u64);

    fn next(&mut self) -> Option<(usize, u64)> {
        if self.done {
            return None;
        }
        let i = self.next;
        let mut mask = !0;
        if i == self.last {
            mask &= self.last_mask;
            self.done = true;
        } else {
            self.next = i + 1;
        }
        mask &= std::mem::replace(&mut self.first_mask, !0);
        Some((i, mask))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = if self.done {
            0
        } else {
            self.last - self.next + 1
        };
        (n, Some(n))
    }
}

impl ExactSizeIterator for Masks {}
impl std::iter::FusedIterator for Masks {}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(r: Range<u64>, n: usize) -> Vec<(usize, u64)> {
        Masks::new(r, n).collect()
    }

    #[test]
    fn single_word_partial() {
        assert_eq!(collect(3..5, 1), vec![(0, 0b11000)]);
    }

    #[test]
    fn spans_three_words() {
        assert_eq!(
            collect(60..130, 3),
            vec![(0, 0xF << 60), (1, !0), (2, 0b11)]
        );
    }

    #[test]
    fn word_aligned_edges() {
        assert_eq!(collect(64..128, 4), vec![(1, !0)]);
        assert_eq!(collect(0..64, 1), vec![(0, !0)]);
    }

    #[test]
    fn empty_reversed_and_clipped() {
        assert!(collect(5..5, 2).is_empty());
        #[expect(clippy::reversed_empty_ranges, reason = "testing reversed input")]
        let reversed = 9..5;
        assert!(collect(reversed, 2).is_empty());
        assert!(collect(200..300, 2).is_empty());
        assert_eq!(collect(120..u64::MAX, 2), vec![(1, 0xFF << 56)]);
        assert!(collect(0..10, 0).is_empty());
    }

    #[test]
    fn size_hint_is_exact() {
        let m = Masks::new(10..1000, 100);
        assert_eq!(m.len(), m.count());
    }
}
