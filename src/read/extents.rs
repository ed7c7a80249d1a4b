//! Dirty extents of one bitmap in guest bytes: maximal runs of set bits,
//! merged across table clusters, clipped to the requested range and the
//! virtual size. Streams cluster by cluster (memory: one cluster of words),
//! skipping all-zero table entries without touching data.

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
        self.require_ok(b, force)?;
        let (lo, hi) = self.check_range(range)?;
        let table = self.table(b)?;
        let g = table.granularity_bits;
        let (bit, bit_end) = (lo >> g, hi.div_ceil(1 << g).min(table.nbits));
        Ok(Extents {
            image: self,
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

impl<S: ReadAt> Extents<'_, S> {
    /// The next run of set bits at or after `self.bit`, as bit indices.
    fn next_run(&mut self) -> Result<Option<(u64, u64)>> {
        let Some(start) = self.find(true)? else {
            return Ok(None);
        };
        self.bit = start;
        let end = self.find(false)?.unwrap_or(self.bit_end);
        self.bit = end;
        Ok(Some((start, end)))
    }

    /// First bit in `[self.bit, bit_end)` equal to `want`, crossing table entries.
    fn find(&mut self, want: bool) -> Result<Option<u64>> {
        let per = self.table.bits_per_cluster();
        while self.bit < self.bit_end {
            let k = usize::try_from(self.bit / per).unwrap_or(usize::MAX);
            let (first, end) = self.table.cluster_bits(k);
            let end = end.min(self.bit_end);
            let hit = match self.table.entries.get(k).copied() {
                Some(TableEntry::Ones) => want.then_some(self.bit),
                Some(TableEntry::Data(off)) => self.find_in_data(k, off, first, end, want)?,
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

    fn find_in_data(
        &mut self,
        k: usize,
        off: u64,
        first: u64,
        end: u64,
        want: bool,
    ) -> Result<Option<u64>> {
        if self.loaded != Some(k) {
            let (_, cluster_end) = self.table.cluster_bits(k);
            self.image
                .cluster_words(off, cluster_end - first, &mut self.words, &mut self.bytes)?;
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
        if self.failed {
            return None;
        }
        match self.next_run() {
            Ok(Some(run)) => Some(Ok(self.to_bytes(run))),
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

impl<S: ReadAt> std::iter::FusedIterator for Extents<'_, S> {}
