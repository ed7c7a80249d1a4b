//! The write path: every operation on every fixture shape, checked by our
//! read path, by QEMU (`qemu-img check`, `qemu-img info`, QMP sha256,
//! `qemu-img compare` for guest data), against `qemu-img bitmap` on a twin,
//! under injected crashes at every write and sync, and for cost (untouched
//! bitmaps keep their bytes; work does not grow with other bitmaps).

use crate::util::*;
use qcow2_bitmap::bits::Bitmap;
use qcow2_bitmap::read::{BitmapState, Image};
use qcow2_bitmap::write::{MergeSource, Transaction};
use std::collections::BTreeMap;

/// Fixtures whose bitmaps are all consistent (write commands accept them).
pub const WRITABLE: [&str; 14] = [
    "one.qcow2",
    "several.qcow2",
    "gran-range.qcow2",
    "cs512.qcow2",
    "rc1.qcow2",
    "rc64.qcow2",
    "cs2m.qcow2",
    "extl2.qcow2",
    "full.qcow2",
    "huge.qcow2",
    "allones.qcow2",
    "unknown-ext.qcow2",
    "backing.qcow2",
    "demo.qcow2",
];

/// Every bitmap's (flags auto, granularity, bits) as our read path sees it.
pub type Snapshot = BTreeMap<String, (bool, u64, Bitmap)>;

pub fn snapshot(bytes: &[u8]) -> Snapshot {
    let img = Image::open(bytes.to_vec()).expect("image opens");
    img.bitmaps()
        .iter()
        .map(|b| {
            assert_eq!(img.status(b).state, BitmapState::Ok, "{}", b.name());
            (
                b.name(),
                (b.entry.auto(), b.granularity(), img.load(b, false).unwrap()),
            )
        })
        .collect()
}

fn commit(
    bytes: Vec<u8>,
    op: impl FnOnce(&mut Transaction<Vec<u8>>) -> qcow2_bitmap::Result<()>,
) -> Vec<u8> {
    let guest = guest_fingerprint(&bytes);
    let mut tx = Transaction::begin(bytes).unwrap();
    op(&mut tx).unwrap();
    let out = tx.commit().unwrap();
    assert_eq!(guest_fingerprint(&out), guest, "guest data changed");
    out
}

/// The names the operations below use on a fixture.
fn first_two(s: &Snapshot) -> (String, String) {
    let mut it = s.keys();
    let a = it.next().unwrap().clone();
    let b = it.next().cloned().unwrap_or_else(|| a.clone());
    (a, b)
}

/// One operation of the sequence, applied both to the image and to the model.
fn apply_step(step: usize, bytes: Vec<u8>, model: &mut Snapshot) -> Vec<u8> {
    let (a, b) = first_two(model);
    match step {
        0 => {
            let out = commit(bytes, |tx| tx.add("added", None, true));
            let img = Image::open(out.clone()).unwrap();
            let e = img.find("added").unwrap();
            let n = qcow2_bitmap::read::expected_dimensions(
                img.virtual_size(),
                u32::from(e.entry.granularity_bits),
                img.geometry(),
            )
            .unwrap()
            .0;
            model.insert("added".into(), (true, e.granularity(), Bitmap::zeros(n)));
            out
        }
        1 => {
            let out = commit(bytes, |tx| {
                let (bits, gb) = tx.load(&a)?;
                let size = tx.virtual_size();
                tx.merge(
                    "added",
                    &MergeSource {
                        bits: &bits,
                        granularity_bits: gb,
                        virtual_size: size,
                    },
                )
            });
            let (ga, src) = (model[&a].1, model[&a].2.clone());
            let tgt = model.get_mut("added").unwrap();
            let r = qcow2_bitmap::bits::resample::resample(
                &src,
                ga.trailing_zeros(),
                tgt.1.trailing_zeros(),
                tgt.2.len(),
            );
            tgt.2.or_assign(&r).unwrap();
            out
        }
        2 => {
            let out = commit(bytes, |tx| tx.set_enabled(&a, false));
            model.get_mut(&a).unwrap().0 = false;
            out
        }
        3 => {
            let out = commit(bytes, |tx| tx.clear(&b));
            let e = model.get_mut(&b).unwrap();
            e.2 = Bitmap::zeros(e.2.len());
            out
        }
        4 => {
            let out = commit(bytes, |tx| tx.set_enabled(&a, true));
            model.get_mut(&a).unwrap().0 = true;
            out
        }
        _ => {
            let out = commit(bytes, |tx| tx.remove(&["added"]));
            model.remove("added");
            out
        }
    }
}

