//! The refcount consistency check: rebuild the expected refcount of every
//! host cluster from its owners and compare it with the stored refcounts,
//! counting leaks and corruptions exactly as `qemu-img check` does.
//!
//! Owners walked, in QEMU's order: the header cluster; the active L1 table,
//! its L2 tables and their data (standard, preallocated-zero, compressed and
//! extended-L2 entries); every snapshot's L1, L2 tables and data; the
//! snapshot table; the refcount table; the LUKS header area; the bitmap
//! directory, tables and data (only when the bitmaps extension is
//! consistent); finally every refcount block. Guest data in an external data
//! file is not counted.
//!
//! Besides per-cluster mismatches (refcount > references is a leak, refcount
//! < references a corruption), QEMU counts as corruptions: reserved bits and
//! misaligned offsets in L1/L2/reftable entries, refcount blocks outside the
//! image or not referenced exactly once, expected counts that overflow the
//! refcount width, and "copied" flags (bit 63) of active L1/L2 entries that
//! disagree with a stored refcount of 1. Refcounts that cannot be read (a
//! misaligned refcount block offset) are check errors.
//!
//! Tables are read only where they lie inside the file; the rest reads as
//! zeros, as QEMU's reads past the end do. Like QEMU, a referenced region
//! that ends a cluster or more past the end of the file is a corruption and
//! is not counted, so expected counts never cover more than the file's
//! clusters plus one, and a claimed huge table cannot make the check
//! allocate or loop without bound.
//! This module never writes.

mod bitmaps;

pub use bitmaps::bitmap_claims;

use std::collections::{BTreeMap, HashMap};

use super::Image;
use crate::error::{Error, Result};
use crate::format::bitmap_table;
use crate::format::ext_type;
use crate::format::incompat;
use crate::format::l2::{self, L2Kind, SnapshotHeader};
use crate::format::refcount::{self, REFTABLE_OFFSET_MASK};
use crate::storage::ReadAt;
use crate::types::Geometry;

/// Most distinct owners [`RefMap::owners`] lists for one cluster.
pub const MAX_OWNERS: usize = 8;

/// Most diagnostics a [`RefcountReport`] lists (its counts include all).
pub const MAX_DIAGNOSTICS: usize = 10_000;

/// What a host cluster is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// The header cluster (cluster 0).
    Header,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The active L1 table.
    L1,
    /// An L2 table (active or snapshot).
    L2,
    /// A guest data cluster (standard or preallocated zero).
    Data,
    /// A host cluster touched by compressed guest data.
    Compressed,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    SnapshotL1,
    /// The LUKS encryption header area.
    Crypto,
    /// The bitmap directory.
    BitmapDirectory,
    /// A bitmap table; `bitmap` is the directory index.
    BitmapTable {
        /// Directory index of the bitmap.
        bitmap: u32,
    },
    /// A bitmap data cluster; `bitmap` is the directory index.
    BitmapData {
        /// Directory index of the bitmap.
        bitmap: u32,
    },
}

impl Owner {
    fn pack(self) -> u32 {
        let (tag, idx) = match self {
            Owner::Header => (1, 0),
            Owner::RefcountTable => (2, 0),
            Owner::RefcountBlock => (3, 0),
            Owner::L1 => (4, 0),
            Owner::L2 => (5, 0),
            Owner::Data => (6, 0),
            Owner::Compressed => (7, 0),
            Owner::SnapshotTable => (8, 0),
            Owner::SnapshotL1 => (9, 0),
            Owner::Crypto => (10, 0),
            Owner::BitmapDirectory => (11, 0),
            Owner::BitmapTable { bitmap } => (12, bitmap),
            Owner::BitmapData { bitmap } => (13, bitmap),
        };
        (tag << 28) | (idx & 0x0fff_ffff)
    }

    fn unpack(v: u32) -> Option<Owner> {
        let bitmap = v & 0x0fff_ffff;
        Some(match v >> 28 {
            1 => Owner::Header,
            2 => Owner::RefcountTable,
            3 => Owner::RefcountBlock,
            4 => Owner::L1,
            5 => Owner::L2,
            6 => Owner::Data,
            7 => Owner::Compressed,
            8 => Owner::SnapshotTable,
            9 => Owner::SnapshotL1,
            10 => Owner::Crypto,
            11 => Owner::BitmapDirectory,
            12 => Owner::BitmapTable { bitmap },
            13 => Owner::BitmapData { bitmap },
            _ => return None,
        })
    }
}

/// Expected references of every host cluster and who makes them.
#[derive(Debug, Clone, Default)]
pub struct RefMap {
    refs: Vec<u32>,
    first: Vec<u32>,
    extra: BTreeMap<u64, Vec<Owner>>,
}

