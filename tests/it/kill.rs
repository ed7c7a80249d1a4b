//! Process-level crash tests: SIGKILL a running write command at seeded
//! random moments on a 16 TiB image with four dense bitmaps, then require
//! what the commit protocol promises: `qemu-img check` exits 0 or 3, QEMU
//! opens the image and reads every bitmap, the bitmaps are all old or all new
//! (each command is one transaction), and guest data is unchanged.
//!
//! The image (built once per run with qemu-img/qemu-io, in a temp dir):
//! 16 TiB, 64 KiB clusters, bitmaps b0..b3 of 64 KiB granularity, each with
//! all 512 of its data clusters allocated (a write in every 32 GiB chunk) and
//! b0 ⊂ b1 ⊂ b2 ⊂ b3 (each was disabled after a different round of writes),
//! plus 32 clusters of real guest data. Operations: `merge b0 b3`,
//! `clear b3`, `remove b1 b2`, and `repair` of a copy whose four bitmaps were
//! left in-use by `qemu-io -c abort`.
//!
//! Half the kill delays are uniform over the run's duration, half in its
//! last fifth (+10%), where the commit happens.
//! `QCOW2_BITMAP_KILL_TRIALS=N` sets the kills per operation (default 3);
//! `QCOW2_BITMAP_SEED=N` replays the kill delays (the seed in use is printed;
//! the moment a kill lands still depends on the machine's timing).

use crate::util::*;
use qcow2_bitmap::lock::Access;
use qcow2_bitmap::read::{BitmapState, hex, open_path};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOOLS: [&str; 3] = ["qemu-img", "qemu-io", "qemu-storage-daemon"];
const DEFAULT_TRIALS: u64 = 3;
const KIB: u64 = 1024;
const GIB: u64 = 1 << 30;
const DISK: u64 = 16 << 40;
/// Guest bytes one bitmap data cluster covers (64 KiB clusters and granularity).
const CHUNK: u64 = 32 * GIB;

/// What one bitmap looks like: name, granularity, state, auto flag and
/// (for an `ok` bitmap) our sha256, which the reference runs check against QEMU's.
type Snapshot = Vec<(String, u64, BitmapState, bool, Option<String>)>;

fn snapshot(path: &Path) -> Snapshot {
    let img = open_path(path, Access::Read).unwrap_or_else(|e| panic!("{e}"));
    img.bitmaps()
        .iter()
        .map(|b| {
            let state = img.status(b).state;
            let sha = (state == BitmapState::Ok)
                .then(|| hex(&img.sha256(b, false).unwrap_or_else(|e| panic!("{e}"))));
            (b.name(), b.granularity(), state, b.entry.auto(), sha)
        })
        .collect()
}

/// Runs qemu-io on `img` with `cmds` on stdin; panics on any error.
fn qemu_io(img: &Path, cmds: &str, extra: &[&str]) {
    let mut child = Command::new("qemu-io")
        .args(["-t", "unsafe", "-f", "qcow2"])
        .arg(img)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cmds.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let all = format!("{}{}", stdout(&o), stderr(&o));
    let lower = all.to_lowercase();
    assert!(
        !lower.contains("error") && !lower.contains("failed"),
        "qemu-io {}: {all}",
        img.display()
    );
}

/// `qemu-img bitmap ACTION... IMG NAME`, without fdatasync (build steps only).
fn qemu_bitmap(img: &Path, name: &str, action: &[&str]) {
    let o = Command::new("qemu-img")
        .args(["bitmap", "--image-opts"])
        .args(action)
        .arg(format!(
            "driver=qcow2,file.driver=file,file.filename={},cache.no-flush=on",
            img.display()
        ))
        .arg(name)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img bitmap {action:?}: {}",
        stderr(&o)
    );
}

/// Zero-writes (no data clusters) of 64 KiB .. 256 MiB anywhere.
fn vary_writes(seed: u64) -> String {
    let mut s = seed;
    let mut out = String::new();
    for _ in 0..16 {
        let len = (1 + splitmix64(&mut s) % 4096) * 64 * KIB;
        let off = splitmix64(&mut s) % ((DISK - len) / (64 * KIB)) * 64 * KIB;
        out += &format!("write -q -z -n {off} {len}\n");
    }
    out
}

