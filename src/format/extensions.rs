//! The header extension area: `u32 type, u32 length, data, zero padding to 8`,
//! repeated from `header_length` until a type-0 marker or the end of the
//! area (the backing file name, or the end of cluster 0).
//!
//! Every extension is kept verbatim, unknown ones included, in file order.

use super::be::{Cursor, Put};
use super::ext_type;
use crate::error::{Error, Result};

/// One header extension as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type code.
    pub kind: u32,
    /// File offset of the extension's 8-byte type/length header.
    pub offset: u64,
    /// The data (`length` bytes, padding excluded).
    pub data: Vec<u8>,
    /// Whether the padding after the data was all zeros.
    pub padding_is_zero: bool,
}

impl Extension {
    /// A human name for the type.
    pub fn kind_name(&self) -> &'static str {
        kind_name(self.kind)
    }

    /// Bytes this extension occupies including its header and padding.
    pub fn encoded_len(&self) -> usize {
        8 + self.data.len().next_multiple_of(8)
    }

    /// Encodes the extension with zero padding.
    pub fn encode(&self, p: &mut Put) {
        // Data comes from a u32 length on decode; constructors keep it below 4 GiB.
        let len = u32::try_from(self.data.len()).unwrap_or(u32::MAX);
        p.u32(self.kind).u32(len).bytes(&self.data).pad_to(8);
    }
}

/// The name of an extension type code.
pub fn kind_name(kind: u32) -> &'static str {
    match kind {
        ext_type::BACKING_FORMAT => "backing file format",
        ext_type::FEATURE_TABLE => "feature name table",
        ext_type::BITMAPS => "bitmaps",
        ext_type::CRYPTO => "full disk encryption header pointer",
        ext_type::DATA_FILE => "external data file",
        _ => "unknown",
    }
}

/// The walked extension area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionArea {
    /// Extensions in file order (the end marker is not included).
    pub extensions: Vec<Extension>,
    /// File offset of the end marker, or `None` when the area ended without one.
    pub end_marker: Option<u64>,
    /// The first bitmaps extension whose length field is not 24, and how it was read.
    pub bitmaps_length: Option<BitmapsLength>,
}

/// A bitmaps extension whose length field is not the fixed 24.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsLength {
    /// File offset of the extension's type/length header (the length field is 4 bytes on).
    pub offset: u64,
    /// The length field as found.
    pub declared: u32,
    /// How the area was walked past it.
    pub reading: LengthReading,
}

/// How the extension area was walked past a bitmaps extension of the wrong length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LengthReading {
    /// The bytes after 24 bytes of data parse as an extension chain: the
    /// extension was read as its 24 bytes (only the length field is wrong,
    /// rewriting it makes the extension readable).
    Fixed,
    /// Only the declared length leaves a chain that parses: the extension was
    /// read with it (and is unreadable as a bitmaps extension).
    Declared,
    /// Neither reading leaves a chain that parses: the walk stopped at the
    /// bitmaps extension (what follows it is not understood).
    Unparsed,
}

/// Walks the extension area. `area` holds the bytes from file offset `start`
/// up to the end of the area.
///
/// The bitmaps extension has a fixed size, so a bitmaps extension whose
/// length field is not 24 does not stop the walk: it is read as 24 bytes when
/// the rest of the area parses after them, else with its declared length when
/// the rest parses after that, else the walk stops there
/// ([`ExtensionArea::bitmaps_length`] says which).
///
/// # Errors
/// `Corrupt` when any other extension's declared length runs past the area
/// (QEMU: "Header extension too large").
pub fn decode_area(area: &[u8], start: u64) -> Result<ExtensionArea> {
    let mut c = Cursor::new(area, start, "header extension");
    let mut out = ExtensionArea {
        extensions: Vec::new(),
        end_marker: None,
        bitmaps_length: None,
    };
    while c.remaining() >= 8 {
        let offset = c.offset();
        let kind = c.u32("type")?;
        let len = c.u32("length")?;
        if kind == ext_type::END {
            out.end_marker = Some(offset);
            return Ok(out);
        }
        let data = if kind == ext_type::BITMAPS && len as usize != BITMAPS_LEN {
            let at = (offset - start) as usize + 8;
            let (reading, data_len) = bitmaps_reading(area, at, start, len);
            if out.bitmaps_length.is_none() {
                out.bitmaps_length = Some(BitmapsLength {
                    offset,
                    declared: len,
                    reading,
                });
            }
            if reading == LengthReading::Unparsed {
                let data = c.bytes(data_len.min(c.remaining()), "data")?.to_vec();
                out.extensions.push(Extension {
                    kind,
                    offset,
                    data,
                    padding_is_zero: true,
                });
                return Ok(out);
            }
            c.bytes(data_len, "data")?.to_vec()
        } else {
            decode_body(&mut c, kind, len, offset)?
        };
        let data_len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let padding = c.bytes(pad_len(data_len).min(c.remaining()), "padding")?;
        let padding_is_zero = padding.iter().all(|&b| b == 0);
        out.extensions.push(Extension {
            kind,
            offset,
            data,
            padding_is_zero,
        });
    }
    Ok(out)
}

