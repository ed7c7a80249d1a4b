//! The refcount check against `qemu-img check --output=json`: images made
//! with qemu-img/qemu-io (cluster sizes, refcount widths, extended L2,
//! compression, snapshots, bitmaps, LUKS, leaks and corruptions made on
//! purpose) and every committed fixture must give the same leaks,
//! corruptions, check errors, image end offset and cluster counts.
//!
//! Without qemu-img the QEMU part prints `SKIPPED: qemu-img not found` and
//! passes, unless `QCOW2_BITMAP_REQUIRE_QEMU=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2_bitmap::format::header::Header;
use qcow2_bitmap::format::refcount;
use qcow2_bitmap::read::refcheck::{FindingKind, Owner};
use qcow2_bitmap::read::{Image, RefcountReport, refcount_check};

fn have_qemu() -> bool {
    let found = Command::new("qemu-img").arg("--version").output().is_ok();
    if !found {
        if std::env::var("QCOW2_BITMAP_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("qemu-img not found and QCOW2_BITMAP_REQUIRE_QEMU=1");
        }
        eprintln!("SKIPPED: qemu-img not found");
    }
    found
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "script failed: {script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ours(path: &Path) -> RefcountReport {
    let bytes = std::fs::read(path).unwrap();
    let image = Image::open(bytes).unwrap();
    refcount_check(&image).unwrap()
}

/// The numbers qemu-img check reports, missing keys as 0.
#[derive(Debug, PartialEq, Eq)]
struct Numbers {
    leaks: u64,
    corruptions: u64,
    check_errors: u64,
    image_end_offset: u64,
    total_clusters: u64,
    allocated_clusters: u64,
    compressed_clusters: u64,
}

fn from_json(text: &str) -> Numbers {
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    Numbers {
        leaks: n("leaks"),
        corruptions: n("corruptions"),
        check_errors: n("check-errors"),
        image_end_offset: n("image-end-offset"),
        total_clusters: n("total-clusters"),
        allocated_clusters: n("allocated-clusters"),
        compressed_clusters: n("compressed-clusters"),
    }
}

fn from_report(r: &RefcountReport) -> Numbers {
    Numbers {
        leaks: r.leaks,
        corruptions: r.corruptions,
        check_errors: r.check_errors,
        image_end_offset: r.image_end_offset,
        total_clusters: r.total_clusters,
        allocated_clusters: r.allocated_clusters,
        compressed_clusters: r.compressed_clusters,
    }
}

/// Runs both checks on `path`; returns our report after asserting agreement.
fn agree(path: &Path, extra: &[&str]) -> RefcountReport {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["check", "--output=json"]).args(extra);
    if !extra.contains(&"--image-opts") {
        cmd.args(["-f", "qcow2"]).arg(path);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.trim().is_empty(),
        "qemu-img check printed nothing for {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = ours(path);
    let want = from_json(&text);
    assert_eq!(
        from_report(&report),
        want,
        "{}\nqemu-img stderr:\n{}\nour findings: {:?}\nour diagnostics: {:?}",
        path.display(),
        String::from_utf8_lossy(&out.stderr),
        report.findings,
        report.diagnostics
    );
    report
}

struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn run(&self, script: &str) {
        sh(self.dir.path(), script);
    }
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// First data cluster mapped by the active L1 (the host offset).
fn first_data_cluster(bytes: &[u8], h: &Header) -> u64 {
    let l1 = h.l1_table_offset as usize;
    let l2 = (read_u64(bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let step = if h.incompatible_features & 16 != 0 {
        16
    } else {
        8
    };
    (0..(1usize << h.cluster_bits) / step)
        .map(|i| read_u64(bytes, l2 + i * step) & 0x00ff_ffff_ffff_fe00)
        .find(|&o| o != 0)
        .unwrap()
}

/// Sets the stored refcount of the cluster at `offset` to `value`.
fn patch_refcount(path: &Path, offset: u64, value: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    let h = Header::decode(&bytes).unwrap();
    let cluster = offset >> h.cluster_bits;
    let per_block = refcount::entries_per_block(h.cluster_bits, h.refcount_order);
    let rt = h.refcount_table_offset as usize + 8 * (cluster / per_block) as usize;
    let block = read_u64(&bytes, rt) as usize;
    let len = 1usize << h.cluster_bits;
    let index = (cluster % per_block) as usize;
    refcount::set(
        &mut bytes[block..block + len],
        index,
        h.refcount_order,
        value,
    );
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn plain_images_at_several_cluster_sizes_and_refcount_widths() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    for (cs, rb) in [
        (512, 16),
        (4096, 16),
        (65536, 16),
        (2 << 20, 16),
        (4096, 1),
        (65536, 64),
    ] {
        let name = format!("p{cs}-{rb}.qcow2");
        s.run(&format!(
            "qemu-img create -q -f qcow2 -o cluster_size={cs},refcount_bits={rb} {name} 64M
             qemu-io -f qcow2 -c 'write -P 1 0 100k' -c 'write -P 2 5M 3k' -c 'write -z 9M 64k' -c 'write -z -u 20M 128k' {name} >/dev/null"
        ));
        let r = agree(&s.path(&name), &[]);
        assert!(r.is_clean(), "{name}: {r:?}");
        assert_eq!(r.map.owners(0), [Owner::Header]);
    }
    // Preallocated images: metadata and falloc/full data clusters.
    s.run("qemu-img create -q -f qcow2 -o preallocation=metadata,cluster_size=4096 pm.qcow2 8M");
    agree(&s.path("pm.qcow2"), &[]);
    s.run(
        "qemu-img create -q -f qcow2 -o preallocation=falloc pf.qcow2 8M
           qemu-io -f qcow2 -c 'write -z 1M 2M' pf.qcow2 >/dev/null",
    );
    agree(&s.path("pf.qcow2"), &[]);
}

#[test]
fn extended_l2_and_compressed_clusters() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    s.run("qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k x.qcow2 32M
           qemu-io -f qcow2 -c 'write -P 3 0 4k' -c 'write -P 4 70k 2k' -c 'write -z 1M 8k' -c 'write -z 2M 64k' -c 'discard 2M 32k' x.qcow2 >/dev/null");
    agree(&s.path("x.qcow2"), &[]);
    for cs in ["4k", "64k", "512"] {
        s.run(&format!(
            "qemu-img create -q -f qcow2 -o cluster_size={cs} c{cs}.qcow2 16M
             qemu-io -f qcow2 -c 'write -c -P 5 0 64k' -c 'write -c -P 6 1M 64k' -c 'write -P 7 2M 64k' c{cs}.qcow2 >/dev/null"
        ));
        let r = agree(&s.path(&format!("c{cs}.qcow2")), &[]);
        assert!(r.compressed_clusters > 0);
    }
    s.run(
        "qemu-img create -q -f qcow2 -o extended_l2=on xc.qcow2 16M
           qemu-io -f qcow2 -c 'write -c -P 5 0 64k' -c 'write -P 1 1M 4k' xc.qcow2 >/dev/null
           qemu-io -f qcow2 -c 'write -P 9 8M 3M' raw.qcow2 2>/dev/null || true
           qemu-img create -q -f raw src.raw 16M
           qemu-io -f raw -c 'write -P 9 0 3M' -c 'write -P 0x11 5M 1M' src.raw >/dev/null
           qemu-img convert -c -O qcow2 src.raw conv.qcow2
           qemu-img convert -c -O qcow2 -o cluster_size=4k src.raw conv4k.qcow2",
    );
    agree(&s.path("xc.qcow2"), &[]);
    let r = agree(&s.path("conv.qcow2"), &[]);
    assert!(r.map.owners(r.findings.len() as u64).len() <= 1);
    agree(&s.path("conv4k.qcow2"), &[]);
}

#[test]
fn internal_snapshots() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    for (cs, rb) in [("64k", 16), ("4k", 16), ("512", 8)] {
        let n = format!("s{cs}.qcow2");
        s.run(&format!(
            "qemu-img create -q -f qcow2 -o cluster_size={cs},refcount_bits={rb} {n} 16M
             qemu-io -f qcow2 -c 'write -P 1 0 256k' -c 'write -c -P 2 1M 64k' {n} >/dev/null
             qemu-img snapshot -c s1 {n}
             qemu-io -f qcow2 -c 'write -P 3 64k 64k' -c 'write -P 4 4M 64k' {n} >/dev/null
             qemu-img snapshot -c s2 {n}
             qemu-io -f qcow2 -c 'write -P 5 0 8k' {n} >/dev/null"
        ));
        let r = agree(&s.path(&n), &[]);
        assert!(r.is_clean());
        s.run(&format!("qemu-img snapshot -d s1 {n}"));
        agree(&s.path(&n), &[]);
    }
}

#[test]
fn bitmaps_and_stale_bitmaps() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    s.run(
        "qemu-img create -q -f qcow2 -o cluster_size=4k b.qcow2 64M
           qemu-img bitmap --add b.qcow2 b0
           qemu-img bitmap --add -g 512 b.qcow2 b1
           qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write 40M 64k' b.qcow2 >/dev/null
           qemu-img bitmap --add --disable b.qcow2 b2",
    );
    let r = agree(&s.path("b.qcow2"), &[]);
    assert!(r.is_clean());
    let owned: Vec<Owner> = (0..r.map.len()).flat_map(|c| r.map.owners(c)).collect();
    assert!(owned.contains(&Owner::BitmapDirectory));
    assert!(owned.contains(&Owner::BitmapData { bitmap: 1 }));
    // In-use bitmaps after a crash still own their clusters.
    s.run(
        "cp b.qcow2 crash.qcow2
           qemu-io -f qcow2 -c 'write 2M 4k' -c abort crash.qcow2 >/dev/null 2>&1 || true",
    );
    agree(&s.path("crash.qcow2"), &[]);
    // An invalid table entry in an in-use bitmap: QEMU opens the image but
    // the check fails ("Check failed: Invalid argument", rc 1).
    let crash = s.path("crash.qcow2");
    let image = Image::open(std::fs::read(&crash).unwrap()).unwrap();
    let table = image.bitmaps()[0].entry.table_offset;
    patch_u64(&crash, table, 0x1000 | 1);
    let rc = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&crash)
        .output()
        .unwrap();
    assert_eq!(rc.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&rc.stderr).contains("Check failed"));
    assert!(ours(&crash).aborted.is_some());
    // Our walk goes on past the entry (it references nothing): still complete.
    assert!(ours(&crash).incomplete.is_none());
    // Clearing autoclear bit 0 makes the bitmap clusters leak.
    let mut bytes = std::fs::read(s.path("b.qcow2")).unwrap();
    bytes[95] &= !1;
    std::fs::write(s.path("stale.qcow2"), &bytes).unwrap();
    let r = agree(&s.path("stale.qcow2"), &[]);
    assert!(r.leaks > 0);
    assert!(r.findings.iter().all(|f| f.kind == FindingKind::Leak));
    // Snapshots and bitmaps together.
    s.run(
        "qemu-img snapshot -c s1 b.qcow2
           qemu-io -f qcow2 -c 'write -P 8 0 64k' b.qcow2 >/dev/null",
    );
    agree(&s.path("b.qcow2"), &[]);
}

