//! `bitvec` against this crate's plain-`u64` kernels, at 2^28 bits (32 MiB,
//! memory-bound), with memcpy and read-and-sum baselines in the same run.
//!
//! Decides whether `bitvec` (`BitVec<u64, Lsb0>`, the same memory layout as
//! our words) would be worth depending on. Each side uses the fastest
//! idiomatic call we found:
//! - `dst |= src`: `BitVec |= &BitVec` (bitvec's batched word path for
//!   equal types) vs `words::or_into`;
//! - popcount: `BitSlice::count_ones` vs `words::count_ones` (run-time
//!   dispatched POPCNT) and `words::count_ones_portable`;
//! - runs of set bits at 1% and 50% random density and clustered runs:
//!   `first_one`/`first_zero` on the remaining subslice (word-accelerated
//!   for `Lsb0`), and `iter_ones()` folded into runs, vs `runs::Runs`.
//!
//! Every iteration checks its answer. Compare ratios, not absolute numbers
//! (the project machines have 2 noisy cores).

use std::hint::black_box;
use std::time::Duration;

use bitvec::prelude::{BitSlice, BitVec, Lsb0};
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use qcow2_bitmap::bits::{Bitmap, runs::Runs, words};

const LOG2_BITS: u32 = 28;

#[path = "common/mod.rs"]
mod common;
use common::{Rng, clustered, half, sparse};

/// The same bits as a `BitVec` (identical memory layout).
fn to_bitvec(b: &Bitmap) -> BitVec<u64, Lsb0> {
    BitVec::from_vec(b.words().to_vec())
}

/// `(number of runs, set bits)` with `runs::Runs`.
fn runs_words(words: &[u64], len: u64) -> (u64, u64) {
    Runs::new(words, 0..len).fold((0, 0), |(n, set), r| (n + 1, set + r.end - r.start))
}

/// `(number of runs, set bits)` alternating `first_one` / `first_zero`.
fn runs_bitvec_search(bits: &BitSlice<u64, Lsb0>) -> (u64, u64) {
    let (mut n, mut set, mut pos) = (0, 0, 0);
    while let Some(s) = bits[pos..].first_one() {
        let start = pos + s;
        let end = bits[start..].first_zero().map_or(bits.len(), |z| start + z);
        n += 1;
        set += (end - start) as u64;
        pos = end;
    }
    (n, set)
}

/// `(number of runs, set bits)` folding `iter_ones()`: a new run starts
/// whenever an index is not one past the previous one.
fn runs_bitvec_iter_ones(bits: &BitSlice<u64, Lsb0>) -> (u64, u64) {
    let (n, set, _) = bits
        .iter_ones()
        .fold((0u64, 0u64, usize::MAX), |(n, set, next), i| {
            (n + u64::from(i != next), set + 1, i + 1)
        });
    (n, set)
}

fn group<'a>(c: &'a mut Criterion, name: &str, nbytes: u64) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(nbytes))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(1));
    g
}

fn bench_ops(c: &mut Criterion, len: u64, rng: &mut Rng) {
    let a = half(len, rng);
    let src = half(len, rng);
    let (a_bv, src_bv) = (to_bitvec(&a), to_bitvec(&src));
    let mut copy = a.clone().into_words();
    let mut dst = a.clone().into_words();
    let mut dst_bv = a_bv.clone();
    let mut expect_or = a.clone();
    expect_or.or_assign(&src).expect("same length");

    let mut g = group(c, "bitvec_vs_words_ops", len / 8);
    g.bench_function("baseline_memcpy", |b| {
        b.iter(|| copy.copy_from_slice(black_box(src.words())))
    });
    g.bench_function("baseline_read_sum", |b| {
        b.iter(|| {
            black_box(src.words())
                .iter()
                .fold(0u64, |acc, &w| acc.wrapping_add(w))
        })
    });
    g.bench_function("or_words", |b| {
        b.iter(|| words::or_into(black_box(&mut dst), black_box(src.words())))
    });
    g.bench_function("or_bitvec", |b| {
        b.iter(|| *black_box(&mut dst_bv) |= black_box(&src_bv))
    });
    // Same answer: both hold a | src (the loops are idempotent).
    assert!(dst == expect_or.words() && dst_bv.as_raw_slice() == expect_or.words());
    let expect = a.count_ones();
    g.bench_function("count_ones_words", |b| {
        b.iter(|| assert_eq!(words::count_ones(black_box(a.words())), expect))
    });
    g.bench_function("count_ones_words_portable", |b| {
        b.iter(|| assert_eq!(words::count_ones_portable(black_box(a.words())), expect))
    });
    g.bench_function("count_ones_bitvec", |b| {
        b.iter(|| assert_eq!(black_box(&a_bv).count_ones() as u64, expect))
    });
    g.finish();
}

fn bench_runs(c: &mut Criterion, len: u64, rng: &mut Rng) {
    let inputs = [
        ("1%", sparse(len, 100, rng)),
        ("50%", half(len, rng)),
        ("clustered", clustered(len, rng)),
    ];
    for (name, bitmap) in &inputs {
        let bv = to_bitvec(bitmap);
        let expect = runs_words(bitmap.words(), len);
        assert_eq!(expect.1, bitmap.count_ones());
        let mut g = group(c, &format!("bitvec_vs_words_runs_{name}"), len / 8);
        g.bench_function("baseline_read_sum", |b| {
            b.iter(|| {
                black_box(bitmap.words())
                    .iter()
                    .fold(0u64, |acc, &w| acc.wrapping_add(w))
            })
        });
        g.bench_function("runs_words", |b| {
            b.iter(|| assert_eq!(runs_words(black_box(bitmap.words()), len), expect))
        });
        g.bench_function("runs_bitvec_first_one_zero", |b| {
            b.iter(|| assert_eq!(runs_bitvec_search(black_box(&bv)), expect))
        });
        g.bench_function("runs_bitvec_iter_ones", |b| {
            b.iter(|| assert_eq!(runs_bitvec_iter_ones(black_box(&bv)), expect))
        });
        g.finish();
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let len = 1u64 << LOG2_BITS;
    let mut rng = Rng(u64::from(LOG2_BITS));
    bench_ops(&mut c, len, &mut rng);
    bench_runs(&mut c, len, &mut rng);
    c.final_summary();
}
