//! Regressions for what the cargo-fuzz targets (`fuzz/`) found, one test per
//! finding, each built from fixtures (patched in memory) so that nothing
//! here depends on `fuzz/`.

use crate::util::fixture;
use qcow2_bitmap::read::Image;
use qcow2_bitmap::write::repair::{self, InUsePolicy};

fn one_line(what: &str, s: &str) {
    assert!(!s.contains('\n'), "{what} is not one line: {s:?}");
}

/// `fixtures/<name>` with the first byte of every bitmap name replaced.
fn with_name_byte(name: &str, byte: u8) -> Vec<u8> {
    let mut bytes = std::fs::read(fixture(name)).unwrap();
    let img = Image::open(bytes.clone()).unwrap();
    let at: Vec<usize> = img
        .bitmaps()
        .iter()
        .map(|b| (b.entry.offset + 24) as usize + b.entry.extra_data.len())
        .collect();
    assert!(!at.is_empty(), "{name} has no bitmaps");
    for a in at {
        bytes[a] = byte;
    }
    bytes
}

/// image target, crash-25c9f456: a bitmap name holding a newline made
/// `check`'s "cluster … is shared" finding (and every other message naming
/// the bitmap) span two lines. Names are now displayed with control
/// characters escaped.
#[test]
fn control_characters_in_names_keep_messages_one_line() {
    for fixture in [
        "inuse.qcow2",
        "corrupt/tbl-past-eof.qcow2",
        "corrupt/shared-data.qcow2",
    ] {
        let bytes = with_name_byte(fixture, b'\n');
        let img = Image::open(bytes.clone()).unwrap();
        for b in img.bitmaps() {
            assert!(
                b.display_name().starts_with("\\n"),
                "{fixture}: {:?}",
                b.display_name()
            );
            if let Some(p) = img.status(b).problem {
                one_line("status problem", &p);
            }
            if let Err(e) = img.extents(b, None, false) {
                one_line("extents error", &e.to_string());
            }
            if let Err(e) = img.raw_table(b) {
                one_line("raw_table error", &e.to_string());
            }
        }
        for f in img.check().unwrap().findings {
            one_line("check finding", &f.message);
        }
        let (_, report) = repair::repair(bytes, InUsePolicy::Dirty).unwrap();
        for a in report.actions {
            one_line("repair action", &a.message);
        }
    }
}

/// directory target, crash-0288b9f5: `DirEntry::problems` added a field's
/// position to the entry's file offset unchecked, so a directory decoded at
/// an offset near `u64::MAX` (possible through the public `directory::walk`,
/// not from a file) overflowed. Offsets now saturate, as `Cursor` does.
#[test]
fn entry_problems_at_the_top_of_the_offset_range() {
    use qcow2_bitmap::format::directory;
    use qcow2_bitmap::types::Geometry;
    // One entry: table_offset 0, table_size 0, flags 0xff.., type 0, name "x".
    let mut dir = vec![0u8; 32];
    dir[12..16].copy_from_slice(&[0xff; 4]);
    dir[19] = 1;
    dir[24] = b'x';
    let walked = directory::walk(&dir, u64::MAX - 8, 1);
    assert!(walked.problem.is_none(), "{:?}", walked.problem);
    let problems = walked.entries[0].problems(Geometry::clamped(16), 1 << 30);
    assert!(!problems.is_empty());
    for p in problems {
        one_line("problem", &p.message);
        assert!(p.offset >= u64::MAX - 8, "{p:?}");
    }
}

/// Added while diagnosing repair crash-ad37f645 (not a crash of its own): a
/// referenced cluster with refcount 0 (a refcount error outside the bitmaps)
/// looks free to the allocator, so a rewrite could put new bitmap clusters
/// over it; repair went ahead. It now refuses while such a cluster exists.
#[test]
fn repair_refuses_when_a_referenced_cluster_has_refcount_zero() {
    use qcow2_bitmap::read::refcheck::Owner;
    let mut bytes = std::fs::read(fixture("corrupt/ext-reserved.qcow2")).unwrap();
    let img = Image::open(bytes.clone()).unwrap();
    let h = img.header().clone();
    assert_eq!(
        h.refcount_order, 4,
        "the patch below writes 16-bit refcounts"
    );
    let report = img.check().unwrap();
    let map = &report.refcounts.map;
    // The last guest data (or L2) cluster: the first fit the allocator would reach.
    let victim = (0..map.len())
        .rev()
        .find(|&c| {
            map.owners(c)
                .iter()
                .any(|o| matches!(o, Owner::Data | Owner::L2))
        })
        .expect("a guest data or L2 cluster");
    let cluster = img.geometry().cluster_size();
    let rt = h.refcount_table_offset as usize;
    let block = u64::from_be_bytes(bytes[rt..rt + 8].try_into().unwrap()) as usize;
    assert!(
        victim < cluster / 2,
        "victim outside the first refcount block"
    );
    let at = block + 2 * victim as usize;
    bytes[at..at + 2].copy_from_slice(&[0, 0]);

    let img = Image::open(bytes.clone()).unwrap();
    let e = repair::repair_dry_run(&img, InUsePolicy::Dirty).unwrap_err();
    one_line("dry-run error", &e.to_string());
    assert!(e.to_string().contains("refcount 0"), "{e}");
    let e = repair::repair(bytes, InUsePolicy::Dirty).unwrap_err();
    assert!(e.to_string().contains(&format!("cluster {victim} ")), "{e}");
}

