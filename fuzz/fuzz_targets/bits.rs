//! The bit kernels of `qcow2_bitmap::bits` against a bit-at-a-time oracle
//! over `Vec<bool>` (written here: the crate's own oracle is test-only).
//!
//! The input is decoded with `arbitrary` into two word slices and a list of
//! operations; each operation runs on the slice kernels, on a `Bitmap`, and
//! on the oracle, and every result and every state is compared.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use qcow2_bitmap::bits::{self, Bitmap, bytes, resample, runs::Runs, words};
use std::ops::Range;

/// Bit positions are drawn near the interesting sizes (and past them).
#[derive(Debug, Arbitrary)]
enum Op {
    Or,
    And,
    AndNot,
    Xor,
    Count,
    CountRange(u16, u16),
    Next(bool, u16, u16),
    SetRange(u16, u16),
    ClearRange(u16, u16),
    SetBit(u16),
    ClearBit(u16),
    Runs(u16, u16),
    Bytes,
    FillBytes(u16, Vec<u8>),
    Resample(u8, u8, u16),
    Swap,
}

#[derive(Debug, Arbitrary)]
struct Input {
    a: Vec<u64>,
    b: Vec<u64>,
    /// Bit lengths of the `Bitmap`s built from `a` and `b` (clipped).
    len_a: u16,
    len_b_same: bool,
    len_b: u16,
    ops: Vec<Op>,
}

// ---- the oracle ------------------------------------------------------------

fn bits_of(words: &[u64], len: u64) -> Vec<bool> {
    (0..len)
        .map(|i| {
            words
                .get((i / 64) as usize)
                .is_some_and(|w| w >> (i % 64) & 1 == 1)
        })
        .collect()
}

fn clip(r: &Range<u64>, len: usize) -> Range<usize> {
    let end = (r.end as usize).min(len);
    let start = (r.start as usize).min(end);
    start..end
}

