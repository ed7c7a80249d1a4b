//! Shared helpers: fixture paths, JSON records, running the binary, QEMU tool detection.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

pub fn expected(stem: &str, file: &str) -> PathBuf {
    fixtures_dir().join("expected").join(stem).join(file)
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fixture index: one entry per image.
pub fn index() -> Vec<serde_json::Value> {
    read_json(&fixtures_dir().join("expected/index.json"))
        .as_array()
        .expect("index is an array")
        .clone()
}

/// Runs the built binary.
pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qcow2-bitmap"))
        .args(args)
        .output()
        .expect("run qcow2-bitmap")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Whether QEMU's tools are usable here. When they are not, prints a visible
/// SKIPPED line, or panics if `QCOW2_BITMAP_REQUIRE_QEMU=1`.
pub fn qemu_available(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: {} not found", missing.join(", "));
    if std::env::var("QCOW2_BITMAP_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("{msg} and QCOW2_BITMAP_REQUIRE_QEMU=1");
    }
    eprintln!("SKIPPED: {msg} (install qemu-utils and libnbd-bin to run it)");
    false
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Merges adjacent ranges.
pub fn merge(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (off, len) in ranges {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// Dirty ranges of an nbdinfo `--json --map` document.
pub fn nbd_dirty(map: &serde_json::Value) -> Vec<(u64, u64)> {
    let items = map.as_array().expect("nbdinfo map is an array");
    merge(
        items
            .iter()
            .filter(|e| e["type"].as_u64() == Some(1))
            .map(|e| {
                (
                    e["offset"].as_u64().expect("offset"),
                    e["length"].as_u64().expect("length"),
                )
            }),
    )
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).expect("read file");
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A storage double that records writes and syncs and "crashes" at a chosen
/// operation (the failing write or sync does not happen; later calls fail too).
/// Clones share state, so a test keeps a handle while a transaction owns one.
/// After a crash, [`CrashStore::durable`] is the image with unsynced writes
/// lost, and [`CrashStore::live`] the image with every issued write landed.
#[derive(Debug, Clone)]
pub struct CrashStore(std::rc::Rc<std::cell::RefCell<CrashInner>>);

#[derive(Debug)]
struct CrashInner {
    durable: Vec<u8>,
    live: Vec<u8>,
    ops: usize,
    crash_at: Option<usize>,
    writes: usize,
    bytes_written: u64,
}

impl CrashStore {
    pub fn new(image: Vec<u8>, crash_at: Option<usize>) -> Self {
        let inner = CrashInner {
            durable: image.clone(),
            live: image,
            ops: 0,
            crash_at,
            writes: 0,
            bytes_written: 0,
        };
        CrashStore(std::rc::Rc::new(std::cell::RefCell::new(inner)))
    }

    pub fn durable(&self) -> Vec<u8> {
        self.0.borrow().durable.clone()
    }

    pub fn live(&self) -> Vec<u8> {
        self.0.borrow().live.clone()
    }

    /// Operations (writes + syncs) issued so far, including a crashed one.
    pub fn ops(&self) -> usize {
        self.0.borrow().ops
    }

    /// Writes that landed, and their total bytes.
    pub fn written(&self) -> (usize, u64) {
        let i = self.0.borrow();
        (i.writes, i.bytes_written)
    }

    fn step(&self) -> std::io::Result<()> {
        let mut i = self.0.borrow_mut();
        i.ops += 1;
        if i.crash_at.is_some_and(|c| i.ops >= c) {
            return Err(std::io::Error::other(format!(
                "injected crash at operation {}",
                i.ops
            )));
        }
        Ok(())
    }
}

impl qcow2_bitmap::storage::ReadAt for CrashStore {
    fn len(&self) -> u64 {
        self.0.borrow().live.len() as u64
    }
    fn read_at<'a>(
        &'a self,
        offset: u64,
        len: usize,
        s: &'a mut Vec<u8>,
    ) -> std::io::Result<&'a [u8]> {
        let i = self.0.borrow();
        let mut tmp = Vec::new();
        let bytes = i.live.read_at(offset, len, &mut tmp)?;
        s.clear();
        s.extend_from_slice(bytes);
        Ok(s)
    }
}

impl qcow2_bitmap::storage::WriteAt for CrashStore {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.step()?;
        let mut i = self.0.borrow_mut();
        i.writes += 1;
        i.bytes_written += data.len() as u64;
        i.live.write_at(offset, data)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.step()?;
        let mut i = self.0.borrow_mut();
        i.durable = i.live.clone();
        Ok(())
    }
}

/// A QMP session with a read-only qemu-storage-daemon on one image (node `q0`).
pub struct Qmp {
    child: std::process::Child,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
    next_id: u64,
    _dir: tempfile::TempDir,
}

impl Qmp {
    pub fn start(image: &Path) -> Qmp {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let pidfile = dir.path().join("qsd.pid");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={},read-only=on",
                image.display()
            ))
            .args([
                "--blockdev",
                "driver=qcow2,node-name=q0,file=f0,read-only=on",
            ])
            .arg("--chardev")
            .arg(format!(
                "socket,id=m0,path={},server=on,wait=off",
                sock.display()
            ))
            .args(["--monitor", "chardev=m0", "--pidfile"])
            .arg(&pidfile)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start qemu-storage-daemon");
        // Connecting while the daemon is still starting can duplicate the
        // greeting or drop the first command: wait until it wrote its pid file.
        let mut stream = None;
        for _ in 0..500 {
            if !pidfile.exists() {
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
            if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
                stream = Some(s);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let stream = stream.expect("QMP socket");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut q = Qmp {
            child,
            reader: std::io::BufReader::new(stream),
            writer,
            next_id: 0,
            _dir: dir,
        };
        q.execute(serde_json::json!({"execute": "qmp_capabilities"}));
        q
    }

    /// Sends `cmd` with a fresh id and returns the reply carrying that id
    /// (events, greetings and stale replies are skipped).
    pub fn execute(&mut self, mut cmd: serde_json::Value) -> serde_json::Value {
        use std::io::{BufRead, Write};
        self.next_id += 1;
        let id = self.next_id;
        cmd["id"] = serde_json::json!(id);
        writeln!(self.writer, "{cmd}").unwrap();
        loop {
            let mut line = String::new();
            assert!(self.reader.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["id"] == serde_json::json!(id) {
                return v;
            }
        }
    }

    /// QEMU's sha256 of a bitmap.
    pub fn sha256(&mut self, bitmap: &str) -> String {
        let r = self.execute(serde_json::json!({"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "q0", "name": bitmap}}));
        r["return"]["sha256"]
            .as_str()
            .unwrap_or_else(|| panic!("sha256 of {bitmap}: {r}"))
            .to_string()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `qemu-img check --output=json`: exit code and document.
pub fn qemu_check(image: &Path) -> (i32, serde_json::Value) {
    let o = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(image)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (o.status.code().unwrap_or(-1), v)
}

/// `qemu-img info` bitmaps: (name, granularity, flags).
pub fn qemu_info_bitmaps(image: &Path) -> Vec<(String, u64, Vec<String>)> {
    let o = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img info {}: {}",
        image.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    info_bitmaps(&v)
}

/// The bitmaps of a `qemu-img info --output=json` document: (name, granularity, flags).
pub fn info_bitmaps(info: &serde_json::Value) -> Vec<(String, u64, Vec<String>)> {
    let Some(bitmaps) = info["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    bitmaps
        .iter()
        .map(|b| {
            let flags = b["flags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect();
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                flags,
            )
        })
        .collect()
}

/// SplitMix64: one step of the small seedable generator the randomized tests share.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A number from the environment, decimal or 0x-hex (panics on garbage).
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v}: {e}")))
}

/// Fingerprint of the guest-visible data of a qcow2 image, read from its
/// bytes without the library: SHA-256 over the active L1 table, every L2
/// table it references, and every host cluster (or compressed span) those L2
/// entries reference. Write commands must leave it unchanged: they never write
/// guest data, L1 or L2 tables. (Snapshots and backing files are not covered;
/// with an external data file only the mapping is.)
pub fn guest_fingerprint(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    let be64 = |at: u64| -> u64 {
        let at = at as usize;
        bytes
            .get(at..at + 8)
            .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()))
    };
    let slice = |off: u64, len: u64| -> &[u8] {
        let start = (off as usize).min(bytes.len());
        let end = (off.saturating_add(len) as usize).min(bytes.len());
        &bytes[start..end]
    };
    let version = be32(4);
    let cluster_bits = be32(20);
    let cs = 1u64 << cluster_bits;
    // Bounded by the file, so a hostile l1_size cannot make this loop long.
    let l1_size = u64::from(be32(36)).min(bytes.len() as u64 / 8);
    let l1_offset = be64(40);
    let incompat = if version >= 3 { be64(72) } else { 0 };
    let extended = incompat & (1 << 4) != 0;
    let data_file = incompat & (1 << 2) != 0;
    let stride = if extended { 16 } else { 8 };
    let mut sha = Sha256::new();
    sha.update(slice(l1_offset, l1_size * 8));
    for i in 0..l1_size {
        let l2 = be64(l1_offset + 8 * i) & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        sha.update(slice(l2, cs));
        for j in 0..cs / stride {
            let raw = be64(l2 + j * stride);
            if raw & (1 << 62) != 0 {
                // Compressed: offset in the low x bits, sector count above.
                let x = 62 - (cluster_bits - 8);
                let off = raw & ((1 << x) - 1);
                let sectors = ((raw >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1;
                sha.update(slice(off, sectors * 512 - (off & 511)));
            } else if raw & OFFSET_MASK != 0 && !data_file {
                sha.update(slice(raw & OFFSET_MASK, cs));
            }
        }
    }
    sha.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// [`guest_fingerprint`] of a file.
pub fn guest_fingerprint_of(path: &Path) -> String {
    guest_fingerprint(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// SplitMix64 picks of test shapes (seedable; `QCOW2_BITMAP_SEED` replays).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }

    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.range(0, items.len() as u64 - 1) as usize]
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.range(1, 100) <= percent
    }
}

/// Runs a QEMU tool and returns its stdout, failing on a nonzero exit or a
/// failed qemu-io command (qemu-io reports those on stdout and exits 0).
pub fn tool(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let (o, e) = (stdout(&out), stderr(&out));
    let failed = !out.status.success() || o.contains("failed") || e.contains("failed");
    assert!(
        !failed,
        "{cmd} {} exited {}:\n{o}{e}",
        args.join(" "),
        out.status
    );
    o
}

/// Runs a tool in `dir` and asserts success (qemu-io reports failed
/// commands on stdout and still exits 0).
pub fn sh_in(dir: &Path, prog: &str, args: &[&str]) -> Output {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "{prog} {args:?} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One qemu-io read-write session on `img` in `dir` running `cmds`.
pub fn qemu_io_in(dir: &Path, img: &str, cmds: &[String]) {
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    sh_in(dir, "qemu-io", &args);
}

/// Runs the built binary in `dir`.
pub fn ours_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qcow2-bitmap"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run qcow2-bitmap")
}
