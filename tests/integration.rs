//! One integration test binary (style: one binary, modules by scope).
//!
//! - `fixtures`: every committed fixture against the records QEMU made (no QEMU needed).
//! - `cli`: the command-line contract on fixtures (exit codes, one-line errors, JSON shapes).
//! - `fuzz_found`: one regression per finding of the cargo-fuzz targets in `fuzz/`.
//! - `live`: images generated now with QEMU tools, compared with QEMU's answers
//!   (skipped with a visible message when QEMU is missing, unless
//!   `QCOW2_BITMAP_REQUIRE_QEMU=1`, which `.ci/run` sets).
//! - `guest_fixtures`: the guest-data fixtures against QEMU's records (map, bytes, info).
//! - `guest_live`: random chains made now with QEMU: `map` and the guest bytes
//!   against `qemu-img map` and `qemu-img convert -O raw`.
//! - `guest_hostile`: the guest-data path (`map`, `guest::Chain` reads) on
//!   patched QEMU-made images: every refusal is one line naming the structure,
//!   index and offset; positive controls against `qemu-img` (QEMU needed).
//! - `bounds`: huge-claim images through the binary under `prlimit --as` and a time limit.
//! - `merge_stream`: a merge into an empty target on a 16 TiB image: few large writes, 3 syncs, RSS.
//! - `kill`: SIGKILL write commands at random moments on a 16 TiB image
//!   (`QCOW2_BITMAP_KILL_TRIALS=N` for a long run, `QCOW2_BITMAP_SEED` to replay);
//!   `kill_backup`: the same for `backup` (with and without `--next`), `restore`, `apply`.
//! - `backup`: offline full and incremental backups, restore, apply and verify against
//!   QEMU (compare, check, map, blockdev-backup), refusals and the manifest schema.

#[path = "it/util.rs"]
mod util;

#[path = "it/fixtures.rs"]
mod fixtures;

#[path = "it/cli.rs"]
mod cli;

#[path = "it/live.rs"]
mod live;

#[path = "it/hostile.rs"]
mod hostile;

#[path = "it/write.rs"]
mod write;

#[path = "it/write_qemu.rs"]
mod write_qemu;

#[path = "it/random_ops.rs"]
mod random_ops;

#[path = "it/write_locks.rs"]
mod write_locks;

#[path = "it/repair.rs"]
mod repair;

#[path = "it/guest_hostile.rs"]
mod guest_hostile;

#[path = "it/bounds.rs"]
mod bounds;

#[path = "it/kill.rs"]
mod kill;

#[path = "it/merge_stream.rs"]
mod merge_stream;

#[path = "it/fuzz_found.rs"]
mod fuzz_found;

#[path = "it/guest_live.rs"]
mod guest_live;

#[path = "it/guest_fixtures.rs"]
mod guest_fixtures;

#[path = "it/kill_backup.rs"]
mod kill_backup;

#[path = "it/backup.rs"]
mod backup;
