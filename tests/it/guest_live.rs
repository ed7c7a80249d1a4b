//! Live guest-data tests: seeded random chains made now with `qemu-img` and
//! `qemu-io`, read by the CLI and the library, compared with QEMU:
//! - `map --json` byte for byte with `qemu-img map --output=json`;
//! - human `map` with human `qemu-img map` (rows, and exit status: both fail
//!   on compressed clusters after the earlier rows);
//! - the guest bytes (library reads in random-sized chunks) with
//!   `qemu-img convert -O raw` of the top.
//!
//! Shapes: cluster sizes 512 B .. 2 MiB, extended L2, zlib and zstd
//! compression, qcow2 and raw backing files (shorter or longer than the
//! image above), chains of 1..4 layers, external data files (with and
//! without `data_file_raw`); writes of random data (`-s`), patterns, zeros
//! (`-z`, `-z -u`), discards, compressed clusters and the disk's last bytes,
//! aligned and not. `QCOW2_BITMAP_SEED` replays one seed,
//! `QCOW2_BITMAP_GUEST_CASES` sets the count (default 12).

use crate::util::*;
use crate::util::{ours_in as ours, qemu_io_in as qemu_io, sh_in as sh};
use qcow2_bitmap::guest::Chain;
use qcow2_bitmap::lock::Access;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const TOOLS: &[&str] = &["qemu-img", "qemu-io"];
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// One layer's shape.
struct Shape {
    cluster: u64,
    size: u64,
    extended: bool,
    zstd: bool,
    data_file: Option<bool>,
}

fn random_shape(rng: &mut Rng, may_data_file: bool) -> Shape {
    let cluster = rng.pick(&[512, 4 * KIB, 16 * KIB, 64 * KIB, 64 * KIB, 2 * MIB]);
    let size = if cluster == 2 * MIB {
        rng.range(1, 4) * 2 * MIB + rng.pick(&[0, 512, 1536 * KIB])
    } else {
        rng.range(1, 6) * MIB + rng.pick(&[0, 512, 4 * KIB, cluster / 2, 100_000])
    };
    let size = size.next_multiple_of(512);
    Shape {
        cluster,
        size,
        extended: cluster >= 16 * KIB && rng.chance(40),
        zstd: rng.chance(30),
        data_file: (may_data_file && rng.chance(30)).then(|| rng.chance(50)),
    }
}

/// Random qemu-io commands for an image of `size` bytes and `cluster` clusters.
fn random_writes(rng: &mut Rng, s: &Shape, pattern_len: u64) -> Vec<String> {
    let mut cmds = Vec::new();
    // Clusters already written compressed: QEMU refuses (EIO) a second
    // compressed write over one.
    let mut compressed: Vec<(u64, u64)> = Vec::new();
    let n = rng.range(3, 14);
    for _ in 0..n {
        let unit = rng.pick(&[512, 4 * KIB, s.cluster, 64 * KIB]);
        let max_units = (s.size / unit).max(1);
        let off = (rng.range(0, max_units - 1) * unit).min(s.size - 512);
        let len = (rng.range(1, 4) * unit).min(s.size - off).min(pattern_len);
        let len = len.max(512) / 512 * 512;
        let cmd = match rng.range(0, 9) {
            0..=2 => format!("write -s pattern.bin {off} {len}"),
            3 => format!("write -P {} {off} {len}", rng.range(1, 255)),
            4 => format!("write -z {off} {len}"),
            5 => format!("write -z -u {off} {len}"),
            6 => format!("discard {off} {len}"),
            7 if s.data_file.is_none() => {
                // Compressed writes: whole clusters (or up to the end).
                let c = s.cluster;
                let start = (off / c) * c;
                let clusters = rng.range(1, 3).min(pattern_len / c).max(1);
                let len = (clusters * c).min(s.size - start);
                if len % 512 != 0
                    || len == 0
                    || len > pattern_len
                    || compressed
                        .iter()
                        .any(|&(a, b)| start < b && a < start + len)
                {
                    continue;
                }
                compressed.push((start, start + len));
                format!("write -c -s pattern.bin {start} {len}")
            }
            _ => {
                // The disk's last bytes.
                let len = rng.pick(&[512, 4 * KIB, 64 * KIB]).min(s.size);
                format!("write -s pattern.bin {} {len}", s.size - len)
            }
        };
        cmds.push(cmd);
    }
    // QEMU refuses (EIO) some compressed writes over allocated clusters:
    // compress first, then write over it.
    cmds.sort_by_key(|c| !c.starts_with("write -c"));
    cmds
}

