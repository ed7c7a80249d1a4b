//! The bitmap operations of a [`Transaction`]: add, remove, clear, enable,
//! disable (merges: `merge.rs`). Each validates first and plans; nothing is
//! written here.

use super::plan::{Pending, Staged, StagedView, content_clusters};
use super::transaction::Transaction;
use crate::bits::{self, Bitmap};
use crate::error::{Error, Result};
use crate::format::directory::{DirEntry, FLAG_AUTO};
use crate::format::limits;
use crate::read::{BitmapState, Image, expected_dimensions};
use crate::storage::WriteAt;

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

    pub(super) fn allocate_clusters(&mut self, count: u64) -> Result<u64> {
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
    pub(super) fn view(&self, i: usize) -> Result<StagedView<'_>> {
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

    pub(super) fn current_raw(&self, i: usize) -> Result<Vec<u64>> {
        if let Some(p) = &self.staged[i].pending {
            return Ok(p.raw.clone());
        }
        self.validated_raw(i)
    }
}
