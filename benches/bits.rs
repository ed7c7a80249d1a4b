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
use qcow2_bitmap::bits::{bytes, runs::Runs, words};

#[path = "common/mod.rs"]
mod common;
use common::{Rng, clustered, half, sparse};

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
    let serialized = a.to_le_bytes();
    g.bench_function("le_bytes_to_words", |b| {
        b.iter(|| bytes::le_bytes_to_words(black_box(&serialized), black_box(&mut dst)))
    });
    bench_runs(&mut g, len, &mut rng);
    g.finish();
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
