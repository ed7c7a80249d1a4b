//! What `repair` refuses before writing anything, and the refcount work
//! around its rewrite: the lazy-refcount rebuild before it and the freeing of
//! leaked clusters after it (both decided by the owner walk).

use super::{Action, act};
use crate::error::Result;
use crate::read::Image;
use crate::storage::{ReadAt, WriteAt};

/// An image QEMU cannot open because of its header's size fields is
/// broken outside the bitmaps: nothing repair changes would make it open,
/// and bitmaps judged against an absurd virtual size must not be dropped.
pub(super) fn refuse_unopenable<S: ReadAt>(image: &Image<S>) -> Result<()> {
    use crate::error::{Error, ErrorKind};
    use crate::format::extensions::LengthReading;
    if let Some(l) = image
        .bitmaps_length()
        .filter(|l| l.reading == LengthReading::Unparsed)
    {
        let msg = format!(
            "{} is not 24 and the header extension area after the bitmaps extension parses neither after its 24 bytes nor after the declared length: it may hold extensions this tool does not understand, so repair leaves the image untouched",
            l.declared
        );
        return Err(Error::new(
            ErrorKind::Unsupported,
            "bitmaps extension length",
            Some(l.offset + 4),
            msg,
        ));
    }
    match crate::read::refcheck::l1_problem(image) {
        Some(why) => {
            let why = why.trim_start_matches("ERROR: ");
            let msg = format!("{why}; QEMU cannot open this image and repair leaves it untouched");
            Err(Error::new(ErrorKind::Unsupported, "image", None, msg))
        }
        None => Ok(()),
    }
}

/// Lazy refcounts left stale by a crash (dirty bit set): sets every refcount
/// to what the owner walk counts, then clears the dirty bit. Raises first,
/// lowers second, clears the bit last, with a sync after each step, so a
/// crash leaves the dirty bit set and QEMU (or a new repair) redoes it.
/// Refused when the walk is incomplete or a refcount block is missing (that
/// needs the whole refcount structure rebuilt: `qemu-img check -r all`).
pub(super) fn rebuild_lazy_refcounts<S: WriteAt>(
    storage: &mut S,
    actions: &mut Vec<Action>,
) -> Result<()> {
    use crate::error::{Error, ErrorKind};
    use crate::format::incompat;
    use crate::read::refcheck::{FindingKind, refcount_check};
    use crate::types::HostCluster;
    let (header, report) = {
        let image = Image::open(&*storage)?;
        if image.header().incompatible_features & incompat::DIRTY == 0 {
            return Ok(());
        }
        (image.header().clone(), refcount_check(&image)?)
    };
    let refuse = |why: String| {
        let msg = format!("the dirty bit is set and {why}; run `qemu-img check -r all` first");
        Err(Error::new(ErrorKind::Unsupported, "image", Some(72), msg))
    };
    // Also where qemu-img check stops (a malformed table entry): rebuilding
    // every refcount is only done from a walk QEMU would complete too.
    if report.check_errors > 0 || report.aborted.is_some() {
        return refuse("the owner walk is incomplete".into());
    }
    let mut rc = crate::write::refcounts::Refcounts::load_for_rebuild(&*storage, &header)?;
    if let Some(f) = report
        .findings
        .iter()
        .find(|f| !rc.has_block(HostCluster(f.cluster)))
    {
        return refuse(format!("cluster {} has no refcount block", f.cluster));
    }
    for f in report
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::Error)
    {
        for _ in f.refcount..f.references {
            rc.increment(&*storage, HostCluster(f.cluster))?;
        }
    }
    rc.flush_increments(storage)?;
    for f in report
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::Leak)
    {
        for _ in f.references..f.refcount {
            rc.queue_free(&*storage, HostCluster(f.cluster))?;
        }
    }
    rc.apply_decrements(storage)?;
    let flags = header.incompatible_features & !incompat::DIRTY;
    let at = "qcow2 header incompatible_features";
    storage
        .write_at(72, &flags.to_be_bytes())
        .map_err(|e| Error::io(at, Some(72), e))?;
    storage
        .sync()
        .map_err(|e| Error::io("image file", None, e))?;
    let n = report.findings.len();
    let msg = format!(
        "rebuilt the lazy refcounts from the owner walk ({n} clusters corrected) and cleared the dirty bit"
    );
    actions.push(Action {
        bitmap: None,
        message: msg,
    });
    Ok(())
}

