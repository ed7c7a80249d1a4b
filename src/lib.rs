//! Offline access to QEMU's persistent dirty bitmaps in qcow2 images.
//!
//! What a backup program does with it: open an image read-only (taking the
//! same locks QEMU takes), pick the checkpoint bitmap, and stream the guest
//! byte ranges that changed since that checkpoint.
//!
//! ```
//! use qcow2_bitmap::lock::Access;
//! use qcow2_bitmap::read::{open_path, BitmapState};
//!
//! # fn main() -> qcow2_bitmap::Result<()> {
//! let image = open_path("fixtures/demo.qcow2".as_ref(), Access::Read)?;
//! for b in image.bitmaps() {
//!     let status = image.status(b);
//!     println!("{} {} bytes granularity, {:?}", b.name(), b.granularity(), status.state);
//! }
//! let ckpt = image.find("ckpt-2")?;
//! assert_eq!(image.status(ckpt).state, BitmapState::Ok);
//! let mut changed = 0;
//! for extent in image.extents(ckpt, None, false)? {
//!     let extent = extent?;
//!     // A backup program copies guest bytes [extent.offset, extent.end()) here.
//!     changed += extent.length;
//! }
//! assert_eq!(changed, 3 << 20);
//! # Ok(())
//! # }
//! ```
//!
//! A bitmap that cannot be trusted (in use after a crash, stale after a
//! program without bitmap support wrote the image, or malformed) is refused
//! with [`ErrorKind::Untrusted`] unless the caller forces it: the safe
//! response is a full backup.
//!
//! Layout of the crate:
//! - [`mod@format`]: decode and encode on-disk records (bytes only, no I/O).
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
pub mod write;

pub use error::{Error, ErrorKind, Result};
