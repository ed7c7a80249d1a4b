//! Offline backups (`backup`, `restore`, `apply`, `verify`) against QEMU's tools:
//! - `backup_chain_as_users_run_it`: a full backup, a checkpoint, then seeded rounds of
//!   random guest writes, each followed by an incremental backup with `--next` rotation;
//!   every link compares identical with the source, passes `qemu-img check` and `verify`,
//!   the bitmaps rotate as `--then` says; restores to qcow2 and raw, and raw incrementals
//!   `apply`d onto a raw full backup, give the source's bytes
//!   (`QCOW2_BITMAP_BACKUP_ROUNDS`, `QCOW2_BITMAP_SEED`);
//! - `backup_matches_qemu_blockdev_backup`: the same round made by QEMU
//!   (qemu-storage-daemon, `blockdev-backup sync=bitmap bitmap-mode=never`) restores to the
//!   same content, and its depth-0 map (data and zero ranges) equals ours;
//! - `backup_sources_of_every_shape`: backing chains, compressed clusters (zlib, zstd),
//!   extended L2, an external data file, 512 B and 2 MiB clusters, an odd virtual size;
//!   plain and `-c` backups;
//! - `backup_zeros_after_trim_are_stored`: discarded and zeroed data is stored as zeros;
//! - `verify_restore_apply_detect_broken_chains`: flipped data bytes (top and lower link),
//!   removed and edited manifest extents, a swapped backing file, a changed virtual size;
//! - `backup_refusals_create_nothing`: every refusal exits 1 with one error line and
//!   leaves the directory and the source as they were;
//! - `backup_json_summary_and_manifest_schema`: the `--json` keys, the manifest schema and
//!   every CRC-32 recomputed from `qemu-img convert -O raw` of the source.

use crate::util::*;
use crate::util::{ours_in as ours, qemu_io_in as qemu_io, sh_in as sh};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

const TOOLS: &[&str] = &["qemu-img", "qemu-io"];
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Runs our binary and asserts exit 0.
fn ours_ok(dir: &Path, args: &[&str]) -> Output {
    let o = ours(dir, args);
    assert!(
        o.status.success(),
        "qcow2-bitmap {args:?}: exit {:?}: {}{}",
        o.status.code(),
        stdout(&o),
        stderr(&o)
    );
    o
}

/// `qemu-img compare A B` reports the images identical.
fn assert_identical(dir: &Path, a: &str, b: &str, what: &str) {
    let o = Command::new("qemu-img")
        .args(["compare", a, b])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.code() == Some(0) && stdout(&o).contains("Images are identical."),
        "{what}: qemu-img compare {a} {b}: {}{}",
        stdout(&o),
        stderr(&o)
    );
}

/// `qemu-img check` exits 0.
fn assert_check(dir: &Path, img: &str, what: &str) {
    let (rc, doc) = qemu_check(&dir.join(img));
    assert_eq!(rc, 0, "{what}: qemu-img check {img}: {doc}");
}

/// `qemu-img map --output=json`.
fn qemu_map(dir: &Path, img: &str) -> Vec<Value> {
    let o = sh(dir, "qemu-img", &["map", "--output=json", img]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array().unwrap().clone()
}

/// The depth-0 ranges of a map, merged: (start, length, zero).
fn depth0(map: &[Value]) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for e in map {
        if e["depth"] != 0 || e["present"] != true {
            continue;
        }
        let (s, l, z) = (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["zero"].as_bool().unwrap(),
        );
        match out.last_mut() {
            Some(p) if p.0 + p.1 == s && p.2 == z => p.1 += l,
            _ => out.push((s, l, z)),
        }
    }
    out
}

/// The guest bytes of `img` (through its chain), by `qemu-img convert -O raw`.
fn guest_bytes(dir: &Path, img: &str) -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("guest.raw");
    sh(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", img, out.to_str().unwrap()],
    );
    std::fs::read(out).unwrap()
}

fn json_file(dir: &Path, name: &str) -> Value {
    read_json(&dir.join(name))
}

