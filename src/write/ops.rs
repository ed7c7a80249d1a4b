//! The bitmap operations of a [`Transaction`]: add, remove, clear, enable,
//! disable and merge. Each validates first and plans; nothing is written here.

use super::plan::{Pending, Staged, cluster_bytes, content_clusters};
use super::transaction::Transaction;
use crate::bits::{self, Bitmap};
use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap_table::TableEntry;
use crate::format::directory::{DirEntry, FLAG_AUTO};
use crate::format::limits;
use crate::read::{BitmapState, Image, expected_dimensions};
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
            bitmap: None,
            writes: Vec::new(),
        };
        self.staged.push(Staged {
            entry,
            state: BitmapState::Ok,
            pending: Some(pending),
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
            self.release_content(i);
            self.staged.remove(i);
        }
        self.mark_changed();
        Ok(())
    }

    /// Queues the clusters of bitmap `i`'s current content for freeing.
    /// Content whose table cannot be trusted is leaked, never freed.
    fn release_content(&mut self, i: usize) {
        let g = self.geometry();
        let s = &self.staged[i];
        let runs = match &s.pending {
            Some(p) => content_clusters(g, s.entry.table_offset, &p.raw),
            None => match self.on_disk_raw(i) {
                Some(raw) => content_clusters(g, s.entry.table_offset, &raw),
                None => return,
            },
        };
        self.frees.extend(runs);
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
        self.release_content(i);
        let s = &mut self.staged[i];
        s.entry.table_offset = table;
        s.pending = Some(Pending {
            raw: vec![0; size as usize],
            bitmap: None,
            writes: Vec::new(),
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
        let s = &self.staged[i];
        if let Some(p) = &s.pending {
            if let Some(b) = &p.bitmap {
                return Ok(b.clone());
            }
            if p.raw.iter().all(|&r| r == 0) {
                let (nbits, _) = expected_dimensions(
                    self.virtual_size(),
                    u32::from(s.entry.granularity_bits),
                    self.geometry(),
                )
                .unwrap_or((0, 0));
                return Ok(Bitmap::zeros(nbits));
            }
        }
        let image = Image::open(&self.storage)?;
        image.load(&s.as_entry(i), false)
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
    /// (Memory: the merged bitmap only; the old content is never copied.)
    pub(super) fn replace_changed_clusters(
        &mut self,
        i: usize,
        changed: &[bool],
        merged: Bitmap,
    ) -> Result<()> {
        let g = self.geometry();
        let old_raw = self.current_raw(i)?;
        let mut raw = old_raw.clone();
        for (k, entry) in raw.iter_mut().enumerate() {
            if changed.get(k).copied().unwrap_or(false) {
                let c = self.refcounts.allocate(&self.storage, 1)?;
                *entry = TableEntry::Data(g.offset_of(c).map(|o| o.0).unwrap_or(0)).encode();
            }
        }
        let mut writes: Vec<(usize, crate::types::HostCluster)> = raw
            .iter()
            .enumerate()
            .filter(|&(k, _)| changed.get(k).copied().unwrap_or(false))
            .map(|(k, &r)| (k, g.cluster_of(crate::types::HostOffset(r))))
            .collect();
        // Clusters planned by an earlier merge in this transaction and not
        // replaced now must still be written (from the final bits).
        if let Some(p) = &self.staged[i].pending {
            let earlier = p
                .writes
                .iter()
                .filter(|(k, _)| !changed.get(*k).copied().unwrap_or(false));
            writes.extend(earlier.copied());
        }
        let table = self.allocate_clusters(g.clusters_for(raw.len() as u64 * 8))?;
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
        s.pending = Some(Pending {
            raw,
            bitmap: Some(merged),
            writes,
        });
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
            if let Some(bitmap) = &p.bitmap {
                for &(k, c) in &p.writes {
                    let off = g.offset_of(c).map(|o| o.0).unwrap_or(0);
                    self.write(off, &cluster_bytes(bitmap, k, g), "bitmap data cluster")?;
                }
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
