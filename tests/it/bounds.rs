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

// ---------------------------------------------------------------------------
// Guest data (`map`, `guest::Chain` reads) under the same kind of limits.

/// Address space for the guest-data runs below (a deep chain maps every layer).
const GUEST_AS_LIMIT: u64 = 1 << 30;
/// Wall clock for the guest-data runs (the 1000-layer contract).
const GUEST_TIME_LIMIT: Duration = Duration::from_secs(20);
/// Peak RSS any data command may reach on a 16 TiB image (cli.md v2.1).
const GUEST_RSS_LIMIT_KIB: u64 = 128 << 10;

/// A finished run with its peak resident set.
struct Limited {
    run: Run,
    max_rss_kib: u64,
}

/// Runs `program args` (with `envs`) under `prlimit --as=as_limit`, killed
/// after `limit`. The peak RSS is the program's `VmHWM` (prlimit execs it,
/// so the pid is the program's), polled every millisecond until it exits:
/// the kernel keeps the high-water mark, so only growth in the last
/// millisecond could be missed. (`wait4`'s `ru_maxrss` cannot be used: it
/// keeps the RSS of the forked test process from before the exec.)
fn run_limited(
    dir: &Path,
    as_limit: u64,
    limit: Duration,
    program: &Path,
    args: &[&str],
    envs: &[(&str, &Path)],
) -> Result<Limited, String> {
    let out = dir.join("stdout");
    let err = dir.join("stderr");
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--as={as_limit}"))
        .arg("--")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn prlimit");
    let status_file = format!("/proc/{}/status", child.id());
    let t0 = Instant::now();
    let mut max_rss_kib = 0;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(&status_file)
            && let Some(kib) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            max_rss_kib = max_rss_kib.max(kib);
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {limit:?}: killed"));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    Ok(Limited {
        run: Run {
            status,
            stdout: std::fs::read_to_string(&out).unwrap(),
            stderr: std::fs::read_to_string(&err).unwrap(),
            elapsed: t0.elapsed(),
        },
        max_rss_kib,
    })
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_qcow2-bitmap"))
}

/// A one-line refusal naming `needle` and an offset, within the limits.
fn judge_refusal(what: &str, r: &Run, needle: &str) -> Option<String> {
    let line = r.stderr.trim_end();
    let ok = r.status.code() == Some(1)
        && r.stderr.lines().count() == 1
        && line.starts_with("qcow2-bitmap: ")
        && line.contains(needle);
    (!ok).then(|| {
        format!(
            "{what}: want one refusal line naming {needle:?}, got {:?}: {:?}",
            r.status, r.stderr
        )
    })
}

const CS: u64 = 1 << 16;

/// A minimal qcow2 v3 image, 64 KiB clusters, as `qemu-img create` lays it
/// out (header, refcount table, refcount block, L1 at 0x30000), with an
/// optional backing file (format qcow2) and an optional data cluster of
/// `fill` bytes at guest 0 (L2 table at 0x40000, data at 0x50000).
fn minimal_qcow2(size: u64, backing: Option<&str>, fill: Option<u8>) -> Vec<u8> {
    let l1_size = size.div_ceil(CS * (CS / 8)).max(1);
    let mut b = vec![0u8; 0x30000 + 8 * l1_size as usize];
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    b[0..4].copy_from_slice(b"QFI\xfb");
    put32(&mut b, 4, 3);
    put32(&mut b, 20, 16);
    put64(&mut b, 24, size);
    put32(&mut b, 36, l1_size as u32);
    put64(&mut b, 40, 0x30000);
    put64(&mut b, 48, 0x10000);
    put32(&mut b, 56, 1);
    put32(&mut b, 96, 4);
    put32(&mut b, 100, 112);
    let mut at = 112;
    if let Some(name) = backing {
        // Backing-format extension "qcow2", the end marker, then the name.
        put32(&mut b, at, ext_type::BACKING_FORMAT);
        put32(&mut b, at + 4, 5);
        b[at + 8..at + 13].copy_from_slice(b"qcow2");
        at += 16 + 8;
        put64(&mut b, 8, at as u64);
        put32(&mut b, 16, name.len() as u32);
        b[at..at + name.len()].copy_from_slice(name.as_bytes());
    }
    put64(&mut b, 0x10000, 0x20000);
    let mut clusters = 4;
    if let Some(fill) = fill {
        put64(&mut b, 0x30000, (1 << 63) | 0x40000);
        b.resize(0x60000, 0);
        put64(&mut b, 0x40000, (1 << 63) | 0x50000);
        b[0x50000..0x60000].fill(fill);
        clusters = 6;
    }
    for c in 0..clusters {
        b[0x20000 + 2 * c] = 0;
        b[0x20000 + 2 * c + 1] = 1;
    }
    b
}

