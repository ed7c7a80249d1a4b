//! The guest-data view against the physical floor of the same work, in the
//! same run.
//!
//! The image is written at start by a small in-process qcow2 writer (QEMU's
//! `qemu-io` needs about 5 ms per scattered write; when `qemu-img` is
//! installed it checks the image): 1 TiB virtual, 64 KiB clusters, 8000
//! data and 2000 zero clusters at seeded random places, and 256 MiB of
//! contiguous data (host-contiguous too) in an L2 table of its own. Every
//! data cluster holds different bytes. About 2000 L2 tables, 900 MiB file.
//!
//! - `guest_map_1TiB`: `Chain::open` + the whole `Reader::map` against
//!   `pread` of every L2 table once into one buffer (what any map must read);
//!   throughput is bytes of L2 tables.
//! - `guest_read`: `Reader::read_at` in 4 MiB buffers over the contiguous
//!   256 MiB against `pread` of the same host bytes from the same file in
//!   4 MiB buffers; and `read_at` of each scattered 64 KiB data cluster (in
//!   guest order) against `pread` of the bytes any reader must copy: each
//!   L2 table that maps them once, then each cluster.
//!
//! Compare the ratios to the baselines, not absolute numbers (the project
//! machines have 2 noisy cores).

mod common;

use common::Rng;
use criterion::{Criterion, SamplingMode, Throughput};
use qcow2_bitmap::guest::Chain;
use qcow2_bitmap::lock::Access;
use std::collections::BTreeMap;
use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const CS: u64 = 64 << 10;
const L2_ENTRIES: u64 = CS / 8;
const L2_SPAN: u64 = CS * L2_ENTRIES;
const SIZE: u64 = 1 << 40;
const DATA: usize = 8000;
const ZERO: usize = 2000;
/// The contiguous run: 256 MiB at guest 512 GiB.
const RUN_GOFS: u64 = 512 << 30;
const RUN_LEN: u64 = 256 << 20;
const BUFFER: usize = 4 << 20;
const COPIED: u64 = 1 << 63;

/// What the generated image holds, for the checks and the baselines.
struct Layout {
    /// Host offsets of the L2 tables.
    l2_tables: Vec<u64>,
    /// Host offsets of the L2 tables that map scattered data clusters.
    scattered_l2: Vec<u64>,
    /// (guest, host) offsets of the scattered data clusters.
    scattered: Vec<(u64, u64)>,
    /// Host offset of the contiguous run.
    run_host: u64,
}

enum Cluster {
    Data,
    Zero,
}

