//! Popcount: the run-time dispatched `words::count_ones` against the portable
//! software loop it replaced and a plain read-and-sum, all in one run.
//!
//! Sizes: 8 KiB (L1/L2), 64 KiB (one 64 KiB bitmap data cluster, what
//! `count_ones_range` sees per table entry) and 32 MiB (memory-bound).
//! Compare ratios to `baseline_read_sum`, not absolute numbers.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use qcow2_bitmap::bits::words;

/// splitmix64 words: half the bits set.
fn random_words(n: usize, seed: u64) -> Vec<u64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        })
        .collect()
}

fn bench_size(c: &mut Criterion, nbytes: usize, name: &str) {
    let w = random_words(nbytes / 8, nbytes as u64);
    let expect = words::count_ones_portable(&w);
    let nbits = w.len() as u64 * 64;
    let mut g = c.benchmark_group(format!("popcount_{name}"));
    g.throughput(Throughput::Bytes(nbytes as u64));
    if nbytes > 1 << 20 {
        g.sampling_mode(SamplingMode::Flat);
    }
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g.bench_function("baseline_read_sum", |b| {
        b.iter(|| {
            black_box(&w[..])
                .iter()
                .fold(0u64, |acc, &x| acc.wrapping_add(x))
        })
    });
    g.bench_function("portable", |b| {
        b.iter(|| assert_eq!(words::count_ones_portable(black_box(&w)), expect))
    });
    g.bench_function("count_ones", |b| {
        b.iter(|| assert_eq!(words::count_ones(black_box(&w)), expect))
    });
    g.bench_function("count_ones_range", |b| {
        b.iter(|| {
            let n = words::count_ones_range(black_box(&w), 3..nbits - 5);
            assert!(n <= expect);
        })
    });
    g.finish();
}

/// A noise-robust cross-check of the criterion numbers: the variants run
/// round-robin (so a burst of load from other processes hits all of them),
/// and each keeps its fastest round. Prints time per call and the ratio to
/// the read-and-sum baseline.
fn interleaved(nbytes: usize, name: &str, rounds: usize) {
    let w = random_words(nbytes / 8, nbytes as u64 + 1);
    type Kernel = fn(&[u64]) -> u64;
    let read_sum: Kernel = |w| w.iter().fold(0u64, |acc, &x| acc.wrapping_add(x));
    let kernels: [(&str, Kernel); 3] = [
        ("baseline_read_sum", read_sum),
        ("portable", words::count_ones_portable),
        ("count_ones", words::count_ones),
    ];
    let reps = (256 << 10) / nbytes + 1;
    let mut best = [Duration::MAX; 3];
    for _ in 0..rounds {
        for (k, (_, f)) in kernels.iter().enumerate() {
            let t = Instant::now();
            for _ in 0..reps {
                black_box(f(black_box(&w)));
            }
            best[k] = best[k].min(t.elapsed() / reps as u32);
        }
    }
    for (k, (kname, _)) in kernels.iter().enumerate() {
        let ratio = best[k].as_secs_f64() / best[0].as_secs_f64();
        println!(
            "interleaved {name:>5} {kname:18} {:>12?} {ratio:5.2}x read_sum",
            best[k]
        );
    }
}

fn main() {
    interleaved(8 << 10, "8KiB", 201);
    interleaved(64 << 10, "64KiB", 201);
    interleaved(32 << 20, "32MiB", 41);
    let mut c = Criterion::default().configure_from_args();
    bench_size(&mut c, 8 << 10, "8KiB");
    bench_size(&mut c, 64 << 10, "64KiB");
    bench_size(&mut c, 32 << 20, "32MiB");
    c.final_summary();
}
