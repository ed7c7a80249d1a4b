//! Bitmap table entries (reference §2.2): one big-endian `u64` per cluster
//! of serialized bitmap data.
//!
//! ```text
//! bit  0     with no offset: 0 = all zeros, 1 = all ones; must be 0 with an offset
//! bits 1-8   reserved (0)
//! bits 9-55  host cluster offset (0 = none)
//! bits 56-63 reserved (0)
//! ```

use crate::types::Geometry;

/// Reserved bits of a table entry.
pub const RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Host offset bits of a table entry.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The all-ones flag (only meaningful without an offset).
pub const ALL_ONES: u64 = 1;

/// What one table entry says about its cluster of bitmap data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// The cluster reads as all zeros; nothing is allocated.
    Zeros,
    /// The cluster reads as all ones; nothing is allocated.
    Ones,
    /// The data is in the host cluster at this offset.
    Data(u64),
    /// The entry breaks the format.
    Invalid(InvalidEntry),
}

/// Why a table entry is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidEntry {
    /// Reserved bits are set (the value of those bits).
    Reserved(u64),
    /// An offset is present and bit 0 is set too.
    OnesWithOffset(u64),
    /// The offset is not a multiple of the cluster size.
    Misaligned(u64),
}

impl std::fmt::Display for InvalidEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InvalidEntry::Reserved(bits) => write!(f, "reserved bits 0x{bits:x} are set"),
            InvalidEntry::OnesWithOffset(off) => {
                write!(f, "offset 0x{off:x} together with the all-ones bit")
            }
            InvalidEntry::Misaligned(off) => write!(f, "offset 0x{off:x} is not cluster-aligned"),
        }
    }
}

impl TableEntry {
    /// Decodes a raw entry.
    pub fn decode(raw: u64, geometry: Geometry) -> TableEntry {
        let reserved = raw & RESERVED_MASK;
        let offset = raw & OFFSET_MASK;
        if reserved != 0 {
            TableEntry::Invalid(InvalidEntry::Reserved(reserved))
        } else if offset == 0 {
            if raw & ALL_ONES != 0 {
                TableEntry::Ones
            } else {
                TableEntry::Zeros
            }
        } else if raw & ALL_ONES != 0 {
            TableEntry::Invalid(InvalidEntry::OnesWithOffset(offset))
        } else if !geometry.is_aligned(offset) {
            TableEntry::Invalid(InvalidEntry::Misaligned(offset))
        } else {
            TableEntry::Data(offset)
        }
    }

    /// Encodes a valid entry (invalid ones encode as zeros).
    pub fn encode(self) -> u64 {
        match self {
            TableEntry::Zeros | TableEntry::Invalid(_) => 0,
            TableEntry::Ones => ALL_ONES,
            TableEntry::Data(off) => off & OFFSET_MASK,
        }
    }
}

/// Decodes the raw big-endian entries of a table slice.
pub fn raw_entries(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks_exact(8).map(|c| {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        u64::from_be_bytes(a)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_every_kind() {
        let g = Geometry::new(16).unwrap();
        assert_eq!(TableEntry::decode(0, g), TableEntry::Zeros);
        assert_eq!(TableEntry::decode(1, g), TableEntry::Ones);
        assert_eq!(TableEntry::decode(0xd0000, g), TableEntry::Data(0xd0000));
        assert_eq!(
            TableEntry::decode(0xd0001, g),
            TableEntry::Invalid(InvalidEntry::OnesWithOffset(0xd0000))
        );
        assert_eq!(
            TableEntry::decode(0xd0200, g),
            TableEntry::Invalid(InvalidEntry::Misaligned(0xd0200))
        );
        assert_eq!(
            TableEntry::decode(0x2, g),
            TableEntry::Invalid(InvalidEntry::Reserved(2))
        );
        assert_eq!(
            TableEntry::decode(1 << 56 | 0xd0000, g),
            TableEntry::Invalid(InvalidEntry::Reserved(1 << 56))
        );
        let g512 = Geometry::new(9).unwrap();
        assert_eq!(TableEntry::decode(0xd0200, g512), TableEntry::Data(0xd0200));
    }

    #[test]
    fn encode_round_trip_and_raw() {
        let g = Geometry::new(9).unwrap();
        for e in [
            TableEntry::Zeros,
            TableEntry::Ones,
            TableEntry::Data(0x200),
            TableEntry::Data(OFFSET_MASK),
        ] {
            assert_eq!(TableEntry::decode(e.encode(), g), e);
        }
        let bytes = [0, 0, 0, 0, 0, 0x0d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 9];
        assert_eq!(raw_entries(&bytes).collect::<Vec<_>>(), vec![0xd0000, 1]);
    }
}