/// One write in every 32 GiB chunk (so every bitmap data cluster is
/// allocated), eight 1..16 GiB ranges, and 32 clusters of real data.
fn dense_writes(seed: u64) -> String {
    let mut s = seed;
    let mut out = String::new();
    for chunk in 0..DISK / CHUNK {
        let len = (1 + splitmix64(&mut s) % 64) * 64 * KIB;
        let off = chunk * CHUNK + splitmix64(&mut s) % ((CHUNK - len) / (64 * KIB)) * 64 * KIB;
        out += &format!("write -q -z -n {off} {len}\n");
    }
    for _ in 0..8 {
        let len = (1 + splitmix64(&mut s) % 16) * GIB;
        let off = splitmix64(&mut s) % ((DISK - len) / (64 * KIB)) * 64 * KIB;
        out += &format!("write -q -z -n {off} {len}\n");
    }
    for _ in 0..32 {
        let pattern = 1 + splitmix64(&mut s) % 255;
        let off = splitmix64(&mut s) % (DISK / (64 * KIB)) * 64 * KIB;
        out += &format!("write -q -P {pattern} {off} 65536\n");
    }
    out
}

/// Builds the dense image and its in-use twin in `dir`.
fn build(dir: &Path) -> (PathBuf, PathBuf) {
    let img = dir.join("base.qcow2");
    let o = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=64k"])
        .arg(&img)
        .arg("16T")
        .output()
        .unwrap();
    assert!(o.status.success(), "qemu-img create: {}", stderr(&o));
    for k in 0..4 {
        qemu_bitmap(&img, &format!("b{k}"), &["--add", "-g", "64K"]);
    }
    // Round g reaches b{g}..b3 only, so b0 ⊂ b1 ⊂ b2 ⊂ b3.
    for g in 0..4 {
        qemu_io(&img, &vary_writes(1000 + g), &[]);
        if g < 3 {
            qemu_bitmap(&img, &format!("b{g}"), &["--disable"]);
        }
    }
    for k in 0..3 {
        qemu_bitmap(&img, &format!("b{k}"), &["--enable"]);
    }
    qemu_io(&img, &dense_writes(42), &[]);
    let (rc, v) = qemu_check(&img);
    assert_eq!(rc, 0, "built image: qemu-img check: {v}");
    let inuse = dir.join("inuse.qcow2");
    std::fs::copy(&img, &inuse).unwrap();
    // `abort` ends qemu-io without closing the image: the bitmaps stay in-use.
    let o = Command::new("qemu-io")
        .args(["-t", "unsafe", "-f", "qcow2"])
        .arg(&inuse)
        .args(["-c", "write -q -P 7 1M 64k", "-c", "abort"])
        .output()
        .unwrap();
    assert!(
        o.status.signal().is_some(),
        "qemu-io -c abort did not abort"
    );
    (img, inuse)
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_qcow2-bitmap")
}

