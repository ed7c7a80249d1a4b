//! Dirty extents of one bitmap in guest bytes: maximal runs of set bits,
//! merged across table clusters, clipped to the requested range and the
//! virtual size. Streams cluster by cluster (memory: one cluster of words),
//! skipping all-zero table entries without touching data.
//!
//! [`Extents`] borrows the image; [`ExtentCursor`] is the same scan as an
//! owned value that is handed the image at each step (for callers that
//! cannot hold a borrow, such as the Python bindings' lazy iterator).
//! [`Gaps`] adds the clean runs between dirty extents (`extents --all`).

use super::{BitmapEntry, Image, Table};
use crate::bits;
use crate::error::{Error, Result};
use crate::format::bitmap_table::TableEntry;
use crate::storage::ReadAt;

/// A dirty range of the virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub length: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Iterator over the dirty extents of one bitmap; see [`Image::extents`].
#[derive(Debug)]
pub struct Extents<'a, S> {
    image: &'a Image<S>,
    cursor: ExtentCursor,
}

/// The scan of [`Extents`] without the borrow: each step is given the image
/// it was made from ([`Image::extent_cursor`]).
#[derive(Debug)]
pub struct ExtentCursor {
    table: Table,
    /// Requested guest byte range.
    lo: u64,
    hi: u64,
    /// Bit range still to scan: `[bit, bit_end)`.
    bit: u64,
    bit_end: u64,
    /// Table entry whose words are loaded, and its words.
    loaded: Option<usize>,
    words: Vec<u64>,
    /// The loaded cluster's bytes (copy buffer).
    bytes: Vec<u8>,
    failed: bool,
}

impl<S: ReadAt> Image<S> {
    /// Dirty extents of `b` within guest bytes `[offset, offset + length)`
    /// (the whole disk when `range` is `None`).
    ///
    /// # Errors
    /// `Untrusted` unless `b` is `ok` or `force`; `InvalidInput` for a range
    /// beyond the virtual size; table errors.
    pub fn extents(
        &self,
        b: &BitmapEntry,
        range: Option<(u64, u64)>,
        force: bool,
    ) -> Result<Extents<'_, S>> {
        Ok(Extents {
            image: self,
            cursor: self.extent_cursor(b, range, force)?,
        })
    }

    /// The scan of [`Image::extents`] as an owned cursor; pass this same
    /// image to [`ExtentCursor::next_extent`].
    ///
    /// # Errors
    /// As [`Image::extents`].
    pub fn extent_cursor(
        &self,
        b: &BitmapEntry,
        range: Option<(u64, u64)>,
        force: bool,
    ) -> Result<ExtentCursor> {
        self.require_ok(b, force)?;
        let (lo, hi) = self.check_range(range)?;
        let table = self.table(b)?;
        let g = table.granularity_bits;
        let (bit, bit_end) = (lo >> g, hi.div_ceil(1 << g).min(table.nbits));
        Ok(ExtentCursor {
            table,
            lo,
            hi,
            bit,
            bit_end,
            loaded: None,
            words: Vec::new(),
            bytes: Vec::new(),
            failed: false,
        })
    }

    /// Validates a guest byte range against the virtual size.
    ///
    /// # Errors
    /// `InvalidInput` when it overflows or ends past the virtual size.
    pub fn check_range(&self, range: Option<(u64, u64)>) -> Result<(u64, u64)> {
        let size = self.virtual_size();
        let (off, len) = range.unwrap_or((0, size));
        match off.checked_add(len) {
            Some(end) if end <= size => Ok((off, end)),
            _ => Err(Error::invalid_input(
                "range",
                format!("offset {off} + length {len} goes past the virtual size {size}"),
            )),
        }
    }
}

impl ExtentCursor {
    /// The requested range `[lo, hi)` in guest bytes.
    pub fn range(&self) -> (u64, u64) {
        (self.lo, self.hi)
    }

