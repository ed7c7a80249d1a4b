//! Process-level crash tests of the backup commands (the write commands'
//! kill tests are in `kill.rs`): SIGKILL `backup` (with and without
//! `--next`), `restore` and `apply` at seeded random moments and require
//! what the contract promises:
//! - never a manifest beside an incomplete backup: whenever `OUTPUT.json`
//!   exists, OUTPUT passes `qemu-img check` and `verify --source` (the
//!   source's guest view equals the backup's chain);
//! - without `--next` the source is byte-identical; with it, `qemu-img
//!   check` of the source exits 0 or 3 and its bitmaps are all old or all new;
//! - a restore output exists only complete (`qemu-img compare` identical);
//! - an interrupted `apply` run again gives the right target.
//!
//! The source: 1 GiB, 64 KiB clusters, 192 MiB of seeded data, a full
//! backup, then bitmap `b0` and 96 MiB of scattered writes.
//! `QCOW2_BITMAP_KILL_TRIALS=N` sets the kills per operation (default 3),
//! `QCOW2_BITMAP_SEED=N` replays the delays.

use crate::util::*;
use qcow2_bitmap::lock::Access;
use qcow2_bitmap::read::open_path;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOOLS: [&str; 2] = ["qemu-img", "qemu-io"];
const MIB: u64 = 1 << 20;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_qcow2-bitmap")
}

