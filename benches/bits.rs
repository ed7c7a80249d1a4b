//! Throughput of the `bits` kernels against memory-bound baselines.
//!
//! Every kernel is measured in bytes of bitmap per second at 2^16 bits
//! (8 KiB, cache-resident) and 2^28 bits (32 MiB, memory-bound), next to two
//! baselines from the same run: `copy_from_slice` (memcpy) and a plain
//! read-and-sum. Compare ratios, not absolute numbers (the project machines
//! have 2 cores). Searching kernels assert their answer every iteration.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use qcow2_bitmap::bits::{Bitmap, bytes, resample::resample, runs::Runs, words};

#[path = "common/mod.rs"]
mod common;
use common::{Rng, clustered, half, sparse, touched_zeros};

fn bench_size(c: &mut Criterion, log2_bits: u32) {
    let len = 1u64 << log2_bits;
    let nbytes = len / 8;
    let mut rng = Rng(u64::from(log2_bits));
    let a = half(len, &mut rng);
    let src = half(len, &mut rng);
    let mut dst = a.clone().into_words();

    let mut g = c.benchmark_group(format!("bits_2^{log2_bits}"));
    g.throughput(Throughput::Bytes(nbytes));
    if log2_bits > 20 {
        g.sampling_mode(SamplingMode::Flat);
    }
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));

    g.bench_function("baseline_memcpy", |b| {
        b.iter(|| dst.copy_from_slice(black_box(src.words())))
    });
    g.bench_function("baseline_read_sum", |b| {
        b.iter(|| {
            black_box(src.words())
                .iter()
                .fold(0u64, |acc, &w| acc.wrapping_add(w))
        })
    });
    g.bench_function("or_into", |b| {
        b.iter(|| words::or_into(black_box(&mut dst), black_box(src.words())))
    });
    g.bench_function("and_into", |b| {
        b.iter(|| words::and_into(black_box(&mut dst), black_box(src.words())))
    });
    g.bench_function("andnot_into", |b| {
        b.iter(|| words::andnot_into(black_box(&mut dst), black_box(src.words())))
    });
    let expect = a.count_ones();
    g.bench_function("count_ones", |b| {
        b.iter(|| assert_eq!(words::count_ones(black_box(a.words())), expect))
    });
    g.bench_function("xor_into", |b| {
        b.iter(|| words::xor_into(black_box(&mut dst), black_box(src.words())))
    });
    let serialized = a.to_le_bytes();
    g.bench_function("count_ones_bytes", |b| {
        b.iter(|| assert_eq!(bytes::count_ones(black_box(&serialized), len), expect))
    });
    g.bench_function("le_bytes_to_words", |b| {
        b.iter(|| bytes::le_bytes_to_words(black_box(&serialized), black_box(&mut dst)))
    });
    let mut out = vec![0u8; serialized.len()];
    g.bench_function("words_to_le_bytes", |b| {
        b.iter(|| bytes::words_to_le_bytes(black_box(a.words()), black_box(&mut out)))
    });
    g.bench_function("set_range_mid_word", |b| {
        b.iter(|| words::set_range(black_box(&mut dst), 3..len - 5))
    });
    g.bench_function("clear_range_mid_word", |b| {
        b.iter(|| words::clear_range(black_box(&mut dst), 3..len - 5))
    });
    let zeros = touched_zeros(len);
    g.bench_function("is_all_zero", |b| {
        b.iter(|| assert!(words::is_all_zero(black_box(zeros.words()))))
    });
    let last = sparse_last(len);
    g.bench_function("next_one_far", |b| {
        b.iter(|| {
            assert_eq!(
                words::next_one(black_box(last.words()), 0, len),
                Some(len - 1)
            )
        })
    });
    g.bench_function("resample_coarser_x8", |b| {
        b.iter(|| black_box(resample(black_box(&a), 16, 19, len / 8)))
    });
    g.bench_function("resample_finer_x8_from_an_eighth", |b| {
        let coarse = resample(&a, 16, 19, len / 8);
        b.iter(|| black_box(resample(black_box(&coarse), 19, 16, len)))
    });
    if log2_bits <= 16 {
        bench_naive(&mut g, &a, &src);
    }
    bench_runs(&mut g, len, &mut rng);
    g.finish();
}

/// Only the last bit set: `next_one` has to skip every word (memory
/// written, so the scan reads real pages, not the shared zero page).
fn sparse_last(len: u64) -> Bitmap {
    let mut b = touched_zeros(len);
    b.set(len - 1);
    b
}

/// Bit-at-a-time versions of `or` and `count` (what the word kernels are
/// checked against in the property tests), at the small size only.
fn bench_naive(g: &mut BenchmarkGroup<'_, WallTime>, a: &Bitmap, src: &Bitmap) {
    let len = a.len();
    let mut dst = a.clone();
    g.bench_function("naive_or_bit_at_a_time", |b| {
        b.iter(|| {
            for i in 0..len {
                if src.get(i) {
                    dst.set(i);
                }
            }
            black_box(&dst);
        })
    });
    let expect = a.count_ones();
    g.bench_function("naive_count_bit_at_a_time", |b| {
        b.iter(|| {
            let n = (0..len).filter(|&i| black_box(a).get(i)).count() as u64;
            assert_eq!(n, expect);
        })
    });
}

fn bench_runs(g: &mut BenchmarkGroup<'_, WallTime>, len: u64, rng: &mut Rng) {
    let inputs = [
        ("runs_0.001%", sparse(len, 100_000, rng)),
        ("runs_1%", sparse(len, 100, rng)),
        ("runs_50%", half(len, rng)),
        ("runs_clustered", clustered(len, rng)),
    ];
    for (name, bitmap) in &inputs {
        let expect = bitmap.count_ones();
        g.bench_function(*name, |b| {
            b.iter(|| {
                let set: u64 = Runs::new(black_box(bitmap.words()), 0..len)
                    .map(|r| r.end - r.start)
                    .sum();
                assert_eq!(set, expect);
            })
        });
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_size(&mut c, 16);
    bench_size(&mut c, 28);
    c.final_summary();
}
