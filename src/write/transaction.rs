//! A write transaction: several bitmap operations staged in memory and
//! committed by one header switch, all or nothing.
//!
//! Staging reads the image and plans new clusters (refcounts are raised in
//! memory only); nothing is written until [`Transaction::commit`], so any
//! refusal leaves the image byte-identical. The commit order is the crate's
//! crash-safety protocol (see the `write` module docs).

use super::header::encode_cluster0;
use super::plan::Staged;
use super::refcounts::Refcounts;
use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmaps_ext::BitmapsExt;
use crate::format::directory::{self, DirEntry};
use crate::format::extensions::Extension;
use crate::format::header::Header;
use crate::format::{incompat, limits};
use crate::read::{BitmapState, Image};
use crate::storage::WriteAt;
use crate::types::{Geometry, HostCluster};

/// Staged bitmap operations on one image; see the module docs.
#[derive(Debug)]
pub struct Transaction<S: WriteAt> {
    pub(super) storage: S,
    pub(super) header: Header,
    extensions: Vec<Extension>,
    area_end: u64,
    old_dir: Option<(u64, u64)>,
    pub(super) staged: Vec<Staged>,
    /// Cluster runs (first cluster, count) to free after the header switch.
    pub(super) frees: Vec<(HostCluster, u64)>,
    pub(super) refcounts: Refcounts,
    changed: bool,
    /// Repair mode: old clusters are left for the owner walk to free.
    free_by_walk: bool,
    /// Removals of bitmaps whose tables cannot be trusted (see `release.rs`).
    pub(super) walk_release: super::release::WalkRelease,
}

impl<S: WriteAt> Transaction<S> {
    /// Opens `storage` for writing bitmaps, refusing images this crate must not write.
    ///
    /// # Errors
    /// `Unsupported` for version 2, the corrupt or dirty bit; `Corrupt` when
    /// the bitmaps extension is stale or its directory cannot be walked
    /// (pointing to `repair`); every error of [`Image::open`].
    pub fn begin(storage: S) -> Result<Self> {
        Self::begin_with(storage, false)
    }

    /// Like [`Transaction::begin`] for `repair`: accepts stale, version 2 and
    /// damaged-directory images, and frees nothing by assumption (the caller
    /// frees exactly what an owner walk proves unreferenced).
    pub(crate) fn begin_repair(storage: S) -> Result<Self> {
        Self::begin_with(storage, true)
    }

    fn begin_with(storage: S, repair: bool) -> Result<Self> {
        let (header, extensions, area_end, old_dir, staged) = {
            let image = Image::open(&storage)?;
            if repair {
                guard_repair(&image)?;
            } else {
                guard_image(&image)?;
            }
            let old_dir = image
                .bitmaps_view()
                .extension
                .map(|(e, _)| (e.directory_offset, e.directory_size));
            let staged = image.bitmaps().iter().map(Staged::on_disk).collect();
            let area_end = image
                .end_marker()
                .map_or(image.header().extensions_end(), |m| m + 8);
            (
                image.header().clone(),
                image.extensions().to_vec(),
                area_end,
                old_dir,
                staged,
            )
        };
        let refcounts = Refcounts::load(&storage, &header)?;
        let old_dir = if repair { None } else { old_dir };
        Ok(Transaction {
            free_by_walk: repair,
            storage,
            header,
            extensions,
            area_end,
            old_dir,
            staged,
            frees: Vec::new(),
            refcounts,
            changed: false,
            walk_release: Default::default(),
        })
    }

    /// The image's cluster geometry.
    pub fn geometry(&self) -> Geometry {
        self.header.geometry()
    }

    /// Virtual disk size.
    pub fn virtual_size(&self) -> u64 {
        self.header.size
    }

    /// Names of the bitmaps as staged so far, in directory order.
    pub fn names(&self) -> Vec<String> {
        self.staged.iter().map(|s| s.entry.name_lossy()).collect()
    }

