//! The write path judged by QEMU: after every operation on every writable
//! fixture shape `qemu-img check` exits 0, `qemu-img info` lists what we
//! expect, QEMU's sha256 of every bitmap equals ours, and guest data is
//! unchanged; the same operations done by `qemu-img bitmap` on a twin give
//! the same bitmaps; and a crash injected at every write and sync leaves an
//! image QEMU opens (check exit 0 or 3) with every bitmap old or new.

use crate::util::*;
use crate::write::{Snapshot, WRITABLE, snapshot};
use qcow2_bitmap::read::{Image, hex};
use qcow2_bitmap::write::{MergeSource, Transaction};
use std::path::Path;
use std::process::Command;

const TOOLS: [&str; 2] = ["qemu-img", "qemu-storage-daemon"];

fn our_hashes(path: &Path) -> Vec<(String, String)> {
    let img = Image::open(std::fs::read(path).unwrap()).unwrap();
    img.bitmaps()
        .iter()
        .map(|b| (b.name(), hex(&img.sha256(b, false).unwrap())))
        .collect()
}

fn flags_of(path: &Path) -> Vec<(String, u64, Vec<String>)> {
    let img = Image::open(std::fs::read(path).unwrap()).unwrap();
    img.bitmaps()
        .iter()
        .map(|b| {
            let f = if b.entry.auto() {
                vec!["auto".to_string()]
            } else {
                vec![]
            };
            (b.name(), b.granularity(), f)
        })
        .collect()
}

/// QEMU agrees with our read path on `path`, and guest data equals `original`'s.
fn assert_qemu_agrees(path: &Path, original: &Path, what: &str) {
    // Some fixtures leak by construction (allones.qcow2): we add no leak of our own.
    let (rc0, check0) = qemu_check(original);
    let (rc, check) = qemu_check(path);
    assert_eq!(
        (rc, &check["leaks"]),
        (rc0, &check0["leaks"]),
        "{what}: qemu-img check: {check}"
    );
    assert!(rc == 0 || rc == 3, "{what}: qemu-img check: {check}");
    assert_eq!(
        qemu_info_bitmaps(path),
        flags_of(path),
        "{what}: qemu-img info bitmaps"
    );
    let ours = our_hashes(path);
    let mut qmp = Qmp::start(path);
    for (name, sha) in &ours {
        assert_eq!(&qmp.sha256(name), sha, "{what}: QEMU's sha256 of {name}");
    }
    drop(qmp);
    let cmp = Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(original)
        .arg(path)
        .status()
        .unwrap();
    assert!(cmp.success(), "{what}: guest data changed");
}

