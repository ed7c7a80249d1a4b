//! Merges: `target |= source` within one image or from another, across
//! granularities. Only the target's data clusters that gain bits get new
//! clusters; nothing is written here (see `data.rs` for the commit).

use super::plan::{ClusterData, Pending};
use super::transaction::Transaction;
use crate::bits::{self, Bitmap};
use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap_table::TableEntry;
use crate::read::{BitmapEntry, Image, Table};
use crate::storage::WriteAt;
use crate::types::HostCluster;

/// A bitmap to merge from: its bits and granularity (log2).
#[derive(Debug)]
pub struct MergeSource<'a> {
    /// The source bits (`ceil(virtual_size / granularity)` of them).
    pub bits: &'a Bitmap,
    /// log2 of the source granularity.
    pub granularity_bits: u32,
    /// The source image's virtual size (must equal the target's).
    pub virtual_size: u64,
}

impl<S: WriteAt> Transaction<S> {
    /// Stages `target |= source` for two bitmaps of this image (as staged
    /// so far). With equal granularities the two are streamed cluster by
    /// cluster (memory: the target clusters that change); otherwise the
    /// source is loaded and resampled as in [`Transaction::merge`].
    ///
    /// # Errors
    /// `NotFound`, or `Untrusted` unless both are `ok`.
    pub fn merge_bitmap(&mut self, target: &str, source: &str) -> Result<()> {
        let j = self.position_ok(source, "merge from it")?;
        let i = self.position_ok(target, "merge into it")?;
        let (tg, sg) = (
            self.staged[i].entry.granularity_bits,
            self.staged[j].entry.granularity_bits,
        );
        if tg != sg {
            let bits = self.load_staged(j)?;
            let src = MergeSource {
                bits: &bits,
                granularity_bits: u32::from(sg),
                virtual_size: self.virtual_size(),
            };
            return self.merge(target, &src);
        }
        if i == j {
            return Ok(());
        }
        let changed = {
            let image = Image::open(&self.storage)?;
            let src = self.view(j)?;
            // Both bitmaps live in this image: a changed cluster whose
            // operands are all on disk is computed (again) when it is written,
            // so memory holds no cluster of data whatever the bitmap size.
            self.changed_clusters(
                i,
                &image,
                |k, w, b| src.words(&image, k, w, b),
                |k| src.operands(k),
            )?
        };
        self.replace_clusters(i, changed)
    }

    /// Stages `target |= name` for the bitmap `name` of another image;
    /// problems of the source (missing, untrusted, a bad table) are named
    /// with `source_name` (the source file's path as the caller shows it).
    ///
    /// # Errors
    /// As [`Transaction::merge_from_image`], and `NotFound`.
    pub fn merge_from_image_named<R: crate::storage::ReadAt>(
        &mut self,
        target: &str,
        image: &Image<R>,
        name: &str,
        source_name: &str,
    ) -> Result<()> {
        let ctx = |e: Error| e.context(source_name);
        let b = image.find(name).map_err(ctx)?;
        image.require_ok(b, false).map_err(ctx)?;
        let table = image.table(b).map_err(ctx)?;
        self.merge_from_image(target, image, b, &table)
    }

    /// Stages `target |= source` where `source` is a bitmap of another
    /// image and `table` its validated table (`image.table(source)`, which
    /// the caller has read to report source problems under its own name),
    /// streamed cluster by cluster when the granularities are equal.
    ///
    /// # Errors
    /// As [`Transaction::merge_bitmap`]; `Untrusted` unless `source` is
    /// `ok`; `InvalidInput` when the virtual sizes differ.
    pub fn merge_from_image<R: crate::storage::ReadAt>(
        &mut self,
        target: &str,
        image: &Image<R>,
        source: &BitmapEntry,
        table: &Table,
    ) -> Result<()> {
        image.require_ok(source, false)?;
        let i = self.position_ok(target, "merge into it")?;
        let same_gran = source.entry.granularity_bits == self.staged[i].entry.granularity_bits;
        if !same_gran || image.virtual_size() != self.virtual_size() {
            let bits = image.load(source, false)?;
            let src = MergeSource {
                bits: &bits,
                granularity_bits: u32::from(source.entry.granularity_bits),
                virtual_size: image.virtual_size(),
            };
            return self.merge(target, &src);
        }
        let changed = {
            let own = Image::open(&self.storage)?;
            self.changed_clusters(
                i,
                &own,
                |k, w, buf| {
                    let (first, end) = table.cluster_bits(k);
                    let entry = table.entries.get(k).copied().unwrap_or(TableEntry::Zeros);
                    image.entry_words(entry, end - first, w, buf)
                },
                // Another file's clusters are not readable at commit.
                |_| None,
            )?
        };
        self.replace_clusters(i, changed)
    }

