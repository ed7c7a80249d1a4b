//! Block status through the chain, and the entries of `qemu-img map`.
//!
//! For each guest byte the status is that of the first layer (top first)
//! that allocates it (data or zeros); a byte no layer allocates is
//! unallocated at the depth of the first layer that has no backing file or
//! whose backing file ends before the byte. Consecutive statuses merge into
//! one [`MapEntry`] exactly when `qemu-img map` merges them: equal depth,
//! present, zero, data and compressed flags, both or neither with a host
//! offset, and host offsets that continue each other.

use super::layer::{Kind, Layer, Qcow2Layer};
use super::prealloc;
use super::{Reader, Result};
use crate::storage::ReadAt;

/// The status of one run of guest bytes, before merging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Guest bytes covered.
    pub len: u64,
    /// Index of the member that answered (0 = the top).
    pub depth: usize,
    /// What the run maps to in that member.
    pub kind: Kind,
}

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// First guest byte.
    pub start: u64,
    /// Guest bytes covered.
    pub length: u64,
    /// Member that holds the data (0 = the top), or where the walk stopped.
    pub depth: usize,
    /// Allocated in some member (data or zeros).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by data in a file.
    pub data: bool,
    /// Compressed clusters.
    pub compressed: bool,
    /// Host offset in the member's file (its data file when it has one).
    pub offset: Option<u64>,
}

impl MapEntry {
    fn from_status(start: u64, s: &Status) -> Self {
        let mut e = MapEntry {
            start,
            length: s.len,
            depth: s.depth,
            present: true,
            zero: false,
            data: false,
            compressed: false,
            offset: s.kind.host(),
        };
        match s.kind {
            Kind::Data { .. } => e.data = true,
            Kind::DataHole { .. } => {
                e.data = true;
                e.zero = true;
            }
            Kind::ZeroAlloc { .. } | Kind::ZeroPlain => e.zero = true,
            Kind::Compressed { .. } => {
                e.data = true;
                e.compressed = true;
            }
            Kind::Unallocated { .. } => {
                e.present = false;
                e.zero = true;
            }
        }
        e
    }

    /// Whether `next` merges into `self` (qemu-img map's rule).
    pub fn mergeable(&self, next: &MapEntry) -> bool {
        self.length != 0
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
                _ => false,
            }
    }

    /// One past the last guest byte.
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}

impl<'c> Reader<'c> {
    /// The status of the run starting at guest `offset`, at most `max` bytes
    /// (`offset` below the virtual size, `max` > 0).
    ///
    /// # Errors
    /// Any metadata problem met on the way (named with the member's path).
    pub fn status(&mut self, offset: u64, max: u64) -> Result<Status> {
        self.resolve(offset, max, false)
    }

    pub(super) fn resolve(&mut self, offset: u64, max: u64, for_read: bool) -> Result<Status> {
        let members = self.chain.members();
        let mut depth = 0;
        let mut len = max;
        loop {
            let m = &members[depth];
            let run = m
                .layer
                .lookup(&mut self.cache, depth, offset, len, for_read)
                .map_err(|e| e.context(m.path.display()))?;
            len = run.len;
            if let Kind::Unallocated { .. } = run.kind
                && m.backing.is_some()
                && let Some(below) = members.get(depth + 1)
                && offset < below.virtual_size
            {
                len = len.min(below.virtual_size - offset);
                depth += 1;
                continue;
            }
            let mut kind = run.kind;
            if !for_read
                && let Kind::Data { host } = kind
                && let Layer::Qcow2(q) = &m.layer
                && self.preallocated(depth, q)?
            {
                let storage = m.layer.data_storage();
                let (hole, n) = prealloc::host_hole(storage.file(), storage.len(), host, len)
                    .map_err(|e| e.context(m.path.display()))?;
                len = n;
                if hole {
                    kind = Kind::DataHole { host };
                }
            }
            return Ok(Status { len, depth, kind });
        }
    }

    /// Whether the qcow2 member at `depth` looks metadata-preallocated to QEMU
    /// (decided once per reader, on the first query that needs it).
    fn preallocated(&mut self, depth: usize, q: &Qcow2Layer) -> Result<bool> {
        if self.prealloc.len() <= depth {
            self.prealloc.resize(depth + 1, None);
        }
        if let Some(p) = self.prealloc[depth] {
            return Ok(p);
        }
        let p = prealloc::detect(q)
            .map_err(|e| e.context(self.chain.members()[depth].path.display()))?;
        self.prealloc[depth] = Some(p);
        Ok(p)
    }

    /// The `qemu-img map` entries of guest range `[offset, offset + length)`,
    /// streamed and merged.
    ///
    /// # Errors
    /// A range past the virtual size; later, each item may carry a metadata error
    /// (after which the iterator ends).
    pub fn map(&mut self, offset: u64, length: u64) -> Result<MapIter<'_, 'c>> {
        let cursor = self.map_cursor(offset, length)?;
        Ok(MapIter {
            reader: self,
            cursor,
        })
    }

    /// The scan of [`Reader::map`] as an owned cursor, stepped with
    /// [`MapCursor::next_entry`] by any reader of the same chain.
    ///
    /// # Errors
    /// A range past the virtual size.
    pub fn map_cursor(&self, offset: u64, length: u64) -> Result<MapCursor> {
        let end = self.chain.check_range(offset, length)?;
        Ok(MapCursor {
            pos: offset,
            end,
            pending: None,
        })
    }
}

/// The state of a map scan without the borrow of a reader; see
/// [`Reader::map_cursor`].
#[derive(Debug, Clone)]
pub struct MapCursor {
    pos: u64,
    end: u64,
    pending: Option<MapEntry>,
}

impl MapCursor {
    /// The next merged entry, read through `reader` (a reader of the chain
    /// the cursor was made for). After an error the scan is finished.
    ///
    /// # Errors
    /// A metadata problem met on the way.
    pub fn next_entry(&mut self, reader: &mut Reader<'_>) -> Result<Option<MapEntry>> {
        loop {
            if self.pos >= self.end {
                return Ok(self.pending.take());
            }
            let status = match reader.resolve(self.pos, self.end - self.pos, false) {
                Ok(s) => s,
                Err(e) => {
                    self.pos = self.end;
                    self.pending = None;
                    return Err(e);
                }
            };
            let entry = MapEntry::from_status(self.pos, &status);
            self.pos += status.len;
            match &mut self.pending {
                Some(p) if p.mergeable(&entry) => p.length += entry.length,
                Some(p) => {
                    let out = *p;
                    self.pending = Some(entry);
                    return Ok(Some(out));
                }
                None => self.pending = Some(entry),
            }
        }
    }
}

/// Iterator over merged [`MapEntry`]s; see [`Reader::map`].
#[derive(Debug)]
pub struct MapIter<'r, 'c> {
    reader: &'r mut Reader<'c>,
    cursor: MapCursor,
}

impl Iterator for MapIter<'_, '_> {
    type Item = Result<MapEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        self.cursor.next_entry(self.reader).transpose()
    }
}
