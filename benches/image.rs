//! Loading a 32 MiB bitmap (2^28 bits: 16 TiB virtual size, 64 KiB
//! granularity, 64 KiB clusters) from an image file in the page cache,
//! against mapping and summing the same 32 MiB of bitmap data clusters in
//! the same run.
//!
//! The image is built at start in a temporary directory with `qemu-img` and
//! one `qemu-io` session (the crate's write path cannot allocate clusters
//! yet); without QEMU the benchmark prints a skip message. Every data
//! cluster is allocated: one table entry covers 32 GiB of guest space, and
//! the session dirties a granule at the start of each of the 512 entries
//! plus a few runs inside each. Every iteration checks its answer.
//!
//! Baselines: `mmap_sum` maps the file afresh and sums the data clusters
//! as words; `sum_mapped` sums them in the already-mapped image (no page
//! faults); `mmap_copy` maps afresh and copies them into a new 32 MiB
//! buffer, the floor for a full load (allocation, first-touch faults, copy).
//!
//! Compare the ratios to the baselines, not absolute numbers (the project
//! machines have 2 noisy cores).

use std::fs::File;
use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput};
use qcow2_bitmap::format::bitmap_table::TableEntry;
use qcow2_bitmap::lock::Access;
use qcow2_bitmap::read::{Image, open_path};
use qcow2_bitmap::storage::{MappedFile, ReadAt};

const GRANULE: u64 = 64 << 10;
const ENTRY_SPAN: u64 = 32 << 30;
const ENTRIES: u64 = 512;
/// Bytes of bitmap data: 2^28 bits.
const DATA_BYTES: u64 = 32 << 20;

/// Runs a QEMU tool, panicking with its output if it fails.
fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run QEMU tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `qemu-io` commands: per table entry, its first granule and three
/// runs (16 MiB, 1 MiB, one granule) at offsets that vary with `k`.
fn dirtying_commands() -> Vec<String> {
    let mut cmds = Vec::new();
    for k in 0..ENTRIES {
        let base = k * ENTRY_SPAN;
        let mut write = |off: u64, len: u64| cmds.push(format!("write -q -z -n {off} {len}"));
        write(base, GRANULE);
        write(base + (1 << 30) + (k % 13) * GRANULE, 16 << 20);
        write(base + (9 << 30) + (k % 7) * (3 * GRANULE), 1 << 20);
        write(base + (20 << 30) + k * GRANULE, GRANULE);
    }
    cmds
}

/// Builds the image at `path` with bitmap `b0`; `false` if QEMU is missing.
fn build_image(path: &Path) -> bool {
    let have = |tool: &str| Command::new(tool).arg("--version").output().is_ok();
    if !have("qemu-img") || !have("qemu-io") {
        return false;
    }
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=64k"])
        .arg(path)
        .arg("16T"));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add", "-g", "64K"])
        .arg(path)
        .arg("b0"));
    let mut io = Command::new("qemu-io");
    for c in dirtying_commands() {
        io.arg("-c").arg(c);
    }
    run(io.arg(path));
    true
}

/// Host offsets of the bitmap's data clusters; asserts they cover all
/// `DATA_BYTES` of bitmap data.
fn data_clusters(image: &Image<MappedFile>) -> Vec<u64> {
    let b = image.find("b0").expect("bitmap b0");
    let table = image.table(b).expect("bitmap table");
    let offsets: Vec<u64> = table
        .entries
        .iter()
        .filter_map(|e| match e {
            TableEntry::Data(off) => Some(*off),
            _ => None,
        })
        .collect();
    assert_eq!(
        offsets.len() as u64 * GRANULE,
        DATA_BYTES,
        "every data cluster allocated"
    );
    offsets
}

