//! Backups straight from the image file: full and incremental backups that
//! QEMU can read, and restoring, applying and verifying them. Sits beside
//! [`crate::write`]: it creates new files and owns their crash safety.
//!
//! # Crash-safe order of `backup`
//! 1. The backup is written under a temporary name in OUTPUT's directory
//!    (a new qcow2 image by [`writer`], or a sparse raw file), synced, and
//!    renamed to OUTPUT; the directory is synced.
//! 2. The manifest (`OUTPUT.json`, [`manifest`]) is written under a
//!    temporary name, synced, renamed into place, the directory synced:
//!    this is the commit record. A backup exists exactly when its manifest
//!    does; an OUTPUT without one is an interrupted backup.
//! 3. Only with `--next`: one [`crate::write::Transaction`] adds the new
//!    bitmap (and disables or removes the old one), with the commit
//!    protocol of the write path. The source's write lock is held from the
//!    start, so no QEMU process can write it in between.
//!
//! A crash before 2 leaves no backup (and at worst a stray temporary file
//! or an OUTPUT without manifest, which the next `backup` replaces); a crash
//! in 3 leaves every bitmap old or new. The source is opened read-only and
//! never written without `--next`. `restore` is atomic the same way (temp
//! file, sync, rename); `apply` writes TARGET in place after checking every
//! CRC, and re-running it gives the same result.

pub mod apply;
mod atomic;
pub mod dirty;
pub mod manifest;
pub mod restore;
mod sinks;
mod units;
pub mod verify;
pub mod writer;

pub use dirty::{DirtyData, Piece};
pub use manifest::{Manifest, ManifestExtent};
pub use units::{Mode, Unit, What};

use crate::error::{Error, ErrorKind, Result};
use crate::guest::{Chain, OpenOptions, Reader, chain as gchain};
use crate::lock::Access;
use crate::read::{self, BitmapState, Image};
use crate::storage::{MappedFile, ReadAt, RwFile};
use manifest::{BackingRef, BitmapRef, Output, Source};
use sha2::{Digest, Sha256};
use sinks::{ExtentLog, Sink};
use std::path::{Path, PathBuf};

/// The format of a backup or restore output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// A qcow2 v3 image.
    Qcow2,
    /// A sparse raw file.
    Raw,
}

impl OutputFormat {
    /// `"qcow2"` or `"raw"`.
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Qcow2 => "qcow2",
            OutputFormat::Raw => "raw",
        }
    }
}

/// What happens to the backup's bitmap when `--next` adds the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Leave it as it is.
    Keep,
    /// Disable it.
    Disable,
    /// Remove it.
    Remove,
}

/// Progress of a long operation: bytes done out of bytes to do.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Options of [`backup`].
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Incremental: the bitmap whose dirty ranges to copy.
    pub bitmap: Option<String>,
    /// `--backing PREV`: the previous backup, stored as given.
    pub backing: Option<String>,
    /// Output format.
    pub format: OutputFormat,
    /// Compress data clusters (qcow2 output).
    pub compress: bool,
    /// Read an image a writer holds (`-U`).
    pub force_share: bool,
    /// `--next NEWNAME` and `--then`.
    pub next: Option<(String, Then)>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            bitmap: None,
            backing: None,
            format: OutputFormat::Qcow2,
            compress: false,
            force_share: false,
            next: None,
        }
    }
}

/// What [`backup`] did (the CLI's `--json` summary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The backup file.
    pub output: PathBuf,
    /// Its manifest.
    pub manifest: PathBuf,
    /// The manifest written.
    pub doc: Manifest,
}

fn invalid(what: &str, msg: impl Into<String>) -> Error {
    Error::invalid_input(what, msg)
}