fn write_json(dir: &Path, name: &str, v: &Value) {
    std::fs::write(dir.join(name), serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// File names in `dir` (hidden temporaries included).
fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn random_file(dir: &Path, name: &str, rng: &mut Rng, len: u64) {
    let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// Asserts a refusal: exit 1, one stderr line `qcow2-bitmap: ...` holding every
/// word in `words` (case-insensitive), no file created or removed in `dir`, and
/// every file in `keep` byte-identical. Returns the error line.
fn refused(dir: &Path, args: &[&str], words: &[&str], keep: &[&str]) -> String {
    let before = listing(dir);
    let sums: Vec<String> = keep.iter().map(|f| sha256_file(&dir.join(f))).collect();
    let o = ours(dir, args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{args:?}: exit status ({err})");
    assert_eq!(err.lines().count(), 1, "{args:?}: one error line: {err:?}");
    assert!(
        err.starts_with("qcow2-bitmap: "),
        "{args:?}: error prefix: {err:?}"
    );
    let low = err.to_lowercase();
    for w in words {
        assert!(
            low.contains(&w.to_lowercase()),
            "{args:?}: the error should say {w:?}: {err:?}"
        );
    }
    assert_eq!(listing(dir), before, "{args:?}: files created or removed");
    for (f, s) in keep.iter().zip(&sums) {
        assert_eq!(&sha256_file(&dir.join(f)), s, "{args:?}: {f} changed");
    }
    err.trim_end().to_string()
}

/// The clusters of `img` that are unallocated (present: false) in its map.
fn unallocated_clusters(dir: &Path, img: &str, cs: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for e in qemu_map(dir, img) {
        if e["present"] == false {
            let s = e["start"].as_u64().unwrap();
            let end = s + e["length"].as_u64().unwrap();
            let mut c = s.div_ceil(cs);
            while (c + 1) * cs <= end {
                out.push(c);
                c += 1;
            }
        }
    }
    out
}

/// One round of random guest writes: compressed writes on whole unallocated
/// clusters (first), data from `pattern.bin` (`PATTERN` bytes), patterns at
/// unaligned offsets, zeroes, discards and the disk's last bytes.
const PATTERN: u64 = 1 << 20;

fn round_cmds(rng: &mut Rng, size: u64, cs: u64, free: &[u64]) -> Vec<String> {
    let mut cmds = Vec::new();
    let mut used = Vec::new();
    for _ in 0..rng.range(0, 2) {
        if free.is_empty() {
            break;
        }
        let c = rng.pick(free);
        if used.contains(&c) || (c + 1) * cs > size {
            continue;
        }
        used.push(c);
        cmds.push(format!("write -c -s pattern.bin {} {cs}", c * cs));
    }
    for _ in 0..rng.range(5, 10) {
        let off = rng.range(0, size / 512 - 1) * 512;
        let len = (rng.range(1, 256) * 512).min(size - off);
        let cmd = match rng.range(0, 6) {
            0 | 1 => format!("write -s pattern.bin {off} {}", len.min(PATTERN)),
            2 => {
                // Unaligned, byte granular.
                let off = rng.range(0, size - 2);
                let len = rng.range(1, 100_000).min(size - off);
                format!("write -P {} {off} {len}", rng.range(1, 255))
            }
            3 => format!("write -z {off} {len}"),
            4 => format!("discard {off} {}", len.max(cs)),
            5 => {
                let len = rng.pick(&[512, 4 * KIB, 64 * KIB, 100 * KIB]).min(size);
                format!("write -s pattern.bin {} {len}", size - len)
            }
            _ => {
                let len = rng.range(1, 64 * KIB).min(size - 1);
                format!("write -P 0x7e {} {len}", size - len)
            }
        };
        cmds.push(cmd);
    }
    // A discard may run past the end; qemu-io refuses that.
    cmds.iter()
        .map(|c| match c.strip_prefix("discard ") {
            Some(rest) => {
                let mut it = rest.split(' ').map(|x| x.parse::<u64>().unwrap());
                let (o, l) = (it.next().unwrap(), it.next().unwrap());
                format!("discard {o} {}", l.min(size - o))
            }
            None => c.clone(),
        })
        .collect()
}

fn bitmap_flags(dir: &Path, img: &str, name: &str) -> Option<Vec<String>> {
    qemu_info_bitmaps(&dir.join(img))
        .into_iter()
        .find(|b| b.0 == name)
        .map(|b| b.2)
}

#[test]
fn backup_chain_as_users_run_it() {
    if !qemu_available("backup_chain_as_users_run_it", TOOLS) {
        return;
    }
    let started = Instant::now();
    let seed = env_u64("QCOW2_BITMAP_SEED").unwrap_or(0xb4c_0000_0001);
    let rounds = env_u64("QCOW2_BITMAP_BACKUP_ROUNDS").unwrap_or(5);
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let size = 64 * MIB + rng.pick(&[0, 4 * KIB, 192 * KIB]);
    let cs = 64 * KIB;
    let what = format!("seed {seed:#x} size {size}");
    sh(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "src.qcow2",
            &size.to_string(),
        ],
    );
    random_file(d, "pattern.bin", &mut rng, PATTERN);
    let seed_cmds = round_cmds(&mut rng, size, cs, &[]);
    qemu_io(d, "src.qcow2", &seed_cmds);
    // The backups live in their own directory; --backing names resolve there.
    std::fs::create_dir(d.join("bk")).unwrap();
    ours_ok(d, &["backup", "src.qcow2", "bk/b0.qcow2"]);
    assert_identical(d, "src.qcow2", "bk/b0.qcow2", &what);
    assert_check(d, "bk/b0.qcow2", &what);
    ours_ok(d, &["verify", "bk/b0.qcow2", "--source", "src.qcow2"]);
    let granularity = rng.pick(&[64 * KIB, 128 * KIB]);
    sh(
        d,
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "-g",
            &granularity.to_string(),
            "src.qcow2",
            "c0",
        ],
    );
    let thens = [Some("disable"), Some("remove"), Some("keep"), None];
    for i in 1..=rounds {
        random_file(d, "pattern.bin", &mut rng, PATTERN);
        let free = unallocated_clusters(d, "src.qcow2", cs);
        let cmds = round_cmds(&mut rng, size, cs, &free);
        qemu_io(d, "src.qcow2", &cmds);
        let what = format!("{what} round {i} {cmds:?}");
        let (cur, prev, link, next) = (
            format!("c{}", i - 1),
            format!("b{}.qcow2", i - 1),
            format!("bk/b{i}.qcow2"),
            format!("c{i}"),
        );
        let raw = format!("bk/r{i}.raw");
        // A raw incremental of the same bitmap first (no rotation).
        ours_ok(
            d,
            &[
                "backup",
                "--format",
                "raw",
                "--bitmap",
                &cur,
                "src.qcow2",
                &raw,
            ],
        );
        let then = thens[(i as usize - 1 + (seed as usize)) % thens.len()];
        let mut args = vec![
            "backup",
            "--bitmap",
            &cur,
            "--backing",
            &prev,
            "--next",
            &next,
        ];
        if let Some(t) = then {
            args.extend(["--then", t]);
        }
        args.extend(["src.qcow2", &link]);
        ours_ok(d, &args);
        assert_identical(d, "src.qcow2", &link, &what);
        assert_check(d, &link, &what);
        ours_ok(d, &["verify", &link, "--source", "src.qcow2"]);
        assert_eq!(
            bitmap_flags(d, "src.qcow2", &next),
            Some(vec!["auto".to_string()]),
            "{what}: {next} added enabled"
        );
        let added = qemu_info_bitmaps(&d.join("src.qcow2"));
        let added = added.iter().find(|b| b.0 == next).unwrap();
        assert_eq!(
            added.1, granularity,
            "{what}: {next} has {cur}'s granularity"
        );
        assert_check(d, "src.qcow2", &format!("{what}: the source after --next"));
        let old = bitmap_flags(d, "src.qcow2", &cur);
        match then.unwrap_or("keep") {
            "keep" => assert_eq!(old, Some(vec!["auto".into()]), "{what}: {cur} kept"),
            "disable" => assert_eq!(old, Some(vec![]), "{what}: {cur} disabled"),
            _ => assert_eq!(old, None, "{what}: {cur} removed"),
        }
        let m = json_file(d, &format!("{link}.json"));
        assert_eq!(m["kind"], "incremental", "{what}");
        assert_eq!(m["backing"]["filename"], prev.as_str(), "{what}");
        assert_eq!(
            m["backing"]["manifest-sha256"],
            sha256_file(&d.join("bk").join(format!("{prev}.json"))),
            "{what}"
        );
    }
    let top = format!("bk/b{rounds}.qcow2");
    ours_ok(d, &["restore", &top, "restored.qcow2"]);
    assert_identical(d, "src.qcow2", "restored.qcow2", &what);
    assert_check(d, "restored.qcow2", &what);
    assert!(
        qemu_map(d, "restored.qcow2")
            .iter()
            .all(|e| e["depth"] == 0 && (e["data"] == true || e["present"] == false)),
        "{what}: the restore is standalone and sparse"
    );
    ours_ok(d, &["restore", "--format", "raw", &top, "restored.raw"]);
    let want = guest_bytes(d, "src.qcow2");
    assert!(
        std::fs::read(d.join("restored.raw")).unwrap() == want,
        "{what}: raw restore differs from the source"
    );
    // Raw incrementals applied in order onto a raw copy of the full backup.
    ours_ok(
        d,
        &["restore", "--format", "raw", "bk/b0.qcow2", "base.raw"],
    );
    assert!(
        std::fs::read(d.join("base.raw")).unwrap() == guest_bytes(d, "bk/b0.qcow2"),
        "{what}: raw restore of the full backup"
    );
    for i in 1..=rounds {
        ours_ok(d, &["apply", &format!("bk/r{i}.raw"), "base.raw"]);
    }
    let got = std::fs::read(d.join("base.raw")).unwrap();
    if got != want {
        let at = got.iter().zip(&want).position(|(a, b)| a != b);
        panic!("{what}: applied chain differs from the source at {at:?}");
    }
    ours_ok(d, &["apply", &format!("bk/r{rounds}.raw"), "base.raw"]);
    assert!(
        std::fs::read(d.join("base.raw")).unwrap() == want,
        "{what}: apply run twice changed the target"
    );
    // The qcow2 incrementals apply the same way.
    sh(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "bk/b0.qcow2", "base2.raw"],
    );
    for i in 1..=rounds {
        ours_ok(d, &["apply", &format!("bk/b{i}.qcow2"), "base2.raw"]);
    }
    assert!(
        std::fs::read(d.join("base2.raw")).unwrap() == want,
        "{what}: applied qcow2 chain differs from the source"
    );
    eprintln!(
        "backup_chain_as_users_run_it: {rounds} rounds in {:?}",
        started.elapsed()
    );
}

/// Runs QEMU's incremental backup of `bitmap` (recipe: qemu-storage-daemon on a
/// read-only source, `blockdev-backup sync=bitmap bitmap-mode=never`) into
/// `target` (already created over the previous backup).
fn qemu_blockdev_backup(dir: &Path, src: &str, bitmap: &str, target: &str) {
    let mut q = Qmp::start(&dir.join(src));
    let r = q.execute(serde_json::json!({"execute": "blockdev-add", "arguments": {
        "driver": "qcow2", "node-name": "tgt",
        "file": {"driver": "file", "filename": dir.join(target).display().to_string()}}}));
    assert!(r.get("return").is_some(), "blockdev-add: {r}");
    let r = q.execute(
        serde_json::json!({"execute": "blockdev-backup", "arguments": {
        "job-id": "j0", "device": "q0", "target": "tgt", "sync": "bitmap",
        "bitmap": bitmap, "bitmap-mode": "never", "auto-dismiss": false}}),
    );
    assert!(r.get("return").is_some(), "blockdev-backup: {r}");
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let jobs = q.execute(serde_json::json!({"execute": "query-jobs"}));
        let job = jobs["return"]
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == "j0").cloned())
            .unwrap_or_else(|| panic!("job j0 vanished: {jobs}"));
        if job["status"] == "concluded" {
            assert!(
                job.get("error").is_none(),
                "QEMU's backup job failed: {job}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "QEMU's backup job hangs: {job}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let r = q.execute(serde_json::json!({"execute": "job-dismiss", "arguments": {"id": "j0"}}));
    assert!(r.get("return").is_some(), "job-dismiss: {r}");
    let r = q
        .execute(serde_json::json!({"execute": "blockdev-del", "arguments": {"node-name": "tgt"}}));
    assert!(r.get("return").is_some(), "blockdev-del: {r}");
    let _ = q.execute(serde_json::json!({"execute": "quit"}));
}

#[test]
fn backup_matches_qemu_blockdev_backup() {
    if !qemu_available(
        "backup_matches_qemu_blockdev_backup",
        &["qemu-img", "qemu-io", "qemu-storage-daemon"],
    ) {
        return;
    }
    let seed = env_u64("QCOW2_BITMAP_SEED").unwrap_or(0xb4c_0000_0002);
    let (mut data_ranges, mut zero_ranges) = (0, 0);
    for case in 0..3u64 {
        let mut rng = Rng(seed.wrapping_add(case));
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let size = 32 * MIB + rng.pick(&[0, 64 * KIB, 96 * KIB]);
        let cs = 64 * KIB;
        let what = format!("seed {:#x} size {size}", seed.wrapping_add(case));
        sh(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "src.qcow2",
                &size.to_string(),
            ],
        );
        random_file(d, "pattern.bin", &mut rng, PATTERN);
        let cmds = round_cmds(&mut rng, size, cs, &[]);
        qemu_io(d, "src.qcow2", &cmds);
        ours_ok(d, &["backup", "src.qcow2", "b0.qcow2"]);
        sh(d, "qemu-img", &["bitmap", "--add", "src.qcow2", "c0"]);
        random_file(d, "pattern.bin", &mut rng, PATTERN);
        let free = unallocated_clusters(d, "src.qcow2", cs);
        // No all-zero patterns: QEMU copies explicit zero data as data, and so do we,
        // but keep the oracle's data/zero split unambiguous.
        let cmds = round_cmds(&mut rng, size, cs, &free);
        qemu_io(d, "src.qcow2", &cmds);
        let what = format!("{what} {cmds:?}");
        let src_sum = sha256_file(&d.join("src.qcow2"));
        ours_ok(
            d,
            &[
                "backup",
                "--bitmap",
                "c0",
                "--backing",
                "b0.qcow2",
                "src.qcow2",
                "ours.qcow2",
            ],
        );
        sh(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "b0.qcow2",
                "-F",
                "qcow2",
                "-o",
                "cluster_size=65536",
                "qemu.qcow2",
            ],
        );
        qemu_blockdev_backup(d, "src.qcow2", "c0", "qemu.qcow2");
        assert_eq!(
            sha256_file(&d.join("src.qcow2")),
            src_sum,
            "{what}: source written"
        );
        assert_identical(d, "src.qcow2", "qemu.qcow2", &format!("{what}: QEMU's"));
        assert_identical(d, "qemu.qcow2", "ours.qcow2", &what);
        ours_ok(d, &["restore", "qemu.qcow2", "qemu-restored.qcow2"]);
        ours_ok(d, &["restore", "ours.qcow2", "ours-restored.qcow2"]);
        assert_identical(d, "qemu-restored.qcow2", "ours-restored.qcow2", &what);
        let (q, o) = (
            depth0(&qemu_map(d, "qemu.qcow2")),
            depth0(&qemu_map(d, "ours.qcow2")),
        );
        assert!(!q.is_empty(), "{what}: QEMU's delta is empty");
        assert_eq!(
            o, q,
            "{what}: depth-0 map (start, length, zero) differs from QEMU's"
        );
        data_ranges += q.iter().filter(|r| !r.2).count();
        zero_ranges += q.iter().filter(|r| r.2).count();
    }
    assert!(
        data_ranges > 0 && zero_ranges > 0,
        "the rounds made {data_ranges} data and {zero_ranges} zero ranges: both kinds needed"
    );
}

