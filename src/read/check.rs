//! `check`: the refcount walk (exactly what `qemu-img check` counts) plus
//! every bitmap rule, merged into one report with one exit status.

use super::Image;
use super::lint::{Finding, Severity};
use super::refcheck::{self, FindingKind, Owner, RefcountReport};
use crate::error::Result;
use crate::format::directory::display_name;
use crate::storage::ReadAt;

/// Everything `check` found.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// The refcount walk, with counts identical to `qemu-img check`.
    pub refcounts: RefcountReport,
    /// One entry per problem: bitmap rules, shared clusters, refcount mismatches.
    pub findings: Vec<Finding>,
    /// Whether a bitmap rule (not the refcount walk) found a corruption.
    pub bitmap_corruption: bool,
}

/// Exit status of `check` (contract: 0 clean, 1 incomplete, 2 corruption,
/// 3 leaks only, 4 unusable bitmaps and at most leaks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing wrong.
    Clean,
    /// The check could not be completed.
    Incomplete,
    /// Corruptions (including malformed bitmap metadata).
    Corrupt,
    /// Only leaked clusters.
    Leaks,
    /// In-use or stale bitmaps, and at most leaks.
    Unusable,
}

impl Verdict {
    /// The exit status for this verdict.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Clean => 0,
            Verdict::Incomplete => 1,
            Verdict::Corrupt => 2,
            Verdict::Leaks => 3,
            Verdict::Unusable => 4,
        }
    }
}

impl CheckReport {
    /// Number of findings of `severity`.
    pub fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }

    /// The overall verdict.
    pub fn verdict(&self) -> Verdict {
        // Malformed bitmap metadata is a verdict even when the refcount walk
        // had to stop (QEMU itself cannot open such images).
        if self.bitmap_corruption {
            Verdict::Corrupt
        } else if self.refcounts.check_errors > 0 || self.refcounts.aborted.is_some() {
            Verdict::Incomplete
        } else if self.count(Severity::Corruption) > 0 {
            Verdict::Corrupt
        } else if self.count(Severity::Unusable) > 0 {
            Verdict::Unusable
        } else if self.count(Severity::Leak) > 0 {
            Verdict::Leaks
        } else {
            Verdict::Clean
        }
    }
}

impl<S: ReadAt> Image<S> {
    /// Runs every check (read-only).
    ///
    /// # Errors
    /// I/O failures only; everything found is in the report.
    pub fn check(&self) -> Result<CheckReport> {
        let refcounts = refcheck::refcount_check(self)?;
        let mut findings = self.lint_bitmaps();
        findings.extend(shared_bitmap_clusters(&refcounts));
        let bitmap_corruption = findings.iter().any(|f| f.severity == Severity::Corruption);
        // The walk's complaints that the bitmap rules above already made
        // (about a flagged bitmap, or the same text) are not repeated.
        let known: Vec<String> = findings.iter().map(|f| f.message.clone()).collect();
        let flagged: Vec<String> = findings.iter().filter_map(|f| f.bitmap.clone()).collect();
        let repeated = |m: &str| {
            known
                .iter()
                .any(|k| k.contains(m) || m.contains(k.as_str()))
                || flagged
                    .iter()
                    .any(|b| m.starts_with(&format!("bitmap '{}'", display_name(b.as_bytes()))))
        };
        let mut walk_messages: Vec<&String> =
            refcounts.diagnostics.iter().map(|d| &d.message).collect();
        walk_messages.extend(refcounts.aborted.iter());
        walk_messages.dedup();
        for m in walk_messages.into_iter().filter(|m| !repeated(m)) {
            findings.push(Finding {
                severity: Severity::Corruption,
                bitmap: None,
                offset: None,
                message: m.clone(),
            });
        }
        // When the walk stopped early (as qemu-img check does), clusters it did
        // not reach look leaked: those leaks are not reported.
        let walk_complete = refcounts.incomplete.is_none();
        for f in refcounts
            .findings
            .iter()
            .filter(|f| walk_complete || f.kind != FindingKind::Leak)
        {
            let (severity, word) = match f.kind {
                FindingKind::Leak => (Severity::Leak, "Leaked cluster"),
                FindingKind::Error => (Severity::Corruption, "ERROR cluster"),
            };
            let message = format!(
                "{word} {} refcount={} reference={}",
                f.cluster, f.refcount, f.references
            );
            findings.push(Finding {
                severity,
                bitmap: None,
                offset: Some(f.offset),
                message,
            });
        }
        Ok(CheckReport {
            refcounts,
            findings,
            bitmap_corruption,
        })
    }
}

fn owner_name(o: &Owner, names: &[String]) -> String {
    let bitmap = |i: &u32| {
        names.get(*i as usize).map_or_else(
            || format!("#{i}"),
            |n| format!("'{}'", display_name(n.as_bytes())),
        )
    };
    match o {
        Owner::BitmapTable { bitmap: i } => format!("the table of bitmap {}", bitmap(i)),
        Owner::BitmapData { bitmap: i } => format!("data of bitmap {}", bitmap(i)),
        Owner::BitmapDirectory => "the bitmap directory".into(),
        Owner::Data | Owner::Compressed => "guest data".into(),
        other => format!("{other:?}"),
    }
}

fn is_bitmap(o: &Owner) -> bool {
    matches!(
        o,
        Owner::BitmapTable { .. } | Owner::BitmapData { .. } | Owner::BitmapDirectory
    )
}

/// Clusters a bitmap shares with another owner (another bitmap, guest data, metadata).
fn shared_bitmap_clusters(r: &RefcountReport) -> Vec<Finding> {
    let mut out = Vec::new();
    for c in r.map.shared() {
        let owners = r.map.owners(c);
        if !owners.iter().any(is_bitmap) {
            continue;
        }
        let names: Vec<String> = owners
            .iter()
            .map(|o| owner_name(o, &r.bitmap_names))
            .collect();
        let bitmap = owners.iter().find_map(|o| match o {
            Owner::BitmapTable { bitmap } | Owner::BitmapData { bitmap } => {
                r.bitmap_names.get(*bitmap as usize).cloned()
            }
            _ => None,
        });
        let message = format!("cluster {c} is shared between {}", names.join(" and "));
        out.push(Finding {
            severity: Severity::Corruption,
            bitmap,
            offset: None,
            message,
        });
    }
    out
}
