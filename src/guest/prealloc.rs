//! QEMU's metadata-preallocation heuristic, which changes what `qemu-img
//! map` prints for the same image depending on how sparse its file is.
//!
//! On the first block-status query of a qcow2 layer QEMU compares the
//! clusters its file really occupies (`st_blocks`) with the clusters that
//! have a nonzero refcount. When at least `max(real * 10 / 9, real + 2)`
//! clusters are refcounted, the image is taken to be preallocated with
//! metadata only, and every data range is also looked up in the host file:
//! a hole there (or the end of the file) makes the range read as zeros
//! (`"zero": true, "data": true`) and splits the range at the hole.
//!
//! `map` reproduces that so that its output equals `qemu-img map` on any
//! file; reads never depend on it (a hole reads as zeros anyway).

use super::layer::Qcow2Layer;
use super::seek::{self, Region};
use crate::error::{Error, Result};
use crate::format::refcount::{self, REFTABLE_OFFSET_MASK};
use crate::storage::ReadAt;
use std::os::unix::fs::MetadataExt;

/// Whether QEMU would take `layer` for a metadata-preallocated image.
///
/// # Errors
/// I/O errors reading the file's metadata or its refcount structures.
pub fn detect(layer: &Qcow2Layer) -> Result<bool> {
    let meta = layer
        .storage
        .file()
        .metadata()
        .map_err(|e| Error::io("image file metadata", None, e))?;
    let g = layer.geometry();
    let cs = g.cluster_size();
    let file_len = layer.storage.len();
    let real_clusters = meta.blocks().saturating_mul(512) / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let clusters = file_len.div_ceil(cs);
    if threshold > clusters {
        // Not even every cluster of the file could be refcounted that often.
        return Ok(false);
    }
    let h = &layer.header;
    let order = h.refcount_order.min(refcount::MAX_ORDER);
    let per_block = refcount::entries_per_block(g.cluster_bits(), order);
    let mut block = vec![0u8; g.cluster_len()];
    let mut allocated = 0u64;
    let mut first = 0u64;
    let reftable_entries = u64::from(h.refcount_table_clusters) * cs / 8;
    for t in 0..reftable_entries {
        if first >= clusters {
            break;
        }
        let at = h.refcount_table_offset + t * 8;
        let mut e = [0u8; 8];
        if at + 8 > file_len {
            break;
        }
        layer
            .storage
            .copy_at(at, &mut e)
            .map_err(|e| Error::io("refcount table", Some(at), e))?;
        let off = u64::from_be_bytes(e) & REFTABLE_OFFSET_MASK;
        let n = per_block.min(clusters - first);
        if off != 0 && off % cs == 0 && off + cs <= file_len {
            layer
                .storage
                .copy_at(off, &mut block)
                .map_err(|e| Error::io("refcount block", Some(off), e))?;
            for i in 0..n as usize {
                if refcount::get(&block, i, order) > 0 {
                    allocated += 1;
                    if allocated >= threshold {
                        return Ok(true);
                    }
                }
            }
        }
        first += per_block;
    }
    Ok(false)
}

/// For a data range of `len` bytes at `host` in `file` (of length
/// `file_len`): whether the host file has a hole (or its end) there, and
/// how far that answer holds.
///
/// # Errors
/// `lseek` failures.
pub fn host_hole(file: &std::fs::File, file_len: u64, host: u64, len: u64) -> Result<(bool, u64)> {
    if host >= file_len {
        return Ok((true, len));
    }
    match seek::region_at(file, host, file_len)
        .map_err(|e| Error::io("SEEK_DATA/SEEK_HOLE", Some(host), e))?
    {
        Region::Data(end) => Ok((false, len.min(end - host))),
        Region::Hole(end) => Ok((true, len.min(end.saturating_sub(host).max(1)))),
    }
}
