//! Hostile input smoke test: mutate real fixtures (bit flips, field
//! overwrites at structure boundaries, truncations) and require that the
//! library never panics and the binary never exits 101.

use crate::util::*;
use proptest::prelude::*;
use qcow2_bitmap::read::Image;

/// Fixtures whose structures sit in the first few clusters, where mutations bite.
const SEEDS: [&str; 6] = [
    "cs512.qcow2",
    "several.qcow2",
    "allones.qcow2",
    "tail-bits.qcow2",
    "inuse.qcow2",
    "one.qcow2",
];

/// Everything a read command does with an image.
fn exercise(bytes: Vec<u8>) {
    let Ok(img) = Image::open(bytes) else { return };
    for b in img.bitmaps() {
        let _ = img.status(b);
        let _ = img.sha256(b, true);
        let _ = img.raw_table(b);
        if let Ok(it) = img.extents(b, None, true) {
            for e in it.take(100_000) {
                if e.is_err() {
                    break;
                }
            }
        }
    }
}

/// Interesting offsets: header fields, the extension area, the directory, tables.
fn hot_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut v: Vec<usize> = (0..112).step_by(4).collect();
    v.extend([0x48, 0x58, 0x5f, 0x60, 0x64]);
    if let Ok(img) = Image::open(bytes.to_vec()) {
        for e in img.extensions() {
            v.extend([
                e.offset as usize,
                e.offset as usize + 4,
                e.offset as usize + 8,
                e.offset as usize + 16,
                e.offset as usize + 24,
            ]);
        }
        for b in img.bitmaps() {
            let o = b.entry.offset as usize;
            v.extend([o, o + 8, o + 12, o + 16, o + 17, o + 18, o + 20, o + 24]);
            v.push(b.entry.table_offset as usize);
        }
    }
    v.retain(|&o| o < bytes.len());
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_fixtures_never_panic(seed in 0usize..SEEDS.len(), picks in prop::collection::vec((any::<usize>(), any::<u64>(), 0u8..4), 1..6)) {
        let mut bytes = std::fs::read(fixture(SEEDS[seed])).unwrap();
        let hot = hot_offsets(&bytes);
        for (pick, value, how) in picks {
            let at = hot[pick % hot.len()];
            if at >= bytes.len() {
                continue;
            }
            match how {
                0 => bytes[at] ^= 1 << (value % 8),
                1 => {
                    let end = (at + 8).min(bytes.len());
                    let v = value.to_be_bytes();
                    bytes[at..end].copy_from_slice(&v[..end - at]);
                }
                2 => bytes[at] = value as u8,
                _ => bytes.truncate(at.max(1)),
            }
        }
        exercise(bytes);
    }
}

#[test]
fn binary_never_panics_on_mutated_images() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read(fixture("several.qcow2")).unwrap();
    let hot = hot_offsets(&base);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..40 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut bytes = base.clone();
        let at = hot[(state as usize) % hot.len()];
        bytes[at] ^= (state >> 32) as u8 | 1;
        let p = dir.path().join(format!("m{i}.qcow2"));
        std::fs::write(&p, &bytes).unwrap();
        let p = p.to_str().unwrap();
        for args in [
            vec!["info", p],
            vec!["info", "--json", p],
            vec!["dump", "--json", p, "--bitmap", "a"],
            vec!["extents", "--force", p, "a"],
            vec!["hash", "--force", p, "b"],
        ] {
            let o = run(&args);
            let code = o.status.code();
            assert!(
                code == Some(0) || code == Some(1),
                "{args:?} at byte {at}: exit {code:?}: {}",
                stderr(&o)
            );
            if code == Some(1) {
                assert_eq!(stderr(&o).lines().count(), 1, "{args:?}: {}", stderr(&o));
            }
        }
    }
}
