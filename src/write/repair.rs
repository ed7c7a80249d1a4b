//! `repair`: turn a damaged or stale bitmaps extension back into one QEMU
//! opens, keeping every bitmap that can be kept.
//!
//! The plan is computed from a read-only [`Image`] (so `--dry-run` is the
//! same code without the commit); it is then carried out as one
//! [`Transaction`] in repair mode (same crash-safe commit protocol), which
//! frees nothing by assumption: clusters that end up unreferenced are found
//! by the owner walk afterwards and released as leaks.

mod safety;

use super::Transaction;
use super::plan::Pending;
use crate::error::Result;
use crate::format::directory::{FLAG_EXTRA_DATA_COMPATIBLE, FLAG_IN_USE};
use crate::read::{BitmapState, Image, expected_dimensions};
use crate::storage::{ReadAt, WriteAt};
use safety::{
    free_leaks, rebuild_lazy_refcounts, refcount_errors_outside_bitmaps, refuse_unopenable,
    refuse_unsafe_rewrite,
};

/// What to do with bitmaps that cannot be trusted (in use, stale, bad table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InUsePolicy {
    /// Make them fully dirty and consistent: the next incremental backup is a
    /// safe full one and the checkpoint names survive.
    #[default]
    Dirty,
    /// Remove them.
    Remove,
}

/// One repair step, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// The bitmap concerned (None for the extension or the image).
    pub bitmap: Option<String>,
    /// What is (or would be) done, and why.
    pub message: String,
}

/// What happens to one directory entry's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fix {
    Keep,
    Drop,
    AllOnes,
    StripExtraData,
    RewriteTail,
    Unshare,
}

/// The content fix and, when its name must change, the new name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EntryFix {
    fix: Fix,
    rename: Option<String>,
}

/// The repair plan for the bitmaps extension.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    fixes: Vec<EntryFix>,
    drop_extension: bool,
    rewrite: bool,
    /// Every step, in order, for printing.
    pub actions: Vec<Action>,
}

impl Plan {
    /// Whether the extension needs rewriting at all.
    pub fn is_empty(&self) -> bool {
        !self.rewrite
    }
}

fn act(actions: &mut Vec<Action>, bitmap: Option<String>, message: String) {
    actions.push(Action { bitmap, message });
}

/// Plans the repair of `image`'s bitmaps.
pub fn plan<S: ReadAt>(image: &Image<S>, policy: InUsePolicy) -> Plan {
    let mut p = Plan::default();
    let view = image.bitmaps_view();
    if view.extension.is_none() {
        if image.header().version >= 3 && image.header().autoclear_features & 1 != 0 {
            act(
                &mut p.actions,
                None,
                "clear autoclear bit 0: there is no bitmaps extension".into(),
            );
            p.rewrite = true;
        }
        if let Some(e) = &view.problem {
            act(
                &mut p.actions,
                None,
                format!(
                    "drop the unreadable bitmaps extension ({e}); its clusters are freed as leaks"
                ),
            );
            p.drop_extension = true;
            p.rewrite = true;
        }
        return p;
    }
    if image.header().version < 3 {
        let msg = "remove the bitmaps extension: a version 2 image cannot hold consistent bitmaps (the image stays version 2; `qemu-img amend -o compat=1.1` upgrades it)";
        act(&mut p.actions, None, msg.into());
        p.drop_extension = true;
        p.rewrite = true;
        return p;
    }
    if let Some(l) = image.bitmaps_length() {
        let msg = format!(
            "rewrite the bitmaps extension length field at offset {} ({} -> 24): the extensions after its 24 bytes parse, so only the length is wrong; the extension and directory are judged as usual",
            l.offset + 4,
            l.declared
        );
        act(&mut p.actions, None, msg);
        p.rewrite = true;
    } else if let Some(e) = &view.problem {
        act(
            &mut p.actions,
            None,
            format!("rewrite the bitmap directory: {e}"),
        );
        p.rewrite = true;
    }
    let stale = !image.bitmaps_consistent();
    let (shared, shared_directory) = shared_owners(image);
    if let Some(c) = shared_directory {
        let msg = format!(
            "write the bitmap directory to new clusters: its cluster {c} is also used as something else"
        );
        act(&mut p.actions, None, msg);
        p.rewrite = true;
    }
    let mut names: Vec<Vec<u8>> = Vec::new();
    for b in image.bitmaps() {
        let mut fix = plan_entry(image, b, stale, policy, &mut p.actions);
        // Unshare loads the bitmap (dropping the tail bits) and copies every
        // data cluster, so it also does what RewriteTail would.
        if matches!(fix, Fix::Keep | Fix::RewriteTail) {
            let unshare = plan_unshare(b, &shared, &mut p.actions);
            if unshare != Fix::Keep {
                fix = unshare;
            }
        }
        if fix == Fix::Keep && !b.problems.is_empty() {
            act(
                &mut p.actions,
                Some(b.name()),
                "rewrite the directory entry (padding, name)".into(),
            );
            p.rewrite = true;
        }
        let rename = if fix == Fix::Drop {
            None
        } else {
            plan_name(b, &mut names, &mut p.actions)
        };
        p.rewrite |= fix != Fix::Keep || rename.is_some();
        p.fixes.push(EntryFix { fix, rename });
    }
    if stale {
        act(
            &mut p.actions,
            None,
            "set autoclear bit 0 again: every remaining bitmap is consistent".into(),
        );
        p.rewrite = true;
    }
    p
}