    pub(super) fn position(&self, name: &str) -> Result<usize> {
        self.staged
            .iter()
            .position(|s| s.entry.name == name.as_bytes())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("bitmap '{name}'"),
                    None,
                    "not found in the image",
                )
            })
    }

    /// Index of `name`, which must be in state `ok`.
    pub(super) fn position_ok(&self, name: &str, op: &str) -> Result<usize> {
        let i = self.position(name)?;
        let s = &self.staged[i];
        if s.state != BitmapState::Ok {
            let msg = format!(
                "is {}; only remove is allowed on it (see `qcow2-bitmap repair`), cannot {op}",
                s.state.as_str()
            );
            return Err(Error::new(
                ErrorKind::Untrusted,
                format!("bitmap '{name}'"),
                None,
                msg,
            ));
        }
        Ok(i)
    }

    pub(super) fn mark_changed(&mut self) {
        self.changed = true;
    }

    /// Writes everything staged and switches the header; see the module docs.
    /// A transaction with no changes writes nothing.
    ///
    /// # Errors
    /// I/O errors; `Unsupported` when the new extension does not fit in cluster 0
    /// (checked before anything is written).
    pub fn commit(mut self) -> Result<S> {
        if !self.changed {
            return Ok(self.storage);
        }
        let g = self.geometry();
        let (dir_bytes, ext) = self.layout_directory()?;
        // Fail before writing anything if the header area cannot hold the result.
        encode_cluster0(&self.header, &self.extensions, ext, self.area_end)?;
        self.write_staged_clusters()?;
        if let Some(e) = ext {
            let off = e.directory_offset;
            let mut padded = dir_bytes;
            padded.resize(
                g.clusters_for(padded.len() as u64) as usize * g.cluster_len(),
                0,
            );
            self.write(off, &padded, "bitmap directory")?;
        }
        // Makes the increments durable (and commits a moved refcount table
        // with its own header write); switch_header re-reads the header.
        self.refcounts.flush_increments(&mut self.storage)?;
        self.switch_header(ext)?;
        self.release_old()?;
        Ok(self.storage)
    }

    /// Encodes the new directory, allocating its clusters.
    fn layout_directory(&mut self) -> Result<(Vec<u8>, Option<BitmapsExt>)> {
        if self.staged.is_empty() {
            return Ok((Vec::new(), None));
        }
        let g = self.geometry();
        let len: usize = self.staged.iter().map(|s| s.entry.encoded_len()).sum();
        if len as u64 > limits::MAX_DIRECTORY_SIZE {
            let msg = format!(
                "would be {len} bytes, over QEMU's limit of {}",
                limits::MAX_DIRECTORY_SIZE
            );
            return Err(Error::invalid_input("bitmap directory", msg));
        }
        let first = self
            .refcounts
            .allocate(&self.storage, g.clusters_for(len as u64))?;
        let off = g
            .offset_of(first)
            .map(|o| o.0)
            .ok_or_else(|| Error::invalid_input("bitmap directory", "offset overflows"))?;
        let entries: Vec<DirEntry> = self.staged.iter().map(|s| s.entry.clone()).collect();
        let mut p = crate::format::be::Put::with_capacity(len);
        directory::encode(&entries, &mut p);
        let nb = u32::try_from(entries.len()).unwrap_or(u32::MAX);
        Ok((
            p.into_vec(),
            Some(BitmapsExt {
                nb_bitmaps: nb,
                reserved: 0,
                directory_size: len as u64,
                directory_offset: off,
            }),
        ))
    }

    fn switch_header(&mut self, ext: Option<BitmapsExt>) -> Result<()> {
        // Re-read the header: a refcount table relocation may have updated it.
        let header = {
            let image = Image::open(&self.storage)?;
            image.header().clone()
        };
        let bytes = encode_cluster0(&header, &self.extensions, ext, self.area_end)?;
        self.write(0, &bytes, "qcow2 header")?;
        self.sync()
    }

    fn release_old(&mut self) -> Result<()> {
        let g = self.geometry();
        if let Some((off, size)) = self.old_dir {
            self.frees.push((
                g.cluster_of(crate::types::HostOffset(off)),
                g.clusters_for(size),
            ));
        }
        let frees = std::mem::take(&mut self.frees);
        let frees = if self.free_by_walk { Vec::new() } else { frees };
        for (first, count) in frees {
            for c in first.0..first.0.saturating_add(count) {
                // After the commit point a cluster that cannot be freed (its
                // refcount is already 0) is left alone: the new state stands.
                let _ = self.refcounts.queue_free(&self.storage, HostCluster(c));
            }
        }
        // Ends with a sync (apply_decrements syncs after its writes).
        self.refcounts.apply_decrements(&mut self.storage)?;
        Ok(())
    }

    pub(super) fn write(&mut self, off: u64, data: &[u8], what: &str) -> Result<()> {
        self.storage
            .write_at(off, data)
            .map_err(|e| Error::io(what, Some(off), e))
    }

    fn sync(&mut self) -> Result<()> {
        self.storage
            .sync()
            .map_err(|e| Error::io("image file", None, e))
    }
}

fn guard_repair<S: crate::storage::ReadAt>(image: &Image<S>) -> Result<()> {
    if image.header().incompatible_features & incompat::CORRUPT != 0 {
        let msg = "the corrupt bit is set: the image has damage outside the bitmaps; run `qemu-img check -r all` first";
        return Err(Error::new(ErrorKind::Unsupported, "image", None, msg));
    }
    Ok(())
}

fn guard_image<S: crate::storage::ReadAt>(image: &Image<S>) -> Result<()> {
    let h = image.header();
    let refuse = |msg: &str| {
        Err(Error::new(
            ErrorKind::Unsupported,
            "image",
            None,
            msg.to_string(),
        ))
    };
    if h.version < 3 {
        return refuse(
            "bitmaps need qcow2 version 3 (compat=1.1); a version 2 image cannot store them (`qemu-img amend -o compat=1.1` upgrades it, `qcow2-bitmap repair` removes a stale extension)",
        );
    }
    if h.incompatible_features & incompat::CORRUPT != 0 {
        return refuse("the corrupt bit is set; run `qemu-img check -r all` first");
    }
    if h.incompatible_features & incompat::DIRTY != 0 {
        return refuse(
            "the dirty bit is set (lazy refcounts may be stale); run `qemu-img check -r all` first",
        );
    }
    let view = image.bitmaps_view();
    if view.extension.is_some() && !h.bitmaps_consistent() {
        return Err(Error::new(
            ErrorKind::Corrupt,
            "bitmaps extension",
            None,
            "is stale (autoclear bit 0 is clear); run `qcow2-bitmap repair` first",
        ));
    }
    if let Some(p) = &view.problem {
        return Err(Error::new(
            ErrorKind::Corrupt,
            "bitmaps extension",
            None,
            format!("{p}; run `qcow2-bitmap repair` first"),
        ));
    }
    Ok(())
}
