//! [`resample`]: re-express a bitmap at another granularity (QEMU's
//! cross-granularity merge semantic).
//!
//! Bit `i` of a bitmap with shift `s` covers units `[i << s, (i + 1) << s)`. A
//! resampled bit is set iff its units overlap any set source bit: going
//! coarser OR-reduces aligned groups of `2^g` bits, going finer repeats each
//! bit `2^g` times, where `g` is the difference of the shifts. All work is
//! word-level:
//!
//! - coarser, `g >= 6`: every non-zero source word sets one target bit;
//! - coarser, `g < 6`: `g` halving passes, each folding bit pairs with masks;
//! - finer, `g >= 6`: every source run sets a word-aligned target range;
//! - finer, `g < 6`: `g` doubling passes, each spreading bits with masks.
//!
//! Only `g` matters, so any `u32` shifts are accepted (the unit coordinates
//! are treated as exact integers, never overflowing). This module knows
//! nothing about what a unit is.

use super::Bitmap;
use super::mask::WORD_BITS;
use super::words::word_start;

/// `log2(WORD_BITS)`: groups of `2^g` bits with `g >= 6` are whole words.
const WORD_SHIFT: u32 = 6;

/// `src` (bit `i` covering units `[i << src_shift, (i + 1) << src_shift)`)
/// resampled to `dst_len` bits of `2^dst_shift` units each: target bit `j`
/// is set iff its units overlap a set bit of `src`. Target bits past the
/// units covered by `src` are clear.
///
/// Allocates `words_for(dst_len)` words (plus at most as much again while
/// working); bound `dst_len` when it comes from untrusted input.
pub fn resample(src: &Bitmap, src_shift: u32, dst_shift: u32, dst_len: u64) -> Bitmap {
    if dst_shift >= src_shift {
        coarser(src, dst_shift - src_shift, dst_len)
    } else {
        finer(src, src_shift - dst_shift, dst_len)
    }
}

/// OR-reduces groups of `2^g` bits; target bit `j` is source bits
/// `[j << g, (j + 1) << g)`.
fn coarser(src: &Bitmap, g: u32, dst_len: u64) -> Bitmap {
    if g >= WORD_SHIFT {
        // Word `w` (bits [64w, 64w + 64)) lies inside target bit 64w >> g.
        let mut dst = Bitmap::zeros(dst_len);
        let per_word = g - WORD_SHIFT;
        for (w, _) in src.words().iter().enumerate().filter(|&(_, &x)| x != 0) {
            dst.set(shr(word_start(w) >> WORD_SHIFT, per_word));
        }
        return dst;
    }
    // Only source bits below dst_len << g can reach a kept target bit.
    let needed = shl_saturating(dst_len, g).min(src.len());
    let mut cur = Bitmap::from_words(src.words()[..super::words_for(needed)].to_vec(), needed);
    for _ in 0..g {
        cur = halve(&cur);
    }
    Bitmap::from_words(cur.into_words(), dst_len)
}

/// Repeats each bit `2^g` times; target bit `j` is source bit `j >> g`.
fn finer(src: &Bitmap, g: u32, dst_len: u64) -> Bitmap {
    // Source bit i covers target bits [i << g, (i + 1) << g), so only the
    // first ceil(dst_len / 2^g) source bits matter.
    let needed = ceil_shr(dst_len, g).min(src.len());
    if g >= WORD_SHIFT {
        let mut dst = Bitmap::zeros(dst_len);
        for r in src.runs_in(0..needed) {
            dst.set_range(shl_saturating(r.start, g)..shl_saturating(r.end, g));
        }
        return dst;
    }
    let mut cur = Bitmap::from_words(src.words()[..super::words_for(needed)].to_vec(), needed);
    for _ in 0..g {
        cur = double(&cur);
    }
    Bitmap::from_words(cur.into_words(), dst_len)
}

/// Bit `j` of the result is `b[2j] | b[2j + 1]`; length `ceil(len / 2)`.
fn halve(b: &Bitmap) -> Bitmap {
    let words = b
        .words()
        .chunks(2)
        .map(|pair| {
            let lo = compress_pairs(pair[0]);
            let hi = pair.get(1).map_or(0, |&w| compress_pairs(w));
            lo | hi << 32
        })
        .collect();
    Bitmap::from_words(words, b.len().div_ceil(2))
}