    /// The next dirty extent; `image` must be the one the cursor was made
    /// from. After an error the cursor is finished.
    ///
    /// # Errors
    /// Reading or validating a data cluster of the table.
    pub fn next_extent<S: ReadAt>(&mut self, image: &Image<S>) -> Result<Option<Extent>> {
        if self.failed {
            return Ok(None);
        }
        match self.next_run(image) {
            Ok(run) => Ok(run.map(|r| self.to_bytes(r))),
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// The next run of set bits at or after `self.bit`, as bit indices.
    fn next_run<S: ReadAt>(&mut self, image: &Image<S>) -> Result<Option<(u64, u64)>> {
        let Some(start) = self.find(image, true)? else {
            return Ok(None);
        };
        self.bit = start;
        let end = self.find(image, false)?.unwrap_or(self.bit_end);
        self.bit = end;
        Ok(Some((start, end)))
    }

    /// First bit in `[self.bit, bit_end)` equal to `want`, crossing table entries.
    fn find<S: ReadAt>(&mut self, image: &Image<S>, want: bool) -> Result<Option<u64>> {
        let per = self.table.bits_per_cluster();
        while self.bit < self.bit_end {
            let k = usize::try_from(self.bit / per).unwrap_or(usize::MAX);
            let (first, end) = self.table.cluster_bits(k);
            let end = end.min(self.bit_end);
            let hit = match self.table.entries.get(k).copied() {
                Some(TableEntry::Ones) => want.then_some(self.bit),
                Some(TableEntry::Data(off)) => {
                    self.find_in_data(image, (k, off), first, end, want)?
                }
                Some(_) => (!want).then_some(self.bit),
                // Past the table (only when forced): nothing more is set.
                None => return Ok((!want).then_some(self.bit)),
            };
            if hit.is_some() {
                return Ok(hit);
            }
            self.bit = end;
        }
        Ok(None)
    }

    fn find_in_data<S: ReadAt>(
        &mut self,
        image: &Image<S>,
        (k, off): (usize, u64),
        first: u64,
        end: u64,
        want: bool,
    ) -> Result<Option<u64>> {
        if self.loaded != Some(k) {
            let (_, cluster_end) = self.table.cluster_bits(k);
            image.cluster_words(off, cluster_end - first, &mut self.words, &mut self.bytes)?;
            self.loaded = Some(k);
        }
        let (from, to) = (self.bit - first, end - first);
        let local = if want {
            bits::words::next_one(&self.words, from, to)
        } else {
            bits::words::next_zero(&self.words, from, to)
        };
        Ok(local.map(|b| b + first))
    }

    fn to_bytes(&self, (start, end): (u64, u64)) -> Extent {
        let g = self.table.granularity_bits;
        let offset = (start << g).max(self.lo);
        let end = end.saturating_mul(1 << g).min(self.hi);
        Extent {
            offset,
            length: end - offset,
        }
    }
}

impl<S: ReadAt> Iterator for Extents<'_, S> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Self::Item> {
        self.cursor.next_extent(self.image).transpose()
    }
}

impl<S: ReadAt> std::iter::FusedIterator for Extents<'_, S> {}

/// A run of guest bytes that is either dirty or clean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Run {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub length: u64,
    /// Whether the bitmap marks it dirty.
    pub dirty: bool,
}

/// Turns the dirty extents of a range `[lo, hi)`, in order, into runs that
/// cover every byte: each clean gap before a dirty extent, then the extent;
/// [`Gaps::finish`] gives the clean tail.
#[derive(Debug, Clone, Copy)]
pub struct Gaps {
    pos: u64,
    hi: u64,
}

impl Gaps {
    /// Gaps of the range `[lo, hi)`.
    pub fn new(lo: u64, hi: u64) -> Self {
        Gaps { pos: lo, hi }
    }

    /// The clean run before `e` (if any) and `e` as a dirty run.
    pub fn dirty(&mut self, e: Extent) -> (Option<Run>, Run) {
        let gap = (e.offset > self.pos).then(|| Run {
            offset: self.pos,
            length: e.offset - self.pos,
            dirty: false,
        });
        self.pos = self.pos.max(e.end());
        let run = Run {
            offset: e.offset,
            length: e.length,
            dirty: true,
        };
        (gap, run)
    }

    /// The clean run after the last dirty extent, if any (once).
    pub fn finish(&mut self) -> Option<Run> {
        let tail = (self.hi > self.pos).then(|| Run {
            offset: self.pos,
            length: self.hi - self.pos,
            dirty: false,
        });
        self.pos = self.hi;
        tail
    }
}
