//! Where a qcow2 layer's own metadata lives (header cluster, refcount table
//! and blocks, active L1 table), so that an L1 or L2 entry pointing into it
//! is refused instead of read as guest data.

use crate::error::{Error, Result};
use crate::format::header::Header;
use crate::format::refcount::REFTABLE_OFFSET_MASK;
use crate::storage::ReadAt;

/// QEMU's refcount table limit (8 MiB).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// Sorted, disjoint byte ranges of metadata, each with what it is.
#[derive(Debug, Default)]
pub struct Metadata {
    ranges: Vec<(u64, u64, &'static str)>,
}

impl Metadata {
    /// Collects the metadata ranges of the image in `storage`.
    ///
    /// # Errors
    /// A refcount table larger than QEMU accepts, or an I/O error reading it.
    pub fn collect<S: ReadAt>(storage: &S, h: &Header) -> Result<Self> {
        let cs = h.geometry().cluster_size();
        let file_len = storage.len();
        let mut ranges = vec![(0, cs, "image header")];
        let rt_len = u64::from(h.refcount_table_clusters) * cs;
        if rt_len > MAX_REFTABLE_BYTES {
            return Err(Error::corrupt(
                "qcow2 header refcount_table_clusters",
                56,
                format!(
                    "{} clusters exceed QEMU's 8 MiB refcount table limit",
                    h.refcount_table_clusters
                ),
            ));
        }
        if rt_len > 0 {
            let rt = h.refcount_table_offset;
            ranges.push((rt, rt.saturating_add(rt_len), "refcount table"));
            // Only the part inside the file can name refcount blocks.
            let readable = file_len.saturating_sub(rt).min(rt_len);
            let mut table = vec![0u8; usize::try_from(readable).unwrap_or(0)];
            if !table.is_empty() {
                storage
                    .copy_at(rt, &mut table)
                    .map_err(|e| Error::io("refcount table", Some(rt), e))?;
            }
            for e in table.chunks_exact(8) {
                let mut a = [0u8; 8];
                a.copy_from_slice(e);
                let off = u64::from_be_bytes(a) & REFTABLE_OFFSET_MASK;
                if off != 0 && off % cs == 0 && off < file_len {
                    ranges.push((off, off + cs, "refcount block"));
                }
            }
        }
        if h.l1_size > 0 {
            let l1 = h.l1_table_offset;
            let len = (u64::from(h.l1_size) * 8).next_multiple_of(cs);
            ranges.push((l1, l1.saturating_add(len), "L1 table"));
        }
        ranges.sort_unstable_by_key(|r| r.0);
        let mut merged: Vec<(u64, u64, &'static str)> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if r.0 < last.1 => last.1 = last.1.max(r.1),
                _ => merged.push(r),
            }
        }
        Ok(Metadata { ranges: merged })
    }

    /// What metadata `[off, off + len)` overlaps, if any.
    pub fn hit(&self, off: u64, len: u64) -> Option<&'static str> {
        let end = off.saturating_add(len.max(1));
        // The last range starting before `end`.
        let i = self.ranges.partition_point(|r| r.0 < end);
        let r = self.ranges.get(i.checked_sub(1)?)?;
        (r.1 > off).then_some(r.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_and_misses() {
        let m = Metadata {
            ranges: vec![(0, 100, "image header"), (200, 300, "L1 table")],
        };
        assert_eq!(m.hit(0, 1), Some("image header"));
        assert_eq!(m.hit(99, 1), Some("image header"));
        assert_eq!(m.hit(100, 100), None);
        assert_eq!(m.hit(150, 51), Some("L1 table"));
        assert_eq!(m.hit(299, 10), Some("L1 table"));
        assert_eq!(m.hit(300, 10), None);
        assert_eq!(m.hit(u64::MAX - 1, 10), None);
    }
}