/// Writes a backup of `image`'s guest view to `output` and its manifest;
/// see the module docs for the order of writes.
///
/// # Errors
/// Refusals (nothing created): an existing manifest, usage errors, a missing
/// or untrusted bitmap (a full backup is needed), `--backing` with another
/// virtual size, a held lock, `--next` with an existing name; then I/O and
/// metadata errors.
pub fn backup(
    image: &Path,
    output: &Path,
    opts: &BackupOptions,
    progress: Option<Progress<'_>>,
) -> Result<Summary> {
    let manifest_path = manifest::path_of(output);
    if manifest_path.exists() {
        return Err(invalid(
            &manifest_path.display().to_string(),
            "already exists: a backup is never overwritten",
        ));
    }
    if opts.backing.is_some() && opts.format == OutputFormat::Raw {
        return Err(invalid("--backing", "needs --format qcow2"));
    }
    if opts.next.is_some() && opts.bitmap.is_none() {
        return Err(invalid("--next", "needs --bitmap"));
    }
    if opts.next.is_some() && opts.force_share {
        return Err(invalid("-U", "cannot be used with --next"));
    }
    let shown = image.display().to_string();
    // With --next the source is locked for writing for the whole run.
    let rw = match &opts.next {
        Some(_) => Some(crate::write::open_rw(image)?),
        None => None,
    };
    let access = if opts.force_share {
        Access::ReadForceShare
    } else {
        Access::Read
    };
    let mut chain_opts = OpenOptions::new(access);
    if rw.is_some() {
        // Our own write lock guards the top; a second reader lock on it
        // would see that lock as another writer.
        chain_opts.top_access = Some(Access::ReadForceShare);
    }
    let chain = Chain::open_with(image, chain_opts).map_err(|e| e.context(&shown))?;
    not_read_from(output, &chain, "the image being backed up")?;
    let size = chain.virtual_size();
    let source_cluster = chain.members()[0].cluster_size().unwrap_or(65536);
    // The bitmap: from the write-locked file, or a read-only open.
    let bitmaps = match (&opts.bitmap, rw) {
        (None, _) => Bitmaps::None,
        (Some(_), Some(rw)) => Bitmaps::Locked(Image::open(rw).map_err(|e| e.context(&shown))?),
        (Some(_), None) => {
            Bitmaps::Shared(read::open_path(image, access).map_err(|e| e.context(&shown))?)
        }
    };
    let (bitmap_ref, dirty) = match (&opts.bitmap, &bitmaps) {
        (Some(name), Bitmaps::Locked(img)) => {
            dirty_ranges(img, name, &opts.next, size).map_err(|e| e.context(&shown))?
        }
        (Some(name), Bitmaps::Shared(img)) => {
            dirty_ranges(img, name, &opts.next, size).map_err(|e| e.context(&shown))?
        }
        _ => (None, vec![(0, size)]),
    };
    let backing = match &opts.backing {
        None => None,
        Some(name) => Some(backing_ref(output, name, size)?),
    };
    // Ranges nothing in the source allocates read as zeros: a full backup
    // lists them as zero extents (so `apply` onto a used disk is exact) but
    // leaves them unallocated in a qcow2 output without a backing file; an
    // incremental, or an output over a backing file, masks them.
    let mask_holes = bitmap_ref.is_some() || backing.is_some();
    let mut reader = chain.reader();
    let spec = OutputSpec {
        path: output,
        format: opts.format,
        cluster_size: source_cluster,
        backing: backing.as_ref().map(|b| writer::BackingName {
            name: b.filename.clone(),
            format: "qcow2".into(),
        }),
        compress: opts.compress,
        mode: Mode::Everything,
        mask_holes,
    };
    let log = write_output(&mut reader, &dirty, spec, progress)?;
    let cluster = (opts.format == OutputFormat::Qcow2).then_some(source_cluster);
    let (extents, data_bytes, zero_bytes) = log.finish();
    let doc = Manifest {
        format: manifest::FORMAT.into(),
        version: manifest::VERSION,
        created: manifest::now_rfc3339(),
        tool: format!("qcow2-bitmap {}", env!("CARGO_PKG_VERSION")),
        kind: if bitmap_ref.is_some() {
            "incremental"
        } else {
            "full"
        }
        .into(),
        source: Source {
            filename: shown.clone(),
            virtual_size: size,
            cluster_size: source_cluster,
        },
        bitmap: bitmap_ref,
        backing,
        output: Output {
            filename: output.display().to_string(),
            format: opts.format.name().into(),
            cluster_size: cluster,
        },
        extents,
        data_bytes,
        zero_bytes,
    };
    atomic::write_file(&manifest_path, &doc.to_bytes())?;
    // Rotation, after the backup is durable, under the lock held since the start.
    if let (Some((new, then)), Bitmaps::Locked(img)) = (&opts.next, bitmaps) {
        let old = opts.bitmap.as_deref().unwrap_or_default();
        let granularity = doc.bitmap.as_ref().map(|b| b.granularity);
        let mut tx =
            crate::write::Transaction::begin(img.into_storage()).map_err(|e| e.context(&shown))?;
        tx.add(new, granularity, true)?;
        match then {
            Then::Keep => {}
            Then::Disable => tx.set_enabled(old, false)?,
            Then::Remove => tx.remove(&[old])?,
        }
        tx.commit().map_err(|e| e.context(&shown))?;
    }
    Ok(Summary {
        output: output.to_path_buf(),
        manifest: manifest_path,
        doc,
    })
}

