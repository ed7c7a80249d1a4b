//! One member of a backing chain: a qcow2 image (through its active L1/L2
//! tables) or a raw file. A layer answers one question: what does guest
//! range `[gofs, gofs + max)` map to, as far as one run of equal kind goes.
//!
//! Every L1 and L2 entry is validated before it is used (reserved bits,
//! alignment, inside the file, not pointing at the header, the refcount
//! structures or the L1 table). QEMU reads an L2 table or a data cluster
//! past the end of the file as zeros and ignores reserved bits; a backup must
//! never turn corruption into zeros, so here each of those is an error that
//! names the structure, the L1/L2 index and the file offset.

use super::cache::L2Cache;
use super::meta::Metadata;
use super::seek::{self, Region};
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::Header;
use crate::format::incompat;
use crate::format::l2::{
    self, COMPRESSED, COPIED, CompressedDescriptor, L2_STD_RESERVED_MASK, OFFSET_MASK,
    SUBCLUSTER_ALLOC_MASK, ZERO,
};
use crate::storage::{MappedFile, ReadAt};
use crate::types::Geometry;

/// Reserved bits of an L1 entry that we refuse (bit 0 is tolerated, like QEMU's reader).
const L1_REFUSED_MASK: u64 = 0x7f00_0000_0000_01fe;

/// What one run of guest bytes maps to in one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Guest data at this host offset (of the layer's data file when it has one).
    Data {
        /// Host offset of the run's first byte.
        host: u64,
    },
    /// Guest data at this host offset where the host file has a hole (only
    /// `map` reports it, for images QEMU takes as metadata-preallocated:
    /// see `prealloc`); reads as zeros.
    DataHole {
        /// Host offset of the run's first byte.
        host: u64,
    },
    /// Reads as zeros and masks the backing file, with a host allocation
    /// (qcow2 ZERO_ALLOC, or a hole in a raw file).
    ZeroAlloc {
        /// Host offset of the run's first byte.
        host: u64,
    },
    /// Reads as zeros and masks the backing file, no host allocation.
    ZeroPlain,
    /// One compressed cluster (the run never leaves it).
    Compressed {
        /// Where the compressed bytes are.
        desc: CompressedDescriptor,
        /// Offset of the run's first byte inside the decompressed cluster.
        within: u64,
    },
    /// Not allocated here: reads from the backing file, or as zeros without one.
    Unallocated {
        /// Host offset of a preallocated cluster (extended L2 `UNALLOCATED_ALLOC`).
        host: Option<u64>,
    },
}

impl Kind {
    /// The host offset this kind carries, if any.
    pub fn host(&self) -> Option<u64> {
        match *self {
            Kind::Data { host } | Kind::DataHole { host } | Kind::ZeroAlloc { host } => Some(host),
            Kind::Unallocated { host } => host,
            Kind::ZeroPlain | Kind::Compressed { .. } => None,
        }
    }

    /// Whether `next` (starting `len` bytes after the start of `self`) continues this run.
    fn continued_by(&self, len: u64, next: &Kind) -> bool {
        let follows = |a: u64, b: u64| a.checked_add(len) == Some(b);
        match (self, next) {
            (Kind::Data { host: a }, Kind::Data { host: b }) => follows(*a, *b),
            (Kind::ZeroAlloc { host: a }, Kind::ZeroAlloc { host: b }) => follows(*a, *b),
            (Kind::ZeroPlain, Kind::ZeroPlain) => true,
            (Kind::Unallocated { host: None }, Kind::Unallocated { host: None }) => true,
            (Kind::Unallocated { host: Some(a) }, Kind::Unallocated { host: Some(b) }) => {
                follows(*a, *b)
            }
            _ => false,
        }
    }
}

/// A run: `len` guest bytes of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Guest bytes covered (at least 1).
    pub len: u64,
    /// What they map to.
    pub kind: Kind,
}

/// The external data file of a qcow2 layer.
#[derive(Debug)]
pub struct DataFile {
    /// The name as stored in the data-file extension.
    pub name: String,
    /// The opened file.
    pub storage: MappedFile,
    /// Whether autoclear bit 1 (`data_file_raw`) is set.
    pub raw: bool,
}

/// A qcow2 chain member.
#[derive(Debug)]
pub struct Qcow2Layer {
    pub(super) storage: MappedFile,
    pub(super) header: Header,
    pub(super) data_file: Option<DataFile>,
    g: Geometry,
    extended: bool,
    l2_bits: u32,
    size: u64,
    meta: Metadata,
}

/// A raw chain member.
#[derive(Debug)]
pub struct RawLayer {
    pub(super) storage: MappedFile,
    size: u64,
}

