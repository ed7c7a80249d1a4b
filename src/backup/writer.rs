//! A streaming writer of new qcow2 images (version 3, standard L2 entries,
//! 16-bit refcounts), for backups and restores.
//!
//! The caller announces an upper bound of the data clusters and L2 tables
//! it will write ([`Plan`]), then hands clusters in ascending guest order.
//! Memory: one L2 table, at most two refcount blocks, the L1 table and the
//! refcount table (a few hundred KiB for 16 TiB); never the data.
//!
//! Layout, every data cluster written in full (no host holes under guest
//! data, so `qemu-img map` does not depend on the file's sparseness); L2
//! tables are written only where they hold entries (their all-zero 4 KiB
//! blocks are holes, read as zeros), and the file always covers the last
//! cluster:
//!
//! ```text
//! cluster 0            header, backing-format extension, end marker, backing name
//! 1 .. 1+L             L1 table
//! next R               refcount table (sized for the upper bound)
//! next B               refcount blocks (one per 2^(cb+3-4) clusters of the bound)
//! then, in guest order L2 tables and data clusters (compressed data byte-packed)
//! ```
//!
//! Refcounts are exact (`qemu-img check` exit 0): every cluster written has
//! refcount 1 except packed compressed clusters, which count the compressed
//! streams touching them; reserved refcount blocks beyond what the image
//! ends up needing cover clusters past the end of the file (all zero).
//! COPIED is set on every L1 and data L2 entry (refcount 1), never on
//! compressed entries. Nothing is durable until [`Qcow2Writer::finish`]
//! syncs; the caller writes under a temporary name and renames.

use crate::error::{Error, Result};
use crate::format::be::Put;
use crate::format::ext_type;
use crate::format::extensions::{self, Extension};
use crate::format::header::Header;
use crate::format::l2::{COMPRESSED, COPIED, ZERO};
use crate::storage::WriteAt;
use flate2::{Compress, Compression, FlushCompress, Status};
use std::collections::BTreeMap;

/// What the image will hold at most.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Virtual size in bytes.
    pub size: u64,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Most data clusters that will be written.
    pub data_clusters: u64,
    /// Most L2 tables needed (distinct L1 entries touched).
    pub l2_tables: u64,
}

/// The backing file the new image names.
#[derive(Debug, Clone)]
pub struct BackingName {
    /// Stored as given (QEMU resolves it against the image's directory).
    pub name: String,
    /// The format stored in the backing-format extension.
    pub format: String,
}

/// Refcount width: 16 bits, as `qemu-img create` writes.
const REFCOUNT_ORDER: u32 = 4;

/// L2 tables are written in blocks of this size (or of the cluster size,
/// when smaller); all-zero blocks are left as holes.
const L2_WRITE_BLOCK: usize = 4096;

/// The writer; see the module docs.
pub struct Qcow2Writer<W: WriteAt> {
    out: W,
    cb: u32,
    cs: u64,
    size: u64,
    backing: Option<BackingName>,
    l1: Vec<u64>,
    l1_clusters: u64,
    reftable_cluster: u64,
    reftable_clusters: u64,
    refblock_first: u64,
    refblocks: u64,
    /// Next free cluster.
    next: u64,
    /// Refcounts of clusters not yet final, by refcount-block range.
    open_blocks: BTreeMap<u64, Vec<u8>>,
    flushed_blocks: Vec<bool>,
    per_block: u64,
    /// The L2 table being filled: (L1 index, host cluster, entries).
    l2: Option<(u64, u64, Vec<u8>)>,
    /// Byte position of the next compressed stream, inside the packing cluster.
    pack: Option<u64>,
    deflate: Option<Compress>,
    zbuf: Vec<u8>,
    written_data: u64,
}

impl<W: WriteAt> std::fmt::Debug for Qcow2Writer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Writer")
            .field("cluster_bits", &self.cb)
            .field("size", &self.size)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