fn assert_model(bytes: &[u8], model: &Snapshot, what: &str) {
    let got = snapshot(bytes);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        model.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (name, (auto, gran, bits)) in model {
        let (gauto, ggran, gbits) = &got[name];
        assert_eq!((gauto, ggran), (auto, gran), "{what}: {name}");
        assert!(
            gbits == bits,
            "{what}: bitmap {name} content differs ({} vs {} bits set)",
            gbits.count_ones(),
            bits.count_ones()
        );
    }
}

#[test]
fn operation_sequence_on_every_writable_fixture_matches_the_model() {
    for name in WRITABLE {
        let mut bytes = std::fs::read(fixture(name)).unwrap();
        let mut model = snapshot(&bytes);
        for step in 0..6 {
            bytes = apply_step(step, bytes, &mut model);
            assert_model(&bytes, &model, &format!("{name} step {step}"));
        }
    }
}

#[test]
fn untouched_bitmaps_keep_their_bytes_in_place() {
    let before = std::fs::read(fixture("several.qcow2")).unwrap();
    let img = Image::open(before.clone()).unwrap();
    let layout: Vec<(String, u64, Vec<u64>)> = img
        .bitmaps()
        .iter()
        .map(|b| (b.name(), b.entry.table_offset, img.raw_table(b).unwrap()))
        .collect();
    let after = commit(before.clone(), |tx| {
        tx.add("new", Some(65536), true)?;
        tx.clear("a")?;
        tx.set_enabled("b", true)
    });
    let img2 = Image::open(after.clone()).unwrap();
    for (name, off, raw) in layout.iter().filter(|l| l.0 != "a") {
        let b = img2.find(name).unwrap();
        assert_eq!(b.entry.table_offset, *off, "{name} table moved");
        assert_eq!(&img2.raw_table(b).unwrap(), raw, "{name} table changed");
        let len = raw.len() * 8;
        assert_eq!(
            after[*off as usize..*off as usize + len],
            before[*off as usize..*off as usize + len]
        );
        for &r in raw {
            let d = (r & 0x00ff_ffff_ffff_fe00) as usize;
            if d != 0 {
                let cs = img2.geometry().cluster_len();
                assert_eq!(
                    after[d..d + cs],
                    before[d..d + cs],
                    "{name} data cluster at {d} changed"
                );
            }
        }
    }
}

#[test]
fn a_new_bitmap_has_only_zero_table_entries() {
    let out = commit(std::fs::read(fixture("huge.qcow2")).unwrap(), |tx| {
        tx.add("n", Some(1024), false)
    });
    let img = Image::open(out).unwrap();
    let b = img.find("n").unwrap();
    assert!(!b.entry.auto());
    let raw = img.raw_table(b).unwrap();
    assert_eq!(raw.len(), 8192);
    assert!(raw.iter().all(|&r| r == 0));
}

