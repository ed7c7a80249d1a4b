//! One bitmap's state and table: classification of directory entries
//! (ok / in-use / stale / invalid), table validation, dirty byte counts.
//!
//! Only the table and data clusters of the bitmap asked about are read.

use super::Image;
use crate::bits;
use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap_table::{self, TableEntry};
use crate::format::directory::{DirEntry, Problem, Severity};
use crate::storage::ReadAt;
use crate::types::Geometry;

/// Whether a bitmap can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BitmapState {
    /// Consistent: its contents are exactly what was recorded.
    Ok,
    /// The in_use flag is set: it was not saved properly (crash, or a QEMU process has it open).
    InUse,
    /// The extension is stale (autoclear bit 0 clear, or a version 2 image).
    Stale,
    /// The entry or its table breaks the format.
    Invalid,
}

impl BitmapState {
    /// The contract's name: `ok`, `in-use`, `stale`, `invalid`.
    pub fn as_str(self) -> &'static str {
        match self {
            BitmapState::Ok => "ok",
            BitmapState::InUse => "in-use",
            BitmapState::Stale => "stale",
            BitmapState::Invalid => "invalid",
        }
    }
}

/// A directory entry with its directory-level verdict.
#[derive(Debug, Clone)]
pub struct BitmapEntry {
    /// Position in the directory.
    pub index: usize,
    /// The decoded entry.
    pub entry: DirEntry,
    /// State judged from the header and the entry alone (tables not read).
    pub state: BitmapState,
    /// Every rule the entry breaks (unusable ones and lints).
    pub problems: Vec<Problem>,
}

impl BitmapEntry {
    /// The name, lossily decoded for display.
    pub fn name(&self) -> String {
        self.entry.name_lossy()
    }

    /// The name for messages: control characters escaped, one line.
    pub fn display_name(&self) -> String {
        self.entry.display_name()
    }

    /// Granularity in bytes (0 when granularity_bits is absurd).
    pub fn granularity(&self) -> u64 {
        self.entry.granularity().unwrap_or(0)
    }

    /// The first problem that makes the bitmap unusable, if any.
    pub fn unusable_problem(&self) -> Option<&Problem> {
        self.problems
            .iter()
            .find(|p| p.severity == Severity::Unusable)
    }
}

/// Full verdict on one bitmap, tables and data included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapStatus {
    /// The final state.
    pub state: BitmapState,
    /// Why the state is not `ok`.
    pub problem: Option<String>,
    /// Dirty bytes clipped to the virtual size (`None` unless `ok`).
    pub dirty_bytes: Option<u64>,
}

/// A validated bitmap table with the bitmap's dimensions.
#[derive(Debug, Clone)]
pub struct Table {
    /// One entry per cluster of serialized bitmap data.
    pub entries: Vec<TableEntry>,
    /// Number of bits (granules): `ceil(virtual_size / granularity)`.
    pub nbits: u64,
    /// log2 of the granularity.
    pub granularity_bits: u32,
    /// Image cluster geometry.
    pub geometry: Geometry,
}

impl Table {
    /// Bits of bitmap data per table entry.
    pub fn bits_per_cluster(&self) -> u64 {
        self.geometry.cluster_size() * 8
    }

    /// Bit range `[first, end)` of table entry `k`, clipped to `nbits`.
    pub fn cluster_bits(&self, k: usize) -> (u64, u64) {
        let first = (k as u64).saturating_mul(self.bits_per_cluster());
        let end = first
            .saturating_add(self.bits_per_cluster())
            .min(self.nbits);
        (first.min(self.nbits), end)
    }
}

/// `(nbits, table_size)` QEMU computes for a bitmap, or `None` on overflow.
pub fn expected_dimensions(
    virtual_size: u64,
    granularity_bits: u32,
    g: Geometry,
) -> Option<(u64, u64)> {
    let gran = 1u64.checked_shl(granularity_bits)?;
    let nbits = virtual_size.div_ceil(gran);
    let nbytes = nbits.div_ceil(8);
    Some((nbits, nbytes.div_ceil(g.cluster_size())))
}

