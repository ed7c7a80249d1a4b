//! The write path: mutation of an image, and the order in which bytes reach
//! the disk so that a crash at any moment leaves at worst leaked clusters.
//!
//! # Commit protocol
//!
//! Refcounts may be too high (a leak, harmless, `qemu-img check -r leaks`
//! fixes it) but never too low for a cluster something references (a
//! corruption). Hence:
//!
//! 1. Allocate clusters ([`refcounts::Refcounts::allocate`]): refcounts are
//!    raised in memory only; nothing is written yet.
//! 2. Write the new data into the allocated (so far unreferenced) clusters.
//! 3. [`refcounts::Refcounts::flush_increments`]: write refcount blocks
//!    (which by now only *raise* on-disk refcounts) and any new refcount
//!    table, `sync`; a relocated refcount table is committed by its own
//!    12-byte header write at offset 48 plus `sync`.
//! 4. The caller switches the structure that references the new clusters
//!    (header, extension, directory) and syncs: the commit point.
//! 5. Old clusters, queued with [`refcounts::Refcounts::queue_free`], are
//!    released by [`refcounts::Refcounts::apply_decrements`], which writes
//!    the lowered refcounts and syncs.
//!
//! A crash before 3 completes leaves the old image (new clusters have
//! refcount 0 and are invisible); between 3 and 4 the new clusters leak; between
//! 4 and 5 the old clusters leak.

pub mod refcounts;