/// Data length of the bitmaps extension itself.
const BITMAPS_LEN: usize = 24;

/// How to read a bitmaps extension of declared length `len` whose data
/// starts at `area[at..]`, and the data length to take.
fn bitmaps_reading(area: &[u8], at: usize, start: u64, len: u32) -> (LengthReading, usize) {
    let parses_after = |data_len: usize| {
        let next = at.checked_add(data_len.next_multiple_of(8));
        next.is_some_and(|n| n <= area.len() && strict_area(&area[n..], start + n as u64).is_ok())
    };
    if parses_after(BITMAPS_LEN) {
        (LengthReading::Fixed, BITMAPS_LEN)
    } else if parses_after(len as usize) {
        (LengthReading::Declared, len as usize)
    } else {
        (LengthReading::Unparsed, BITMAPS_LEN)
    }
}

/// The plain walk: every declared length must fit (no reading of the
/// bitmaps extension's length); `Ok` when the chain parses.
fn strict_area(area: &[u8], start: u64) -> Result<()> {
    let mut c = Cursor::new(area, start, "header extension");
    while c.remaining() >= 8 {
        let offset = c.offset();
        let kind = c.u32("type")?;
        let len = c.u32("length")?;
        if kind == ext_type::END {
            return Ok(());
        }
        decode_body(&mut c, kind, len, offset)?;
        c.bytes(pad_len(len).min(c.remaining()), "padding")?;
    }
    Ok(())
}

fn pad_len(len: u32) -> usize {
    (len as usize).next_multiple_of(8) - len as usize
}

fn decode_body(c: &mut Cursor<'_>, kind: u32, len: u32, offset: u64) -> Result<Vec<u8>> {
    if len as usize > c.remaining() {
        let msg = format!(
            "length {len} of extension 0x{kind:08x} ({}) runs past the end of the extension area ({} bytes left)",
            kind_name(kind),
            c.remaining()
        );
        return Err(Error::corrupt("header extension length", offset + 4, msg));
    }
    Ok(c.bytes(len as usize, "data")?.to_vec())
}

