//! Guest-data mapping records: L1 entries, L2 entries (standard 8-byte and
//! extended 16-byte), compressed cluster descriptors and snapshot table
//! entries. Bytes only, no I/O; the refcount check walks them.
//!
//! ```text
//! L1 entry (u64):  bits 0-8 reserved, 9-55 L2 table offset, 56-62 reserved,
//!                  63 "copied" (refcount is exactly 1)
//! L2 entry (u64):  bit 62 compressed, bit 63 copied
//!   standard:      bit 0 reads as zeros, 1-8 reserved, 9-55 host offset, 56-61 reserved
//!   compressed:    bits 0..x host byte offset, x..62 additional 512-byte
//!                  sectors, x = 62 - (cluster_bits - 8)
//! extended L2:     the u64 above followed by a u64 subcluster bitmap
//!                  (bits 0-31 allocated, bits 32-63 reads as zeros)
//! snapshot entry:  0 8 l1_table_offset  8 4 l1_size  12 2 id_str_size
//!                  14 2 name_size  16 4 date_sec  20 4 date_nsec
//!                  24 8 vm_clock_nsec  32 4 vm_state_size  36 4 extra_data_size
//!                  40 extra data, id string, name; the next entry starts at
//!                  the following multiple of 8
//! ```

use crate::types::Geometry;

/// The "copied" flag of L1 and L2 entries (refcount is exactly 1).
pub const COPIED: u64 = 1 << 63;
/// The compressed flag of L2 entries.
pub const COMPRESSED: u64 = 1 << 62;
/// The "reads as zeros" flag of standard L2 entries.
pub const ZERO: u64 = 1;
/// Offset bits of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry.
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry.
pub const L2_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Allocation half of an extended L2 subcluster bitmap.
pub const SUBCLUSTER_ALLOC_MASK: u64 = 0xffff_ffff;
/// Unit of the compressed sector count.
pub const COMPRESSED_SECTOR: u64 = 512;
/// Largest L1 table QEMU accepts, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest number of internal snapshots QEMU accepts.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot extra data QEMU accepts, in bytes.
pub const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// Largest snapshot table QEMU accepts, in bytes.
pub const MAX_SNAPSHOT_TABLE: u64 = 1024 * MAX_SNAPSHOTS as u64;
/// Fixed part of a snapshot table entry.
pub const SNAPSHOT_HEADER_LEN: usize = 40;

/// Bytes per L2 entry: 8, or 16 with extended L2 entries.
pub fn l2_entry_len(extended: bool) -> usize {
    if extended { 16 } else { 8 }
}

/// Where a compressed cluster's bytes are in the host file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// First host byte.
    pub offset: u64,
    /// Number of 512-byte sectors the descriptor claims (at least 1).
    pub sectors: u64,
}

impl CompressedDescriptor {
    /// Splits a compressed L2 entry (flags included) for `cluster_bits`.
    pub fn decode(entry: u64, g: Geometry) -> Self {
        let x = 62 - (g.cluster_bits() - 8);
        let offset = entry & ((1u64 << x) - 1);
        let count_mask = (1u64 << (g.cluster_bits() - 8)) - 1;
        let sectors = ((entry >> x) & count_mask) + 1;
        CompressedDescriptor { offset, sectors }
    }

    /// Host byte length: the sectors, minus the offset into the first sector.
    pub fn len(&self) -> u64 {
        self.sectors * COMPRESSED_SECTOR - (self.offset % COMPRESSED_SECTOR)
    }

    /// Always false: a descriptor covers at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What one L2 entry maps its guest cluster to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Kind {
    /// Nothing allocated (reads from the backing file or as zeros).
    Unallocated,
    /// Reads as zeros, no host cluster (standard L2 only).
    ZeroPlain,
    /// Reads as zeros, with a preallocated host cluster at this offset.
    ZeroAlloc(u64),
    /// Data in the host cluster at this offset.
    Normal(u64),
    /// Compressed data.
    Compressed(CompressedDescriptor),
}

/// Classifies an L2 entry the way QEMU does.
///
/// `extended`: the image has extended L2 entries (bit 0 is then not a zero
/// flag). `data_file`: guest data lives in an external file, where offset 0
/// with the copied flag is a valid allocation.
pub fn classify(entry: u64, g: Geometry, extended: bool, data_file: bool) -> L2Kind {
    let offset = entry & OFFSET_MASK;
    if entry & COMPRESSED != 0 {
        L2Kind::Compressed(CompressedDescriptor::decode(entry, g))
    } else if entry & ZERO != 0 && !extended {
        if offset != 0 {
            L2Kind::ZeroAlloc(offset)
        } else {
            L2Kind::ZeroPlain
        }
    } else if offset == 0 {
        if data_file && entry & COPIED != 0 {
            L2Kind::Normal(0)
        } else {
            L2Kind::Unallocated
        }
    } else {
        L2Kind::Normal(offset)
    }
}

/// The `(entry, subcluster bitmap)` pair number `i` of an L2 table
/// (the bitmap is 0 for standard entries). `None` past the table's end.
pub fn l2_entry(table: &[u8], i: usize, extended: bool) -> Option<(u64, u64)> {
    let len = l2_entry_len(extended);
    let at = i.checked_mul(len)?;
    let bytes = table.get(at..at.checked_add(len)?)?;
    Some(split_entry(bytes, extended))
}

/// Splits one L2 entry's bytes (8, or 16 with extended L2) into
/// `(entry, subcluster bitmap)`; missing bytes read as zeros.
#[inline]
pub fn split_entry(bytes: &[u8], extended: bool) -> (u64, u64) {
    let entry = be_u64(bytes);
    let bitmap = if extended {
        be_u64(bytes.get(8..).unwrap_or(&[]))
    } else {
        0
    };
    (entry, bitmap)
}

