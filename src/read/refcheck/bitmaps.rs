//! The bitmap owners of the refcount walk: the directory, each entry's table
//! and the data clusters its valid table entries name.
//!
//! What an entry owns is bounded by what it can provably reference:
//!
//! - A table entry that is itself malformed (reserved bits, a misaligned
//!   offset) references nothing; the walk reports it and goes on with the
//!   next one, so every valid entry after it is still counted (qemu-img check
//!   stops there: [`super::RefcountReport::aborted`] says so, but the walk is
//!   not [`super::RefcountReport::incomplete`]).
//! - An entry whose table_size is impossible for the virtual size and its
//!   granularity (larger than the table that granularity needs, or than the
//!   largest table any valid granularity needs when the granularity itself is
//!   invalid) is read only up to that size, and of that table it owns only the
//!   clusters that lie inside the file and are refcounted (and the data
//!   clusters its valid entries there name, under the same two conditions).
//!   Without the bound, 0x7FFFFFFF entries would make whatever follows the
//!   table (refcount blocks, guest data) look like table entries naming
//!   clusters the entry cannot own.
//!
//! Removing a bitmap whose table cannot be trusted frees through this walk
//! ([`bitmap_claims`] lists what to look at); `repair` frees what it proves
//! leaked after its rewrite.

use std::collections::{BTreeMap, HashMap};

use super::{Owner, Stored, Walker, read_clipped};
use crate::error::Result;
use crate::format::bitmap_table::{self, OFFSET_MASK, TableEntry};
use crate::format::bitmaps_ext::BitmapsExt;
use crate::format::directory::{self, DirEntry};
use crate::format::{ext_type, limits};
use crate::read::{Image, expected_dimensions};
use crate::storage::ReadAt;
use crate::types::Geometry;

/// What one bitmap table references: `(data cluster offset, times)` in
/// offset order, and its first invalid entry `(index, raw, why)`.
struct TableRefs {
    /// Table clusters owned (all of them unless the size is impossible).
    table: Vec<u64>,
    data: Vec<(u64, u64)>,
    invalid: Option<(usize, u64, String)>,
}

/// The most table entries `e` can provably have: its table_size, unless that
/// is impossible for the virtual size and granularity; then the size the
/// granularity needs (for an invalid granularity, the largest size any valid
/// one needs), never more than the format's limits.
pub(crate) fn table_bound(virtual_size: u64, g: Geometry, e: &DirEntry) -> (u32, bool) {
    let valid =
        (limits::MIN_GRANULARITY_BITS..=limits::MAX_GRANULARITY_BITS).contains(&e.granularity_bits);
    let gbits = if valid {
        e.granularity_bits
    } else {
        limits::MIN_GRANULARITY_BITS
    };
    let needed = expected_dimensions(virtual_size, u32::from(gbits), g).map_or(0, |(_, t)| t);
    let format_max =
        (limits::MAX_PHYS_SIZE / g.cluster_size()).min(u64::from(limits::MAX_TABLE_SIZE));
    let cap = needed.min(format_max);
    if u64::from(e.table_size) <= cap {
        (e.table_size, false)
    } else {
        // cap < table_size <= u32::MAX
        (u32::try_from(cap).unwrap_or(0), true)
    }
}