impl RefMap {
    /// Clusters covered: the file's clusters, or up to the highest referenced one.
    pub fn len(&self) -> u64 {
        self.refs.len() as u64
    }

    /// Whether no cluster is covered.
    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }

    /// Expected references of `cluster` (saturated at the refcount width).
    pub fn references(&self, cluster: u64) -> u64 {
        usize::try_from(cluster)
            .ok()
            .and_then(|c| self.refs.get(c))
            .map_or(0, |&r| u64::from(r))
    }

    /// Every distinct owner of `cluster`, first referrer first.
    pub fn owners(&self, cluster: u64) -> Vec<Owner> {
        let first = usize::try_from(cluster)
            .ok()
            .and_then(|c| self.first.get(c))
            .and_then(|&v| Owner::unpack(v));
        let mut out: Vec<Owner> = first.into_iter().collect();
        if let Some(more) = self.extra.get(&cluster) {
            out.extend(more);
        }
        out
    }

    /// Clusters referenced by more than one kind of owner (for example a
    /// bitmap table and guest data), in increasing order.
    pub fn shared(&self) -> impl Iterator<Item = u64> + '_ {
        self.extra.keys().copied()
    }

    fn grow_to(&mut self, len: usize) {
        if len > self.refs.len() {
            self.refs.resize(len, 0);
            self.first.resize(len, 0);
        }
    }

    /// Adds `n` references from `owner`, saturating at `max`; returns how
    /// many did not fit. At most [`MAX_OWNERS`] distinct owners are kept
    /// per cluster (enough to name a conflict; a hostile directory of 65535
    /// entries sharing one table must not make the map quadratic).
    fn add(&mut self, k: usize, owner: Owner, n: u64, max: u64) -> u64 {
        self.grow_to(k + 1);
        let limit = max.min(u64::from(u32::MAX));
        let room = limit.saturating_sub(u64::from(self.refs[k]));
        let added = n.min(room);
        if added == 0 {
            return n;
        }
        // added <= limit - refs[k] <= u32::MAX - refs[k], so this fits.
        self.refs[k] += added as u32;
        let packed = owner.pack();
        if self.first[k] == 0 {
            self.first[k] = packed;
        } else if self.first[k] != packed {
            let more = self.extra.entry(k as u64).or_default();
            if more.len() + 1 < MAX_OWNERS && !more.contains(&owner) {
                more.push(owner);
            }
        }
        n - added
    }
}

/// Whether a cluster has more refcount than references, or fewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindingKind {
    /// Refcount above references: "Leaked cluster N refcount=R reference=C".
    Leak,
    /// Refcount below references: "ERROR cluster N refcount=R reference=C".
    Error,
}

/// One cluster whose stored refcount differs from its references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    /// Host cluster index.
    pub cluster: u64,
    /// Its file offset.
    pub offset: u64,
    /// The stored refcount.
    pub refcount: u64,
    /// The references found.
    pub references: u64,
    /// Leak or error.
    pub kind: FindingKind,
}

/// How a [`Diagnostic`] is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Counted in [`RefcountReport::corruptions`].
    Corruption,
    /// Counted in [`RefcountReport::check_errors`].
    CheckError,
}

/// A problem found by the walk that is not a per-cluster mismatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// How it is counted.
    pub severity: Severity,
    /// What is wrong (QEMU's wording where it has one).
    pub message: String,
}

/// The result of [`refcount_check`].
#[derive(Debug, Clone, Default)]
pub struct RefcountReport {
    /// Leaked clusters (qemu-img check "leaks").
    pub leaks: u64,
    /// Corruptions (qemu-img check "corruptions").
    pub corruptions: u64,
    /// Problems that kept part of the check from running ("check-errors").
    pub check_errors: u64,
    /// Set when qemu-img would have stopped the check here ("Check failed").
    pub aborted: Option<String>,
    /// Set when this walk itself could not count every owner (a bitmap
    /// directory it cannot walk). Unlike [`RefcountReport::aborted`], a
    /// malformed bitmap table entry (where QEMU stops) does not set it: the
    /// walk counts the valid entries after it, so leaks and ownership stay exact.
    pub incomplete: Option<String>,
    /// Per-cluster mismatches in cluster order.
    pub findings: Vec<Finding>,
    /// Other corruptions and check errors, in walk order.
    pub diagnostics: Vec<Diagnostic>,
    /// End of the last used cluster in bytes ("image-end-offset").
    pub image_end_offset: u64,
    /// Virtual size in clusters ("total-clusters").
    pub total_clusters: u64,
    /// Guest clusters the active L1 maps to host clusters ("allocated-clusters").
    pub allocated_clusters: u64,
    /// Active compressed guest clusters ("compressed-clusters").
    pub compressed_clusters: u64,
    /// Active guest clusters not following their predecessor ("fragmented-clusters").
    pub fragmented_clusters: u64,
    /// Clusters of the file, a partial last one included.
    pub file_clusters: u64,
    /// Bitmap names by directory index (for [`Owner::BitmapTable`] and [`Owner::BitmapData`]).
    pub bitmap_names: Vec<String>,
    /// Expected references and owners of every cluster.
    pub map: RefMap,
    /// The first offset past the end of the file that something other than
    /// a bitmap points at (not counted, as in QEMU; where new clusters go).
    pub referenced_past_eof: Option<u64>,
}