/// A chain member.
#[derive(Debug)]
pub enum Layer {
    /// A qcow2 image.
    Qcow2(Box<Qcow2Layer>),
    /// A raw file.
    Raw(RawLayer),
}

impl Layer {
    /// Virtual size in bytes as QEMU uses it (qcow2: rounded down to 512;
    /// raw: the file length rounded up to 512).
    pub fn virtual_size(&self) -> u64 {
        match self {
            Layer::Qcow2(q) => q.size,
            Layer::Raw(r) => r.size,
        }
    }

    /// The file holding this layer's guest data (the data file when there is one).
    pub fn data_storage(&self) -> &MappedFile {
        match self {
            Layer::Qcow2(q) => q.data_file.as_ref().map_or(&q.storage, |d| &d.storage),
            Layer::Raw(r) => &r.storage,
        }
    }

    /// The run starting at `gofs` (which must be below the virtual size), at
    /// most `max` bytes. `for_read`: the caller will read the bytes, so a raw
    /// layer need not look for holes.
    pub fn lookup(
        &self,
        cache: &mut L2Cache,
        depth: usize,
        gofs: u64,
        max: u64,
        for_read: bool,
    ) -> Result<Run> {
        match self {
            Layer::Qcow2(q) => q.lookup(cache, depth, gofs, max),
            Layer::Raw(r) => r.lookup(gofs, max, for_read),
        }
    }
}

impl RawLayer {
    /// A raw layer over `storage`.
    pub fn new(storage: MappedFile) -> Self {
        let size = storage.len().next_multiple_of(512);
        RawLayer { storage, size }
    }

    fn lookup(&self, gofs: u64, max: u64, for_read: bool) -> Result<Run> {
        let end = gofs.saturating_add(max).min(self.size);
        let file_len = self.storage.len();
        if for_read {
            // Reads copy the bytes; holes read as zeros anyway.
            let stop = if gofs < file_len {
                end.min(file_len)
            } else {
                end
            };
            let kind = if gofs < file_len {
                Kind::Data { host: gofs }
            } else {
                Kind::ZeroAlloc { host: gofs }
            };
            return Ok(Run {
                len: stop - gofs,
                kind,
            });
        }
        let region = seek::region_at(self.storage.file(), gofs, file_len)
            .map_err(|e| Error::io("raw file SEEK_DATA/SEEK_HOLE", Some(gofs), e))?;
        let (data, stop) = match region {
            Region::Data(stop) => (true, stop),
            Region::Hole(stop) => (false, stop),
        };
        // Data ends exactly at the end of the file; past it (inside the
        // 512-byte rounding) is a hole, as QEMU's file driver reports.
        let stop = stop.min(end);
        let kind = if data {
            Kind::Data { host: gofs }
        } else {
            Kind::ZeroAlloc { host: gofs }
        };
        Ok(Run {
            len: stop.max(gofs + 1).min(end) - gofs,
            kind,
        })
    }
}

/// How an L2 entry describes one stretch of its cluster.
struct Segment {
    /// Bytes from the starting offset to where the state changes (or the cluster ends).
    len: u64,
    kind: Kind,
}