#[test]
fn refusals_leave_the_image_untouched() {
    let bytes = std::fs::read(fixture("several.qcow2")).unwrap();
    type Op = Box<dyn Fn(&mut Transaction<Vec<u8>>) -> qcow2_bitmap::Result<()>>;
    let cases: Vec<(&str, Op)> = vec![
        ("already exists", Box::new(|tx| tx.add("a", None, true))),
        ("is empty", Box::new(|tx| tx.add("", None, true))),
        (
            "over the limit of 1023",
            Box::new(|tx| tx.add(&"x".repeat(1024), None, true)),
        ),
        (
            "not a power of two",
            Box::new(|tx| tx.add("g", Some(3000), true)),
        ),
        (
            "not a power of two",
            Box::new(|tx| tx.add("g", Some(256), true)),
        ),
        (
            "not a power of two",
            Box::new(|tx| tx.add("g", Some(4 << 30), true)),
        ),
        ("not found", Box::new(|tx| tx.remove(&["zz"]))),
        ("named twice", Box::new(|tx| tx.remove(&["a", "a"]))),
        ("not found", Box::new(|tx| tx.clear("zz"))),
    ];
    for (want, op) in cases {
        let mut tx = Transaction::begin(bytes.clone()).unwrap();
        let e = op(&mut tx).unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
        assert_eq!(tx.commit().unwrap(), bytes, "{want}: image changed");
    }
    // Too much bitmap: 4 TiB at 512 B granularity.
    let huge = std::fs::read(fixture("huge.qcow2")).unwrap();
    let mut tx = Transaction::begin(huge).unwrap();
    let e = tx.add("big", Some(512), true).unwrap_err().to_string();
    assert!(e.contains("over the 512 MiB limit"), "{e}");
}

