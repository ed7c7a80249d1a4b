//! Live QEMU oracle tests: images made now with `qemu-img` and `qemu-io`,
//! read by the library and the CLI, and compared with what QEMU itself says.
//!
//! - Oracles: dirty maps from `nbdinfo --map=qemu:dirty-bitmap:NAME` over a
//!   read-only `qemu-nbd -B NAME`, hashes from QMP
//!   `x-debug-block-dirty-bitmap-sha256` on a read-only `qemu-storage-daemon`,
//!   names, granularities and flags from `qemu-img info --output=json`.
//! - `live_random_images_match_qemu`: seeded random cluster sizes, virtual
//!   sizes, granularities (512 B .. 2 GiB) and qemu-io sessions (data, zero,
//!   unmap, compressed and unaligned writes, discards, the last granule),
//!   with bitmaps disabled and re-enabled in between. Set
//!   `QCOW2_BITMAP_SEED` to replay a seed printed by a failing run.
//! - `live_16tib_image_matches_qemu`: a sparse 16 TiB image, 512-entry tables.
//! - `live_in_use_bitmaps_are_reported_like_qemu`: bitmaps left in use by a
//!   crashed qemu-io are refused by us and by `qemu-nbd -B`.
//!
//! Every test also checks that our reads leave the image byte-identical.

use crate::util::*;
use qcow2_bitmap::lock::Access;
use qcow2_bitmap::read::{BitmapState, hex, open_path};
use serde_json::{Value, json};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOOLS: &[&str] = &[
    "qemu-img",
    "qemu-io",
    "qemu-nbd",
    "qemu-storage-daemon",
    "nbdinfo",
];
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// `qemu-img bitmap` with the given action flags.
fn qemu_bitmap(img: &Path, name: &str, actions: &[&str]) {
    let mut args = vec!["bitmap"];
    args.extend_from_slice(actions);
    args.extend_from_slice(&["-f", "qcow2", s(img), name]);
    tool("qemu-img", &args);
}

/// One `qemu-io` read-write session running `cmds` in order.
fn qemu_io(img: &Path, cmds: &[String]) {
    // cache=unsafe skips the flushes that make 512 B-cluster metadata updates crawl;
    // the close still writes everything, bitmaps included.
    let mut args = vec!["-f", "qcow2", "-t", "unsafe"];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(s(img));
    tool("qemu-io", &args);
}

/// QEMU's dirty runs of `name`, merged.
fn qemu_map(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let ctx = format!("--map=qemu:dirty-bitmap:{name}");
    let args = [
        "--json",
        &ctx,
        "--",
        "[",
        "qemu-nbd",
        "-r",
        "-f",
        "qcow2",
        "-B",
        name,
        s(img),
        "]",
    ];
    nbd_dirty(&serde_json::from_str(&tool("nbdinfo", &args)).expect("nbdinfo JSON"))
}

/// `(name, granularity, flags)` of every bitmap `qemu-img info` lists.
fn qemu_info(img: &Path) -> Vec<(String, u64, Vec<String>)> {
    let info: Value = serde_json::from_str(&tool(
        "qemu-img",
        &["info", "--output=json", "-f", "qcow2", s(img)],
    ))
    .unwrap();
    let list = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    list.iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().into(),
                b["granularity"].as_u64().unwrap(),
                strings(&b["flags"]),
            )
        })
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|f| f.as_str().expect("string").to_string())
        .collect()
}

/// A child process killed and reaped when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A QMP session with a read-only `qemu-storage-daemon` serving the image as node `q0`.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    _daemon: Daemon,
}