    /// The target clusters of bitmap `i` that `source` (cluster `k` ->
    /// words, same layout) adds bits to, each with what its new data cluster
    /// holds: the OR of the on-disk operands of both sides when
    /// `source_operands` and the target have them (computed when written),
    /// else the merged words. A copy of one source data cluster into an
    /// all-zero target cluster is listed unread (see `data.rs`).
    fn changed_clusters<R: crate::storage::ReadAt>(
        &self,
        i: usize,
        image: &Image<R>,
        mut source: impl FnMut(usize, &mut Vec<u64>, &mut Vec<u8>) -> Result<()>,
        source_operands: impl Fn(usize) -> Option<Vec<TableEntry>>,
    ) -> Result<Vec<(usize, ClusterData)>> {
        let target = self.view(i)?;
        let (mut t, mut s, mut buf) = (Vec::new(), Vec::new(), Vec::new());
        let mut changed = Vec::new();
        for k in 0..target.raw.len() {
            // An all-zero target cluster and one on-disk source cluster: the
            // new cluster is a copy, planned without reading the source here
            // (the copy is made, and dropped if all zero, when it is written).
            if let (Some(t_ops), Some(s_ops)) = (target.operands(k), source_operands(k)) {
                match (&t_ops[..], &s_ops[..]) {
                    (_, []) => continue,
                    ([], [TableEntry::Data(_)]) => {
                        changed.push((k, ClusterData::Or(s_ops)));
                        continue;
                    }
                    _ => {}
                }
            }
            source(k, &mut s, &mut buf)?;
            if bits::words::is_all_zero(&s) {
                continue;
            }
            target.words(image, k, &mut t, &mut buf)?;
            if !t.iter().zip(&s).any(|(t, s)| s & !t != 0) {
                continue;
            }
            let deferred = target.operands(k).zip(source_operands(k));
            let data = match deferred {
                Some((mut ops, more)) => {
                    for e in more {
                        if !ops.contains(&e) {
                            ops.push(e);
                        }
                    }
                    ClusterData::Or(ops)
                }
                None => {
                    bits::words::or_into(&mut t, &s);
                    ClusterData::Words(std::mem::take(&mut t))
                }
            };
            changed.push((k, data));
        }
        Ok(changed)
    }