/// Assigns each directory entry its directory-level state.
pub(super) fn classify<S: ReadAt>(entries: Vec<DirEntry>, image: &Image<S>) -> Vec<BitmapEntry> {
    let g = image.geometry();
    let size = image.virtual_size();
    let consistent = image.bitmaps_consistent();
    let mut out: Vec<BitmapEntry> = Vec::with_capacity(entries.len());
    // Names seen so far: a set, so 65535 entries cost 65535 lookups.
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    for (index, entry) in entries.into_iter().enumerate() {
        let mut problems = entry.problems(g, size);
        if !seen.insert(entry.name.clone()) && !entry.name.is_empty() {
            let msg = format!(
                "duplicate name '{}' (an earlier entry has it)",
                entry.display_name()
            );
            problems.push(Problem {
                severity: Severity::Unusable,
                offset: entry.offset,
                message: msg,
            });
        }
        let unusable = problems.iter().any(|p| p.severity == Severity::Unusable);
        let state = if !consistent {
            BitmapState::Stale
        } else if unusable {
            BitmapState::Invalid
        } else if entry.in_use() {
            BitmapState::InUse
        } else {
            BitmapState::Ok
        };
        out.push(BitmapEntry {
            index,
            entry,
            state,
            problems,
        });
    }
    out
}

fn stale_reason<S: ReadAt>(image: &Image<S>) -> String {
    if image.header().version < 3 {
        "version 2 image: bitmaps cannot be marked consistent, so they are stale".into()
    } else {
        "autoclear bit 0 is clear: a program without bitmap support may have written the image"
            .into()
    }
}

impl<S: ReadAt> Image<S> {
    /// Reads and validates `b`'s table: location inside the file, exact size
    /// (unless in use), every entry, every data cluster inside the file.
    ///
    /// # Errors
    /// `Corrupt` naming the entry index, its offset and what is wrong.
    pub fn table(&self, b: &BitmapEntry) -> Result<Table> {
        let e = &b.entry;
        let what = format!("bitmap '{}'", b.display_name());
        if let Some(p) = b.problems.iter().find(|p| p.severity == Severity::Unusable) {
            return Err(Error::corrupt(
                format!("{what} directory entry"),
                p.offset,
                p.message.clone(),
            ));
        }
        let g = self.geometry();
        let gran_bits = u32::from(e.granularity_bits);
        let dims = expected_dimensions(self.virtual_size(), gran_bits, g);
        let (nbits, want) = dims.ok_or_else(|| {
            Error::corrupt(
                format!("{what} granularity_bits"),
                e.offset + 17,
                "overflows",
            )
        })?;
        // QEMU skips this check for in-use entries (their state says so), but
        // a table of the wrong size cannot be interpreted, forced or not.
        if u64::from(e.table_size) != want {
            let msg = format!(
                "table_size {} but the virtual size {} needs exactly {want}",
                e.table_size,
                self.virtual_size()
            );
            return Err(Error::corrupt(
                format!("{what} directory entry"),
                e.offset + 8,
                msg,
            ));
        }
        let entries = self.read_table_entries(&what, e, g, nbits)?;
        Ok(Table {
            entries,
            nbits,
            granularity_bits: gran_bits,
            geometry: g,
        })
    }

    fn read_table_entries(
        &self,
        what: &str,
        e: &DirEntry,
        g: Geometry,
        nbits: u64,
    ) -> Result<Vec<TableEntry>> {
        // Directory rules bounded table_size * cluster_size by 512 MiB, so this is at most 8 MiB.
        let len = e.table_size as usize * 8;
        let mut scratch = Vec::new();
        let bytes = self
            .storage
            .read_at(e.table_offset, len, &mut scratch)
            .map_err(|err| Error::io(format!("{what} table"), Some(e.table_offset), err))?;
        // QEMU reads (and hashes) whole 64-bit words of the last cluster.
        let bytes_needed = nbits.div_ceil(64) * 8;
        let mut out = Vec::with_capacity(e.table_size as usize);
        for (k, raw) in bitmap_table::raw_entries(bytes).enumerate() {
            let at = e.table_offset + 8 * k as u64;
            let entry = TableEntry::decode(raw, g);
            if let TableEntry::Invalid(why) = entry {
                return Err(Error::corrupt(
                    format!("{what} table entry {k}"),
                    at,
                    format!("0x{raw:016x}: {why}"),
                ));
            }
            if let TableEntry::Data(off) = entry {
                let used = bytes_needed
                    .saturating_sub(k as u64 * g.cluster_size())
                    .clamp(1, g.cluster_size());
                if off
                    .checked_add(used)
                    .is_none_or(|end| end > self.storage.len())
                {
                    let msg = format!(
                        "data cluster 0x{off:x} lies beyond the end of the file ({} bytes)",
                        self.storage.len()
                    );
                    return Err(Error::corrupt(format!("{what} table entry {k}"), at, msg));
                }
            }
            out.push(entry);
        }
        Ok(out)
    }

