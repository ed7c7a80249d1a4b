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
use qcow2_bitmap::bits::{Bitmap, bytes, runs::Runs, words};

/// splitmix64: a tiny deterministic generator for benchmark inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// All-zero bitmap whose pages are really mapped. `Bitmap::zeros` gets
/// calloc'ed memory whose untouched pages all alias the kernel's zero page,
/// which is always in cache and would make sparse inputs look faster than RAM.
fn touched_zeros(len: u64) -> Bitmap {
    let mut b = Bitmap::ones(len);
    b.clear_range(0..len);
    b
}

/// About `len / per` bits set at random positions.
fn sparse(len: u64, per: u64, rng: &mut Rng) -> Bitmap {
    let mut b = touched_zeros(len);
    for _ in 0..(len / per).max(1) {
        b.set(rng.next() % len);
    }
    b
}

/// Each bit set with probability 1/2.
fn half(len: u64, rng: &mut Rng) -> Bitmap {
    let words = (0..len.div_ceil(64)).map(|_| rng.next()).collect();
    Bitmap::from_words(words, len)
}

/// Dirty-extent-like clusters: runs of 1..=4096 bits separated by gaps of
/// 1..=65536 bits.
fn clustered(len: u64, rng: &mut Rng) -> Bitmap {
    let mut b = touched_zeros(len);
    let mut pos = 0;
    while pos < len {
        pos += 1 + rng.next() % 65536;
        let run = 1 + rng.next() % 4096;
        b.set_range(pos..pos.saturating_add(run));
        pos += run;
    }
    b
}

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
