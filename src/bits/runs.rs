//! [`Runs`]: the maximal runs of set bits in a range of a word slice.
//!
//! This is the hot path for turning a dirty bitmap into extents, so it works
//! a word at a time: zero words are skipped in vectorised chunks, and inside
//! a word the run boundaries come from `trailing_zeros`/`trailing_ones`; long
//! runs skip all-ones words the same way. It owns iteration only; it knows
//! nothing about what a bit stands for.

use std::iter::FusedIterator;
use std::ops::Range;

use super::mask::{clip, from_bit, word_index};
use super::words::{first_word_not, word_start};

/// Iterator over the maximal runs of set bits within a bit range of a word
/// slice, in increasing order, as half-open `Range<u64>` bit intervals.
///
/// A run that crosses the range's edge is cut at the edge. Runs are never
/// empty, never adjacent and never overlap.
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    /// The words covering the range (bits of the last word past `end` ignored).
    words: &'a [u64],
    /// Index in `words` of the word held in `cur`.
    idx: usize,
    /// Bits of `words[idx]` not yet reported (bits already passed are cleared).
    cur: u64,
    /// Exclusive end of the range, in bits.
    end: u64,
}

impl<'a> Runs<'a> {
    /// Runs of set bits of `words` inside `range`. The range is clipped to the
    /// slice; an empty or reversed range yields nothing.
    pub fn new(words: &'a [u64], range: Range<u64>) -> Runs<'a> {
        let r = clip(range, words.len());
        if r.is_empty() {
            return Runs::finished(r.end);
        }
        let last = word_index(r.end - 1);
        let idx = word_index(r.start);
        Runs {
            words: &words[..=last],
            idx,
            cur: words[idx] & from_bit(r.start),
            end: r.end,
        }
    }

    /// An iterator that yields nothing more.
    #[inline]
    fn finished(end: u64) -> Runs<'a> {
        Runs {
            words: &[],
            idx: 0,
            cur: 0,
            end,
        }
    }

    /// Moves to the next word holding a set bit; false when none is left.
    #[inline]
    fn seek_one(&mut self) -> bool {
        if self.cur != 0 {
            return true;
        }
        // Dense bitmaps: the next word usually has a bit; skip the chunk scan.
        if let Some(&w) = self.words.get(self.idx + 1).filter(|&&w| w != 0) {
            self.idx += 1;
            self.cur = w;
            return true;
        }
        let rest = self.words.get(self.idx + 1..).unwrap_or(&[]);
        match first_word_not(rest, 0) {
            Some(k) => {
                self.idx += 1 + k;
                self.cur = self.words[self.idx];
                true
            }
            None => false,
        }
    }

    /// With a run starting at bit `tz` of `cur`, returns the run's exclusive
    /// end and leaves `idx`/`cur` just past it.
    #[inline]
    fn run_end(&mut self, tz: u32) -> u64 {
        let ones = (self.cur >> tz).trailing_ones();
        if tz + ones < 64 {
            self.cur &= !0u64 << (tz + ones);
            return word_start(self.idx) + u64::from(tz + ones);
        }
        // The run reaches the top of the word: skip all-ones words.
        let rest = self.words.get(self.idx + 1..).unwrap_or(&[]);
        match first_word_not(rest, !0) {
            Some(k) => {
                self.idx += 1 + k;
                let w = self.words[self.idx];
                let t = w.trailing_ones(); // < 64 as w != !0
                self.cur = w & (!0u64 << t);
                word_start(self.idx) + u64::from(t)
            }
            None => {
                self.idx = self.words.len();
                self.cur = 0;
                self.end
            }
        }
    }
}

impl Iterator for Runs<'_> {
    type Item = Range<u64>;

    #[inline]
    fn next(&mut self) -> Option<Range<u64>> {
        if !self.seek_one() {
            *self = Runs::finished(self.end);
            return None;
        }
        let tz = self.cur.trailing_zeros();
        let start = word_start(self.idx) + u64::from(tz);
        if start >= self.end {
            *self = Runs::finished(self.end);
            return None;
        }
        let stop = self.run_end(tz).min(self.end);
        if stop >= self.end {
            *self = Runs::finished(self.end);
        }
        Some(start..stop)
    }
}

impl FusedIterator for Runs<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(w: &[u64], r: Range<u64>) -> Vec<Range<u64>> {
        Runs::new(w, r).collect()
    }

    #[test]
    fn runs_within_and_across_words() {
        let w = [0b0110_0001, 0, 1 << 63, !0, 0b11];
        assert_eq!(runs(&w, 0..320), vec![0..1, 5..7, 191..258]);
        assert_eq!(runs(&w, 6..200), vec![6..7, 191..200]);
        assert_eq!(runs(&w, 300..9999), vec![]);
    }

    #[test]
    fn run_to_end_of_slice_and_range() {
        let w = [0, !0, !0];
        assert_eq!(runs(&w, 0..u64::MAX), vec![64..192]);
        assert_eq!(runs(&w, 70..100), vec![70..100]);
        assert_eq!(runs(&[], 0..10), vec![]);
    }

    #[test]
    fn fused_after_end() {
        let w = [1];
        let mut it = Runs::new(&w, 0..64);
        assert_eq!(it.next(), Some(0..1));
        assert_eq!(it.next(), None);
        assert_eq!(it.next(), None);
    }
}