/// One source shape: how to make it (commands in the directory), the writes
/// before the full backup and after the checkpoint.
struct ShapeCase {
    name: &'static str,
    create: Vec<Vec<String>>,
    before: Vec<String>,
    after: Vec<String>,
}

fn cmd(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

fn create(opts: &str, size: &str) -> Vec<String> {
    cmd(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        "src.qcow2",
        size,
    ])
}

fn cmds(list: &[&str]) -> Vec<String> {
    cmd(list)
}

fn shape_cases() -> Vec<ShapeCase> {
    let odd = 5 * MIB + 3 * 512; // not a multiple of the cluster size
    vec![
        ShapeCase {
            name: "qcow2 over qcow2 over raw",
            create: vec![
                cmd(&["truncate", "-s", "8M", "base.raw"]),
                cmd(&[
                    "qemu-io",
                    "-f",
                    "raw",
                    "-c",
                    "write -P 0x11 0 1M",
                    "-c",
                    "write -s pattern.bin 3M 512k",
                    "-c",
                    "write -P 0x12 7340032 1048576",
                    "base.raw",
                ]),
                cmd(&[
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    "base.raw",
                    "-F",
                    "raw",
                    "mid.qcow2",
                    "8M",
                ]),
                cmd(&[
                    "qemu-io",
                    "-f",
                    "qcow2",
                    "-c",
                    "write -P 0x22 512k 1M",
                    "-c",
                    "write -z 3M 64k",
                    "-c",
                    "write -c -s pattern.bin 5M 64k",
                    "mid.qcow2",
                ]),
                cmd(&[
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    "mid.qcow2",
                    "-F",
                    "qcow2",
                    "src.qcow2",
                    "8M",
                ]),
            ],
            before: cmds(&["write -P 0x33 1M 128k", "write -z 7M 64k"]),
            after: cmds(&[
                "write -P 0x44 4096 512",     // COW from the raw base
                "discard 512k 64k",           // over mid's data: zeros over the backing file
                "write -z 3276800 4096",      // partial zero inside raw data
                "write -P 0x45 5M 1000",      // inside mid's compressed cluster
                "write -P 0x46 8387584 1024", // the disk's last bytes, over the raw base
            ]),
        },
        ShapeCase {
            name: "zlib compressed clusters",
            create: vec![create("cluster_size=65536", "8M")],
            before: cmds(&[
                "write -c -s pattern.bin 0 192k",
                "write -c -P 0x5a 1M 64k",
                "write -c -P 0x5b 8323072 65536",
            ]),
            after: cmds(&[
                "write -c -P 0x5c 2M 64k",
                "write -P 0x5d 4096 512",
                "discard 1M 64k",
                "write -P 0x5e 8388000 608",
            ]),
        },
        ShapeCase {
            name: "zstd compressed clusters",
            create: vec![create("cluster_size=65536,compression_type=zstd", "8M")],
            before: cmds(&[
                "write -c -s pattern.bin 0 192k",
                "write -c -P 0x5a 1M 64k",
                "write -P 0x5b 3M 512k",
            ]),
            after: cmds(&[
                "write -c -P 0x5c 2M 64k",
                "write -P 0x5d 70000 512",
                "write -z 128k 64k",
            ]),
        },
        ShapeCase {
            name: "extended L2",
            create: vec![create("cluster_size=65536,extended_l2=on", "8M")],
            before: cmds(&[
                "write -P 0x61 0 4k",
                "write -s pattern.bin 8k 4k",
                "write -z 16k 4k",
                "write -P 0x62 1M 64k",
                "write -c -P 0x63 2M 64k",
            ]),
            after: cmds(&[
                "write -P 0x64 4k 4k",
                "write -z 0 4k",
                "write -z 1M 4k",
                "discard 1052672 4096",
                "write -P 0x65 3M 4k",
                "write -P 0x66 8384512 4096",
            ]),
        },
        ShapeCase {
            name: "external data file",
            create: vec![create("cluster_size=65536,data_file=src.data", "8M")],
            before: cmds(&["write -P 0x71 0 1M", "write -s pattern.bin 2M 256k"]),
            after: cmds(&[
                "write -P 0x72 4096 4096",
                "write -z 2M 64k",
                "discard 512k 64k",
                "write -P 0x73 8388096 512",
            ]),
        },
        ShapeCase {
            name: "512 B clusters",
            create: vec![create("cluster_size=512", "4M")],
            before: cmds(&[
                "write -P 0x81 0 100k",
                "write -s pattern.bin 1M 64k",
                "write -c -P 0x82 2M 4k",
            ]),
            after: cmds(&[
                "write -P 0x83 1000 100",
                "write -z 1M 1536",
                "discard 4096 2048",
                "write -P 0x84 4193792 512",
            ]),
        },
        ShapeCase {
            name: "2 MiB clusters",
            create: vec![create("cluster_size=2097152", "16M")],
            before: cmds(&[
                "write -P 0x91 0 3M",
                "write -s pattern.bin 8M 512k",
                "write -c -P 0x92 12M 2M",
            ]),
            after: cmds(&[
                "write -P 0x93 1M 4k",
                "write -z 8M 2M",
                "write -P 0x94 16773120 4096",
            ]),
        },
        ShapeCase {
            name: "odd virtual size",
            create: vec![create("cluster_size=65536", &odd.to_string())],
            before: vec![
                format!("write -P 0xa1 {} 1536", odd - 1536),
                "write -P 0xa2 0 64k".into(),
            ],
            after: vec![
                format!("write -P 0xa3 {} 512", odd - 512),
                format!("write -z {} 512", odd - 1536),
                "write -P 0xa4 64k 1".into(),
            ],
        },
    ]
}

