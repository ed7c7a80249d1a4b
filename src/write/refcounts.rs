//! Refcounts of an image being written: lazy loading, raising and lowering
//! refcounts, a first-fit cluster allocator, and the ordered write-back the
//! crash-safe commit protocol of [`crate::write`] relies on.
//!
//! [`Refcounts`] owns no storage: every call takes the storage it may read
//! (`ReadAt`) or write (`WriteAt`). Nothing is written to the storage except by
//! [`Refcounts::flush_increments`] and [`Refcounts::apply_decrements`]:
//! allocation and refcount changes happen in memory first.
//!
//! # Protocol
//!
//! ```text
//! allocate / increment           in memory only (clusters stay invisible on disk)
//! caller writes the new clusters
//! flush_increments(storage)      dirty refcount blocks, sync, reftable entries or a
//!                                relocated reftable, sync, [header 48..60, sync]
//! caller switches its header / directory to the new clusters, sync
//! queue_free(old clusters)       (may also be queued earlier: nothing is lowered yet)
//! apply_decrements(storage)      lowered refcounts written, sync
//! ```
//!
//! Queued frees are not applied in memory before [`Refcounts::apply_decrements`],
//! so the allocator never hands out a cluster the on-disk image may still
//! reference. [`Refcounts::decrement`] lowers a refcount at once: use it only
//! for clusters nothing on disk references (e.g. allocated and abandoned).
//!
//! # Allocation (as QEMU does it)
//!
//! First fit from the lowest cluster with refcount 0 (clusters past the end
//! of the file, or under a missing refcount block, have refcount 0; a partial
//! last cluster is used exactly when its refcount is nonzero). A missing
//! refcount block is placed in the first free cluster, describing itself when
//! it falls in its own range. A refcount table too small for a cluster is
//! replaced by a larger one (1.5x the needed entries, whole clusters, at most
//! 8 MiB) laid out at the end of the file after the new refcount blocks
//! that describe it; the old table is freed only after the header points at
//! the new one.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use crate::error::{Error, ErrorKind, Result};
use crate::format::header::Header;
use crate::format::incompat;
use crate::format::refcount::{self, REFTABLE_ENTRY_SIZE};
use crate::storage::{ReadAt, WriteAt};
use crate::types::{Geometry, HostCluster, HostOffset};

/// QEMU's limit on the refcount table size (`QCOW_MAX_REFTABLE_SIZE`).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// Host offsets this allocator hands out stay below 2^56 (the L2 entry limit).
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

/// Header offset of `refcount_table_offset` (u64), followed by `refcount_table_clusters` (u32).
pub const HEADER_REFTABLE_FIELDS: u64 = 48;

/// Where a refcount table lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefTableLocation {
    /// File offset of the table (cluster-aligned).
    pub offset: HostOffset,
    /// Length in clusters.
    pub clusters: u32,
}

/// One cached refcount block.
#[derive(Debug)]
struct Block {
    offset: u64,
    data: Vec<u8>,
    dirty: bool,
}

/// The refcounts of one image, cached and modified in memory, written back in protocol order.
#[derive(Debug)]
pub struct Refcounts {
    geometry: Geometry,
    order: u32,
    per_block: u64,
    /// Refcount block offsets by table index (0 = no block); may be longer than on disk.
    table: Vec<u64>,
    /// The table in memory (after a relocation, not yet on disk).
    location: RefTableLocation,
    /// The table the on-disk header points at.
    committed: RefTableLocation,
    /// Table entries changed in place since the last write-back.
    dirty_entries: BTreeSet<usize>,
    blocks: BTreeMap<usize, Block>,
    /// Cluster -> number of queued decrements.
    pending_free: BTreeMap<u64, u64>,
    /// Every cluster below this one has a nonzero refcount.
    free_hint: u64,
    /// One past the highest cluster given a refcount in this session.
    high_water: u64,
}

impl Refcounts {
    /// Loads the refcount table described by `header` (refcount blocks are read lazily).
    ///
    /// # Errors
    /// `Corrupt` when the table is empty, larger than 8 MiB, misaligned, not
    /// inside the file, or has an invalid entry; `Io` on read failures.
    pub fn load<S: ReadAt + ?Sized>(storage: &S, header: &Header) -> Result<Self> {
        refuse_stale(header)?;
        Self::load_unchecked(storage, header)
    }

    /// Loads the refcounts of an image whose dirty bit is set, to rebuild them
    /// from an owner walk. Allocation must not be used on the result until the
    /// rebuild is done (stale zero refcounts may hide used clusters).
    ///
    /// # Errors
    /// As [`Refcounts::load`], except for the dirty bit.
    pub fn load_for_rebuild<S: ReadAt + ?Sized>(storage: &S, header: &Header) -> Result<Self> {
        let mut h = header.clone();
        h.incompatible_features &= !incompat::DIRTY;
        refuse_stale(&h)?;
        Self::load_unchecked(storage, header)
    }

    /// Whether a refcount block exists for cluster `c` (so changing its
    /// refcount needs no allocation).
    pub fn has_block(&self, c: HostCluster) -> bool {
        let i = c.0 / self.per_block;
        usize::try_from(i)
            .ok()
            .and_then(|i| self.table.get(i))
            .is_some_and(|&b| b != 0)
    }