impl RefcountReport {
    /// Whether nothing is wrong: no leaks, corruptions or check errors.
    pub fn is_clean(&self) -> bool {
        self.leaks == 0 && self.corruptions == 0 && self.check_errors == 0
    }
}

/// Runs the refcount check over `image` (read-only).
///
/// # Errors
/// Only I/O failures of the storage; everything found in the file is
/// reported in the [`RefcountReport`].
pub fn refcount_check<S: ReadAt>(image: &Image<S>) -> Result<RefcountReport> {
    let mut w = Walker::new(image)?;
    let stored = Stored::load(image)?;
    w.walk(&stored)?;
    w.check_refblocks(&stored);
    w.compare(&stored)?;
    w.check_copied(&stored)?;
    Ok(w.report)
}

/// Stored refcounts: the in-file part of the refcount table and a small
/// cache of refcount blocks.
struct Stored<'a, S> {
    storage: &'a S,
    g: Geometry,
    order: u32,
    block_bits: u32,
    table: Vec<u64>,
    cache: std::cell::RefCell<Vec<(u64, Vec<u8>)>>,
}

impl<'a, S: ReadAt> Stored<'a, S> {
    fn load(image: &'a Image<S>) -> Result<Self> {
        let h = image.header();
        let g = image.geometry();
        let len = u64::from(h.refcount_table_clusters) * g.cluster_size();
        let bytes = read_clipped(image.storage(), h.refcount_table_offset, len)?;
        let table = bitmap_table::raw_entries(&bytes).collect();
        let order = h.refcount_order.min(refcount::MAX_ORDER);
        let block_bits = g.cluster_bits() + 3 - order;
        Ok(Stored {
            storage: image.storage(),
            g,
            order,
            block_bits,
            table,
            cache: Default::default(),
        })
    }

    /// The stored refcount of `cluster`; `Ok(None)` when its block offset is misaligned.
    fn get(&self, cluster: u64) -> Result<Option<u64>> {
        let idx = cluster >> self.block_bits;
        let raw = usize::try_from(idx)
            .ok()
            .and_then(|i| self.table.get(i))
            .copied()
            .unwrap_or(0);
        let off = raw & REFTABLE_OFFSET_MASK;
        if off == 0 {
            return Ok(Some(0));
        }
        if !self.g.is_aligned(off) {
            return Ok(None);
        }
        let index = (cluster & ((1u64 << self.block_bits) - 1)) as usize;
        let mut cache = self.cache.borrow_mut();
        if let Some(pos) = cache.iter().position(|(o, _)| *o == off) {
            return Ok(Some(refcount::get(&cache[pos].1, index, self.order)));
        }
        let mut block = read_clipped(self.storage, off, self.g.cluster_size())?;
        block.resize(self.g.cluster_len(), 0);
        let value = refcount::get(&block, index, self.order);
        if cache.len() >= 8 {
            cache.remove(0);
        }
        cache.push((off, block));
        Ok(Some(value))
    }
}

/// Reads `[off, off + len)` clipped to the file: the missing part reads as zeros.
fn read_clipped<S: ReadAt>(storage: &S, off: u64, len: u64) -> Result<Vec<u8>> {
    let end = off.saturating_add(len).min(storage.len());
    let n = usize::try_from(end.saturating_sub(off)).unwrap_or(0);
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut scratch = Vec::new();
    let got = storage
        .read_at(off, n, &mut scratch)
        .map_err(|e| Error::io("refcount check read", Some(off), e))?;
    Ok(got.to_vec())
}