#[test]
fn refused_images() {
    for (name, want) in [("v2.qcow2", "version 3"), ("stale.qcow2", "repair")] {
        let e = Transaction::begin(std::fs::read(fixture(name)).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{name}: {e}");
    }
    let inuse = std::fs::read(fixture("inuse.qcow2")).unwrap();
    let guest = guest_fingerprint(&inuse);
    let mut tx = Transaction::begin(inuse).unwrap();
    let e = tx.clear("a").unwrap_err().to_string();
    assert!(e.contains("is in-use; only remove is allowed"), "{e}");
    tx.remove(&["a"]).unwrap();
    let out = tx.commit().unwrap();
    assert_eq!(guest_fingerprint(&out), guest, "guest data changed");
    let img = Image::open(out).unwrap();
    assert!(img.find("a").is_err());
    assert_eq!(img.bitmaps().len(), 3);
}

#[test]
fn removing_the_last_bitmap_drops_the_extension() {
    let out = commit(std::fs::read(fixture("one.qcow2")).unwrap(), |tx| {
        tx.remove(&["b0"])
    });
    let img = Image::open(out).unwrap();
    assert!(img.bitmaps_view().extension.is_none());
    assert_eq!(img.header().autoclear_features & 1, 0);
    let out = commit(std::fs::read(fixture("empty.qcow2")).unwrap(), |tx| {
        tx.add("first", None, true)
    });
    let img = Image::open(out).unwrap();
    assert!(img.bitmaps_consistent());
    assert_eq!(img.find("first").unwrap().granularity(), 65536);
}

#[test]
fn several_operations_in_one_transaction_commit_together() {
    let before = std::fs::read(fixture("cs512.qcow2")).unwrap();
    let old = snapshot(&before);
    let out = commit(before, |tx| {
        tx.add("m", Some(512), false)?;
        for src in ["g4k", "g512"] {
            let (bits, gb) = tx.load(src)?;
            let size = tx.virtual_size();
            tx.merge(
                "m",
                &MergeSource {
                    bits: &bits,
                    granularity_bits: gb,
                    virtual_size: size,
                },
            )?;
        }
        tx.clear("g4k")?;
        tx.set_enabled("g512", false)
    });
    let new = snapshot(&out);
    let mut want = old["g512"].2.clone();
    let r = qcow2_bitmap::bits::resample::resample(&old["g4k"].2, 12, 9, want.len());
    want.or_assign(&r).unwrap();
    assert!(new["m"].2 == want, "m = g512 | g4k");
    assert!(new["m"].2.count_ones() > old["g512"].2.count_ones());
    assert_eq!(new["g4k"].2.count_ones(), 0);
    assert!(!new["g512"].0);
    assert!(new["g512"].2 == old["g512"].2);
}

#[test]
fn merge_from_another_image_via_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let (target, source) = (dir.path().join("t.qcow2"), dir.path().join("s.qcow2"));
    std::fs::copy(fixture("cs512.qcow2"), &target).unwrap();
    std::fs::copy(fixture("cs512.qcow2"), &source).unwrap();
    let (t, s) = (target.to_str().unwrap(), source.to_str().unwrap());
    let (guest, source_bytes) = (
        guest_fingerprint_of(&target),
        std::fs::read(&source).unwrap(),
    );
    let ok = |args: &[&str]| {
        let o = run(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    ok(&["add", "-g", "64K", t, "from-other"]);
    ok(&["merge", "--source-image", s, t, "from-other", "g512", "g4k"]);
    let src = snapshot(&std::fs::read(&source).unwrap());
    let mut want = Bitmap::zeros(src["g512"].2.len().div_ceil(128));
    for (gran_bits, name) in [(9, "g512"), (12, "g4k")] {
        let r = qcow2_bitmap::bits::resample::resample(&src[name].2, gran_bits, 16, want.len());
        want.or_assign(&r).unwrap();
    }
    let got = snapshot(&std::fs::read(&target).unwrap());
    assert!(got["from-other"].2 == want, "merged bits differ");
    assert!(want.count_ones() > 0);
    assert_eq!(guest_fingerprint_of(&target), guest, "guest data changed");
    assert!(
        std::fs::read(&source).unwrap() == source_bytes,
        "the source image changed"
    );
    // Different virtual sizes are refused, the image untouched.
    let other = dir.path().join("o.qcow2");
    std::fs::copy(fixture("several.qcow2"), &other).unwrap();
    let before = std::fs::read(&target).unwrap();
    let o = run(&[
        "merge",
        "--source-image",
        other.to_str().unwrap(),
        t,
        "from-other",
        "a",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("different sizes"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&target).unwrap(), before);
}

/// The guest-data fingerprint the write tests compare sees a changed guest
/// data cluster and a changed L2 entry, and ignores bitmap clusters.
#[test]
fn guest_fingerprint_sees_guest_data_and_ignores_bitmaps() {
    let bytes = std::fs::read(fixture("one.qcow2")).unwrap();
    let base = guest_fingerprint(&bytes);
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    assert_ne!(l2, 0, "one.qcow2 maps its first 512 MiB");
    let (slot, data) = (0..65536 / 8)
        .map(|j| (l2 + 8 * j, be64(&bytes, l2 + 8 * j) & 0x00ff_ffff_ffff_fe00))
        .find(|e| e.1 != 0)
        .expect("one.qcow2 has an allocated guest cluster");
    let mut changed = bytes.clone();
    changed[data as usize + 100] ^= 1;
    assert_ne!(guest_fingerprint(&changed), base, "guest data byte");
    let mut remapped = bytes.clone();
    remapped[slot + 7] ^= 1; // the zero flag of the entry
    assert_ne!(guest_fingerprint(&remapped), base, "L2 entry");
    let img = Image::open(bytes.clone()).unwrap();
    let b = &img.bitmaps()[0];
    let mut bitmap_changed = bytes.clone();
    let table = b.entry.table_offset as usize;
    bitmap_changed[table + 7] ^= 1; // a reserved bit of the bitmap table entry
    for &raw in &img.raw_table(b).unwrap() {
        let d = (raw & 0x00ff_ffff_ffff_fe00) as usize;
        if d != 0 {
            bitmap_changed[d] ^= 0xff;
        }
    }
    assert_ne!(bitmap_changed, bytes);
    assert_eq!(guest_fingerprint(&bitmap_changed), base, "bitmap clusters");
}