/// Sum of the data clusters at `offsets` of `storage`, read as words (the
/// same memory traffic as the loader, with the least work per byte).
#[expect(
    clippy::little_endian_bytes,
    reason = "baseline reads bitmap data as little-endian words, like the loader"
)]
fn sum_clusters(storage: &impl ReadAt, offsets: &[u64]) -> u64 {
    let mut scratch = Vec::new();
    let mut sum = 0u64;
    for &off in offsets {
        let bytes = storage
            .read_at(off, GRANULE as usize, &mut scratch)
            .expect("read data cluster");
        sum = bytes.chunks_exact(8).fold(sum, |acc, c| {
            acc.wrapping_add(u64::from_le_bytes(c.try_into().expect("8 bytes")))
        });
    }
    sum
}

/// Copies the data clusters at `offsets` of `storage` into a fresh buffer
/// (the loader's floor: it too allocates the bitmap and fills it).
fn copy_clusters(storage: &impl ReadAt, offsets: &[u64]) -> Vec<u8> {
    let mut out = vec![0u8; DATA_BYTES as usize];
    let mut scratch = Vec::new();
    for (dst, &off) in out.chunks_exact_mut(GRANULE as usize).zip(offsets) {
        let bytes = storage
            .read_at(off, GRANULE as usize, &mut scratch)
            .expect("read data cluster");
        dst.copy_from_slice(bytes);
    }
    out
}

fn bench_image(c: &mut Criterion, path: &Path) {
    let image = open_path(path, Access::ReadForceShare).expect("open image");
    let b = image.find("b0").expect("bitmap b0");
    let offsets = data_clusters(&image);
    let dirty = image.status(b).dirty_bytes.expect("bitmap ok");
    let ones = image.load(b, false).expect("load").count_ones();
    assert_eq!(ones * GRANULE, dirty);
    let byte_sum = sum_clusters(image.storage(), &offsets);
    eprintln!(
        "image: {} data clusters, {} dirty bytes in {} granules",
        offsets.len(),
        dirty,
        ones
    );

    let mut g = c.benchmark_group("image_load_2^28");
    g.throughput(Throughput::Bytes(DATA_BYTES))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    g.bench_function("baseline_mmap_sum", |bench| {
        bench.iter(|| {
            let map = MappedFile::new(File::open(path).expect("open")).expect("map");
            assert_eq!(sum_clusters(&map, black_box(&offsets)), byte_sum);
        })
    });
    g.bench_function("baseline_sum_mapped", |bench| {
        bench.iter(|| assert_eq!(sum_clusters(image.storage(), black_box(&offsets)), byte_sum))
    });
    g.bench_function("baseline_mmap_copy", |bench| {
        bench.iter(|| {
            let map = MappedFile::new(File::open(path).expect("open")).expect("map");
            black_box(copy_clusters(&map, black_box(&offsets)));
        })
    });
    g.bench_function("open_load", |bench| {
        bench.iter(|| {
            let image = open_path(black_box(path), Access::ReadForceShare).expect("open");
            let b = image.find("b0").expect("bitmap b0");
            assert_eq!(image.load(b, false).expect("load").count_ones(), ones);
        })
    });
    let mut reused = image.load(b, false).expect("load");
    g.bench_function("load_into_reused", |bench| {
        bench.iter(|| {
            black_box(&image)
                .load_into(b, false, &mut reused)
                .expect("load");
            assert_eq!(reused.len(), 1 << 28);
        })
    });
    g.bench_function("status", |bench| {
        bench.iter(|| assert_eq!(black_box(&image).status(b).dirty_bytes, Some(dirty)))
    });
    g.bench_function("extents", |bench| {
        bench.iter(|| {
            let total: u64 = black_box(&image)
                .extents(b, None, false)
                .expect("extents")
                .map(|e| e.expect("extent").length)
                .sum();
            assert_eq!(total, dirty);
        })
    });
    g.finish();
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench.qcow2");
    if !build_image(&path) {
        eprintln!("image bench skipped: qemu-img or qemu-io not found");
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    bench_image(&mut c, &path);
    c.final_summary();
}
