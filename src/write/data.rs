//! Step 1 of the commit: writing the planned data clusters and tables into
//! clusters nothing references yet.
//!
//! Data clusters are written in runs of consecutive host clusters, up to
//! [`MAX_WRITE`] bytes per write: a merge into an empty target allocates its
//! new clusters as one run, so 32 MiB of new bitmap data go out in eight
//! 4 MiB writes instead of 512 small ones. A cluster planned as the OR of
//! on-disk operands is computed here, into the write buffer; memory stays at
//! one buffer whatever the number of clusters. A copy planned unread (a
//! merge into an empty target) that comes out all zero is dropped here: its
//! table entry stays "all zeros" and its cluster is given back.

use super::plan::{ClusterData, or_entries};
use super::transaction::Transaction;
use crate::error::{Error, Result};
use crate::format::bitmap_table::TableEntry;
use crate::read::{Image, expected_dimensions};
use crate::storage::{ReadAt, WriteAt};
use crate::types::HostCluster;

/// Largest single write of data clusters.
const MAX_WRITE: usize = 4 << 20;

/// One planned data cluster: where, what, how many bits it holds, and
/// which entry of which table (in the list of tables to write) names it.
struct Planned {
    cluster: HostCluster,
    data: ClusterData,
    nbits: u64,
    table: usize,
    k: usize,
}

impl<S: WriteAt> Transaction<S> {
    /// Writes every planned data cluster and table (called by commit).
    pub(super) fn write_staged_clusters(&mut self) -> Result<()> {
        let g = self.geometry();
        let bits_per_cluster = g.cluster_size() * 8;
        let mut planned = Vec::new();
        let mut tables = Vec::new();
        for i in 0..self.staged.len() {
            let Some(p) = self.staged[i].pending.take() else {
                continue;
            };
            let gran = u32::from(self.staged[i].entry.granularity_bits);
            let nbits = expected_dimensions(self.virtual_size(), gran, g).map_or(0, |(n, _)| n);
            for (k, (cluster, data)) in p.data {
                let first = (k as u64).saturating_mul(bits_per_cluster).min(nbits);
                planned.push(Planned {
                    cluster,
                    data,
                    nbits: bits_per_cluster.min(nbits - first),
                    table: tables.len(),
                    k,
                });
            }
            tables.push((self.staged[i].entry.table_offset, p.raw));
        }
        // A copy that turned out all zero: its entry stays "all zeros" and its
        // cluster (allocated in memory only, never referenced) is given back.
        for (t, k, c) in self.write_data_clusters(planned)? {
            if let Some(r) = tables.get_mut(t).and_then(|(_, raw)| raw.get_mut(k)) {
                *r = 0;
            }
            self.refcounts.decrement(&self.storage, c)?;
        }
        for (off, raw) in tables {
            let mut table = Vec::with_capacity(raw.len() * 8);
            for r in &raw {
                table.extend_from_slice(&r.to_be_bytes());
            }
            table.resize(
                g.clusters_for(table.len() as u64) as usize * g.cluster_len(),
                0,
            );
            self.write(off, &table, "bitmap table")?;
        }
        Ok(())
    }

    /// Writes `planned` in runs of consecutive clusters, each run computed
    /// into one buffer of at most [`MAX_WRITE`] bytes and written at once.
    /// Returns the copies that came out all zero: (table, entry, cluster).
    fn write_data_clusters(
        &mut self,
        mut planned: Vec<Planned>,
    ) -> Result<Vec<(usize, usize, HostCluster)>> {
        let mut empty = Vec::new();
        let g = self.geometry();
        let cs = g.cluster_len();
        let per_write = (MAX_WRITE / cs).max(1);
        planned.sort_by_key(|p| p.cluster.0);
        let mut buf = Vec::new();
        let (mut words, mut bytes) = (Vec::new(), Vec::new());
        let mut start = 0;
        while start < planned.len() {
            let mut end = start + 1;
            while end < planned.len()
                && end - start < per_write
                && planned[end].cluster.0 == planned[end - 1].cluster.0 + 1
            {
                end += 1;
            }
            buf.clear();
            buf.resize((end - start) * cs, 0);
            {
                let image = Image::open(&self.storage)?;
                for (p, slot) in planned[start..end].iter().zip(buf.chunks_exact_mut(cs)) {
                    let w = match &p.data {
                        ClusterData::Words(w) => w,
                        // A copy of one data cluster (a merge into an empty
                        // target): its bytes straight into the buffer.
                        ClusterData::Or(entries) if copies_one(entries) => {
                            copy_bits(&self.storage, entries, p.nbits, slot)?;
                            if slot.iter().all(|&b| b == 0) {
                                empty.push((p.table, p.k, p.cluster));
                            }
                            continue;
                        }
                        ClusterData::Or(entries) => {
                            or_entries(&image, entries, p.nbits, &mut words, &mut bytes)?;
                            &words
                        }
                    };
                    crate::bits::bytes::words_to_le_bytes(w, slot);
                }
            }
            let off = g.offset_of(planned[start].cluster).map_or(0, |o| o.0);
            self.write(off, &buf, "bitmap data clusters")?;
            start = end;
        }
        Ok(empty)
    }
}

/// Whether `entries` is one data cluster (its OR is a copy of it).
fn copies_one(entries: &[TableEntry]) -> bool {
    matches!(entries, [TableEntry::Data(_)])
}

/// Copies the first `nbits` bits of the data cluster `entries[0]` names into
/// the zeroed `slot`, clearing the bits past `nbits` in its last byte (as
/// [`or_entries`] would).
fn copy_bits<S: ReadAt>(
    storage: &S,
    entries: &[TableEntry],
    nbits: u64,
    slot: &mut [u8],
) -> Result<()> {
    let [TableEntry::Data(off)] = entries else {
        return Ok(());
    };
    let nbytes = usize::try_from(nbits.div_ceil(8))
        .unwrap_or(usize::MAX)
        .min(slot.len());
    storage
        .copy_at(*off, &mut slot[..nbytes])
        .map_err(|e| Error::io("bitmap data cluster", Some(*off), e))?;
    let tail = (nbits % 8) as u32;
    if let (Some(last), true) = (slot[..nbytes].last_mut(), tail != 0) {
        *last &= (1u8 << tail) - 1;
    }
    Ok(())
}
