//! Memory and time bounds on hostile claims: a small QEMU-made fixture,
//! padded to 1 MiB, with one header or bitmap field patched to a huge value
//! (65535 bitmaps, a 64 MiB directory, a 512 MiB bitmap, a 2^32-entry L1
//! table, ...). Every read command, `repair --dry-run`, `repair` and the write
//! commands run as the real binary under `prlimit --as` and a wall-clock
//! limit: each must finish in time, never die by a signal or panic, exit with
//! its documented code, and a refusal is one stderr line that names what is
//! wrong (a read refusal: an offset or the missing bitmap).

use crate::util::*;
use qcow2_bitmap::format::ext_type;
use qcow2_bitmap::read::Image;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Address-space limit. A normal run (`check --json` of several.qcow2) still
/// completes under `--as` = 8 MiB and peaks at ~4 MiB RSS; a run that believed
/// any of these claims would need 512 MiB or more.
const AS_LIMIT: u64 = 256 << 20;
/// Wall-clock limit per command; normal runs take well under 0.5 s here.
const TIME_LIMIT: Duration = Duration::from_secs(10);
/// Every image is padded to this size (zeros after the fixture's last cluster).
const FILE_SIZE: usize = 1 << 20;

/// One hostile image: big-endian fields written at absolute offsets, and a
/// string that `check`'s report (stdout and stderr) must contain.
struct Case {
    name: &'static str,
    patches: Vec<(u64, Vec<u8>)>,
    needle: &'static str,
}

/// Offsets located by parsing the fixture with the library (not hard-coded).
struct Layout {
    /// The bitmaps extension's body (nb_bitmaps).
    bitmaps_body: u64,
    /// The first extension's 8-byte type/length header.
    first_ext: u64,
    /// The first bitmap's directory entry.
    entry: u64,
}

fn layout(bytes: &[u8]) -> Layout {
    let img = Image::open(bytes.to_vec()).expect("fixture opens");
    let bitmaps = img
        .extensions()
        .iter()
        .find(|e| e.kind == ext_type::BITMAPS)
        .expect("bitmaps extension");
    Layout {
        bitmaps_body: bitmaps.offset + 8,
        first_ext: img.extensions()[0].offset,
        entry: img.bitmaps()[0].entry.offset,
    }
}