#[test]
fn backup_sources_of_every_shape() {
    if !qemu_available("backup_sources_of_every_shape", TOOLS) {
        return;
    }
    for case in shape_cases() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let what = case.name;
        let mut rng = Rng(0x5a4e);
        random_file(d, "pattern.bin", &mut rng, PATTERN);
        for c in &case.create {
            let args: Vec<&str> = c[1..].iter().map(String::as_str).collect();
            sh(d, &c[0], &args);
        }
        qemu_io(d, "src.qcow2", &case.before);
        ours_ok(d, &["backup", "src.qcow2", "b0.qcow2"]);
        ours_ok(d, &["backup", "-c", "src.qcow2", "b0c.qcow2"]);
        sh(d, "qemu-img", &["bitmap", "--add", "src.qcow2", "c0"]);
        qemu_io(d, "src.qcow2", &case.after);
        ours_ok(
            d,
            &[
                "backup",
                "--bitmap",
                "c0",
                "--backing",
                "b0.qcow2",
                "src.qcow2",
                "b1.qcow2",
            ],
        );
        ours_ok(
            d,
            &[
                "backup",
                "-c",
                "--bitmap",
                "c0",
                "--backing",
                "b0c.qcow2",
                "src.qcow2",
                "b1c.qcow2",
            ],
        );
        for out in ["b1.qcow2", "b1c.qcow2"] {
            assert_identical(d, "src.qcow2", out, &format!("{what}: {out}"));
            ours_ok(d, &["verify", out, "--source", "src.qcow2"]);
        }
        for out in ["b0.qcow2", "b0c.qcow2", "b1.qcow2", "b1c.qcow2"] {
            assert_check(d, out, &format!("{what}: {out}"));
        }
        // The full backups hold the state before the checkpoint.
        ours_ok(d, &["restore", "b1c.qcow2", "r.qcow2"]);
        assert_identical(d, "src.qcow2", "r.qcow2", what);
        assert_check(d, "r.qcow2", what);
        let len = |f: &str| std::fs::metadata(d.join(f)).unwrap().len();
        assert!(
            len("b0c.qcow2") < len("b0.qcow2"),
            "{what}: -c full backup {} bytes, plain {}",
            len("b0c.qcow2"),
            len("b0.qcow2")
        );
        assert!(
            qemu_map(d, "b0c.qcow2")
                .iter()
                .any(|e| e["compressed"] == true),
            "{what}: -c wrote no compressed cluster"
        );
    }
}

#[test]
fn backup_zeros_after_trim_are_stored() {
    if !qemu_available("backup_zeros_after_trim_are_stored", TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut rng = Rng(0x7e1a);
    random_file(d, "pattern.bin", &mut rng, PATTERN);
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "16M"],
    );
    qemu_io(
        d,
        "src.qcow2",
        &cmds(&[
            "write -s pattern.bin 0 1M",
            "write -P 0x42 4M 2M",
            "write -s pattern.bin 10M 512k",
            "write -c -s pattern.bin 14M 64k",
        ]),
    );
    ours_ok(d, &["backup", "src.qcow2", "b0.qcow2"]);
    ours_ok(d, &["restore", "--format", "raw", "b0.qcow2", "base.raw"]);
    sh(d, "qemu-img", &["bitmap", "--add", "src.qcow2", "c0"]);
    // TRIM and zeroes over data the full backup holds.
    let zeroed: [(u64, u64); 4] = [
        (256 * KIB, 256 * KIB), // discard
        (4 * MIB, MIB),         // write -z
        (10 * MIB, 512 * KIB),  // discard, the whole range
        (14 * MIB, 64 * KIB),   // discard of a compressed cluster
    ];
    qemu_io(
        d,
        "src.qcow2",
        &cmds(&[
            "discard 256k 256k",
            "write -z 4M 1M",
            "discard 10M 512k",
            "discard 14M 64k",
        ]),
    );
    // Without the zeros the chain would still read the old data there.
    let o = Command::new("qemu-img")
        .args(["compare", "-q", "src.qcow2", "b0.qcow2"])
        .current_dir(d)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "the source must differ from the full backup"
    );
    ours_ok(
        d,
        &[
            "backup",
            "--bitmap",
            "c0",
            "--backing",
            "b0.qcow2",
            "src.qcow2",
            "b1.qcow2",
        ],
    );
    ours_ok(
        d,
        &[
            "backup",
            "--format",
            "raw",
            "--bitmap",
            "c0",
            "src.qcow2",
            "r1.raw",
        ],
    );
    let map = depth0(&qemu_map(d, "b1.qcow2"));
    for &(off, len) in &zeroed {
        assert!(
            map.iter()
                .any(|&(s, l, z)| z && s <= off && off + len <= s + l),
            "{off}+{len} is not a zero cluster range in the incremental: {map:?}"
        );
    }
    assert!(
        map.iter().all(|r| r.2),
        "only zeros changed, yet the incremental stores data: {map:?}"
    );
    for (img, m) in [("b1.qcow2", "b1.qcow2.json"), ("r1.raw", "r1.raw.json")] {
        let doc = json_file(d, m);
        let ext = doc["extents"].as_array().unwrap();
        for &(off, len) in &zeroed {
            let mut at = off;
            for e in ext {
                let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                if o <= at && at < o + l {
                    assert_eq!(e["kind"], "zero", "{img}: extent at {o} over trimmed {off}");
                    at = o + l;
                }
            }
            assert!(
                at >= off + len,
                "{img}: trimmed {off}+{len} not listed as zeros: {ext:?}"
            );
        }
        assert_eq!(doc["data-bytes"], 0, "{img}");
    }
    assert_identical(d, "src.qcow2", "b1.qcow2", "chain after trim");
    assert_check(d, "b1.qcow2", "after trim");
    ours_ok(d, &["restore", "b1.qcow2", "restored.qcow2"]);
    assert_identical(d, "src.qcow2", "restored.qcow2", "restore after trim");
    ours_ok(d, &["apply", "r1.raw", "base.raw"]);
    assert!(
        std::fs::read(d.join("base.raw")).unwrap() == guest_bytes(d, "src.qcow2"),
        "apply after trim leaves old data"
    );
}

/// A three-link chain in `dir`: b0 (full) <- b1 <- b2, with their manifests.
fn make_chain(d: &Path) {
    let mut rng = Rng(0xc4a1);
    random_file(d, "pattern.bin", &mut rng, PATTERN);
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "16M"],
    );
    qemu_io(
        d,
        "src.qcow2",
        &cmds(&[
            "write -s pattern.bin 0 1M",
            "write -P 0x11 4M 1M",
            "write -s pattern.bin 8M 256k",
        ]),
    );
    ours_ok(d, &["backup", "src.qcow2", "b0.qcow2"]);
    sh(d, "qemu-img", &["bitmap", "--add", "src.qcow2", "c0"]);
    random_file(d, "pattern.bin", &mut rng, PATTERN);
    qemu_io(
        d,
        "src.qcow2",
        &cmds(&[
            "write -s pattern.bin 512k 256k",
            "write -z 4M 128k",
            "write -P 0x21 12M 64k",
        ]),
    );
    ours_ok(
        d,
        &[
            "backup",
            "--bitmap",
            "c0",
            "--backing",
            "b0.qcow2",
            "--next",
            "c1",
            "src.qcow2",
            "b1.qcow2",
        ],
    );
    random_file(d, "pattern.bin", &mut rng, PATTERN);
    qemu_io(
        d,
        "src.qcow2",
        &cmds(&[
            "write -s pattern.bin 2M 320k",
            "discard 8M 128k",
            "write -P 0x31 16711680 65536",
        ]),
    );
    ours_ok(
        d,
        &[
            "backup",
            "--bitmap",
            "c1",
            "--backing",
            "b1.qcow2",
            "--next",
            "c2",
            "src.qcow2",
            "b2.qcow2",
        ],
    );
    std::fs::File::create(d.join("target.raw"))
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    ours_ok(d, &["verify", "b2.qcow2", "--source", "src.qcow2"]);
}

