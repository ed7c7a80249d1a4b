//! The bitmap operations of a [`Transaction`]: add, remove, clear, enable,
//! disable and merge. Each validates first and plans; nothing is written here.

use super::plan::{Pending, Staged, cluster_bytes, content_clusters};
use super::transaction::Transaction;
use crate::bits::{self, Bitmap};
use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap_table::TableEntry;
use crate::format::directory::{DirEntry, FLAG_AUTO};
use crate::format::limits;
use crate::read::{BitmapEntry, BitmapState, Image, Table, expected_dimensions};
use crate::storage::WriteAt;

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

/// QEMU's default granularity: the cluster size clamped to 4 KiB..64 KiB.
pub fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

fn check_name(name: &str) -> Result<()> {
    let bad = |msg: &str| Err(Error::invalid_input("bitmap name", msg.to_string()));
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > usize::from(limits::MAX_NAME_SIZE) {
        return bad(&format!(
            "is {} bytes long, over the limit of 1023",
            name.len()
        ));
    }
    if name.contains('\0') {
        return bad("contains a NUL byte");
    }
    Ok(())
}

/// log2 of `granularity`, which must be a power of two in 512 B ..= 2 GiB.
pub fn granularity_bits(granularity: u64) -> Result<u8> {
    let ok = granularity.is_power_of_two() && (512..=1 << 31).contains(&granularity);
    if !ok {
        let msg = format!("{granularity} is not a power of two between 512 and 2147483648 (2G)");
        return Err(Error::invalid_input("granularity", msg));
    }
    Ok(granularity.trailing_zeros() as u8)
}

impl<S: WriteAt> Transaction<S> {
    /// Stages a new empty bitmap (`granularity` None = QEMU's default).
    ///
    /// # Errors
    /// `InvalidInput` for a bad or duplicate name, a bad granularity, a bitmap
    /// over 512 MiB, the 65536th bitmap or a zero-size disk.
    pub fn add(&mut self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        check_name(name)?;
        if self.position(name).is_ok() {
            return Err(Error::invalid_input(
                format!("bitmap '{name}'"),
                "already exists",
            ));
        }
        if self.staged.len() >= limits::MAX_BITMAPS as usize {
            return Err(Error::invalid_input(
                "bitmap count",
                "the image already holds 65535 bitmaps, QEMU's maximum",
            ));
        }
        let g = self.geometry();
        let gran_bits =
            granularity_bits(granularity.unwrap_or_else(|| default_granularity(g.cluster_size())))?;
        let table_size = self.table_size_for(gran_bits)?;
        let table = self.allocate_clusters(g.clusters_for(table_size * 8))?;
        let entry = DirEntry {
            offset: 0,
            table_offset: table,
            table_size: table_size as u32,
            flags: if enabled { FLAG_AUTO } else { 0 },
            kind: 1,
            granularity_bits: gran_bits,
            name: name.as_bytes().to_vec(),
            extra_data: Vec::new(),
            padding_is_zero: true,
        };
        let pending = Pending {
            raw: vec![0; table_size as usize],
            data: Default::default(),
        };
        self.staged.push(Staged {
            entry,
            state: BitmapState::Ok,
            pending: Some(pending),
            disk_index: None,
        });
        self.mark_changed();
        Ok(())
    }

    fn table_size_for(&self, gran_bits: u8) -> Result<u64> {
        let size = self.virtual_size();
        if size == 0 {
            return Err(Error::invalid_input(
                "image",
                "a disk of virtual size 0 cannot hold a bitmap",
            ));
        }
        let g = self.geometry();
        let (nbits, table_size) =
            expected_dimensions(size, u32::from(gran_bits), g).unwrap_or((u64::MAX, u64::MAX));
        let bytes = nbits.div_ceil(8);
        if bytes > limits::MAX_PHYS_SIZE
            || table_size.saturating_mul(g.cluster_size()) > limits::MAX_PHYS_SIZE
        {
            let msg = format!(
                "{} needs {bytes} bytes of bitmap, over the 512 MiB limit; use a larger granularity",
                1u64 << gran_bits
            );
            return Err(Error::invalid_input("granularity", msg));
        }
        Ok(table_size)
    }

    fn allocate_clusters(&mut self, count: u64) -> Result<u64> {
        let first = self.refcounts.allocate(&self.storage, count)?;
        self.geometry()
            .offset_of(first)
            .map(|o| o.0)
            .ok_or_else(|| Error::invalid_input("allocation", "cluster offset overflows"))
    }

