//! Every bitmap rule of the format, as findings for `check`: the extension,
//! each directory entry (QEMU's constraints and the ones QEMU does not
//! enforce), each table (entries, exact size, location), tail bits past the
//! virtual size, in-use bitmaps and a stale extension. Refcount accounting
//! is `refcheck`'s business; this module reads tables and data only.

use super::{BitmapEntry, BitmapState, Image};
use crate::bits;
use crate::error::Error;
use crate::format::autoclear;
use crate::format::bitmap_table::TableEntry;
use crate::storage::ReadAt;
use std::collections::HashMap;

/// Most invalid entries of one in-use table listed one by one (the rest
/// are summed up in one finding).
pub const MAX_LISTED: usize = 8;

/// Invalid entries `(index, raw, why)` listed, and their total.
type InvalidEntries = (Vec<(usize, u64, String)>, u64);

/// A table's verdict, or its error with the bitmap name it names.
type Judged<T> = Result<T, (String, Error)>;

/// Tables already judged in one lint pass, by what identifies their
/// contents; errors keep the bitmap name they were rendered for.
#[derive(Default)]
struct Tables {
    /// Validated tables: where their tail bits start, if they have any.
    tables: HashMap<(u64, u32, u8), Judged<Option<u64>>>,
    raw: HashMap<(u64, u32), Judged<InvalidEntries>>,
}

/// How bad a finding is (the `check` exit status follows the worst one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Clusters counted but unused: harmless, reclaimable.
    Leak,
    /// A bitmap that exists but cannot be trusted (in use, stale).
    Unusable,
    /// The format is broken (QEMU may refuse the image).
    Corruption,
}

impl Severity {
    /// The contract's name: `leak`, `unusable-bitmap`, `corruption`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Leak => "leak",
            Severity::Unusable => "unusable-bitmap",
            Severity::Corruption => "corruption",
        }
    }
}

/// One problem found by `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How bad it is.
    pub severity: Severity,
    /// The bitmap concerned, if any.
    pub bitmap: Option<String>,
    /// File offset of the offending bytes, if known.
    pub offset: Option<u64>,
    /// What is wrong.
    pub message: String,
}

fn finding(
    severity: Severity,
    bitmap: Option<&BitmapEntry>,
    offset: Option<u64>,
    message: String,
) -> Finding {
    Finding {
        severity,
        bitmap: bitmap.map(BitmapEntry::name),
        offset,
        message,
    }
}

/// A table error judged for another entry naming the same table, as a
/// finding about `b` (its object renamed from `first` to `what`).
fn renamed_error(b: &BitmapEntry, first: &str, what: &str, e: &Error) -> Finding {
    let e = e.renamed(first, what);
    finding(Severity::Corruption, Some(b), e.offset(), e.to_string())
}

impl<S: ReadAt> Image<S> {
    /// Every bitmap rule this image breaks (refcounts excluded).
    pub fn lint_bitmaps(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        self.lint_extension(&mut out);
        let mut memo = Tables::default();
        for b in self.bitmaps() {
            self.lint_entry(b, &mut memo, &mut out);
        }
        out
    }

    /// The rules one bitmap breaks (its entry, table and tail bits).
    pub fn lint_bitmaps_of(&self, b: &BitmapEntry) -> Vec<Finding> {
        let mut out = Vec::new();
        self.lint_entry(b, &mut Tables::default(), &mut out);
        out
    }

    fn lint_extension(&self, out: &mut Vec<Finding>) {
        let view = self.bitmaps_view();
        if let Some(p) = &view.problem {
            out.push(Finding {
                severity: Severity::Corruption,
                bitmap: None,
                offset: p.offset(),
                message: p.to_string(),
            });
        }
        let h = self.header();
        if view.extension.is_none()
            && h.version >= 3
            && h.autoclear_features & autoclear::BITMAPS != 0
        {
            let msg =
                "autoclear bit 0 (bitmaps) is set but there is no bitmaps extension".to_string();
            out.push(Finding {
                severity: Severity::Corruption,
                bitmap: None,
                offset: Some(88),
                message: msg,
            });
        }
        if view.extension.is_some() && !self.bitmaps_consistent() {
            let msg = if h.version < 3 {
                "version 2 image carries a bitmaps extension: every bitmap in it is stale"
                    .to_string()
            } else {
                "autoclear bit 0 is clear: a program without bitmap support wrote the image, every bitmap is stale".to_string()
            };
            out.push(Finding {
                severity: Severity::Unusable,
                bitmap: None,
                offset: Some(88),
                message: msg,
            });
        }
    }

