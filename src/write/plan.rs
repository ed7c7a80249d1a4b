//! What a transaction plans for each bitmap: its new directory entry and, when
//! its content changes, the new table and data clusters to write at commit.

use std::collections::BTreeMap;

use crate::bits;
use crate::error::Result;
use crate::format::bitmap_table::TableEntry;
use crate::format::directory::DirEntry;
use crate::read::{BitmapEntry, BitmapState, Image};
use crate::storage::ReadAt;
use crate::types::{Geometry, HostCluster, HostOffset};

/// One bitmap of the directory being built.
#[derive(Debug)]
pub struct Staged {
    /// The entry to write (table offset and size point at the current content).
    pub entry: DirEntry,
    /// State at `begin` (a new bitmap is `ok`).
    pub state: BitmapState,
    /// New content planned in this transaction, if any.
    pub pending: Option<Pending>,
    /// Its index in the on-disk directory (None for a bitmap added in this transaction).
    pub disk_index: Option<usize>,
}

/// A new table (and possibly new data clusters) not yet written.
#[derive(Debug)]
pub struct Pending {
    /// Raw table entries, big-endian encoded at commit.
    pub raw: Vec<u64>,
    /// Table entry index -> newly allocated data cluster and what to write
    /// there. Entries not listed keep what `raw` says (zeros, ones, or an old
    /// data cluster that stays untouched until after commit).
    pub data: BTreeMap<usize, (HostCluster, ClusterData)>,
}

/// What a newly planned data cluster will hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterData {
    /// These words (the cluster's bits; the rest of the cluster is zero).
    Words(Vec<u64>),
    /// The OR of these entries as they are on disk (all ones, or data
    /// clusters, which stay untouched until after the commit), computed when
    /// the cluster is written: a merge within one image holds no cluster of
    /// data in memory, however many clusters change.
    Or(Vec<TableEntry>),
}

impl Staged {
    /// A bitmap as found on disk.
    pub fn on_disk(b: &BitmapEntry) -> Self {
        Staged {
            entry: b.entry.clone(),
            state: b.state,
            pending: None,
            disk_index: Some(b.index),
        }
    }

    /// A read-path view of the current entry (for loading its content).
    pub fn as_entry(&self, index: usize) -> BitmapEntry {
        BitmapEntry {
            index,
            entry: self.entry.clone(),
            state: BitmapState::Ok,
            problems: Vec::new(),
        }
    }
}

/// Cluster runs `(first, count)` that a table at `table_offset` with these raw
/// entries occupies: the table itself and every data cluster.
pub fn content_clusters(g: Geometry, table_offset: u64, raw: &[u64]) -> Vec<(HostCluster, u64)> {
    let mut out = vec![(
        g.cluster_of(HostOffset(table_offset)),
        g.clusters_for(raw.len() as u64 * 8),
    )];
    for &r in raw {
        if let TableEntry::Data(off) = TableEntry::decode(r, g) {
            out.push((g.cluster_of(HostOffset(off)), 1));
        }
    }
    out
}

/// A staged bitmap read cluster by cluster: planned clusters from memory or
/// from their on-disk operands, the others as its table says (old data
/// clusters stay intact until after commit).
pub struct StagedView<'a> {
    /// Its table entries as staged.
    pub raw: Vec<u64>,
    /// Its planned data clusters, if any.
    pub data: Option<&'a BTreeMap<usize, (HostCluster, ClusterData)>>,
    /// Number of bits of the bitmap.
    pub nbits: u64,
    /// Bits per data cluster.
    pub bits_per_cluster: u64,
    /// The image's geometry.
    pub geometry: Geometry,
}

impl StagedView<'_> {
    /// Bits of table entry `k`.
    pub fn bits_of(&self, k: usize) -> u64 {
        let first = (k as u64)
            .saturating_mul(self.bits_per_cluster)
            .min(self.nbits);
        self.bits_per_cluster.min(self.nbits - first)
    }

    /// The words of table entry `k` (its bits only, the tail cleared).
    pub fn words<R: ReadAt>(
        &self,
        image: &Image<R>,
        k: usize,
        words: &mut Vec<u64>,
        bytes: &mut Vec<u8>,
    ) -> Result<()> {
        let n = self.bits_of(k);
        match self.data.and_then(|d| d.get(&k)) {
            Some((_, ClusterData::Words(w))) => {
                words.clear();
                words.extend_from_slice(w);
                words.resize(bits::words_for(n), 0);
                let total = words.len() as u64 * 64;
                bits::words::clear_range(words, n..total);
                Ok(())
            }
            Some((_, ClusterData::Or(entries))) => or_entries(image, entries, n, words, bytes),
            None => {
                let raw = self.raw.get(k).copied().unwrap_or(0);
                image.entry_words(TableEntry::decode(raw, self.geometry), n, words, bytes)
            }
        }
    }

    /// Entry `k` as on-disk operands whose OR it is (none for all zeros), or
    /// None when it is held as words in memory.
    pub fn operands(&self, k: usize) -> Option<Vec<TableEntry>> {
        match self.data.and_then(|d| d.get(&k)) {
            Some((_, ClusterData::Words(_))) => None,
            Some((_, ClusterData::Or(entries))) => Some(entries.clone()),
            None => {
                let raw = self.raw.get(k).copied().unwrap_or(0);
                Some(match TableEntry::decode(raw, self.geometry) {
                    TableEntry::Zeros => Vec::new(),
                    e => vec![e],
                })
            }
        }
    }
}

/// The OR of `entries` as they are on disk, `n` bits of it, into `words`.
pub fn or_entries<R: ReadAt>(
    image: &Image<R>,
    entries: &[TableEntry],
    n: u64,
    words: &mut Vec<u64>,
    bytes: &mut Vec<u8>,
) -> Result<()> {
    words.clear();
    words.resize(bits::words_for(n), 0);
    let mut one = Vec::new();
    for &e in entries {
        image.entry_words(e, n, &mut one, bytes)?;
        bits::words::or_into(words, &one);
    }
    Ok(())
}