    fn load_unchecked<S: ReadAt + ?Sized>(storage: &S, header: &Header) -> Result<Self> {
        let geometry = header.geometry();
        let order = header.refcount_order;
        if order > refcount::MAX_ORDER {
            let msg = format!("{order} exceeds 6");
            return Err(Error::corrupt("qcow2 header refcount_order", 96, msg));
        }
        let location = RefTableLocation {
            offset: HostOffset(header.refcount_table_offset),
            clusters: header.refcount_table_clusters,
        };
        let table = read_table(storage, geometry, location)?;
        Ok(Refcounts {
            geometry,
            order,
            per_block: refcount::entries_per_block(geometry.cluster_bits(), order),
            table,
            location,
            committed: location,
            dirty_entries: BTreeSet::new(),
            blocks: BTreeMap::new(),
            pending_free: BTreeMap::new(),
            free_hint: 0,
            high_water: 0,
        })
    }

    /// The cluster geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The refcount order (refcount width is `1 << order` bits).
    pub fn refcount_order(&self) -> u32 {
        self.order
    }

    /// The largest refcount this image can store.
    pub fn max_refcount(&self) -> u64 {
        refcount::max_refcount(self.order)
    }

    /// The refcount table in memory (differs from the header's until a flush commits it).
    pub fn table_location(&self) -> RefTableLocation {
        self.location
    }

    /// The refcount table the on-disk header points at.
    pub fn committed_table_location(&self) -> RefTableLocation {
        self.committed
    }

    /// Clusters queued by [`Refcounts::queue_free`] and not yet applied.
    pub fn pending_frees(&self) -> u64 {
        self.pending_free.values().sum()
    }

    /// The end of the file once every allocated cluster is written:
    /// the larger of the storage length and the end of the highest cluster
    /// allocated in this session. Writing past the end grows the file.
    pub fn file_end<S: ReadAt + ?Sized>(&self, storage: &S) -> HostOffset {
        let allocated = self.high_water << self.geometry.cluster_bits();
        HostOffset(storage.len().max(allocated))
    }

    /// The in-memory refcount of cluster `c` (queued frees not yet subtracted).
    ///
    /// # Errors
    /// `Corrupt`/`Io` when its refcount block cannot be read.
    pub fn get<S: ReadAt + ?Sized>(&mut self, storage: &S, c: HostCluster) -> Result<u64> {
        self.raw_get(storage, c.0)
    }

    /// Raises the refcount of `c` by one (creating refcount blocks or a larger table if needed).
    ///
    /// # Errors
    /// `InvalidInput` when the refcount is already at its maximum or `c` is
    /// beyond the addressable range; `Corrupt`/`Io` from reading blocks.
    pub fn increment<S: ReadAt + ?Sized>(&mut self, storage: &S, c: HostCluster) -> Result<()> {
        self.check_range(c.0, 1)?;
        let only = c.0..c.0 + 1;
        self.ensure_blocks(storage, &only)?;
        let value = self.raw_get(storage, c.0)?;
        if value >= self.max_refcount() {
            let msg = format!("already at the maximum {value}");
            return Err(self.cluster_error(ErrorKind::InvalidInput, c.0, msg));
        }
        self.raw_set(storage, c.0, value + 1)
    }

    /// Lowers the refcount of `c` by one, in memory, at once.
    ///
    /// Only for clusters nothing on disk references; everything else goes
    /// through [`Refcounts::queue_free`].
    ///
    /// # Errors
    /// `Corrupt` when the refcount is already 0.
    pub fn decrement<S: ReadAt + ?Sized>(&mut self, storage: &S, c: HostCluster) -> Result<()> {
        self.subtract(storage, c.0, 1)
    }

    /// Queues one decrement of `c`, applied by [`Refcounts::apply_decrements`].
    ///
    /// # Errors
    /// `Corrupt` when the refcount minus the decrements already queued is 0.
    pub fn queue_free<S: ReadAt + ?Sized>(&mut self, storage: &S, c: HostCluster) -> Result<()> {
        let queued = self.pending_free.get(&c.0).copied().unwrap_or(0);
        if self.raw_get(storage, c.0)? <= queued {
            let msg = format!("freed more often than its refcount allows ({queued} frees queued)");
            return Err(self.cluster_error(ErrorKind::Corrupt, c.0, msg));
        }
        *self.pending_free.entry(c.0).or_insert(0) += 1;
        Ok(())
    }

    /// Allocates the lowest run of `count` free clusters and sets their refcounts to 1.
    ///
    /// Refcount blocks and a larger refcount table are created as needed, outside the run.
    ///
    /// # Errors
    /// `InvalidInput` for `count == 0` or a run past 2^56 bytes;
    /// `Unsupported` when the refcount table would exceed 8 MiB;
    /// `Corrupt`/`Io` from reading refcount blocks.
    pub fn allocate<S: ReadAt + ?Sized>(&mut self, storage: &S, count: u64) -> Result<HostCluster> {
        if count == 0 {
            return Err(Error::invalid_input("cluster allocation", "count is 0"));
        }
        let (start, first_free) = self.find_free(storage, count, &(0..0))?;
        let run = start..start + count;
        self.ensure_blocks(storage, &run)?;
        for c in run.clone() {
            self.raw_set(storage, c, 1)?;
        }
        self.free_hint = if first_free == start {
            run.end
        } else {
            first_free
        };
        Ok(HostCluster(start))
    }