fn runs_of(bits: &[bool], r: Range<u64>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for i in clip(&r, bits.len()).filter(|&i| bits[i]) {
        let i = i as u64;
        match out.last_mut() {
            Some(last) if last.end == i => last.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

fn to_bytes(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
        out[i / 8] |= 1 << (i % 8);
    }
    out
}

/// Target bit `j` covers units `[j << dst, (j + 1) << dst)`; it is set iff a
/// set source bit's units `[i << src, (i + 1) << src)` overlap them.
fn resample_naive(bits: &[bool], src: u32, dst: u32, dst_len: u64) -> Vec<bool> {
    (0..dst_len)
        .map(|j| {
            let (lo, hi) = (u128::from(j) << dst, u128::from(j + 1) << dst);
            let first = lo >> src;
            let end = hi.div_ceil(1u128 << src);
            (first..end.min(bits.len() as u128)).any(|i| bits[i as usize])
        })
        .collect()
}

// ---- checks ------------------------------------------------------------------

fn same(words: &[u64], model: &[bool], what: &str) {
    assert_eq!(
        bits_of(words, model.len() as u64),
        model,
        "{what}: bits differ"
    );
    // Bitmap invariant: nothing set past the length.
    let extra = words.len() as u64 * 64;
    assert!(
        (model.len() as u64..extra).all(|i| words[(i / 64) as usize] >> (i % 64) & 1 == 0),
        "{what}: bits set past the length"
    );
}

fn range(x: u16, y: u16) -> Range<u64> {
    u64::from(x)..u64::from(y)
}

/// A slice kernel and the bit operation it applies.
type Kernel = (fn(&mut [u64], &[u64]), fn(bool, bool) -> bool);

fn binary(
    op: &Op,
    wa: &mut [u64],
    wb: &[u64],
    ma: &mut [bool],
    mb: &[bool],
    ba: &mut Bitmap,
    bb: &Bitmap,
) {
    let (kernel, f): Kernel = match op {
        Op::Or => (words::or_into, |x, y| x | y),
        Op::And => (words::and_into, |x, y| x & y),
        Op::AndNot => (words::andnot_into, |x, y| x & !y),
        _ => (words::xor_into, |x, y| x ^ y),
    };
    // Slice kernels: the common prefix only.
    let before = wa.to_vec();
    kernel(wa, wb);
    let n = wa.len().min(wb.len());
    for k in 0..wa.len() {
        let want = if k < n {
            (0..64).fold(0u64, |acc, i| {
                acc | u64::from(f(before[k] >> i & 1 == 1, wb[k] >> i & 1 == 1)) << i
            })
        } else {
            before[k]
        };
        assert_eq!(wa[k], want, "{op:?} word {k}");
    }
    // Bitmap: same lengths or LengthMismatch with self unchanged.
    let old = ba.clone();
    let r = match op {
        Op::Or => ba.or_assign(bb),
        Op::And => ba.and_assign(bb),
        Op::AndNot => ba.andnot_assign(bb),
        _ => ba.xor_assign(bb),
    };
    if ba.len() == bb.len() {
        assert!(r.is_ok());
        for (x, y) in ma.iter_mut().zip(mb) {
            *x = f(*x, *y);
        }
    } else {
        assert!(
            r.is_err(),
            "{op:?}: lengths {} and {} accepted",
            old.len(),
            bb.len()
        );
        assert_eq!(*ba, old, "{op:?}: changed on a length mismatch");
    }
}

fuzz_target!(|input: Input| {
    let Input {
        mut a,
        mut b,
        len_a,
        len_b_same,
        len_b,
        ops,
    } = input;
    a.truncate(64);
    b.truncate(64);
    let len_a = u64::from(len_a) % 4200;
    let len_b = if len_b_same {
        len_a
    } else {
        u64::from(len_b) % 4200
    };
    let mut ba = Bitmap::from_words(a.clone(), len_a);
    let mut bb = Bitmap::from_words(b.clone(), len_b);
    assert_eq!(ba.words().len(), bits::words_for(len_a));
    let mut ma = bits_of(&a, len_a);
    let mut mb = bits_of(&b, len_b);
    same(ba.words(), &ma, "from_words");
    // Raw slices (no length) and their models.
    let mut wa = a;
    let wb = b;
    let mut sa = bits_of(&wa, wa.len() as u64 * 64);
    for op in ops.iter().take(64) {
        match op {
            Op::Or | Op::And | Op::AndNot | Op::Xor => {
                binary(op, &mut wa, &wb, &mut ma, &mb, &mut ba, &bb);
                sa = bits_of(&wa, wa.len() as u64 * 64);
            }
            Op::Count => {
                let n = sa.iter().filter(|x| **x).count() as u64;
                assert_eq!(words::count_ones(&wa), n);
                assert_eq!(words::count_ones_portable(&wa), n);
                assert_eq!(ba.count_ones(), ma.iter().filter(|x| **x).count() as u64);
                assert_eq!(words::is_all_zero(&wa), n == 0);
                assert_eq!(words::is_all_ones(&wa), n == sa.len() as u64);
                assert_eq!(ba.is_all_zero(), !ma.contains(&true));
                assert_eq!(ba.is_all_ones(), ma.iter().all(|x| *x));
            }
            Op::CountRange(x, y) => {
                let r = range(*x, *y);
                let n = sa[clip(&r, sa.len())].iter().filter(|x| **x).count() as u64;
                assert_eq!(
                    words::count_ones_range(&wa, r.clone()),
                    n,
                    "count_ones_range {r:?}"
                );
                let n = ma[clip(&r, ma.len())].iter().filter(|x| **x).count() as u64;
                assert_eq!(ba.count_ones_in(r.clone()), n, "count_ones_in {r:?}");
            }
            Op::Next(value, x, y) => {
                let (from, end) = (u64::from(*x), u64::from(*y));
                let want = clip(&(from..end), sa.len())
                    .find(|&i| sa[i] == *value)
                    .map(|i| i as u64);
                let got = if *value {
                    words::next_one(&wa, from, end)
                } else {
                    words::next_zero(&wa, from, end)
                };
                assert_eq!(got, want, "next {value} in {from}..{end}");
            }
            Op::SetRange(x, y) | Op::ClearRange(x, y) => {
                let set = matches!(op, Op::SetRange(..));
                let r = range(*x, *y);
                if set {
                    words::set_range(&mut wa, r.clone());
                    ba.set_range(r.clone());
                } else {
                    words::clear_range(&mut wa, r.clone());
                    ba.clear_range(r.clone());
                }
                for i in clip(&r, sa.len()) {
                    sa[i] = set;
                }
                for i in clip(&r, ma.len()) {
                    ma[i] = set;
                }
            }
            Op::SetBit(i) | Op::ClearBit(i) => {
                let set = matches!(op, Op::SetBit(_));
                let i = u64::from(*i) % (ba.len() + 64).max(1);
                if set {
                    ba.set(i)
                } else {
                    ba.clear(i)
                }
                if let Some(x) = ma.get_mut(i as usize) {
                    *x = set;
                }
                assert_eq!(ba.get(i), ma.get(i as usize).copied().unwrap_or(false));
            }
            Op::Runs(x, y) => {
                let r = range(*x, *y);
                let got: Vec<_> = Runs::new(&wa, r.clone()).collect();
                assert_eq!(got, runs_of(&sa, r.clone()), "Runs::new {r:?}");
                let got: Vec<_> = ba.runs_in(r.clone()).collect();
                assert_eq!(got, runs_of(&ma, r.clone()), "runs_in {r:?}");
                let got: Vec<_> = ba.runs().collect();
                assert_eq!(got, runs_of(&ma, 0..ba.len()), "runs");
            }
            Op::Bytes => {
                let want = to_bytes(&ma);
                assert_eq!(ba.to_le_bytes(), want, "to_le_bytes");
                assert_eq!(Bitmap::from_le_bytes(&want, ba.len()), ba, "from_le_bytes");
                let mut out = vec![0xa5u8; wa.len() * 8 + 3];
                bytes::words_to_le_bytes(&wa, &mut out);
                let sb = to_bytes(&sa);
                assert_eq!(&out[..sb.len()], &sb[..], "words_to_le_bytes");
                assert!(
                    out[sb.len()..].iter().all(|&x| x == 0xa5),
                    "words_to_le_bytes wrote past"
                );
                let mut back = vec![!0u64; wa.len() + 1];
                bytes::le_bytes_to_words(&sb, &mut back);
                assert_eq!(&back[..wa.len()], &wa[..], "le_bytes_to_words");
                assert_eq!(back[wa.len()], !0, "le_bytes_to_words wrote past");
            }
            Op::FillBytes(first, data) => {
                let first = u64::from(*first) % (ba.len() + 80).max(1);
                ba.fill_from_le_bytes(first, data);
                for (k, byte) in data.iter().enumerate() {
                    for j in 0..8 {
                        if let Some(x) = ma.get_mut(first as usize + 8 * k + j) {
                            *x = byte >> j & 1 == 1;
                        }
                    }
                }
            }
            Op::Resample(s, d, n) => {
                let (s, d) = (u32::from(*s) % 70, u32::from(*d) % 70);
                let n = u64::from(*n) % 4200;
                let got = resample::resample(&ba, s, d, n);
                assert_eq!(got.len(), n);
                same(
                    got.words(),
                    &resample_naive(&ma, s, d, n),
                    &format!("resample {s}->{d} to {n}"),
                );
            }
            Op::Swap => {
                std::mem::swap(&mut ba, &mut bb);
                std::mem::swap(&mut ma, &mut mb);
            }
        }
        same(&wa, &sa, &format!("words after {op:?}"));
        same(ba.words(), &ma, &format!("bitmap after {op:?}"));
        assert_eq!(ba.len(), ma.len() as u64);
    }
});
