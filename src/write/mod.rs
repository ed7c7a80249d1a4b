//! The write path: crash-safe bitmap operations that touch only what changes.
//!
//! # Commit protocol
//!
//! A [`Transaction`] stages any number of operations (add, remove, clear,
//! enable, disable, merge) in memory. Nothing is written while staging, so a
//! refused operation leaves the image byte-identical. [`Transaction::commit`]
//! then runs, in this order:
//!
//! 1. **New clusters.** Allocate (first fit, in memory) and write the new data
//!    clusters, tables and the new directory into clusters that nothing
//!    references. Untouched bitmaps keep their tables and data where they are.
//! 2. **Refcounts up.** Write the refcount blocks holding the increments (new
//!    refcount blocks and a relocated refcount table first, each made durable
//!    before anything points at it), then **sync**.
//! 3. **Header switch.** One write inside cluster 0 replaces the header and
//!    extension area, pointing the bitmaps extension at the new directory (or
//!    dropping it and clearing autoclear bit 0 when no bitmap remains); **sync**.
//!    This is the commit point.
//! 4. **Refcounts down.** Decrement the old directory, tables and data clusters
//!    no longer referenced, then **sync**.
//!
//! A crash before step 3 leaves the old bitmaps (and, after step 2, leaked
//! clusters); a crash after it leaves the new bitmaps (and, before step 4
//! ends, leaked clusters). In-use flags are never set: every bitmap is always
//! consistent, old or new. Guest data, L1/L2 tables, snapshots and unknown
//! header extensions are never written. Tests inject a crash at every write
//! and sync and check each outcome with QEMU.

mod data;
mod header;
mod merge;
mod open;
mod ops;
mod plan;
pub mod refcounts;
mod release;
pub mod repair;
mod transaction;

pub use merge::MergeSource;
pub use open::{open_path, open_rw};
pub use ops::{default_granularity, granularity_bits};
pub use transaction::Transaction;