/// Why QEMU refuses to open `image` for its L1 table, if it does: the
/// virtual size needs more than `i32::MAX` L1 entries ("Image is too big"),
/// or more than the header's `l1_size` ("L1 table is too small").
pub fn l1_problem<S: ReadAt>(image: &Image<S>) -> Option<String> {
    let h = image.header();
    let g = image.geometry();
    let extended = h.incompatible_features & incompat::EXTL2 != 0;
    let entry_bytes = if extended { 16 } else { 8 };
    let cs = g.cluster_size();
    let per_l1_entry = (cs / entry_bytes) * cs;
    let needed = h.size.div_ceil(per_l1_entry);
    if needed > i32::MAX as u64 {
        Some(format!(
            "ERROR: Image is too big: qcow2 header size at offset 24 (0x18): \
             {} bytes would need {needed} L1 entries (QEMU's limit is {})",
            h.size,
            i32::MAX
        ))
    } else if u64::from(h.l1_size) < needed {
        Some(format!(
            "ERROR: L1 table is too small: qcow2 header l1_size at offset 36 (0x24): \
             {} entries, the virtual size {} needs {needed}",
            h.l1_size, h.size
        ))
    } else {
        None
    }
}

/// Copies `[off, off + buf.len())` clipped to the file into `buf`; returns
/// the bytes copied. A copy, not a borrowed mapping: scanning hundreds of
/// MiB of L2 tables this way keeps the resident set at one table.
fn read_into_clipped<S: ReadAt>(storage: &S, off: u64, buf: &mut [u8]) -> Result<usize> {
    let end = off.saturating_add(buf.len() as u64).min(storage.len());
    let n = usize::try_from(end.saturating_sub(off)).unwrap_or(0);
    if n == 0 {
        return Ok(0);
    }
    storage
        .copy_at(off, &mut buf[..n])
        .map_err(|e| Error::io("refcount check read", Some(off), e))?;
    Ok(n)
}

struct Walker<'a, S> {
    image: &'a Image<S>,
    /// How many identical owners the structure being walked stands for
    /// (snapshots sharing one L1 table): every count is multiplied by it.
    times: u64,
    /// One cluster, reused for every L2 table.
    l2_buf: Vec<u8>,
    /// Active L1 indices whose L2 table maps at least one host cluster.
    l2_with_host_clusters: Vec<usize>,
    /// The active L1 table as the walk read it (the "copied" pass reuses it).
    active_l1: Vec<u64>,
    g: Geometry,
    refcount_max: u64,
    extended: bool,
    data_file: bool,
    report: RefcountReport,
}

impl<'a, S: ReadAt> Walker<'a, S> {
    fn new(image: &'a Image<S>) -> Result<Self> {
        let h = image.header();
        let g = image.geometry();
        let file_clusters = g.clusters_for(image.storage().len());
        let mut map = RefMap::default();
        map.grow_to(usize::try_from(file_clusters).map_err(|_| {
            Error::corrupt("refcount check", 0, "file too large for this platform")
        })?);
        let report = RefcountReport {
            total_clusters: g.clusters_for(h.size),
            file_clusters,
            map,
            ..Default::default()
        };
        Ok(Walker {
            image,
            times: 1,
            l2_buf: vec![0; g.cluster_len()],
            l2_with_host_clusters: Vec::new(),
            active_l1: Vec::new(),
            g,
            refcount_max: refcount::max_refcount(h.refcount_order.min(refcount::MAX_ORDER)),
            extended: h.incompatible_features & incompat::EXTL2 != 0,
            data_file: h.incompatible_features & incompat::DATA_FILE != 0,
            report,
        })
    }

    fn corruption(&mut self, message: String) {
        self.corruptions(1, message);
    }

    /// Counts `n` corruptions; keeps `message` once, and only while fewer
    /// than [`MAX_DIAGNOSTICS`] are kept (the counts stay exact).
    fn corruptions(&mut self, n: u64, message: String) {
        self.report.corruptions += n.saturating_mul(self.times);
        self.diagnostic(Severity::Corruption, message);
    }

    fn diagnostic(&mut self, severity: Severity, message: String) {
        let kept = self.report.diagnostics.len();
        if kept < MAX_DIAGNOSTICS {
            self.report
                .diagnostics
                .push(Diagnostic { severity, message });
        } else if kept == MAX_DIAGNOSTICS {
            self.report.diagnostics.push(Diagnostic {
                severity,
                message: format!("(more problems: only the first {MAX_DIAGNOSTICS} are listed; the counts include all)"),
            });
        }
    }

    fn check_error(&mut self, message: String) {
        self.report.check_errors += self.times;
        self.diagnostic(Severity::CheckError, message);
    }

    /// One reference from `owner` to every cluster of `[offset, offset + size)`.
    ///
    /// Like QEMU, a region ending a cluster or more past the end of the file
    /// is not counted at all: it is one corruption.
    fn inc(&mut self, offset: u64, size: u64, owner: Owner) {
        self.inc_n(offset, size, owner, 1);
    }