    /// Writes every raised refcount, then the refcount table, with a sync after each;
    /// a relocated table is then committed by a 12-byte header write at offset 48 and a sync.
    ///
    /// Returns the new table's location when it was relocated (the caller
    /// must use it in any header it writes later); the old table's clusters
    /// are then queued for [`Refcounts::apply_decrements`].
    ///
    /// # Errors
    /// `Io` from the storage; the in-memory state then still needs a flush.
    pub fn flush_increments<S: WriteAt + ?Sized>(
        &mut self,
        storage: &mut S,
    ) -> Result<Option<RefTableLocation>> {
        self.write_blocks(storage)?;
        sync(storage)?;
        if self.location == self.committed {
            // New blocks are durable before table entries point at them; with
            // no entry to write there is nothing more to order.
            if !self.dirty_entries.is_empty() {
                self.write_dirty_entries(storage)?;
                sync(storage)?;
            }
            return Ok(None);
        }
        self.commit_relocation(storage).map(Some)
    }

    /// Applies the queued decrements and writes them back (with any pending
    /// increments, in the same order as [`Refcounts::flush_increments`]), then syncs.
    ///
    /// Call only after the on-disk structures no longer reference the queued clusters.
    ///
    /// # Errors
    /// `Corrupt` on underflow; `Io` from the storage.
    pub fn apply_decrements<S: WriteAt + ?Sized>(
        &mut self,
        storage: &mut S,
    ) -> Result<Option<RefTableLocation>> {
        let mut relocated = None;
        loop {
            for (c, n) in std::mem::take(&mut self.pending_free) {
                self.subtract(storage, c, n)?;
            }
            if let Some(loc) = self.flush_increments(storage)? {
                relocated = Some(loc);
            }
            if self.pending_free.is_empty() {
                return Ok(relocated);
            }
        }
    }
}

/// Reading and writing single refcounts.
impl Refcounts {
    fn cluster_offset(&self, c: u64) -> u64 {
        c.saturating_mul(self.geometry.cluster_size())
    }

    fn cluster_error(&self, kind: ErrorKind, c: u64, msg: String) -> Error {
        let what = format!("refcount of host cluster {c}");
        Error::new(kind, what, Some(self.cluster_offset(c)), msg)
    }

    fn split(&self, c: u64) -> (usize, usize) {
        // c < 2^56 / 512, so both parts fit in usize on 64-bit hosts; on
        // 32-bit hosts the table index still fits (tables are <= 8 MiB).
        ((c / self.per_block) as usize, (c % self.per_block) as usize)
    }

    fn coverage_end(&self) -> u64 {
        self.table.len() as u64 * self.per_block
    }

    fn check_range(&self, start: u64, count: u64) -> Result<()> {
        let limit = MAX_HOST_OFFSET >> self.geometry.cluster_bits();
        if start.checked_add(count).is_none_or(|end| end > limit) {
            let msg = format!("{count} clusters at cluster {start} pass the 2^56-byte limit");
            return Err(Error::invalid_input("cluster allocation", msg));
        }
        Ok(())
    }

    fn raw_get<S: ReadAt + ?Sized>(&mut self, storage: &S, c: u64) -> Result<u64> {
        let (i, k) = self.split(c);
        if self.table.get(i).is_none_or(|&o| o == 0) {
            return Ok(0);
        }
        let order = self.order;
        Ok(refcount::get(&self.block(storage, i)?.data, k, order))
    }

    /// Sets a refcount whose block exists (callers ran `ensure_blocks`).
    fn raw_set<S: ReadAt + ?Sized>(&mut self, storage: &S, c: u64, value: u64) -> Result<()> {
        let (i, k) = self.split(c);
        let order = self.order;
        let block = self.block(storage, i)?;
        refcount::set(&mut block.data, k, order, value);
        block.dirty = true;
        if value > 0 {
            self.high_water = self.high_water.max(c + 1);
        } else {
            self.free_hint = self.free_hint.min(c);
        }
        Ok(())
    }

    fn subtract<S: ReadAt + ?Sized>(&mut self, storage: &S, c: u64, n: u64) -> Result<()> {
        let value = self.raw_get(storage, c)?;
        let Some(lowered) = value.checked_sub(n) else {
            let msg = format!("{value} cannot be lowered by {n}");
            return Err(self.cluster_error(ErrorKind::Corrupt, c, msg));
        };
        self.raw_set(storage, c, lowered)
    }

    /// The cached block for table index `i` (whose entry is nonzero), read on first use.
    fn block<S: ReadAt + ?Sized>(&mut self, storage: &S, i: usize) -> Result<&mut Block> {
        let block = match self.blocks.remove(&i) {
            Some(b) => b,
            None => self.read_block(storage, i)?,
        };
        Ok(put(&mut self.blocks, i, block))
    }

    fn read_block<S: ReadAt + ?Sized>(&self, storage: &S, i: usize) -> Result<Block> {
        let offset = self.table[i];
        let len = self.geometry.cluster_len();
        let what = format!("refcount block {i} (refcount table entry {i})");
        if offset
            .checked_add(len as u64)
            .is_none_or(|e| e > storage.len())
        {
            let msg = format!("lies past the end of the file ({} bytes)", storage.len());
            return Err(Error::corrupt(what, offset, msg));
        }
        let mut scratch = Vec::new();
        let data = storage
            .read_at(offset, len, &mut scratch)
            .map_err(|e| Error::io(what, Some(offset), e))?
            .to_vec();
        Ok(Block {
            offset,
            data,
            dirty: false,
        })
    }
}

