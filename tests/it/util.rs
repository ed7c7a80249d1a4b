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
/// After a crash, [`CrashStore::durable`] is the image with unsynced writes
/// lost, and [`CrashStore::live`] the image with every issued write landed.
#[derive(Debug, Clone)]
pub struct CrashStore {
    durable: Vec<u8>,
    live: Vec<u8>,
    ops: usize,
    crash_at: Option<usize>,
    pub writes: usize,
    pub syncs: usize,
}

impl CrashStore {
    pub fn new(image: Vec<u8>, crash_at: Option<usize>) -> Self {
        CrashStore {
            durable: image.clone(),
            live: image,
            ops: 0,
            crash_at,
            writes: 0,
            syncs: 0,
        }
    }

    pub fn durable(&self) -> &[u8] {
        &self.durable
    }

    pub fn live(&self) -> &[u8] {
        &self.live
    }

    /// Operations (writes + syncs) issued so far.
    pub fn ops(&self) -> usize {
        self.ops
    }

    fn step(&mut self) -> std::io::Result<()> {
        self.ops += 1;
        if self.crash_at.is_some_and(|c| self.ops >= c) {
            return Err(std::io::Error::other(format!(
                "injected crash at operation {}",
                self.ops
            )));
        }
        Ok(())
    }
}

impl qcow2_bitmap::storage::ReadAt for CrashStore {
    fn len(&self) -> u64 {
        self.live.len() as u64
    }
    fn read_at<'a>(
        &'a self,
        offset: u64,
        len: usize,
        s: &'a mut Vec<u8>,
    ) -> std::io::Result<&'a [u8]> {
        self.live.read_at(offset, len, s)
    }
}

impl qcow2_bitmap::storage::WriteAt for CrashStore {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.step()?;
        self.writes += 1;
        self.live.write_at(offset, data)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.step()?;
        self.syncs += 1;
        self.durable = self.live.clone();
        Ok(())
    }
}
