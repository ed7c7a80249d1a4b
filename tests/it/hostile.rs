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

/// Storage that counts the bytes it hands out.
struct Counting {
    bytes: Vec<u8>,
    read: std::sync::atomic::AtomicU64,
}

impl Counting {
    fn take(&self) -> u64 {
        self.read.swap(0, std::sync::atomic::Ordering::Relaxed)
    }
}

impl qcow2_bitmap::storage::ReadAt for Counting {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_at<'a>(
        &'a self,
        offset: u64,
        len: usize,
        scratch: &'a mut Vec<u8>,
    ) -> std::io::Result<&'a [u8]> {
        self.read
            .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
        self.bytes.read_at(offset, len, scratch)
    }
}

/// `huge.qcow2` with its 64 KiB table of `g1k` named by `n` more directory
/// entries (a new directory appended at the end of the file).
fn entries_sharing_one_table(n: usize) -> Vec<u8> {
    let mut bytes = std::fs::read(fixture("huge.qcow2")).unwrap();
    let img = Image::open(bytes.clone()).unwrap();
    let e = img.find("g1k").unwrap().entry.clone();
    let ext = img
        .extensions()
        .iter()
        .find(|x| x.kind == 0x2385_2875)
        .unwrap()
        .offset as usize
        + 8;
    let mut dir = Vec::new();
    for i in 0..n {
        let name = format!("d{i}");
        dir.extend_from_slice(&e.table_offset.to_be_bytes());
        dir.extend_from_slice(&e.table_size.to_be_bytes());
        dir.extend_from_slice(&e.flags.to_be_bytes());
        dir.extend_from_slice(&[e.kind, e.granularity_bits]);
        dir.extend_from_slice(&(name.len() as u16).to_be_bytes());
        dir.extend_from_slice(&0u32.to_be_bytes());
        dir.extend_from_slice(name.as_bytes());
        dir.resize(dir.len().next_multiple_of(8), 0);
    }
    let at = bytes.len().next_multiple_of(65536);
    bytes.resize(at, 0);
    bytes.extend_from_slice(&dir);
    bytes.resize(bytes.len().next_multiple_of(65536), 0);
    bytes[ext..ext + 4].copy_from_slice(&(n as u32).to_be_bytes());
    bytes[ext + 8..ext + 16].copy_from_slice(&(dir.len() as u64).to_be_bytes());
    bytes[ext + 16..ext + 24].copy_from_slice(&(at as u64).to_be_bytes());
    bytes
}

/// 20000 entries naming one 64 KiB table: `check` (bitmap rules and the
/// refcount walk) and `info`'s survey read each distinct table once, so the
/// bytes they read stay a small multiple of the file, not 20000 tables
/// (1.3 GB each). Found by hand: the duplicate-name rule was quadratic and
/// every pass re-read the table per entry (`check` took minutes at 65535
/// entries; `qemu-img check` did not finish in 5 minutes).
#[test]
fn entries_sharing_one_table_are_read_once() {
    let bytes = entries_sharing_one_table(20_000);
    let file_len = bytes.len() as u64;
    let img = Image::open(Counting {
        bytes,
        read: Default::default(),
    })
    .unwrap();
    assert_eq!(img.bitmaps().len(), 20_000);
    img.storage().take();
    let report = img.check().unwrap();
    let check_read = img.storage().take();
    assert!(
        report.refcounts.corruptions > 0,
        "the new directory is not refcounted"
    );
    let survey = img.survey(64);
    let survey_read = img.storage().take();
    let first = img.status(&img.bitmaps()[0]);
    assert!(first.dirty_bytes.unwrap() > 0);
    assert!(survey.iter().all(|s| s.status == first));
    eprintln!(
        "20000 entries on one table, {file_len}-byte file: check read {check_read} bytes, survey {survey_read}"
    );
    assert!(check_read <= 8 * file_len, "check read {check_read} bytes");
    assert!(
        survey_read <= 8 * file_len,
        "survey read {survey_read} bytes"
    );
}