/// Finding free clusters and creating refcount blocks and tables.
impl Refcounts {
    /// The lowest run of `count` clusters with refcount 0 outside `avoid`,
    /// and the lowest free cluster seen (outside `avoid`) on the way.
    fn find_free<S: ReadAt + ?Sized>(
        &mut self,
        storage: &S,
        count: u64,
        avoid: &Range<u64>,
    ) -> Result<(u64, u64)> {
        let coverage = self.coverage_end();
        let (mut start, mut c) = (self.free_hint, self.free_hint);
        let mut first_free = None;
        while c - start < count && c < coverage {
            if avoid.contains(&c) {
                (start, c) = (avoid.end, avoid.end);
                continue;
            }
            let (i, _) = self.split(c);
            let free = self.table[i] == 0 || self.raw_get(storage, c)? == 0;
            if !free {
                (start, c) = (c + 1, c + 1);
                continue;
            }
            first_free.get_or_insert(c);
            // A missing block is all free: skip to its end (clamped to `avoid`).
            c = if self.table[i] == 0 {
                let next = (i as u64 + 1) * self.per_block;
                if !avoid.is_empty() && avoid.start > c && avoid.start < next {
                    avoid.start
                } else {
                    next
                }
            } else {
                c + 1
            };
        }
        // Past the covered clusters everything is free, except `avoid`.
        if start < avoid.end && avoid.start < start.saturating_add(count) {
            start = avoid.end;
        }
        self.check_range(start, count)?;
        Ok((start, first_free.unwrap_or(start)))
    }

    /// Makes sure a refcount block exists for every cluster of `run`,
    /// placing new metadata outside `run`.
    fn ensure_blocks<S: ReadAt + ?Sized>(&mut self, storage: &S, run: &Range<u64>) -> Result<()> {
        let first = self.split(run.start).0;
        let last = self.split(run.end - 1).0;
        if last >= self.table.len() {
            self.grow_table(storage, last as u64 + 1, run)?;
        }
        for i in first..=last {
            if self.table[i] == 0 {
                self.new_block(storage, i, run)?;
            }
        }
        Ok(())
    }

    /// Creates refcount block `i` in the first free cluster outside `avoid`.
    fn new_block<S: ReadAt + ?Sized>(
        &mut self,
        storage: &S,
        i: usize,
        avoid: &Range<u64>,
    ) -> Result<()> {
        loop {
            let (p, _) = self.find_free(storage, 1, avoid)?;
            let (j, k) = self.split(p);
            if j >= self.table.len() {
                self.grow_table(storage, j as u64 + 1, avoid)?;
            } else if j == i {
                // The block describes itself.
                let order = self.order;
                let block = self.install_block(i, p);
                refcount::set(&mut block.data, k, order, 1);
                self.high_water = self.high_water.max(p + 1);
                return Ok(());
            } else if self.table[j] == 0 {
                // Block j takes p itself (p is its first free cluster); retry.
                self.new_block(storage, j, avoid)?;
            } else {
                self.install_block(i, p);
                return self.raw_set(storage, p, 1);
            }
        }
    }

    /// Puts a zeroed, dirty block for table index `i` in cluster `p`.
    fn install_block(&mut self, i: usize, p: u64) -> &mut Block {
        let offset = self.cluster_offset(p);
        self.table[i] = offset;
        self.dirty_entries.insert(i);
        let data = vec![0; self.geometry.cluster_len()];
        let block = Block {
            offset,
            data,
            dirty: true,
        };
        put(&mut self.blocks, i, block)
    }

    /// Replaces the table by one with at least `needed` entries, laid out
    /// after the end of the file, `avoid`, and everything covered so far:
    /// new self-describing refcount blocks first, then the table.
    fn grow_table<S: ReadAt + ?Sized>(
        &mut self,
        storage: &S,
        needed: u64,
        avoid: &Range<u64>,
    ) -> Result<()> {
        let file_end = self.geometry.clusters_for(storage.len());
        let area = file_end
            .max(self.coverage_end())
            .max(avoid.end)
            .max(self.high_water);
        let (blocks, clusters) = self.table_layout(needed, area)?;
        self.check_range(area, blocks + clusters)?;
        let entries = clusters * (self.geometry.cluster_size() / REFTABLE_ENTRY_SIZE);
        let old = self.location;
        self.table.resize(entries as usize, 0);
        let first = self.split(area).0;
        for k in 0..blocks {
            self.install_block(first + k as usize, area + k);
        }
        for c in area..area + blocks + clusters {
            self.raw_set(storage, c, 1)?;
        }
        self.location = RefTableLocation {
            offset: HostOffset(self.cluster_offset(area + blocks)),
            // At most 8 MiB / 512 B = 16384 clusters (MAX_REFTABLE_BYTES).
            clusters: u32::try_from(clusters).unwrap_or(u32::MAX),
        };
        self.dirty_entries.clear();
        if old != self.committed {
            // An intermediate table that never reached the disk: release it now.
            self.release_table(storage, old)?;
        }
        Ok(())
    }

