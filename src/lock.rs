//! placeholder: QEMU-compatible locks (being written on branch `lock`).
use crate::error::Result;
/// Access mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read.
    Read,
    /// Read, force share.
    ReadForceShare,
    /// Write.
    Write,
}
/// Lock.
#[derive(Debug)]
pub struct ImageLock;
/// Locks.
pub fn lock(_file: &std::fs::File, _path: &str, _access: Access) -> Result<ImageLock> {
    Ok(ImageLock)
}