fn plan_entry<S: ReadAt>(
    image: &Image<S>,
    b: &crate::read::BitmapEntry,
    stale: bool,
    policy: InUsePolicy,
    actions: &mut Vec<Action>,
) -> Fix {
    let name = b.name();
    let say = |actions: &mut Vec<Action>, m: String| act(actions, Some(name.clone()), m);
    let e = &b.entry;
    let fatal = b.problems.iter().find(|p| {
        p.severity == crate::format::directory::Severity::Unusable
            && !p.message.starts_with("duplicate name")
    });
    if let Some(p) = fatal {
        say(
            actions,
            format!(
                "drop the entry: {} (at offset {}); its clusters are freed as leaks",
                p.message, p.offset
            ),
        );
        return Fix::Drop;
    }
    let untrusted = if stale {
        Some("stale".to_string())
    } else if e.in_use() {
        Some("in use".to_string())
    } else {
        image
            .table(b)
            .err()
            .map(|err| format!("unreadable table: {err}"))
    };
    if let Some(why) = untrusted {
        match policy {
            InUsePolicy::Dirty => {
                say(
                    actions,
                    format!(
                        "{why}: mark every bit dirty (all-ones table, consistent) so the next backup is a full one"
                    ),
                );
                Fix::AllOnes
            }
            InUsePolicy::Remove => {
                say(actions, format!("{why}: remove it (--in-use remove)"));
                Fix::Drop
            }
        }
    } else if !e.extra_data.is_empty() || e.flags & FLAG_EXTRA_DATA_COMPATIBLE != 0 {
        say(actions, "drop the extra data and the extra_data_compatible flag (QEMU cannot open images with them)".into());
        Fix::StripExtraData
    } else if has_tail_bits(image, b) {
        say(actions, "clear the bits set past the virtual size".into());
        Fix::RewriteTail
    } else {
        Fix::Keep
    }
}

fn has_tail_bits<S: ReadAt>(image: &Image<S>, b: &crate::read::BitmapEntry) -> bool {
    image
        .lint_bitmaps_of(b)
        .iter()
        .any(|f| f.message.contains("past the virtual size"))
}

/// For each bitmap index, what else owns one of its clusters: `Some(true)`
/// when only earlier bitmaps do (it gets its own copies), `Some(false)` when
/// guest data or metadata does (its content cannot be trusted). Also the
/// first directory cluster that something else uses too.
fn shared_owners<S: ReadAt>(image: &Image<S>) -> (Vec<Option<bool>>, Option<u64>) {
    use crate::read::refcheck::{Owner, refcount_check};
    let mut out = vec![None; image.bitmaps().len()];
    let Ok(report) = refcount_check(image) else {
        return (out, None);
    };
    let directory = report
        .map
        .shared()
        .find(|&c| report.map.owners(c).contains(&Owner::BitmapDirectory));
    for c in report.map.shared() {
        let owners = report.map.owners(c);
        let bitmaps: Vec<usize> = owners
            .iter()
            .filter_map(|o| match o {
                Owner::BitmapTable { bitmap } | Owner::BitmapData { bitmap } => {
                    Some(*bitmap as usize)
                }
                _ => None,
            })
            .collect();
        let foreign = owners
            .iter()
            .any(|o| !matches!(o, Owner::BitmapTable { .. } | Owner::BitmapData { .. }));
        let first = bitmaps.iter().min().copied();
        for &i in &bitmaps {
            // A bitmap whose table is also one of its data clusters needs its own copies too.
            let twice = bitmaps.iter().filter(|&&j| j == i).count() > 1;
            if let Some(slot) = out.get_mut(i) {
                if foreign {
                    *slot = Some(false);
                } else if (twice || Some(i) != first) && *slot != Some(false) {
                    *slot = Some(true);
                }
            }
        }
    }
    (out, directory)
}