    /// (refcount blocks, table clusters) for a table of at least `needed`
    /// entries placed at cluster `area`, whose blocks describe the whole area.
    fn table_layout(&self, needed: u64, area: u64) -> Result<(u64, u64)> {
        let per_cluster = self.geometry.cluster_size() / REFTABLE_ENTRY_SIZE;
        let max_clusters = MAX_REFTABLE_BYTES / self.geometry.cluster_size();
        let (mut blocks, mut clusters) = (0u64, 0u64);
        loop {
            let end = area.saturating_add(blocks + clusters);
            let entries = needed
                .max(end.div_ceil(self.per_block))
                .max(self.table.len() as u64);
            let exact = entries.div_ceil(per_cluster);
            if exact > max_clusters {
                let msg = format!("{entries} entries would exceed QEMU's 8 MiB limit");
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "refcount table",
                    None,
                    msg,
                ));
            }
            let grown = (entries + entries / 2)
                .div_ceil(per_cluster)
                .min(max_clusters);
            let next_clusters = grown.max(clusters);
            let area_end = area.saturating_add(blocks + next_clusters);
            let next_blocks = (area_end - 1) / self.per_block - area / self.per_block + 1;
            if (next_blocks, next_clusters) == (blocks, clusters) {
                return Ok((blocks, clusters));
            }
            (blocks, clusters) = (next_blocks.max(blocks), next_clusters);
        }
    }

    fn release_table<S: ReadAt + ?Sized>(
        &mut self,
        storage: &S,
        loc: RefTableLocation,
    ) -> Result<()> {
        let first = self.geometry.cluster_of(loc.offset).0;
        for c in first..first + u64::from(loc.clusters) {
            self.subtract(storage, c, 1)?;
        }
        Ok(())
    }
}

/// Write-back.
impl Refcounts {
    fn write_blocks<S: WriteAt + ?Sized>(&mut self, storage: &mut S) -> Result<()> {
        for block in self.blocks.values_mut().filter(|b| b.dirty) {
            storage
                .write_at(block.offset, &block.data)
                .map_err(|e| Error::io("refcount block", Some(block.offset), e))?;
            block.dirty = false;
        }
        Ok(())
    }

    fn write_dirty_entries<S: WriteAt + ?Sized>(&mut self, storage: &mut S) -> Result<()> {
        for &i in &self.dirty_entries {
            let at = self.location.offset.0 + i as u64 * REFTABLE_ENTRY_SIZE;
            storage
                .write_at(at, &self.table[i].to_be_bytes())
                .map_err(|e| Error::io("refcount table entry", Some(at), e))?;
        }
        self.dirty_entries.clear();
        Ok(())
    }

    /// Writes the relocated table, syncs, points the header at it, syncs,
    /// and queues the old table for freeing.
    fn commit_relocation<S: WriteAt + ?Sized>(
        &mut self,
        storage: &mut S,
    ) -> Result<RefTableLocation> {
        let new = self.location;
        let bytes: Vec<u8> = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
        storage
            .write_at(new.offset.0, &bytes)
            .map_err(|e| Error::io("refcount table", Some(new.offset.0), e))?;
        sync(storage)?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&new.offset.0.to_be_bytes());
        fields[8..].copy_from_slice(&new.clusters.to_be_bytes());
        storage
            .write_at(HEADER_REFTABLE_FIELDS, &fields)
            .map_err(|e| Error::io("qcow2 header refcount_table_offset", Some(48), e))?;
        sync(storage)?;
        let old = std::mem::replace(&mut self.committed, new);
        self.dirty_entries.clear();
        let first = self.geometry.cluster_of(old.offset).0;
        for c in first..first + u64::from(old.clusters) {
            *self.pending_free.entry(c).or_insert(0) += 1;
        }
        Ok(new)
    }
}

/// Stores `block` at `i` (replacing any) and returns it.
fn put(blocks: &mut BTreeMap<usize, Block>, i: usize, block: Block) -> &mut Block {
    match blocks.entry(i) {
        std::collections::btree_map::Entry::Occupied(mut e) => {
            e.insert(block);
            e.into_mut()
        }
        std::collections::btree_map::Entry::Vacant(v) => v.insert(block),
    }
}

/// Refcounts of an image with the dirty bit (lazy refcounts) or the corrupt
/// bit cannot be trusted to allocate from.
fn refuse_stale(header: &Header) -> Result<()> {
    let bad = header.incompatible_features & (incompat::DIRTY | incompat::CORRUPT);
    if bad == 0 {
        return Ok(());
    }
    let why = if bad & incompat::CORRUPT != 0 {
        "the image is marked corrupt"
    } else {
        "refcounts may be stale (dirty bit); run qemu-img check -r all first"
    };
    let what = "qcow2 header incompatible_features";
    Err(Error::new(ErrorKind::Unsupported, what, Some(72), why))
}

fn sync<S: WriteAt + ?Sized>(storage: &mut S) -> Result<()> {
    storage.sync().map_err(|e| Error::io("image sync", None, e))
}

