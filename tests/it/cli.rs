//! The command-line contract (`shared/reference/cli.md`) on committed
//! fixtures: output shapes, exit codes, one-line errors, refusal of
//! untrusted bitmaps, locks, and that read commands never write a byte.

use crate::util::*;
use qcow2_bitmap::lock::{self, Access};
use serde_json::Value;

fn demo() -> String {
    fixture("demo.qcow2").display().to_string()
}

fn ok_json(args: &[&str]) -> Value {
    let o = run(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", stdout(&o)))
}

/// Asserts exit 1 with exactly one stderr line starting with `qcow2-bitmap: `; returns it.
fn fails(args: &[&str]) -> String {
    let o = run(args);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{args:?}: stdout {} stderr {}",
        stdout(&o),
        stderr(&o)
    );
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
    assert!(err.starts_with("qcow2-bitmap: "), "{args:?}: {err}");
    err
}

#[test]
fn info_json_follows_the_contract() {
    let v = ok_json(&["info", "--json", &demo()]);
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["version"], 3);
    assert_eq!(v["virtual-size"], 4u64 << 30);
    assert_eq!(v["cluster-size"], 65536);
    assert_eq!(v["refcount-bits"], 16);
    assert_eq!(v["bitmaps-consistent"], true);
    assert_eq!(v["filename"], demo());
    let bitmaps = v["bitmaps"].as_array().unwrap();
    let names: Vec<&str> = bitmaps
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ckpt-1", "ckpt-2", "ckpt-3", "since-ckpt-1"]);
    let qmp = read_json(&expected("demo", "qmp.json"));
    for (b, q) in bitmaps.iter().zip(qmp["bitmaps"].as_array().unwrap()) {
        assert_eq!(b["state"], "ok");
        assert!(b.get("problem").is_none());
        assert_eq!(b["granularity"], q["granularity"]);
        let flags: Vec<&str> = b["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        assert_eq!(
            flags,
            if q["recording"] == true {
                vec!["auto"]
            } else {
                vec![]
            }
        );
        assert!(b["table-offset"].as_u64().unwrap() > 0);
        assert_eq!(b["table-size"], 1);
        let map = read_json(&expected(
            "demo",
            &format!("map-{}.json", b["name"].as_str().unwrap()),
        ));
        let total: u64 = nbd_dirty(&map).iter().map(|r| r.1).sum();
        assert_eq!(b["dirty-bytes"], total);
    }
}

#[test]
fn info_json_reports_in_use_and_stale_with_null_dirty_bytes() {
    let v = ok_json(&["info", "--json", fixture("inuse.qcow2").to_str().unwrap()]);
    let a = &v["bitmaps"][0];
    assert_eq!(a["state"], "in-use");
    assert_eq!(a["flags"], serde_json::json!(["in-use", "auto"]));
    assert!(a["dirty-bytes"].is_null());
    assert!(a["problem"].as_str().unwrap().contains("in_use"));
    let v = ok_json(&["info", "--json", fixture("stale.qcow2").to_str().unwrap()]);
    assert_eq!(v["bitmaps-consistent"], false);
    assert!(
        v["bitmaps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["state"] == "stale" && b["dirty-bytes"].is_null())
    );
    let v = ok_json(&["info", "--json", fixture("empty.qcow2").to_str().unwrap()]);
    assert_eq!(v["bitmaps"], serde_json::json!([]));
}

#[test]
fn info_human_shows_table_and_density() {
    let o = run(&["info", &demo()]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(
        out.contains("virtual size:   4 GiB (4294967296 bytes)"),
        "{out}"
    );
    assert!(
        out.contains("NAME") && out.contains("GRANULARITY") && out.contains("STATE"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("ckpt-1") && l.ends_with("ok")),
        "{out}"
    );
    assert!(out.contains("dirty map"), "{out}");
}

#[test]
fn extents_human_and_json_match_nbdinfo() {
    let map = read_json(&expected("demo", "map-ckpt-3.json"));
    let want = nbd_dirty(&map);
    let o = run(&["extents", &demo(), "ckpt-3"]);
    assert!(o.status.success());
    let human: Vec<(u64, u64)> = stdout(&o)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f[2], "dirty");
            (f[0].parse().unwrap(), f[1].parse().unwrap())
        })
        .collect();
    assert_eq!(human, want);
    let v = ok_json(&["extents", "--json", &demo(), "ckpt-3"]);
    let json: Vec<(u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["dirty"], true);
            (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(json, want);
}