fn run_cli(args: &[&str]) {
    let o = run(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    assert!(o.stdout.is_empty(), "{args:?} printed {}", stdout(&o));
}

#[test]
fn every_cli_write_command_on_every_fixture_passes_qemu() {
    if !qemu_available(
        "every_cli_write_command_on_every_fixture_passes_qemu",
        &TOOLS,
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for name in WRITABLE {
        let img = dir.path().join(name);
        std::fs::copy(fixture(name), &img).unwrap();
        if name == "backing.qcow2" {
            std::fs::copy(fixture("base.qcow2"), dir.path().join("base.qcow2")).unwrap();
        }
        let p = img.to_str().unwrap();
        let first = Image::open(std::fs::read(&img).unwrap()).unwrap().bitmaps()[0].name();
        let steps: Vec<Vec<&str>> = vec![
            vec!["add", p, "cli-new"],
            vec!["add", "-g", "1M", "--disabled", p, "cli-coarse"],
            vec!["merge", p, "cli-new", &first],
            vec!["merge", p, "cli-coarse", "cli-new", &first],
            vec!["disable", p, &first],
            vec!["enable", p, &first],
            vec!["clear", p, "cli-new"],
            vec!["remove", p, "cli-new", "cli-coarse"],
        ];
        for step in steps {
            run_cli(&step);
            assert_qemu_agrees(&img, &fixture(name), &format!("{name} after {step:?}"));
        }
    }
}

#[test]
fn same_operations_as_qemu_img_bitmap_give_the_same_bitmaps() {
    if !qemu_available(
        "same_operations_as_qemu_img_bitmap_give_the_same_bitmaps",
        &TOOLS,
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "several.qcow2",
        "cs512.qcow2",
        "gran-range.qcow2",
        "demo.qcow2",
    ] {
        let ours = dir.path().join(format!("ours-{name}"));
        let theirs = dir.path().join(format!("theirs-{name}"));
        std::fs::copy(fixture(name), &ours).unwrap();
        std::fs::copy(fixture(name), &theirs).unwrap();
        let names: Vec<String> = Image::open(std::fs::read(&ours).unwrap())
            .unwrap()
            .bitmaps()
            .iter()
            .map(|b| b.name())
            .collect();
        let (a, b) = (names[0].clone(), names[names.len() - 1].clone());
        let o = ours.to_str().unwrap();
        // (our CLI args, qemu-img bitmap args, bitmap name) in order.
        let ops: Vec<(Vec<&str>, Vec<&str>, &str)> = vec![
            (
                vec!["add", "-g", "512", o, "fine"],
                vec!["--add", "-g", "512"],
                "fine",
            ),
            (
                vec!["add", "-g", "2M", "--disabled", o, "coarse"],
                vec!["--add", "-g", "2M", "--disable"],
                "coarse",
            ),
            (vec!["add", o, "dflt"], vec!["--add"], "dflt"),
            (vec!["merge", o, "fine", &a], vec!["--merge", &a], "fine"),
            (
                vec!["merge", o, "coarse", &b],
                vec!["--merge", &b],
                "coarse",
            ),
            (
                vec!["merge", o, "coarse", "fine"],
                vec!["--merge", "fine"],
                "coarse",
            ),
            (vec!["disable", o, "fine"], vec!["--disable"], "fine"),
            (vec!["clear", o, &a], vec!["--clear"], &a),
            (vec!["remove", o, "dflt"], vec!["--remove"], "dflt"),
        ];
        let guest = guest_fingerprint_of(&ours);
        for (ours_args, qemu_args, target) in ops {
            run_cli(&ours_args);
            let what = format!("{name} {ours_args:?}");
            assert_eq!(guest_fingerprint_of(&ours), guest, "{what}: guest data");
            let o2 = Command::new("qemu-img")
                .arg("bitmap")
                .args(&qemu_args)
                .arg(&theirs)
                .arg(target)
                .output()
                .unwrap();
            assert!(
                o2.status.success(),
                "qemu-img bitmap {qemu_args:?}: {}",
                String::from_utf8_lossy(&o2.stderr)
            );
            assert_eq!(
                qemu_info_bitmaps(&ours),
                qemu_info_bitmaps(&theirs),
                "{what}: names, granularity, flags"
            );
            let (mut qo, mut qt) = (Qmp::start(&ours), Qmp::start(&theirs));
            for (n, _, _) in qemu_info_bitmaps(&ours) {
                assert_eq!(qo.sha256(&n), qt.sha256(&n), "{what}: bitmap {n}");
            }
        }
    }
}

/// Applies `op` to `before` with a crash at every write and sync; checks each outcome.
/// Returns the number of crash points tried.
fn crash_everywhere(
    name: &str,
    before: &[u8],
    op: &dyn Fn(&mut Transaction<CrashStore>) -> qcow2_bitmap::Result<()>,
    dir: &Path,
) -> usize {
    let old = snapshot(before);
    let guest = guest_fingerprint(before);
    let clean = CrashStore::new(before.to_vec(), None);
    let mut tx = Transaction::begin(clean.clone()).unwrap();
    op(&mut tx).unwrap();
    tx.commit().unwrap();
    let total = clean.ops();
    let new = snapshot(&clean.live());
    assert!(total >= 4, "{name}: only {total} operations");
    let mut tried = 0;
    for k in 1..=total {
        let store = CrashStore::new(before.to_vec(), Some(k));
        let mut tx = Transaction::begin(store.clone()).unwrap();
        op(&mut tx).unwrap();
        assert!(tx.commit().is_err(), "{name}: crash at {k} not reported");
        for (kind, image) in [("durable", store.durable()), ("live", store.live())] {
            let what = format!("{name}: crash at operation {k}/{total} ({kind})");
            let got = snapshot(&image);
            assert!(
                same(&got, &old) || same(&got, &new),
                "{what}: bitmaps are neither all old nor all new"
            );
            assert_eq!(guest_fingerprint(&image), guest, "{what}: guest data");
            let path = dir.join("crashed.qcow2");
            std::fs::write(&path, &image).unwrap();
            let (rc, v) = qemu_check(&path);
            assert!(rc == 0 || rc == 3, "{what}: qemu-img check rc {rc}: {v}");
            tried += 1;
        }
    }
    tried
}

fn same(a: &Snapshot, b: &Snapshot) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((na, va), (nb, vb))| na == nb && va.0 == vb.0 && va.1 == vb.1 && va.2 == vb.2)
}

