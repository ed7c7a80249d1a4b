//! Property tests: every kernel of `bits/` against its oracle in `naive.rs`
//! (test only).
//!
//! Inputs are generated from `(length, density mode, seed)`, so a failure
//! prints a small reproducible triple rather than a long bit vector. Lengths
//! favour word edges (0, 1, 63, 64, 65, 128); ranges favour word boundaries,
//! the length itself, `u64::MAX` and reversed ranges.

use std::ops::Range;

use proptest::prelude::*;

use super::naive;
use super::runs::Runs;
use super::{Bitmap, LengthMismatch, bytes, resample, words, words_for};

/// Deterministic pseudo-random bits (splitmix64), by density mode:
/// 0 sparse, 1 half, 2 clustered runs, 3 all ones, 4 all zeros, 5 dense.
fn gen_bits(len: usize, mode: u8, seed: u64) -> Vec<bool> {
    let mut state = seed;
    let mut rand = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    match mode {
        0 => (0..len).map(|_| rand() % 200 == 0).collect(),
        1 => (0..len).map(|_| rand() % 2 == 0).collect(),
        2 => {
            let mut bits = Vec::with_capacity(len);
            let mut value = rand() % 2 == 0;
            while bits.len() < len {
                let run = 1 + (rand() % 150) as usize;
                bits.extend(std::iter::repeat_n(value, run.min(len - bits.len())));
                value = !value;
            }
            bits
        }
        3 => vec![true; len],
        4 => vec![false; len],
        _ => (0..len).map(|_| rand() % 16 != 0).collect(),
    }
}

fn lens() -> impl Strategy<Value = usize> {
    prop_oneof![
        prop::sample::select(vec![0usize, 1, 63, 64, 65, 127, 128, 129]),
        0usize..5000,
    ]
}

prop_compose! {
    fn arb_bits()(len in lens(), mode in 0u8..6, seed in any::<u64>()) -> Vec<bool> {
        gen_bits(len, mode, seed)
    }
}

/// A range endpoint for a bit string of `len` bits, biased towards edges.
fn point(len: usize, x: u64) -> u64 {
    let len = len as u64;
    match x % 5 {
        0 => (x / 5) % (len + 130),
        1 => ((x / 5) % (len / 64 + 3)) * 64,
        2 => ((x / 5) % (len / 64 + 3)) * 64 + 1 + (x / 5) % 63,
        3 => len,
        _ => u64::MAX,
    }
}

fn range(len: usize, a: u64, b: u64) -> Range<u64> {
    let (a, b) = (point(len, a), point(len, b));
    // Mostly ordered; sometimes reversed (must act as empty).
    if a <= b || a % 7 == 0 { a..b } else { b..a }
}

fn bitmap(bits: &[bool]) -> Bitmap {
    Bitmap::from_words(naive::words_of(bits), bits.len() as u64)
}

/// The model of `b`, after checking the invariant (no bits past len).
fn model(b: &Bitmap) -> Vec<bool> {
    assert_eq!(b.words().len(), words_for(b.len()));
    let mut all = naive::bits_of(b.words());
    assert!(all[b.len() as usize..].iter().all(|x| !x), "tail bits set");
    all.truncate(b.len() as usize);
    all
}

type WordOp = fn(&mut [u64], &[u64]);
type BoolOp = fn(bool, bool) -> bool;
type BitmapOp = fn(&mut Bitmap, &Bitmap) -> Result<(), LengthMismatch>;

const WORD_OPS: [(WordOp, BoolOp); 4] = [
    (words::or_into, |a, b| a | b),
    (words::and_into, |a, b| a & b),
    (words::andnot_into, |a, b| a & !b),
    (words::xor_into, |a, b| a ^ b),
];

