//! The state, dirty bytes and dirty profile of every bitmap of an image in
//! one pass that never does the same work twice.
//!
//! `info` needs all of this for every bitmap. Per bitmap it is a scan of its
//! data clusters; over the whole image three things keep the cost in
//! proportion to the bytes the file really holds, whatever its directory
//! claims:
//! - entries with the same table (offset, size, granularity) share one
//!   result: a hostile directory of 65535 entries naming one 8 MiB table
//!   reads that table once;
//! - a data cluster is counted once per worker, however many table entries
//!   point at it;
//! - a cluster that straddles a column of the profile is scanned for runs
//!   once per (cluster, position).
//!
//! Distinct tables are spread over `std::thread::available_parallelism()`
//! scoped worker threads (at most [`MAX_WORKERS`]): counting is bound by
//! copying page-cache bytes, which scales with cores.
//!
//! Data clusters are read with [`ReadAt::copy_at`] into one reused buffer
//! per worker, so the resident set stays at a few clusters however large
//! the bitmaps are. Nothing here writes.

use std::collections::HashMap;

use super::{BitmapEntry, BitmapState, BitmapStatus, Image, Table};
use crate::bits;
use crate::error::{Error, Result};
use crate::format::bitmap_table::TableEntry;
use crate::storage::ReadAt;

/// Most worker threads a survey starts.
pub const MAX_WORKERS: usize = 8;

/// What [`Image::survey`] reports for one bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Survey {
    /// State, problem and dirty bytes, as [`Image::status`] gives them.
    pub status: BitmapStatus,
    /// Dirty bytes per column when asked for and the bitmap is `ok`:
    /// column `c` covers guest bytes `[c * w, (c + 1) * w)` clipped to the
    /// virtual size, `w = ceil(virtual_size / columns)`.
    pub profile: Option<Vec<u64>>,
}

/// The identity of a table's contents: entries naming the same one agree.
type TableKey = (u64, u32, u8);

/// Dirty bytes and profile of one table, or the rendered table error with
/// the object name it was rendered for.
type Outcome = std::result::Result<(u64, Vec<u64>), (String, Error)>;

impl<S: ReadAt + Sync> Image<S> {
    /// State and dirty bytes of every bitmap in directory order, with a
    /// dirty profile of `columns` columns when `columns > 0`. Equal to
    /// calling [`Image::status`] on each (and summing
    /// [`Image::extents`] into columns), at a fraction of the cost.
    pub fn survey(&self, columns: u64) -> Vec<Survey> {
        let bitmaps = self.bitmaps();
        let mut keys: Vec<TableKey> = Vec::new();
        let mut first_of: HashMap<TableKey, usize> = HashMap::new();
        for b in bitmaps.iter().filter(|b| b.state == BitmapState::Ok) {
            let key = table_key(b);
            first_of.entry(key).or_insert_with(|| {
                keys.push(key);
                b.index
            });
        }
        let outcomes = self.run_workers(&keys, &first_of, columns);
        bitmaps
            .iter()
            .map(|b| self.survey_one(b, &outcomes, columns))
            .collect()
    }

    fn survey_one(
        &self,
        b: &BitmapEntry,
        outcomes: &HashMap<TableKey, Outcome>,
        columns: u64,
    ) -> Survey {
        let outcome = (b.state == BitmapState::Ok)
            .then(|| outcomes.get(&table_key(b)))
            .flatten();
        match outcome {
            None => Survey {
                status: self.status(b),
                profile: None,
            },
            Some(Ok((dirty, profile))) => Survey {
                status: BitmapStatus {
                    state: BitmapState::Ok,
                    problem: None,
                    dirty_bytes: Some(*dirty),
                },
                profile: (columns > 0).then(|| profile.clone()),
            },
            Some(Err((first_what, e))) => Survey {
                status: BitmapStatus {
                    state: BitmapState::Invalid,
                    problem: Some(e.renamed(first_what, &bitmap_what(b)).to_string()),
                    dirty_bytes: None,
                },
                profile: None,
            },
        }
    }