/// repair target, crash-ad37f645: an L1 entry pointed at
/// the refcount table as if it were an L2 table, so the refcount updates
/// and header switch of the rewrite changed "guest data" mappings, and the
/// new directory ended up mapped as guest data. Repair now refuses while a
/// header or refcount cluster is also used as something other than a bitmap.
#[test]
fn repair_refuses_when_refcount_structures_are_shared() {
    let mut bytes = std::fs::read(fixture("corrupt/ext-reserved.qcow2")).unwrap();
    let h = Image::open(bytes.clone()).unwrap().header().clone();
    let l1 = h.l1_table_offset as usize;
    let entry = (1u64 << 63) | h.refcount_table_offset;
    bytes[l1..l1 + 8].copy_from_slice(&entry.to_be_bytes());
    let img = Image::open(bytes.clone()).unwrap();
    let e = repair::repair_dry_run(&img, InUsePolicy::Dirty).unwrap_err();
    one_line("dry-run error", &e.to_string());
    assert!(
        e.to_string()
            .contains("cluster 1 is used as L2 and RefcountTable"),
        "{e}"
    );
    let e = repair::repair(bytes, InUsePolicy::Remove).unwrap_err();
    assert!(e.to_string().contains("could overwrite it"), "{e}");
}

/// repair target, crash-9303efae: guest data pointing into the bitmap
/// directory's cluster was reported by `check` ("shared between guest data
/// and the bitmap directory") but repair planned nothing for it and left the
/// image corrupt. Repair now writes the directory to new clusters.
#[test]
fn repair_moves_a_directory_shared_with_guest_data() {
    use qcow2_bitmap::read::Verdict;
    use qcow2_bitmap::read::refcheck::Owner;
    let mut bytes = std::fs::read(fixture("corrupt/src512.qcow2")).unwrap();
    let img = Image::open(bytes.clone()).unwrap();
    let dir = img.bitmaps_view().extension.unwrap().0.directory_offset;
    let map = img.check().unwrap().refcounts.map;
    let l2 = (0..map.len())
        .find(|&c| map.owners(c).contains(&Owner::L2))
        .expect("an L2 table");
    // Its last entry (unused in this small image) now maps the directory's cluster.
    let at = ((l2 + 1) * img.geometry().cluster_size() - 8) as usize;
    assert_eq!(&bytes[at..at + 8], &[0; 8], "last L2 entry in use");
    bytes[at..at + 8].copy_from_slice(&((1u64 << 63) | dir).to_be_bytes());
    let before = Image::open(bytes.clone()).unwrap().check().unwrap();
    assert!(
        before
            .findings
            .iter()
            .any(|f| f.message.contains("bitmap directory"))
    );

    let (out, report) = repair::repair(bytes, InUsePolicy::Dirty).unwrap();
    let after = Image::open(out).unwrap().check().unwrap();
    assert_eq!(
        after.verdict(),
        Verdict::Clean,
        "{:#?}\n{:#?}",
        report.actions,
        after.findings
    );
    assert!(report.clean);
}

/// repair target, crash-d89b86a9: a bitmap with bits past the virtual size
/// whose first data cluster was also another bitmap's table got only its
/// last cluster rewritten (RewriteTail won over Unshare), so the clusters
/// stayed shared. Unshare (which also drops the tail bits) now wins.
#[test]
fn repair_unshares_a_bitmap_that_also_has_tail_bits() {
    use qcow2_bitmap::read::Verdict;
    let mut bytes = std::fs::read(fixture("corrupt/tail-bits.qcow2")).unwrap();
    let img = Image::open(bytes.clone()).unwrap();
    let healthy = img.find("healthy").unwrap().entry.table_offset;
    let victim = img.find("victim").unwrap().entry.table_offset as usize;
    bytes[victim..victim + 8].copy_from_slice(&healthy.to_be_bytes());
    let before = Image::open(bytes.clone()).unwrap().check().unwrap();
    assert!(
        before
            .findings
            .iter()
            .any(|f| f.message.contains("is shared between"))
    );
    assert!(
        before
            .findings
            .iter()
            .any(|f| f.message.contains("past the virtual size"))
    );

    let (out, report) = repair::repair(bytes, InUsePolicy::Dirty).unwrap();
    let after = Image::open(out).unwrap().check().unwrap();
    assert_eq!(
        after.verdict(),
        Verdict::Clean,
        "{:#?}\n{:#?}",
        report.actions,
        after.findings
    );
}