proptest! {
    // No regression files: they would land outside `src/bits/`; a failure
    // prints its minimal (length, mode, seed) input instead.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn words_algebra_matches_naive(a in arb_bits(), b in arb_bits()) {
        for (op, f) in WORD_OPS {
            let mut dst = naive::words_of(&a);
            let src = naive::words_of(&b);
            let mut want = naive::bits_of(&dst);
            naive::combine(&mut want, &naive::bits_of(&src), f);
            op(&mut dst, &src);
            prop_assert_eq!(naive::bits_of(&dst), want);
        }
    }

    #[test]
    fn words_counts_and_predicates(a in arb_bits(), x in any::<u64>(), y in any::<u64>()) {
        let w = naive::words_of(&a);
        let m = naive::bits_of(&w);
        let r = range(a.len(), x, y);
        prop_assert_eq!(words::count_ones(&w), naive::count_ones_range(&m, 0..u64::MAX));
        prop_assert_eq!(words::count_ones_range(&w, r.clone()), naive::count_ones_range(&m, r));
        prop_assert_eq!(words::is_all_zero(&w), m.iter().all(|b| !b));
        prop_assert_eq!(words::is_all_ones(&w), m.iter().all(|b| *b));
    }

    #[test]
    fn words_searches(a in arb_bits(), x in any::<u64>(), y in any::<u64>()) {
        let w = naive::words_of(&a);
        let m = naive::bits_of(&w);
        let r = range(a.len(), x, y);
        prop_assert_eq!(words::next_one(&w, r.start, r.end), naive::next(&m, r.start, r.end, true));
        prop_assert_eq!(words::next_zero(&w, r.start, r.end), naive::next(&m, r.start, r.end, false));
    }

    #[test]
    fn words_fills(a in arb_bits(), x in any::<u64>(), y in any::<u64>()) {
        let r = range(a.len(), x, y);
        for value in [true, false] {
            let mut w = naive::words_of(&a);
            let mut m = naive::bits_of(&w);
            if value { words::set_range(&mut w, r.clone()) } else { words::clear_range(&mut w, r.clone()) }
            naive::fill(&mut m, r.clone(), value);
            prop_assert_eq!(naive::bits_of(&w), m);
        }
    }

    #[test]
    fn runs_match_naive_and_are_maximal(a in arb_bits(), x in any::<u64>(), y in any::<u64>()) {
        let w = naive::words_of(&a);
        let m = naive::bits_of(&w);
        let r = range(a.len(), x, y);
        let got: Vec<_> = Runs::new(&w, r.clone()).collect();
        prop_assert_eq!(&got, &naive::runs(&m, r.clone()));
        // Structure: non-empty, sorted, separated by a gap, union = set bits.
        for pair in got.windows(2) {
            prop_assert!(pair[0].end < pair[1].start);
        }
        let union: Vec<u64> = got.iter().flat_map(|g| { assert!(!g.is_empty()); g.clone() }).collect();
        let set: Vec<u64> = naive::clip(&r, m.len()).filter(|&i| m[i]).map(|i| i as u64).collect();
        prop_assert_eq!(union, set);
        // Whole-bitmap runs through Bitmap.
        let b = bitmap(&a);
        let whole: Vec<_> = b.runs().collect();
        prop_assert_eq!(whole, naive::runs(&a, 0..u64::MAX));
        let within: Vec<_> = b.runs_in(r.clone()).collect();
        prop_assert_eq!(within, naive::runs(&a, r));
    }

    #[test]
    fn bytes_conversions(a in arb_bits(), extra in 0usize..3) {
        let ser = naive::to_le_bytes(&a);
        let mut w = vec![0xA5A5_u64; ser.len().div_ceil(8) + extra];
        bytes::le_bytes_to_words(&ser, &mut w);
        let mut want = naive::bits_of(&naive::words_of(&naive::from_le_bytes(&ser)));
        want.extend(naive::bits_of(&vec![0xA5A5; extra]));
        prop_assert_eq!(naive::bits_of(&w), want);
        let mut back = vec![0u8; ser.len()];
        bytes::words_to_le_bytes(&w, &mut back);
        prop_assert_eq!(&back, &ser);
        let b = Bitmap::from_le_bytes(&ser, a.len() as u64);
        prop_assert_eq!(model(&b), a.clone());
        prop_assert_eq!(b.to_le_bytes(), ser);
    }

    #[test]
    fn bitmap_from_le_bytes_pads_and_ignores(a in arb_bits(), len in lens()) {
        let ser = naive::to_le_bytes(&a);
        let b = Bitmap::from_le_bytes(&ser, len as u64);
        let mut want = naive::from_le_bytes(&ser);
        want.resize(len, false);
        prop_assert_eq!(model(&b), want);
    }

    #[test]
    fn bitmap_point_and_range_ops(a in arb_bits(), x in any::<u64>(), y in any::<u64>()) {
        let r = range(a.len(), x, y);
        let mut b = bitmap(&a);
        let mut m = a.clone();
        prop_assert_eq!(b.count_ones(), naive::count_ones_range(&m, 0..u64::MAX));
        prop_assert_eq!(b.count_ones_in(r.clone()), naive::count_ones_range(&m, r.clone()));
        prop_assert_eq!(b.is_all_zero(), m.iter().all(|v| !v));
        prop_assert_eq!(b.is_all_ones(), m.iter().all(|v| *v));
        for i in [r.start, r.end, x % (a.len() as u64 + 70)] {
            prop_assert_eq!(b.get(i), m.get(i as usize).copied().unwrap_or(false));
        }
        b.set(r.start);
        naive::fill(&mut m, r.start..r.start.saturating_add(1), true);
        prop_assert_eq!(model(&b), m.clone());
        b.clear(r.end);
        naive::fill(&mut m, r.end..r.end.saturating_add(1), false);
        prop_assert_eq!(model(&b), m.clone());
        b.set_range(r.clone());
        naive::fill(&mut m, r.clone(), true);
        prop_assert_eq!(model(&b), m.clone());
        prop_assert_eq!(b.is_all_ones(), m.iter().all(|v| *v));
        b.clear_range(r.start / 2..r.end);
        naive::fill(&mut m, r.start / 2..r.end, false);
        prop_assert_eq!(model(&b), m);
    }

    #[test]
    fn bitmap_algebra(len in lens(), m1 in 0u8..6, m2 in 0u8..6, s in any::<u64>()) {
        let a = gen_bits(len, m1, s);
        let c = gen_bits(len, m2, s ^ 0xDEAD);
        let ops: [(BitmapOp, BoolOp); 4] = [
            (Bitmap::or_assign, |x, y| x | y),
            (Bitmap::and_assign, |x, y| x & y),
            (Bitmap::andnot_assign, |x, y| x & !y),
            (Bitmap::xor_assign, |x, y| x ^ y),
        ];
        for (op, f) in ops {
            let mut b = bitmap(&a);
            op(&mut b, &bitmap(&c)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut want = a.clone();
            naive::combine(&mut want, &c, f);
            prop_assert_eq!(model(&b), want);
            let other = Bitmap::zeros(len as u64 + 1);
            let before = b.clone();
            prop_assert_eq!(
                op(&mut b, &other),
                Err(LengthMismatch { left: len as u64, right: len as u64 + 1 })
            );
            prop_assert_eq!(b, before);
        }
    }

    #[test]
    fn bitmap_fill_from_le_bytes(a in arb_bits(), src in arb_bits(), x in any::<u64>(), aligned in any::<bool>()) {
        let mut first = point(a.len(), x).min(a.len() as u64 + 100);
        if aligned {
            first = first / 64 * 64;
        }
        let ser = naive::to_le_bytes(&src);
        let mut b = bitmap(&a);
        b.fill_from_le_bytes(first, &ser);
        let mut want = a.clone();
        for (k, v) in naive::from_le_bytes(&ser).into_iter().enumerate() {
            if let Some(slot) = want.get_mut(first as usize + k) {
                *slot = v;
            }
        }
        prop_assert_eq!(model(&b), want);
    }

    #[test]
    fn resample_matches_naive(
        a in arb_bits(),
        src_shift in 0u32..64,
        delta in prop_oneof![-7i32..=7, -63i32..=63],
        dst_len in prop_oneof![0u64..300, 0u64..6000],
    ) {
        let dst_shift = (src_shift as i32 + delta).clamp(0, 63) as u32;
        let b = bitmap(&a);
        let got = resample::resample(&b, src_shift, dst_shift, dst_len);
        prop_assert_eq!(got.len(), dst_len);
        prop_assert_eq!(model(&got), naive::resample(&a, src_shift, dst_shift, dst_len));
    }
}

