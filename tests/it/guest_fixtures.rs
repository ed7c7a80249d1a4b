//! The guest-data fixtures (`fixtures/guest/`, made by `fixtures/guest/make.sh`
//! with QEMU's tools) against QEMU's recorded answers, without QEMU:
//! - `map --json` and human `map` (stdout byte for byte, exit status, one
//!   error line) run from the directory QEMU ran in, with the same path;
//! - `map --offset/--length` for the recorded `--start-offset/--max-length`
//!   ranges (ranges past the end: our contract refuses them, and the part
//!   inside the disk must equal QEMU's clipped answer);
//! - the SHA-256 of the whole guest view (library reads) against
//!   `qemu-img convert -O raw`, or of recorded slices for the 16 TiB image;
//! - `info --json`'s backing and data-file keys against `qemu-img info`.

use crate::util::ours_in as ours;
use crate::util::*;
use qcow2_bitmap::guest::{Chain, OpenOptions};
use qcow2_bitmap::lock::Access;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A dense copy of `fixtures/guest` (written with `write`, no holes).
/// QEMU recorded its answers on dense files, and `qemu-img map` depends on
/// the host file's holes (the metadata-preallocation heuristic); a checkout
/// may leave holes where the images hold zero clusters (git can write long
/// zero runs as holes), so the tests never read the checkout itself.
fn guest_dir() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        copy_dense(&fixtures_dir().join("guest"), dir.path());
        dir
    })
    .path()
    .to_path_buf()
}

fn copy_dense(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dense(&e.path(), &target);
        } else {
            std::fs::write(&target, std::fs::read(e.path()).unwrap()).unwrap();
        }
    }
}

fn cases() -> Vec<Value> {
    read_json(&guest_dir().join("expected/index.json"))
        .as_array()
        .expect("index is an array")
        .clone()
}