    /// Requires `b` to be trusted unless `force`.
    ///
    /// # Errors
    /// `Untrusted` naming the bitmap and its state.
    pub fn require_ok(&self, b: &BitmapEntry, force: bool) -> Result<()> {
        if force || b.state == BitmapState::Ok {
            return Ok(());
        }
        // An invalid entry's refusal points at the offending field.
        let offset = match b.state {
            BitmapState::Invalid => b.unusable_problem().map(|p| p.offset),
            _ => None,
        };
        let why = match b.state {
            BitmapState::InUse => {
                "is in use (not saved consistently; a QEMU process may have it open, or it crashed)"
                    .to_string()
            }
            BitmapState::Stale => format!("is stale ({})", stale_reason(self)),
            _ => format!(
                "is invalid ({})",
                b.unusable_problem()
                    .map_or("broken entry", |p| p.message.as_str())
            ),
        };
        Err(Error::new(
            ErrorKind::Untrusted,
            format!("bitmap '{}'", b.display_name()),
            offset,
            format!("{why}; use --force to read it anyway"),
        ))
    }

    /// The full verdict on `b`: reads its table and data to count dirty bytes.
    pub fn status(&self, b: &BitmapEntry) -> BitmapStatus {
        let not_ok = |state, problem: String| BitmapStatus {
            state,
            problem: Some(problem),
            dirty_bytes: None,
        };
        match b.state {
            BitmapState::Stale => return not_ok(BitmapState::Stale, stale_reason(self)),
            BitmapState::Invalid => {
                let msg = b.unusable_problem().map_or_else(
                    || "broken entry".to_string(),
                    |p| format!("{} (at offset {})", p.message, p.offset),
                );
                return not_ok(BitmapState::Invalid, msg);
            }
            BitmapState::InUse => {
                return not_ok(
                    BitmapState::InUse,
                    "in_use flag is set: the bitmap was not saved consistently".into(),
                );
            }
            BitmapState::Ok => {}
        }
        match self.table(b).and_then(|t| self.dirty_bytes(&t)) {
            Ok(n) => BitmapStatus {
                state: BitmapState::Ok,
                problem: None,
                dirty_bytes: Some(n),
            },
            Err(e) => not_ok(BitmapState::Invalid, e.to_string()),
        }
    }

    /// Dirty bytes of a bitmap, clipped to the virtual size (the one-table
    /// pass of [`Image::survey`], without columns).
    ///
    /// # Errors
    /// I/O errors reading data clusters.
    pub fn dirty_bytes(&self, t: &Table) -> Result<u64> {
        self.table_profile(t, 1).map(|(dirty, _)| dirty)
    }

    /// Copies the bytes holding the first `nbits` bits of the data cluster
    /// at `off` into `bytes` with [`ReadAt::copy_at`]: a scan over many
    /// bitmaps keeps one cluster resident instead of mapping every one.
    pub(super) fn copy_cluster(&self, off: u64, nbits: u64, bytes: &mut Vec<u8>) -> Result<()> {
        let nbytes = usize::try_from(nbits.div_ceil(8)).unwrap_or(usize::MAX);
        bytes.resize(nbytes, 0);
        self.storage
            .copy_at(off, bytes)
            .map_err(|e| Error::io("bitmap data cluster", Some(off), e))
    }

    /// Loads the first `nbits` bits of the data cluster at `off` into `words`
    /// (bits past `nbits` in the last word are cleared), copied through
    /// `bytes` (see [`Image::copy_cluster`]).
    pub(super) fn cluster_words(
        &self,
        off: u64,
        nbits: u64,
        words: &mut Vec<u64>,
        bytes: &mut Vec<u8>,
    ) -> Result<()> {
        self.copy_cluster(off, nbits, bytes)?;
        words.clear();
        words.resize(bytes.len().div_ceil(8), 0);
        bits::bytes::le_bytes_to_words(bytes, words);
        let total = words.len() as u64 * 64;
        bits::words::clear_range(words, nbits..total);
        Ok(())
    }