    fn lint_entry(&self, b: &BitmapEntry, memo: &mut Tables, out: &mut Vec<Finding>) {
        for p in &b.problems {
            out.push(finding(
                Severity::Corruption,
                Some(b),
                Some(p.offset),
                p.message.clone(),
            ));
        }
        if b.state == BitmapState::InUse {
            let msg = "in_use flag is set: not saved consistently (crash, or open in QEMU); its content cannot be trusted".to_string();
            out.push(finding(
                Severity::Unusable,
                Some(b),
                Some(b.entry.offset + 12),
                msg,
            ));
        }
        if b.unusable_problem().is_some() {
            return;
        }
        self.lint_table(b, memo, out);
    }

    /// Table rules: QEMU's `check` reads every table, in-use ones included.
    /// Each distinct table is read once, however many entries name it.
    fn lint_table(&self, b: &BitmapEntry, memo: &mut Tables, out: &mut Vec<Finding>) {
        let what = format!("bitmap '{}'", b.display_name());
        if b.entry.in_use() {
            // An in-use entry may carry a stale size; its entries must still be valid.
            let key = (b.entry.table_offset, b.entry.table_size);
            let scanned = memo
                .raw
                .entry(key)
                .or_insert_with(|| self.invalid_entries(b).map_err(|e| (what.clone(), e)));
            match &*scanned {
                Ok((invalid, total)) => {
                    for (k, r, why) in invalid {
                        let at = b.entry.table_offset + 8 * *k as u64;
                        let msg = format!("{what} table entry {k}: 0x{r:016x}: {why}");
                        out.push(finding(Severity::Corruption, Some(b), Some(at), msg));
                    }
                    if *total > invalid.len() as u64 {
                        let msg = format!(
                            "{what} table: {} more invalid entries not listed",
                            total - invalid.len() as u64
                        );
                        let at = Some(b.entry.table_offset);
                        out.push(finding(Severity::Corruption, Some(b), at, msg));
                    }
                }
                Err((first, e)) => out.push(renamed_error(b, first, &what, e)),
            }
            return;
        }
        let key = (
            b.entry.table_offset,
            b.entry.table_size,
            b.entry.granularity_bits,
        );
        let judged = memo.tables.entry(key).or_insert_with(|| {
            self.table(b)
                .map(|t| self.tail_bits_at(&t))
                .map_err(|e| (what.clone(), e))
        });
        match &*judged {
            Ok(Some(byte)) => {
                let msg = format!(
                    "{what} has bits set past the virtual size (first at data byte {byte})"
                );
                out.push(finding(Severity::Corruption, Some(b), Some(*byte), msg));
            }
            Ok(None) => {}
            Err((first, e)) => out.push(renamed_error(b, first, &what, e)),
        }
    }

    /// The first [`MAX_LISTED`] invalid entries of `b`'s table as
    /// `(index, raw, why)`, and how many there are in all.
    fn invalid_entries(&self, b: &BitmapEntry) -> crate::error::Result<InvalidEntries> {
        let raw = self.raw_table(b)?;
        let mut listed = Vec::new();
        let mut total = 0u64;
        for (k, &r) in raw.iter().enumerate() {
            if let TableEntry::Invalid(why) = TableEntry::decode(r, self.geometry()) {
                total += 1;
                if listed.len() < MAX_LISTED {
                    listed.push((k, r, why.to_string()));
                }
            }
        }
        Ok((listed, total))
    }

    /// File offset of the first byte holding a bit past the virtual size
    /// in `t`'s last data cluster, if any.
    fn tail_bits_at(&self, t: &super::Table) -> Option<u64> {
        let k = t.entries.len().checked_sub(1)?;
        let TableEntry::Data(off) = t.entries[k] else {
            return None;
        };
        let (first, end) = t.cluster_bits(k);
        let cluster_bits = t.bits_per_cluster();
        let (mut words, mut bytes) = (Vec::new(), Vec::new());
        self.cluster_words(
            off,
            cluster_bits.min(self.storage().len().saturating_sub(off) * 8),
            &mut words,
            &mut bytes,
        )
        .ok()?;
        let bit = bits::words::next_one(&words, end - first, words.len() as u64 * 64)?;
        Some(off + bit / 8)
    }
}