/// Writes the image: header, refcount table, one refcount block, L1, then
/// per L1 entry its L2 table followed by its data clusters in guest order.
fn write_image(path: &Path) -> Layout {
    let mut rng = Rng(0x5eed);
    let nclusters = SIZE / CS;
    let run_l1 = RUN_GOFS / L2_SPAN;
    let mut clusters: BTreeMap<u64, Cluster> = BTreeMap::new();
    while clusters.len() < DATA + ZERO {
        let c = rng.next() % nclusters;
        if c * CS / L2_SPAN == run_l1 {
            continue; // the contiguous run's table holds only the run
        }
        let kind = if clusters.len() < DATA {
            Cluster::Data
        } else {
            Cluster::Zero
        };
        clusters.entry(c).or_insert(kind);
    }
    for c in RUN_GOFS / CS..(RUN_GOFS + RUN_LEN) / CS {
        clusters.insert(c, Cluster::Data);
    }
    let l1_size = SIZE / L2_SPAN;
    let (reftable, refblock, l1_off) = (CS, 2 * CS, 3 * CS);
    let mut host = l1_off + (l1_size * 8).div_ceil(CS) * CS;
    let file = File::create(path).expect("create image");
    let mut l1 = vec![0u8; (l1_size * 8) as usize];
    let mut layout = Layout {
        l2_tables: Vec::new(),
        scattered_l2: Vec::new(),
        scattered: Vec::new(),
        run_host: 0,
    };
    let mut pool = vec![0u8; 1 << 20];
    for w in pool.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next().to_be_bytes());
    }
    let mut by_l1: BTreeMap<u64, Vec<(u64, &Cluster)>> = BTreeMap::new();
    for (&c, k) in &clusters {
        by_l1.entry(c / L2_ENTRIES).or_default().push((c, k));
    }
    let mut chunk = Vec::new();
    for (l1i, entries) in by_l1 {
        let l2_off = host;
        host += CS;
        l1[l1i as usize * 8..][..8].copy_from_slice(&(COPIED | l2_off).to_be_bytes());
        layout.l2_tables.push(l2_off);
        let data_before = layout.scattered.len();
        let mut l2 = vec![0u8; CS as usize];
        chunk.clear();
        for (c, kind) in entries {
            let e = match kind {
                Cluster::Zero => 1,
                Cluster::Data => {
                    let gofs = c * CS;
                    if gofs == RUN_GOFS {
                        layout.run_host = host;
                    } else if l1i != run_l1 {
                        layout.scattered.push((gofs, host));
                    }
                    let at = (rng.next() % (pool.len() as u64 - CS)) as usize;
                    let start = chunk.len();
                    chunk.extend_from_slice(&pool[at..at + CS as usize]);
                    chunk[start..start + 8].copy_from_slice(&gofs.to_be_bytes());
                    host += CS;
                    COPIED | (host - CS)
                }
            };
            l2[(c % L2_ENTRIES) as usize * 8..][..8].copy_from_slice(&e.to_be_bytes());
        }
        if layout.scattered.len() > data_before {
            layout.scattered_l2.push(l2_off);
        }
        file.write_all_at(&l2, l2_off).expect("write L2");
        file.write_all_at(&chunk, l2_off + CS).expect("write data");
    }
    let total = host / CS;
    assert!(total <= CS / 2, "one refcount block covers the file");
    let mut rb = vec![0u8; CS as usize];
    for i in 0..total as usize {
        rb[i * 2..][..2].copy_from_slice(&1u16.to_be_bytes());
    }
    let mut rt = vec![0u8; CS as usize];
    rt[..8].copy_from_slice(&refblock.to_be_bytes());
    let mut hdr = vec![0u8; CS as usize];
    let mut put = |at: usize, v: &[u8]| hdr[at..at + v.len()].copy_from_slice(v);
    put(0, b"QFI\xfb");
    put(4, &3u32.to_be_bytes());
    put(20, &16u32.to_be_bytes());
    put(24, &SIZE.to_be_bytes());
    put(36, &(l1_size as u32).to_be_bytes());
    put(40, &l1_off.to_be_bytes());
    put(48, &reftable.to_be_bytes());
    put(56, &1u32.to_be_bytes());
    put(96, &4u32.to_be_bytes());
    put(100, &104u32.to_be_bytes());
    for (buf, at) in [(&hdr, 0), (&rt, reftable), (&rb, refblock), (&l1, l1_off)] {
        file.write_all_at(buf, at).expect("write metadata");
    }
    layout
}

