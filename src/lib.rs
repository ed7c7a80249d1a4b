//! Offline access to QEMU's persistent dirty bitmaps in qcow2 images.
//!
//! Layout of the crate:
//! - [`format`]: decode and encode on-disk records (bytes only, no I/O).
//! - [`read`]: open an image and read bitmaps; never writes.
//! - [`bits`]: word-parallel bitmap kernels; knows nothing about qcow2.
//! - [`storage`]: positional storage ([`storage::ReadAt`]) over memory or a mapped file.
//! - [`lock`]: QEMU-compatible image locks.
//! - [`error`]: the one-line, offset-carrying [`Error`].
#![forbid(clippy::undocumented_unsafe_blocks)]

pub mod bits;
pub mod error;
pub mod format;
pub mod lock;
pub mod read;
pub mod storage;
pub mod types;

pub use error::{Error, ErrorKind, Result};