#[test]
fn fixed_byte_vector() {
    let b = Bitmap::from_le_bytes(&[0x01, 0x00, 0x80], 24);
    let set: Vec<u64> = (0..24).filter(|&i| b.get(i)).collect();
    assert_eq!(set, [0, 23]);
    assert_eq!(b.to_le_bytes(), [0x01, 0x00, 0x80]);
    let b = Bitmap::from_le_bytes(&[0x01, 0x00, 0x80], 23);
    assert_eq!(b.to_le_bytes(), [0x01, 0x00, 0x00]);
}

#[test]
fn edge_lengths() {
    for len in [0u64, 1, 63, 64, 65] {
        let ones = Bitmap::ones(len);
        assert_eq!(ones.count_ones(), len);
        assert!(ones.is_all_ones());
        assert_eq!(model(&ones).len() as u64, len);
        let zeros = Bitmap::zeros(len);
        assert!(zeros.is_all_zero());
        assert_eq!(zeros.is_all_ones(), len == 0);
        assert_eq!(zeros.is_empty(), len == 0);
        assert_eq!(Bitmap::from_words(vec![!0; 5], len), ones);
        assert_eq!(ones.clone().into_words(), ones.words());
    }
}

#[test]
fn length_mismatch_display() {
    let e = LengthMismatch { left: 3, right: 4 };
    assert_eq!(e.to_string(), "bitmap length mismatch: 3 bits vs 4 bits");
}
