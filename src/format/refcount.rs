//! Refcount blocks and refcount table entries: bytes only, no I/O.
//!
//! A refcount block is exactly one cluster holding
//! `cluster_size * 8 / refcount_bits` entries, `refcount_bits = 1 << order`
//! for `order` in `0..=6`:
//!
//! ```text
//! order 0..=2 (1, 2, 4 bits): packed LSB-first; entry i uses bits
//!                             (i*w) % 8 .. (i*w) % 8 + w of byte i*w / 8
//! order 3..=6 (8..64 bits):   big-endian integers of 1, 2, 4 or 8 bytes
//! ```
//!
//! For example, with 1-bit refcounts, byte 0 = `0xCF` means clusters 0..=3
//! are used, 4..=5 free and 6..=7 used.
//!
//! A refcount table entry is a big-endian `u64`: bits 0..=8 are reserved
//! (zero), bits 9..=63 are the refcount block's offset, which must be
//! cluster-aligned; 0 means "no block" (every refcount it would cover is 0).
//!
//! Callers validate `order` (the header does) and index inside the block;
//! this module does no policy.

use crate::error::{Error, Result};
use crate::types::HostOffset;

/// Largest refcount order (64-bit refcounts).
pub const MAX_ORDER: u32 = 6;

/// Bits of a refcount table entry that hold the refcount block offset.
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Size of one refcount table entry in bytes.
pub const REFTABLE_ENTRY_SIZE: u64 = 8;

/// The largest refcount `order` can express: `2^(1 << order) - 1`.
pub fn max_refcount(order: u32) -> u64 {
    // Orders above 6 count as 6 (every caller validates refcount_order).
    u64::MAX >> (64 - (1u32 << order.min(MAX_ORDER)))
}

/// Entries in one refcount block: `cluster_size * 8 / refcount_bits`.
///
/// `order` is clamped to 6 and `cluster_bits` to 40 (both validated by the
/// header long before: QEMU allows 9..=21 cluster bits).
pub fn entries_per_block(cluster_bits: u32, order: u32) -> u64 {
    1u64 << (cluster_bits.min(40) + 3 - order.min(MAX_ORDER))
}

fn array<const N: usize>(block: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&block[at..at + N]);
    a
}

/// Refcount number `index` of `block` for refcount order `order`.
///
/// Orders above 6 are read as 6 (every caller validates `refcount_order`).
///
/// # Panics
/// When `index` is outside the block: a caller bug, never file contents
/// (indexes come from `cluster % entries_per_block` and blocks are one cluster).
pub fn get(block: &[u8], index: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let width = 1usize << order;
            let bit = index * width;
            let mask = (1u8 << width) - 1;
            u64::from((block[bit / 8] >> (bit % 8)) & mask)
        }
        3 => u64::from(block[index]),
        4 => u64::from(u16::from_be_bytes(array(block, index * 2))),
        5 => u64::from(u32::from_be_bytes(array(block, index * 4))),
        _ => u64::from_be_bytes(array(block, index * 8)),
    }
}

