//! Where backup and restore units go: a new qcow2 image or a sparse raw
//! file; and the manifest's extent log with the CRC-32 of every data extent.

use super::manifest::{self, MAX_EXTENT, ManifestExtent};
use super::units::{Unit, What};
use super::writer::{BackingName, Plan, Qcow2Writer};
use crate::error::{Error, Result};
use crate::storage::{RwFile, WriteAt};
use std::fs::File;

/// Counts what a walk will write (pass 1).
#[derive(Debug)]
pub struct Tally {
    cs: u64,
    /// Data clusters (qcow2) or an upper bound.
    pub data_clusters: u64,
    /// Distinct L2 tables touched.
    pub l2_tables: u64,
    last_l1: Option<u64>,
    /// Bytes of all units.
    pub bytes: u64,
}

impl Tally {
    /// For clusters of `cs` bytes.
    pub fn new(cs: u64) -> Self {
        Tally {
            cs,
            data_clusters: 0,
            l2_tables: 0,
            last_l1: None,
            bytes: 0,
        }
    }

    /// Counts one unit.
    pub fn add(&mut self, u: Unit) {
        self.bytes += u.len;
        // Holes count too: an incremental masks them with zero clusters
        // (for a full backup this only over-reserves refcount blocks).
        let per_l1 = self.cs * (self.cs / 8);
        let first = u.offset / per_l1;
        let last = (u.offset + u.len - 1) / per_l1;
        let new_first = if self.last_l1 == Some(first) {
            first + 1
        } else {
            first
        };
        if last >= new_first {
            self.l2_tables += last + 1 - new_first;
        }
        self.last_l1 = Some(last);
        if u.what == What::Data {
            self.data_clusters += u.len.div_ceil(self.cs);
        }
    }
}

/// A backup or restore output.
pub enum Sink {
    /// A new qcow2 image.
    Qcow2(Box<Qcow2Writer<RwFile>>),
    /// A sparse raw file of the virtual size.
    Raw(RwFile),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Qcow2(w) => w.fmt(f),
            Sink::Raw(_) => f.write_str("Sink::Raw"),
        }
    }
}

impl Sink {
    /// A qcow2 output in `file`.
    ///
    /// # Errors
    /// See [`Qcow2Writer::new`].
    pub fn qcow2(
        file: File,
        plan: Plan,
        backing: Option<BackingName>,
        compress: bool,
    ) -> Result<Sink> {
        let rw = RwFile::new(file).map_err(|e| Error::io("new image", None, e))?;
        Ok(Sink::Qcow2(Box::new(Qcow2Writer::new(
            rw, plan, backing, compress,
        )?)))
    }

    /// A raw output of `size` bytes in `file` (all holes to start with).
    ///
    /// # Errors
    /// I/O errors.
    pub fn raw(file: File, size: u64) -> Result<Sink> {
        file.set_len(size)
            .map_err(|e| Error::io("new raw file", None, e))?;
        Ok(Sink::Raw(
            RwFile::new(file).map_err(|e| Error::io("new raw file", None, e))?,
        ))
    }

    /// Bytes per data chunk: a whole number of clusters for qcow2.
    pub fn chunk(&self, want: u64) -> u64 {
        match self {
            Sink::Qcow2(w) => (want / w.cluster_size()).max(1) * w.cluster_size(),
            Sink::Raw(_) => want,
        }
    }

    /// Stores data at guest `offset` (qcow2: whole clusters, zero-padded).
    ///
    /// # Errors
    /// I/O errors.
    pub fn data(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        match self {
            Sink::Qcow2(w) => w.data(offset / w.cluster_size(), bytes),
            Sink::Raw(f) => {
                // Only the guest bytes inside the disk (the caller pads qcow2 clusters only).
                f.write_at(offset, bytes)
                    .map_err(|e| Error::io("new raw file", Some(offset), e))
            }
        }
    }