    /// `n` references at once (counted exactly as `n` calls of [`Self::inc`],
    /// with one message per cluster instead of one per reference).
    fn inc_n(&mut self, offset: u64, size: u64, owner: Owner, n: u64) {
        if size == 0 || n == 0 {
            return;
        }
        let n = n.saturating_mul(self.times);
        // The corruptions below are counted per reference already.
        let times = std::mem::replace(&mut self.times, 1);
        self.inc_counted(offset, size, owner, n);
        self.times = times;
    }

    fn inc_counted(&mut self, offset: u64, size: u64, owner: Owner, n: u64) {
        let end = u128::from(offset) + u128::from(size);
        let file_len = u128::from(self.image.storage().len());
        if end >= file_len + u128::from(self.g.cluster_size()) {
            let bitmap = matches!(
                owner,
                Owner::BitmapTable { .. } | Owner::BitmapData { .. } | Owner::BitmapDirectory
            );
            if !bitmap {
                self.report.referenced_past_eof.get_or_insert(offset);
            }
            self.corruptions(n, format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}"
            ));
            return;
        }
        let cb = self.g.cluster_bits();
        // end - 1 < file_len + cluster_size, so these clusters fit the map's bound.
        let first = offset >> cb;
        let last = (offset + (size - 1)) >> cb;
        for k in first..=last {
            let failed = self.report.map.add(k as usize, owner, n, self.refcount_max);
            if failed > 0 {
                self.corruptions(
                    failed,
                    format!("ERROR: overflow cluster offset=0x{:x}", k << cb),
                );
            }
        }
    }

    fn walk(&mut self, stored: &Stored<'_, S>) -> Result<()> {
        let h = self.image.header().clone();
        self.inc(0, self.g.cluster_size(), Owner::Header);
        self.check_l1_size();
        self.check_l1(h.l1_table_offset, h.l1_size, true)?;
        self.walk_snapshots()?;
        let reftable_len = u64::from(h.refcount_table_clusters) * self.g.cluster_size();
        self.inc(h.refcount_table_offset, reftable_len, Owner::RefcountTable);
        if h.crypt_method == 2 {
            self.walk_crypto();
        }
        self.walk_bitmaps(stored)
    }

    fn check_l1_size(&mut self) {
        if let Some(msg) = l1_problem(self.image) {
            self.corruption(msg);
        }
    }

    fn check_l1(&mut self, offset: u64, l1_size: u32, active: bool) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        let len = u64::from(l1_size) * 8;
        let owner = if active { Owner::L1 } else { Owner::SnapshotL1 };
        self.inc(offset, len, owner);
        let table = read_clipped(self.image.storage(), offset, len)?;
        if active {
            self.active_l1 = bitmap_table::raw_entries(&table).collect();
        }
        for (index, raw) in bitmap_table::raw_entries(&table).enumerate() {
            if raw == 0 {
                continue;
            }
            if raw & l2::L1_RESERVED_MASK != 0 {
                self.corruption(format!(
                    "ERROR found L1 entry with reserved bits set: {raw:x}"
                ));
            }
            let l2_offset = raw & l2::OFFSET_MASK;
            self.inc(l2_offset, self.g.cluster_size(), Owner::L2);
            if !self.g.is_aligned(l2_offset) {
                self.corruption(format!(
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            let mut buf = std::mem::take(&mut self.l2_buf);
            let n = read_into_clipped(self.image.storage(), l2_offset, &mut buf)?;
            let allocated = self.check_l2(&buf[..n], active);
            self.l2_buf = buf;
            if active && allocated {
                self.l2_with_host_clusters.push(index);
            }
        }
        Ok(())
    }

    /// Counts one L2 table's references; true when some entry maps a host
    /// cluster (only those tables matter to the "copied" pass).
    fn check_l2(&mut self, table: &[u8], active: bool) -> bool {
        let mut next_contiguous = 0u64;
        let mut allocated = false;
        for chunk in table.chunks_exact(l2::l2_entry_len(self.extended)) {
            let (entry, bitmap) = l2::split_entry(chunk, self.extended);
            // The common cases of a sparse disk: nothing allocated, or a plain
            // zero cluster; no reserved bits, no reference.
            if bitmap == 0 && (entry == 0 || (entry == l2::ZERO && !self.extended)) {
                continue;
            }
            let kind = l2::classify(entry, self.g, self.extended, self.data_file);
            if !matches!(kind, L2Kind::Compressed(_)) && entry & l2::L2_STD_RESERVED_MASK != 0 {
                self.corruption(format!(
                    "ERROR found l2 entry with reserved bits set: {entry:x}"
                ));
            }
            match kind {
                L2Kind::Compressed(d) => self.check_compressed(entry, bitmap, d, active),
                L2Kind::ZeroAlloc(off) | L2Kind::Normal(off) => {
                    allocated = true;
                    self.check_allocated(entry, bitmap, off, active, &mut next_contiguous)
                }
                L2Kind::ZeroPlain => {}
                L2Kind::Unallocated => {
                    if bitmap & l2::SUBCLUSTER_ALLOC_MASK != 0 {
                        self.corruption(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation bitmap"
                                .into(),
                        );
                    }
                }
            }
        }
        allocated
    }

    fn check_compressed(
        &mut self,
        entry: u64,
        bitmap: u64,
        d: l2::CompressedDescriptor,
        active: bool,
    ) {
        if entry & l2::COPIED != 0 {
            self.corruption(format!(
                "ERROR: coffset=0x{:x}: copied flag must never be set for compressed clusters",
                d.offset
            ));
        }
        if self.data_file {
            self.corruption(format!(
                "ERROR compressed cluster with data file, entry=0x{entry:x}"
            ));
            return;
        }
        if bitmap != 0 {
            self.corruption(format!(
                "ERROR compressed cluster with non-zero subcluster allocation bitmap, entry=0x{entry:x}"
            ));
            return;
        }
        self.inc(d.offset, d.len(), Owner::Compressed);
        if active {
            self.report.allocated_clusters += 1;
            self.report.compressed_clusters += 1;
            self.report.fragmented_clusters += 1;
        }
    }

    fn check_allocated(
        &mut self,
        entry: u64,
        bitmap: u64,
        off: u64,
        active: bool,
        next_contiguous: &mut u64,
    ) {
        if (bitmap >> 32) & bitmap != 0 {
            self.corruption(format!(
                "ERROR offset={off:x}: Allocated cluster has corrupted subcluster status bitmap"
            ));
        }
        if !self.g.is_aligned(off) {
            let data = if self.extended {
                bitmap & l2::SUBCLUSTER_ALLOC_MASK != 0
            } else {
                entry & l2::ZERO == 0
            };
            let what = if data { "Data" } else { "Preallocated" };
            self.corruption(format!(
                "ERROR offset={off:x}: {what} cluster is not properly aligned; L2 entry corrupted."
            ));
        }
        if active {
            self.report.allocated_clusters += 1;
            if *next_contiguous != 0 && off != *next_contiguous {
                self.report.fragmented_clusters += 1;
            }
            *next_contiguous = off.wrapping_add(self.g.cluster_size());
        }
        if !self.data_file {
            self.inc(off, self.g.cluster_size(), Owner::Data);
        }
    }

    fn walk_snapshots(&mut self) -> Result<()> {
        let h = self.image.header().clone();
        if h.nb_snapshots == 0 {
            return Ok(());
        }
        if self.data_file {
            self.corruption(format!(
                "ERROR {} snapshots in image with data file",
                h.nb_snapshots
            ));
        }
        if h.nb_snapshots > l2::MAX_SNAPSHOTS {
            self.check_error(format!(
                "{} snapshots exceed QEMU's limit of {}; snapshots not walked",
                h.nb_snapshots,
                l2::MAX_SNAPSHOTS
            ));
            return Ok(());
        }
        let mut at = h.snapshots_offset;
        let mut l1s = Vec::new();
        for i in 0..h.nb_snapshots {
            let Some(aligned) = at.checked_next_multiple_of(8) else {
                break;
            };
            at = aligned;
            let mut fixed = read_clipped(self.image.storage(), at, l2::SNAPSHOT_HEADER_LEN as u64)?;
            fixed.resize(l2::SNAPSHOT_HEADER_LEN, 0);
            let Some(sn) = SnapshotHeader::decode(&fixed) else {
                break;
            };
            if sn.extra_data_size > l2::MAX_SNAPSHOT_EXTRA {
                self.check_error(format!(
                    "snapshot {i}: too much extra metadata ({} bytes)",
                    sn.extra_data_size
                ));
                return Ok(());
            }
            at = at.saturating_add(sn.unpadded_len());
            if at - h.snapshots_offset > l2::MAX_SNAPSHOT_TABLE {
                self.check_error("snapshot table is too big".into());
                return Ok(());
            }
            l1s.push((i, sn));
        }
        // Snapshots naming the same L1 table are walked once, counted as
        // many times as they are: a snapshot table of thousands of entries
        // sharing one L1 costs one walk (the counts are those of one walk
        // per snapshot, as `qemu-img check` makes).
        let mut groups: Vec<((u64, u32), u64)> = Vec::new();
        let mut group_of: HashMap<(u64, u32), usize> = HashMap::new();
        for (i, sn) in l1s {
            if !self.g.is_aligned(sn.l1_table_offset) {
                self.corruption(format!(
                    "ERROR snapshot {i} l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    sn.l1_table_offset
                ));
                continue;
            }
            if u64::from(sn.l1_size) > l2::MAX_L1_BYTES / 8 {
                self.corruption(format!(
                    "ERROR snapshot {i} l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    sn.l1_size
                ));
                continue;
            }
            let key = (sn.l1_table_offset, sn.l1_size);
            let g = *group_of.entry(key).or_insert_with(|| {
                groups.push((key, 0));
                groups.len() - 1
            });
            if let Some(group) = groups.get_mut(g) {
                group.1 += 1;
            }
        }
        for ((offset, size), times) in groups {
            self.times = times;
            let walked = self.check_l1(offset, size, false);
            self.times = 1;
            walked?;
        }
        self.inc(
            h.snapshots_offset,
            at - h.snapshots_offset,
            Owner::SnapshotTable,
        );
        Ok(())
    }

    fn walk_crypto(&mut self) {
        let ext = self
            .image
            .extensions()
            .iter()
            .find(|e| e.kind == ext_type::CRYPTO);
        if let Some(data) = ext.and_then(|e| e.data.get(..16)) {
            let offset = u64::from_be_bytes(data[..8].try_into().unwrap_or([0; 8]));
            let length = u64::from_be_bytes(data[8..16].try_into().unwrap_or([0; 8]));
            self.inc(offset, length, Owner::Crypto);
        }
    }

    fn check_refblocks(&mut self, stored: &Stored<'_, S>) {
        let cb = self.g.cluster_bits();
        for (i, &raw) in stored.table.iter().enumerate() {
            let off = raw & REFTABLE_OFFSET_MASK;
            if raw & !REFTABLE_OFFSET_MASK != 0 {
                self.corruption(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                continue;
            }
            if !self.g.is_aligned(off) {
                self.corruption(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                continue;
            }
            if off >> cb >= self.report.map.len() {
                self.corruption(format!("ERROR refcount block {i} is outside image"));
                continue;
            }
            if off != 0 {
                self.inc(off, self.g.cluster_size(), Owner::RefcountBlock);
                let count = self.report.map.references(off >> cb);
                if count != 1 {
                    self.corruption(format!("ERROR refcount block {i} refcount={count}"));
                }
            }
        }
    }

    fn compare(&mut self, stored: &Stored<'_, S>) -> Result<()> {
        let mut highest = 0u64;
        let mut unreadable_block = None;
        for c in 0..self.report.map.len() {
            let Some(refcount) = stored.get(c)? else {
                let block = c >> stored.block_bits;
                if unreadable_block != Some(block) {
                    unreadable_block = Some(block);
                    self.check_error(format!(
                        "Can't get refcount for clusters of refcount block {block}: misaligned refcount block offset"
                    ));
                } else {
                    self.report.check_errors += 1;
                }
                continue;
            };
            let references = self.report.map.references(c);
            if refcount > 0 || references > 0 {
                highest = c;
            }
            if refcount == references {
                continue;
            }
            let kind = if refcount < references {
                self.report.corruptions += 1;
                FindingKind::Error
            } else {
                self.report.leaks += 1;
                FindingKind::Leak
            };
            self.report.findings.push(Finding {
                cluster: c,
                offset: c << self.g.cluster_bits(),
                refcount,
                references,
                kind,
            });
        }
        self.report.image_end_offset = (highest + 1) << self.g.cluster_bits();
        Ok(())
    }

    /// QEMU's "OFLAG_COPIED" pass over the active L1 and L2 tables. Only the
    /// L2 tables that map host clusters are read again.
    fn check_copied(&mut self, stored: &Stored<'_, S>) -> Result<()> {
        let cb = self.g.cluster_bits();
        let l1 = std::mem::take(&mut self.active_l1);
        for (i, &l1e) in l1.iter().enumerate() {
            let l2_offset = l1e & l2::OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            if let Some(rc) = stored.get(l2_offset >> cb)? {
                if (rc == 1) != (l1e & l2::COPIED != 0) {
                    self.corruption(format!(
                        "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"
                    ));
                }
            }
        }
        let mut buf = std::mem::take(&mut self.l2_buf);
        for i in std::mem::take(&mut self.l2_with_host_clusters) {
            let l2_offset = l1.get(i).map_or(0, |e| e & l2::OFFSET_MASK);
            if l2_offset == 0 {
                // Walked as an "L2 table" in the header cluster, but QEMU's
                // copied pass skips a zero offset.
                continue;
            }
            let n = read_into_clipped(self.image.storage(), l2_offset, &mut buf)?;
            for chunk in buf[..n].chunks_exact(l2::l2_entry_len(self.extended)) {
                let (entry, _) = l2::split_entry(chunk, self.extended);
                let off = match l2::classify(entry, self.g, self.extended, self.data_file) {
                    L2Kind::Normal(off) | L2Kind::ZeroAlloc(off) => off,
                    _ => continue,
                };
                let rc = if self.data_file {
                    Some(1)
                } else {
                    stored.get(off >> cb)?
                };
                let Some(rc) = rc else { continue };
                if (rc == 1) != (entry & l2::COPIED != 0) {
                    self.corruption(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={rc}"
                    ));
                }
            }
        }
        self.l2_buf = buf;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_bytes(bytes: Vec<u8>) -> Option<RefcountReport> {
        let image = Image::open(bytes).ok()?;
        refcount_check(&image).ok()
    }

    fn put(bytes: &mut [u8], at: usize, v: &[u8]) {
        bytes[at..at + v.len()].copy_from_slice(v);
    }

    #[test]
    fn allones_fixture_matches_recorded_check() {
        let r = check_bytes(include_bytes!("../../fixtures/allones.qcow2").to_vec()).unwrap();
        // Recorded by qemu-img check: 2 leaks, image end 19456.
        assert_eq!((r.leaks, r.corruptions, r.image_end_offset), (2, 0, 19456));
        assert_eq!(r.findings.len(), 2);
        assert!(r.findings.iter().all(|f| f.kind == FindingKind::Leak));
    }

    #[test]
    fn absurd_header_counts_stay_bounded() {
        let base = include_bytes!("../../fixtures/tail-bits.qcow2").to_vec();
        let patches: [(usize, &[u8]); 6] = [
            (36, &u32::MAX.to_be_bytes()),                 // l1_size
            (56, &u32::MAX.to_be_bytes()),                 // refcount_table_clusters
            (60, &65536u32.to_be_bytes()),                 // nb_snapshots
            (64, &(u64::MAX - 3).to_be_bytes()),           // snapshots_offset
            (40, &0x00ff_ffff_ffff_0000u64.to_be_bytes()), // l1_table_offset
            (48, &(1u64 << 60).to_be_bytes()),             // refcount_table_offset
        ];
        for (at, v) in patches {
            let mut bytes = base.clone();
            put(&mut bytes, at, v);
            check_bytes(bytes);
        }
        let mut all = base.clone();
        for (at, v) in patches {
            put(&mut all, at, v);
        }
        check_bytes(all);
    }

    #[test]
    fn random_corruption_never_panics() {
        let base = include_bytes!("../../fixtures/allones.qcow2").to_vec();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let mut bytes = base.clone();
            for _ in 0..16 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            check_bytes(bytes);
        }
    }

    #[test]
    fn owner_packing_round_trips() {
        let all = [
            Owner::Header,
            Owner::RefcountTable,
            Owner::RefcountBlock,
            Owner::L1,
            Owner::L2,
            Owner::Data,
            Owner::Compressed,
            Owner::SnapshotTable,
            Owner::SnapshotL1,
            Owner::Crypto,
            Owner::BitmapDirectory,
            Owner::BitmapTable { bitmap: 65534 },
            Owner::BitmapData { bitmap: 7 },
        ];
        for o in all {
            assert_eq!(Owner::unpack(o.pack()), Some(o));
        }
        assert_eq!(Owner::unpack(0), None);
    }

    #[test]
    fn map_counts_saturate_and_tracks_distinct_owners() {
        let mut m = RefMap::default();
        assert_eq!(m.add(3, Owner::Data, 1, 1), 0);
        assert_eq!(m.add(3, Owner::Data, 1, 1), 1);
        assert_eq!(m.add(4, Owner::Data, 1, 5), 0);
        assert_eq!(m.add(4, Owner::Data, 1, 5), 0);
        assert_eq!(m.add(4, Owner::BitmapData { bitmap: 0 }, 1, 5), 0);
        assert_eq!(m.references(4), 3);
        assert_eq!(m.owners(4), [Owner::Data, Owner::BitmapData { bitmap: 0 }]);
        assert_eq!(m.shared().collect::<Vec<_>>(), [4]);
        assert_eq!(m.len(), 5);
        assert_eq!(m.references(99), 0);
        // Many at once: saturates at the width, reports what did not fit.
        assert_eq!(m.add(4, Owner::Data, 10, 5), 8);
        assert_eq!(m.references(4), 5);
        assert_eq!(
            m.add(7, Owner::Data, u64::MAX, u64::MAX),
            u64::MAX - u64::from(u32::MAX)
        );
        assert_eq!(m.references(7), u64::from(u32::MAX));
        // Owners are capped per cluster.
        for b in 0..100 {
            m.add(9, Owner::BitmapTable { bitmap: b }, 1, u64::MAX);
        }
        assert_eq!(m.references(9), 100);
        assert_eq!(m.owners(9).len(), MAX_OWNERS);
    }
}
