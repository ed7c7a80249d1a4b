//! Bitmap directory entries (reference §2.1), packed back to back, each
//! padded to 8 bytes:
//!
//! ```text
//!  0  8 bitmap_table_offset   8  4 bitmap_table_size   12  4 flags
//! 16  1 type   17  1 granularity_bits   18  2 name_size   20  4 extra_data_size
//! 24  extra_data_size bytes of extra data, then name_size bytes of name, then zero padding
//! ```
//!
//! [`walk`] splits a directory into entries; [`DirEntry::problems`] lists
//! every rule an entry breaks, split into the ones that make the bitmap
//! unusable and the ones only `check` reports.

use super::be::{Cursor, Put};
use super::limits;
use crate::error::{Error, Result};
use crate::types::Geometry;

/// Fixed part of a directory entry.
pub const ENTRY_HEADER_LEN: usize = 24;

/// Flag bit 0: the bitmap was not saved consistently.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1: the bitmap is enabled (recording writes).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flag bit 2: the extra data may be ignored by readers that do not understand it.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Flag bits the format defines.
pub const FLAGS_KNOWN: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;

/// One decoded directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// File offset of this entry.
    pub offset: u64,
    /// Bitmap table offset.
    pub table_offset: u64,
    /// Bitmap table entries.
    pub table_size: u32,
    /// Flag bits.
    pub flags: u32,
    /// Bitmap type (1 = dirty tracking).
    pub kind: u8,
    /// log2 of the granularity in bytes.
    pub granularity_bits: u8,
    /// The raw name bytes (not NUL-terminated).
    pub name: Vec<u8>,
    /// Extra data, kept verbatim.
    pub extra_data: Vec<u8>,
    /// Whether the padding after the name was all zeros.
    pub padding_is_zero: bool,
}

/// How serious a rule violation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The bitmap cannot be used (QEMU would refuse the image, or we cannot read it).
    Unusable,
    /// The format is broken but the bitmap can still be read; `check` reports it.
    Lint,
}

/// One rule an entry breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// How serious it is.
    pub severity: Severity,
    /// File offset of the offending field.
    pub offset: u64,
    /// What is wrong, naming the field and value.
    pub message: String,
}

impl DirEntry {
    /// Size of this entry on disk, padding included.
    pub fn encoded_len(&self) -> usize {
        (ENTRY_HEADER_LEN + self.extra_data.len() + self.name.len()).next_multiple_of(8)
    }

    /// The name as lossy UTF-8 (the data field of reports and JSON).
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// The name for messages: see [`display_name`].
    pub fn display_name(&self) -> String {
        display_name(&self.name)
    }

    /// Granularity in bytes (`None` when granularity_bits ≥ 64).
    pub fn granularity(&self) -> Option<u64> {
        1u64.checked_shl(u32::from(self.granularity_bits))
    }

    /// Whether the in_use flag is set.
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// Whether the auto (enabled) flag is set.
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// Encodes the entry with zero padding.
    pub fn encode(&self, p: &mut Put) {
        let name_len = u16::try_from(self.name.len()).unwrap_or(u16::MAX);
        let extra_len = u32::try_from(self.extra_data.len()).unwrap_or(u32::MAX);
        p.u64(self.table_offset)
            .u32(self.table_size)
            .u32(self.flags);
        p.u8(self.kind)
            .u8(self.granularity_bits)
            .u16(name_len)
            .u32(extra_len);
        p.bytes(&self.extra_data).bytes(&self.name).pad_to(8);
    }

    /// Every rule of the format this entry breaks, given the image's cluster
    /// geometry and virtual size. Table contents are checked elsewhere.
    pub fn problems(&self, geometry: Geometry, virtual_size: u64) -> Vec<Problem> {
        let mut out = Vec::new();
        self.table_problems(geometry, virtual_size, &mut out);
        self.header_problems(&mut out);
        self.name_problems(&mut out);
        out
    }

    fn push(&self, out: &mut Vec<Problem>, severity: Severity, at: u64, message: String) {
        out.push(Problem {
            severity,
            offset: self.offset.saturating_add(at),
            message,
        });
    }