impl Qcow2Layer {
    /// Builds a layer from an opened image whose header was decoded; checks
    /// what QEMU checks when it opens an image for reading guest data.
    pub fn new(storage: MappedFile, header: Header, data_file: Option<DataFile>) -> Result<Self> {
        let g = header.geometry();
        let extended = header.incompatible_features & incompat::EXTL2 != 0;
        if extended && g.cluster_bits() < 14 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "qcow2 header cluster_bits",
                Some(20),
                format!(
                    "extended L2 entries need clusters of at least 16 KiB, not {} bytes",
                    g.cluster_size()
                ),
            ));
        }
        let l2_bits = g.cluster_bits() - if extended { 4 } else { 3 };
        let size = header.size / 512 * 512;
        let l1_span = g.cluster_size() << l2_bits;
        let needed = size.div_ceil(l1_span);
        if needed > i32::MAX as u64 {
            return Err(Error::corrupt(
                "qcow2 header size",
                24,
                format!(
                    "{} bytes is too big (needs {needed} L1 entries)",
                    header.size
                ),
            ));
        }
        if u64::from(header.l1_size) < needed {
            return Err(Error::corrupt(
                "qcow2 header l1_size",
                36,
                format!(
                    "L1 table is too small: {} entries, the virtual size {} needs {needed}",
                    header.l1_size, header.size
                ),
            ));
        }
        if u64::from(header.l1_size) * 8 > l2::MAX_L1_BYTES {
            return Err(Error::corrupt(
                "qcow2 header l1_size",
                36,
                format!("{} entries exceed QEMU's 32 MiB L1 limit", header.l1_size),
            ));
        }
        if header.l1_size > 0 {
            let l1_end = header
                .l1_table_offset
                .checked_add(u64::from(header.l1_size) * 8);
            if !g.is_aligned(header.l1_table_offset) || header.l1_table_offset == 0 {
                return Err(Error::corrupt(
                    "qcow2 header l1_table_offset",
                    40,
                    format!(
                        "{:#x} is not a valid cluster-aligned offset",
                        header.l1_table_offset
                    ),
                ));
            }
            if l1_end.is_none_or(|e| e > storage.len()) {
                return Err(Error::corrupt(
                    "qcow2 header l1_table_offset",
                    40,
                    format!(
                        "the L1 table ({} entries at {:#x}) runs past the end of the file ({} bytes)",
                        header.l1_size,
                        header.l1_table_offset,
                        storage.len()
                    ),
                ));
            }
        }
        let meta = Metadata::collect(&storage, &header)?;
        Ok(Qcow2Layer {
            storage,
            header,
            data_file,
            g,
            extended,
            l2_bits,
            size,
            meta,
        })
    }

    /// The cluster geometry.
    pub fn geometry(&self) -> Geometry {
        self.g
    }

    /// Whether the image uses extended L2 entries.
    pub fn extended(&self) -> bool {
        self.extended
    }

    /// The L1 and L2 indices of the entry that maps guest offset `gofs`.
    pub fn indices(&self, gofs: u64) -> (u64, u64) {
        let cluster = gofs >> self.g.cluster_bits();
        (cluster >> self.l2_bits, cluster & ((1 << self.l2_bits) - 1))
    }

    fn l1_entry(&self, index: u64) -> Result<Option<u64>> {
        let at = self.header.l1_table_offset + index * 8;
        // One pread per L1 entry (one per 512 MiB of guest at 64 KiB
        // clusters): the mapping's pages would stay resident per member.
        let mut a = [0u8; 8];
        self.storage
            .copy_at(at, &mut a)
            .map_err(|e| Error::io("L1 table", Some(at), e))?;
        let e = u64::from_be_bytes(a);
        let object = || format!("L1 table entry {index}");
        if e & L1_REFUSED_MASK != 0 {
            return Err(Error::corrupt(
                object(),
                at,
                format!("{e:#018x} has reserved bits set"),
            ));
        }
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !self.g.is_aligned(off) {
            return Err(Error::corrupt(
                object(),
                at,
                format!("L2 table offset {off:#x} is not cluster aligned"),
            ));
        }
        if off
            .checked_add(self.g.cluster_size())
            .is_none_or(|end| end > self.storage.len())
        {
            return Err(Error::corrupt(
                object(),
                at,
                format!(
                    "L2 table at {off:#x} lies past the end of the file ({} bytes)",
                    self.storage.len()
                ),
            ));
        }
        if let Some(what) = self.meta.hit(off, self.g.cluster_size()) {
            return Err(Error::corrupt(
                object(),
                at,
                format!("L2 table offset {off:#x} points at the {what}"),
            ));
        }
        Ok(Some(off))
    }

    fn lookup(&self, cache: &mut L2Cache, depth: usize, gofs: u64, max: u64) -> Result<Run> {
        let cs = self.g.cluster_size();
        let l1_span = cs << self.l2_bits;
        let l1_index = gofs / l1_span;
        let span_end = ((l1_index + 1) * l1_span)
            .min(gofs.saturating_add(max))
            .min(self.size);
        let unallocated = Run {
            len: span_end - gofs,
            kind: Kind::Unallocated { host: None },
        };
        if l1_index >= u64::from(self.header.l1_size) {
            return Ok(unallocated);
        }
        let Some(l2_off) = self.l1_entry(l1_index)? else {
            return Ok(unallocated);
        };
        let table = cache.get(depth, l2_off, self.g.cluster_len(), |buf| {
            self.storage
                .copy_at(l2_off, buf)
                .map_err(|e| Error::io("L2 table", Some(l2_off), e))
        })?;
        let walk = L2Walk {
            layer: self,
            table,
            l1_index,
            l2_off,
        };
        walk.run(gofs, span_end)
    }
}

/// One L2 table being walked.
struct L2Walk<'a> {
    layer: &'a Qcow2Layer,
    table: &'a [u8],
    l1_index: u64,
    l2_off: u64,
}