fn u32be(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn u64be(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

/// The hostile claims. The fixture (one.qcow2) is 1 GiB virtual, 64 KiB
/// clusters, one bitmap `b0` of 64 KiB granularity with a one-entry table.
fn cases(l: &Layout) -> Vec<Case> {
    let nb = l.bitmaps_body;
    let e = l.entry;
    vec![
        Case {
            name: "nb_bitmaps 65535, one entry in the directory",
            patches: vec![(nb, u32be(65535))],
            needle: "holds 1 entries but the bitmaps extension says 65535",
        },
        Case {
            name: "bitmap_directory_size at its maximum, past EOF",
            patches: vec![(nb, u32be(65535)), (nb + 8, u64be(1024 * 65535))],
            needle: "67107840 bytes at offset",
        },
        Case {
            name: "bitmap_directory_size above its maximum",
            patches: vec![(nb + 8, u64be(u64::MAX))],
            needle: "bitmap_directory_size",
        },
        Case {
            // 8192 entries of 64 KiB clusters: 512 MiB of bitmap (the format's
            // limit), for a virtual size of 2^48 bytes, in a 1 MiB file.
            name: "a 512 MiB bitmap (8192-entry table) in a 1 MiB file",
            patches: vec![(e + 8, u32be(8192)), (24, u64be(1 << 48))],
            needle: "L1 table",
        },
        Case {
            name: "bitmap_table_size 2^27 (a 1 GiB table)",
            patches: vec![(e + 8, u32be(0x800_0000))],
            needle: "bitmap_table_size 134217728",
        },
        Case {
            name: "bitmap_table_size u32::MAX",
            patches: vec![(e + 8, u32be(u32::MAX))],
            needle: "bitmap_table_size 4294967295",
        },
        Case {
            name: "l1_size u32::MAX",
            patches: vec![(36, u32be(u32::MAX))],
            needle: "exceeding the end of the file",
        },
        Case {
            name: "refcount_table_clusters u32::MAX",
            patches: vec![(56, u32be(u32::MAX))],
            needle: "exceeding the end of the file",
        },
        Case {
            name: "nb_snapshots u32::MAX",
            patches: vec![(60, u32be(u32::MAX)), (64, u64be(0x3_0000))],
            needle: "4294967295 snapshots",
        },
        Case {
            name: "header_length 65535",
            patches: vec![(100, u32be(0xffff))],
            needle: "no bitmaps extension",
        },
        Case {
            name: "first header extension length 2^32-16",
            patches: vec![(l.first_ext + 4, u32be(0xffff_fff0))],
            needle: "length 4294967280 of extension",
        },
        Case {
            name: "virtual size 2^63 - 512",
            patches: vec![(24, u64be((1 << 63) - 512))],
            needle: "virtual size 9223372036854775296",
        },
        Case {
            name: "virtual size u64::MAX",
            patches: vec![(24, u64be(u64::MAX))],
            needle: "virtual size 18446744073709551615",
        },
    ]
}

fn build(base: &[u8], case: &Case) -> Vec<u8> {
    let mut bytes = base.to_vec();
    bytes.resize(FILE_SIZE.max(bytes.len()), 0);
    for (off, v) in &case.patches {
        let at = usize::try_from(*off).unwrap();
        bytes[at..at + v.len()].copy_from_slice(v);
    }
    bytes
}

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs the binary under `prlimit --as=AS_LIMIT`; kills it after TIME_LIMIT.
fn run_bounded(dir: &Path, args: &[&str]) -> Result<Run, String> {
    let out = dir.join("stdout");
    let err = dir.join("stderr");
    let mut child = Command::new("prlimit")
        .arg(format!("--as={AS_LIMIT}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_qcow2-bitmap"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn prlimit");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {TIME_LIMIT:?}: killed"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Run {
        status,
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
        elapsed: t0.elapsed(),
    })
}

/// The documented exit codes of a command (cli.md).
fn allowed_codes(cmd: &str) -> &'static [i32] {
    match cmd {
        "check" => &[0, 1, 2, 3, 4],
        _ => &[0, 1],
    }
}

/// Judges one run; returns a failure description.
fn judge(what: &str, cmd: &str, r: &Run) -> Option<String> {
    let Some(code) = r.status.code() else {
        return Some(format!("{what}: killed by a signal ({:?})", r.status));
    };
    if !allowed_codes(cmd).contains(&code) {
        return Some(format!("{what}: exit {code}: {}", r.stderr.trim_end()));
    }
    // A refusal (exit 1 from anything but check, whose 1 is "incomplete"):
    // one line, with the prefix, naming an offset or the missing bitmap.
    if code == 1 && !matches!(cmd, "check" | "repair" | "write") {
        let line = r.stderr.trim_end();
        let named = line.contains(" at offset ") || line.contains("not found in the image");
        if r.stderr.lines().count() != 1 || !line.starts_with("qcow2-bitmap: ") || !named {
            return Some(format!(
                "{what}: refusal is not one naming line: {:?}",
                r.stderr
            ));
        }
    }
    if code == 0 && !r.stderr.is_empty() && cmd != "repair" {
        return Some(format!("{what}: exit 0 with stderr {:?}", r.stderr));
    }
    None
}

fn commands(p: &str) -> Vec<Vec<String>> {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        v(&["info", p]),
        v(&["info", "--json", p]),
        v(&["dump", p]),
        v(&["dump", "--json", p, "--bitmap", "b0"]),
        v(&["extents", p, "b0"]),
        v(&["extents", "--all", "--force", "--json", p, "b0"]),
        v(&["hash", p, "b0"]),
        v(&["hash", "--force", p, "b0"]),
        v(&["check", p]),
        v(&["check", "--json", p]),
        v(&["repair", "--dry-run", p]),
    ]
}

#[test]
fn huge_claims_stay_within_memory_and_time_limits() {
    if which("prlimit").is_none() {
        eprintln!("SKIPPED: huge_claims_stay_within_memory_and_time_limits: prlimit not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read(fixture("one.qcow2")).unwrap();
    let l = layout(&base);
    let mut failures = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut runs = 0;
    for case in cases(&l) {
        let img = dir.path().join("hostile.qcow2");
        std::fs::write(&img, build(&base, &case)).unwrap();
        let p = img.to_str().unwrap();
        let mut check_report = None;
        for args in commands(p) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let what = format!("{}: {}", case.name, args.join(" "));
            match run_bounded(dir.path(), &args) {
                Err(e) => failures.push(format!("{what}: {e}")),
                Ok(r) => {
                    runs += 1;
                    slowest = slowest.max(r.elapsed);
                    failures.extend(judge(&what, args[0], &r));
                    if args == ["check", p] {
                        check_report = Some(format!("{}{}", r.stdout, r.stderr));
                    }
                }
            }
        }
        if let Some(report) = check_report
            && !report.contains(case.needle)
        {
            failures.push(format!(
                "{}: check does not say {:?}:\n{report}",
                case.name, case.needle
            ));
        }
        // Write commands, each on a fresh copy: exit 0, or a one-line
        // refusal (exit 1) that leaves the image byte-identical.
        let bytes = build(&base, &case);
        let w = dir.path().join("write.qcow2");
        let wp = w.to_str().unwrap();
        for args in [
            vec!["add", wp, "new"],
            vec!["clear", wp, "b0"],
            vec!["disable", wp, "b0"],
            vec!["merge", wp, "b0", "b0"],
            vec!["remove", wp, "b0"],
        ] {
            std::fs::write(&w, &bytes).unwrap();
            let what = format!("{}: {}", case.name, args.join(" "));
            match run_bounded(dir.path(), &args) {
                Err(e) => failures.push(format!("{what}: {e}")),
                Ok(r) => {
                    runs += 1;
                    slowest = slowest.max(r.elapsed);
                    failures.extend(judge(&what, "write", &r));
                    let code = r.status.code();
                    if code == Some(1) && std::fs::read(&w).unwrap() != bytes {
                        failures.push(format!("{what}: refused, but the image changed"));
                    }
                    if code == Some(1)
                        && (r.stderr.lines().count() != 1
                            || !r.stderr.starts_with("qcow2-bitmap: "))
                    {
                        failures.push(format!("{what}: not one line: {:?}", r.stderr));
                    }
                }
            }
        }
        // Real repair, on the copy: finishes, exit 0 or 1, never a signal.
        let what = format!("{}: repair", case.name);
        match run_bounded(dir.path(), &["repair", p]) {
            Err(e) => failures.push(format!("{what}: {e}")),
            Ok(r) => {
                runs += 1;
                slowest = slowest.max(r.elapsed);
                failures.extend(judge(&what, "repair", &r));
            }
        }
    }
    eprintln!(
        "bounds: {runs} runs under --as={} MiB, slowest {slowest:?}",
        AS_LIMIT >> 20
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A virtual size needing more than `i32::MAX` L1 entries makes QEMU refuse
/// the image ("Image is too big", checked with qemu-img when present):
/// `check` reports it as corruption, `repair` and `repair --dry-run` refuse
/// with one line and leave the image byte-identical (before, repair dropped
/// the bitmap, whose table is "too small" only for the absurd size, and
/// exited 0).
#[test]
fn image_too_big_for_qemu_is_reported_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("too-big.qcow2");
    let mut bytes = std::fs::read(fixture("one.qcow2")).unwrap();
    bytes[24..32].copy_from_slice(&((1u64 << 63) - 512).to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let p = img.to_str().unwrap();
    let out = run(&["check", p]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("Image is too big"),
        "{}",
        stdout(&out)
    );
    for args in [vec!["repair", p], vec!["repair", "--dry-run", p]] {
        let out = run(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("Image is too big") && err.contains("untouched"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(&img).unwrap(),
            bytes,
            "{args:?} changed the image"
        );
    }
    if which("qemu-img").is_some() {
        let q = std::process::Command::new("qemu-img")
            .args(["info", "-U", p])
            .output()
            .unwrap();
        assert!(!q.status.success());
        assert!(String::from_utf8_lossy(&q.stderr).contains("Image is too big"));
    }
}
