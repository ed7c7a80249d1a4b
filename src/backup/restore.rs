//! `restore`: the guest view of any backup chain flattened into a new,
//! standalone, sparse image (the synthetic full backup). Every manifest
//! found beside a chain member is checked first; the output is atomic
//! (temporary name, sync, rename).

use super::units::Mode;
use super::verify::check_chain;
use super::{OutputFormat, Progress};
use crate::error::{Error, ErrorKind, Result};
use crate::guest::Chain;
use crate::lock::Access;
use std::path::Path;

/// What [`restore`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Guest bytes stored as data.
    pub data_bytes: u64,
    /// The virtual size.
    pub virtual_size: u64,
}

/// Restores `backup` (qcow2 or raw, with its whole chain) into a new `output`.
///
/// # Errors
/// An existing `output`; a chain member whose manifest does not hold
/// (named with the extent and offset); I/O and metadata errors.
pub fn restore(
    backup: &Path,
    output: &Path,
    format: OutputFormat,
    progress: Option<Progress<'_>>,
) -> Result<Restored> {
    if output.exists() {
        return Err(Error::invalid_input(
            output.display().to_string(),
            "already exists: restore writes a new image",
        ));
    }
    let shown = backup.display().to_string();
    let chain = Chain::open(backup, Access::Read).map_err(|e| e.context(&shown))?;
    // Any qcow2 chain can be flattened; the manifests it carries must hold.
    for m in check_chain(&chain, false) {
        if let Some(p) = m.problems.first() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("{}: backup manifest check", m.filename),
                None,
                p.to_string(),
            ));
        }
    }
    let size = chain.virtual_size();
    let spec = super::OutputSpec {
        path: output,
        format,
        cluster_size: chain.members()[0].cluster_size().unwrap_or(65536),
        backing: None,
        compress: false,
        mode: Mode::DataOnly,
        mask_holes: false,
    };
    let log = super::write_output(&mut chain.reader(), &[(0, size)], spec, progress)?;
    let (_, data_bytes, _) = log.finish();
    Ok(Restored {
        data_bytes,
        virtual_size: size,
    })
}