fn spawn(args: &[&str], img: &Path) -> std::process::Child {
    let mut cmd = Command::new(bin());
    cmd.arg(args[0]).arg(img).args(&args[1..]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    cmd.spawn().expect("spawn qcow2-bitmap")
}

/// QEMU's sha256 of every `ok` bitmap equals ours.
fn assert_qemu_hashes(path: &Path, snap: &Snapshot, what: &str) {
    let mut qmp = Qmp::start(path);
    for (name, _, _, _, sha) in snap {
        if let Some(sha) = sha {
            assert_eq!(&qmp.sha256(name), sha, "{what}: QEMU's sha256 of {name}");
        }
    }
}

/// The bitmaps QEMU lists equal ours (names, granularities, flags).
fn assert_qemu_lists(path: &Path, snap: &Snapshot, what: &str) {
    let qemu = qemu_info_bitmaps(path);
    let ours: Vec<(String, u64, Vec<String>)> = snap
        .iter()
        .map(|(name, gran, state, auto, _)| {
            let mut flags = Vec::new();
            if *state == BitmapState::InUse {
                flags.push("in-use".to_string());
            }
            if *auto {
                flags.push("auto".to_string());
            }
            (name.clone(), *gran, flags)
        })
        .collect();
    assert_eq!(qemu, ours, "{what}: qemu-img info bitmaps");
}

#[derive(Default)]
struct Tally {
    finished: u64,
    killed: u64,
    old: u64,
    new: u64,
    leaked: u64,
}

/// One operation: a reference run, then `trials` kills at random moments.
fn kill_trials(
    dir: &Path,
    source: &Path,
    args: &[&str],
    trials: u64,
    rng: &mut u64,
    guest: &str,
) -> Tally {
    let label = args.join(" ");
    let old = snapshot(source);
    let reference = dir.join("reference.qcow2");
    // Two runs to completion: the first warms the caches, the second (like the
    // trials) gives the duration the kill delays are drawn from.
    let mut duration = Duration::ZERO;
    for _ in 0..2 {
        std::fs::copy(source, &reference).unwrap();
        let t0 = Instant::now();
        let status = spawn(args, &reference).wait().unwrap();
        duration = t0.elapsed();
        assert!(status.success(), "{label}: reference run {status:?}");
    }
    let new = snapshot(&reference);
    assert_ne!(old, new, "{label}: the operation changed nothing");
    assert_eq!(qemu_check(&reference).0, 0, "{label}: reference run");
    assert_qemu_lists(&reference, &new, &label);
    assert_qemu_hashes(&reference, &new, &label);
    assert_eq!(
        guest_fingerprint_of(&reference),
        guest,
        "{label}: guest data"
    );

    let mut tally = Tally::default();
    let trial = dir.join("trial.qcow2");
    for t in 0..trials {
        std::fs::copy(source, &trial).unwrap();
        // Half the kills anywhere in the run, half near its end, where the
        // commit (a short tail after reading the bitmaps) happens.
        let d = duration.as_micros() as u64;
        let micros = if splitmix64(rng) % 2 == 0 {
            splitmix64(rng) % (d + 1)
        } else {
            d * 8 / 10 + splitmix64(rng) % (d * 3 / 10 + 1)
        };
        let delay = Duration::from_micros(micros);
        let what = format!("{label}: trial {t}, kill after {delay:?} (run takes {duration:?})");
        let mut child = spawn(args, &trial);
        std::thread::sleep(delay);
        // SIGKILL; the process may have exited already (then it must have succeeded).
        let _ = child.kill();
        let status = child.wait().unwrap();
        if status.signal() == Some(9) {
            tally.killed += 1;
        } else {
            assert!(
                status.success(),
                "{what}: exited with {status:?} before the kill"
            );
            tally.finished += 1;
        }
        let (rc, check) = qemu_check(&trial);
        assert!(
            rc == 0 || rc == 3,
            "{what}: qemu-img check rc {rc}: {check}"
        );
        tally.leaked += u64::from(rc == 3);
        let got = snapshot(&trial);
        if got == old {
            tally.old += 1;
        } else if got == new {
            tally.new += 1;
        } else {
            panic!(
                "{what}: bitmaps are neither all old nor all new:\nold {old:?}\nnew {new:?}\ngot {got:?}"
            );
        }
        assert_qemu_lists(&trial, &got, &what);
        assert_qemu_hashes(&trial, &got, &what);
        assert_eq!(guest_fingerprint_of(&trial), guest, "{what}: guest data");
    }
    eprintln!(
        "kill {label}: run {duration:?}; {trials} trials: {} killed, {} finished before the kill; \
         outcomes old {} new {}; {} with leaked clusters; corrupt 0",
        tally.killed, tally.finished, tally.old, tally.new, tally.leaked
    );
    tally
}

#[test]
fn sigkill_during_write_commands_leaves_old_or_new_bitmaps() {
    if !qemu_available(
        "sigkill_during_write_commands_leaves_old_or_new_bitmaps",
        &TOOLS,
    ) {
        return;
    }
    let seed = env_u64("QCOW2_BITMAP_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        t.as_nanos() as u64
    });
    let trials = env_u64("QCOW2_BITMAP_KILL_TRIALS").unwrap_or(DEFAULT_TRIALS);
    eprintln!(
        "kill: seed {seed:#x} (replay with QCOW2_BITMAP_SEED={seed:#x}), {trials} trials per operation"
    );
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let (base, inuse) = build(dir.path());
    eprintln!("kill: built the 16 TiB image in {:?}", t0.elapsed());
    let guest = guest_fingerprint_of(&base);
    let old = snapshot(&base);
    assert_eq!(old.len(), 4);
    assert!(
        old.windows(2).all(|w| w[0].4 != w[1].4),
        "bitmaps do not differ"
    );
    assert_qemu_hashes(&base, &old, "built image");
    // The in-use twin differs from base only by the 64 KiB written at 1 MiB.
    let inuse_guest = guest_fingerprint_of(&inuse);
    assert_ne!(inuse_guest, guest);
    let mut rng = seed;
    let mut total = Tally::default();
    let ops: [(&Path, &[&str], &str); 4] = [
        (&base, &["merge", "b0", "b3"], &guest),
        (&base, &["clear", "b3"], &guest),
        (&base, &["remove", "b1", "b2"], &guest),
        (&inuse, &["repair"], &inuse_guest),
    ];
    for (source, args, g) in ops {
        let t = kill_trials(dir.path(), source, args, trials, &mut rng, g);
        total.killed += t.killed;
        total.finished += t.finished;
        total.old += t.old;
        total.new += t.new;
        total.leaked += t.leaked;
    }
    eprintln!(
        "kill: total {} trials: {} killed, {} finished; old {} new {}; leaked {}; corrupt 0 ({:?})",
        4 * trials,
        total.killed,
        total.finished,
        total.old,
        total.new,
        total.leaked,
        t0.elapsed()
    );
}
