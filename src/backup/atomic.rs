//! New files that appear complete or not at all: written under a temporary
//! name in the target's directory, synced, renamed, the directory synced.

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A new, empty temporary file beside `target`.
///
/// # Errors
/// I/O errors naming the directory.
pub fn create_temp(target: &Path) -> Result<(PathBuf, File)> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let dir = dir_of(target);
    for i in 0..100u32 {
        let tmp = dir.join(format!(".{name}.tmp-{}-{i}", std::process::id()));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(tmp.display().to_string(), None, e)),
        }
    }
    Err(Error::invalid_input(
        dir.display().to_string(),
        "could not create a temporary file",
    ))
}

/// Syncs `file`, renames `tmp` to `target` and syncs the directory.
///
/// # Errors
/// I/O errors naming the file.
pub fn commit(file: File, tmp: &Path, target: &Path) -> Result<()> {
    let shown = target.display().to_string();
    file.sync_all().map_err(|e| Error::io(&shown, None, e))?;
    drop(file);
    std::fs::rename(tmp, target).map_err(|e| Error::io(&shown, None, e))?;
    sync_dir(target)
}

/// Syncs the directory holding `path` (so a rename in it is durable).
///
/// # Errors
/// I/O errors naming the directory.
pub fn sync_dir(path: &Path) -> Result<()> {
    let dir = dir_of(path);
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir.display().to_string(), None, e))
}

/// Writes `bytes` to `target` atomically (temp, sync, rename, directory sync).
///
/// # Errors
/// I/O errors.
pub fn write_file(target: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let (tmp, mut f) = create_temp(target)?;
    let mut guard = TempGuard::new(tmp.clone());
    f.write_all(bytes)
        .map_err(|e| Error::io(tmp.display().to_string(), None, e))?;
    commit(f, &tmp, target)?;
    guard.disarm();
    Ok(())
}

/// Removes a temporary file unless disarmed (errors and early returns).
#[derive(Debug)]
pub struct TempGuard {
    path: Option<PathBuf>,
}

impl TempGuard {
    /// Guards `path`.
    pub fn new(path: PathBuf) -> Self {
        TempGuard { path: Some(path) }
    }

    /// The file was renamed into place: keep it.
    pub fn disarm(&mut self) {
        self.path = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