    /// Stages `target |= source`, resampling across granularities. Only the
    /// target's data clusters that change are rewritten; all-zero clusters
    /// stay unallocated.
    ///
    /// # Errors
    /// `NotFound`, `Untrusted` unless the target is `ok`, `InvalidInput` when
    /// the virtual sizes differ.
    pub fn merge(&mut self, target: &str, source: &MergeSource<'_>) -> Result<()> {
        let i = self.position_ok(target, "merge into it")?;
        if source.virtual_size != self.virtual_size() {
            let msg = format!(
                "destination size is {}, source size is {}: bitmaps of different sizes cannot be merged",
                self.virtual_size(),
                source.virtual_size
            );
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("bitmap '{target}'"),
                None,
                msg,
            ));
        }
        let mut merged = self.load_staged(i)?;
        let tgt_bits = u32::from(self.staged[i].entry.granularity_bits);
        let resampled;
        let src = if source.granularity_bits == tgt_bits && source.bits.len() == merged.len() {
            source.bits
        } else {
            let len = merged.len();
            resampled =
                bits::resample::resample(source.bits, source.granularity_bits, tgt_bits, len);
            &resampled
        };
        // A table cluster changes iff the source brings a bit the target lacks there.
        let words_per = self.geometry().cluster_len() / 8;
        let changed: Vec<bool> = merged
            .words()
            .chunks(words_per)
            .zip(src.words().chunks(words_per))
            .map(|(t, s)| t.iter().zip(s).any(|(t, s)| s & !t != 0))
            .collect();
        if !changed.contains(&true) {
            return Ok(());
        }
        merged
            .or_assign(src)
            .map_err(|e| Error::invalid_input("merge", e.to_string()))?;
        self.replace_changed_clusters(i, &changed, merged)
    }

    /// Plans a new table for bitmap `i` holding `merged`: clusters not marked
    /// in `changed` keep their entries, changed ones get new data clusters.
    pub(super) fn replace_changed_clusters(
        &mut self,
        i: usize,
        changed: &[bool],
        merged: Bitmap,
    ) -> Result<()> {
        let words_per = self.geometry().cluster_len() / 8;
        let clusters = changed
            .iter()
            .enumerate()
            .filter(|&(_, &c)| c)
            .map(|(k, _)| {
                let w = merged.words();
                let first = (k * words_per).min(w.len());
                let end = first.saturating_add(words_per).min(w.len());
                (k, ClusterData::Words(w[first..end].to_vec()))
            })
            .collect();
        self.replace_clusters(i, clusters)
    }

    /// Plans a new table for bitmap `i` in which each listed entry `k` gets
    /// a new data cluster holding its data; the other entries are kept.
    /// The new data clusters are one run of consecutive clusters wherever
    /// the allocator finds one, so that the commit writes them in few large
    /// writes. (Memory: the listed clusters' words, if they carry any; the
    /// old content is never copied.)
    pub(super) fn replace_clusters(
        &mut self,
        i: usize,
        clusters: Vec<(usize, ClusterData)>,
    ) -> Result<()> {
        if clusters.is_empty() {
            return Ok(());
        }
        let g = self.geometry();
        let old_raw = self.current_raw(i)?;
        let mut raw = old_raw.clone();
        let wanted = clusters.iter().filter(|(k, _)| *k < raw.len()).count() as u64;
        let mut next = if wanted > 0 {
            self.refcounts.allocate(&self.storage, wanted)?.0
        } else {
            0
        };
        let mut planned = Vec::with_capacity(clusters.len());
        for (k, data) in clusters {
            let Some(entry) = raw.get_mut(k) else {
                continue;
            };
            let c = HostCluster(next);
            next += 1;
            *entry = TableEntry::Data(g.offset_of(c).map(|o| o.0).unwrap_or(0)).encode();
            planned.push((k, (c, data)));
        }
        let table = self.allocate_clusters(g.clusters_for(raw.len() as u64 * 8))?;
        // Clusters planned earlier in this transaction and not replaced now
        // are still written at commit.
        let mut data = self.staged[i]
            .pending
            .take()
            .map(|p| p.data)
            .unwrap_or_default();
        data.extend(planned);
        // Old table and the data clusters no longer referenced are freed after commit.
        let s = &self.staged[i];
        let mut frees = vec![(
            g.cluster_of(crate::types::HostOffset(s.entry.table_offset)),
            g.clusters_for(old_raw.len() as u64 * 8),
        )];
        for (k, &r) in old_raw.iter().enumerate() {
            if r != raw[k] {
                if let TableEntry::Data(off) = TableEntry::decode(r, g) {
                    frees.push((g.cluster_of(crate::types::HostOffset(off)), 1));
                }
            }
        }
        self.frees.extend(frees);
        let s = &mut self.staged[i];
        s.entry.table_offset = table;
        s.pending = Some(Pending { raw, data });
        self.mark_changed();
        Ok(())
    }
}