/// `map --json` of an image whose only data is guest cluster 0 at host
/// 0x50000 of the member at `depth`, and whose bottom is at `bottom`.
fn expected_map(size: u64, depth: usize, bottom: usize) -> String {
    format!(
        "[{{ \"start\": 0, \"length\": 65536, \"depth\": {depth}, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 327680}},\n\
         {{ \"start\": 65536, \"length\": {}, \"depth\": {bottom}, \"present\": false, \"zero\": true, \"data\": false, \"compressed\": false}}]\n",
        size - 65536
    )
}

/// Hostile claims against the guest-data path: an L1 table of the maximum
/// size (inside and past the file), L1 entries pointing at L2 tables past
/// EOF (first and last), every L1 entry sharing one L2 table (zeros, or
/// data past EOF). `map --json` and `map` finish within the limits, exit 0
/// with the exact map or refuse with one line naming the entry.
#[test]
fn guest_map_on_hostile_claims_stays_bounded() {
    if which("prlimit").is_none() {
        eprintln!("SKIPPED: guest_map_on_hostile_claims_stays_bounded: prlimit not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    const MAX_L1: u64 = 4 << 20; // QEMU's entry limit (32 MiB)
    let with = |size: u64, l1_size: u64, fill: &dyn Fn(&mut Vec<u8>)| {
        let mut b = minimal_qcow2(1 << 20, None, Some(0x5a));
        b[24..32].copy_from_slice(&size.to_be_bytes());
        b[36..40].copy_from_slice(&(l1_size as u32).to_be_bytes());
        // The L1 table moves to the end of the file so that it overlaps nothing.
        let at = b.len() as u64;
        b[40..48].copy_from_slice(&at.to_be_bytes());
        b.resize((at + 8 * l1_size) as usize, 0);
        fill(&mut b);
        (b, at)
    };
    let entry = |b: &mut Vec<u8>, at: u64, v: u64| {
        b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes())
    };
    let span = CS * (CS / 8);
    let far = 1u64 << 45;
    let mut failures = Vec::new();
    // (name, bytes, Ok(expected stdout) or Err(needle))
    let mut cases: Vec<(&str, Vec<u8>, Result<String, String>)> = Vec::new();
    {
        let (b, _) = with(MAX_L1 * span, MAX_L1, &|_| {});
        let size = MAX_L1 * span;
        cases.push((
            "2 PiB, a 32 MiB L1 table of zeros",
            b,
            Ok(format!(
                "[{{ \"start\": 0, \"length\": {size}, \"depth\": 0, \"present\": false, \"zero\": true, \"data\": false, \"compressed\": false}}]\n"
            )),
        ));
    }
    {
        let mut b = minimal_qcow2(1 << 20, None, None);
        b[24..32].copy_from_slice(&(MAX_L1 * span).to_be_bytes());
        b[36..40].copy_from_slice(&(MAX_L1 as u32).to_be_bytes());
        cases.push((
            "2 PiB, a 32 MiB L1 table past EOF",
            b,
            Err("at offset 40 ".to_string()),
        ));
    }
    {
        let mut b = minimal_qcow2(1 << 20, None, None);
        b[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        cases.push(("l1_size u32::MAX", b, Err("32 MiB L1 limit".into())));
    }
    let tib16 = 16u64 << 40;
    let n16 = tib16 / span;
    {
        let (b, at) = with(tib16, n16, &|_| {});
        let mut b = b;
        for i in 0..n16 {
            entry(&mut b, at + 8 * i, (1 << 63) | (far + i * CS));
        }
        cases.push((
            "16 TiB, every L2 table past EOF",
            b,
            Err(format!("L1 table entry 0 at offset {at} ")),
        ));
    }
    {
        let (mut b, at) = with(tib16, n16, &|_| {});
        let last = n16 - 1;
        entry(&mut b, at + 8 * last, (1 << 63) | far);
        cases.push((
            "16 TiB, the last L2 table past EOF",
            b,
            Err(format!(
                "L1 table entry {last} at offset {} ",
                at + 8 * last
            )),
        ));
    }
    {
        // Every L1 entry shares the one real L2 table (0x40000), which maps
        // guest cluster 0 of each 512 MiB span to the data cluster.
        let (mut b, at) = with(tib16, n16, &|_| {});
        for i in 0..n16 {
            entry(&mut b, at + 8 * i, (1 << 63) | 0x40000);
        }
        let mut want = String::from("[");
        for i in 0..n16 {
            if i > 0 {
                want.push_str(",\n");
            }
            want.push_str(&format!(
                "{{ \"start\": {}, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 327680}},\n\
                 {{ \"start\": {}, \"length\": {}, \"depth\": 0, \"present\": false, \"zero\": true, \"data\": false, \"compressed\": false}}",
                i * span,
                i * span + CS,
                span - CS
            ));
        }
        want.push_str("]\n");
        cases.push((
            "16 TiB, every L1 entry sharing one L2 table",
            b.clone(),
            Ok(want),
        ));
        // The shared L2 table's data entry now points past EOF.
        entry(&mut b, 0x40000, (1 << 63) | far);
        cases.push((
            "16 TiB, a shared L2 table with data past EOF",
            b,
            Err(format!("(L1 index 0, L2 index 0) at offset {} ", 0x40000)),
        ));
    }
    for (name, bytes, want) in cases {
        let img = dir.path().join("guest-hostile.qcow2");
        std::fs::write(&img, &bytes).unwrap();
        for args in [vec!["map", "--json"], vec!["map"]] {
            let mut args = args;
            args.push(img.to_str().unwrap());
            let what = format!("{name}: {}", args.join(" "));
            let r = match run_limited(dir.path(), AS_LIMIT, GUEST_TIME_LIMIT, bin(), &args, &[]) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{what}: {e}"));
                    continue;
                }
            };
            eprintln!("{what}: {:?}, {} KiB peak", r.run.elapsed, r.max_rss_kib);
            if r.max_rss_kib > GUEST_RSS_LIMIT_KIB {
                failures.push(format!("{what}: peak RSS {} KiB", r.max_rss_kib));
            }
            match &want {
                Err(needle) => failures.extend(judge_refusal(&what, &r.run, needle)),
                Ok(json) if args[1] == "--json" => {
                    if r.run.status.code() != Some(0) || r.run.stdout != *json {
                        failures.push(format!(
                            "{what}: exit {:?}, stderr {:?}, stdout differs (first 300 bytes {:?})",
                            r.run.status,
                            r.run.stderr,
                            &r.run.stdout[..r.run.stdout.len().min(300)]
                        ));
                    }
                }
                Ok(_) => {
                    if r.run.status.code() != Some(0) {
                        failures.push(format!("{what}: {:?} {:?}", r.run.status, r.run.stderr));
                    }
                }
            }
        }
        assert_eq!(
            std::fs::read(&img).unwrap(),
            bytes,
            "{name}: the image changed"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A 16 TiB image with 64 scattered data clusters (QEMU-made): `map --json`
/// equals `qemu-img map`, and `map --json` / `map` stay under 128 MiB of
/// peak RSS; the library reads the scattered clusters back.
#[test]
fn guest_map_of_a_16_tib_image_stays_small() {
    if which("prlimit").is_none()
        || !qemu_available(
            "guest_map_of_a_16_tib_image_stays_small",
            &["qemu-img", "qemu-io"],
        )
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("16t.qcow2");
    let p = img.to_str().unwrap();
    assert!(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", p, "16T"])
            .status()
            .unwrap()
            .success()
    );
    let tib16 = 16u64 << 40;
    let offsets: Vec<u64> = (0..64u64).map(|i| i * (tib16 / 64) + i * 7 * CS).collect();
    let mut qio = Command::new("qemu-io");
    for (i, off) in offsets.iter().enumerate() {
        qio.arg("-c").arg(format!("write -P {} {off} 64k", i + 1));
    }
    let o = qio.arg(p).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let q = Command::new("qemu-img")
        .args(["map", "--output=json", p])
        .output()
        .unwrap();
    assert!(q.status.success());
    let before = std::fs::read(&img).unwrap();
    for args in [vec!["map", "--json", p], vec!["map", p]] {
        let r = run_limited(dir.path(), AS_LIMIT, GUEST_TIME_LIMIT, bin(), &args, &[])
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        eprintln!(
            "16 TiB {args:?}: {:?}, {} KiB peak",
            r.run.elapsed, r.max_rss_kib
        );
        assert_eq!(r.run.status.code(), Some(0), "{}", r.run.stderr);
        assert!(
            r.max_rss_kib <= GUEST_RSS_LIMIT_KIB,
            "peak RSS {} KiB",
            r.max_rss_kib
        );
        if args[1] == "--json" {
            assert_eq!(
                r.run.stdout,
                String::from_utf8_lossy(&q.stdout),
                "map --json vs qemu-img map"
            );
        } else {
            assert_eq!(r.run.stdout.lines().count(), 65, "{}", r.run.stdout);
        }
    }
    let chain = qcow2_bitmap::guest::Chain::open(&img, qcow2_bitmap::lock::Access::Read).unwrap();
    let mut reader = chain.reader();
    let mut buf = vec![0u8; 2 * CS as usize];
    for (i, off) in offsets.iter().enumerate() {
        reader.read_at(*off, &mut buf).unwrap();
        assert!(
            buf[..CS as usize].iter().all(|&b| b == i as u8 + 1),
            "cluster {i} at {off}"
        );
        assert!(
            buf[CS as usize..].iter().all(|&b| b == 0),
            "after cluster {i}"
        );
    }
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

/// Peak RSS of one command on the 1000-layer chain (about 6 MiB measured:
/// headers and L1 entries are read with pread, not through the mapping).
const DEEP_CHAIN_RSS_LIMIT_KIB: u64 = 32 << 10;

/// Layers of the deep chain (the base is layer 0, the top layer LAYERS - 1).
const LAYERS: usize = 1000;

/// `L0.qcow2` (data 0x5a in guest cluster 0) <- `L1.qcow2` <- ... <-
/// `L999.qcow2`, hand-made (QEMU takes ~10 ms per create); returns the top.
fn deep_chain(dir: &Path) -> std::path::PathBuf {
    std::fs::write(
        dir.join("L0.qcow2"),
        minimal_qcow2(1 << 20, None, Some(0x5a)),
    )
    .unwrap();
    for i in 1..LAYERS {
        let name = format!("L{}.qcow2", i - 1);
        std::fs::write(
            dir.join(format!("L{i}.qcow2")),
            minimal_qcow2(1 << 20, Some(&name), None),
        )
        .unwrap();
    }
    dir.join(format!("L{}.qcow2", LAYERS - 1))
}

/// A chain of 1000 layers: `map --json` of the top (the data at depth 999)
/// and a library read falling through to the base, each under 1 GiB of
/// address space and 20 s (QEMU has no depth limit; neither may we). The
/// hand-made layers pass `qemu-img check` and map like QEMU maps them.
#[test]
fn guest_chain_of_1000_layers_maps_and_reads_within_limits() {
    if which("prlimit").is_none() {
        eprintln!(
            "SKIPPED: guest_chain_of_1000_layers_maps_and_reads_within_limits: prlimit not found"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let top = deep_chain(dir.path());
    eprintln!("1000-layer chain written in {:?}", t0.elapsed());
    if which("qemu-img").is_some() {
        // The hand-made layout is what QEMU accepts and reads.
        for name in ["L0.qcow2", "L1.qcow2"] {
            let (code, report) = qemu_check(&dir.path().join(name));
            assert_eq!(code, 0, "qemu-img check {name}: {report}");
        }
        let l2 = dir.path().join("L2.qcow2");
        let q = Command::new("qemu-img")
            .args(["map", "--output=json"])
            .arg(&l2)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&q.stdout),
            expected_map(1 << 20, 2, 2)
        );
        let ours = run(&["map", "--json", l2.to_str().unwrap()]);
        assert_eq!(stdout(&ours), expected_map(1 << 20, 2, 2));
    }
    let p = top.to_str().unwrap();
    let r = run_limited(
        dir.path(),
        GUEST_AS_LIMIT,
        GUEST_TIME_LIMIT,
        bin(),
        &["map", "--json", p],
        &[],
    )
    .unwrap_or_else(|e| panic!("map --json of the top: {e}"));
    eprintln!(
        "1000 layers: map --json {:?}, {} KiB peak",
        r.run.elapsed, r.max_rss_kib
    );
    assert_eq!(r.run.status.code(), Some(0), "{}", r.run.stderr);
    assert_eq!(r.run.stdout, expected_map(1 << 20, LAYERS - 1, LAYERS - 1));
    // Measured ~190 MiB: every layer's mapped header and L1 pages (kernel
    // fault-around, ~190 KiB of clean file pages per layer). The bound
    // catches a per-layer cost that grows with the cluster or file size.
    assert!(
        r.max_rss_kib <= DEEP_CHAIN_RSS_LIMIT_KIB,
        "peak RSS {} KiB",
        r.max_rss_kib
    );
    // The library read, in a child (this test binary, one ignored test) under the same limits.
    let me = std::env::current_exe().unwrap();
    let r = run_limited(
        dir.path(),
        GUEST_AS_LIMIT,
        GUEST_TIME_LIMIT,
        &me,
        &[
            "--exact",
            "bounds::guest_chain_read_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ],
        &[("QCOW2_BITMAP_CHAIN_TOP", &top)],
    )
    .unwrap_or_else(|e| panic!("library read of the top: {e}"));
    eprintln!(
        "1000 layers: library read {:?}, {} KiB peak",
        r.run.elapsed, r.max_rss_kib
    );
    assert_eq!(
        r.run.status.code(),
        Some(0),
        "{}{}",
        r.run.stdout,
        r.run.stderr
    );
    assert!(
        r.max_rss_kib <= DEEP_CHAIN_RSS_LIMIT_KIB,
        "peak RSS {} KiB",
        r.max_rss_kib
    );
    assert!(
        r.run.stdout.contains("1 passed"),
        "the child ran no test: {}",
        r.run.stdout
    );
}

/// Helper of `guest_chain_of_1000_layers_maps_and_reads_within_limits`,
/// which runs it under prlimit: opens the chain named by
/// `QCOW2_BITMAP_CHAIN_TOP`, checks its depth, and reads a range that falls
/// through every layer to the base.
#[test]
#[ignore = "run by guest_chain_of_1000_layers_maps_and_reads_within_limits"]
fn guest_chain_read_child() {
    let top = std::env::var_os("QCOW2_BITMAP_CHAIN_TOP").expect("QCOW2_BITMAP_CHAIN_TOP");
    let chain = qcow2_bitmap::guest::Chain::open(Path::new(&top), qcow2_bitmap::lock::Access::Read)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(chain.members().len(), LAYERS);
    let mut reader = chain.reader();
    let st = reader.status(0, 1 << 20).unwrap();
    assert_eq!((st.depth, st.len), (LAYERS - 1, CS));
    let mut buf = vec![0u8; 3 * CS as usize];
    reader.read_at(CS / 2, &mut buf).unwrap();
    let (data, zeros) = buf.split_at(CS as usize / 2);
    assert!(data.iter().all(|&b| b == 0x5a), "base data");
    assert!(zeros.iter().all(|&b| b == 0), "unallocated everywhere");
}

/// A self-loop and a two-image loop are refused in time with one line
/// (QEMU's map and qemu-io never return on them).
#[test]
fn guest_backing_loops_are_refused_in_time() {
    if which("prlimit").is_none() {
        eprintln!("SKIPPED: guest_backing_loops_are_refused_in_time: prlimit not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("self.qcow2"),
        minimal_qcow2(1 << 20, Some("self.qcow2"), None),
    )
    .unwrap();
    std::fs::write(
        d.join("la.qcow2"),
        minimal_qcow2(1 << 20, Some("lb.qcow2"), None),
    )
    .unwrap();
    std::fs::write(
        d.join("lb.qcow2"),
        minimal_qcow2(1 << 20, Some("la.qcow2"), Some(1)),
    )
    .unwrap();
    // The control: lb naming a real base maps.
    std::fs::write(d.join("base.qcow2"), minimal_qcow2(1 << 20, None, None)).unwrap();
    std::fs::write(
        d.join("ok.qcow2"),
        minimal_qcow2(1 << 20, Some("base.qcow2"), Some(1)),
    )
    .unwrap();
    let ok = run(&["map", "--json", d.join("ok.qcow2").to_str().unwrap()]);
    assert_eq!(stdout(&ok), expected_map(1 << 20, 0, 1), "{}", stderr(&ok));
    for name in ["self.qcow2", "la.qcow2", "lb.qcow2"] {
        let img = d.join(name);
        let r = run_limited(
            d,
            AS_LIMIT,
            TIME_LIMIT,
            bin(),
            &["map", "--json", img.to_str().unwrap()],
            &[],
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Some(f) = judge_refusal(name, &r.run, "creates a loop") {
            panic!("{f}");
        }
    }
}
