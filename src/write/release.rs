//! Removing a bitmap whose table cannot be trusted (an invalid entry, a
//! malformed table entry, a table of the wrong size): its clusters are freed
//! through the owner walk that `repair` trusts, never by assumption.
//!
//! The walk runs once per transaction, on the image as it is on disk. Of the
//! clusters the removed entry names ([`bitmap_claims`]: its table up to the
//! walk's bound and every offset field of its table entries, valid or not),
//! one is freed (its refcount lowered to 0 after the header switch) when the
//! walk proves that nothing else will reference it once the entry is gone:
//!
//! - every reference the walk counted to it comes from this bitmap alone (its
//!   table, or a data cluster one of its valid entries names), or
//! - the walk counted no reference to it at all and its refcount is not 0
//!   (a leak: for example the cluster a malformed entry still points into).
//!
//! A cluster also used by anything else is left alone. When the walk is
//! incomplete (a refcount block it cannot read, too many snapshots) nothing
//! is provable and nothing is freed; [`Transaction::notes`] says so, and also
//! counts the leaked clusters the removal leaves behind.

use std::collections::BTreeSet;

use super::Transaction;
use crate::error::Result;
use crate::read::Image;
use crate::read::refcheck::{FindingKind, Owner, RefcountReport, bitmap_claims, refcount_check};
use crate::storage::WriteAt;
use crate::types::HostCluster;

/// Most decrements queued for one cluster: a refcount above it (a corrupt
/// 64-bit refcount) is left for `repair` rather than looped over.
const MAX_DECREMENTS: u64 = 1 << 16;

/// The owner walk of a transaction's removals and what they freed.
#[derive(Debug, Default)]
pub(crate) struct WalkRelease {
    walk: Option<RefcountReport>,
    freed: BTreeSet<u64>,
    notes: Vec<String>,
}

impl<S: WriteAt> Transaction<S> {
    /// Queues the clusters of on-disk bitmap `i` (being removed) that the owner
    /// walk proves free once it is gone; see the module docs.
    pub(super) fn release_by_walk(&mut self, i: usize) -> Result<()> {
        let Some(index) = self.staged[i].disk_index else {
            return Ok(());
        };
        let name = self.staged[i].entry.display_name();
        let image = Image::open(&self.storage)?;
        let report = match self.walk_release.walk.take() {
            Some(r) => r,
            None => refcount_check(&image)?,
        };
        if report.check_errors > 0 || report.incomplete.is_some() {
            let why = report
                .incomplete
                .clone()
                .unwrap_or_else(|| format!("{} check errors", report.check_errors));
            self.walk_release.notes.push(format!(
                "bitmap '{name}': its table cannot be trusted and the owner walk is incomplete ({why}), so none of its clusters can be proved its own: they stay allocated (run `qcow2-bitmap check`)"
            ));
            self.walk_release.walk = Some(report);
            return Ok(());
        }
        let entry = match image.bitmaps().get(index) {
            Some(b) => b.entry.clone(),
            None => return Ok(()),
        };
        let cb = self.geometry().cluster_bits();
        for off in bitmap_claims(&image, &entry)? {
            let c = off >> cb;
            let refcount = provably_free(&report, c, index as u32);
            if refcount == 0 || refcount > MAX_DECREMENTS || !self.walk_release.freed.insert(c) {
                continue;
            }
            for _ in 0..refcount {
                self.frees.push((HostCluster(c), 1));
            }
        }
        self.walk_release.walk = Some(report);
        Ok(())
    }

    /// What the removals of bitmaps with untrusted tables could not do: one
    /// line each, for the user (empty when every cluster was accounted for).
    /// Valid once [`Transaction::commit`] succeeds.
    pub fn notes(&self) -> Vec<String> {
        let r = &self.walk_release;
        let mut out = r.notes.clone();
        if let Some(walk) = &r.walk {
            let left = walk
                .findings
                .iter()
                .filter(|f| f.kind == FindingKind::Leak && !r.freed.contains(&f.cluster))
                .count();
            if left > 0 && r.notes.is_empty() {
                out.push(format!(
                    "{left} leaked clusters remain that cannot be proved to belong to the removed bitmaps; `qcow2-bitmap repair` frees them"
                ));
            }
        }
        out
    }
}

/// The stored refcount of cluster `c` when the walk proves it unreferenced
/// once bitmap `bitmap` is gone; 0 otherwise (nothing to free).
fn provably_free(report: &RefcountReport, c: u64, bitmap: u32) -> u64 {
    let references = report.map.references(c);
    let mine = |o: &Owner| matches!(o, Owner::BitmapTable { bitmap: b } | Owner::BitmapData { bitmap: b } if *b == bitmap);
    let owners = report.map.owners(c);
    let only_mine = !owners.is_empty() && owners.iter().all(mine);
    if references > 0 && !only_mine {
        return 0;
    }
    // Findings list every cluster whose refcount differs from its references.
    match report.findings.binary_search_by_key(&c, |f| f.cluster) {
        Ok(k) => report.findings[k].refcount,
        Err(_) => references,
    }
}