/// `qemu-img check` of the image when QEMU is installed.
fn qemu_check(path: &Path) {
    match Command::new("qemu-img").arg("check").arg(path).output() {
        Ok(out) => assert!(
            out.status.success(),
            "qemu-img check: {}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(_) => eprintln!("guest bench: qemu-img not found, image not checked"),
    }
}

/// Data bytes the map reports, and its entry count.
fn map_data(path: &Path) -> (u64, usize) {
    let chain = Chain::open(path, Access::Read).expect("open chain");
    let mut reader = chain.reader();
    let (mut data, mut n) = (0, 0);
    for e in reader.map(0, chain.virtual_size()).expect("map") {
        let e = e.expect("map entry");
        n += 1;
        if e.data {
            data += e.length;
        }
    }
    (data, n)
}

fn bench_guest(c: &mut Criterion, path: &Path, layout: &Layout) {
    let expected = DATA as u64 * CS + RUN_LEN;
    let (data, entries) = map_data(path);
    assert_eq!(data, expected, "map reports every data cluster");
    let l2_bytes = layout.l2_tables.len() as u64 * CS;
    eprintln!(
        "guest bench image: {} L2 tables, {} map entries, {} MiB of data",
        layout.l2_tables.len(),
        entries,
        data >> 20
    );

    let mut g = c.benchmark_group("guest_map_1TiB");
    g.throughput(Throughput::Bytes(l2_bytes))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("baseline_pread_l2_tables", |b| {
        let mut buf = vec![0u8; CS as usize];
        b.iter(|| {
            let f = File::open(path).expect("open");
            let mut sum = 0u64;
            for &off in black_box(&layout.l2_tables) {
                f.read_exact_at(&mut buf, off).expect("pread");
                sum = sum.wrapping_add(u64::from(buf[0]));
            }
            black_box(sum);
        })
    });
    g.bench_function("open_map", |b| {
        b.iter(|| assert_eq!(map_data(black_box(path)), (data, entries)))
    });
    g.finish();

    let chain = Chain::open(path, Access::Read).expect("open chain");
    let file = File::open(path).expect("open");
    let mut buf = vec![0u8; BUFFER];
    let mut g = c.benchmark_group("guest_read");
    g.throughput(Throughput::Bytes(RUN_LEN))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(3));
    // Same bytes on both sides (checked once).
    chain.reader().read_at(RUN_GOFS, &mut buf).expect("read_at");
    let mut floor = vec![0u8; BUFFER];
    file.read_exact_at(&mut floor, layout.run_host)
        .expect("pread");
    assert!(buf == floor, "read_at returns the host bytes");
    g.bench_function("baseline_pread_256MiB_4MiB", |b| {
        b.iter(|| {
            for at in (0..RUN_LEN).step_by(BUFFER) {
                file.read_exact_at(&mut buf, layout.run_host + at)
                    .expect("pread");
            }
            black_box(buf[0]);
        })
    });
    g.bench_function("read_at_256MiB_4MiB", |b| {
        let mut reader = chain.reader();
        b.iter(|| {
            for at in (0..RUN_LEN).step_by(BUFFER) {
                reader.read_at(RUN_GOFS + at, &mut buf).expect("read_at");
            }
            black_box(buf[0]);
        })
    });
    let scattered = layout.scattered.len() as u64 * CS;
    g.throughput(Throughput::Bytes(scattered));
    let mut cluster = vec![0u8; CS as usize];
    // The mapping must be read too: every L2 table once (the run's table
    // excepted), then every cluster.
    let mut table = vec![0u8; CS as usize];
    g.bench_function("baseline_pread_l2_tables_and_clusters", |b| {
        b.iter(|| {
            for &off in black_box(&layout.scattered_l2) {
                file.read_exact_at(&mut table, off).expect("pread");
            }
            for &(_, host) in black_box(&layout.scattered) {
                file.read_exact_at(&mut cluster, host).expect("pread");
            }
            black_box((table[0], cluster[0]));
        })
    });
    g.bench_function("read_at_scattered_clusters", |b| {
        let mut reader = chain.reader();
        b.iter(|| {
            for &(gofs, _) in black_box(&layout.scattered) {
                reader.read_at(gofs, &mut cluster).expect("read_at");
            }
            black_box(cluster[0]);
        })
    });
    g.finish();
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("guest.qcow2");
    let layout = write_image(&path);
    qemu_check(&path);
    // Warm the page cache: the floors read from it too.
    let f = File::open(&path).expect("open image");
    let mut buf = vec![0u8; BUFFER];
    let mut at = 0;
    while let Ok(n @ 1..) = f.read_at(&mut buf, at) {
        at += n as u64;
    }
    let mut c = Criterion::default().configure_from_args();
    bench_guest(&mut c, &path, &layout);
    c.final_summary();
}