/// Where the bitmap of an incremental backup is read from.
enum Bitmaps {
    None,
    /// The source write-locked for `--next`.
    Locked(Image<RwFile>),
    /// The source opened read-only.
    Shared(Image<MappedFile>),
}

/// A bitmap's reference and its dirty ranges (offset, length).
type Dirty = (Option<BitmapRef>, Vec<(u64, u64)>);

/// The bitmap's reference and dirty ranges; refuses an untrusted bitmap
/// (a full backup is needed) and an existing `--next` name.
pub(crate) fn dirty_ranges<S: ReadAt>(
    img: &Image<S>,
    name: &str,
    next: &Option<(String, Then)>,
    size: u64,
) -> Result<Dirty> {
    let b = img.find(name)?;
    let st = img.status(b);
    if st.state != BitmapState::Ok {
        return Err(Error::new(
            ErrorKind::Untrusted,
            format!("bitmap '{name}'"),
            None,
            format!(
                "is {} ({}): it cannot be trusted, a full backup is needed",
                st.state.as_str(),
                st.problem.as_deref().unwrap_or("not consistent")
            ),
        ));
    }
    if let Some((new, _)) = next
        && img.find(new).is_ok()
    {
        return Err(invalid(
            &format!("bitmap '{new}'"),
            "already exists (--next needs a new name)",
        ));
    }
    if img.virtual_size() / 512 * 512 != size {
        return Err(invalid(
            &format!("bitmap '{name}'"),
            "its image and the guest view differ in size",
        ));
    }
    let ranges = img
        .extents(b, None, false)?
        .map(|e| e.map(|e| (e.offset, e.length)))
        .collect::<Result<Vec<_>>>()?;
    Ok((
        Some(BitmapRef {
            name: name.to_string(),
            granularity: b.granularity(),
        }),
        ranges,
    ))
}

/// The backing reference of a new backup: PREV opened where QEMU will
/// look for it (relative to OUTPUT's directory), its size checked.
fn backing_ref(output: &Path, name: &str, size: u64) -> Result<BackingRef> {
    let at = gchain::combine(output, name);
    let prev =
        Chain::open(&at, Access::Read).map_err(|e| e.context(format!("--backing {name}")))?;
    not_read_from(output, &prev, "the previous backup")?;
    if prev.virtual_size() != size {
        return Err(invalid(
            &format!("--backing {name}"),
            format!(
                "virtual size {} differs from the image's {size}",
                prev.virtual_size()
            ),
        ));
    }
    let m = manifest::path_of(&at);
    let manifest_sha256 = match std::fs::read(&m) {
        Ok(bytes) => Some(read::hex(&Sha256::digest(&bytes))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(m.display().to_string(), None, e)),
    };
    Ok(BackingRef {
        filename: name.to_string(),
        manifest_sha256,
    })
}