/// Reads and decodes the refcount table at `loc`, after checking it against the file.
fn read_table<S: ReadAt + ?Sized>(
    storage: &S,
    g: Geometry,
    loc: RefTableLocation,
) -> Result<Vec<u64>> {
    let field = |name: &str, off: u64, msg: String| {
        Error::corrupt(format!("qcow2 header {name}"), off, msg)
    };
    let clusters = u64::from(loc.clusters);
    if clusters == 0 || clusters * g.cluster_size() > MAX_REFTABLE_BYTES {
        let msg = format!(
            "{clusters} is outside 1..={}",
            MAX_REFTABLE_BYTES / g.cluster_size()
        );
        return Err(field("refcount_table_clusters", 56, msg));
    }
    let (offset, len) = (loc.offset.0, clusters * g.cluster_size());
    if offset == 0 || !g.is_aligned(offset) {
        let msg = format!("0x{offset:x} is not a nonzero multiple of the cluster size");
        return Err(field("refcount_table_offset", 48, msg));
    }
    if offset
        .checked_add(len)
        .is_none_or(|end| end > storage.len())
    {
        let msg = format!(
            "table of {len} bytes at 0x{offset:x} runs past the end of the file ({} bytes)",
            storage.len()
        );
        return Err(field("refcount_table_offset", 48, msg));
    }
    let mut scratch = Vec::new();
    // len <= 8 MiB, checked above.
    let bytes = storage
        .read_at(offset, len as usize, &mut scratch)
        .map_err(|e| Error::io("refcount table", Some(offset), e))?;
    let mut table = Vec::with_capacity(bytes.len() / 8);
    for (i, raw) in crate::format::bitmap_table::raw_entries(bytes).enumerate() {
        let at = offset + i as u64 * REFTABLE_ENTRY_SIZE;
        let entry = refcount::decode_reftable_entry(raw, g.cluster_bits(), at)?;
        table.push(entry.map_or(0, |o| o.0));
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::be::Put;
    use std::collections::BTreeSet;

    const CS: u64 = 512;

    /// A minimal v3 image with 512-byte clusters: header (cluster 0),
    /// one-cluster refcount table (cluster 1), one refcount block (cluster 2)
    /// giving clusters 0..=2 refcount 1; `extra` more used clusters follow.
    fn image(order: u32, extra: u64) -> Vec<u8> {
        let mut h = crate::format::header::tests::sample_v3();
        (h.cluster_bits, h.refcount_order, h.autoclear_features) = (9, order, 0);
        (h.refcount_table_offset, h.refcount_table_clusters) = (CS, 1);
        (h.l1_size, h.l1_table_offset, h.size) = (0, 0, 1 << 20);
        let mut p = Put::new();
        h.encode(&mut p);
        let mut file = p.into_vec();
        file.resize((3 + extra) as usize * CS as usize, 0);
        file[CS as usize..CS as usize + 8].copy_from_slice(&(2 * CS).to_be_bytes());
        let block = &mut file[2 * CS as usize..3 * CS as usize];
        for c in 0..3 + extra as usize {
            refcount::set(block, c, order, 1);
        }
        file
    }

    fn open(file: &Vec<u8>) -> Refcounts {
        let header = Header::decode(&file[..CS as usize]).unwrap();
        Refcounts::load(file, &header).unwrap()
    }

    /// Tiny deterministic generator (xorshift64*), seed printed by the tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Reopens `file` and checks every refcount: 1 for the model's live clusters,
    /// the header, the table and every refcount block; 0 everywhere else.
    fn check_reopened(file: &Vec<u8>, live: &BTreeSet<u64>) {
        let mut r = open(file);
        let loc = r.table_location();
        let mut expected: BTreeMap<u64, u64> = live.iter().map(|&c| (c, 1)).collect();
        let mut meta = vec![0u64];
        let first = loc.offset.0 / CS;
        meta.extend(first..first + u64::from(loc.clusters));
        meta.extend(r.table.iter().filter(|&&o| o != 0).map(|o| o / CS));
        for c in meta {
            assert!(
                expected.insert(c, 1).is_none(),
                "metadata cluster {c} also allocated"
            );
        }
        for (i, &o) in r.table.clone().iter().enumerate() {
            if o == 0 {
                continue;
            }
            for c in i as u64 * r.per_block..(i as u64 + 1) * r.per_block {
                let want = expected.get(&c).copied().unwrap_or(0);
                assert_eq!(r.get(file, HostCluster(c)).unwrap(), want, "cluster {c}");
            }
        }
        for &c in expected.keys() {
            assert!(
                r.table[r.split(c).0] != 0,
                "cluster {c} has no refcount block"
            );
        }
    }

    fn model_run(order: u32, seed: u64, ops: usize) {
        eprintln!("order={order} seed={seed}");
        let mut file = image(order, 0);
        let mut r = open(&file);
        let mut rng = Rng(seed | 1);
        let mut live: Vec<(u64, u64)> = Vec::new();
        let mut live_set = BTreeSet::new();
        for _ in 0..ops {
            match rng.below(10) {
                0..=5 => {
                    let n = 1 + rng.below(8);
                    let c = r.allocate(&file, n).unwrap().0;
                    for k in c..c + n {
                        assert!(live_set.insert(k), "cluster {k} handed out twice");
                        assert!(k >= 3);
                        assert_eq!(r.get(&file, HostCluster(k)).unwrap(), 1);
                    }
                    live.push((c, n));
                }
                6..=7 if !live.is_empty() => {
                    let (c, n) = live.swap_remove(rng.below(live.len() as u64) as usize);
                    for k in c..c + n {
                        r.queue_free(&file, HostCluster(k)).unwrap();
                        live_set.remove(&k);
                    }
                }
                8 => {
                    r.flush_increments(&mut file).unwrap();
                }
                _ => {
                    r.flush_increments(&mut file).unwrap();
                    r.apply_decrements(&mut file).unwrap();
                }
            }
        }
        r.flush_increments(&mut file).unwrap();
        r.apply_decrements(&mut file).unwrap();
        assert_eq!(r.pending_frees(), 0);
        check_reopened(&file, &live_set);
    }

    #[test]
    fn model_every_order() {
        for order in 0..=6 {
            for seed in [1, 0x9e37_79b9_7f4a_7c15, 42] {
                model_run(order, seed + u64::from(order), 2000);
            }
        }
    }

    #[test]
    fn relocation_on_512_byte_clusters() {
        // 64-bit refcounts: 64 per block, one table cluster covers 4096 clusters.
        for order in [4, 5, 6] {
            let mut file = image(order, 0);
            let mut r = open(&file);
            let coverage = r.coverage_end();
            let mut live = BTreeSet::new();
            while r.table_location() == r.committed_table_location() {
                let c = r.allocate(&file, 7).unwrap().0;
                live.extend(c..c + 7);
            }
            for _ in 0..20 {
                let c = r.allocate(&file, 5).unwrap().0;
                live.extend(c..c + 5);
            }
            assert!(live.last().copied().unwrap() >= coverage);
            let freed: Vec<u64> = live.iter().copied().step_by(3).collect();
            for &c in &freed {
                r.queue_free(&file, HostCluster(c)).unwrap();
                live.remove(&c);
            }
            let loc = r.flush_increments(&mut file).unwrap().expect("relocated");
            assert_eq!(&file[48..56], &loc.offset.0.to_be_bytes());
            assert_eq!(&file[56..60], &loc.clusters.to_be_bytes());
            assert_eq!(
                r.get(&file, HostCluster(1)).unwrap(),
                1,
                "old table kept until apply"
            );
            assert_eq!(r.pending_frees(), freed.len() as u64 + 1);
            assert_eq!(r.apply_decrements(&mut file).unwrap(), None);
            check_reopened(&file, &live);
            let mut again = open(&file);
            assert_eq!(
                again.get(&file, HostCluster(1)).unwrap(),
                0,
                "old table freed"
            );
            // First fit reuses the old table's cluster.
            assert_eq!(again.allocate(&file, 1).unwrap(), HostCluster(1));
        }
    }

    #[test]
    fn first_fit_and_queued_frees_are_not_reused() {
        let mut file = image(4, 0);
        let mut r = open(&file);
        let c: Vec<u64> = (0..10).map(|_| r.allocate(&file, 1).unwrap().0).collect();
        assert_eq!(c, (3..13).collect::<Vec<_>>());
        for k in 5..8 {
            r.queue_free(&file, HostCluster(k)).unwrap();
        }
        assert_eq!(r.allocate(&file, 2).unwrap(), HostCluster(13));
        r.flush_increments(&mut file).unwrap();
        r.apply_decrements(&mut file).unwrap();
        assert_eq!(
            r.allocate(&file, 4).unwrap(),
            HostCluster(15),
            "hole of 3 is too small"
        );
        assert_eq!(r.allocate(&file, 2).unwrap(), HostCluster(5));
        assert_eq!(r.allocate(&file, 2).unwrap(), HostCluster(19));
        assert_eq!(r.allocate(&file, 1).unwrap(), HostCluster(7));
    }

    #[test]
    fn partial_tail_cluster_is_used_only_with_a_refcount() {
        for (tail_refcount, want) in [(1, 4), (0, 3)] {
            let mut file = image(4, 1);
            file.truncate(3 * CS as usize + 100);
            let mut r = open(&file);
            if tail_refcount == 0 {
                r.decrement(&file, HostCluster(3)).unwrap();
            }
            assert_eq!(r.allocate(&file, 1).unwrap(), HostCluster(want));
        }
    }

    #[test]
    fn new_refcount_blocks_self_describing_or_not() {
        // 64 refcounts per block. Fill block 0 (clusters 3..=63).
        let mut file = image(6, 0);
        let mut r = open(&file);
        assert_eq!(r.allocate(&file, 61).unwrap(), HostCluster(3));
        // Cluster 64 needs block 1, which takes cluster 65 and describes itself.
        assert_eq!(r.allocate(&file, 1).unwrap(), HostCluster(64));
        assert_eq!(r.table[1], 65 * CS);
        assert_eq!(r.get(&file, HostCluster(65)).unwrap(), 1);
        // A 1-cluster hole at 10: block 2 goes there, described by block 0.
        r.decrement(&file, HostCluster(10)).unwrap();
        assert_eq!(r.allocate(&file, 130).unwrap(), HostCluster(66));
        assert_eq!(r.table[2], 10 * CS);
        assert_eq!(
            r.table[3],
            196 * CS,
            "block 3 describes itself after the run"
        );
        r.flush_increments(&mut file).unwrap();
        let live: BTreeSet<u64> = (3..65).chain(66..196).filter(|&c| c != 10).collect();
        check_reopened(&file, &live);
    }

    #[test]
    fn overflow_and_underflow_name_the_cluster() {
        let file = image(0, 0);
        let mut r = open(&file);
        let e = r.increment(&file, HostCluster(2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "refcount of host cluster 2 at offset 1024 (0x400): already at the maximum 1"
        );
        let e = r.decrement(&file, HostCluster(7)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(
            e.to_string()
                .starts_with("refcount of host cluster 7 at offset 3584"),
            "{e}"
        );
        r.queue_free(&file, HostCluster(2)).unwrap();
        assert!(r.queue_free(&file, HostCluster(2)).is_err());
        assert!(r.allocate(&file, 0).is_err());
    }

    #[test]
    fn hostile_tables_are_refused() {
        let base = image(4, 0);
        let cases: &[(usize, &[u8], &str)] = &[
            (56, &[0, 0, 0, 0], "refcount_table_clusters at offset 56"),
            (56, &[0, 1, 0, 0], "refcount_table_clusters at offset 56"),
            (
                48,
                &[0, 0, 0, 0, 0, 0, 2, 1],
                "refcount_table_offset at offset 48",
            ),
            (
                48,
                &[0, 0, 0, 0, 0, 1, 0, 0],
                "runs past the end of the file",
            ),
            (512, &[0, 0, 0, 0, 0, 0, 4, 1], "reserved bits"),
        ];
        for (off, bytes, want) in cases {
            let mut file = base.clone();
            file[*off..*off + <[u8]>::len(bytes)].copy_from_slice(bytes);
            let header = Header::decode(&file[..CS as usize]).unwrap();
            let e = Refcounts::load(&file, &header).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        for bit in [1u8, 2] {
            let mut file = base.clone();
            file[79] = bit;
            let header = Header::decode(&file[..CS as usize]).unwrap();
            let e = Refcounts::load(&file, &header).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        }
        let mut file = base.clone();
        file[512..520].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let mut r = open(&file);
        let e = r.get(&file, HostCluster(0)).unwrap_err().to_string();
        assert!(e.contains("lies past the end of the file"), "{e}");
    }

    /// Storage that logs every write and sync, so crash states can be replayed.
    #[derive(Debug, Default)]
    struct Recorder {
        now: Vec<u8>,
        log: Vec<Option<(u64, Vec<u8>)>>,
    }

    impl ReadAt for Recorder {
        fn len(&self) -> u64 {
            ReadAt::len(&self.now)
        }
        fn read_at<'a>(
            &'a self,
            offset: u64,
            len: usize,
            s: &'a mut Vec<u8>,
        ) -> std::io::Result<&'a [u8]> {
            self.now.read_at(offset, len, s)
        }
    }

    impl WriteAt for Recorder {
        fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.log.push(Some((offset, data.to_vec())));
            self.now.write_at(offset, data)
        }
        fn sync(&mut self) -> std::io::Result<()> {
            self.log.push(None);
            Ok(())
        }
    }

    /// Every state a crash can leave after `log` started from `base`: all
    /// synced epochs, plus any in-order or reverse-order subset of the
    /// writes of the epoch under way (writes between syncs may land in any order).
    fn crash_states(base: &[u8], log: &[Option<(u64, Vec<u8>)>]) -> Vec<Vec<u8>> {
        let epochs: Vec<Vec<&(u64, Vec<u8>)>> = log
            .split(Option::is_none)
            .map(|e| e.iter().flatten().collect())
            .collect();
        let mut durable = base.to_vec();
        let mut states = Vec::new();
        for epoch in &epochs {
            for k in 0..=epoch.len() {
                for order in [&epoch[..k], &epoch[epoch.len() - k..]] {
                    let mut s = durable.clone();
                    for (off, data) in order {
                        s.write_at(*off, data).unwrap();
                    }
                    states.push(s);
                }
            }
            for (off, data) in epoch {
                durable.write_at(*off, data).unwrap();
            }
        }
        states
    }

    /// What a crash must never break: the image opens, every refcount
    /// structure is counted and inside the file, and every cluster the
    /// caller's committed metadata references has a nonzero refcount.
    fn assert_consistent(file: &Vec<u8>, referenced: &BTreeSet<u64>, ctx: &str) {
        let header = Header::decode(&file[..CS as usize]).unwrap();
        let mut r = Refcounts::load(file, &header).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let loc = r.table_location();
        let first = loc.offset.0 / CS;
        let mut counted: Vec<u64> = vec![0];
        counted.extend(first..first + u64::from(loc.clusters));
        for &o in &r.table.clone() {
            if o != 0 {
                assert!(
                    o + CS <= ReadAt::len(file),
                    "{ctx}: block 0x{o:x} past the end"
                );
                counted.push(o / CS);
            }
        }
        counted.extend(referenced);
        for c in counted {
            let v = r
                .get(file, HostCluster(c))
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            assert!(v >= 1, "{ctx}: referenced cluster {c} has refcount 0");
        }
    }

    #[test]
    fn every_crash_state_is_consistent() {
        for order in [0, 4, 6] {
            let base = image(order, 0);
            let mut rec = Recorder {
                now: base.clone(),
                log: Vec::new(),
            };
            let mut r = open(&rec.now);
            let mut allocated = BTreeSet::new();
            for n in (1..=8).cycle().take(1100) {
                let c = r.allocate(&rec, n).unwrap().0;
                allocated.extend(c..c + n);
            }
            let relocated = r.flush_increments(&mut rec).unwrap();
            assert_eq!(relocated.is_some(), order == 6);
            for (k, s) in crash_states(&base, &rec.log).iter().enumerate() {
                assert_consistent(
                    s,
                    &BTreeSet::new(),
                    &format!("order {order} flush state {k}"),
                );
            }
            // The caller committed `allocated`; it now drops every third
            // cluster and allocates more, flushes, switches its metadata
            // (the old version references all of `allocated` until then),
            // and applies the frees.
            let base = rec.now.clone();
            rec.log.clear();
            let freed: Vec<u64> = allocated.iter().copied().step_by(3).collect();
            for &c in &freed {
                r.queue_free(&rec, HostCluster(c)).unwrap();
            }
            let mut added = BTreeSet::new();
            for _ in 0..300 {
                let c = r.allocate(&rec, 3).unwrap().0;
                added.extend(c..c + 3);
            }
            assert!(added.is_disjoint(&allocated), "queued frees reused");
            r.flush_increments(&mut rec).unwrap();
            for (k, s) in crash_states(&base, &rec.log).iter().enumerate() {
                let ctx = format!("order {order} second flush state {k}");
                assert_consistent(s, &allocated, &ctx);
            }
            let base = rec.now.clone();
            rec.log.clear();
            for c in &freed {
                allocated.remove(c);
            }
            allocated.extend(added);
            r.apply_decrements(&mut rec).unwrap();
            for (k, s) in crash_states(&base, &rec.log).iter().enumerate() {
                assert_consistent(s, &allocated, &format!("order {order} apply state {k}"));
            }
            assert_consistent(&rec.now, &allocated, "final");
        }
    }
}