#[inline]
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = b.len().min(8);
    a[..n].copy_from_slice(&b[..n]);
    u64::from_be_bytes(a)
}

/// The fixed part of one snapshot table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// The snapshot's L1 table offset.
    pub l1_table_offset: u64,
    /// The snapshot's L1 table entries.
    pub l1_size: u32,
    /// Length of the id string.
    pub id_str_size: u16,
    /// Length of the name.
    pub name_size: u16,
    /// Size of the VM state saved with the snapshot.
    pub vm_state_size: u32,
    /// Length of the extra data.
    pub extra_data_size: u32,
}

impl SnapshotHeader {
    /// Decodes the 40-byte fixed part; `None` when `b` is shorter.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..SNAPSHOT_HEADER_LEN)?;
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Some(SnapshotHeader {
            l1_table_offset: be_u64(&b[0..8]),
            l1_size: u32_at(8),
            id_str_size: u16_at(12),
            name_size: u16_at(14),
            vm_state_size: u32_at(32),
            extra_data_size: u32_at(36),
        })
    }

    /// Bytes of this entry without the padding to 8.
    pub fn unpadded_len(&self) -> u64 {
        SNAPSHOT_HEADER_LEN as u64
            + u64::from(self.extra_data_size)
            + u64::from(self.id_str_size)
            + u64::from(self.name_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(bits: u32) -> Geometry {
        Geometry::new(bits).unwrap()
    }

    #[test]
    fn compressed_split_depends_on_cluster_bits() {
        // 64 KiB: x = 54, 8 count bits.
        let e = COMPRESSED | (3u64 << 54) | 0x12_3456;
        let d = CompressedDescriptor::decode(e, g(16));
        assert_eq!(
            d,
            CompressedDescriptor {
                offset: 0x12_3456,
                sectors: 4
            }
        );
        assert_eq!(d.len(), 4 * 512 - 0x56);
        // 512 B: x = 61, 1 count bit.
        let e = COMPRESSED | (1u64 << 61) | 0x200;
        let d = CompressedDescriptor::decode(e, g(9));
        assert_eq!(
            d,
            CompressedDescriptor {
                offset: 0x200,
                sectors: 2
            }
        );
        assert_eq!(d.len(), 1024);
        // 2 MiB: x = 49, 13 count bits; the copied bit is not part of the count.
        let e = COPIED | COMPRESSED | (0x1fffu64 << 49) | ((1u64 << 49) - 1);
        let d = CompressedDescriptor::decode(e, g(21));
        assert_eq!(d.offset, (1u64 << 49) - 1);
        assert_eq!(d.sectors, 0x2000);
        // 4 KiB: x = 58.
        let d = CompressedDescriptor::decode(COMPRESSED | (7u64 << 58) | 0x1000, g(12));
        assert_eq!((d.offset, d.sectors), (0x1000, 8));
    }

    #[test]
    fn standard_entries() {
        let g = g(16);
        assert_eq!(classify(0, g, false, false), L2Kind::Unallocated);
        assert_eq!(classify(ZERO, g, false, false), L2Kind::ZeroPlain);
        assert_eq!(
            classify(COPIED | 0x5_0000 | ZERO, g, false, false),
            L2Kind::ZeroAlloc(0x5_0000)
        );
        assert_eq!(
            classify(COPIED | 0x5_0000, g, false, false),
            L2Kind::Normal(0x5_0000)
        );
        assert_eq!(classify(COPIED, g, false, true), L2Kind::Normal(0));
        assert_eq!(classify(COPIED, g, false, false), L2Kind::Unallocated);
    }

    #[test]
    fn extended_entries() {
        let g = g(16);
        // Bit 0 is not a zero flag with extended L2.
        assert_eq!(classify(ZERO, g, true, false), L2Kind::Unallocated);
        assert_eq!(
            classify(ZERO | 0x3_0000, g, true, false),
            L2Kind::Normal(0x3_0000)
        );
        let mut table = vec![0u8; 32];
        table[0..8].copy_from_slice(&(COPIED | 0x3_0000).to_be_bytes());
        table[8..16].copy_from_slice(&0x0000_0003_0000_0001u64.to_be_bytes());
        table[16..24].copy_from_slice(&7u64.to_be_bytes());
        assert_eq!(
            l2_entry(&table, 0, true),
            Some((COPIED | 0x3_0000, 0x3_0000_0001))
        );
        assert_eq!(l2_entry(&table, 1, true), Some((7, 0)));
        assert_eq!(l2_entry(&table, 2, true), None);
        assert_eq!(l2_entry(&table, 2, false), Some((7, 0)));
        assert_eq!(l2_entry(&table, 4, false), None);
    }

    #[test]
    fn snapshot_header() {
        let mut b = vec![0u8; 40];
        b[0..8].copy_from_slice(&0x7_0000u64.to_be_bytes());
        b[8..12].copy_from_slice(&16u32.to_be_bytes());
        b[12..14].copy_from_slice(&1u16.to_be_bytes());
        b[14..16].copy_from_slice(&2u16.to_be_bytes());
        b[36..40].copy_from_slice(&24u32.to_be_bytes());
        let h = SnapshotHeader::decode(&b).unwrap();
        assert_eq!(h.l1_table_offset, 0x7_0000);
        assert_eq!(h.l1_size, 16);
        assert_eq!(h.unpadded_len(), 40 + 24 + 1 + 2);
        assert!(SnapshotHeader::decode(&b[..39]).is_none());
    }
}