/// Refuses a rewrite that would overwrite something else, before anything
/// is written (`qemu-img check -r all` repairs these first):
///
/// - a cluster that something references but whose refcount is 0 looks free
///   to the allocator, which would put the new directory or tables there
///   (over guest data, an L2 table, a kept bitmap's table);
/// - guest data or metadata pointing past the end of the file points where
///   the allocator appends;
/// - a header or refcount cluster that is also used as something other than
///   a bitmap (an L2 table, guest data) would change under that other user
///   when the header switch or the refcount updates write it.
pub(super) fn refuse_unsafe_rewrite(r: &crate::read::CheckReport) -> Result<()> {
    use crate::error::{Error, ErrorKind};
    use crate::read::refcheck::{FindingKind, Owner};
    let refuse = |cluster: u64, why: String| {
        let msg = format!(
            "cluster {cluster} {why}, so rewriting the bitmaps could overwrite it; run `qemu-img check -r all` first"
        );
        Err(Error::new(ErrorKind::Unsupported, "image", None, msg))
    };
    let findings = &r.refcounts.findings;
    if let Some(f) = findings
        .iter()
        .find(|f| f.kind == FindingKind::Error && f.refcount == 0)
    {
        return refuse(
            f.cluster,
            format!("has {} references but refcount 0", f.references),
        );
    }
    let map = &r.refcounts.map;
    // The allocator appends at the end of the file, where these point.
    if let Some(off) = r.refcounts.referenced_past_eof {
        let msg = format!(
            "guest data or metadata points past the end of the file (offset 0x{off:x}), where rewriting the bitmaps would append; run `qemu-img check -r all` first"
        );
        return Err(Error::new(ErrorKind::Unsupported, "image", None, msg));
    }
    let written = |o: &Owner| {
        matches!(
            o,
            Owner::Header | Owner::RefcountTable | Owner::RefcountBlock
        )
    };
    // Bitmap structures sharing them are what the repair drops or unshares.
    let bitmap = |o: &Owner| {
        matches!(
            o,
            Owner::BitmapTable { .. } | Owner::BitmapData { .. } | Owner::BitmapDirectory
        )
    };
    let unsafe_shared = |c: u64| {
        let owners = map.owners(c);
        owners.iter().any(written) && owners.iter().any(|o| !written(o) && !bitmap(o))
    };
    if let Some(c) = map.shared().find(|&c| unsafe_shared(c)) {
        let owners: Vec<String> = map.owners(c).iter().map(|o| format!("{o:?}")).collect();
        return refuse(c, format!("is used as {}", owners.join(" and ")));
    }
    Ok(())
}

pub(super) fn refcount_errors_outside_bitmaps(r: &crate::read::CheckReport) -> u64 {
    use crate::read::refcheck::{FindingKind, Owner};
    let bitmap = |o: &Owner| {
        matches!(
            o,
            Owner::BitmapTable { .. } | Owner::BitmapData { .. } | Owner::BitmapDirectory
        )
    };
    let errors = r
        .refcounts
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::Error);
    errors
        .filter(|f| !r.refcounts.map.owners(f.cluster).iter().any(bitmap))
        .count() as u64
}

/// Lowers the refcount of every leaked cluster to its reference count, when
/// the owner walk is complete. Returns the number of clusters freed.
pub(super) fn free_leaks<S: WriteAt>(storage: &mut S, actions: &mut Vec<Action>) -> Result<u64> {
    use crate::read::refcheck::{FindingKind, refcount_check};
    let (header, report) = {
        let image = Image::open(&*storage)?;
        (image.header().clone(), refcount_check(&image)?)
    };
    if report.check_errors > 0 || report.incomplete.is_some() {
        let why = report
            .incomplete
            .clone()
            .unwrap_or_else(|| format!("{} check errors", report.check_errors));
        act(
            actions,
            None,
            format!("leaked clusters were not freed: the owner walk is incomplete ({why})"),
        );
        return Ok(0);
    }
    let leaks: Vec<_> = report
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::Leak)
        .collect();
    if leaks.is_empty() {
        return Ok(0);
    }
    let mut rc = crate::write::refcounts::Refcounts::load(&*storage, &header)?;
    for f in &leaks {
        for _ in f.references..f.refcount {
            rc.queue_free(&*storage, crate::types::HostCluster(f.cluster))?;
        }
    }
    rc.apply_decrements(storage)?;
    act(
        actions,
        None,
        format!("freed {} leaked clusters", leaks.len()),
    );
    Ok(leaks.len() as u64)
}
