//! Whole-image reading over an in-memory image: `Image::open` on arbitrary
//! bytes, then every library call the read commands make (`info`, `dump`,
//! `extents`, `hash`, `check`; see src/cli/commands.rs, output.rs and
//! integrity.rs), with consistency checks between them:
//!
//! - extents are non-empty, increasing, non-adjacent and inside the range;
//! - for an `ok` bitmap, the extents add up to `status().dirty_bytes`;
//! - when the bitmap is small enough to load, the extents equal the runs of
//!   the loaded bitmap scaled to bytes and clipped to the virtual size;
//! - every error and every finding is one line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_bitmap::format::bitmap_table::TableEntry;
use qcow2_bitmap::read::{BitmapEntry, BitmapState, Extent, Image, Severity, hex};

/// Extents iterated per bitmap and range, as in tests/it/hostile.rs.
const MAX_EXTENTS: usize = 100_000;
/// Bitmaps loaded whole only up to this many bits (load allocates nbits / 8).
const MAX_LOAD_BITS: u64 = 1 << 22;

fn one_line(e: &qcow2_bitmap::Error) {
    let s = e.to_string();
    assert!(!s.contains('\n'), "multi-line error: {s:?}");
}

fn failed<T>(e: &qcow2_bitmap::Error) -> Option<T> {
    one_line(e);
    None
}

/// The extents of `b` in `range`, or `None` when iteration failed or was cut short.
fn extents(
    img: &Image<Vec<u8>>,
    b: &BitmapEntry,
    range: Option<(u64, u64)>,
    force: bool,
) -> Option<Vec<Extent>> {
    let (lo, hi) = match img.check_range(range) {
        Ok(r) => r,
        Err(e) => return failed(&e),
    };
    let it = match img.extents(b, range, force) {
        Ok(it) => it,
        Err(e) => return failed(&e),
    };
    let mut out: Vec<Extent> = Vec::new();
    for e in it.take(MAX_EXTENTS) {
        let e = match e {
            Ok(e) => e,
            Err(e) => return failed(&e),
        };
        assert!(e.length > 0, "empty extent {e:?}");
        assert!(
            e.offset >= lo && e.offset.checked_add(e.length).is_some_and(|end| end <= hi),
            "extent {e:?} outside {lo}..{hi}"
        );
        if let Some(prev) = out.last() {
            assert!(
                prev.end() < e.offset,
                "extents {prev:?} and {e:?} not increasing and apart"
            );
        }
        out.push(e);
    }
    (out.len() < MAX_EXTENTS).then_some(out)
}

fn bitmap(img: &Image<Vec<u8>>, b: &BitmapEntry) {
    // info: status (+ density from the extents), dump: raw table, hash: sha256.
    let status = img.status(b);
    assert_eq!(
        status.state == BitmapState::Ok,
        status.problem.is_none(),
        "{status:?}"
    );
    let _ = (b.name(), b.granularity(), b.unusable_problem());
    match img.find(&b.name()) {
        Ok(found) => assert_eq!(found.entry.name, b.entry.name),
        Err(e) => one_line(&e),
    }
    match img.raw_table(b) {
        Ok(raw) => raw.iter().for_each(|&r| {
            let _ = TableEntry::decode(r, img.geometry());
        }),
        Err(e) => one_line(&e),
    }
    match img.table(b) {
        Ok(t) => {
            let _ = t.bits_per_cluster();
            for k in 0..t.entries.len().min(4) {
                let _ = t.cluster_bits(k);
            }
        }
        Err(e) => one_line(&e),
    }
    for force in [false, true] {
        match img.sha256(b, force) {
            Ok(d) => assert_eq!(hex(&d).len(), 64),
            Err(e) => one_line(&e),
        }
        let Some(all) = extents(img, b, None, force) else {
            continue;
        };
        if !force && let Some(dirty) = status.dirty_bytes {
            let sum: u64 = all.iter().map(|e| e.length).sum();
            assert_eq!(sum, dirty, "extents add up to {sum}, status says {dirty}");
        }
        // A sub-range: the same extents clipped to it.
        let size = img.virtual_size();
        let (lo, hi) = (size / 3, size - size / 5);
        if let Some(part) = extents(img, b, Some((lo, hi - lo)), force) {
            let clipped: Vec<Extent> = all
                .iter()
                .filter(|e| e.end() > lo && e.offset < hi)
                .map(|e| {
                    let (s, t) = (e.offset.max(lo), e.end().min(hi));
                    Extent {
                        offset: s,
                        length: t - s,
                    }
                })
                .collect();
            assert_eq!(
                part, clipped,
                "extents of {lo}..{hi} differ from the clipped whole"
            );
        }
        // The loaded bitmap's runs are the extents.
        let Ok(t) = img.table(b) else { continue };
        if t.nbits > MAX_LOAD_BITS {
            continue;
        }
        match img.load(b, force) {
            Ok(bm) => {
                let g = t.granularity_bits;
                let runs: Vec<Extent> = bm
                    .runs()
                    .filter_map(|r| {
                        let s = r.start.checked_shl(g)?;
                        let e = r.end.checked_shl(g).unwrap_or(u64::MAX).min(size);
                        (s < e).then(|| Extent {
                            offset: s,
                            length: e - s,
                        })
                    })
                    .collect();
                assert_eq!(all, runs, "extents differ from the loaded bitmap's runs");
            }
            Err(e) => one_line(&e),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let img = match Image::open(data.to_vec()) {
        Ok(img) => img,
        Err(e) => return one_line(&e),
    };
    // info / dump: header, extensions, the bitmaps view.
    let h = img.header();
    let _ = (
        h.refcount_bits(),
        h.compression_type(),
        img.geometry().cluster_size(),
    );
    let _ = (
        img.bitmaps_consistent(),
        img.end_marker(),
        img.virtual_size(),
    );
    for x in img.extensions() {
        let _ = x.kind_name();
    }
    if let Some(e) = &img.bitmaps_view().problem {
        one_line(e);
    }
    for b in img.bitmaps().iter().take(64) {
        bitmap(&img, b);
    }
    // check.
    match img.check() {
        Ok(r) => {
            let v = r.verdict();
            let _ = v.exit_code();
            for f in &r.findings {
                assert!(
                    !f.message.contains('\n'),
                    "multi-line finding: {:?}",
                    f.message
                );
            }
            let _ = (r.count(Severity::Leak), r.refcounts.image_end_offset);
        }
        Err(e) => one_line(&e),
    }
});