    fn table_problems(&self, g: Geometry, virtual_size: u64, out: &mut Vec<Problem>) {
        use Severity::Unusable;
        if self.table_offset == 0 || !g.is_aligned(self.table_offset) {
            let msg = format!(
                "bitmap_table_offset 0x{:x} is not a nonzero multiple of the cluster size",
                self.table_offset
            );
            self.push(out, Unusable, 0, msg);
        }
        if self.table_size == 0 {
            self.push(out, Unusable, 8, "bitmap_table_size is 0".into());
        } else if self.table_size > limits::MAX_TABLE_SIZE {
            self.push(
                out,
                Unusable,
                8,
                format!(
                    "bitmap_table_size {} exceeds {}",
                    self.table_size,
                    limits::MAX_TABLE_SIZE
                ),
            );
        } else if u64::from(self.table_size) * g.cluster_size() > limits::MAX_PHYS_SIZE {
            let msg = format!(
                "bitmap_table_size {} covers more than 512 MiB of bitmap clusters",
                self.table_size
            );
            self.push(out, Unusable, 8, msg);
        } else if !self.in_use() && !self.table_covers(g, virtual_size) {
            let msg = format!(
                "bitmap_table_size {} is too small for the virtual size {virtual_size}",
                self.table_size
            );
            self.push(out, Unusable, 8, msg);
        }
    }

    /// Whether `table_size` clusters of bits at this granularity cover `virtual_size`.
    fn table_covers(&self, g: Geometry, virtual_size: u64) -> bool {
        let bits = u128::from(self.table_size) * u128::from(g.cluster_size()) * 8;
        let gran_bits = u32::from(self.granularity_bits.min(63));
        (bits << gran_bits) >= u128::from(virtual_size)
    }

    fn header_problems(&self, out: &mut Vec<Problem>) {
        use Severity::{Lint, Unusable};
        let g = self.granularity_bits;
        if !(limits::MIN_GRANULARITY_BITS..=limits::MAX_GRANULARITY_BITS).contains(&g) {
            self.push(
                out,
                Unusable,
                17,
                format!("granularity_bits {g} is outside 9..=31"),
            );
        }
        if self.flags & !FLAGS_KNOWN != 0 {
            let msg = format!(
                "flags 0x{:x} has reserved bits 0x{:x} set",
                self.flags,
                self.flags & !FLAGS_KNOWN
            );
            self.push(out, Unusable, 12, msg);
        }
        if self.kind != TYPE_DIRTY_TRACKING {
            self.push(
                out,
                Unusable,
                16,
                format!("type {} is not 1 (dirty tracking)", self.kind),
            );
        }
        let compatible = self.flags & FLAG_EXTRA_DATA_COMPATIBLE != 0;
        if !self.extra_data.is_empty() && !compatible {
            let msg = format!(
                "extra_data_size {} without the extra_data_compatible flag",
                self.extra_data.len()
            );
            self.push(out, Unusable, 20, msg);
        } else if !self.extra_data.is_empty() {
            let msg = format!(
                "extra_data_size {}: QEMU cannot open images with bitmap extra data",
                self.extra_data.len()
            );
            self.push(out, Lint, 20, msg);
        } else if compatible {
            self.push(out, Lint, 12, "flag extra_data_compatible is set: QEMU treats it as reserved and refuses the image".into());
        }
    }

    fn name_problems(&self, out: &mut Vec<Problem>) {
        use Severity::{Lint, Unusable};
        if self.name.is_empty() {
            self.push(out, Unusable, 18, "name_size is 0".into());
        } else if self.name.len() > usize::from(limits::MAX_NAME_SIZE) {
            self.push(
                out,
                Unusable,
                18,
                format!("name_size {} exceeds 1023", self.name.len()),
            );
        }
        let name_at = (ENTRY_HEADER_LEN + self.extra_data.len()) as u64;
        if let Some(i) = self.name.iter().position(|&b| b == 0) {
            let msg =
                format!("name contains a NUL byte at position {i} (QEMU truncates the name there)");
            self.push(out, Lint, name_at + i as u64, msg);
        }
        if !self.padding_is_zero {
            let pad_at = name_at + self.name.len() as u64;
            self.push(
                out,
                Lint,
                pad_at,
                "padding after the name is not zero".into(),
            );
        }
    }
}