/// Flips one byte of a data cluster `img` itself stores; returns the guest
/// offset and the (index, offset) of the manifest extent holding it.
fn flip_data_byte(d: &Path, img: &str) -> (u64, usize, u64) {
    let e = qemu_map(d, img)
        .into_iter()
        .find(|e| e["depth"] == 0 && e["data"] == true && e["length"].as_u64().unwrap() > 100)
        .unwrap_or_else(|| panic!("{img} stores no data"));
    let guest = e["start"].as_u64().unwrap() + 100;
    let host = e["offset"].as_u64().unwrap() + 100;
    let mut bytes = std::fs::read(d.join(img)).unwrap();
    bytes[host as usize] ^= 0x40;
    std::fs::write(d.join(img), bytes).unwrap();
    let m = json_file(d, &format!("{img}.json"));
    let (i, x) = m["extents"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .find(|(_, x)| {
            let (o, l) = (x["offset"].as_u64().unwrap(), x["length"].as_u64().unwrap());
            o <= guest && guest < o + l
        })
        .unwrap_or_else(|| panic!("{img}: no extent holds guest offset {guest}"));
    assert_eq!(x["kind"], "data");
    (guest, i, x["offset"].as_u64().unwrap())
}

/// `verify` of `top` fails: exit 1, the human report names `member` with every
/// word, and the JSON report has ok false and `member`'s problems holding them.
fn verify_fails(d: &Path, top: &str, member: &str, words: &[String], what: &str) {
    let o = ours(d, &["verify", top]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{what}: verify exit ({})",
        stderr(&o)
    );
    let text = stdout(&o);
    let line = text
        .lines()
        .find(|l| {
            l.starts_with(&format!("{member}: ")) && words.iter().all(|w| l.contains(w.as_str()))
        })
        .unwrap_or_else(|| panic!("{what}: no report line names {member} with {words:?}:\n{text}"));
    assert!(!line.ends_with("ok (manifest)"), "{what}: {line}");
    assert!(text.contains("verify: FAILED"), "{what}: {text}");
    let o = ours(d, &["verify", "--json", top]);
    assert_eq!(o.status.code(), Some(1), "{what}: verify --json exit");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false, "{what}: {v}");
    let m = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["filename"] == member)
        .unwrap_or_else(|| panic!("{what}: {member} not in {v}"));
    let problems = m["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|p| words
            .iter()
            .all(|w| p.as_str().unwrap().contains(w.as_str()))),
        "{what}: {member}'s problems do not say {words:?}: {v}"
    );
}

fn edit_manifest(d: &Path, name: &str, f: impl FnOnce(&mut Value)) {
    let mut m = json_file(d, name);
    f(&mut m);
    write_json(d, name, &m);
}

#[test]
fn verify_restore_apply_detect_broken_chains() {
    if !qemu_available("verify_restore_apply_detect_broken_chains", TOOLS) {
        return;
    }
    let clean = tempfile::tempdir().unwrap();
    make_chain(clean.path());
    let fresh = || {
        let t = tempfile::tempdir().unwrap();
        copy_dir(clean.path(), t.path());
        t
    };
    let s = |x: &str| x.to_string();
    let untouched = ["b0.qcow2", "b1.qcow2", "b2.qcow2", "target.raw"];

    // A source that differs: the first differing offset is named.
    let t = fresh();
    let d = t.path();
    let (g1, g2) = (guest_bytes(d, "b1.qcow2"), guest_bytes(d, "b2.qcow2"));
    let first = g1.iter().zip(&g2).position(|(a, b)| a != b).unwrap();
    let o = ours(d, &["verify", "--json", "b2.qcow2", "--source", "b1.qcow2"]);
    assert_eq!(o.status.code(), Some(1), "verify against another source");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (&v["ok"], &v["source-equal"]),
        (&Value::from(false), &Value::from(false)),
        "{v}"
    );
    assert!(
        v["members"][0]["problems"][0]
            .as_str()
            .unwrap()
            .contains(&format!("first difference at offset {first}")),
        "{v}"
    );
    // Lower members without a manifest (made by qemu-img) are reported, not failed.
    sh(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "b1.qcow2", "conv.qcow2"],
    );
    sh(
        d,
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-b",
            "conv.qcow2",
            "-F",
            "qcow2",
            "b2.qcow2",
        ],
    );
    edit_manifest(d, "b2.qcow2.json", |m| {
        m["backing"] = serde_json::json!({"filename": "conv.qcow2", "manifest-sha256": null});
    });
    let o = ours(
        d,
        &["verify", "--json", "b2.qcow2", "--source", "src.qcow2"],
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(o.status.code(), Some(0), "{v}");
    assert_eq!(v["members"][1]["filename"], "conv.qcow2", "{v}");
    assert_eq!(v["members"][1]["manifest"], false, "{v}");
    assert_eq!(v["source-equal"], true, "{v}");

    // A flipped byte in a data cluster of the top link.
    let t = fresh();
    let d = t.path();
    let (_, i, off) = flip_data_byte(d, "b2.qcow2");
    let words = [format!("extent {i} (offset {off}"), s("CRC-32")];
    verify_fails(d, "b2.qcow2", "b2.qcow2", &words, "top flip");
    let w = [s("b2.qcow2"), words[0].clone()];
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    refused(d, &["restore", "b2.qcow2", "out.qcow2"], &w, &untouched);
    refused(
        d,
        &["restore", "--format", "raw", "b2.qcow2", "out.raw"],
        &w,
        &untouched,
    );
    refused(d, &["apply", "b2.qcow2", "target.raw"], &w, &untouched);

    // ... and of a lower link.
    let t = fresh();
    let d = t.path();
    let (_, i, off) = flip_data_byte(d, "b1.qcow2");
    let words = [format!("extent {i} (offset {off}"), s("CRC-32")];
    verify_fails(d, "b2.qcow2", "b1.qcow2", &words, "lower flip");
    let v: Value =
        serde_json::from_slice(&ours(d, &["verify", "--json", "b2.qcow2"]).stdout).unwrap();
    assert_eq!(
        v["members"][0]["problems"],
        serde_json::json!([]),
        "the top holds: {v}"
    );
    let w = [s("b1.qcow2"), words[0].clone()];
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    refused(d, &["restore", "b2.qcow2", "out.qcow2"], &w, &untouched);
    refused(d, &["apply", "b1.qcow2", "target.raw"], &w, &untouched);

    // A data extent removed from the manifest (totals fixed: still well formed).
    let t = fresh();
    let d = t.path();
    let mut gone = (0, 0);
    edit_manifest(d, "b2.qcow2.json", |m| {
        let ext = m["extents"].as_array_mut().unwrap();
        let i = ext.iter().position(|e| e["kind"] == "data").unwrap();
        let e = ext.remove(i);
        gone = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let db = m["data-bytes"].as_u64().unwrap() - gone.1;
        m["data-bytes"] = db.into();
    });
    let words = [format!("guest range {}+", gone.0), s("not listed")];
    verify_fails(d, "b2.qcow2", "b2.qcow2", &words, "removed extent");
    let w = [s("b2.qcow2"), format!("guest range {}+", gone.0)];
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    refused(d, &["restore", "b2.qcow2", "out.qcow2"], &w, &untouched);
    refused(d, &["apply", "b2.qcow2", "target.raw"], &w, &untouched);

    // An edited CRC.
    let t = fresh();
    let d = t.path();
    let mut at = (0, 0);
    edit_manifest(d, "b2.qcow2.json", |m| {
        let ext = m["extents"].as_array_mut().unwrap();
        let i = ext.iter().rposition(|e| e["kind"] == "data").unwrap();
        let c = u32::from_str_radix(ext[i]["crc32"].as_str().unwrap(), 16).unwrap() ^ 1;
        ext[i]["crc32"] = format!("{c:08x}").into();
        at = (i, ext[i]["offset"].as_u64().unwrap());
    });
    let words = [format!("extent {} (offset {}", at.0, at.1), s("CRC-32")];
    verify_fails(d, "b2.qcow2", "b2.qcow2", &words, "edited crc");
    let w = [s("b2.qcow2"), words[0].clone()];
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    refused(d, &["restore", "b2.qcow2", "out.qcow2"], &w, &untouched);
    refused(d, &["apply", "b2.qcow2", "target.raw"], &w, &untouched);

    // An edited offset: the extent starts 512 bytes later (totals fixed).
    let t = fresh();
    let d = t.path();
    edit_manifest(d, "b2.qcow2.json", |m| {
        let ext = m["extents"].as_array_mut().unwrap();
        let i = ext.iter().position(|e| e["kind"] == "data").unwrap();
        let (o, l) = (
            ext[i]["offset"].as_u64().unwrap(),
            ext[i]["length"].as_u64().unwrap(),
        );
        ext[i]["offset"] = (o + 512).into();
        ext[i]["length"] = (l - 512).into();
        at = (i, o + 512);
        let db = m["data-bytes"].as_u64().unwrap() - 512;
        m["data-bytes"] = db.into();
    });
    let words = [format!("extent {} (offset {}", at.0, at.1)];
    verify_fails(d, "b2.qcow2", "b2.qcow2", &words, "edited offset");
    let w = [s("b2.qcow2"), words[0].clone()];
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    refused(d, &["restore", "b2.qcow2", "out.qcow2"], &w, &untouched);
    refused(d, &["apply", "b2.qcow2", "target.raw"], &w, &untouched);

    // The previous full backup swapped for another full backup of the same size.
    let t = fresh();
    let d = t.path();
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "other.qcow2", "16M"],
    );
    qemu_io(d, "other.qcow2", &cmds(&["write -P 0x99 0 2M"]));
    ours_ok(d, &["backup", "other.qcow2", "x0.qcow2"]);
    std::fs::rename(d.join("x0.qcow2"), d.join("b0.qcow2")).unwrap();
    std::fs::rename(d.join("x0.qcow2.json"), d.join("b0.qcow2.json")).unwrap();
    ours_ok(d, &["verify", "b0.qcow2"]);
    let words = [s("b0.qcow2"), s("SHA-256")];
    verify_fails(d, "b2.qcow2", "b1.qcow2", &words, "swapped backing");
    refused(
        d,
        &["restore", "b2.qcow2", "out.qcow2"],
        &["b1.qcow2", "b0.qcow2"],
        &untouched,
    );

    // A changed virtual size in the manifest.
    let t = fresh();
    let d = t.path();
    edit_manifest(d, "b2.qcow2.json", |m| {
        m["source"]["virtual-size"] = (17 * MIB).into();
    });
    let words = [s("virtual size")];
    verify_fails(d, "b2.qcow2", "b2.qcow2", &words, "virtual size");
    refused(
        d,
        &["restore", "b2.qcow2", "out.qcow2"],
        &["b2.qcow2", "virtual size"],
        &untouched,
    );
    refused(
        d,
        &["apply", "b2.qcow2", "target.raw"],
        &["b2.qcow2"],
        &untouched,
    );
}