    /// Stores zeros (qcow2 zero clusters; raw files keep their holes).
    ///
    /// # Errors
    /// I/O errors.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        match self {
            Sink::Qcow2(w) => {
                let cs = w.cluster_size();
                for c in offset / cs..(offset + len).div_ceil(cs) {
                    w.zero(c)?;
                }
                Ok(())
            }
            Sink::Raw(_) => Ok(()),
        }
    }

    /// Finishes the output (synced) and returns its file.
    ///
    /// # Errors
    /// I/O errors.
    pub fn finish(self) -> Result<File> {
        let mut rw = match self {
            Sink::Qcow2(w) => w.finish()?,
            Sink::Raw(f) => f,
        };
        rw.sync().map_err(|e| Error::io("new file", None, e))?;
        Ok(rw.into_file())
    }
}

/// The manifest's extents as they are written: merged, split at 64 MiB,
/// each data extent with the CRC-32 of its guest bytes.
#[derive(Debug, Default)]
pub struct ExtentLog {
    done: Vec<ManifestExtent>,
    cur: Option<(u64, u64, bool, crc32fast::Hasher)>,
    data: u64,
    zero: u64,
}

impl ExtentLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    fn close(&mut self) {
        if let Some((offset, length, data, h)) = self.cur.take() {
            if data {
                self.data += length;
            } else {
                self.zero += length;
            }
            self.done.push(ManifestExtent {
                offset,
                length,
                kind: if data { "data" } else { "zero" }.into(),
                crc32: data.then(|| manifest::crc_hex(h.finalize())),
            });
        }
    }

    fn extend(&mut self, offset: u64, len: u64, data: bool, bytes: Option<&[u8]>) {
        let mut at = offset;
        let mut rest = len;
        let mut bytes = bytes;
        while rest > 0 {
            let continues = matches!(&self.cur, Some((o, l, d, _)) if *d == data && o + l == at && *l < MAX_EXTENT);
            if !continues {
                self.close();
            }
            let (_, l, _, h) = self
                .cur
                .get_or_insert_with(|| (at, 0, data, crc32fast::Hasher::new()));
            let n = (MAX_EXTENT - *l).min(rest);
            if let Some(b) = bytes {
                h.update(&b[..n as usize]);
                bytes = Some(&b[n as usize..]);
            }
            *l += n;
            at += n;
            rest -= n;
        }
    }

    /// Guest data `bytes` at `offset`.
    pub fn data(&mut self, offset: u64, bytes: &[u8]) {
        self.extend(offset, bytes.len() as u64, true, Some(bytes));
    }

    /// `len` bytes of zeros at `offset`.
    pub fn zero(&mut self, offset: u64, len: u64) {
        self.extend(offset, len, false, None);
    }

    /// The extents and the data and zero byte totals.
    pub fn finish(mut self) -> (Vec<ManifestExtent>, u64, u64) {
        self.close();
        (self.done, self.data, self.zero)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_merges_splits_and_crcs() {
        let mut log = ExtentLog::new();
        let a = vec![1u8; 1000];
        log.data(0, &a[..600]);
        log.data(600, &a[600..]);
        log.zero(1000, 24);
        log.zero(2000, MAX_EXTENT + 5);
        let (ext, data, zero) = log.finish();
        assert_eq!(ext.len(), 4);
        assert_eq!((ext[0].offset, ext[0].length), (0, 1000));
        assert_eq!(
            ext[0].crc32.as_deref(),
            Some(manifest::crc_hex(crc32fast::hash(&a)).as_str())
        );
        assert_eq!(
            (ext[1].offset, ext[1].length, ext[1].crc32.is_none()),
            (1000, 24, true)
        );
        assert_eq!((ext[2].offset, ext[2].length), (2000, MAX_EXTENT));
        assert_eq!((ext[3].offset, ext[3].length), (2000 + MAX_EXTENT, 5));
        assert_eq!((data, zero), (1000, 24 + MAX_EXTENT + 5));
    }

    #[test]
    fn tally_counts_l2_tables_once() {
        let cs = 512u64; // one L2 table maps 32 KiB
        let mut t = Tally::new(cs);
        t.add(Unit {
            offset: 0,
            len: 512,
            what: What::Data,
        });
        t.add(Unit {
            offset: 1024,
            len: 512,
            what: What::Zero,
        });
        t.add(Unit {
            offset: 32768 - 512,
            len: 1024,
            what: What::Data,
        });
        assert_eq!((t.l2_tables, t.data_clusters, t.bytes), (2, 3, 2048));
    }
}
