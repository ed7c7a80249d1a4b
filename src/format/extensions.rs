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
}

/// Walks the extension area. `area` holds the bytes from file offset `start`
/// up to the end of the area.
///
/// # Errors
/// `Corrupt` when an extension's declared length runs past the area
/// (QEMU: "Header extension too large").
pub fn decode_area(area: &[u8], start: u64) -> Result<ExtensionArea> {
    let mut c = Cursor::new(area, start, "header extension");
    let mut extensions = Vec::new();
    while c.remaining() >= 8 {
        let offset = c.offset();
        let kind = c.u32("type")?;
        let len = c.u32("length")?;
        if kind == ext_type::END {
            return Ok(ExtensionArea {
                extensions,
                end_marker: Some(offset),
            });
        }
        let data = decode_body(&mut c, kind, len, offset)?;
        let padding = c.bytes(pad_len(len).min(c.remaining()), "padding")?;
        let padding_is_zero = padding.iter().all(|&b| b == 0);
        extensions.push(Extension {
            kind,
            offset,
            data,
            padding_is_zero,
        });
    }
    Ok(ExtensionArea {
        extensions,
        end_marker: None,
    })
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
        p.u32(ext_type::BITMAPS).u32(100).bytes(&[0; 24]);
        let e = decode_area(&p.into_vec(), 504).unwrap_err();
        assert_eq!(
            e.to_string(),
            "header extension length at offset 508 (0x1fc): length 100 of extension 0x23852875 (bitmaps) runs past the end of the extension area (24 bytes left)"
        );
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
