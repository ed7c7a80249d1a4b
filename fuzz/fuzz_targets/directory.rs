//! Bitmap directory decoding: `directory::walk` over arbitrary bytes, the
//! per-entry rules (`DirEntry::problems`) under an arbitrary geometry and
//! virtual size, and encode -> walk round trips of the entries read.
//!
//! Input layout: byte 0 cluster_bits, bytes 1..9 virtual size, bytes 9..13
//! nb_bitmaps, bytes 13..21 directory offset, the rest the directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_bitmap::format::be::Put;
use qcow2_bitmap::format::directory;
use qcow2_bitmap::types::Geometry;

fuzz_target!(|data: &[u8]| {
    if data.len() < 21 {
        return;
    }
    let geometry = Geometry::clamped(u32::from(data[0]));
    let size = u64::from_be_bytes(data[1..9].try_into().unwrap());
    let nb = u32::from_be_bytes(data[9..13].try_into().unwrap());
    let offset = u64::from_be_bytes(data[13..21].try_into().unwrap());
    let dir = &data[21..];
    let walked = directory::walk(dir, offset, nb);
    if let Some(e) = &walked.problem {
        let s = e.to_string();
        assert!(!s.contains('\n'), "multi-line error: {s:?}");
    }
    let mut consumed = 0usize;
    for e in &walked.entries {
        let _ = (e.name_lossy(), e.granularity(), e.in_use(), e.auto());
        for p in e.problems(geometry, size) {
            assert!(
                !p.message.contains('\n'),
                "multi-line problem: {:?}",
                p.message
            );
        }
        consumed += e.encoded_len();
    }
    assert!(consumed <= dir.len(), "entries longer than the directory");
    // Round trip: the entries re-encoded walk back to themselves.
    let mut p = Put::new();
    directory::encode(&walked.entries, &mut p);
    let bytes = p.into_vec();
    assert_eq!(bytes.len(), consumed, "encoded directory length");
    let back = directory::walk(&bytes, offset, walked.entries.len() as u32);
    assert!(
        back.problem.is_none(),
        "re-walk problem: {:?}",
        back.problem
    );
    assert_eq!(back.entries.len(), walked.entries.len());
    for (a, b) in walked.entries.iter().zip(&back.entries) {
        let mut b = b.clone();
        b.padding_is_zero = a.padding_is_zero;
        assert_eq!(*a, b, "directory entry round trip");
    }
});