fn plan_unshare(
    b: &crate::read::BitmapEntry,
    shared: &[Option<bool>],
    actions: &mut Vec<Action>,
) -> Fix {
    match shared.get(b.index).copied().flatten() {
        Some(true) => {
            act(
                actions,
                Some(b.name()),
                "shares clusters with another bitmap: give it its own copies".into(),
            );
            Fix::Unshare
        }
        Some(false) => {
            let msg = "shares clusters with guest data or metadata: its content cannot be trusted, mark every bit dirty";
            act(actions, Some(b.name()), msg.into());
            Fix::AllOnes
        }
        None => Fix::Keep,
    }
}

/// Names must be unique, non-empty and NUL-free: a new name when this one is not.
fn plan_name(
    b: &crate::read::BitmapEntry,
    names: &mut Vec<Vec<u8>>,
    actions: &mut Vec<Action>,
) -> Option<String> {
    let raw = &b.entry.name;
    let mut wanted: Vec<u8> = raw.split(|&c| c == 0).next().unwrap_or_default().to_vec();
    if wanted.is_empty() {
        wanted = format!("bitmap-{}", b.index).into_bytes();
    }
    let mut candidate = wanted.clone();
    let mut n = 1;
    while names.contains(&candidate) {
        n += 1;
        candidate = [wanted.as_slice(), format!("-{n}").as_bytes()].concat();
    }
    names.push(candidate.clone());
    if &candidate == raw {
        return None;
    }
    let new = String::from_utf8_lossy(&candidate).into_owned();
    let shown = crate::format::directory::display_name(&candidate);
    act(
        actions,
        Some(b.name()),
        format!("rename to '{shown}' (names must be unique, non-empty and without NUL bytes)"),
    );
    Some(new)
}

impl<S: WriteAt> Transaction<S> {
    /// Carries out `plan` (made from this transaction's image).
    pub(crate) fn apply_plan(&mut self, plan: &Plan) -> Result<()> {
        if !plan.rewrite {
            return Ok(());
        }
        self.mark_changed();
        if plan.drop_extension {
            self.staged.clear();
            return Ok(());
        }
        for (i, fix) in plan.fixes.iter().enumerate().rev() {
            self.apply_fix(i, fix)?;
        }
        Ok(())
    }

    fn apply_fix(&mut self, i: usize, f: &EntryFix) -> Result<()> {
        match f.fix {
            Fix::Keep => {}
            Fix::Drop => {
                self.staged.remove(i);
            }
            Fix::AllOnes => self.all_ones(i)?,
            Fix::StripExtraData => {
                let e = &mut self.staged[i].entry;
                e.extra_data.clear();
                e.flags &= !FLAG_EXTRA_DATA_COMPATIBLE;
            }
            Fix::RewriteTail => self.rewrite_tail(i)?,
            Fix::Unshare => self.unshare(i)?,
        }
        if f.fix == Fix::Drop {
            return Ok(());
        }
        let e = &mut self.staged[i].entry;
        if let Some(n) = &f.rename {
            e.name = n.as_bytes().to_vec();
        }
        e.padding_is_zero = true;
        Ok(())
    }

    /// A new table of the exact size with every entry "all ones"; in_use cleared.
    fn all_ones(&mut self, i: usize) -> Result<()> {
        let g = self.geometry();
        let gran = u32::from(self.staged[i].entry.granularity_bits);
        let (_, size) = expected_dimensions(self.virtual_size(), gran, g).unwrap_or((0, 1));
        let first = self
            .refcounts
            .allocate(&self.storage, g.clusters_for(size * 8))?;
        let s = &mut self.staged[i];
        s.entry.table_offset = g.offset_of(first).map(|o| o.0).unwrap_or(0);
        s.entry.table_size = size as u32;
        s.entry.flags &= !(FLAG_IN_USE | FLAG_EXTRA_DATA_COMPATIBLE);
        s.entry.extra_data.clear();
        s.state = BitmapState::Ok;
        s.pending = Some(Pending {
            raw: vec![1; size as usize],
            data: Default::default(),
        });
        Ok(())
    }

    /// Gives bitmap `i` a new table and new copies of all its data clusters.
    fn unshare(&mut self, i: usize) -> Result<()> {
        use crate::format::bitmap_table::TableEntry;
        let bits = self.load_staged(i)?;
        let g = self.geometry();
        let raw = {
            let image = Image::open(&self.storage)?;
            image.raw_table(&self.staged[i].as_entry(i))?
        };
        let changed: Vec<bool> = raw
            .iter()
            .map(|&r| matches!(TableEntry::decode(r, g), TableEntry::Data(_)))
            .collect();
        self.replace_changed_clusters(i, &changed, bits)
    }

    /// Rewrites the last data cluster without the bits past the virtual size.
    fn rewrite_tail(&mut self, i: usize) -> Result<()> {
        let bits = self.load_staged(i)?; // loading drops the tail bits
        let n = self.staged[i].entry.table_size as usize;
        let mut changed = vec![false; n];
        if let Some(last) = changed.last_mut() {
            *last = true;
        }
        self.replace_changed_clusters(i, &changed, bits)
    }
}