/// Holds `img` open for writing in a qemu-storage-daemon until dropped.
struct Holder {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Holder {
    fn start(img: &Path) -> Holder {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("qsd.pid");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={}",
                img.display()
            ))
            .args(["--blockdev", "driver=qcow2,node-name=q0,file=f0"])
            .arg("--pidfile")
            .arg(&pid)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start qemu-storage-daemon");
        // Dropped (killed and waited for) on every path from here.
        let h = Holder { child, _dir: dir };
        for _ in 0..500 {
            if pid.exists() {
                return h;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("qemu-storage-daemon did not start on {}", img.display());
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn backup_refusals_create_nothing() {
    if !qemu_available(
        "backup_refusals_create_nothing",
        &["qemu-img", "qemu-io", "qemu-storage-daemon"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "16M"],
    );
    qemu_io(
        d,
        "src.qcow2",
        &cmds(&["write -P 0x11 0 1M", "write -P 0x12 9M 64k"]),
    );
    ours_ok(d, &["backup", "src.qcow2", "b0.qcow2"]);
    sh(d, "qemu-img", &["bitmap", "--add", "src.qcow2", "c0"]);
    sh(d, "qemu-img", &["bitmap", "--add", "src.qcow2", "c1"]);
    qemu_io(d, "src.qcow2", &cmds(&["write -P 0x13 4M 64k"]));
    std::fs::File::create(d.join("target.raw"))
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let src = ["src.qcow2"];

    // An existing manifest is never overwritten.
    std::fs::write(d.join("out.qcow2.json"), b"{}\n").unwrap();
    refused(
        d,
        &["backup", "src.qcow2", "out.qcow2"],
        &["out.qcow2.json", "already exists"],
        &["src.qcow2", "out.qcow2.json"],
    );
    refused(
        d,
        &[
            "backup",
            "--bitmap",
            "c0",
            "--next",
            "n1",
            "src.qcow2",
            "out.qcow2",
        ],
        &["out.qcow2.json", "already exists"],
        &["src.qcow2", "out.qcow2.json"],
    );
    std::fs::remove_file(d.join("out.qcow2.json")).unwrap();

    // Bitmaps that cannot be trusted: in use after a crash, and stale.
    std::fs::copy(d.join("src.qcow2"), d.join("inuse.qcow2")).unwrap();
    let o = Command::new("sh")
        .arg("-c")
        .arg("ulimit -c 0; qemu-io -f qcow2 -c 'write -P 0x21 2M 64k' -c abort inuse.qcow2")
        .current_dir(d)
        .output()
        .unwrap();
    assert!(!o.status.success(), "qemu-io abort should die");
    let flags = bitmap_flags(d, "inuse.qcow2", "c0").unwrap();
    assert!(flags.contains(&"in-use".to_string()), "{flags:?}");
    for args in [
        &["backup", "--bitmap", "c0", "inuse.qcow2", "out.qcow2"][..],
        &[
            "backup",
            "--bitmap",
            "c0",
            "--format",
            "raw",
            "inuse.qcow2",
            "out.raw",
        ],
        &[
            "backup",
            "--bitmap",
            "c0",
            "--next",
            "n1",
            "inuse.qcow2",
            "out.qcow2",
        ],
    ] {
        refused(d, args, &["c0", "in-use", "full backup"], &["inuse.qcow2"]);
    }
    let mut stale = std::fs::read(d.join("src.qcow2")).unwrap();
    stale[95] &= 0xfe; // autoclear bit 0: the bitmaps extension is stale
    std::fs::write(d.join("stale.qcow2"), stale).unwrap();
    for args in [
        &["backup", "--bitmap", "c0", "stale.qcow2", "out.qcow2"][..],
        &[
            "backup",
            "--bitmap",
            "c0",
            "--next",
            "n1",
            "stale.qcow2",
            "out.qcow2",
        ],
    ] {
        refused(d, args, &["c0", "stale", "full backup"], &["stale.qcow2"]);
    }

    // A missing bitmap; --next with an existing name; --backing of another size.
    refused(
        d,
        &["backup", "--bitmap", "nope", "src.qcow2", "out.qcow2"],
        &["nope"],
        &src,
    );
    refused(
        d,
        &[
            "backup",
            "--bitmap",
            "c0",
            "--next",
            "c1",
            "src.qcow2",
            "out.qcow2",
        ],
        &["c1", "already exists"],
        &src,
    );
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "big.qcow2", "32M"],
    );
    for args in [
        &[
            "backup",
            "--bitmap",
            "c0",
            "--backing",
            "big.qcow2",
            "src.qcow2",
            "out.qcow2",
        ][..],
        &["backup", "--backing", "big.qcow2", "src.qcow2", "out.qcow2"],
        &[
            "backup",
            "--bitmap",
            "c0",
            "--backing",
            "big.qcow2",
            "--next",
            "n1",
            "src.qcow2",
            "out.qcow2",
        ],
    ] {
        refused(
            d,
            args,
            &["big.qcow2", "virtual size"],
            &["src.qcow2", "big.qcow2"],
        );
    }

    // A source QEMU holds for writing.
    std::fs::copy(d.join("src.qcow2"), d.join("held.qcow2")).unwrap();
    {
        let _h = Holder::start(&d.join("held.qcow2"));
        for args in [
            &["backup", "held.qcow2", "out.qcow2"][..],
            &["backup", "--bitmap", "c0", "held.qcow2", "out.qcow2"],
            &[
                "backup",
                "--bitmap",
                "c0",
                "--next",
                "n1",
                "--then",
                "remove",
                "held.qcow2",
                "out.qcow2",
            ],
        ] {
            refused(d, args, &["held.qcow2", "lock"], &["held.qcow2"]);
        }
    }

    // Usage errors.
    for (args, word) in [
        (
            &[
                "backup",
                "--backing",
                "b0.qcow2",
                "--format",
                "raw",
                "src.qcow2",
                "out.raw",
            ][..],
            "--backing",
        ),
        (
            &[
                "backup",
                "--bitmap",
                "c0",
                "--then",
                "keep",
                "src.qcow2",
                "out.qcow2",
            ],
            "--then",
        ),
        (
            &["backup", "--next", "n1", "src.qcow2", "out.qcow2"],
            "--next",
        ),
        (
            &[
                "backup",
                "-U",
                "--bitmap",
                "c0",
                "--next",
                "n1",
                "src.qcow2",
                "out.qcow2",
            ],
            "-U",
        ),
    ] {
        refused(d, args, &[word], &src);
    }

    // restore never overwrites.
    std::fs::write(d.join("exists.qcow2"), b"keep me").unwrap();
    for args in [
        &["restore", "b0.qcow2", "exists.qcow2"][..],
        &["restore", "--format", "raw", "b0.qcow2", "exists.qcow2"],
    ] {
        refused(
            d,
            args,
            &["exists.qcow2", "already exists"],
            &["exists.qcow2", "b0.qcow2"],
        );
    }

    // apply: no manifest, a qcow2 target, a target of another size.
    std::fs::copy(d.join("b0.qcow2"), d.join("bare.qcow2")).unwrap();
    refused(
        d,
        &["apply", "bare.qcow2", "target.raw"],
        &["bare.qcow2", "manifest"],
        &["target.raw", "bare.qcow2"],
    );
    let o = ours(d, &["verify", "bare.qcow2"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "verify of a backup without manifest"
    );
    assert!(stdout(&o).contains("no manifest"), "{}", stdout(&o));
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "target.qcow2", "16M"],
    );
    refused(
        d,
        &["apply", "b0.qcow2", "target.qcow2"],
        &["target.qcow2", "qcow2"],
        &["target.qcow2", "b0.qcow2"],
    );
    std::fs::File::create(d.join("small.raw"))
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    refused(
        d,
        &["apply", "b0.qcow2", "small.raw"],
        &["small.raw", "bytes"],
        &["small.raw", "b0.qcow2"],
    );