fn record(case: &str, file: &str) -> String {
    let p = guest_dir().join("expected").join(case).join(file);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

struct Case {
    name: String,
    cwd: PathBuf,
    top: String,
    size: u64,
    v: Value,
}

fn each_case() -> Vec<Case> {
    let all: Vec<Case> = cases()
        .into_iter()
        .map(|v| Case {
            name: v["name"].as_str().unwrap().to_string(),
            cwd: guest_dir().join(v["cwd"].as_str().unwrap()),
            top: v["top-from-cwd"].as_str().unwrap().to_string(),
            size: v["virtual-size"].as_u64().unwrap(),
            v,
        })
        .collect();
    assert!(
        all.len() >= 20,
        "the guest fixture index lists too few cases"
    );
    all
}

fn one_line_error(o: &std::process::Output, what: &str) -> String {
    let err = stderr(o);
    assert_eq!(
        err.lines().count(),
        1,
        "{what}: one error line, got {err:?}"
    );
    assert!(err.starts_with("qcow2-bitmap: "), "{what}: {err}");
    err
}

#[test]
fn guest_fixtures_map_equals_qemu() {
    let mut compared = 0;
    for c in each_case() {
        let what = &c.name;
        if c.v.get("expect-error").is_some() {
            for args in [vec!["map", "--json", &c.top], vec!["map", &c.top]] {
                let o = ours(&c.cwd, &args);
                assert_eq!(o.status.code(), Some(1), "{what}: {args:?} must fail");
                let err = one_line_error(&o, what);
                assert!(
                    err.contains("df.data"),
                    "{what}: names the data file: {err}"
                );
            }
            continue;
        }
        let o = ours(&c.cwd, &["map", "--json", &c.top]);
        assert!(o.status.success(), "{what}: map --json: {}", stderr(&o));
        assert_eq!(stdout(&o), record(what, "map.json"), "{what}: map --json");
        let o = ours(&c.cwd, &["map", &c.top]);
        assert_eq!(stdout(&o), record(what, "map.txt"), "{what}: human map");
        let rc: i32 = record(what, "map.rc").trim().parse().unwrap();
        assert_eq!(o.status.code(), Some(rc), "{what}: human map exit status");
        if rc != 0 {
            let err = one_line_error(&o, what);
            assert!(err.contains("compressed"), "{what}: {err}");
        }
        compared += 1;
    }
    assert!(compared >= 20);
}

#[test]
fn guest_fixtures_map_ranges_equal_qemu() {
    let mut ranges = 0;
    for c in each_case() {
        let Some(list) = c.v.get("map-ranges").and_then(Value::as_array) else {
            continue;
        };
        for r in list {
            let (start, len) = (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap());
            let want = record(&c.name, &format!("map-range-{start}-{len}.json"));
            let what = format!("{} --offset {start} --length {len}", c.name);
            let (s, l) = (start.to_string(), len.to_string());
            let o = ours(
                &c.cwd,
                &["map", "--json", "--offset", &s, "--length", &l, &c.top],
            );
            if start + len <= c.size {
                assert!(o.status.success(), "{what}: {}", stderr(&o));
                assert_eq!(stdout(&o), want, "{what}");
            } else {
                // Past the end: refused by contract (exit 1, one line) ...
                assert_eq!(o.status.code(), Some(1), "{what}: past the end");
                one_line_error(&o, &what);
                // ... and the part inside the disk is what QEMU clipped to.
                if start < c.size {
                    let l = (c.size - start).to_string();
                    let o = ours(
                        &c.cwd,
                        &["map", "--json", "--offset", &s, "--length", &l, &c.top],
                    );
                    assert_eq!(stdout(&o), want, "{what} clipped to the disk");
                }
            }
            ranges += 1;
        }
    }
    assert!(ranges >= 20, "only {ranges} recorded ranges");
}

fn open(c: &Case) -> Chain {
    let mut opts = OpenOptions::new(Access::Read);
    // Relative data-file names resolve against the directory QEMU ran in.
    opts.data_file_dir = Some(c.cwd.clone());
    Chain::open_with(&c.cwd.join(&c.top), opts).unwrap_or_else(|e| panic!("{}: open: {e}", c.name))
}

fn sha256_of_guest(chain: &Chain, start: u64, len: u64) -> String {
    let mut reader = chain.reader();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = start;
    while at < start + len {
        let n = (start + len - at).min(buf.len() as u64) as usize;
        reader
            .read_at(at, &mut buf[..n])
            .unwrap_or_else(|e| panic!("read {at}+{n}: {e}"));
        h.update(&buf[..n]);
        at += n as u64;
    }
    qcow2_bitmap::read::hex(&h.finalize())
}

#[test]
fn guest_fixtures_bytes_equal_qemu_convert() {
    let mut hashed = 0;
    for c in each_case() {
        if c.v.get("expect-error").is_some() {
            continue;
        }
        let chain = open(&c);
        assert_eq!(chain.virtual_size(), c.size, "{}: virtual size", c.name);
        if let Some(slices) = c.v.get("raw-ranges") {
            assert!(slices.as_bool().unwrap_or(true));
            let recorded = read_json(
                &guest_dir()
                    .join("expected")
                    .join(&c.name)
                    .join("raw-ranges.json"),
            );
            for r in recorded.as_array().unwrap() {
                let (s, l) = (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap());
                assert_eq!(
                    sha256_of_guest(&chain, s, l),
                    r["sha256"].as_str().unwrap(),
                    "{}: guest bytes {s}+{l}",
                    c.name
                );
                hashed += 1;
            }
            continue;
        }
        let want = record(&c.name, "raw.sha256");
        let want = want.split_whitespace().next().unwrap();
        assert_eq!(
            sha256_of_guest(&chain, 0, c.size),
            want,
            "{}: guest bytes differ from qemu-img convert -O raw",
            c.name
        );
        hashed += 1;
    }
    assert!(hashed >= 20);
}

#[test]
fn guest_fixtures_info_shows_backing_and_data_file_like_qemu() {
    let mut with_backing = 0;
    let mut with_data_file = 0;
    for c in each_case() {
        let q: Value = serde_json::from_str(&record(&c.name, "info.json")).unwrap();
        let o = ours(&c.cwd, &["info", "--json", &c.top]);
        assert!(o.status.success(), "{}: info: {}", c.name, stderr(&o));
        let ours: Value = serde_json::from_slice(&o.stdout).unwrap();
        for key in [
            "backing-filename",
            "backing-filename-format",
            "full-backing-filename",
        ] {
            assert_eq!(ours.get(key), q.get(key), "{}: {key}", c.name);
        }
        with_backing += usize::from(q.get("backing-filename").is_some());
        let qd = &q["format-specific"]["data"];
        assert_eq!(
            ours.get("data-file"),
            qd.get("data-file"),
            "{}: data-file",
            c.name
        );
        assert_eq!(
            ours.get("data-file-raw"),
            qd.get("data-file").and(qd.get("data-file-raw")),
            "{}: data-file-raw",
            c.name
        );
        with_data_file += usize::from(qd.get("data-file").is_some());
        // Human info names the backing file as qemu-img does.
        if let Some(name) = q.get("backing-filename").and_then(Value::as_str) {
            let h = stdout(&ours_human(&c));
            assert!(
                h.contains(&format!("backing file:   {name}")),
                "{}: {h}",
                c.name
            );
        }
    }
    assert!(with_backing >= 8 && with_data_file >= 3);
}

fn ours_human(c: &Case) -> std::process::Output {
    ours(&c.cwd, &["info", &c.top])
}
