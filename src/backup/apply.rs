//! `apply`: lays one backup onto a raw image or block device in place:
//! every data extent of its manifest written, every zero extent zeroed,
//! nothing else touched. The backup's data is checked against the
//! manifest's CRC-32s before the first byte is written; an interrupted
//! `apply` run again gives the same target.

use super::Progress;
use super::manifest::{self, Manifest};
use super::verify::check_member;
use crate::error::{Error, ErrorKind, Result};
use crate::format::QCOW2_MAGIC;
use crate::guest::{Chain, OpenOptions};
use crate::lock::{self, Access};
use std::fs::OpenOptions as FileOptions;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What [`apply`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Data bytes written.
    pub data_bytes: u64,
    /// Zero bytes written.
    pub zero_bytes: u64,
}

/// Applies `backup` (with its manifest) to `target`.
///
/// # Errors
/// Refused with `target` untouched: no manifest, a manifest or backup that
/// does not hold, different virtual sizes, a qcow2 target, a held lock.
pub fn apply(backup: &Path, target: &Path, progress: Option<Progress<'_>>) -> Result<Applied> {
    let shown = backup.display().to_string();
    let mpath = manifest::path_of(backup);
    if !mpath.exists() {
        return Err(Error::invalid_input(
            &shown,
            format!(
                "has no manifest ({}): not a backup (an interrupted one?)",
                mpath.display()
            ),
        ));
    }
    let doc = Manifest::load(&mpath)?;
    // The backup alone: its data extents are stored in it.
    let mut opts = OpenOptions::new(Access::Read);
    opts.no_backing = true;
    let chain = Chain::open_with(backup, opts.clone()).map_err(|e| e.context(&shown))?;
    let report = check_member(
        &chain.members()[0],
        None,
        true,
        chain.virtual_size(),
        Some(opts),
        false,
    );
    if let Some(p) = report.problems.first() {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("{shown}: backup"),
            None,
            format!("{p} (target untouched)"),
        ));
    }
    let tshown = target.display().to_string();
    let mut file = FileOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .map_err(|e| Error::io(&tshown, None, e))?;
    if file
        .metadata()
        .map_err(|e| Error::io(&tshown, None, e))?
        .is_file()
    {
        lock::lock(&file, &tshown, Access::Write)?;
    }
    let tsize = file
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io(&tshown, None, e))?;
    let mut magic = [0u8; 4];
    if tsize >= 4 {
        file.read_exact_at(&mut magic, 0)
            .map_err(|e| Error::io(&tshown, Some(0), e))?;
        if u32::from_be_bytes(magic) == QCOW2_MAGIC {
            return Err(Error::invalid_input(
                &tshown,
                "is a qcow2 image: apply writes raw images and block devices (restore makes qcow2)",
            ));
        }
    }
    if tsize != doc.source.virtual_size {
        return Err(Error::invalid_input(
            &tshown,
            format!(
                "is {tsize} bytes, the backup's disk is {} (target untouched)",
                doc.source.virtual_size
            ),
        ));
    }
    let mut reader = chain.reader();
    let total = doc.data_bytes + doc.zero_bytes;
    let mut done = 0u64;
    let mut progress = progress;
    let mut buf = vec![0u8; 8 << 20];
    let zeros = vec![0u8; 8 << 20];
    for e in &doc.extents {
        let mut at = e.offset;
        while at < e.end() {
            let n = (e.end() - at).min(buf.len() as u64) as usize;
            let bytes: &[u8] = if e.is_data() {
                reader.read_at(at, &mut buf[..n])?;
                &buf[..n]
            } else {
                &zeros[..n]
            };
            file.write_all_at(bytes, at)
                .map_err(|err| Error::io(&tshown, Some(at), err))?;
            at += n as u64;
            done += n as u64;
            if let Some(p) = progress.as_mut() {
                p(done, total);
            }
        }
    }
    file.sync_all().map_err(|e| Error::io(&tshown, None, e))?;
    Ok(Applied {
        data_bytes: doc.data_bytes,
        zero_bytes: doc.zero_bytes,
    })
}