    // OUTPUT is a file the backup reads: the source, a member of its chain, its
    // data file, the previous backup (one without a manifest, as qemu-img makes).
    sh(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=top.data",
            "-b",
            "src.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    sh(d, "qemu-img", &["bitmap", "--add", "top.qcow2", "t0"]);
    qemu_io(d, "top.qcow2", &cmds(&["write -P 0x31 0 64k"]));
    sh(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "src.qcow2", "conv.qcow2"],
    );
    let keep = ["src.qcow2", "top.qcow2", "top.data", "conv.qcow2"];
    for (args, word) in [
        (&["backup", "src.qcow2", "src.qcow2"][..], "src.qcow2"),
        (&["backup", "src.qcow2", "./src.qcow2"], "src.qcow2"),
        (
            &[
                "backup",
                "--bitmap",
                "c0",
                "--next",
                "n1",
                "src.qcow2",
                "src.qcow2",
            ],
            "src.qcow2",
        ),
        (&["backup", "top.qcow2", "src.qcow2"], "src.qcow2"),
        (
            &["backup", "--format", "raw", "top.qcow2", "top.data"],
            "top.data",
        ),
        (
            &[
                "backup",
                "--bitmap",
                "t0",
                "--backing",
                "conv.qcow2",
                "top.qcow2",
                "conv.qcow2",
            ],
            "conv.qcow2",
        ),
    ] {
        refused(d, args, &[word, "never replaces"], &keep);
    }

    // An OUTPUT without its manifest is an interrupted backup: backup replaces it.
    std::fs::write(d.join("half.qcow2"), b"interrupted").unwrap();
    ours_ok(d, &["backup", "src.qcow2", "half.qcow2"]);
    assert_identical(d, "src.qcow2", "half.qcow2", "replaced interrupted backup");
    assert!(
        !listing(d).iter().any(|f| f.starts_with('.')),
        "temporary files left: {:?}",
        listing(d)
    );
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn key_set(k: &[&str]) -> BTreeSet<String> {
    k.iter().map(|s| s.to_string()).collect()
}

/// Merged union of (offset, length) ranges.
fn union(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in r {
        match out.last_mut() {
            Some(p) if o <= p.0 + p.1 => p.1 = p.1.max(o + l - p.0),
            _ => out.push((o, l)),
        }
    }
    out
}

/// Checks a `--json` summary and its manifest against the contract and
/// against `guest` (the source's bytes at backup time).
fn check_summary_and_manifest(
    d: &Path,
    summary: &Output,
    out: &str,
    format: &str,
    bitmap: Option<&str>,
    backing: Option<&str>,
    guest: &[u8],
) -> Value {
    let what = out;
    let s: Value = serde_json::from_slice(&summary.stdout)
        .unwrap_or_else(|e| panic!("{what}: summary is not JSON ({e}): {}", stdout(summary)));
    assert_eq!(
        keys(&s),
        key_set(&[
            "output",
            "manifest",
            "format",
            "kind",
            "bitmap",
            "data-bytes",
            "zero-bytes",
            "extents"
        ]),
        "{what}: summary keys"
    );
    let kind = if bitmap.is_some() {
        "incremental"
    } else {
        "full"
    };
    assert_eq!(s["output"], out, "{what}");
    assert_eq!(s["manifest"], format!("{out}.json"), "{what}");
    assert_eq!(s["format"], format, "{what}");
    assert_eq!(s["kind"], kind, "{what}");
    assert_eq!(
        s["bitmap"],
        bitmap.map_or(Value::Null, |b| b.into()),
        "{what}"
    );
    let m = json_file(d, &format!("{out}.json"));
    assert_eq!(
        keys(&m),
        key_set(&[
            "format",
            "version",
            "created",
            "tool",
            "kind",
            "source",
            "bitmap",
            "backing",
            "output",
            "extents",
            "data-bytes",
            "zero-bytes"
        ]),
        "{what}: manifest keys"
    );
    assert_eq!(m["format"], "qcow2-bitmap-backup", "{what}");
    assert_eq!(m["version"], 1, "{what}");
    let created = m["created"].as_str().unwrap();
    let b = created.as_bytes();
    assert!(
        b.len() == 20
            && b.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                10 => *c == b'T',
                13 | 16 => *c == b':',
                19 => *c == b'Z',
                _ => c.is_ascii_digit(),
            }),
        "{what}: created {created:?} is not RFC 3339 UTC"
    );
    assert!(created.starts_with("20"), "{what}: created {created}");
    assert_eq!(
        m["tool"],
        format!("qcow2-bitmap {}", env!("CARGO_PKG_VERSION")),
        "{what}"
    );
    assert_eq!(m["kind"], kind, "{what}");
    assert_eq!(
        keys(&m["source"]),
        key_set(&["filename", "virtual-size", "cluster-size"]),
        "{what}"
    );
    assert_eq!(m["source"]["filename"], "src.qcow2", "{what}");
    assert_eq!(m["source"]["virtual-size"], guest.len() as u64, "{what}");
    assert_eq!(m["source"]["cluster-size"], 65536, "{what}");
    match bitmap {
        None => assert_eq!(m["bitmap"], Value::Null, "{what}"),
        Some(b) => {
            assert_eq!(
                keys(&m["bitmap"]),
                key_set(&["name", "granularity"]),
                "{what}"
            );
            assert_eq!(m["bitmap"]["name"], b, "{what}");
            assert_eq!(m["bitmap"]["granularity"], 65536, "{what}");
        }
    }
    match backing {
        None => assert_eq!(m["backing"], Value::Null, "{what}"),
        Some(b) => {
            assert_eq!(
                keys(&m["backing"]),
                key_set(&["filename", "manifest-sha256"]),
                "{what}"
            );
            assert_eq!(m["backing"]["filename"], b, "{what}");
            assert_eq!(
                m["backing"]["manifest-sha256"],
                sha256_file(&d.join(format!("{b}.json"))),
                "{what}: the SHA-256 of the previous manifest"
            );
        }
    }
    assert_eq!(
        keys(&m["output"]),
        key_set(&["filename", "format", "cluster-size"]),
        "{what}"
    );
    assert_eq!(m["output"]["filename"], out, "{what}");
    assert_eq!(m["output"]["format"], format, "{what}");
    let cs = if format == "qcow2" {
        Value::from(65536)
    } else {
        Value::Null
    };
    assert_eq!(m["output"]["cluster-size"], cs, "{what}");
    let ext = m["extents"].as_array().unwrap();
    let (mut end, mut data, mut zero) = (0u64, 0u64, 0u64);
    for (i, e) in ext.iter().enumerate() {
        let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert!(o >= end, "{what}: extent {i} unsorted or overlapping");
        assert!(l > 0 && l <= 64 * MIB, "{what}: extent {i} length {l}");
        assert!(
            o + l <= guest.len() as u64,
            "{what}: extent {i} past the end"
        );
        end = o + l;
        let bytes = &guest[o as usize..(o + l) as usize];
        match e["kind"].as_str().unwrap() {
            "data" => {
                assert_eq!(
                    keys(e),
                    key_set(&["offset", "length", "kind", "crc32"]),
                    "{what}: {e}"
                );
                let c = e["crc32"].as_str().unwrap();
                assert!(
                    c.len() == 8
                        && c.bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                    "{what}: crc32 {c:?}"
                );
                assert_eq!(
                    c,
                    format!("{:08x}", crc32fast::hash(bytes)),
                    "{what}: extent {i} crc32"
                );
                data += l;
            }
            "zero" => {
                assert_eq!(
                    keys(e),
                    key_set(&["offset", "length", "kind"]),
                    "{what}: {e}"
                );
                assert!(
                    bytes.iter().all(|&b| b == 0),
                    "{what}: zero extent {i} holds data"
                );
                zero += l;
            }
            k => panic!("{what}: extent kind {k}"),
        }
    }
    assert_eq!(m["data-bytes"], data, "{what}");
    assert_eq!(m["zero-bytes"], zero, "{what}");
    assert_eq!(s["data-bytes"], data, "{what}: summary");
    assert_eq!(s["zero-bytes"], zero, "{what}: summary");
    assert_eq!(s["extents"], ext.len(), "{what}: summary extent count");
    m
}