/// repair target, crash-ff023255: guest data pointing just past the end of the
/// file is not counted by the walk (as in QEMU), so nothing stopped the
/// rewrite from appending a new bitmap table exactly there. Repair now
/// refuses while guest data or metadata points past the end of the file.
#[test]
fn repair_refuses_when_guest_data_points_past_the_end() {
    use qcow2_bitmap::read::refcheck::Owner;
    let mut bytes = std::fs::read(fixture("corrupt/inuse-flag.qcow2")).unwrap();
    let img = Image::open(bytes.clone()).unwrap();
    let map = img.check().unwrap().refcounts.map;
    let cluster = img.geometry().cluster_size();
    let l2 = (0..map.len())
        .find(|&c| map.owners(c).contains(&Owner::L2))
        .expect("an L2 table");
    let at = ((l2 + 1) * cluster - 8) as usize;
    assert_eq!(&bytes[at..at + 8], &[0; 8], "last L2 entry in use");
    let eof = (bytes.len() as u64).next_multiple_of(cluster);
    bytes[at..at + 8].copy_from_slice(&((1u64 << 63) | eof).to_be_bytes());
    let img = Image::open(bytes.clone()).unwrap();
    assert_eq!(
        img.check().unwrap().refcounts.referenced_past_eof,
        Some(eof)
    );
    let e = repair::repair_dry_run(&img, InUsePolicy::Dirty).unwrap_err();
    one_line("dry-run error", &e.to_string());
    let e = repair::repair(bytes, InUsePolicy::Dirty).unwrap_err();
    assert!(e.to_string().contains("past the end of the file"), "{e}");
}

/// repair target, crash-6b557e3b: a bitmap whose table entry pointed at its
/// own table cluster ("shared between the table of bitmap 'healthy' and data
/// of bitmap 'healthy'") was kept as is. It now gets its own copies.
#[test]
fn repair_unshares_a_table_that_is_also_its_own_data() {
    use qcow2_bitmap::read::Verdict;
    let mut bytes = std::fs::read(fixture("corrupt/tail-bits.qcow2")).unwrap();
    let img = Image::open(bytes.clone()).unwrap();
    let t = img.find("healthy").unwrap().entry.table_offset;
    bytes[t as usize..t as usize + 8].copy_from_slice(&t.to_be_bytes());
    let before = Image::open(bytes.clone()).unwrap().check().unwrap();
    assert!(
        before
            .findings
            .iter()
            .any(|f| f.message.contains("data of bitmap 'healthy'"))
    );

    let (out, report) = repair::repair(bytes, InUsePolicy::Dirty).unwrap();
    let after = Image::open(out).unwrap().check().unwrap();
    assert_eq!(
        after.verdict(),
        Verdict::Clean,
        "{:#?}\n{:#?}",
        report.actions,
        after.findings
    );
}

/// Left open by the fuzzing session, closed here: the human output of
/// `info` (table and density picture), `check`, `dump` and `repair` printed
/// raw names, so a newline in a name broke their lines. Every line printed
/// now belongs to the layout: no line starts with the name's second half.
#[test]
fn control_characters_in_names_stay_escaped_in_human_output() {
    let dir = tempfile::tempdir().unwrap();
    for fixture in ["inuse.qcow2", "several.qcow2", "corrupt/shared-data.qcow2"] {
        let mut bytes = with_name_byte(fixture, b'\n');
        // The name's first byte is now a newline: make the rest recognisable.
        let img = Image::open(bytes.clone()).unwrap();
        for b in img.bitmaps() {
            let at = (b.entry.offset + 25) as usize + b.entry.extra_data.len();
            let n = b.entry.name.len().saturating_sub(1).min(6);
            bytes[at..at + n].copy_from_slice(&b"FORGED"[..n]);
        }
        let path = dir.path().join("evil.qcow2");
        std::fs::write(&path, &bytes).unwrap();
        let p = path.to_str().unwrap();
        for args in [
            vec!["info", p],
            vec!["check", p],
            vec!["dump", p],
            vec!["repair", "--dry-run", p],
        ] {
            let out = crate::util::run(&args);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            for line in text.lines() {
                assert!(
                    !line.trim_start().starts_with("FORG"),
                    "{fixture}: {args:?}: a name broke a line:\n{text}"
                );
            }
            assert!(
                text.contains("\\n"),
                "{fixture}: {args:?}: name not shown escaped:\n{text}"
            );
        }
    }
}