/// A bitmap name for display: lossy UTF-8 with control characters escaped
/// (`\n`, `\u{0}`), so that every message naming a bitmap stays on one line
/// whatever bytes the file holds.
pub fn display_name(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in String::from_utf8_lossy(raw).chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A walked directory: the entries found plus, when the walk had to stop
/// early or the count disagrees, the reason.
#[derive(Debug)]
pub struct Directory {
    /// Entries in directory order.
    pub entries: Vec<DirEntry>,
    /// A directory-level problem (broken framing, count mismatch).
    pub problem: Option<Error>,
}

/// Walks `dir` (the `directory_size` bytes at file offset `offset`),
/// expecting `nb_bitmaps` entries. Never fails: framing errors stop the walk
/// and are returned in [`Directory::problem`] beside the entries read so far.
pub fn walk(dir: &[u8], offset: u64, nb_bitmaps: u32) -> Directory {
    let mut c = Cursor::new(dir, offset, "bitmap directory");
    let mut entries = Vec::new();
    let mut problem = None;
    while c.remaining() > 0 {
        match decode_entry(&mut c) {
            Ok(e) => entries.push(e),
            Err(e) => {
                problem = Some(e);
                break;
            }
        }
    }
    if problem.is_none() && entries.len() != nb_bitmaps as usize {
        let msg = format!(
            "holds {} entries but the bitmaps extension says {nb_bitmaps}",
            entries.len()
        );
        problem = Some(Error::corrupt("bitmap directory", offset, msg));
    }
    Directory { entries, problem }
}

fn decode_entry(c: &mut Cursor<'_>) -> Result<DirEntry> {
    let offset = c.offset();
    if c.remaining() < ENTRY_HEADER_LEN {
        let msg = format!(
            "{} leftover bytes after the last entry are too few for an entry",
            c.remaining()
        );
        return Err(Error::corrupt("bitmap directory", offset, msg));
    }
    let table_offset = c.u64("entry table_offset")?;
    let table_size = c.u32("entry table_size")?;
    let flags = c.u32("entry flags")?;
    let kind = c.u8("entry type")?;
    let granularity_bits = c.u8("entry granularity_bits")?;
    let name_size = c.u16("entry name_size")?;
    let extra_size = c.u32("entry extra_data_size")?;
    let body = (extra_size as usize).checked_add(usize::from(name_size));
    let fits = body
        .and_then(|b| b.checked_add(ENTRY_HEADER_LEN))
        .map(|n| n.next_multiple_of(8) - ENTRY_HEADER_LEN);
    if fits.is_none_or(|n| n > c.remaining()) {
        let msg = format!(
            "entry with extra_data_size {extra_size} and name_size {name_size} runs past the end of the directory ({} bytes left)",
            c.remaining()
        );
        return Err(Error::corrupt("bitmap directory", offset, msg));
    }
    let extra_data = c.bytes(extra_size as usize, "entry extra data")?.to_vec();
    let name = c.bytes(usize::from(name_size), "entry name")?.to_vec();
    let padding_is_zero = c.pad_to(8, "entry padding")?.iter().all(|&b| b == 0);
    Ok(DirEntry {
        offset,
        table_offset,
        table_size,
        flags,
        kind,
        granularity_bits,
        name,
        extra_data,
        padding_is_zero,
    })
}

/// Encodes entries back to back.
pub fn encode(entries: &[DirEntry], p: &mut Put) {
    for e in entries {
        e.encode(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entry from reference §2.1 (a.qcow2, directory at 0x110000).
    const REFERENCE_ENTRY: [u8; 32] = [
        0, 0, 0, 0, 0, 0x0d, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 1, 0x10, 0, 2, 0, 0, 0, 0, b'b', b'0',
        0, 0, 0, 0, 0, 0,
    ];

    fn entry(name: &str) -> DirEntry {
        DirEntry {
            offset: 0x110000,
            table_offset: 0xd0000,
            table_size: 1,
            flags: FLAG_AUTO,
            kind: 1,
            granularity_bits: 16,
            name: name.as_bytes().to_vec(),
            extra_data: vec![],
            padding_is_zero: true,
        }
    }

    fn g64k() -> Geometry {
        Geometry::new(16).unwrap()
    }

    #[test]
    fn display_name_escapes_control_characters() {
        let mut e = entry("a\nb\u{1b}c");
        e.name.extend([0, 0xff]);
        assert_eq!(e.display_name(), "a\\nb\\u{1b}c\\u{0}\u{fffd}");
        assert_eq!(e.name_lossy(), "a\nb\u{1b}c\0\u{fffd}");
        assert_eq!(entry("ckpt-1 é").display_name(), "ckpt-1 é");
    }

    #[test]
    fn decodes_the_reference_entry() {
        let d = walk(&REFERENCE_ENTRY, 0x110000, 1);
        assert!(d.problem.is_none());
        assert_eq!(d.entries, vec![entry("b0")]);
        assert_eq!(d.entries[0].encoded_len(), 32);
        assert!(d.entries[0].problems(g64k(), 1 << 30).is_empty());
    }

    #[test]
    fn round_trip_several_entries() {
        let mut es = vec![entry("b0"), entry("a-longer-name-17"), entry("x")];
        let mut off = 0x110000;
        for e in &mut es {
            e.offset = off;
            off += e.encoded_len() as u64;
        }
        es[1].extra_data = vec![1, 2, 3];
        es[1].flags |= FLAG_EXTRA_DATA_COMPATIBLE;
        es[2].offset = es[1].offset + es[1].encoded_len() as u64;
        let mut p = Put::new();
        encode(&es, &mut p);
        let bytes = p.into_vec();
        let d = walk(&bytes, 0x110000, 3);
        assert!(d.problem.is_none());
        assert_eq!(d.entries, es);
    }

    #[test]
    fn framing_errors_keep_earlier_entries() {
        let mut bytes = REFERENCE_ENTRY.to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let d = walk(&bytes, 0x110000, 2);
        assert_eq!(d.entries.len(), 1);
        let e = d.problem.unwrap().to_string();
        assert_eq!(
            e,
            "bitmap directory at offset 1114144 (0x110020): 16 leftover bytes after the last entry are too few for an entry"
        );

        let mut bytes = REFERENCE_ENTRY.to_vec();
        bytes.extend_from_slice(&REFERENCE_ENTRY);
        bytes[32 + 19] = 200; // name_size 200 overruns
        let d = walk(&bytes, 0, 2);
        assert_eq!(d.entries.len(), 1);
        assert!(
            d.problem
                .unwrap()
                .to_string()
                .contains("name_size 200 runs past the end of the directory (8 bytes left)")
        );
    }

    #[test]
    fn count_mismatch_both_ways() {
        let d = walk(&REFERENCE_ENTRY, 0, 2);
        assert_eq!(d.entries.len(), 1);
        assert!(
            d.problem
                .unwrap()
                .to_string()
                .contains("holds 1 entries but the bitmaps extension says 2")
        );
        let mut two = REFERENCE_ENTRY.to_vec();
        two.extend_from_slice(&REFERENCE_ENTRY);
        let d = walk(&two, 0, 1);
        assert_eq!(d.entries.len(), 2);
        assert!(
            d.problem
                .unwrap()
                .to_string()
                .contains("holds 2 entries but the bitmaps extension says 1")
        );
    }

    fn only_problem(e: &DirEntry) -> (Severity, u64, String) {
        let ps = e.problems(g64k(), 1 << 30);
        assert_eq!(ps.len(), 1, "{ps:?}");
        (
            ps[0].severity,
            ps[0].offset - e.offset,
            ps[0].message.clone(),
        )
    }

    #[test]
    fn every_entry_rule() {
        use Severity::{Lint, Unusable};
        let cases: Vec<(DirEntry, Severity, u64, &str)> = vec![
            (
                DirEntry {
                    table_offset: 0,
                    ..entry("b")
                },
                Unusable,
                0,
                "bitmap_table_offset 0x0 is not a nonzero multiple of the cluster size",
            ),
            (
                DirEntry {
                    table_offset: 0xd0200,
                    ..entry("b")
                },
                Unusable,
                0,
                "bitmap_table_offset 0xd0200 is not a nonzero multiple of the cluster size",
            ),
            (
                DirEntry {
                    table_size: 0,
                    ..entry("b")
                },
                Unusable,
                8,
                "bitmap_table_size is 0",
            ),
            (
                DirEntry {
                    table_size: 0x800_0001,
                    ..entry("b")
                },
                Unusable,
                8,
                "bitmap_table_size 134217729 exceeds 134217728",
            ),
            (
                DirEntry {
                    table_size: 8193,
                    ..entry("b")
                },
                Unusable,
                8,
                "bitmap_table_size 8193 covers more than 512 MiB of bitmap clusters",
            ),
            (
                DirEntry {
                    granularity_bits: 8,
                    table_size: 8,
                    ..entry("b")
                },
                Unusable,
                17,
                "granularity_bits 8 is outside 9..=31",
            ),
            (
                DirEntry {
                    granularity_bits: 32,
                    ..entry("b")
                },
                Unusable,
                17,
                "granularity_bits 32 is outside 9..=31",
            ),
            (
                DirEntry {
                    flags: 0x8 | FLAG_AUTO,
                    ..entry("b")
                },
                Unusable,
                12,
                "flags 0xa has reserved bits 0x8 set",
            ),
            (
                DirEntry {
                    kind: 2,
                    ..entry("b")
                },
                Unusable,
                16,
                "type 2 is not 1 (dirty tracking)",
            ),
            (
                DirEntry {
                    extra_data: vec![0; 8],
                    ..entry("b")
                },
                Unusable,
                20,
                "extra_data_size 8 without the extra_data_compatible flag",
            ),
            (
                DirEntry {
                    extra_data: vec![0; 8],
                    flags: 6,
                    ..entry("b")
                },
                Lint,
                20,
                "extra_data_size 8: QEMU cannot open images with bitmap extra data",
            ),
            (
                DirEntry {
                    flags: 6,
                    ..entry("b")
                },
                Lint,
                12,
                "flag extra_data_compatible is set: QEMU treats it as reserved and refuses the image",
            ),
            (entry(""), Unusable, 18, "name_size is 0"),
            (
                entry(&"n".repeat(1024)),
                Unusable,
                18,
                "name_size 1024 exceeds 1023",
            ),
            (
                entry("a\0b"),
                Lint,
                25,
                "name contains a NUL byte at position 1 (QEMU truncates the name there)",
            ),
            (
                DirEntry {
                    padding_is_zero: false,
                    ..entry("b0")
                },
                Lint,
                26,
                "padding after the name is not zero",
            ),
        ];
        for (e, sev, at, msg) in cases {
            assert_eq!(only_problem(&e), (sev, at, msg.to_string()));
        }
        assert!(
            entry(&"n".repeat(1023))
                .problems(g64k(), 1 << 30)
                .is_empty()
        );
    }

    #[test]
    fn table_too_small_only_when_not_in_use() {
        // 1 entry at 64 KiB clusters and 64 KiB granularity covers 32 GiB.
        let e = entry("b");
        assert!(e.problems(g64k(), 32 << 30).is_empty());
        let (_, at, msg) = only_problem_sized(&e, (32 << 30) + 512);
        assert_eq!(
            (at, msg.as_str()),
            (
                8,
                "bitmap_table_size 1 is too small for the virtual size 34359738880"
            )
        );
        let in_use = DirEntry {
            flags: FLAG_IN_USE,
            ..entry("b")
        };
        assert!(in_use.problems(g64k(), (32 << 30) + 512).is_empty());
    }

    fn only_problem_sized(e: &DirEntry, size: u64) -> (Severity, u64, String) {
        let ps = e.problems(g64k(), size);
        assert_eq!(ps.len(), 1, "{ps:?}");
        (
            ps[0].severity,
            ps[0].offset - e.offset,
            ps[0].message.clone(),
        )
    }
}