#[test]
fn a_crash_at_any_write_or_sync_leaves_old_or_new_bitmaps() {
    if !qemu_available(
        "a_crash_at_any_write_or_sync_leaves_old_or_new_bitmaps",
        &["qemu-img"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    type Op = Box<dyn Fn(&mut Transaction<CrashStore>) -> qcow2_bitmap::Result<()>>;
    let ops: Vec<(&str, &str, Op)> = vec![
        (
            "add",
            "several.qcow2",
            Box::new(|tx| tx.add("n", Some(4096), true)),
        ),
        (
            "add big table on 512 B clusters",
            "rc64.qcow2",
            Box::new(|tx| tx.add("n", Some(512), true)),
        ),
        (
            "remove",
            "several.qcow2",
            Box::new(|tx| tx.remove(&["a", "c"])),
        ),
        (
            "remove last",
            "one.qcow2",
            Box::new(|tx| tx.remove(&["b0"])),
        ),
        ("clear", "cs512.qcow2", Box::new(|tx| tx.clear("g512"))),
        (
            "disable",
            "demo.qcow2",
            Box::new(|tx| tx.set_enabled("ckpt-3", false)),
        ),
        (
            "merge",
            "several.qcow2",
            Box::new(|tx| {
                let (bits, gb) = tx.load("c")?;
                let size = tx.virtual_size();
                tx.merge(
                    "b",
                    &MergeSource {
                        bits: &bits,
                        granularity_bits: gb,
                        virtual_size: size,
                    },
                )
            }),
        ),
        (
            "streamed merge of two bitmaps, twice into one target",
            "several.qcow2",
            Box::new(|tx| {
                tx.merge_bitmap("a", "c")?;
                tx.merge_bitmap("a", "b")
            }),
        ),
        (
            "add + streamed merge into the new empty bitmap (one run of new clusters)",
            "several.qcow2",
            Box::new(|tx| {
                tx.add("e", Some(65536), true)?;
                tx.merge_bitmap("e", "a")
            }),
        ),
        (
            "streamed merges into an empty bitmap on 512 B clusters",
            "cs512.qcow2",
            Box::new(|tx| {
                tx.add("e", Some(512), false)?;
                tx.merge_bitmap("e", "g512")?;
                tx.merge_bitmap("e", "g512")
            }),
        ),
        (
            "8 adds + merges (new refcount blocks)",
            "rc64.qcow2",
            Box::new(|tx| {
                let (bits, gb) = tx.load("b0")?;
                let size = tx.virtual_size();
                for i in 0..8 {
                    let name = format!("n{i}");
                    tx.add(&name, Some(512), true)?;
                    let src = MergeSource {
                        bits: &bits,
                        granularity_bits: gb,
                        virtual_size: size,
                    };
                    tx.merge(&name, &src)?;
                }
                Ok(())
            }),
        ),
        (
            "add + disable",
            "demo.qcow2",
            Box::new(|tx| {
                tx.set_enabled("ckpt-3", false)?;
                tx.add("ckpt-4", None, true)
            }),
        ),
    ];
    let mut report = Vec::new();
    for (label, fx, op) in &ops {
        let before = std::fs::read(fixture(fx)).unwrap();
        let n = crash_everywhere(
            &format!("{label} on {fx}"),
            &before,
            op.as_ref(),
            dir.path(),
        );
        report.push(format!("{label} on {fx}: {n}"));
    }
    eprintln!("crash images checked: {}", report.join(", "));
}

/// Crash injection over `repair`'s writes: every outcome opens, `qemu-img
/// check` exits 0 or 3, the healthy bitmap is untouched, and each repaired
/// bitmap is either still in-use (old) or consistent and fully dirty (new).
#[test]
fn a_crash_during_repair_leaves_an_openable_image() {
    use qcow2_bitmap::read::BitmapState;
    use qcow2_bitmap::write::repair::{InUsePolicy, repair};
    if !qemu_available(
        "a_crash_during_repair_leaves_an_openable_image",
        &["qemu-img"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut tried = 0;
    for (fx, healthy) in [
        ("inuse.qcow2", Some("d")),
        ("stale.qcow2", None),
        ("tail-bits.qcow2", Some("tail-none")),
    ] {
        let before = std::fs::read(fixture(fx)).unwrap();
        let guest = guest_fingerprint(&before);
        let clean = CrashStore::new(before.clone(), None);
        repair(clean.clone(), InUsePolicy::Dirty).unwrap();
        let total = clean.ops();
        let healthy_bits = healthy.map(|h| {
            let img = Image::open(before.clone()).unwrap();
            img.load(img.find(h).unwrap(), false).unwrap()
        });
        for k in 1..=total {
            let store = CrashStore::new(before.clone(), Some(k));
            assert!(
                repair(store.clone(), InUsePolicy::Dirty).is_err(),
                "{fx}: crash at {k} not reported"
            );
            for (kind, image) in [("durable", store.durable()), ("live", store.live())] {
                let what = format!("repair of {fx}: crash at operation {k}/{total} ({kind})");
                let img = Image::open(image.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(guest_fingerprint(&image), guest, "{what}: guest data");
                for b in img.bitmaps() {
                    let st = img.status(b);
                    let full = st.dirty_bytes == Some(img.virtual_size());
                    let ok = st.state != BitmapState::Invalid
                        && (st.state != BitmapState::Ok
                            || full
                            || Some(b.name().as_str()) == healthy
                            || fx == "tail-bits.qcow2");
                    assert!(ok, "{what}: bitmap {} is {:?}", b.name(), st);
                }
                if let (Some(h), Some(bits)) = (healthy, &healthy_bits) {
                    assert!(
                        img.load(img.find(h).unwrap(), false).unwrap() == *bits,
                        "{what}: healthy bitmap {h} changed"
                    );
                }
                let path = dir.path().join("crashed.qcow2");
                std::fs::write(&path, &image).unwrap();
                let (rc, v) = qemu_check(&path);
                assert!(rc == 0 || rc == 3, "{what}: qemu-img check rc {rc}: {v}");
                tried += 1;
            }
        }
    }
    eprintln!("repair crash images checked: {tried}");
}

/// Crash injection over the two write sequences issue #11 added: `remove` of an invalid
/// bitmap (frees decided by the owner walk) and `repair` of a bitmaps extension whose length
/// field is wrong (the header switch rewrites it). Every outcome opens; the other bitmaps are
/// unchanged; either the old state (victim listed, or the length still wrong) or the new one,
/// which `qemu-img check` accepts (exit 0 or 3); no referenced cluster ever loses its refcount.
#[test]
fn a_crash_while_removing_an_invalid_bitmap_or_fixing_the_extension_length() {
    use qcow2_bitmap::read::refcheck::FindingKind;
    use qcow2_bitmap::write::repair::{InUsePolicy, repair};
    if !qemu_available(
        "a_crash_while_removing_an_invalid_bitmap_or_fixing_the_extension_length",
        &["qemu-img"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let corrupt = fixtures_dir().join("corrupt");
    let kept = |bytes: &[u8]| {
        let img = Image::open(bytes.to_vec()).unwrap();
        ["healthy", "other"].map(|n| img.load(img.find(n).unwrap(), false).unwrap())
    };
    let mut tried = 0;
    for (fx, remove) in [
        ("tbl-reserved.qcow2", true),
        ("dir-table-size-512m.qcow2", true),
        ("ext-len-huge.qcow2", false),
    ] {
        let before = std::fs::read(corrupt.join(fx)).unwrap();
        let guest = guest_fingerprint(&before);
        let healthy = kept(&before);
        let apply = |store: CrashStore| -> qcow2_bitmap::Result<()> {
            if remove {
                let mut tx = Transaction::begin(store)?;
                tx.remove(&["victim"])?;
                tx.commit().map(|_| ())
            } else {
                repair(store, InUsePolicy::Dirty).map(|_| ())
            }
        };
        let clean = CrashStore::new(before.clone(), None);
        apply(clean.clone()).unwrap();
        let total = clean.ops();
        assert!(total >= 4, "{fx}: only {total} operations");
        for k in 1..=total {
            let store = CrashStore::new(before.clone(), Some(k));
            assert!(
                apply(store.clone()).is_err(),
                "{fx}: crash at {k} not reported"
            );
            for (kind, image) in [("durable", store.durable()), ("live", store.live())] {
                let what = format!("{fx}: crash at operation {k}/{total} ({kind})");
                let img = Image::open(image.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(guest_fingerprint(&image), guest, "{what}: guest data");
                assert!(kept(&image) == healthy, "{what}: healthy or other changed");
                let old = if remove {
                    img.find("victim").is_ok()
                } else {
                    img.bitmaps_length().is_some()
                };
                let report = img.check().unwrap();
                assert!(
                    !report
                        .refcounts
                        .findings
                        .iter()
                        .any(|f| f.kind == FindingKind::Error),
                    "{what}: a referenced cluster lost its refcount"
                );
                if !old {
                    let path = dir.path().join("crashed.qcow2");
                    std::fs::write(&path, &image).unwrap();
                    let (rc, v) = qemu_check(&path);
                    assert!(rc == 0 || rc == 3, "{what}: qemu-img check rc {rc}: {v}");
                    if !remove {
                        assert_eq!(img.bitmaps().len(), 3, "{what}: bitmaps after the fix");
                    }
                }
                tried += 1;
            }
        }
    }
    eprintln!("crash images checked (remove of an invalid bitmap, extension length): {tried}");
}
