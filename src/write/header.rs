//! Rebuilding the start of cluster 0 (header + header extension area) with a
//! new bitmaps extension: the commit point of every write.
//!
//! Everything but the bitmaps extension is kept verbatim and in order
//! (unknown extensions included). A new bitmaps extension goes where QEMU
//! puts it: after the extensions QEMU writes first, before unknown ones.
//! Autoclear bit 0 is set iff the extension is present; unknown autoclear
//! bits are cleared, as the spec requires of any writer. The result must end
//! before the backing file name (or the end of cluster 0): if it does not
//! fit, that is an error, never a truncation.

use crate::error::{Error, ErrorKind, Result};
use crate::format::autoclear;
use crate::format::be::Put;
use crate::format::bitmaps_ext::BitmapsExt;
use crate::format::ext_type;
use crate::format::extensions::{self, Extension};
use crate::format::header::Header;

/// Extension types QEMU writes before the bitmaps extension.
const BEFORE_BITMAPS: [u32; 4] = [
    ext_type::BACKING_FORMAT,
    ext_type::DATA_FILE,
    ext_type::CRYPTO,
    ext_type::FEATURE_TABLE,
];

/// The new bytes of cluster 0 from offset 0, long enough to also zero what is
/// left of the old extension area (`old_area_end`), and never past
/// `header.extensions_end()`.
///
/// # Errors
/// `Unsupported` when the header and extensions do not fit in the area.
pub fn encode_cluster0(
    header: &Header,
    exts: &[Extension],
    bitmaps: Option<BitmapsExt>,
    old_area_end: u64,
) -> Result<Vec<u8>> {
    let mut h = header.clone();
    let known = autoclear::BITMAPS | autoclear::RAW_DATA;
    h.autoclear_features &= known;
    if bitmaps.is_some() {
        h.autoclear_features |= autoclear::BITMAPS;
    } else {
        h.autoclear_features &= !autoclear::BITMAPS;
    }
    let mut p = Put::new();
    h.encode(&mut p);
    extensions::encode_area(&with_bitmaps(exts, bitmaps), &mut p);
    let limit = header.extensions_end();
    if p.len() as u64 > limit {
        let msg = format!(
            "header and extensions need {} bytes but only {limit} are available before {}",
            p.len(),
            if header.backing_file_offset != 0 {
                "the backing file name"
            } else {
                "the end of cluster 0"
            }
        );
        return Err(Error::new(
            ErrorKind::Unsupported,
            "header extension area",
            Some(0),
            msg,
        ));
    }
    let mut bytes = p.into_vec();
    let zero_to = old_area_end.min(limit) as usize;
    if bytes.len() < zero_to {
        bytes.resize(zero_to, 0);
    }
    Ok(bytes)
}

/// The extension list with the bitmaps extension replaced, inserted or dropped.
fn with_bitmaps(exts: &[Extension], bitmaps: Option<BitmapsExt>) -> Vec<Extension> {
    let new = bitmaps.map(|b| {
        let mut p = Put::new();
        b.encode(&mut p);
        Extension {
            kind: ext_type::BITMAPS,
            offset: 0,
            data: p.into_vec(),
            padding_is_zero: true,
        }
    });
    let mut out: Vec<Extension> = Vec::with_capacity(exts.len() + 1);
    let mut placed = false;
    for e in exts {
        if e.kind == ext_type::BITMAPS {
            if let (Some(n), false) = (&new, placed) {
                out.push(n.clone());
                placed = true;
            }
            continue;
        }
        if !placed && !BEFORE_BITMAPS.contains(&e.kind) {
            if let Some(n) = &new {
                out.push(n.clone());
                placed = true;
            }
        }
        out.push(e.clone());
    }
    if let (Some(n), false) = (new, placed) {
        out.push(n);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::extensions::decode_area;

    fn header() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 9,
            size: 1 << 20,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 0x600,
            refcount_table_offset: 0x200,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0x1 | 0x8,
            refcount_order: 4,
            header_length: 112,
            tail: vec![0; 8],
        }
    }

    fn ext(kind: u32, data: &[u8]) -> Extension {
        Extension {
            kind,
            offset: 0,
            data: data.to_vec(),
            padding_is_zero: true,
        }
    }

    fn bm(n: u32) -> BitmapsExt {
        BitmapsExt {
            nb_bitmaps: n,
            reserved: 0,
            directory_size: 32,
            directory_offset: 0x1000,
        }
    }

    fn kinds(bytes: &[u8]) -> Vec<u32> {
        let h = Header::decode(bytes).unwrap();
        decode_area(&bytes[112..], 112)
            .unwrap()
            .extensions
            .iter()
            .map(|e| e.kind)
            .collect::<Vec<_>>()
            .into_iter()
            .chain(std::iter::once(h.autoclear_features as u32))
            .collect()
    }

    #[test]
    fn replaces_in_place_and_keeps_unknown_order() {
        let exts = vec![
            ext(ext_type::FEATURE_TABLE, &[0; 48]),
            ext(ext_type::BITMAPS, &[0; 24]),
            ext(0x1111_1111, b"x"),
            ext(0x2222_2222, b"y"),
        ];
        let b = encode_cluster0(&header(), &exts, Some(bm(2)), 0).unwrap();
        // Unknown autoclear bit 3 cleared, bit 0 set.
        assert_eq!(
            kinds(&b),
            vec![
                ext_type::FEATURE_TABLE,
                ext_type::BITMAPS,
                0x1111_1111,
                0x2222_2222,
                1
            ]
        );
    }

    #[test]
    fn inserts_before_unknown_and_drops_with_bit_cleared() {
        let exts = vec![
            ext(ext_type::BACKING_FORMAT, b"qcow2"),
            ext(0x1111_1111, b"x"),
        ];
        let b = encode_cluster0(&header(), &exts, Some(bm(1)), 0).unwrap();
        assert_eq!(
            kinds(&b),
            vec![ext_type::BACKING_FORMAT, ext_type::BITMAPS, 0x1111_1111, 1]
        );
        let exts = vec![ext(ext_type::BITMAPS, &[0; 24]), ext(0x1111_1111, b"x")];
        let b = encode_cluster0(&header(), &exts, None, 300).unwrap();
        assert_eq!(kinds(&b), vec![0x1111_1111, 0]);
        assert_eq!(b.len(), 300, "old area is zeroed");
        assert!(b[112 + 16 + 8..].iter().all(|&x| x == 0));
    }

    #[test]
    fn refuses_when_the_area_is_full() {
        let mut h = header();
        h.backing_file_offset = 200;
        let exts = vec![ext(0x1111_1111, &[7; 60])];
        let e = encode_cluster0(&h, &exts, Some(bm(1)), 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "header extension area at offset 0 (0x0): header and extensions need 224 bytes but only 200 are available before the backing file name"
        );
        assert!(encode_cluster0(&h, &exts, None, 0).is_ok());
    }
}