/// A broken invariant of the writer itself (never the input's fault).
fn internal(msg: &str) -> Error {
    Error::invalid_input("new image", format!("{msg} (a bug)"))
}

fn io(what: &str, at: u64, e: std::io::Error) -> Error {
    Error::io(format!("new image: {what}"), Some(at), e)
}

impl<W: WriteAt> Qcow2Writer<W> {
    /// Starts an image in `out` (empty) for `plan`, with `backing` and
    /// optional deflate compression of data clusters.
    ///
    /// # Errors
    /// A plan QEMU could not open (size or L1 too large).
    pub fn new(out: W, plan: Plan, backing: Option<BackingName>, compress: bool) -> Result<Self> {
        let cb = plan.cluster_bits;
        if !(9..=21).contains(&cb) {
            return Err(Error::invalid_input(
                "cluster size",
                format!("2^{cb} is not 512 B..2 MiB"),
            ));
        }
        let cs = 1u64 << cb;
        let l2_entries = cs / 8;
        let l1_entries = plan.size.div_ceil(cs * l2_entries);
        if l1_entries * 8 > crate::format::l2::MAX_L1_BYTES {
            return Err(Error::invalid_input(
                "virtual size",
                format!(
                    "{} bytes need an L1 table over QEMU's 32 MiB limit at this cluster size",
                    plan.size
                ),
            ));
        }
        if let Some(b) = &backing
            && (b.name.is_empty() || b.name.len() > 1023 || b.format.len() >= 16)
        {
            return Err(Error::invalid_input(
                "backing file name",
                format!("{:?} must be 1..1023 bytes", b.name),
            ));
        }
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let per_block = (cs * 8) >> REFCOUNT_ORDER;
        // Fixed point: the bound must cover the refcount structures too.
        // Compressed packing can abandon a partly filled cluster each time
        // an L2 table is allocated in between: one more cluster per table.
        let packing = if compress { plan.l2_tables } else { 0 };
        let fixed = 1 + l1_clusters + plan.l2_tables + plan.data_clusters + 1 + packing;
        let (mut rt, mut rb) = (1u64, 1u64);
        loop {
            let total = fixed + rt + rb;
            let need_rb = total.div_ceil(per_block);
            let need_rt = (need_rb * 8).div_ceil(cs);
            if need_rb <= rb && need_rt <= rt {
                break;
            }
            rb = rb.max(need_rb);
            rt = rt.max(need_rt);
        }
        if rt * cs > 8 << 20 {
            return Err(Error::invalid_input(
                "new image",
                "its refcount table would exceed QEMU's 8 MiB limit",
            ));
        }
        let reftable_cluster = 1 + l1_clusters;
        let refblock_first = reftable_cluster + rt;
        let next = refblock_first + rb;
        let mut w = Qcow2Writer {
            out,
            cb,
            cs,
            size: plan.size,
            backing,
            l1: vec![0; l1_entries as usize],
            l1_clusters,
            reftable_cluster,
            reftable_clusters: rt,
            refblock_first,
            refblocks: rb,
            next,
            open_blocks: BTreeMap::new(),
            flushed_blocks: vec![false; rb as usize],
            per_block,
            l2: None,
            pack: None,
            deflate: compress
                .then(|| Compress::new_with_window_bits(Compression::default(), false, 12)),
            zbuf: Vec::new(),
            written_data: 0,
        };
        for c in 0..next {
            w.inc(c)?;
        }
        Ok(w)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    /// Bytes of guest data written so far (compressed or not, before compression).
    pub fn data_bytes(&self) -> u64 {
        self.written_data
    }

    fn inc(&mut self, cluster: u64) -> Result<()> {
        let block = cluster / self.per_block;
        if block >= self.refblocks {
            return Err(Error::invalid_input(
                "new image",
                "more clusters written than planned (a bug in the caller's plan)",
            ));
        }
        let cs = self.cs as usize;
        let buf = self.open_blocks.entry(block).or_insert_with(|| vec![0; cs]);
        let i = ((cluster % self.per_block) * 2) as usize;
        let v = u16::from_be_bytes([buf[i], buf[i + 1]]).saturating_add(1);
        buf[i..i + 2].copy_from_slice(&v.to_be_bytes());
        Ok(())
    }

    /// Writes out every refcount block whose clusters can no longer change.
    fn flush_final_blocks(&mut self) -> Result<()> {
        let mut low = self.next;
        if let Some(p) = self.pack {
            low = low.min(p / self.cs);
        }
        let first_open = low / self.per_block;
        while let Some(entry) = self.open_blocks.first_entry() {
            if *entry.key() >= first_open {
                break;
            }
            let (b, buf) = entry.remove_entry();
            let at = (self.refblock_first + b) * self.cs;
            self.out
                .write_at(at, &buf)
                .map_err(|e| io("refcount block", at, e))?;
            self.flushed_blocks[b as usize] = true;
        }
        Ok(())
    }

    fn alloc(&mut self, n: u64) -> Result<u64> {
        let c = self.next;
        self.next += n;
        for i in c..c + n {
            self.inc(i)?;
        }
        self.flush_final_blocks()?;
        Ok(c)
    }

    /// The L2 table for guest cluster `gc`, allocating it (and writing out the previous one).
    fn l2_for(&mut self, gc: u64) -> Result<usize> {
        let per_l2 = self.cs / 8;
        let l1i = gc / per_l2;
        if self.l2.as_ref().is_none_or(|(i, _, _)| *i != l1i) {
            self.close_l2()?;
            let host = self.alloc(1)?;
            self.l1[l1i as usize] = (host * self.cs) | COPIED;
            self.l2 = Some((l1i, host, vec![0; self.cs as usize]));
        }
        Ok(((gc % per_l2) * 8) as usize)
    }

    /// Writes the L2 table being filled: only its blocks that hold entries
    /// (a table of scattered writes is mostly zeros, which a hole reads as),
    /// and its last block when it is the file's last cluster, so that the
    /// file covers it.
    fn close_l2(&mut self) -> Result<()> {
        if let Some((_, host, table)) = self.l2.take() {
            let at = host * self.cs;
            let blk = L2_WRITE_BLOCK.min(table.len());
            let zero = |i: usize| table[i..i + blk].iter().all(|&b| b == 0);
            let last = table.len() - blk;
            let mut i = 0;
            while i < table.len() {
                let tail = i == last && host + 1 == self.next;
                if zero(i) && !tail {
                    i += blk;
                    continue;
                }
                let start = i;
                i += blk;
                while i < table.len() && !zero(i) {
                    i += blk;
                }
                self.out
                    .write_at(at + start as u64, &table[start..i])
                    .map_err(|e| io("L2 table", at + start as u64, e))?;
            }
        }
        Ok(())
    }

    fn set_entry(&mut self, gc: u64, entry: u64) -> Result<()> {
        let i = self.l2_for(gc)?;
        let Some((_, _, table)) = self.l2.as_mut() else {
            return Err(internal("no L2 table after allocating one"));
        };
        table[i..i + 8].copy_from_slice(&entry.to_be_bytes());
        Ok(())
    }

    fn check_order(&self, gc: u64) -> Result<()> {
        if gc * self.cs >= self.size {
            return Err(Error::invalid_input(
                "new image",
                format!("guest cluster {gc} is past the virtual size"),
            ));
        }
        Ok(())
    }

    /// Guest cluster `gc` reads as zeros (masking any backing file).
    ///
    /// # Errors
    /// I/O errors; a cluster past the virtual size.
    pub fn zero(&mut self, gc: u64) -> Result<()> {
        self.check_order(gc)?;
        self.set_entry(gc, ZERO)
    }

    /// Guest clusters `gc..` hold `data` (a whole number of clusters; the
    /// caller zero-pads the image's last partial cluster). Compressed one by
    /// one when the writer compresses and that saves space.
    ///
    /// # Errors
    /// I/O errors; clusters past the virtual size.
    pub fn data(&mut self, gc: u64, data: &[u8]) -> Result<()> {
        let cs = self.cs as usize;
        if data.is_empty() || data.len() % cs != 0 {
            return Err(Error::invalid_input(
                "new image",
                "data must be whole clusters",
            ));
        }
        let n = (data.len() / cs) as u64;
        self.check_order(gc + n - 1)?;
        self.written_data += data.len() as u64;
        if self.deflate.is_some() {
            for (i, chunk) in data.chunks(cs).enumerate() {
                self.compressed_cluster(gc + i as u64, chunk)?;
            }
            return Ok(());
        }
        // Contiguous host clusters, one write; the L2 entries in order.
        let mut done = 0u64;
        while done < n {
            let per_l2 = self.cs / 8;
            let g = gc + done;
            let in_table = (per_l2 - g % per_l2).min(n - done);
            self.l2_for(g)?;
            let host = self.alloc(in_table)?;
            for k in 0..in_table {
                self.set_entry(g + k, ((host + k) * self.cs) | COPIED)?;
            }
            let bytes = &data[(done as usize) * cs..((done + in_table) as usize) * cs];
            let at = host * self.cs;
            self.out
                .write_at(at, bytes)
                .map_err(|e| io("data cluster", at, e))?;
            done += in_table;
        }
        Ok(())
    }

    fn compressed_cluster(&mut self, gc: u64, chunk: &[u8]) -> Result<()> {
        let cs = self.cs as usize;
        self.l2_for(gc)?;
        let Some(d) = self.deflate.as_mut() else {
            return Err(internal("compressing without a compressor"));
        };
        d.reset();
        self.zbuf.resize(cs, 0);
        let status = d
            .compress(chunk, &mut self.zbuf, FlushCompress::Finish)
            .map_err(|e| Error::invalid_input("deflate", e.to_string()))?;
        let len = d.total_out() as usize;
        if status != Status::StreamEnd || len >= cs {
            // Does not save space: a normal cluster, as QEMU does.
            let host = self.alloc(1)?;
            self.set_entry(gc, (host * self.cs) | COPIED)?;
            let at = host * self.cs;
            return self
                .out
                .write_at(at, chunk)
                .map_err(|e| io("data cluster", at, e));
        }
        let len = len as u64;
        let cs64 = self.cs;
        // Pack after the previous stream while it stays in the packing
        // cluster, or runs on into fresh clusters when that cluster is the
        // newest; otherwise start a fresh cluster.
        let pos = match self.pack {
            Some(p) if p % cs64 != 0 => {
                let pc = p / cs64;
                if (p + len - 1) / cs64 == pc || pc + 1 == self.next {
                    p
                } else {
                    self.pad_pack(p)?;
                    self.next * cs64
                }
            }
            _ => self.next * cs64,
        };
        let first = pos / cs64;
        let last = (pos + len - 1) / cs64;
        for c in first..=last {
            if c < self.next {
                // The packing cluster: one more stream touches it.
                self.inc(c)?;
            } else {
                self.alloc(1)?;
            }
        }
        let sectors = (pos + len - 1) / 512 - pos / 512;
        let x = 62 - (self.cb - 8);
        let entry = COMPRESSED | (sectors << x) | pos;
        self.set_entry(gc, entry)?;
        let bytes = self.zbuf[..len as usize].to_vec();
        self.out
            .write_at(pos, &bytes)
            .map_err(|e| io("compressed cluster", pos, e))?;
        self.pack = Some(pos + len);
        self.flush_final_blocks()
    }

    /// Zero-fills the rest of the packing cluster so the file has no holes.
    fn pad_pack(&mut self, p: u64) -> Result<()> {
        let end = (p / self.cs + 1) * self.cs;
        if p % self.cs != 0 && end > p {
            let zeros = vec![0u8; (end - p) as usize];
            self.out
                .write_at(p, &zeros)
                .map_err(|e| io("compressed cluster padding", p, e))?;
        }
        self.pack = None;
        Ok(())
    }

    /// Writes the L2 table, refcounts, L1, refcount table and header, syncs,
    /// and returns the storage.
    ///
    /// # Errors
    /// I/O errors.
    pub fn finish(mut self) -> Result<W> {
        self.close_l2()?;
        if let Some(p) = self.pack {
            self.pad_pack(p)?;
        }
        // Every refcount block not written yet goes out now (zeros for
        // ranges past the end of the file).
        for b in 0..self.refblocks {
            if self
                .flushed_blocks
                .get(b as usize)
                .copied()
                .unwrap_or(false)
            {
                continue;
            }
            let buf = self
                .open_blocks
                .remove(&b)
                .unwrap_or_else(|| vec![0u8; self.cs as usize]);
            let at = (self.refblock_first + b) * self.cs;
            self.out
                .write_at(at, &buf)
                .map_err(|e| io("refcount block", at, e))?;
        }
        let mut rt = vec![0u8; (self.reftable_clusters * self.cs) as usize];
        for b in 0..self.refblocks {
            let off = (self.refblock_first + b) * self.cs;
            rt[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
        }
        let at = self.reftable_cluster * self.cs;
        self.out
            .write_at(at, &rt)
            .map_err(|e| io("refcount table", at, e))?;
        let mut l1 = Vec::with_capacity((self.l1_clusters * self.cs) as usize);
        for e in &self.l1 {
            l1.extend_from_slice(&e.to_be_bytes());
        }
        l1.resize((self.l1_clusters * self.cs) as usize, 0);
        if !l1.is_empty() {
            self.out
                .write_at(self.cs, &l1)
                .map_err(|e| io("L1 table", self.cs, e))?;
        }
        let header = self.header_cluster();
        self.out
            .write_at(0, &header)
            .map_err(|e| io("header", 0, e))?;
        self.out.sync().map_err(|e| io("sync", 0, e))?;
        Ok(self.out)
    }

    fn header_cluster(&self) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(b) = &self.backing {
            exts.push(Extension {
                kind: ext_type::BACKING_FORMAT,
                offset: 0,
                data: b.format.as_bytes().to_vec(),
                padding_is_zero: true,
            });
        }
        let mut area = Put::new();
        extensions::encode_area(&exts, &mut area);
        let area = area.into_vec();
        let header_len = 112u32;
        let (bf_off, bf_len) = match &self.backing {
            Some(b) => (
                u64::from(header_len) + area.len() as u64,
                b.name.len() as u32,
            ),
            None => (0, 0),
        };
        let l1_size = self.l1.len() as u32;
        let h = Header {
            version: 3,
            backing_file_offset: bf_off,
            backing_file_size: bf_len,
            cluster_bits: self.cb,
            size: self.size,
            crypt_method: 0,
            l1_size,
            l1_table_offset: if l1_size == 0 { 0 } else { self.cs },
            refcount_table_offset: self.reftable_cluster * self.cs,
            refcount_table_clusters: self.reftable_clusters as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: REFCOUNT_ORDER,
            header_length: header_len,
            tail: vec![0; 8],
        };
        let mut p = Put::with_capacity(self.cs as usize);
        h.encode(&mut p);
        p.bytes(&area);
        if let Some(b) = &self.backing {
            p.bytes(b.name.as_bytes());
        }
        let mut v = p.into_vec();
        v.resize(self.cs as usize, 0);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::Chain;
    use crate::lock::Access;
    use crate::storage::RwFile;

    fn pattern(seed: u64, n: usize, compressible: bool) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|i| {
                if compressible {
                    (i / 64) as u8 ^ seed as u8
                } else {
                    // xorshift64: incompressible enough for deflate.
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s >> 24) as u8
                }
            })
            .collect()
    }

    /// Writes clusters of every kind, reads the image back through the
    /// guest view, and (when qemu-img is there) has QEMU check it.
    fn round_trip(cb: u32, size: u64, compress: bool) {
        let cs = 1u64 << cb;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.qcow2");
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let clusters = size.div_ceil(cs);
        let mut want = vec![0u8; size as usize];
        // Data on 3 of every 5 clusters (runs cross L2 tables and refcount
        // block ranges at small cluster sizes), zeros on one, one skipped.
        let plan = Plan {
            size,
            cluster_bits: cb,
            data_clusters: clusters,
            l2_tables: clusters.div_ceil(cs / 8),
        };
        let mut w = Qcow2Writer::new(RwFile::new(file).unwrap(), plan, None, compress).unwrap();
        let mut gc = 0;
        while gc < clusters {
            let run = (clusters - gc).min(3);
            let bytes = pattern(gc, (run * cs) as usize, gc % 2 == 0);
            w.data(gc, &bytes).unwrap();
            let end = ((gc + run) * cs).min(size) as usize;
            want[(gc * cs) as usize..end].copy_from_slice(&bytes[..end - (gc * cs) as usize]);
            gc += run;
            if gc < clusters {
                w.zero(gc).unwrap();
                gc += 2;
            }
        }
        w.finish().unwrap();
        let chain = Chain::open(&path, Access::Read).unwrap();
        assert_eq!(chain.virtual_size(), size);
        let mut got = vec![0u8; size as usize];
        chain.reader().read_at(0, &mut got).unwrap();
        assert!(
            got == want,
            "cb {cb} size {size} compress {compress}: bytes differ"
        );
        if let Ok(o) = std::process::Command::new("qemu-img")
            .args(["check", "--output=json"])
            .arg(&path)
            .output()
        {
            assert!(
                o.status.success(),
                "qemu-img check: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }

    /// One data cluster per L2 table, and a last table that holds only a
    /// zero entry: the tables are written sparsely, the file still covers
    /// every cluster, and the image reads back (and passes qemu-img check).
    #[test]
    fn scattered_tables_are_sparse_and_covered() {
        use std::os::unix::fs::MetadataExt;
        let cs = 1u64 << 16;
        let per_l2 = cs / 8;
        let size = 64 * per_l2 * cs; // 64 L2 tables of 512 MiB
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.qcow2");
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let plan = Plan {
            size,
            cluster_bits: 16,
            data_clusters: 63,
            l2_tables: 64,
        };
        let mut w = Qcow2Writer::new(RwFile::new(file).unwrap(), plan, None, false).unwrap();
        let mut want = Vec::new();
        for t in 0..63 {
            let gc = t * per_l2 + (t * 97) % per_l2;
            let bytes = pattern(t, cs as usize, false);
            w.data(gc, &bytes).unwrap();
            want.push((gc, bytes));
        }
        w.zero(63 * per_l2 + per_l2 - 1).unwrap();
        let next = w.next;
        w.finish().unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), next * cs, "the file covers its last cluster");
        let tables = 64 * cs;
        assert!(
            meta.blocks() * 512 < 63 * cs + tables / 4 + (1 << 20),
            "L2 tables written whole: {} bytes allocated",
            meta.blocks() * 512
        );
        let chain = Chain::open(&path, Access::Read).unwrap();
        let mut r = chain.reader();
        let mut got = vec![0u8; cs as usize];
        for (gc, bytes) in &want {
            r.read_at(gc * cs, &mut got).unwrap();
            assert!(got == *bytes, "cluster {gc} differs");
        }
        if let Ok(o) = std::process::Command::new("qemu-img")
            .args(["check", "--output=json"])
            .arg(&path)
            .output()
        {
            assert!(o.status.success(), "qemu-img check: {o:?}");
        }
    }

    #[test]
    fn images_read_back_and_pass_qemu_check() {
        round_trip(9, 300 * 512 + 512, false);
        round_trip(9, 700 * 512, true);
        round_trip(12, 1 << 20, true);
        round_trip(16, (3 << 20) + 4096, false);
        round_trip(16, 5 << 20, true);
    }
}
