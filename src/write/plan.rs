//! What a transaction plans for each bitmap: its new directory entry and, when
//! its content changes, the new table and data clusters to write at commit.

use std::collections::BTreeMap;

use crate::format::bitmap_table::TableEntry;
use crate::format::directory::DirEntry;
use crate::read::{BitmapEntry, BitmapState};
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
    /// Table entry index -> newly allocated data cluster and the words to
    /// write there. Entries not listed keep what `raw` says (zeros, ones,
    /// or an old data cluster that stays untouched until after commit).
    pub data: BTreeMap<usize, (HostCluster, Vec<u64>)>,
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

/// The `cluster_len` bytes of one data cluster holding `words`.
pub fn cluster_bytes(words: &[u64], g: Geometry) -> Vec<u8> {
    let mut out = vec![0u8; g.cluster_len()];
    crate::bits::bytes::words_to_le_bytes(words, &mut out);
    out
}