fn ranges_of(m: &Value, kind: Option<&str>) -> Vec<(u64, u64)> {
    m["extents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| kind.is_none_or(|k| e["kind"] == k))
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

#[test]
fn backup_json_summary_and_manifest_schema() {
    if !qemu_available("backup_json_summary_and_manifest_schema", TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let size = 160 * MIB;
    let mut rng = Rng(0x5c4e);
    random_file(d, "pattern.bin", &mut rng, PATTERN);
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "160M"],
    );
    qemu_io(
        d,
        "src.qcow2",
        &cmds(&[
            "write -P 0x5a 0 70M",
            "write -s pattern.bin 1M 1M",
            "write -z 80M 72M",
            "write -s pattern.bin 155M 1M",
        ]),
    );
    let o = ours_ok(d, &["backup", "--json", "src.qcow2", "full.qcow2"]);
    let guest0 = guest_bytes(d, "src.qcow2");
    let full = check_summary_and_manifest(d, &o, "full.qcow2", "qcow2", None, None, &guest0);
    let o = ours_ok(
        d,
        &[
            "backup",
            "--json",
            "--format",
            "raw",
            "src.qcow2",
            "full.raw",
        ],
    );
    let full_raw = check_summary_and_manifest(d, &o, "full.raw", "raw", None, None, &guest0);
    for (m, what) in [(&full, "full.qcow2"), (&full_raw, "full.raw")] {
        // Every guest byte that is not zero lies in a data extent.
        let data = ranges_of(m, Some("data"));
        let mut covered = vec![false; guest0.len()];
        for &(o, l) in &data {
            covered[o as usize..(o + l) as usize].fill(true);
        }
        let missing = guest0
            .iter()
            .zip(&covered)
            .position(|(&b, &c)| b != 0 && !c);
        assert_eq!(missing, None, "{what}: guest data outside the data extents");
        assert!(
            data.iter().any(|r| r.1 == 64 * MIB),
            "{what}: 70 MiB of data not split at 64 MiB"
        );
        // The allocated zeros are listed too, split at 64 MiB.
        let zeros = union(ranges_of(m, Some("zero")));
        assert!(
            zeros
                .iter()
                .any(|&(o, l)| o <= 80 * MIB && 152 * MIB <= o + l),
            "{what}: the zero clusters at 80M+72M are not zero extents: {zeros:?}"
        );
        assert!(
            ranges_of(m, Some("zero")).iter().any(|r| r.1 == 64 * MIB),
            "{what}: zeros not split"
        );
    }
    sh(d, "qemu-img", &["bitmap", "--add", "src.qcow2", "c0"]);
    let last = size - 100;
    qemu_io(
        d,
        "src.qcow2",
        &[
            "write -P 0x61 1000 3000".into(),
            "write -z 100M 1M".into(),
            "discard 60M 128k".into(),
            "write -s pattern.bin 158M 512k".into(),
            format!("write -P 0x62 {last} 100"),
        ],
    );
    let guest1 = guest_bytes(d, "src.qcow2");
    let o = ours_ok(d, &["extents", "--json", "src.qcow2", "c0"]);
    let dirty: Vec<(u64, u64)> = serde_json::from_slice::<Value>(&o.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert!(!dirty.is_empty());
    let o = ours_ok(
        d,
        &[
            "backup",
            "--json",
            "--format",
            "raw",
            "--bitmap",
            "c0",
            "src.qcow2",
            "inc.raw",
        ],
    );
    let inc_raw = check_summary_and_manifest(d, &o, "inc.raw", "raw", Some("c0"), None, &guest1);
    let o = ours_ok(
        d,
        &[
            "backup",
            "--json",
            "--bitmap",
            "c0",
            "--backing",
            "full.qcow2",
            "--next",
            "c1",
            "src.qcow2",
            "inc.qcow2",
        ],
    );
    let inc = check_summary_and_manifest(
        d,
        &o,
        "inc.qcow2",
        "qcow2",
        Some("c0"),
        Some("full.qcow2"),
        &guest1,
    );
    // Raw: exactly the dirty ranges; qcow2: rounded out to clusters.
    assert_eq!(
        union(ranges_of(&inc_raw, None)),
        union(dirty.clone()),
        "inc.raw covers the dirty ranges"
    );
    let rounded: Vec<(u64, u64)> = dirty
        .iter()
        .map(|&(o, l)| {
            let a = o / (64 * KIB) * (64 * KIB);
            let b = (o + l).next_multiple_of(64 * KIB).min(size);
            (a, b - a)
        })
        .collect();
    assert_eq!(
        union(ranges_of(&inc, None)),
        union(rounded),
        "inc.qcow2 covers the rounded dirty ranges"
    );
    assert!(
        ranges_of(&inc, Some("zero"))
            .iter()
            .any(|&(o, _)| o == 100 * MIB),
        "the zeroed range is a zero extent"
    );
    // Without --json a successful backup prints nothing.
    let o = ours_ok(d, &["backup", "src.qcow2", "quiet.qcow2"]);
    assert!(
        o.stdout.is_empty() && o.stderr.is_empty(),
        "backup without --json printed"
    );
}

/// Big L2 tables (2 MiB clusters: 512 GiB per table) with a little data in
/// each: backup and restore walk the disk in windows, and each window must
/// cost what it maps, not the rest of the table (that was quadratic: ~30 s).
#[test]
fn backup_of_big_sparse_tables_is_fast() {
    if !qemu_available("backup_of_big_sparse_tables_is_fast", TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    sh(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "src.qcow2",
            "4T",
        ],
    );
    let span = 512u64 << 30;
    let mut writes: Vec<String> = (0..8)
        .map(|k| format!("write -P {} {} 4k", k + 1, k * span + MIB))
        .collect();
    writes.push(format!("write -P 0x77 {} 4k", 8 * span - 4 * KIB));
    qemu_io(d, "src.qcow2", &writes);
    let limit = std::time::Duration::from_secs(10);
    for args in [
        &["backup", "src.qcow2", "b0.qcow2"][..],
        &["restore", "b0.qcow2", "r.qcow2"],
    ] {
        let t = Instant::now();
        ours_ok(d, args);
        assert!(t.elapsed() < limit, "{args:?} took {:?}", t.elapsed());
    }
    assert_identical(d, "src.qcow2", "r.qcow2", "4 TiB, 2 MiB clusters");
    assert_check(d, "b0.qcow2", "4 TiB, 2 MiB clusters");
}

/// A full backup lists every range that reads as zeros, allocated or not,
/// so `apply` of it onto a disk full of other bytes gives the source
/// exactly; the qcow2 output still leaves unallocated ranges unallocated.
#[test]
fn full_backup_apply_onto_a_used_disk_is_exact() {
    if !qemu_available("full_backup_apply_onto_a_used_disk_is_exact", TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng(0xf011);
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "8M"],
    );
    qemu_io(
        d,
        "src.qcow2",
        &cmds(&[
            "write -P 0x11 0 1M",
            "write -z 2M 512k",
            "write -P 0x22 5M 64k",
        ]),
    );
    let want = guest_bytes(d, "src.qcow2");
    for format in ["qcow2", "raw"] {
        let out = format!("full.{format}");
        ours_ok(d, &["backup", "--format", format, "src.qcow2", &out]);
        let m = json_file(d, &format!("{out}.json"));
        let covered: u64 = m["data-bytes"].as_u64().unwrap() + m["zero-bytes"].as_u64().unwrap();
        assert_eq!(
            covered,
            8 << 20,
            "{format}: the manifest covers the whole disk"
        );
        random_file(d, "used.raw", &mut rng, 8 << 20);
        ours_ok(d, &["apply", &out, "used.raw"]);
        assert!(
            std::fs::read(d.join("used.raw")).unwrap() == want,
            "{format}: apply of a full backup onto a used disk is not exact"
        );
    }
    // Unallocated stays unallocated in the qcow2 output (only the 512 KiB
    // the source allocates as zeros are zero clusters).
    let zero_clusters: u64 = depth0(&qemu_map(d, "full.qcow2"))
        .iter()
        .filter(|(_, _, zero)| *zero)
        .map(|(_, len, _)| len)
        .sum();
    assert_eq!(zero_clusters, 512 << 10);
    assert_check(d, "full.qcow2", "full backup");
}