#[test]
fn extents_all_tiles_the_range_exactly() {
    let v = ok_json(&["extents", "--json", "--all", &demo(), "ckpt-1"]);
    let items = v.as_array().unwrap();
    let mut pos = 0;
    let mut prev_dirty = None;
    for e in items {
        assert_eq!(e["offset"].as_u64().unwrap(), pos);
        let dirty = e["dirty"].as_bool().unwrap();
        assert_ne!(Some(dirty), prev_dirty, "adjacent extents must alternate");
        prev_dirty = Some(dirty);
        pos += e["length"].as_u64().unwrap();
    }
    assert_eq!(pos, 4u64 << 30);
    let all: Vec<(u64, u64, u64)> = items
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["dirty"].as_bool().unwrap() as u64,
            )
        })
        .collect();
    let map = read_json(&expected("demo", "map-ckpt-1.json"));
    let nbd: Vec<(u64, u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(all, nbd);
    let o = run(&["extents", "--all", &demo(), "ckpt-2"]);
    assert!(stdout(&o).lines().any(|l| l.ends_with(" clean")));
}

#[test]
fn extents_offset_and_length_clip() {
    let full = nbd_dirty(&read_json(&expected("demo", "map-ckpt-3.json")));
    let (lo, hi) = (full[0].0 + 4096, full[0].0 + full[0].1 + (1 << 30));
    let v = ok_json(&[
        "extents",
        "--json",
        "--offset",
        &lo.to_string(),
        "--length",
        &(hi - lo).to_string(),
        &demo(),
        "ckpt-3",
    ]);
    let got: Vec<(u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    let want: Vec<(u64, u64)> = full
        .iter()
        .filter_map(|&(o, l)| {
            let (s, e) = (o.max(lo), (o + l).min(hi));
            (s < e).then(|| (s, e - s))
        })
        .collect();
    assert_eq!(got, want);
    let v = ok_json(&[
        "extents",
        "--json",
        "--offset",
        "1G",
        "--length",
        "0",
        &demo(),
        "ckpt-3",
    ]);
    assert_eq!(v, serde_json::json!([]));
    let e = fails(&[
        "extents",
        "--offset",
        "4G",
        "--length",
        "1",
        &demo(),
        "ckpt-3",
    ]);
    assert!(e.contains("past the virtual size"), "{e}");
    let e = fails(&["extents", "--offset", "5G", &demo(), "ckpt-3"]);
    assert!(e.contains("past the virtual size"), "{e}");
}

#[test]
fn hash_matches_qmp() {
    let qmp = read_json(&expected("demo", "qmp.json"));
    for q in qmp["bitmaps"].as_array().unwrap() {
        let o = run(&["hash", &demo(), q["name"].as_str().unwrap()]);
        assert!(o.status.success());
        assert_eq!(stdout(&o).trim(), q["sha256"].as_str().unwrap());
    }
}

#[test]
fn untrusted_bitmaps_are_refused_unless_forced() {
    let inuse = fixture("inuse.qcow2").display().to_string();
    let e = fails(&["extents", &inuse, "a"]);
    assert!(
        e.contains("bitmap 'a': is in use") && e.contains("--force"),
        "{e}"
    );
    fails(&["hash", &inuse, "a"]);
    assert!(run(&["extents", "--force", &inuse, "a"]).status.success());
    assert!(run(&["hash", "--force", &inuse, "a"]).status.success());
    let stale = fixture("stale.qcow2").display().to_string();
    let e = fails(&["extents", &stale, "b0"]);
    assert!(e.contains("is stale"), "{e}");
}

#[test]
fn errors_are_one_line_with_exit_1() {
    let e = fails(&["extents", &demo(), "nope"]);
    assert!(e.contains("bitmap 'nope': not found"), "{e}");
    let e = fails(&["info", "/nonexistent/x.qcow2"]);
    assert!(e.contains("/nonexistent/x.qcow2"), "{e}");
    let cargo_toml = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let e = fails(&["info", cargo_toml.to_str().unwrap()]);
    assert!(e.contains("is not the qcow2 magic"), "{e}");
    let e = fails(&["info", "--bogus", &demo()]);
    assert!(e.contains("--bogus"), "{e}");
    fails(&["extents", &demo()]);
    fails(&["nosuchcommand"]);
    let e = fails(&["extents", "--offset", "12Q", &demo(), "ckpt-1"]);
    assert!(e.contains("12Q"), "{e}");
    let o = run(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn dump_lists_every_structure() {
    let v = ok_json(&["dump", "--json", &demo(), "--bitmap", "ckpt-1"]);
    let header = v["header"].as_array().unwrap();
    let size = header.iter().find(|f| f["name"] == "size").unwrap();
    assert_eq!(
        (size["offset"].as_u64(), size["value"].as_u64()),
        (Some(24), Some(4u64 << 30))
    );
    assert!(header.iter().any(|f| f["name"] == "compression_type"));
    let exts = v["extensions"].as_array().unwrap();
    assert!(
        exts.iter()
            .any(|e| e["name"] == "bitmaps" && e["length"] == 24)
    );
    assert!(v["end-marker-offset"].as_u64().is_some());
    let be = v["bitmaps-extension"].as_array().unwrap();
    assert_eq!(be[0]["name"], "nb_bitmaps");
    assert_eq!(be[0]["value"], 4);
    assert_eq!(v["directory"].as_array().unwrap().len(), 4);
    assert_eq!(v["directory"][0]["granularity-bits"], 16);
    let table = v["table"]["entries"].as_array().unwrap();
    assert_eq!(table.len(), 1);
    assert_eq!(table[0]["kind"], "data");
    let o = run(&["dump", fixture("unknown-ext.qcow2").to_str().unwrap()]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("0x11111111  unknown"), "{}", stdout(&o));
}

#[test]
fn read_commands_never_write_a_byte() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "demo.qcow2",
        "inuse.qcow2",
        "stale.qcow2",
        "v2.qcow2",
        "allones.qcow2",
    ] {
        let img = dir.path().join(name);
        std::fs::copy(fixture(name), &img).unwrap();
        let before = std::fs::read(&img).unwrap();
        let p = img.to_str().unwrap();
        run(&["info", p]);
        run(&["info", "--json", "-U", p]);
        run(&["check", p]);
        run(&["check", "--json", p]);
        run(&["repair", "--dry-run", p]);
        run(&["dump", "--json", p]);
        for b in ["ckpt-1", "a", "b0", "mid"] {
            run(&["extents", "--all", "--force", p, b]);
            run(&["hash", "--force", p, b]);
            run(&["dump", p, "--bitmap", b]);
        }
        assert_eq!(std::fs::read(&img).unwrap(), before, "{name} changed");
    }
}

#[test]
fn a_writer_lock_blocks_reads_except_force_share() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("held.qcow2");
    std::fs::copy(fixture("demo.qcow2"), &img).unwrap();
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    lock::lock(&held, "held.qcow2", Access::Write).unwrap();
    let p = img.to_str().unwrap();
    let e = fails(&["info", p]);
    assert!(e.contains("lock"), "{e}");
    assert!(run(&["info", "-U", p]).status.success());
    assert!(run(&["info", "--force-share", p]).status.success());
    drop(held);
    assert!(wait_until(|| run(&["info", p]).status.success()));
}

fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..50 {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

/// Refusals on the corruption corpus (`fixtures/corrupt/`): exit 1, nothing
/// on stdout, one stderr line naming the structure, the field, its file
/// offset and the offending value; a refused write leaves the image as it was.
#[test]
fn corrupt_fixture_refusals_name_structure_field_offset_and_value() {
    let dir = tempfile::tempdir().unwrap();
    // (fixture, command, exact stderr with IMG for the image path)
    let cases: [(&str, &[&str], &str); 12] = [
        (
            "ext-nb-huge.qcow2",
            &["clear", "IMG", "victim"],
            "qcow2-bitmap: IMG: bitmaps extension: bitmaps extension nb_bitmaps at offset 120 (0x78): \
             65536 exceeds 65535; run `qcow2-bitmap repair` first",
        ),
        (
            "ext-dir-size-huge.qcow2",
            &["add", "IMG", "new"],
            "qcow2-bitmap: IMG: bitmaps extension: bitmaps extension bitmap_directory_size at offset 128 (0x80): \
             67107841 exceeds the maximum 67107840; run `qcow2-bitmap repair` first",
        ),
        (
            "ext-dir-misaligned.qcow2",
            &["remove", "IMG", "victim"],
            "qcow2-bitmap: IMG: bitmaps extension: bitmaps extension bitmap_directory_offset at offset 136 (0x88): \
             0x4208 is not a nonzero multiple of the cluster size; run `qcow2-bitmap repair` first",
        ),
        (
            "dir-fewer-entries.qcow2",
            &["merge", "IMG", "healthy", "other"],
            "qcow2-bitmap: IMG: bitmaps extension: bitmap directory at offset 16896 (0x4200): \
             holds 3 entries but the bitmaps extension says 4; run `qcow2-bitmap repair` first",
        ),
        (
            "dir-gran-32.qcow2",
            &["extents", "--force", "IMG", "victim"],
            "qcow2-bitmap: bitmap 'victim' directory entry at offset 16945 (0x4231): \
             granularity_bits 32 is outside 9..=31",
        ),
        (
            "dir-type-2.qcow2",
            &["hash", "--force", "IMG", "victim"],
            "qcow2-bitmap: bitmap 'victim' directory entry at offset 16944 (0x4230): \
             type 2 is not 1 (dirty tracking)",
        ),
        (
            "dir-table-offset-misaligned.qcow2",
            &["extents", "--force", "--json", "IMG", "victim"],
            "qcow2-bitmap: bitmap 'victim' directory entry at offset 16928 (0x4220): \
             bitmap_table_offset 0x3c08 is not a nonzero multiple of the cluster size",
        ),
        (
            "dir-extra-noflag.qcow2",
            &["hash", "--force", "IMG", "victim"],
            "qcow2-bitmap: bitmap 'victim' directory entry at offset 16948 (0x4234): \
             extra_data_size 8 without the extra_data_compatible flag",
        ),
        (
            "dir-flag-reserved.qcow2",
            &["extents", "IMG", "victim"],
            "qcow2-bitmap: bitmap 'victim' at offset 16940 (0x422c): is invalid \
             (flags 0xa has reserved bits 0x8 set); use --force to read it anyway",
        ),
        (
            "tbl-reserved.qcow2",
            &["hash", "--force", "IMG", "victim"],
            "qcow2-bitmap: bitmap 'victim' table entry 0 at offset 15360 (0x3c00): \
             0x0000000000003802: reserved bits 0x2 are set",
        ),
        (
            "tbl-past-eof.qcow2",
            &["extents", "--force", "IMG", "victim"],
            "qcow2-bitmap: bitmap 'victim' table entry 1 at offset 15368 (0x3c08): \
             data cluster 0x6400 lies beyond the end of the file (16992 bytes)",
        ),
        (
            "tbl-offset-allones.qcow2",
            &["extents", "--force", "IMG", "victim"],
            "qcow2-bitmap: bitmap 'victim' table entry 0 at offset 15360 (0x3c00): \
             0x0000000000003801: offset 0x3800 together with the all-ones bit",
        ),
    ];
    for (name, args, want) in cases {
        let img = dir.path().join(name);
        std::fs::copy(fixture(&format!("corrupt/{name}")), &img).unwrap();
        let before = std::fs::read(&img).unwrap();
        let p = img.to_str().unwrap();
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "IMG" { p } else { a })
            .collect();
        let o = run(&args);
        assert!(
            o.stdout.is_empty(),
            "{name} {args:?}: stdout {}",
            stdout(&o)
        );
        let err = fails(&args);
        assert_eq!(err.trim_end(), want.replace("IMG", p), "{name} {args:?}");
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{name} {args:?}: image changed"
        );
    }
}

/// `dump` shows a bitmaps extension's length field as it is on disk, also when the
/// extension is read as its fixed 24 bytes (fixtures/corrupt/ext-len-huge.qcow2).
#[test]
fn dump_shows_a_wrong_bitmaps_extension_length_as_found() {
    let path = fixtures_dir().join("corrupt/ext-len-huge.qcow2");
    let o = run(&["dump", "--json", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(doc["extensions"][0]["length"], 0xFFFF_FF00u32);
    let problem = doc["bitmaps-problem"].as_str().unwrap();
    assert!(
        problem.contains("bitmaps extension length at offset 116"),
        "{problem}"
    );
    assert_eq!(doc["directory"].as_array().map(Vec::len), Some(3));
}
