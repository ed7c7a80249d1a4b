//! Opening an image file for a write transaction: read-write, with QEMU's
//! write locks held for as long as the transaction (and its file) lives.

use super::Transaction;
use crate::error::{Error, Result};
use crate::lock::{self, Access};
use crate::storage::RwFile;
use std::fs::OpenOptions;
use std::path::Path;

/// Opens `path` read-write, takes QEMU's write locks (failing while any QEMU
/// process has the image open) and begins a transaction.
///
/// # Errors
/// I/O errors naming the path, `Locked`, and every error of [`Transaction::begin`].
pub fn open_path(path: &Path) -> Result<Transaction<RwFile>> {
    Transaction::begin(open_rw(path)?)
}

/// Opens `path` read-write with QEMU's write locks held as long as the file lives.
///
/// # Errors
/// I/O errors naming the path, `Locked` while a QEMU process holds the image.
pub fn open_rw(path: &Path) -> Result<RwFile> {
    let shown = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(&shown, None, e))?;
    if !file
        .metadata()
        .map_err(|e| Error::io(&shown, None, e))?
        .is_file()
    {
        return Err(Error::invalid_input(&shown, "not a regular file"));
    }
    lock::lock(&file, &shown, Access::Write)?;
    RwFile::new(file).map_err(|e| Error::io(&shown, None, e))
}