/// Encodes extensions followed by the end marker.
pub fn encode_area(extensions: &[Extension], p: &mut Put) {
    for e in extensions {
        e.encode(p);
    }
    p.u32(ext_type::END).u32(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(kind: u32, data: &[u8]) -> Extension {
        Extension {
            kind,
            offset: 0,
            data: data.to_vec(),
            padding_is_zero: true,
        }
    }

    #[test]
    fn round_trip_keeps_unknown_extensions_in_order() {
        let exts = vec![
            ext(0x1111_1111, b"hello"),
            ext(ext_type::BITMAPS, &[0; 24]),
            ext(0x2222_2222, b""),
        ];
        let mut p = Put::new();
        encode_area(&exts, &mut p);
        let mut bytes = p.into_vec();
        assert_eq!(bytes.len(), 16 + 32 + 8 + 8);
        bytes.resize(512 - 112, 0);
        let area = decode_area(&bytes, 112).unwrap();
        let offsets: Vec<u64> = area.extensions.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, [112, 128, 160]);
        assert_eq!(area.end_marker, Some(168));
        let kinds: Vec<u32> = area.extensions.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [0x1111_1111, ext_type::BITMAPS, 0x2222_2222]);
        assert_eq!(area.extensions[0].data, b"hello");
        assert_eq!(area.extensions[0].kind_name(), "unknown");
        assert_eq!(area.extensions[1].kind_name(), "bitmaps");
    }

    #[test]
    fn too_large_extension_is_rejected_with_offset() {
        let mut p = Put::new();
        p.u32(ext_type::FEATURE_TABLE).u32(100).bytes(&[0; 24]);
        let e = decode_area(&p.into_vec(), 504).unwrap_err();
        assert_eq!(
            e.to_string(),
            "header extension length at offset 508 (0x1fc): length 100 of extension 0x6803f857 (feature name table) runs past the end of the extension area (24 bytes left)"
        );
    }

    /// A v3 area at 112 in a 512-byte cluster 0: a bitmaps extension of
    /// declared length `len` (24 real bytes), `after` at offset 144, zeros to 512.
    fn bitmaps_area(len: u32, after: &[u8]) -> Vec<u8> {
        let mut p = Put::new();
        p.u32(ext_type::BITMAPS)
            .u32(len)
            .bytes(&[7; 24])
            .bytes(after);
        let mut bytes = p.into_vec();
        bytes.resize(512 - 112, 0);
        bytes
    }

    #[test]
    fn bitmaps_extension_of_any_wrong_length_is_read_as_its_24_bytes() {
        // 0, 8, 23, 25, huge, and a length ending exactly at the end of cluster 0.
        for len in [0, 8, 23, 25, 32, 0xFFFF_FF00, 512 - 120] {
            let area = decode_area(&bitmaps_area(len, &[]), 112).unwrap();
            assert_eq!(
                area.bitmaps_length,
                Some(BitmapsLength {
                    offset: 112,
                    declared: len,
                    reading: LengthReading::Fixed
                }),
                "length {len}"
            );
            assert_eq!(area.extensions.len(), 1, "length {len}");
            assert_eq!(area.extensions[0].data, [7; 24], "length {len}");
            assert_eq!(area.end_marker, Some(144), "length {len}");
        }
        // What follows the 24 bytes is kept, unknown extensions included.
        let mut next = Put::new();
        next.u32(0x1234_5678).u32(3).bytes(b"abc").pad_to(8);
        let area = decode_area(&bitmaps_area(0xFFFF_FF00, &next.into_vec()), 112).unwrap();
        let kinds: Vec<u32> = area.extensions.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [ext_type::BITMAPS, 0x1234_5678]);
        assert_eq!(area.end_marker, Some(160));
        // A correct length is no finding.
        assert_eq!(
            decode_area(&bitmaps_area(24, &[]), 112)
                .unwrap()
                .bitmaps_length,
            None
        );
    }

    #[test]
    fn bitmaps_extension_length_read_as_declared_or_not_at_all() {
        // After 24 bytes: an extension running past the area; after the
        // declared 32: the end marker. Declared wins, as before.
        let mut bad = Put::new();
        bad.u32(0xdead_beef).u32(0xffff_ff00);
        let area = decode_area(&bitmaps_area(32, &bad.into_vec()), 112).unwrap();
        let l = area.bitmaps_length.unwrap();
        assert_eq!(l.reading, LengthReading::Declared);
        assert_eq!(area.extensions[0].data.len(), 32);
        assert_eq!(area.end_marker, Some(152));
        // Neither reading parses: the walk stops at the bitmaps extension.
        let mut bad = Put::new();
        bad.u32(0xdead_beef).u32(0xffff_ff00);
        let area = decode_area(&bitmaps_area(0xffff_fff0, &bad.into_vec()), 112).unwrap();
        assert_eq!(
            area.bitmaps_length.unwrap().reading,
            LengthReading::Unparsed
        );
        assert_eq!(area.extensions.len(), 1);
        assert_eq!(area.end_marker, None);
        // Another extension too large is still an error.
        let mut p = Put::new();
        p.u32(0x1111_1111).u32(100).bytes(&[0; 24]);
        assert!(decode_area(&p.into_vec(), 504).is_err());
    }

    #[test]
    fn area_without_end_marker_and_dirty_padding() {
        let mut p = Put::new();
        p.u32(0x3333_3333)
            .u32(3)
            .bytes(b"abc")
            .bytes(&[0, 0, 9, 0, 0]);
        let area = decode_area(&p.into_vec(), 72).unwrap();
        assert_eq!(area.end_marker, None);
        assert!(!area.extensions[0].padding_is_zero);
        // Fewer than 8 bytes left also ends the walk.
        let area = decode_area(&[0xff; 7], 72).unwrap();
        assert!(area.extensions.is_empty());
    }
}
