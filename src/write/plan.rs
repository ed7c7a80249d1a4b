//! What a transaction plans for each bitmap: its new directory entry and, when
//! its content changes, the new table and data clusters to write at commit.

use crate::bits::Bitmap;
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
}

/// A new table (and possibly new data clusters) not yet written.
#[derive(Debug)]
pub struct Pending {
    /// Raw table entries, big-endian encoded at commit.
    pub raw: Vec<u64>,
    /// The bitmap whose clusters `writes` serializes (None: no data clusters).
    pub bitmap: Option<Bitmap>,
    /// Table entry index -> newly allocated data cluster.
    pub writes: Vec<(usize, HostCluster)>,
}

impl Staged {
    /// A bitmap as found on disk.
    pub fn on_disk(b: &BitmapEntry) -> Self {
        Staged {
            entry: b.entry.clone(),
            state: b.state,
            pending: None,
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

/// The `cluster_len` bytes of table entry `k`'s data, from `bitmap`.
pub fn cluster_bytes(bitmap: &Bitmap, k: usize, g: Geometry) -> Vec<u8> {
    let words_per = g.cluster_len() / 8;
    let first = k * words_per;
    let words = bitmap.words();
    let end = (first + words_per).min(words.len());
    let mut out = vec![0u8; g.cluster_len()];
    if first < end {
        crate::bits::bytes::words_to_le_bytes(&words[first..end], &mut out);
    }
    out
}