    fn run_workers(
        &self,
        keys: &[TableKey],
        first_of: &HashMap<TableKey, usize>,
        columns: u64,
    ) -> HashMap<TableKey, Outcome> {
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_WORKERS)
            .min(keys.len().max(1));
        let work = |w: usize| -> Vec<(TableKey, Outcome)> {
            let mut counter = Counter::default();
            keys.iter()
                .skip(w)
                .step_by(workers)
                .filter_map(|key| {
                    let b = self.bitmaps().get(*first_of.get(key)?)?;
                    Some((*key, self.survey_table(b, columns, &mut counter)))
                })
                .collect()
        };
        if workers == 1 {
            return work(0).into_iter().collect();
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = (1..workers).map(|w| s.spawn(move || work(w))).collect();
            let mut all: HashMap<TableKey, Outcome> = work(0).into_iter().collect();
            for h in handles {
                // A worker cannot panic on file contents; if it did, its
                // tables are surveyed again on this thread below.
                if let Ok(part) = h.join() {
                    all.extend(part);
                }
            }
            let mut counter = Counter::default();
            for key in keys {
                if !all.contains_key(key) {
                    if let Some(b) = first_of.get(key).and_then(|&i| self.bitmaps().get(i)) {
                        all.insert(*key, self.survey_table(b, columns, &mut counter));
                    }
                }
            }
            all
        })
    }

    fn survey_table(&self, b: &BitmapEntry, columns: u64, counter: &mut Counter) -> Outcome {
        let what = bitmap_what(b);
        let t = self.table(b).map_err(|e| (what.clone(), e))?;
        self.profile(&t, columns.max(1), counter)
            .map_err(|e| (what, e))
    }
}

impl<S: ReadAt> Image<S> {
    /// Dirty bytes and `columns` per-column dirty bytes of one validated
    /// table, with fresh buffers (what [`Image::dirty_bytes`] needs).
    pub(super) fn table_profile(&self, t: &Table, columns: u64) -> Result<(u64, Vec<u64>)> {
        self.profile(t, columns.max(1), &mut Counter::default())
    }

    /// Dirty bytes and per-column dirty bytes of one validated table.
    fn profile(&self, t: &Table, columns: u64, counter: &mut Counter) -> Result<(u64, Vec<u64>)> {
        let size = self.virtual_size();
        let mut p = Profile {
            cols: vec![0; usize::try_from(columns).unwrap_or(1).max(1)],
            width: size.div_ceil(columns).max(1),
            size,
            gran_bits: t.granularity_bits,
            total: 0,
        };
        for (k, entry) in t.entries.iter().enumerate() {
            let (first, end) = t.cluster_bits(k);
            match *entry {
                TableEntry::Zeros | TableEntry::Invalid(_) => {}
                TableEntry::Ones => p.add_granules(first, end),
                TableEntry::Data(off) => {
                    let (lo, hi) = (p.byte_of(first), p.byte_of(end));
                    if lo >= hi {
                        continue;
                    }
                    if lo / p.width == (hi - 1) / p.width && end < t.nbits {
                        // Inside one column, last granule not included:
                        // only the count matters.
                        let ones = counter.count(self, off, end - first)?;
                        p.add_to_column(lo / p.width, ones << p.gran_bits);
                    } else {
                        let key = (off, end - first, first);
                        for &(c, bytes) in counter.split(self, &p, key)? {
                            p.add_to_column(c, bytes);
                        }
                    }
                }
            }
        }
        Ok((p.total, p.cols))
    }
}

/// Accumulates dirty bytes into columns.
struct Profile {
    cols: Vec<u64>,
    width: u64,
    size: u64,
    gran_bits: u32,
    total: u64,
}

impl Profile {
    /// Guest byte where granule `bit` starts, clipped to the virtual size.
    fn byte_of(&self, bit: u64) -> u64 {
        bit.checked_shl(self.gran_bits)
            .filter(|b| b >> self.gran_bits == bit)
            .map_or(self.size, |b| b.min(self.size))
    }

