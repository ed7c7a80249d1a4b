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
//! Rotating checkpoints offline is one [`write::Transaction`]: every staged
//! operation lands with one header switch, or none does.
//!
//! ```
//! # fn main() -> qcow2_bitmap::Result<()> {
//! # let dir = std::env::temp_dir().join(format!("qcow2-bitmap-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! # let path = dir.join("disk.qcow2");
//! # std::fs::copy("fixtures/demo.qcow2", &path).unwrap();
//! let mut tx = qcow2_bitmap::write::open_path(&path)?;
//! tx.set_enabled("ckpt-3", false)?;
//! tx.add("ckpt-4", None, true)?;
//! tx.commit()?;
//! # std::fs::remove_dir_all(&dir).unwrap();
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
//! - [`guest`]: the guest's view of an image and its backing chain (map and
//!   guest bytes); never writes.
//! - [`mod@write`]: crash-safe transactions that add, remove, clear, enable,
//!   disable and merge bitmaps, writing only what changes.
//! - [`backup`]: full and incremental backups (new qcow2 or raw files with a
//!   manifest), restore, apply and verify.
//! - [`report`]: the CLI's `--json` documents, built from library results
//!   (the Python bindings return the same documents as dicts).
//! - [`bits`]: word-parallel bitmap kernels; knows nothing about qcow2.
//! - [`storage`]: positional storage ([`storage::ReadAt`]) over memory or a mapped file.
//! - [`lock`]: QEMU-compatible image locks.
//! - [`error`]: the one-line, offset-carrying [`Error`].
#![forbid(clippy::undocumented_unsafe_blocks)]

pub mod backup;
pub mod bits;
pub mod error;
pub mod format;
pub mod guest;
pub mod lock;
pub mod read;
pub mod report;
pub mod storage;
pub mod types;
pub mod write;

pub use error::{Error, ErrorKind, Result};