#[test]
fn luks_encrypted_image() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let obj = "--object secret,id=sec0,data=abc";
    let made = Command::new("sh")
        .arg("-ec")
        .arg(format!(
            "qemu-img create -q {obj} -f qcow2 -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 l.qcow2 16M
             qemu-io {obj} --image-opts -c 'write -P 1 0 128k' driver=qcow2,file.filename=l.qcow2,encrypt.key-secret=sec0 >/dev/null"
        ))
        .current_dir(s.dir.path())
        .status()
        .map(|st| st.success())
        .unwrap_or(false);
    if !made {
        eprintln!("SKIPPED: qemu-img could not create a LUKS image");
        return;
    }
    let path = s.path("l.qcow2");
    let opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        path.display()
    );
    let args = ["--object", "secret,id=sec0,data=abc", "--image-opts", &opts];
    let r = agree(&path, &args);
    assert!(r.is_clean());
    let owned: Vec<Owner> = (0..r.map.len()).flat_map(|c| r.map.owners(c)).collect();
    assert!(owned.contains(&Owner::Crypto));
}

#[test]
fn leaks_and_corruptions_made_on_purpose() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    // Lazy refcounts and an abort: refcounts stay behind.
    s.run("qemu-img create -q -f qcow2 -o lazy_refcounts=on,cluster_size=4k lz.qcow2 16M
           qemu-io -f qcow2 -c 'write -P 1 0 64k' -c 'write -P 2 3M 12k' -c abort lz.qcow2 >/dev/null 2>&1 || true");
    let r = agree(&s.path("lz.qcow2"), &[]);
    assert!(r.corruptions > 0);
    // A used data cluster with refcount 0, and one with refcount 3.
    for (name, value) in [("zero.qcow2", 0u64), ("three.qcow2", 3)] {
        s.run(&format!(
            "qemu-img create -q -f qcow2 {name} 16M
             qemu-io -f qcow2 -c 'write -P 1 0 256k' {name} >/dev/null"
        ));
        let path = s.path(name);
        let bytes = std::fs::read(&path).unwrap();
        let h = Header::decode(&bytes).unwrap();
        let data = first_data_cluster(&bytes, &h);
        patch_refcount(&path, data, value);
        let r = agree(&path, &[]);
        assert_eq!(r.findings.len(), 1, "{name}");
    }
    // An unreferenced cluster with a refcount: a leak.
    s.run(
        "qemu-img create -q -f qcow2 -o cluster_size=4k leak.qcow2 16M
           qemu-io -f qcow2 -c 'write -P 1 0 64k' leak.qcow2 >/dev/null",
    );
    let path = s.path("leak.qcow2");
    let len = std::fs::metadata(&path).unwrap().len();
    patch_refcount(&path, len + 3 * 4096, 1);
    agree(&path, &[]);
    // Refcount of the L2 table patched to 2 (copied-flag mismatch too).
    let bytes = std::fs::read(&path).unwrap();
    let h = Header::decode(&bytes).unwrap();
    let l2 = read_u64(&bytes, h.l1_table_offset as usize) & 0x00ff_ffff_ffff_fe00;
    patch_refcount(&path, l2, 2);
    agree(&path, &[]);
}