/// Bit `j` of the result is `b[j / 2]`; length `2 * len` (saturating).
fn double(b: &Bitmap) -> Bitmap {
    let words = b
        .words()
        .iter()
        .flat_map(|&w| [spread_pairs(w), spread_pairs(w >> 32)])
        .collect();
    Bitmap::from_words(words, b.len().saturating_mul(2))
}

/// The 32 bits `w[2k] | w[2k + 1]`, packed into the low half.
fn compress_pairs(w: u64) -> u64 {
    // Classic bit unzip: gather the even bits with widening masks.
    let mut x = (w | w >> 1) & 0x5555_5555_5555_5555;
    x = (x | x >> 1) & 0x3333_3333_3333_3333;
    x = (x | x >> 2) & 0x0F0F_0F0F_0F0F_0F0F;
    x = (x | x >> 4) & 0x00FF_00FF_00FF_00FF;
    x = (x | x >> 8) & 0x0000_FFFF_0000_FFFF;
    (x | x >> 16) & 0x0000_0000_FFFF_FFFF
}

/// The low 32 bits of `w`, each repeated twice (bit k to bits 2k and 2k + 1).
fn spread_pairs(w: u64) -> u64 {
    // Inverse of `compress_pairs`: scatter to the even bits, then duplicate.
    let mut x = w & 0xFFFF_FFFF;
    x = (x | x << 16) & 0x0000_FFFF_0000_FFFF;
    x = (x | x << 8) & 0x00FF_00FF_00FF_00FF;
    x = (x | x << 4) & 0x0F0F_0F0F_0F0F_0F0F;
    x = (x | x << 2) & 0x3333_3333_3333_3333;
    x = (x | x << 1) & 0x5555_5555_5555_5555;
    x | x << 1
}

/// `x >> g`, zero when `g >= 64`.
fn shr(x: u64, g: u32) -> u64 {
    x.checked_shr(g).unwrap_or(0)
}

/// `ceil(x / 2^g)`, exact for every `g`.
fn ceil_shr(x: u64, g: u32) -> u64 {
    if g >= WORD_BITS as u32 {
        u64::from(x != 0)
    } else {
        x.div_ceil(1 << g)
    }
}

/// `x << g`, saturating at `u64::MAX` (used as "past any end").
fn shl_saturating(x: u64, g: u32) -> u64 {
    if x == 0 {
        0
    } else if g >= WORD_BITS as u32 || x > u64::MAX >> g {
        u64::MAX
    } else {
        x << g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(b: &Bitmap) -> Vec<u64> {
        (0..b.len()).filter(|&i| b.get(i)).collect()
    }

    fn from_bits(len: u64, set: &[u64]) -> Bitmap {
        let mut b = Bitmap::zeros(len);
        set.iter().for_each(|&i| b.set(i));
        b
    }

    #[test]
    fn pair_helpers() {
        assert_eq!(compress_pairs(0b1001_0110), 0b1111);
        assert_eq!(compress_pairs(1 << 63), 1 << 31);
        assert_eq!(spread_pairs(0b101), 0b11_0011);
        assert_eq!(spread_pairs(1 << 31), 0b11 << 62);
    }

    #[test]
    fn coarser_small_and_large_groups() {
        let src = from_bits(200, &[3, 64, 199]);
        assert_eq!(bits(&resample(&src, 9, 11, 50)), [0, 16, 49]);
        assert_eq!(bits(&resample(&src, 0, 7, 2)), [0, 1]);
        assert_eq!(bits(&resample(&src, 0, 70, 3)), [0]);
        assert_eq!(bits(&resample(&src, 0, 6, 2)), [0, 1]);
    }

    #[test]
    fn finer_small_and_large_groups() {
        let src = from_bits(3, &[0, 2]);
        assert_eq!(bits(&resample(&src, 16, 15, 6)), [0, 1, 4, 5]);
        assert_eq!(bits(&resample(&src, 16, 15, 5)), [0, 1, 4]);
        let big = resample(&src, 20, 13, 400);
        assert_eq!(big.count_ones(), 128 + 128);
        assert!(big.get(127) && !big.get(128) && big.get(256) && big.get(383));
        assert!(resample(&src, 63, 0, 1000).is_all_ones());
    }

    #[test]
    fn equal_shifts_truncate_or_extend() {
        let src = from_bits(10, &[1, 9]);
        assert_eq!(bits(&resample(&src, 16, 16, 5)), [1]);
        assert_eq!(bits(&resample(&src, 16, 16, 100)), [1, 9]);
    }
}