/// What `repair` did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default)]
pub struct RepairReport {
    /// Every step, in order.
    pub actions: Vec<Action>,
    /// Leaked clusters whose refcounts were lowered.
    pub leaks_freed: u64,
    /// Whether the image is clean afterwards (`check` finds nothing);
    /// for a dry run, whether the plan is expected to make it clean.
    pub clean: bool,
}

/// The plan `repair` would carry out on `image`, without writing anything.
///
/// # Errors
/// I/O errors while checking; the refusals of [`repair`] that need no write.
pub fn repair_dry_run<S: ReadAt>(image: &Image<S>, policy: InUsePolicy) -> Result<RepairReport> {
    refuse_unopenable(image)?;
    let plan = plan(image, policy);
    let plan_is_empty = plan.is_empty();
    let before = image.check()?;
    let mut report = RepairReport {
        actions: plan.actions,
        ..RepairReport::default()
    };
    if before.refcounts.leaks > 0 {
        let msg = format!(
            "free the leaked clusters ({} now, plus any the rewrite leaves unreferenced)",
            before.refcounts.leaks
        );
        act(&mut report.actions, None, msg);
    }
    let dirty = image.header().incompatible_features & crate::format::incompat::DIRTY != 0;
    let walk_ok = before.refcounts.check_errors == 0 && before.refcounts.incomplete.is_none();
    // With the dirty bit set, the lazy-refcount rebuild fixes them first.
    let rebuilt_first = dirty && walk_ok;
    if !plan_is_empty && !rebuilt_first {
        refuse_unsafe_rewrite(&before)?;
    }
    // With the dirty bit set, refcount errors are what the lazy-refcount rebuild fixes.
    let outside = if dirty && walk_ok {
        0
    } else {
        refcount_errors_outside_bitmaps(&before)
    };
    if dirty && walk_ok {
        let msg = format!(
            "rebuild the lazy refcounts from the owner walk ({} clusters) and clear the dirty bit",
            before.refcounts.findings.len()
        );
        report.actions.insert(
            0,
            Action {
                bitmap: None,
                message: msg,
            },
        );
    }
    if outside > 0 {
        act(
            &mut report.actions,
            None,
            format!(
                "leave {outside} refcount errors outside the bitmaps to `qemu-img check -r all`"
            ),
        );
    }
    report.clean = outside == 0 && (walk_ok || !plan_is_empty);
    Ok(report)
}

/// Repairs the image file at `path` (with QEMU's write locks), or with
/// `dry_run` reports what would be done (read locks, nothing written).
///
/// # Errors
/// Opening or locking the file, and every error of [`repair`] or
/// [`repair_dry_run`].
pub fn repair_path(
    path: &std::path::Path,
    policy: InUsePolicy,
    dry_run: bool,
) -> Result<RepairReport> {
    if dry_run {
        let image = crate::read::open_path(path, crate::lock::Access::Read)?;
        return repair_dry_run(&image, policy);
    }
    let (_, report) = repair(super::open_rw(path)?, policy)?;
    Ok(report)
}

/// Repairs the bitmaps of the image in `storage` and frees leaked clusters.
///
/// # Errors
/// The corrupt bit; a dirty bit whose refcounts cannot be rebuilt safely; a
/// rewrite needed while a referenced cluster has refcount 0 or the header or
/// a refcount cluster is also used as something else (the rewrite could
/// overwrite it); I/O errors.
pub fn repair<S: WriteAt>(mut storage: S, policy: InUsePolicy) -> Result<(S, RepairReport)> {
    refuse_unopenable(&Image::open(&storage)?)?;
    let mut rebuilt = Vec::new();
    rebuild_lazy_refcounts(&mut storage, &mut rebuilt)?;
    let (plan, before) = {
        let image = Image::open(&storage)?;
        (plan(&image, policy), image.check()?)
    };
    let mut report = RepairReport {
        actions: rebuilt,
        ..RepairReport::default()
    };
    report.actions.extend(plan.actions.iter().cloned());
    let outside = refcount_errors_outside_bitmaps(&before);
    let mut storage = if plan.is_empty() {
        storage
    } else {
        refuse_unsafe_rewrite(&before)?;
        let mut tx = Transaction::begin_repair(storage)?;
        tx.apply_plan(&plan)?;
        tx.commit()?
    };
    report.leaks_freed = free_leaks(&mut storage, &mut report.actions)?;
    let after = Image::open(&storage)?.check()?;
    report.clean = after.verdict() == crate::read::Verdict::Clean;
    if outside > 0 {
        let msg = format!(
            "{outside} refcount errors outside the bitmaps were left alone: run `qemu-img check -r all`"
        );
        act(&mut report.actions, None, msg);
    }
    Ok((storage, report))
}