#[test]
fn committed_fixtures_match_recorded_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut seen = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("qcow2") {
            continue;
        }
        let stem = path.file_stem().unwrap().to_str().unwrap();
        let expected = root.join("expected").join(stem);
        let Ok(json) = std::fs::read_to_string(expected.join("check.json")) else {
            continue; // QEMU could not open it (check.err only).
        };
        let report = ours(&path);
        assert_eq!(from_report(&report), from_json(&json), "fixture {stem}");
        seen += 1;
    }
    assert!(seen >= 10, "only {seen} fixtures compared");
}

fn patch_u64(path: &Path, at: u64, value: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = at as usize;
    if bytes.len() < at + 8 {
        bytes.resize(at + 8, 0);
    }
    bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// A 4 KiB-cluster image with 64 KiB of data at 0 and a bitmap; returns
/// (header, L2 table offset).
fn base_image(s: &Scratch, name: &str, opts: &str) -> (Header, u64) {
    let opts = if opts.contains("cluster_size") {
        opts.trim_start_matches(',').to_string()
    } else {
        format!("cluster_size=4k{opts}")
    };
    s.run(&format!(
        "qemu-img create -q -f qcow2 -o {opts} {name} 16M
         qemu-io -f qcow2 -c 'write -P 1 0 64k' -c 'write -P 2 8M 4k' {name} >/dev/null"
    ));
    let bytes = std::fs::read(s.path(name)).unwrap();
    let h = Header::decode(&bytes).unwrap();
    let l2 = read_u64(&bytes, h.l1_table_offset as usize) & 0x00ff_ffff_ffff_fe00;
    (h, l2)
}

#[test]
fn hostile_edges() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    const COPIED: u64 = 1 << 63;
    let mut cases: Vec<(String, PathBuf)> = Vec::new();
    let mut case = |s: &Scratch, name: &str, opts: &str, f: &dyn Fn(&Path, &Header, u64)| {
        let (h, l2) = base_image(s, name, opts);
        f(&s.path(name), &h, l2);
        cases.push((name.to_string(), s.path(name)));
    };
    // L2 entries pointing past the end of the file, near and far.
    case(&s, "beyond.qcow2", "", &|p, _, l2| {
        let len = std::fs::metadata(p).unwrap().len();
        patch_u64(p, l2 + 8 * 20, COPIED | (len + 5 * 4096));
        patch_u64(p, l2 + 8 * 21, COPIED | (len + 700 * 4096));
    });
    // A data cluster referenced twice (two L2 entries).
    case(&s, "twice.qcow2", "", &|p, _, l2| {
        let bytes = std::fs::read(p).unwrap();
        patch_u64(p, l2 + 8 * 30, read_u64(&bytes, l2 as usize));
    });
    // Same with 1-bit refcounts: the expected count overflows.
    case(&s, "twice1.qcow2", ",refcount_bits=1", &|p, _, l2| {
        let bytes = std::fs::read(p).unwrap();
        patch_u64(p, l2 + 8 * 30, read_u64(&bytes, l2 as usize));
    });
    // Reserved bits in L1 and L2 entries; misaligned data offset.
    case(&s, "reserved.qcow2", "", &|p, h, l2| {
        let bytes = std::fs::read(p).unwrap();
        let l1e = read_u64(&bytes, h.l1_table_offset as usize);
        patch_u64(p, h.l1_table_offset, l1e | 0x100);
        let e = read_u64(&bytes, l2 as usize + 8);
        patch_u64(p, l2 + 8, e | 0x2);
        let e = read_u64(&bytes, l2 as usize + 16);
        patch_u64(p, l2 + 16, e + 0x200);
    });
    // Copied flag cleared on a data entry and on the L1 entry.
    case(&s, "copied.qcow2", "", &|p, h, l2| {
        let bytes = std::fs::read(p).unwrap();
        let l1e = read_u64(&bytes, h.l1_table_offset as usize);
        patch_u64(p, h.l1_table_offset, l1e & !COPIED);
        let e = read_u64(&bytes, l2 as usize + 24);
        patch_u64(p, l2 + 24, e & !COPIED);
    });
    // A refcount block outside the image, and one misaligned.
    case(&s, "rbout.qcow2", "", &|p, h, _| {
        patch_u64(p, h.refcount_table_offset + 8, 1 << 40);
    });
    case(&s, "rbmis.qcow2", "", &|p, h, _| {
        patch_u64(p, h.refcount_table_offset + 8, 0x1200);
    });
    // The file ends in the middle of the last data cluster.
    case(&s, "short.qcow2", "", &|p, _, _| {
        let len = std::fs::metadata(p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.set_len(len - 1000).unwrap();
    });
    // A compressed entry with the copied flag set.
    case(&s, "ccopied.qcow2", "", &|p, _, l2| {
        patch_u64(p, l2 + 8 * 40, COPIED | (1 << 62) | 0x1000);
    });
    // The first refcount block misaligned: no refcount can be read.
    case(&s, "rb0mis.qcow2", "", &|p, h, _| {
        let bytes = std::fs::read(p).unwrap();
        let rb = read_u64(&bytes, h.refcount_table_offset as usize);
        patch_u64(p, h.refcount_table_offset, rb + 0x200);
    });
    // Reserved bits in a refcount table entry.
    case(&s, "rbres.qcow2", "", &|p, h, _| {
        let bytes = std::fs::read(p).unwrap();
        let rb = read_u64(&bytes, h.refcount_table_offset as usize);
        patch_u64(p, h.refcount_table_offset, rb | 1);
    });
    // The file loses more than a cluster: the last data cluster is gone.
    case(&s, "trunc.qcow2", "", &|p, _, _| {
        let len = std::fs::metadata(p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.set_len(len - 4096 - 100).unwrap();
    });
    // An L1 entry with only the copied flag: an "L2 table" at offset 0.
    case(&s, "l1zero.qcow2", "", &|p, h, _| {
        patch_u64(p, h.l1_table_offset + 8, COPIED);
    });
    // An L2 offset past the end of the file.
    case(&s, "l2far.qcow2", "", &|p, h, _| {
        patch_u64(p, h.l1_table_offset + 8, COPIED | (1 << 30));
    });
    // A subcluster bitmap that says allocated and zero at once, and one
    // with allocation bits on an unallocated entry.
    case(
        &s,
        "xbits.qcow2",
        ",extended_l2=on,cluster_size=16k",
        &|p, _, l2| {
            let bytes = std::fs::read(p).unwrap();
            let bm = read_u64(&bytes, l2 as usize + 8);
            patch_u64(p, l2 + 8, bm | (1 << 32));
            patch_u64(p, l2 + 16 * 50 + 8, 3);
        },
    );
    for (name, path) in cases {
        let r = agree(&path, &[]);
        eprintln!(
            "case {name}: leaks {} corruptions {} check errors {}",
            r.leaks, r.corruptions, r.check_errors
        );
    }
}

#[test]
fn snapshot_tables_data_files_and_shared_bitmap_clusters() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    // A version 2 image with snapshots.
    s.run(
        "qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k v2.qcow2 8M
           qemu-io -f qcow2 -c 'write -P 1 0 64k' v2.qcow2 >/dev/null
           qemu-img snapshot -c a v2.qcow2
           qemu-io -f qcow2 -c 'write -P 2 0 8k' v2.qcow2 >/dev/null",
    );
    agree(&s.path("v2.qcow2"), &[]);
    // A snapshot whose L1 offset is misaligned, and one whose L1 is huge.
    s.run(
        "qemu-img create -q -f qcow2 -o cluster_size=4k sn.qcow2 8M
           qemu-io -f qcow2 -c 'write -P 1 0 64k' sn.qcow2 >/dev/null
           qemu-img snapshot -c a sn.qcow2
           qemu-img snapshot -c b sn.qcow2
           cp sn.qcow2 snbig.qcow2",
    );
    let bytes = std::fs::read(s.path("sn.qcow2")).unwrap();
    let h = Header::decode(&bytes).unwrap();
    let l1 = read_u64(&bytes, h.snapshots_offset as usize);
    patch_u64(&s.path("sn.qcow2"), h.snapshots_offset, l1 + 0x200);
    agree(&s.path("sn.qcow2"), &[]);
    let mut big = std::fs::read(s.path("snbig.qcow2")).unwrap();
    let at = h.snapshots_offset as usize + 8;
    big[at..at + 4].copy_from_slice(&0x0100_0000u32.to_be_bytes());
    std::fs::write(s.path("snbig.qcow2"), big).unwrap();
    agree(&s.path("snbig.qcow2"), &[]);
    // 400 snapshots naming one L1 table (with a corrupt entry): counted as
    // QEMU counts them, one walk per snapshot, though we walk it once.
    s.run(
        "qemu-img create -q -f qcow2 -o cluster_size=4k many.qcow2 8M
           qemu-io -f qcow2 -c 'write -P 1 0 64k' many.qcow2 >/dev/null
           qemu-img snapshot -c a many.qcow2",
    );
    let mut bytes = std::fs::read(s.path("many.qcow2")).unwrap();
    let h = Header::decode(&bytes).unwrap();
    let first = h.snapshots_offset as usize;
    let fixed = qcow2_bitmap::format::l2::SnapshotHeader::decode(&bytes[first..]).unwrap();
    let unpadded = fixed.unpadded_len() as usize;
    let mut entry = bytes[first..first + unpadded].to_vec();
    entry.resize(unpadded.next_multiple_of(8), 0);
    let l1 = fixed.l1_table_offset as usize;
    let l1e = read_u64(&bytes, l1);
    bytes[l1..l1 + 8].copy_from_slice(&(l1e | 0x100).to_be_bytes()); // reserved bit
    let table_at = bytes.len().next_multiple_of(4096);
    bytes.resize(table_at, 0);
    for _ in 0..400 {
        bytes.extend_from_slice(&entry);
    }
    bytes.resize(bytes.len().next_multiple_of(4096), 0);
    bytes[60..64].copy_from_slice(&400u32.to_be_bytes());
    bytes[64..72].copy_from_slice(&(table_at as u64).to_be_bytes());
    std::fs::write(s.path("many.qcow2"), bytes).unwrap();
    let r = agree(&s.path("many.qcow2"), &[]);
    assert!(r.corruptions >= 400, "{}", r.corruptions);
    // An external data file: guest data is not counted.
    s.run(
        "qemu-img create -q -f qcow2 -o data_file=\"$PWD/d.raw\",cluster_size=4k df.qcow2 8M
           qemu-io -f qcow2 -c 'write -P 1 0 64k' -c 'write -z 1M 8k' df.qcow2 >/dev/null",
    );
    let r = agree(&s.path("df.qcow2"), &[]);
    assert!(r.allocated_clusters > 0);
    // A bitmap table entry pointing at a guest data cluster: shared.
    s.run(
        "qemu-img create -q -f qcow2 -o cluster_size=4k sh.qcow2 8M
           qemu-img bitmap --add sh.qcow2 b0
           qemu-io -f qcow2 -c 'write -P 1 0 64k' sh.qcow2 >/dev/null",
    );
    let path = s.path("sh.qcow2");
    let image = Image::open(std::fs::read(&path).unwrap()).unwrap();
    let b0 = image.bitmaps()[0].entry.clone();
    let data = first_data_cluster(&std::fs::read(&path).unwrap(), image.header());
    patch_u64(&path, b0.table_offset, data);
    let r = agree(&path, &[]);
    let shared: Vec<u64> = r.map.shared().collect();
    assert_eq!(shared, [data >> 12]);
    assert_eq!(
        r.map.owners(data >> 12),
        [Owner::Data, Owner::BitmapData { bitmap: 0 }]
    );
    assert_eq!(r.bitmap_names, ["b0"]);
}
