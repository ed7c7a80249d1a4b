//! Opening an image file read-only: open, take QEMU's locks, map.

use super::Image;
use crate::error::{Error, Result};
use crate::lock::{self, Access};
use crate::storage::MappedFile;
use std::fs::File;
use std::path::Path;

/// Opens the image at `path` read-only with QEMU-compatible locks
/// (`Access::Read`, or `Access::ReadForceShare` for `-U`) and maps it.
///
/// # Errors
/// I/O errors naming the path, `Locked` when a writer holds the image,
/// and every error of [`Image::open`].
pub fn open_path(path: &Path, access: Access) -> Result<Image<MappedFile>> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|e| Error::io(&shown, None, e))?;
    let meta = file.metadata().map_err(|e| Error::io(&shown, None, e))?;
    if !meta.is_file() {
        return Err(Error::invalid_input(&shown, "not a regular file"));
    }
    lock::lock(&file, &shown, access)?;
    let mapped = MappedFile::new(file).map_err(|e| Error::io(&shown, None, e))?;
    Image::open(mapped)
}