impl Qmp {
    fn start(img: &Path, dir: &Path) -> Qmp {
        let sock = dir.join("qmp.sock");
        let log = dir.join("qsd.log");
        let file = format!("driver=file,node-name=f0,filename={},read-only=on", s(img));
        let chardev = format!("socket,id=m0,path={},server=on,wait=off", s(&sock));
        let child = Command::new("qemu-storage-daemon")
            .args([
                "--blockdev",
                &file,
                "--blockdev",
                "driver=qcow2,node-name=q0,file=f0,read-only=on",
            ])
            .args(["--chardev", &chardev, "--monitor", "chardev=m0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut daemon = Daemon(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        let stream = loop {
            if let Ok(st) = UnixStream::connect(&sock) {
                break st;
            }
            let exited = daemon.0.try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "qemu-storage-daemon not serving ({exited:?}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            _daemon: daemon,
        };
        let greeting = qmp.read_message();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    fn read_message(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read from QMP");
        assert!(n > 0, "QMP closed the connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Runs one command; returns its `return` value, skipping events.
    fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let msg = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{msg}").expect("write to QMP");
        loop {
            let mut reply = self.read_message();
            if reply.get("event").is_some() {
                continue;
            }
            assert!(reply.get("error").is_none(), "QMP {msg}: {reply}");
            return reply["return"].take();
        }
    }

    fn sha256(&mut self, name: &str) -> String {
        let r = self.execute(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "q0", "name": name}),
        );
        r["sha256"].as_str().expect("sha256").to_string()
    }
}

/// What we read about one bitmap, from the library and from the CLI.
struct Ours {
    name: String,
    granularity: u64,
    flags: Vec<String>,
    extents: Vec<(u64, u64)>,
    sha256: String,
    dirty_bytes: u64,
}

fn lib_flags(in_use: bool, auto: bool) -> Vec<String> {
    [(in_use, "in-use"), (auto, "auto")]
        .iter()
        .filter(|f| f.0)
        .map(|f| f.1.to_string())
        .collect()
}

/// Reads every bitmap with the library, then checks the CLI says the same.
fn read_ours(img: &Path) -> Vec<Ours> {
    let image = open_path(img, Access::Read).unwrap_or_else(|e| panic!("{}: {e}", img.display()));
    let mut ours = Vec::new();
    for b in image.bitmaps() {
        let status = image.status(b);
        assert_eq!(
            status.state,
            BitmapState::Ok,
            "{}: {:?}",
            b.name(),
            status.problem
        );
        let extents: Vec<(u64, u64)> = image
            .extents(b, None, false)
            .unwrap()
            .map(|e| e.map(|e| (e.offset, e.length)).unwrap())
            .collect();
        assert_eq!(
            merge(extents.clone()),
            extents,
            "{}: extents are not maximal",
            b.name()
        );
        let sha256 = hex(&image.sha256(b, false).unwrap());
        let (name, granularity) = (b.name(), b.granularity());
        let flags = lib_flags(b.entry.in_use(), b.entry.auto());
        ours.push(Ours {
            name,
            granularity,
            flags,
            extents,
            sha256,
            dirty_bytes: status.dirty_bytes.unwrap(),
        });
    }
    drop(image);
    let info = cli_info(img);
    let listed = info["bitmaps"].as_array().unwrap();
    assert_eq!(
        listed.len(),
        ours.len(),
        "CLI info lists other bitmaps: {info}"
    );
    for (o, j) in ours.iter().zip(listed) {
        assert_eq!(j["name"], o.name.as_str());
        assert_eq!(j["granularity"].as_u64(), Some(o.granularity), "{}", o.name);
        assert_eq!(strings(&j["flags"]), o.flags, "{}", o.name);
        assert_eq!(j["state"], "ok", "{}", o.name);
        assert_eq!(j["dirty-bytes"].as_u64(), Some(o.dirty_bytes), "{}", o.name);
        assert_eq!(
            cli_extents(img, &o.name),
            o.extents,
            "{}: CLI extents",
            o.name
        );
        let hash = run(&["hash", s(img), &o.name]);
        assert!(hash.status.success(), "hash {}: {}", o.name, stderr(&hash));
        assert_eq!(stdout(&hash).trim_end(), o.sha256, "{}: CLI hash", o.name);
    }
    ours
}

fn cli_info(img: &Path) -> Value {
    let out = run(&["info", "--json", s(img)]);
    assert!(out.status.success(), "info: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("info JSON")
}

fn cli_extents(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let out = run(&["extents", "--json", s(img), name]);
    assert!(out.status.success(), "extents {name}: {}", stderr(&out));
    let list: Value = serde_json::from_str(&stdout(&out)).expect("extents JSON");
    let runs = list.as_array().unwrap().iter().map(|e| {
        assert_eq!(e["dirty"], true, "{e}");
        (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap())
    });
    merge(runs)
}

/// Compares everything we read about `img` with QEMU; returns what was compared.
fn compare_with_qemu(img: &Path, dir: &Path, label: &str) -> Vec<Ours> {
    let before = sha256_file(img);
    let ours = read_ours(img);
    assert_eq!(
        sha256_file(img),
        before,
        "{label}: reading changed the image"
    );
    let listed: Vec<(String, u64, Vec<String>)> = ours
        .iter()
        .map(|o| (o.name.clone(), o.granularity, o.flags.clone()))
        .collect();
    assert_eq!(
        listed,
        qemu_info(img),
        "{label}: bitmap list vs qemu-img info"
    );
    for o in &ours {
        let map = qemu_map(img, &o.name);
        assert_eq!(
            o.extents, map,
            "{label}: {} (granularity {}) extents vs nbdinfo",
            o.name, o.granularity
        );
        let total: u64 = map.iter().map(|r| r.1).sum();
        assert_eq!(
            o.dirty_bytes, total,
            "{label}: {} dirty bytes vs nbdinfo",
            o.name
        );
    }
    let mut qmp = Qmp::start(img, dir);
    for o in &ours {
        assert_eq!(
            o.sha256,
            qmp.sha256(&o.name),
            "{label}: {} sha256 vs QMP",
            o.name
        );
    }
    ours
}

/// One random qemu-io command on a disk of `size` bytes with `cs`-byte clusters.
fn random_op(rng: &mut Rng, size: u64, cs: u64) -> String {
    let sector = |x: u64| x & !511;
    let off = sector(rng.range(0, size - 512));
    let room = size - off;
    let zero_cap = if cs == 512 { 16 * MIB } else { 512 * MIB };
    match rng.range(0, 9) {
        0 | 1 => format!(
            "write -P 0x{:02x} {off} {}",
            rng.range(1, 255),
            512 * rng.range(1, (room / 512).min(256))
        ),
        2 | 3 => {
            let off = rng.range(0, size - 1);
            format!("write {off} {}", rng.range(1, (size - off).min(5000)))
        }
        4 => format!(
            "write -z {off} {}",
            512 * rng.range(1, room.min(zero_cap) / 512)
        ),
        5 => format!(
            "write -z -u {off} {}",
            512 * rng.range(1, room.min(zero_cap) / 512)
        ),
        6 | 7 => format!(
            "discard {off} {}",
            512 * rng.range(1, room.min(64 * MIB) / 512)
        ),
        8 if size >= cs && cs <= 64 * KIB => {
            format!("write -c {} {cs}", rng.range(0, size / cs - 1) * cs)
        }
        _ => format!("read {off} {}", 512 * rng.range(1, (room / 512).min(64))),
    }
}

/// Granularity for `--add`, or `None` for QEMU's default; skewed towards small ones.
fn random_granularity(rng: &mut Rng) -> Option<u64> {
    match rng.range(0, 9) {
        0 => None,
        1..=6 => Some(1 << rng.range(9, 20)),
        _ => Some(1 << rng.range(21, 31)),
    }
}

/// Builds and compares one random image; returns `(bitmaps, extents, bitmaps dirty up to the end)`.
fn random_case(seed: u64, dir: &Path) -> (usize, usize, usize) {
    let mut rng = Rng(seed);
    let started = Instant::now();
    let cs = rng.pick(&[512, 4 * KIB, 64 * KIB, 2 * MIB]);
    let max = if cs == 512 { 512 * MIB } else { 4 * GIB };
    let mut size = rng.range(4 * MIB, max) & !511;
    if rng.chance(25) {
        size &= !(MIB - 1);
    }
    let img = dir.join(format!("r{seed:016x}.qcow2"));
    let label = format!("seed {seed:#x} (cluster {cs}, size {size})");
    eprintln!(
        "live_random_images_match_qemu: QCOW2_BITMAP_SEED={seed:#x}: cluster {cs}, size {size}"
    );
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cs}"),
            s(&img),
            &size.to_string(),
        ],
    );
    let names: Vec<String> = (0..rng.range(1, 4)).map(|i| format!("b{i}")).collect();
    for name in &names {
        let g = random_granularity(&mut rng).map(|g| g.to_string());
        let mut actions = vec!["--add"];
        if let Some(g) = &g {
            actions.extend_from_slice(&["-g", g]);
        }
        if rng.chance(20) {
            actions.push("--disable");
        }
        eprintln!("  qemu-img bitmap {} {name}", actions.join(" "));
        qemu_bitmap(&img, name, &actions);
    }
    let sessions = rng.range(1, 3);
    for session in 0..sessions {
        let mut cmds: Vec<String> = (0..rng.range(3, 10))
            .map(|_| random_op(&mut rng, size, cs))
            .collect();
        if session == sessions - 1 || rng.chance(30) {
            let k = rng.range(1, size.min(4096));
            cmds.insert(
                rng.range(0, cmds.len() as u64) as usize,
                format!("write -P 0x11 {} {k}", size - k),
            );
        }
        eprintln!(
            "  qemu-io {}",
            cmds.iter()
                .map(|c| format!("-c '{c}'"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        qemu_io(&img, &cmds);
        for name in &names {
            if rng.chance(25) {
                let action = rng.pick(&["--disable", "--enable"]);
                eprintln!("  qemu-img bitmap {action} {name}");
                qemu_bitmap(&img, name, &[action]);
            }
        }
    }
    let made = started.elapsed();
    let ours = compare_with_qemu(&img, dir, &label);
    eprintln!(
        "  made in {made:?}, compared in {:?}",
        started.elapsed() - made
    );
    let extents = ours.iter().map(|o| o.extents.len()).sum();
    let tail = |o: &Ours| o.extents.last().is_some_and(|e| e.0 + e.1 == size);
    (ours.len(), extents, ours.iter().filter(|o| tail(o)).count())
}

#[test]
fn live_random_images_match_qemu() {
    if !qemu_available("live_random_images_match_qemu", TOOLS) {
        return;
    }
    let base = match std::env::var("QCOW2_BITMAP_SEED") {
        Ok(v) => {
            let v = v.trim();
            let parsed = v
                .strip_prefix("0x")
                .map_or_else(|| v.parse(), |h| u64::from_str_radix(h, 16));
            parsed.unwrap_or_else(|e| panic!("QCOW2_BITMAP_SEED={v}: {e}"))
        }
        Err(_) => 0x5eed_0000_0000_0000,
    };
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    // Case i uses seed base + i: QCOW2_BITMAP_SEED set to a printed seed replays that case first.
    let cases: u64 =
        std::env::var("QCOW2_BITMAP_CASES").map_or(8, |v| v.parse().expect("QCOW2_BITMAP_CASES"));
    let (mut bitmaps, mut extents, mut tails) = (0, 0, 0);
    for i in 0..cases {
        let (b, e, t) = random_case(base.wrapping_add(i), dir.path());
        (bitmaps, extents, tails) = (bitmaps + b, extents + e, tails + t);
    }
    eprintln!(
        "live_random_images_match_qemu: {bitmaps} bitmaps ({extents} dirty extents, {tails} dirty \
         up to the end) in {cases} images matched QEMU in {:?}",
        started.elapsed()
    );
    assert!(
        extents > 0 && tails > 0,
        "the random sessions dirtied too little to compare"
    );
}

#[test]
fn live_16tib_image_matches_qemu() {
    if !qemu_available("live_16tib_image_matches_qemu", TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("16t.qcow2");
    let size = 16 * TIB;
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=64k",
            s(&img),
            "16T",
        ],
    );
    qemu_bitmap(&img, "g64k", &["--add", "-g", "64K"]);
    qemu_bitmap(&img, "g1m", &["--add", "-g", "1M"]);
    qemu_bitmap(&img, "g2g", &["--add", "-g", "2G"]);
    let mut rng = Rng(0x0016_7eb0);
    let mut cmds: Vec<String> = (0..40)
        .map(|i| {
            let off = (i * (size / 40) + rng.range(0, size / 40 - 8 * MIB)) & !(64 * KIB - 1);
            format!("write -z -n {off} {}", 64 * KIB * rng.range(1, 32))
        })
        .collect();
    for (off, len) in [
        (0, 64 * KIB),
        (8 * TIB, 2 * GIB),
        (size - 64 * KIB, 64 * KIB),
        (size - 3 * MIB, MIB),
    ] {
        cmds.push(format!("write -z -n {off} {len}"));
    }
    cmds.push(format!("write -P 0x5a {} 4096", 5 * TIB + 12345 * 512));
    qemu_io(&img, &cmds);
    // A bitmap that starts recording later, and one that stops.
    qemu_bitmap(&img, "late", &["--add", "-g", "128K"]);
    qemu_bitmap(&img, "g1m", &["--disable"]);
    let cmds = [
        format!("write -z -n {} {}", 3 * TIB, 4 * GIB),
        "write 1000 10".to_string(),
        format!("write {} 1", size - 1),
    ];
    qemu_io(&img, &cmds);
    let info = cli_info(&img);
    let tables: Vec<u64> = info["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["table-size"].as_u64().unwrap())
        .collect();
    // nbits = 16 TiB / granularity, one table entry per 64 KiB (2^19 bits) of data.
    assert_eq!(tables, [512, 32, 1, 256]);
    assert!(
        std::fs::metadata(&img).unwrap().len() < 64 * MIB,
        "the image should stay sparse"
    );
    let ours = compare_with_qemu(&img, dir.path(), "16 TiB image");
    let runs: Vec<usize> = ours.iter().map(|o| o.extents.len()).collect();
    eprintln!(
        "live_16tib_image_matches_qemu: {} bitmaps with {runs:?} dirty extents matched QEMU",
        ours.len()
    );
    assert!(
        runs[0] >= 40,
        "g64k should have dirty spots all over the disk: {runs:?}"
    );
    assert!(
        ours.iter()
            .all(|o| o.extents.last().is_some_and(|e| e.0 + e.1 == size))
    );
}

#[test]
fn live_in_use_bitmaps_are_reported_like_qemu() {
    if !qemu_available("live_in_use_bitmaps_are_reported_like_qemu", TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crashed.qcow2");
    tool("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    qemu_bitmap(&img, "on", &["--add", "-g", "4K"]);
    qemu_bitmap(&img, "off", &["--add", "--disable"]);
    qemu_io(&img, &["write 0 64k".to_string()]);
    // abort() on purpose: the exit status is a signal, so run it by hand.
    let out = Command::new("qemu-io")
        .current_dir(dir.path())
        .args(["-f", "qcow2", "-c", "write 0 64k", "-c", "abort", s(&img)])
        .output()
        .expect("run qemu-io");
    assert!(!out.status.success(), "qemu-io abort exited 0");

    let before = sha256_file(&img);
    let image = open_path(&img, Access::Read).unwrap();
    let mut ours = Vec::new();
    for b in image.bitmaps() {
        assert_eq!(b.state, BitmapState::InUse, "{}", b.name());
        assert_eq!(image.status(b).state, BitmapState::InUse, "{}", b.name());
        assert!(
            image.extents(b, None, false).is_err(),
            "{}: extents of an in-use bitmap",
            b.name()
        );
        assert!(
            image.sha256(b, false).is_err(),
            "{}: sha256 of an in-use bitmap",
            b.name()
        );
        ours.push((
            b.name(),
            b.granularity(),
            lib_flags(b.entry.in_use(), b.entry.auto()),
        ));
    }
    drop(image);
    assert_eq!(ours, qemu_info(&img), "bitmap list vs qemu-img info");
    assert_eq!(
        ours.iter().map(|b| b.2.clone()).collect::<Vec<_>>(),
        [vec!["in-use", "auto"], vec!["in-use"]]
    );

    let info = cli_info(&img);
    for (b, (name, _, flags)) in info["bitmaps"].as_array().unwrap().iter().zip(&ours) {
        assert_eq!(
            (&b["name"], &b["state"]),
            (&json!(name), &json!("in-use")),
            "{b}"
        );
        assert_eq!(&strings(&b["flags"]), flags, "{b}");
        for cmd in [
            &["extents", "--json", s(&img), name][..],
            &["hash", s(&img), name],
        ] {
            let out = run(cmd);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(1), "{cmd:?}: {err}");
            assert!(
                err.starts_with("qcow2-bitmap: ") && err.lines().count() == 1,
                "{cmd:?}: {err:?}"
            );
            assert!(stdout(&out).is_empty(), "{cmd:?}");
        }
        let err = qemu_nbd_refusal(&img, dir.path(), name);
        assert!(err.contains("inconsistent"), "qemu-nbd -B {name}: {err}");
    }
    assert_eq!(sha256_file(&img), before, "reading changed the image");
}

/// Runs `qemu-nbd -B name`, which must exit with an error; returns its stderr.
fn qemu_nbd_refusal(img: &Path, dir: &Path, name: &str) -> String {
    let sock = dir.join("nbd.sock");
    let log = dir.join("nbd.log");
    let child = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", name, "-k", s(&sock), s(img)])
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("spawn qemu-nbd");
    let mut nbd = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = nbd.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "qemu-nbd -B {name} kept serving an in-use bitmap"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "qemu-nbd -B {name} exited 0");
    std::fs::read_to_string(&log).unwrap()
}