    /// The bits of one table entry into `words` (`nbits` bits, the rest of
    /// the last word cleared): all zeros, all ones, or the first `nbits`
    /// bits of its data cluster (copied through `bytes`).
    ///
    /// # Errors
    /// `Corrupt` for an invalid entry; I/O errors reading the cluster.
    pub fn entry_words(
        &self,
        entry: TableEntry,
        nbits: u64,
        words: &mut Vec<u64>,
        bytes: &mut Vec<u8>,
    ) -> Result<()> {
        let n = bits::words_for(nbits);
        match entry {
            TableEntry::Data(off) => return self.cluster_words(off, nbits, words, bytes),
            TableEntry::Invalid(why) => {
                return Err(Error::corrupt("bitmap table entry", 0, why.to_string()));
            }
            TableEntry::Zeros => {
                words.clear();
                words.resize(n, 0);
            }
            TableEntry::Ones => {
                words.clear();
                words.resize(n, u64::MAX);
                bits::words::clear_range(words, nbits..n as u64 * 64);
            }
        }
        Ok(())
    }

    /// The bytes holding the first `nbits` bits of the data cluster at `off`.
    pub(super) fn cluster_bytes<'a>(
        &'a self,
        off: u64,
        nbits: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8]> {
        let nbytes = usize::try_from(nbits.div_ceil(8)).unwrap_or(usize::MAX);
        self.storage
            .read_at(off, nbytes, scratch)
            .map_err(|e| Error::io("bitmap data cluster", Some(off), e))
    }

    /// Loads a whole bitmap into memory (memory: `nbits / 8` bytes, bounded
    /// by the 512 MiB format limit).
    ///
    /// # Errors
    /// `Untrusted` for a bitmap that is not `ok` unless `force`; table errors.
    pub fn load(&self, b: &BitmapEntry, force: bool) -> Result<bits::Bitmap> {
        let mut out = bits::Bitmap::zeros(0);
        self.load_into(b, force, &mut out)?;
        Ok(out)
    }

    /// Like [`Image::load`], reusing `out`'s memory: loading bitmap after
    /// bitmap into one buffer avoids the page faults of fresh memory, which
    /// dominate the cost of a load (see the README's benchmark table).
    ///
    /// # Errors
    /// As [`Image::load`]; `out` is unspecified on error.
    pub fn load_into(&self, b: &BitmapEntry, force: bool, out: &mut bits::Bitmap) -> Result<()> {
        self.require_ok(b, force)?;
        let t = self.table(b)?;
        // One pass: each cluster's words are appended (zeros, ones, or
        // converted bytes); from_words clears the tail bits.
        let mut words = std::mem::replace(out, bits::Bitmap::zeros(0)).into_words();
        words.clear();
        words.reserve(bits::words_for(t.nbits));
        let mut scratch = Vec::new();
        for k in 0..t.entries.len() {
            let (first, end) = t.cluster_bits(k);
            let (lo, hi) = (
                words.len(),
                usize::try_from(end.div_ceil(64)).unwrap_or(usize::MAX),
            );
            match t.entries[k] {
                TableEntry::Ones => words.resize(hi, u64::MAX),
                TableEntry::Data(off) => {
                    let bytes = self.cluster_bytes(off, end - first, &mut scratch)?;
                    words.resize(hi, 0);
                    bits::bytes::le_bytes_to_words(bytes, &mut words[lo..hi]);
                }
                _ => words.resize(hi, 0),
            }
        }
        *out = bits::Bitmap::from_words(words, t.nbits);
        Ok(())
    }
}

impl<S: ReadAt> Image<S> {
    /// The raw table entries of `b`, unvalidated (for forensics). Only the
    /// table's location is checked: it must lie inside the file.
    ///
    /// # Errors
    /// `Corrupt` when the table runs past the end of the file.
    pub fn raw_table(&self, b: &BitmapEntry) -> Result<Vec<u64>> {
        let e = &b.entry;
        let len = u64::from(e.table_size) * 8;
        if e.table_offset
            .checked_add(len)
            .is_none_or(|end| end > self.storage.len())
        {
            let msg = format!(
                "table of {} entries at 0x{:x} runs past the end of the file ({} bytes)",
                e.table_size,
                e.table_offset,
                self.storage.len()
            );
            return Err(Error::corrupt(
                format!("bitmap '{}' directory entry", b.display_name()),
                e.offset,
                msg,
            ));
        }
        let mut scratch = Vec::new();
        let bytes = self
            .storage
            .read_at(e.table_offset, len as usize, &mut scratch)
            .map_err(|err| {
                Error::io(
                    format!("bitmap '{}' table", b.display_name()),
                    Some(e.table_offset),
                    err,
                )
            })?;
        Ok(bitmap_table::raw_entries(bytes).collect())
    }
}