    /// Stages the removal of bitmaps (any state). Names must be distinct and exist.
    ///
    /// # Errors
    /// `NotFound` for a missing name, `InvalidInput` for a repeated one.
    pub fn remove(&mut self, names: &[&str]) -> Result<()> {
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(Error::invalid_input(format!("bitmap '{n}'"), "named twice"));
            }
            self.position(n)?;
        }
        for n in names {
            let i = self.position(n)?;
            self.release_content(i)?;
            self.staged.remove(i);
        }
        self.mark_changed();
        Ok(())
    }

    /// Queues the clusters of bitmap `i`'s current content for freeing.
    /// Content of an invalid entry, or whose table cannot be trusted, is
    /// freed only where the owner walk proves it (see `release.rs`), never by
    /// assumption.
    fn release_content(&mut self, i: usize) -> Result<()> {
        let g = self.geometry();
        let s = &self.staged[i];
        let trusted = || match s.state {
            BitmapState::Invalid => None,
            _ => self.on_disk_raw(i),
        };
        let runs = match &s.pending {
            Some(p) => content_clusters(g, s.entry.table_offset, &p.raw),
            None => match trusted() {
                Some(raw) => content_clusters(g, s.entry.table_offset, &raw),
                None => return self.release_by_walk(i),
            },
        };
        self.frees.extend(runs);
        Ok(())
    }

    /// The validated on-disk table of bitmap `i`, or None if it cannot be trusted.
    fn on_disk_raw(&self, i: usize) -> Option<Vec<u64>> {
        self.validated_raw(i).ok()
    }

    /// The on-disk table of bitmap `i`, validated, as raw entries (read once:
    /// a validated table holds no invalid entry, so encoding gives the raw value back).
    fn validated_raw(&self, i: usize) -> Result<Vec<u64>> {
        let image = Image::open(&self.storage)?;
        let table = image.table(&self.staged[i].as_entry(i))?;
        Ok(table.entries.iter().map(|e| e.encode()).collect())
    }

    /// Stages clearing a bitmap: a new all-zero table, old clusters freed.
    ///
    /// # Errors
    /// `NotFound`, or `Untrusted` unless the bitmap is `ok`.
    pub fn clear(&mut self, name: &str) -> Result<()> {
        let i = self.position_ok(name, "clear it")?;
        let size = u64::from(self.staged[i].entry.table_size);
        let table = self.allocate_clusters(self.geometry().clusters_for(size * 8))?;
        self.release_content(i)?;
        let s = &mut self.staged[i];
        s.entry.table_offset = table;
        s.pending = Some(Pending {
            raw: vec![0; size as usize],
            data: Default::default(),
        });
        self.mark_changed();
        Ok(())
    }

    /// Stages enabling (recording) or disabling a bitmap: flags only.
    ///
    /// # Errors
    /// `NotFound`, or `Untrusted` unless the bitmap is `ok`.
    pub fn set_enabled(&mut self, name: &str, enabled: bool) -> Result<()> {
        let i = self.position_ok(name, if enabled { "enable it" } else { "disable it" })?;
        let e = &mut self.staged[i].entry;
        let flags = if enabled {
            e.flags | FLAG_AUTO
        } else {
            e.flags & !FLAG_AUTO
        };
        if flags != e.flags {
            e.flags = flags;
            self.mark_changed();
        }
        Ok(())
    }

    /// The current bits of bitmap `i` (as staged so far).
    pub(super) fn load_staged(&self, i: usize) -> Result<Bitmap> {
        let view = self.view(i)?;
        let image = Image::open(&self.storage)?;
        let mut words = Vec::with_capacity(bits::words_for(view.nbits));
        let (mut w, mut buf) = (Vec::new(), Vec::new());
        for k in 0..view.raw.len() {
            view.words(&image, k, &mut w, &mut buf)?;
            words.extend_from_slice(&w);
        }
        Ok(Bitmap::from_words(words, view.nbits))
    }

    /// Bitmap `i` as staged so far, readable cluster by cluster.
    fn view(&self, i: usize) -> Result<StagedView<'_>> {
        let s = &self.staged[i];
        let (nbits, _) = expected_dimensions(
            self.virtual_size(),
            u32::from(s.entry.granularity_bits),
            self.geometry(),
        )
        .unwrap_or((0, 0));
        Ok(StagedView {
            raw: self.current_raw(i)?,
            data: s.pending.as_ref().map(|p| &p.data),
            nbits,
            bits_per_cluster: self.geometry().cluster_size() * 8,
            geometry: self.geometry(),
        })
    }

    /// Loads bitmap `name` of this image as a merge source.
    ///
    /// # Errors
    /// `NotFound`, or `Untrusted` unless it is `ok`.
    pub fn load(&self, name: &str) -> Result<(Bitmap, u32)> {
        let i = self.position_ok(name, "merge from it")?;
        Ok((
            self.load_staged(i)?,
            u32::from(self.staged[i].entry.granularity_bits),
        ))
    }

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
            self.changed_clusters(i, &image, |k, w, b| src.words(&image, k, w, b))?
        };
        self.replace_clusters(i, changed)
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
            self.changed_clusters(i, &own, |k, w, buf| {
                let (first, end) = table.cluster_bits(k);
                let entry = table.entries.get(k).copied().unwrap_or(TableEntry::Zeros);
                image.entry_words(entry, end - first, w, buf)
            })?
        };
        self.replace_clusters(i, changed)
    }

    /// The target clusters of bitmap `i` that `source` (cluster `k` ->
    /// words, same layout) adds bits to, with their merged words.
    fn changed_clusters<R: crate::storage::ReadAt>(
        &self,
        i: usize,
        image: &Image<R>,
        mut source: impl FnMut(usize, &mut Vec<u64>, &mut Vec<u8>) -> Result<()>,
    ) -> Result<Vec<(usize, Vec<u64>)>> {
        let target = self.view(i)?;
        let (mut t, mut s, mut buf) = (Vec::new(), Vec::new(), Vec::new());
        let mut changed = Vec::new();
        for k in 0..target.raw.len() {
            source(k, &mut s, &mut buf)?;
            if bits::words::is_all_zero(&s) {
                continue;
            }
            target.words(image, k, &mut t, &mut buf)?;
            if t.iter().zip(&s).any(|(t, s)| s & !t != 0) {
                bits::words::or_into(&mut t, &s);
                changed.push((k, std::mem::take(&mut t)));
            }
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
                (k, w[first..end].to_vec())
            })
            .collect();
        self.replace_clusters(i, clusters)
    }

    /// Plans a new table for bitmap `i` in which each listed entry `k` gets
    /// a new data cluster holding its words; the other entries are kept.
    /// (Memory: the listed clusters; the old content is never copied.)
    pub(super) fn replace_clusters(
        &mut self,
        i: usize,
        clusters: Vec<(usize, Vec<u64>)>,
    ) -> Result<()> {
        if clusters.is_empty() {
            return Ok(());
        }
        let g = self.geometry();
        let old_raw = self.current_raw(i)?;
        let mut raw = old_raw.clone();
        let mut planned = Vec::with_capacity(clusters.len());
        for (k, words) in clusters {
            let Some(entry) = raw.get_mut(k) else {
                continue;
            };
            let c = self.refcounts.allocate(&self.storage, 1)?;
            *entry = TableEntry::Data(g.offset_of(c).map(|o| o.0).unwrap_or(0)).encode();
            planned.push((k, (c, words)));
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

    fn current_raw(&self, i: usize) -> Result<Vec<u64>> {
        if let Some(p) = &self.staged[i].pending {
            return Ok(p.raw.clone());
        }
        self.validated_raw(i)
    }

    /// Writes every planned data cluster and table (called by commit).
    pub(super) fn write_staged_clusters(&mut self) -> Result<()> {
        let g = self.geometry();
        for i in 0..self.staged.len() {
            let Some(p) = self.staged[i].pending.take() else {
                continue;
            };
            for (c, words) in p.data.values() {
                let off = g.offset_of(*c).map(|o| o.0).unwrap_or(0);
                self.write(off, &cluster_bytes(words, g), "bitmap data cluster")?;
            }
            let mut table = Vec::new();
            for r in &p.raw {
                table.extend_from_slice(&r.to_be_bytes());
            }
            table.resize(
                g.clusters_for(table.len() as u64) as usize * g.cluster_len(),
                0,
            );
            let off = self.staged[i].entry.table_offset;
            self.write(off, &table, "bitmap table")?;
        }
        Ok(())
    }
}

/// A staged bitmap read cluster by cluster: planned clusters from memory,
/// the others as its table says (old data clusters stay intact until after
/// commit).
struct StagedView<'a> {
    raw: Vec<u64>,
    data: Option<&'a std::collections::BTreeMap<usize, (crate::types::HostCluster, Vec<u64>)>>,
    nbits: u64,
    bits_per_cluster: u64,
    geometry: crate::types::Geometry,
}

impl StagedView<'_> {
    /// The words of table entry `k` (its bits only, the tail cleared).
    fn words<R: crate::storage::ReadAt>(
        &self,
        image: &Image<R>,
        k: usize,
        words: &mut Vec<u64>,
        bytes: &mut Vec<u8>,
    ) -> Result<()> {
        let first = (k as u64)
            .saturating_mul(self.bits_per_cluster)
            .min(self.nbits);
        let n = self.bits_per_cluster.min(self.nbits - first);
        if let Some((_, w)) = self.data.and_then(|d| d.get(&k)) {
            words.clear();
            words.extend_from_slice(w);
            words.resize(bits::words_for(n), 0);
            let total = words.len() as u64 * 64;
            bits::words::clear_range(words, n..total);
            return Ok(());
        }
        let raw = self.raw.get(k).copied().unwrap_or(0);
        image.entry_words(TableEntry::decode(raw, self.geometry), n, words, bytes)
    }
}