    fn add_to_column(&mut self, c: u64, bytes: u64) {
        if let Some(slot) = usize::try_from(c).ok().and_then(|c| self.cols.get_mut(c)) {
            *slot += bytes;
        }
        self.total += bytes;
    }

    /// Granules `[a, z)` are all dirty: their bytes, split at column edges.
    fn add_granules(&mut self, a: u64, z: u64) {
        let (mut at, end) = (self.byte_of(a), self.byte_of(z));
        while at < end {
            let c = at / self.width;
            let stop = c.saturating_add(1).saturating_mul(self.width).min(end);
            self.add_to_column(c, stop - at);
            at = stop;
        }
    }
}

/// One worker's reused buffers and memos of cluster counts and runs.
#[derive(Default)]
struct Counter {
    bytes: Vec<u8>,
    words: Vec<u64>,
    counts: HashMap<(u64, u64), u64>,
    splits: HashMap<(u64, u64, u64), Vec<(u64, u64)>>,
}

impl Counter {
    /// Set bits among the first `nbits` bits of the data cluster at `off`.
    fn count<S: ReadAt>(&mut self, image: &Image<S>, off: u64, nbits: u64) -> Result<u64> {
        if let Some(&n) = self.counts.get(&(off, nbits)) {
            return Ok(n);
        }
        image.copy_cluster(off, nbits, &mut self.bytes)?;
        let ones = bits::bytes::count_ones(&self.bytes, nbits);
        self.counts.insert((off, nbits), ones);
        Ok(ones)
    }

    /// Dirty bytes per column of the data cluster at `off` holding `nbits`
    /// granules from granule `first` on (for clusters that straddle a column
    /// edge or hold the last granule: at most `columns + 1` per table). A
    /// granule cut by a column edge counts in both columns for its overlap.
    fn split<S: ReadAt>(
        &mut self,
        image: &Image<S>,
        p: &Profile,
        key: (u64, u64, u64),
    ) -> Result<&[(u64, u64)]> {
        if !self.splits.contains_key(&key) {
            let (off, nbits, first) = key;
            image.cluster_words(off, nbits, &mut self.words, &mut self.bytes)?;
            let parts = p.split(&self.words, first, nbits);
            self.splits.insert(key, parts);
        }
        Ok(self.splits.get(&key).map_or(&[], Vec::as_slice))
    }
}

impl Profile {
    /// `(column, dirty bytes)` of granules `[first, first + nbits)` whose
    /// bits are `words` (bit 0 = granule `first`).
    fn split(&self, words: &[u64], first: u64, nbits: u64) -> Vec<(u64, u64)> {
        let g = self.gran_bits;
        let bit = |i: u64| bits::words::next_one(words, i - first, i - first + 1).is_some();
        let mut out = Vec::new();
        let (mut at, end) = (self.byte_of(first), self.byte_of(first + nbits));
        while at < end {
            let c = at / self.width;
            let stop = c.saturating_add(1).saturating_mul(self.width).min(end);
            let (ga, gz) = (at >> g, (stop - 1) >> g);
            let mut bytes = 0;
            if ga == gz {
                bytes += if bit(ga) { stop - at } else { 0 };
            } else {
                bytes += if bit(ga) { ((ga + 1) << g) - at } else { 0 };
                bytes += if bit(gz) { stop - (gz << g) } else { 0 };
                let middle = bits::words::count_ones_range(words, ga + 1 - first..gz - first);
                bytes += middle << g;
            }
            if bytes > 0 {
                out.push((c, bytes));
            }
            at = stop;
        }
        out
    }
}

fn table_key(b: &BitmapEntry) -> TableKey {
    (
        b.entry.table_offset,
        b.entry.table_size,
        b.entry.granularity_bits,
    )
}

fn bitmap_what(b: &BitmapEntry) -> String {
    format!("bitmap '{}'", b.display_name())
}