/// Builds a random chain in `dir`; returns the top's file name and a description.
fn random_chain(rng: &mut Rng, dir: &Path) -> (String, String) {
    let layers = rng.range(1, 4);
    let mut desc = Vec::new();
    let mut below: Option<(String, &str)> = None;
    let pattern_len = 2 * MIB + 256 * KIB;
    let pattern: Vec<u8> = (0..pattern_len).map(|_| rng.next() as u8).collect();
    std::fs::write(dir.join("pattern.bin"), &pattern).unwrap();
    for i in 0..layers {
        let top = i + 1 == layers;
        if i == 0 && layers > 1 && rng.chance(30) {
            // A raw base with data and holes.
            let name = "l0.raw".to_string();
            let size = rng.range(1, 5) * MIB + rng.pick(&[0, 1000, 4096]);
            let f = std::fs::File::create(dir.join(&name)).unwrap();
            f.set_len(size).unwrap();
            use std::os::unix::fs::FileExt;
            for _ in 0..rng.range(1, 6) {
                let off = rng.range(0, size - 1);
                let len = rng.range(1, 128 * KIB).min(size - off);
                f.write_all_at(&pattern[..len as usize], off).unwrap();
            }
            desc.push(format!("raw {size}"));
            below = Some((name, "raw"));
            continue;
        }
        let s = random_shape(rng, layers == 1);
        let name = format!("l{i}.qcow2");
        let mut opts = format!("cluster_size={}", s.cluster);
        if s.extended {
            opts.push_str(",extended_l2=on");
        }
        if s.zstd {
            opts.push_str(",compression_type=zstd");
        }
        if let Some(raw) = s.data_file {
            // Absolute: a relative data-file name resolves against the current
            // directory (tested through the CLI with the fixtures), and the
            // library reads below run from the test's directory.
            opts.push_str(&format!(",data_file={}/l{i}.data", dir.display()));
            if raw {
                opts.push_str(",data_file_raw=on");
            }
        }
        let size = s.size.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
        if let Some((b, f)) = &below {
            args.extend_from_slice(&["-b", b, "-F", f]);
        }
        args.push(&name);
        args.push(&size);
        sh(dir, "qemu-img", &args);
        let cmds = random_writes(rng, &s, pattern_len);
        qemu_io(dir, &name, &cmds);
        desc.push(format!(
            "qcow2 cs={} size={} ext={} zstd={} df={:?} {cmds:?}",
            s.cluster, s.size, s.extended, s.zstd, s.data_file
        ));
        below = Some((name.clone(), "qcow2"));
        if top {
            return (name, desc.join(" <- "));
        }
    }
    let (name, _) = below.expect("at least one layer");
    (name, desc.join(" <- "))
}