impl L2Walk<'_> {
    fn entry_len(&self) -> u64 {
        if self.layer.extended { 16 } else { 8 }
    }

    fn run(&self, gofs: u64, span_end: u64) -> Result<Run> {
        let cs = self.layer.g.cluster_size();
        let first = self.segment(gofs)?;
        let mut run = Run {
            len: first.len.min(span_end - gofs),
            kind: first.kind,
        };
        let within_ends_cluster = (gofs % cs) + first.len == cs;
        if !within_ends_cluster || matches!(run.kind, Kind::Compressed { .. }) {
            return Ok(run);
        }
        let mut at = gofs + first.len;
        while at < span_end {
            if run.kind == (Kind::Unallocated { host: None }) && !self.layer.extended {
                // Fast path: skip all-zero standard entries.
                let index = (at / cs) & ((1 << self.layer.l2_bits) - 1);
                let zeros = self.zero_entries_from(index, (span_end - at).div_ceil(cs));
                if zeros > 0 {
                    let skip = (zeros * cs).min(span_end - at);
                    at += skip;
                    run.len = at - gofs;
                    continue;
                }
            }
            let seg = self.segment(at)?;
            if !run.kind.continued_by(at - gofs, &seg.kind) {
                break;
            }
            at += seg.len;
            run.len = at.min(span_end) - gofs;
            if seg.len != cs {
                break;
            }
        }
        run.len = run.len.min(span_end - gofs);
        Ok(run)
    }

    /// How many all-zero standard entries start at `index` (at most `max`:
    /// a query of a small range must not scan the rest of a big table).
    fn zero_entries_from(&self, index: u64, max: u64) -> u64 {
        let start = ((index * 8) as usize).min(self.table.len());
        let end = start
            .saturating_add(usize::try_from(max.saturating_mul(8)).unwrap_or(usize::MAX))
            .min(self.table.len());
        let rest = &self.table[start..end];
        let mut n = 0usize;
        let mut chunks = rest.chunks_exact(64);
        for c in chunks.by_ref() {
            if c.iter().fold(0u8, |a, &b| a | b) != 0 {
                break;
            }
            n += 8;
        }
        for e in rest[n * 8..].chunks_exact(8) {
            if e.iter().any(|&b| b != 0) {
                break;
            }
            n += 1;
        }
        n as u64
    }

    fn object(&self, index: u64) -> String {
        format!(
            "L2 table entry (L1 index {}, L2 index {index})",
            self.l1_index
        )
    }

    /// What the entry covering `gofs` says from `gofs` on, up to its first change of state.
    fn segment(&self, gofs: u64) -> Result<Segment> {
        let layer = self.layer;
        let cs = layer.g.cluster_size();
        let index = (gofs / cs) & ((1 << layer.l2_bits) - 1);
        let at = self.l2_off + index * self.entry_len();
        let (entry, bitmap) = l2::l2_entry(self.table, index as usize, layer.extended)
            .ok_or_else(|| Error::corrupt(self.object(index), at, "outside the L2 table"))?;
        let within = gofs % cs;
        let cluster_gofs = gofs - within;
        let err = |msg: String| Err(Error::corrupt(self.object(index), at, msg));
        if entry & COMPRESSED != 0 {
            let desc = self.compressed(entry, bitmap, index, at)?;
            return Ok(Segment {
                len: cs - within,
                kind: Kind::Compressed { desc, within },
            });
        }
        if entry & L2_STD_RESERVED_MASK != 0 {
            return err(format!("{entry:#018x} has reserved bits set"));
        }
        let data_file = layer.data_file.is_some();
        let off = entry & OFFSET_MASK;
        let allocated = off != 0 || (data_file && entry & COPIED != 0);
        if !layer.extended {
            if entry & ZERO != 0 {
                if layer.header.version < 3 {
                    return err(format!(
                        "{entry:#018x} has the zero flag, which version 2 images do not have"
                    ));
                }
                if off == 0 {
                    return Ok(Segment {
                        len: cs - within,
                        kind: Kind::ZeroPlain,
                    });
                }
                self.check_host(off, cluster_gofs, index, at, "preallocated zero cluster")?;
                return Ok(Segment {
                    len: cs - within,
                    kind: Kind::ZeroAlloc { host: off + within },
                });
            }
            if !allocated {
                return Ok(Segment {
                    len: cs - within,
                    kind: Kind::Unallocated { host: None },
                });
            }
            self.check_host(off, cluster_gofs, index, at, "data cluster")?;
            return Ok(Segment {
                len: cs - within,
                kind: Kind::Data { host: off + within },
            });
        }
        // Extended L2: 32 subclusters, each allocated, zero or unallocated.
        let alloc = bitmap & SUBCLUSTER_ALLOC_MASK;
        let zero = bitmap >> 32;
        if allocated && alloc & zero != 0 {
            return err(format!(
                "subcluster bitmap {bitmap:#018x} marks subclusters both allocated and zero"
            ));
        }
        if !allocated && alloc != 0 {
            return err(format!(
                "unallocated cluster has allocated subclusters in bitmap {bitmap:#018x}"
            ));
        }
        if allocated {
            self.check_host(off, cluster_gofs, index, at, "data cluster")?;
        }
        let sc = cs / 32;
        let first = within / sc;
        let state = |i: u64| ((alloc >> i) & 1, (zero >> i) & 1);
        let s0 = state(first);
        let mut last = first + 1;
        while last < 32 && state(last) == s0 {
            last += 1;
        }
        let len = last * sc - within;
        let kind = match (s0, allocated) {
            ((_, 1), true) => Kind::ZeroAlloc { host: off + within },
            ((_, 1), false) => Kind::ZeroPlain,
            ((1, _), _) => Kind::Data { host: off + within },
            ((_, _), true) => Kind::Unallocated {
                host: Some(off + within),
            },
            ((_, _), false) => Kind::Unallocated { host: None },
        };
        if matches!(kind, Kind::Data { .. }) {
            let visible = cs.min(layer.size - cluster_gofs);
            let end = (last * sc).min(visible);
            self.check_extent(off + first * sc, end.saturating_sub(first * sc), index, at)?;
        }
        Ok(Segment { len, kind })
    }

    fn compressed(
        &self,
        entry: u64,
        bitmap: u64,
        index: u64,
        at: u64,
    ) -> Result<CompressedDescriptor> {
        let layer = self.layer;
        let err = |msg: String| Err(Error::corrupt(self.object(index), at, msg));
        if layer.data_file.is_some() {
            return err(format!(
                "{entry:#018x} is a compressed cluster in an image with an external data file"
            ));
        }
        if layer.extended && bitmap != 0 {
            return err(format!(
                "compressed cluster has a nonzero subcluster bitmap {bitmap:#018x}"
            ));
        }
        let desc = CompressedDescriptor::decode(entry, layer.g);
        let file_len = layer.storage.len();
        if desc.offset >= file_len {
            return err(format!(
                "compressed data at {:#x} lies past the end of the file ({file_len} bytes)",
                desc.offset
            ));
        }
        if let Some(what) = layer.meta.hit(desc.offset, 1) {
            return err(format!(
                "compressed data offset {:#x} points at the {what}",
                desc.offset
            ));
        }
        Ok(desc)
    }

    /// Checks a data or preallocated cluster offset: aligned, inside the
    /// file (or the data file at the guest offset), not metadata.
    fn check_host(
        &self,
        off: u64,
        cluster_gofs: u64,
        index: u64,
        at: u64,
        what: &str,
    ) -> Result<()> {
        let layer = self.layer;
        let err = |msg: String| Err(Error::corrupt(self.object(index), at, msg));
        if !layer.g.is_aligned(off) {
            return err(format!("{what} offset {off:#x} is not cluster aligned"));
        }
        let visible = layer.g.cluster_size().min(layer.size - cluster_gofs);
        let whole_data = what == "data cluster" && !layer.extended;
        if layer.data_file.is_some() {
            if off != cluster_gofs {
                return err(format!(
                    "{what} offset {off:#x} in the external data file does not match the guest offset {cluster_gofs:#x}"
                ));
            }
            if whole_data {
                self.check_extent(off, visible, index, at)?;
            }
            return Ok(());
        }
        if whole_data {
            // The guest-visible part of the cluster must be in the file.
            self.check_extent(off, visible, index, at)?;
        } else if off >= layer.storage.len() {
            return err(format!(
                "{what} at {off:#x} lies past the end of the file ({} bytes)",
                layer.storage.len()
            ));
        }
        if let Some(m) = layer.meta.hit(off, layer.g.cluster_size()) {
            return err(format!("{what} offset {off:#x} points at the {m}"));
        }
        Ok(())
    }

    /// Checks that `[off, off + len)` of the data storage is inside its file.
    fn check_extent(&self, off: u64, len: u64, index: u64, at: u64) -> Result<()> {
        let layer = self.layer;
        let (file_len, which) = match &layer.data_file {
            Some(df) => (df.storage.len(), "external data file"),
            None => (layer.storage.len(), "file"),
        };
        if off.checked_add(len).is_none_or(|e| e > file_len) {
            return Err(Error::corrupt(
                self.object(index),
                at,
                format!(
                    "data at {off:#x} ({len} bytes) runs past the end of the {which} ({file_len} bytes)"
                ),
            ));
        }
        Ok(())
    }
}