fn run_in(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn tool(dir: &Path, prog: &str, args: &[&str]) -> std::process::Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn qemu_io_stdin(dir: &Path, img: &str, cmds: &str) {
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2", img])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cmds.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let all = format!("{}{}", stdout(&o), stderr(&o)).to_lowercase();
    assert!(!all.contains("error") && !all.contains("failed"), "{all}");
}

fn bitmaps(path: &Path) -> Vec<(String, bool)> {
    let img = open_path(path, Access::Read).unwrap();
    img.bitmaps()
        .iter()
        .map(|b| (b.name(), b.entry.auto()))
        .collect()
}

/// Files in `dir` other than the given ones (temporary files left behind are fine,
/// but they must be temporary names, never OUTPUT.json without OUTPUT).
fn cleanup(dir: &Path, names: &[&str]) {
    for n in names {
        let _ = std::fs::remove_file(dir.join(n));
        let _ = std::fs::remove_file(dir.join(format!("{n}.json")));
    }
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().contains(".tmp-") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
}

struct Kill {
    rng: u64,
    trials: u64,
}

impl Kill {
    /// Runs `args` to completion twice (warm, then timed), then `trials`
    /// kills; `check(killed)` judges each outcome.
    fn trials(
        &mut self,
        dir: &Path,
        args: &[&str],
        mut reset: impl FnMut(),
        mut check: impl FnMut(bool, &str),
    ) -> (u64, u64) {
        let label = args.join(" ");
        let mut duration = Duration::MAX;
        for _ in 0..2 {
            reset();
            let t0 = Instant::now();
            let o = run_in(dir, args);
            // The shorter run: kills must land while a trial still runs, on a
            // machine whose load changes from run to run.
            duration = duration.min(t0.elapsed());
            assert!(o.status.success(), "{label}: {}", stderr(&o));
            check(false, &format!("{label}: reference run"));
        }
        let (mut killed, mut finished) = (0, 0);
        for t in 0..self.trials {
            reset();
            let d = duration.as_micros() as u64;
            // Half anywhere in the run, half in its last part (the renames
            // and the rotation).
            let micros = if splitmix64(&mut self.rng) % 2 == 0 {
                splitmix64(&mut self.rng) % (d * 9 / 10 + 1)
            } else {
                d * 6 / 10 + splitmix64(&mut self.rng) % (d * 4 / 10 + 1)
            };
            let delay = Duration::from_micros(micros);
            let what = format!("{label}: trial {t}, kill after {delay:?} of {duration:?}");
            let mut child = Command::new(bin())
                .args(args)
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(delay);
            let _ = child.kill();
            let status = child.wait().unwrap();
            let was_killed = status.signal() == Some(9);
            if was_killed {
                killed += 1;
            } else {
                assert!(status.success(), "{what}: {status:?}");
                finished += 1;
            }
            check(was_killed, &what);
        }
        eprintln!(
            "kill {label}: run {duration:?}; {} trials: {killed} killed, {finished} finished",
            self.trials
        );
        (killed, finished)
    }
}

#[test]
fn sigkill_during_backup_restore_apply() {
    if !qemu_available("sigkill_during_backup_restore_apply", &TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let seed = env_u64("QCOW2_BITMAP_SEED").unwrap_or(0xb4c6_0000);
    eprintln!("sigkill_during_backup_restore_apply: seed {seed:#x}");
    let mut rng = seed;
    let pattern: Vec<u8> = (0..8 * MIB).map(|_| splitmix64(&mut rng) as u8).collect();
    std::fs::write(d.join("pattern.bin"), &pattern).unwrap();
    assert!(
        tool(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "src.qcow2", "1G"]
        )
        .status
        .success()
    );
    let mut cmds = String::new();
    for i in 0..24 {
        cmds.push_str(&format!(
            "write -s pattern.bin {} {}\n",
            i * 40 * MIB,
            8 * MIB
        ));
    }
    qemu_io_stdin(d, "src.qcow2", &cmds);
    let o = run_in(d, &["backup", "src.qcow2", "full.qcow2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        tool(d, "qemu-img", &["bitmap", "--add", "src.qcow2", "b0"])
            .status
            .success()
    );
    let mut cmds = String::new();
    for _ in 0..1536 {
        let off = splitmix64(&mut rng) % (1 << 30) / 65536 * 65536;
        cmds.push_str(&format!("write -s pattern.bin {off} 65536\n"));
    }
    qemu_io_stdin(d, "src.qcow2", &cmds);
    std::fs::copy(d.join("src.qcow2"), d.join("src.orig")).unwrap();
    let src_sha = sha256_file(&d.join("src.qcow2"));
    let old_bitmaps = bitmaps(&d.join("src.qcow2"));
    let trials = env_u64("QCOW2_BITMAP_KILL_TRIALS").unwrap_or(3);
    let mut k = Kill { rng, trials };

    // backup without --next: the source never changes.
    let mut killed = 0;
    let (n, _) = k.trials(
        d,
        &[
            "backup",
            "--bitmap",
            "b0",
            "--backing",
            "full.qcow2",
            "src.qcow2",
            "inc.qcow2",
        ],
        || cleanup(d, &["inc.qcow2"]),
        |_, what| {
            assert_eq!(
                sha256_file(&d.join("src.qcow2")),
                src_sha,
                "{what}: source changed"
            );
            if d.join("inc.qcow2.json").exists() {
                assert!(
                    d.join("inc.qcow2").exists(),
                    "{what}: manifest without backup"
                );
                assert_eq!(qemu_check(&d.join("inc.qcow2")).0, 0, "{what}: check");
                let v = run_in(d, &["verify", "--source", "src.qcow2", "inc.qcow2"]);
                assert!(v.status.success(), "{what}: verify: {}", stdout(&v));
            }
        },
    );
    killed += n;

    // backup --next: bitmaps old or new, check 0 or 3.
    let new_bitmaps = vec![("b0".to_string(), false), ("b1".to_string(), true)];
    killed += k
        .trials(
            d,
            &[
                "backup",
                "--bitmap",
                "b0",
                "--backing",
                "full.qcow2",
                "--next",
                "b1",
                "--then",
                "disable",
                "src.qcow2",
                "inc.qcow2",
            ],
            || {
                cleanup(d, &["inc.qcow2"]);
                std::fs::copy(d.join("src.orig"), d.join("src.qcow2")).unwrap();
            },
            |_, what| {
                let (rc, report) = qemu_check(&d.join("src.qcow2"));
                assert!(rc == 0 || rc == 3, "{what}: source check {rc}: {report}");
                let got = bitmaps(&d.join("src.qcow2"));
                assert!(
                    got == old_bitmaps || got == new_bitmaps,
                    "{what}: bitmaps neither old nor new: {got:?}"
                );
                if got == new_bitmaps {
                    assert!(
                        d.join("inc.qcow2.json").exists(),
                        "{what}: rotated before the backup was durable"
                    );
                }
                if d.join("inc.qcow2.json").exists() {
                    assert_eq!(qemu_check(&d.join("inc.qcow2")).0, 0, "{what}: check");
                    let v = run_in(d, &["verify", "--source", "src.qcow2", "inc.qcow2"]);
                    assert!(v.status.success(), "{what}: verify: {}", stdout(&v));
                }
            },
        )
        .0;
    // A finished incremental for restore and apply.
    std::fs::copy(d.join("src.orig"), d.join("src.qcow2")).unwrap();
    cleanup(d, &["inc.qcow2"]);
    let o = run_in(
        d,
        &[
            "backup",
            "--bitmap",
            "b0",
            "--backing",
            "full.qcow2",
            "src.qcow2",
            "inc.qcow2",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    // restore: the output exists only complete.
    killed += k
        .trials(
            d,
            &["restore", "inc.qcow2", "r.qcow2"],
            || cleanup(d, &["r.qcow2"]),
            |_, what| {
                if d.join("r.qcow2").exists() {
                    let c = tool(d, "qemu-img", &["compare", "-q", "src.qcow2", "r.qcow2"]);
                    assert!(c.status.success(), "{what}: restore output incomplete");
                    assert_eq!(qemu_check(&d.join("r.qcow2")).0, 0, "{what}: check");
                }
            },
        )
        .0;

    // apply: interrupted, then run again, gives the source's raw view.
    let o = run_in(
        d,
        &[
            "backup",
            "--format",
            "raw",
            "--bitmap",
            "b0",
            "src.qcow2",
            "inc.raw",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        tool(
            d,
            "qemu-img",
            &["convert", "-O", "raw", "full.qcow2", "base.raw"]
        )
        .status
        .success()
    );
    assert!(
        tool(
            d,
            "qemu-img",
            &["convert", "-O", "raw", "src.qcow2", "want.raw"]
        )
        .status
        .success()
    );
    let want = sha256_file(&d.join("want.raw"));
    killed += k
        .trials(
            d,
            &["apply", "inc.raw", "target.raw"],
            || {
                std::fs::copy(d.join("base.raw"), d.join("target.raw")).unwrap();
            },
            |killed, what| {
                if killed {
                    let o = run_in(d, &["apply", "inc.raw", "target.raw"]);
                    assert!(o.status.success(), "{what}: rerun: {}", stderr(&o));
                }
                assert_eq!(sha256_file(&d.join("target.raw")), want, "{what}: target");
            },
        )
        .0;
    assert!(
        killed > 0 || trials == 0,
        "no kill landed in {} trials: the runs are too short to judge",
        4 * trials
    );
}
