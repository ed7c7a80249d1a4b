//! The bitmaps header extension (type 0x23852875), exactly 24 bytes:
//!
//! ```text
//!  0  4 nb_bitmaps   4  4 reserved (0)
//!  8  8 bitmap_directory_size   16  8 bitmap_directory_offset
//! ```
//! Validation follows QEMU's open-time checks (reference §1.4).

use super::be::{Cursor, Put};
use super::limits;
use crate::error::{Error, Result};
use crate::types::Geometry;

/// Length of the extension data.
pub const BITMAPS_EXT_LEN: usize = 24;

/// The decoded bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of directory entries.
    pub nb_bitmaps: u32,
    /// Reserved, must be zero.
    pub reserved: u32,
    /// Directory size in bytes.
    pub directory_size: u64,
    /// Directory file offset.
    pub directory_offset: u64,
}

impl BitmapsExt {
    /// Decodes the extension data; `offset` is the file offset of the data.
    ///
    /// # Errors
    /// `Corrupt` when the length is not 24 (QEMU checks this even for a stale extension).
    pub fn decode(data: &[u8], offset: u64) -> Result<BitmapsExt> {
        if data.len() != BITMAPS_EXT_LEN {
            let msg = format!("{} is not 24", data.len());
            return Err(Error::corrupt(
                "bitmaps extension length",
                offset.saturating_sub(4),
                msg,
            ));
        }
        let mut c = Cursor::new(data, offset, "bitmaps extension");
        Ok(BitmapsExt {
            nb_bitmaps: c.u32("nb_bitmaps")?,
            reserved: c.u32("reserved")?,
            directory_size: c.u64("bitmap_directory_size")?,
            directory_offset: c.u64("bitmap_directory_offset")?,
        })
    }

    /// QEMU's checks for a consistent extension; `offset` is the file offset of the data.
    ///
    /// # Errors
    /// `Corrupt` naming the first field QEMU would reject.
    pub fn validate(&self, geometry: Geometry, offset: u64) -> Result<()> {
        let err = |field: &str, at: u64, msg: String| {
            Err(Error::corrupt(
                format!("bitmaps extension {field}"),
                offset + at,
                msg,
            ))
        };
        if self.nb_bitmaps == 0 {
            return err(
                "nb_bitmaps",
                0,
                "is 0 (an extension must list at least one bitmap)".into(),
            );
        }
        if self.nb_bitmaps > limits::MAX_BITMAPS {
            return err(
                "nb_bitmaps",
                0,
                format!("{} exceeds 65535", self.nb_bitmaps),
            );
        }
        if self.reserved != 0 {
            return err("reserved", 4, format!("0x{:x} is not zero", self.reserved));
        }
        if self.directory_size == 0 {
            return err("bitmap_directory_size", 8, "is 0".into());
        }
        if self.directory_size > limits::MAX_DIRECTORY_SIZE {
            let msg = format!(
                "{} exceeds the maximum {}",
                self.directory_size,
                limits::MAX_DIRECTORY_SIZE
            );
            return err("bitmap_directory_size", 8, msg);
        }
        if self.directory_offset == 0 || !geometry.is_aligned(self.directory_offset) {
            let msg = format!(
                "0x{:x} is not a nonzero multiple of the cluster size",
                self.directory_offset
            );
            return err("bitmap_directory_offset", 16, msg);
        }
        Ok(())
    }

    /// Encodes the 24 data bytes.
    pub fn encode(&self, p: &mut Put) {
        p.u32(self.nb_bitmaps).u32(self.reserved);
        p.u64(self.directory_size).u64(self.directory_offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> BitmapsExt {
        BitmapsExt {
            nb_bitmaps: 2,
            reserved: 0,
            directory_size: 64,
            directory_offset: 0x110000,
        }
    }

    #[test]
    fn round_trip() {
        let mut p = Put::new();
        good().encode(&mut p);
        let b = p.into_vec();
        assert_eq!(b.len(), BITMAPS_EXT_LEN);
        assert_eq!(BitmapsExt::decode(&b, 512).unwrap(), good());
    }

    #[test]
    fn length_must_be_24() {
        let e = BitmapsExt::decode(&[0; 16], 512).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bitmaps extension length at offset 508 (0x1fc): 16 is not 24"
        );
    }

    #[test]
    fn every_validation_rule() {
        let g = Geometry::new(16).unwrap();
        assert!(good().validate(g, 512).is_ok());
        let cases: Vec<(BitmapsExt, &str)> = vec![
            (
                BitmapsExt {
                    nb_bitmaps: 0,
                    ..good()
                },
                "bitmaps extension nb_bitmaps at offset 512 (0x200): is 0 (an extension must list at least one bitmap)",
            ),
            (
                BitmapsExt {
                    nb_bitmaps: 65536,
                    ..good()
                },
                "bitmaps extension nb_bitmaps at offset 512 (0x200): 65536 exceeds 65535",
            ),
            (
                BitmapsExt {
                    reserved: 1,
                    ..good()
                },
                "bitmaps extension reserved at offset 516 (0x204): 0x1 is not zero",
            ),
            (
                BitmapsExt {
                    directory_size: 0,
                    ..good()
                },
                "bitmaps extension bitmap_directory_size at offset 520 (0x208): is 0",
            ),
            (
                BitmapsExt {
                    directory_size: 67_107_841,
                    ..good()
                },
                "bitmaps extension bitmap_directory_size at offset 520 (0x208): 67107841 exceeds the maximum 67107840",
            ),
            (
                BitmapsExt {
                    directory_offset: 0x110200,
                    ..good()
                },
                "bitmaps extension bitmap_directory_offset at offset 528 (0x210): 0x110200 is not a nonzero multiple of the cluster size",
            ),
            (
                BitmapsExt {
                    directory_offset: 0,
                    ..good()
                },
                "bitmaps extension bitmap_directory_offset at offset 528 (0x210): 0x0 is not a nonzero multiple of the cluster size",
            ),
        ];
        for (ext, want) in cases {
            assert_eq!(ext.validate(g, 512).unwrap_err().to_string(), want);
        }
        assert!(
            BitmapsExt {
                nb_bitmaps: 65535,
                directory_size: 67_107_840,
                ..good()
            }
            .validate(g, 0)
            .is_ok()
        );
    }
}