/// Stores `value` as refcount number `index` of `block`; neighbours keep their values.
///
/// `value` is truncated to the width (callers check against
/// [`max_refcount`] first and a debug build asserts it).
///
/// Orders above 6 are written as 6.
///
/// # Panics
/// When `index` is outside the block (a caller bug, as for [`get`]).
pub fn set(block: &mut [u8], index: usize, order: u32, value: u64) {
    debug_assert!(value <= max_refcount(order), "refcount {value} too wide");
    let value = value & max_refcount(order);
    match order {
        0..=2 => {
            let width = 1usize << order;
            let bit = index * width;
            let mask = ((1u8 << width) - 1) << (bit % 8);
            let byte = &mut block[bit / 8];
            // `value` fits in `width` (<= 4) bits, so the cast keeps it whole.
            *byte = (*byte & !mask) | ((value as u8) << (bit % 8));
        }
        3 => block[index] = value as u8,
        4 => block[index * 2..index * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[index * 4..index * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

/// Decodes a refcount table entry read from file offset `entry_offset`.
///
/// Returns `None` for 0 (no refcount block), else the block's offset.
///
/// # Errors
/// `Corrupt` when reserved bits 0..=8 are set or the offset is not aligned
/// to `cluster_bits`.
pub fn decode_reftable_entry(
    raw: u64,
    cluster_bits: u32,
    entry_offset: u64,
) -> Result<Option<HostOffset>> {
    let what = "refcount table entry";
    if raw & !REFTABLE_OFFSET_MASK != 0 {
        let msg = format!("0x{raw:016x} has reserved bits 0..=8 set");
        return Err(Error::corrupt(what, entry_offset, msg));
    }
    let cluster_mask = (1u64 << cluster_bits.min(63)) - 1;
    if raw & cluster_mask != 0 {
        let msg = format!("refcount block offset 0x{raw:x} is not cluster-aligned");
        return Err(Error::corrupt(what, entry_offset, msg));
    }
    Ok((raw != 0).then_some(HostOffset(raw)))
}

/// Encodes a refcount table entry (`None` = no block, which is 0).
pub fn encode_reftable_entry(block: Option<HostOffset>) -> u64 {
    block.map_or(0, |o| o.0 & REFTABLE_OFFSET_MASK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reference_example_one_bit() {
        let block = [0xCFu8];
        let got: Vec<u64> = (0..8).map(|i| get(&block, i, 0)).collect();
        assert_eq!(got, [1, 1, 1, 1, 0, 0, 1, 1]);
        let mut b = [0u8];
        for (i, v) in got.iter().enumerate() {
            set(&mut b, i, 0, *v);
        }
        assert_eq!(b, [0xCF]);
    }

    #[test]
    fn widths_and_byte_layout() {
        assert_eq!(max_refcount(0), 1);
        assert_eq!(max_refcount(2), 15);
        assert_eq!(max_refcount(4), 65535);
        assert_eq!(max_refcount(6), u64::MAX);
        assert_eq!(entries_per_block(9, 0), 4096);
        assert_eq!(entries_per_block(16, 4), 32768);
        assert_eq!(entries_per_block(9, 6), 64);
        let mut b = [0u8; 16];
        set(&mut b, 1, 1, 3); // 2-bit entry 1: bits 2..3 of byte 0
        assert_eq!(b[0], 0b0000_1100);
        set(&mut b, 1, 2, 0xA); // 4-bit entry 1: high nibble of byte 0
        assert_eq!(b[0], 0xA0 | 0b1100);
        set(&mut b, 1, 4, 0x1234);
        assert_eq!(&b[2..4], &[0x12, 0x34]);
        set(&mut b, 1, 6, 0x0102_0304_0506_0708);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn reftable_entries() {
        assert_eq!(decode_reftable_entry(0, 9, 8).unwrap(), None);
        assert_eq!(
            decode_reftable_entry(0x10000, 16, 8).unwrap(),
            Some(HostOffset(0x10000))
        );
        let e = decode_reftable_entry(0x10001, 16, 0x10008).unwrap_err();
        assert_eq!(
            e.to_string(),
            "refcount table entry at offset 65544 (0x10008): 0x0000000000010001 has reserved bits 0..=8 set"
        );
        let e = decode_reftable_entry(0x10200, 16, 8).unwrap_err();
        assert!(e.to_string().contains("not cluster-aligned"), "{e}");
        assert_eq!(encode_reftable_entry(Some(HostOffset(0x600))), 0x600);
        assert_eq!(encode_reftable_entry(None), 0);
    }

    proptest! {
        /// Every order, the same random (index, value) sequence: after each
        /// set, every entry (neighbours included) matches a `Vec<u64>` model.
        #[test]
        fn get_set_match_a_vec_model(ops in proptest::collection::vec((any::<u16>(), any::<u64>()), 1..150)) {
            for order in 0..=MAX_ORDER {
                let mut block = [0u8; 64];
                let n = (64usize * 8) >> order;
                let mut model = vec![0u64; n];
                for &(index, raw) in &ops {
                    let (index, value) = (usize::from(index) % n, raw & max_refcount(order));
                    set(&mut block, index, order, value);
                    model[index] = value;
                    for (i, want) in model.iter().enumerate() {
                        prop_assert_eq!(get(&block, i, order), *want, "order {} entry {}", order, i);
                    }
                }
            }
        }
    }
}
