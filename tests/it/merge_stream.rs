//! A merge into an empty target on a 16 TiB image (64 KiB clusters, a dense 64 KiB-granularity
//! source: 512 data clusters, 32 MiB) streams: the new data clusters are one run written in
//! 4 MiB writes computed from the source at commit time, the commit syncs once per protocol
//! step (3 syncs), and the binary's peak RSS stays under 16 MiB. QEMU checks the result.

use crate::util::*;
use qcow2_bitmap::bits::Bitmap;
use qcow2_bitmap::read::{Image, hex};
use qcow2_bitmap::write::{MergeSource, Transaction};
use std::path::Path;
use std::process::Command;

const TIB16: u64 = 16 << 40;

/// A 16 TiB image with `p00`, every one of its 512 data clusters holding bits, and an empty `e`.
fn build(path: &Path) {
    let o = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=64k"])
        .arg(path)
        .arg(TIB16.to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "qemu-img create: {o:?}");
    let nbits = TIB16 >> 16;
    let mut words = vec![0u64; (nbits / 64) as usize];
    let mut seed = 0x006d_6572_6765_u64;
    for (i, w) in words.iter_mut().enumerate() {
        // Every cluster gets bits; about a quarter of the words are dirty.
        if i % 4 == 0 || i % 8192 == 1 {
            *w = splitmix64(&mut seed);
        }
    }
    let bits = Bitmap::from_words(words, nbits);
    let mut tx = qcow2_bitmap::write::open_path(path).unwrap();
    tx.add("p00", Some(65536), true).unwrap();
    let src = MergeSource {
        bits: &bits,
        granularity_bits: 16,
        virtual_size: TIB16,
    };
    tx.merge("p00", &src).unwrap();
    tx.add("e", Some(65536), true).unwrap();
    tx.commit().unwrap();
}

#[test]
fn merge_into_an_empty_target_streams_in_few_large_writes() {
    if !qemu_available(
        "merge_into_an_empty_target_streams_in_few_large_writes",
        &["qemu-img"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("16t.qcow2");
    build(&img);
    let before = std::fs::read(&img).unwrap();

    // The write sequence, counted on a storage double.
    let store = CrashStore::new(before.clone(), None);
    let mut tx = Transaction::begin(store.clone()).unwrap();
    tx.merge_bitmap("e", "p00").unwrap();
    tx.commit().unwrap();
    let (writes, bytes) = store.written();
    let syncs = store.ops() - writes;
    assert!(bytes >= 32 << 20, "{bytes} bytes written");
    assert!(
        writes <= 16,
        "{writes} writes for 32 MiB of new bitmap data (expected 4 MiB runs)"
    );
    assert_eq!(syncs, 3, "one sync per protocol step");
    let after = Image::open(store.live()).unwrap();
    let (e, p) = (after.find("e").unwrap(), after.find("p00").unwrap());
    assert!(after.load(e, false).unwrap() == after.load(p, false).unwrap());

    // The binary: peak RSS and QEMU's verdict.
    let o = Command::new("/usr/bin/time")
        .args(["-f", "%M"])
        .arg(env!("CARGO_BIN_EXE_qcow2-bitmap"))
        .arg("merge")
        .arg(&img)
        .args(["e", "p00"])
        .output()
        .unwrap();
    assert!(o.status.success(), "merge: {}", stderr(&o));
    let rss_kib: u64 = stderr(&o)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("GNU time's %M");
    assert!(
        rss_kib <= 16 << 10,
        "merge into an empty target peaked at {rss_kib} KiB"
    );
    let (rc, v) = qemu_check(&img);
    assert_eq!(rc, 0, "qemu-img check: {v}");
    let merged = Image::open(std::fs::read(&img).unwrap()).unwrap();
    let hash = |n: &str| hex(&merged.sha256(merged.find(n).unwrap(), false).unwrap());
    assert_eq!(hash("e"), hash("p00"));
    eprintln!("merge into an empty target: {writes} writes, {syncs} syncs, peak RSS {rss_kib} KiB");
}

/// The copy path of a merge into an empty target keeps only the source's bits: tail bits
/// stored past the virtual size (tail-bits.qcow2) are not copied, on a byte, a word and a
/// whole-cluster tail.
#[test]
fn merge_into_an_empty_target_drops_the_source_tail_bits() {
    for src in ["tail-byte", "tail-word", "tail-cluster"] {
        let store = std::fs::read(fixture("tail-bits.qcow2")).unwrap();
        let mut tx = Transaction::begin(store).unwrap();
        tx.add("e", Some(512), true).unwrap();
        tx.merge_bitmap("e", src).unwrap();
        let img = Image::open(tx.commit().unwrap()).unwrap();
        let e = img.find("e").unwrap();
        assert!(
            img.lint_bitmaps_of(e).is_empty(),
            "{src}: {:?}",
            img.lint_bitmaps_of(e)
        );
        let s = img.find(src).unwrap();
        assert!(
            img.load(e, false).unwrap() == img.load(s, false).unwrap(),
            "{src}"
        );
    }
}

/// A source data cluster that holds no bit (legal, though QEMU never writes one) copied into an
/// empty target: the copy is planned unread, found all zero when written, and dropped: the
/// target's entry stays "all zeros" and the cluster allocated for it is given back (no leak).
#[test]
fn merge_into_an_empty_target_leaves_all_zero_clusters_unallocated() {
    use qcow2_bitmap::format::bitmap_table::TableEntry;
    use qcow2_bitmap::read::Verdict;
    let mut bytes = std::fs::read(fixture("cs512.qcow2")).unwrap();
    let (zeroed, k) = {
        let img = Image::open(bytes.clone()).unwrap();
        let b = img.find("g512").unwrap();
        let t = img.table(b).unwrap();
        let k = t
            .entries
            .iter()
            .position(|e| matches!(e, TableEntry::Data(_)))
            .expect("a data entry");
        let TableEntry::Data(off) = t.entries[k] else {
            unreachable!()
        };
        (off as usize, k)
    };
    bytes[zeroed..zeroed + 512].fill(0);
    let before = Image::open(bytes.clone()).unwrap();
    assert_eq!(before.check().unwrap().verdict(), Verdict::Clean);
    let mut tx = Transaction::begin(bytes).unwrap();
    tx.add("e", Some(512), true).unwrap();
    tx.merge_bitmap("e", "g512").unwrap();
    let img = Image::open(tx.commit().unwrap()).unwrap();
    let e = img.find("e").unwrap();
    assert_eq!(img.raw_table(e).unwrap()[k], 0, "entry {k} of e");
    assert!(img.load(e, false).unwrap() == img.load(img.find("g512").unwrap(), false).unwrap());
    let report = img.check().unwrap();
    assert_eq!(report.verdict(), Verdict::Clean, "{:?}", report.findings);
}