impl<S: ReadAt> Walker<'_, S> {
    pub(super) fn walk_bitmaps(&mut self, stored: &Stored<'_, S>) -> Result<()> {
        if !self.image.bitmaps_consistent() {
            return Ok(());
        }
        let Some(ext) = self
            .image
            .extensions()
            .iter()
            .find(|e| e.kind == ext_type::BITMAPS)
        else {
            return Ok(());
        };
        let Ok(bx) = BitmapsExt::decode(&ext.data, ext.offset + 8) else {
            return Ok(());
        };
        if bx.nb_bitmaps == 0 {
            return Ok(());
        }
        let dir_offset = bx.directory_offset;
        self.inc(dir_offset, bx.directory_size, Owner::BitmapDirectory);
        let len = bx.directory_size.min(limits::MAX_DIRECTORY_SIZE);
        let bytes = read_clipped(self.image.storage(), dir_offset, len)?;
        let dir = directory::walk(&bytes, dir_offset, bx.nb_bitmaps);
        if let Some(p) = dir.problem {
            self.corruption(format!("bitmap directory: {p}"));
            self.report.aborted = Some(p.to_string());
            self.report.incomplete = Some(p.to_string());
        }
        // Entries naming the same table share one walk of it: 65535 entries
        // on one table cost one table read, not 65535.
        let mut walked: HashMap<(u64, u32, bool), TableRefs> = HashMap::new();
        for (i, e) in dir.entries.iter().enumerate() {
            self.report.bitmap_names.push(e.name_lossy());
            let bitmap = i as u32;
            let (entries, impossible) = table_bound(self.image.virtual_size(), self.g, e);
            let key = (e.table_offset, entries, impossible);
            if let std::collections::hash_map::Entry::Vacant(slot) = walked.entry(key) {
                slot.insert(self.table_refs(e.table_offset, entries, impossible, stored)?);
            }
            let Some(refs) = walked.get(&key) else {
                continue;
            };
            if impossible {
                for &c in &refs.table {
                    self.inc(c, self.g.cluster_size(), Owner::BitmapTable { bitmap });
                }
            } else {
                let table_len = u64::from(entries) * 8;
                self.inc(e.table_offset, table_len, Owner::BitmapTable { bitmap });
            }
            for &(off, n) in &refs.data {
                self.inc_n(off, self.g.cluster_size(), Owner::BitmapData { bitmap }, n);
            }
            if let Some((k, raw, why)) = &refs.invalid {
                let msg = format!(
                    "bitmap '{}' table entry {k} (0x{raw:016x}): {why}",
                    e.display_name()
                );
                self.corruption(msg.clone());
                // qemu-img check stops here ("Check failed"); this walk goes on.
                self.report.aborted = Some(msg);
            }
        }
        Ok(())
    }

    /// Whether the cluster at `off` lies inside the file and has a nonzero refcount.
    fn provable(&self, stored: &Stored<'_, S>, off: u64) -> Result<bool> {
        if off >= self.image.storage().len() {
            return Ok(false);
        }
        Ok(stored
            .get(off >> self.g.cluster_bits())?
            .is_some_and(|r| r > 0))
    }

    /// What the first `entries` entries of the table at `offset` reference:
    /// the data clusters of its valid entries (with multiplicity) and its
    /// first invalid entry. With `impossible`, only the table clusters and
    /// data clusters that [`Self::provable`] accepts, and only the entries
    /// that lie in such a table cluster.
    fn table_refs(
        &self,
        offset: u64,
        entries: u32,
        impossible: bool,
        stored: &Stored<'_, S>,
    ) -> Result<TableRefs> {
        let len = u64::from(entries) * 8;
        let table = read_clipped(self.image.storage(), offset, len)?;
        let cb = self.g.cluster_bits();
        let first = offset >> cb;
        // Which of the table's clusters it owns (every one unless impossible).
        let mut owned = Vec::new();
        let mut table_clusters = Vec::new();
        if impossible && len > 0 {
            for c in first..=(offset + (len - 1)) >> cb {
                let ok = self.provable(stored, c << cb)?;
                owned.push(ok);
                if ok {
                    table_clusters.push(c << cb);
                }
            }
        }
        let mut counts: BTreeMap<u64, u64> = BTreeMap::new();
        let mut invalid = None;
        for (k, raw) in bitmap_table::raw_entries(&table).enumerate() {
            if impossible {
                let at = ((offset + 8 * k as u64) >> cb) - first;
                if !owned.get(at as usize).copied().unwrap_or(false) {
                    continue;
                }
            }
            match TableEntry::decode(raw, self.g) {
                TableEntry::Data(off) => {
                    if !impossible || self.provable(stored, off)? {
                        *counts.entry(off).or_insert(0) += 1;
                    }
                }
                TableEntry::Invalid(why) => {
                    invalid.get_or_insert_with(|| (k, raw, why.to_string()));
                }
                TableEntry::Zeros | TableEntry::Ones => {}
            }
        }
        Ok(TableRefs {
            table: table_clusters,
            data: counts.into_iter().collect(),
            invalid,
        })
    }
}

/// Every host cluster that directory entry `e` names, as offsets, each once
/// and in increasing order: the clusters of its table (up to the bound the
/// owner walk applies) and the cluster of every nonzero offset field of those
/// table entries, valid or malformed. A superset of what the walk counts for
/// it: what is freed among them is decided by the walk's counts.
///
/// # Errors
/// I/O failures reading the table.
pub fn bitmap_claims<S: ReadAt>(image: &Image<S>, e: &DirEntry) -> Result<Vec<u64>> {
    let g = image.geometry();
    let (entries, _) = table_bound(image.virtual_size(), g, e);
    let len = u64::from(entries) * 8;
    let mut out = Vec::new();
    if len == 0 {
        return Ok(out);
    }
    let cb = g.cluster_bits();
    let (first, last) = (
        e.table_offset >> cb,
        e.table_offset.saturating_add(len - 1) >> cb,
    );
    out.extend((first..=last).map(|c| c << cb));
    let table = read_clipped(image.storage(), e.table_offset, len)?;
    for raw in bitmap_table::raw_entries(&table) {
        let off = raw & OFFSET_MASK;
        if off != 0 {
            out.push(off >> cb << cb);
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}