/// Refuses an OUTPUT that is a file of `chain` (a member or its external
/// data file): renaming the backup into place would replace it.
fn not_read_from(output: &Path, chain: &Chain, what: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(out) = std::fs::metadata(output) else {
        return Ok(());
    };
    for (depth, m) in chain.members().iter().enumerate() {
        let data_file = m.data_file.as_ref().map(|d| PathBuf::from(&d.name));
        for (p, role) in [
            (Some(m.path.clone()), "a member of"),
            (data_file, "the data file of"),
        ] {
            let Some(p) = p else { continue };
            if std::fs::metadata(&p).is_ok_and(|f| f.dev() == out.dev() && f.ino() == out.ino()) {
                let whose = if depth == 0 && role == "a member of" {
                    what.to_string()
                } else {
                    format!("{role} {what}")
                };
                return Err(invalid(
                    &output.display().to_string(),
                    format!(
                        "is {whose} ({}): a backup never replaces a file it reads",
                        p.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// What [`write_output`] writes.
struct OutputSpec<'a> {
    path: &'a Path,
    format: OutputFormat,
    /// The qcow2 output's cluster size (units are rounded to it).
    cluster_size: u64,
    backing: Option<writer::BackingName>,
    compress: bool,
    mode: Mode,
    mask_holes: bool,
}

/// Writes the units of `ranges` into a new file at `spec.path`, atomically
/// (temporary name, sync, rename): a planning pass (for the qcow2 layout and
/// the progress total), then the copy. Returns the extents written.
fn write_output(
    reader: &mut Reader<'_>,
    ranges: &[(u64, u64)],
    spec: OutputSpec<'_>,
    progress: Option<Progress<'_>>,
) -> Result<ExtentLog> {
    let size = reader.chain().virtual_size();
    let cs = spec.cluster_size;
    let cluster = (spec.format == OutputFormat::Qcow2).then_some(cs);
    let units_of = || ranges.iter().map(|&r| Ok(r));
    let mut plan = sinks::Tally::new(cs);
    units::walk(reader, units_of(), cluster, spec.mode, |_, u| {
        plan.add(u);
        Ok(())
    })?;
    let (tmp, file) = atomic::create_temp(spec.path)?;
    let mut guard = atomic::TempGuard::new(tmp.clone());
    let mut sink = match spec.format {
        OutputFormat::Qcow2 => Sink::qcow2(
            file,
            writer::Plan {
                size,
                cluster_bits: cs.trailing_zeros(),
                data_clusters: plan.data_clusters,
                l2_tables: plan.l2_tables,
            },
            spec.backing,
            spec.compress,
        )?,
        OutputFormat::Raw => Sink::raw(file, size)?,
    };
    let mut log = ExtentLog::new();
    let (total, mut done) = (plan.bytes, 0u64);
    let mut progress = progress;
    let mut buf = Vec::new();
    units::walk(reader, units_of(), cluster, spec.mode, |reader, u| {
        copy_unit(
            reader,
            u,
            size,
            &mut buf,
            &mut sink,
            &mut log,
            spec.mask_holes,
        )?;
        done += u.len;
        if let Some(p) = progress.as_mut() {
            p(done.min(total), total);
        }
        Ok(())
    })?;
    let file = sink.finish()?;
    atomic::commit(file, &tmp, spec.path)?;
    guard.disarm();
    Ok(log)
}

/// Bytes read per chunk of a data unit.
const CHUNK: u64 = 8 << 20;

/// Reads one unit (data) and hands it to the sink and the extent log.
fn copy_unit(
    reader: &mut Reader<'_>,
    u: Unit,
    size: u64,
    buf: &mut Vec<u8>,
    sink: &mut Sink,
    log: &mut ExtentLog,
    mask_holes: bool,
) -> Result<()> {
    let end = u.offset + u.len;
    match u.what {
        What::Zero | What::Hole => {
            if u.what == What::Zero || mask_holes {
                sink.zero(u.offset, u.len)?;
            }
            log.zero(u.offset, end.min(size) - u.offset);
        }
        What::Data => {
            let step = sink.chunk(CHUNK);
            let mut at = u.offset;
            while at < end {
                let n = step.min(end - at);
                buf.resize(n as usize, 0);
                let inside = size.saturating_sub(at).min(n) as usize;
                reader.read_at(at, &mut buf[..inside])?;
                buf[inside..].fill(0);
                log.data(at, &buf[..inside]);
                sink.data(at, buf)?;
                at += n;
            }
        }
    }
    Ok(())
}