/// Compares map (JSON and human) and the guest bytes of `top` with QEMU.
/// Returns the number of map entries compared.
fn compare_with_qemu(dir: &Path, top: &str, what: &str) -> usize {
    let q = Command::new("qemu-img")
        .args(["map", "--output=json", top])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(q.status.success(), "{what}: qemu-img map failed");
    let o = ours(dir, &["map", "--json", top]);
    assert_eq!(
        stdout(&o),
        String::from_utf8_lossy(&q.stdout),
        "{what}: map --json differs (stderr: {})",
        stderr(&o)
    );
    let qh = Command::new("qemu-img")
        .args(["map", top])
        .current_dir(dir)
        .output()
        .unwrap();
    let oh = ours(dir, &["map", top]);
    assert_eq!(
        stdout(&oh),
        String::from_utf8_lossy(&qh.stdout),
        "{what}: human map differs"
    );
    assert_eq!(
        oh.status.code(),
        qh.status.code(),
        "{what}: human map exit status differs (ours: {})",
        stderr(&oh)
    );
    if !oh.status.success() {
        assert_eq!(stderr(&oh).lines().count(), 1, "{what}: one error line");
    }
    // Guest bytes.
    sh(dir, "qemu-img", &["convert", "-O", "raw", top, "guest.raw"]);
    let want = std::fs::read(dir.join("guest.raw")).unwrap();
    let chain = Chain::open(&dir.join(top), Access::Read).expect("open chain");
    assert_eq!(chain.virtual_size(), want.len() as u64, "{what}: size");
    let mut reader = chain.reader();
    let mut got = vec![0u8; want.len()];
    let mut rng = Rng(want.len() as u64);
    let mut pos = 0usize;
    while pos < got.len() {
        let n = (rng.range(1, 3 * MIB) as usize).min(got.len() - pos);
        let n = if rng.chance(30) {
            n.min(rng.range(1, 5000) as usize)
        } else {
            n
        };
        reader
            .read_at(pos as u64, &mut got[pos..pos + n])
            .unwrap_or_else(|e| panic!("{what}: read {pos}+{n}: {e}"));
        pos += n;
    }
    if got != want {
        let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
        panic!("{what}: guest bytes differ first at offset {first}");
    }
    std::fs::remove_file(dir.join("guest.raw")).unwrap();
    stdout(&o).lines().count()
}

#[test]
fn guest_random_chains_match_qemu() {
    if !qemu_available("guest_random_chains_match_qemu", TOOLS) {
        return;
    }
    let base = env_u64("QCOW2_BITMAP_SEED").unwrap_or(0x6e57_0000_0000_0000);
    let cases = env_u64("QCOW2_BITMAP_GUEST_CASES").unwrap_or(12);
    let started = Instant::now();
    let mut entries = 0;
    for i in 0..cases {
        let seed = base.wrapping_add(i);
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(seed);
        let (top, desc) = random_chain(&mut rng, dir.path());
        let what = format!("seed {seed:#x} ({desc})");
        entries += compare_with_qemu(dir.path(), &top, &what);
    }
    eprintln!(
        "guest_random_chains_match_qemu: {cases} chains, {entries} map entries matched QEMU in {:?}",
        started.elapsed()
    );
    assert!(
        entries > cases as usize,
        "the random chains mapped too little"
    );
}

#[test]
fn guest_relative_backing_names_resolve_like_qemu() {
    if !qemu_available("guest_relative_backing_names_resolve_like_qemu", TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("chain/sub")).unwrap();
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "chain/base.qcow2", "2M"],
    );
    qemu_io(d, "chain/base.qcow2", &["write -P 0x11 0 128k".into()]);
    sh(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "chain/mid.qcow2",
            "2M",
        ],
    );
    qemu_io(d, "chain/mid.qcow2", &["write -P 0x22 64k 64k".into()]);
    sh(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../mid.qcow2",
            "-F",
            "qcow2",
            "chain/sub/top.qcow2",
            "3M",
        ],
    );
    qemu_io(d, "chain/sub/top.qcow2", &["write -P 0x33 1m 64k".into()]);
    // From the chain's directories and from elsewhere: names print as QEMU composes them.
    let n = compare_with_qemu(d, "chain/sub/top.qcow2", "relative chain from above");
    assert!(n >= 4);
    compare_with_qemu(
        &d.join("chain/sub"),
        "top.qcow2",
        "relative chain from its directory",
    );
    let o = ours(d, &["map", "chain/sub/top.qcow2"]);
    assert!(
        stdout(&o).contains("chain/sub/../mid.qcow2"),
        "human map names the middle layer as QEMU composes it: {}",
        stdout(&o)
    );
}
