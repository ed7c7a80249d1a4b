//! QEMU-compatible image locks: this module owns the byte-range locks that
//! keep this crate and QEMU processes from using one image in conflicting ways.
//!
//! # The protocol (observed, not copied)
//!
//! QEMU's `file-posix` driver expresses its block-layer permissions as Linux
//! open-file-description (OFD) byte-range locks, always shared (`F_RDLCK`) and
//! one byte long:
//!
//! - for each permission bit `i` it **holds**, a lock on byte `100 + i`;
//! - for each permission bit `i` it **does not share**, a lock on byte `200 + i`.
//!
//! | bit | permission        | held byte | unshared byte |
//! |-----|-------------------|-----------|---------------|
//! | 0   | `consistent read` | 100       | 200           |
//! | 1   | `write`           | 101       | 201           |
//! | 2   | `write unchanged` | 102       | 202           |
//! | 3   | `resize`          | 103       | 203           |
//!
//! Shared locks never block each other, so taking them always succeeds;
//! conflicts are found with `F_OFD_GETLK` probes (asking "could I take an
//! exclusive lock on this byte?"): for each permission it holds, whether
//! anyone locks `200 + i` (someone refuses to share it), and for each
//! permission it refuses to share, whether anyone locks `100 + i` (someone
//! holds it). QEMU takes its bytes first and probes afterwards, so two racing
//! openers see each other and at least one fails; on failure it releases the
//! bytes again.
//!
//! Observed with QEMU 10.0.2 on Linux (ext4). "Locked" comes from
//! `/proc/locks` (`OFDLCK ADVISORY READ` lines) while the holder runs, or from
//! `strace -e fcntl` for short-lived tools (marked *); "probed" from `strace`
//! (`F_OFD_GETLK` with `F_WRLCK`), where traced. No byte above 103 or 203 was
//! ever locked or probed, so bits 0..=3 are the whole permission set.
//!
//! | holder                                                        | locked                | probed                |
//! |---------------------------------------------------------------|-----------------------|-----------------------|
//! | `qemu-storage-daemon`, qcow2 over file, read-write            | 100 101 103 201 203   |                       |
//! | `qemu-nbd` (read-write)                                       | 100 101 103 201 203   |                       |
//! | `qemu-io` (read-write, interactive and `-c`)                  | 100 101 103 201 203   | 200 201 203 101 103   |
//! | `qemu-img bitmap --add` *                                     | 100 101 103 201 203   | 200 201 203 101 103   |
//! | `qemu-storage-daemon`, `read-only=on` on both nodes           | 100 201 203           |                       |
//! | `qemu-nbd -r`                                                 | 100 201 203           |                       |
//! | `qemu-io -r`                                                  | 100 201 203           | 200 101 103           |
//! | `qemu-img info` (no `-U`) *                                   | 201 203               | 101 103               |
//! | `qemu-storage-daemon`, read-only, `force-share=on` on qcow2 node only | 100 201 203   |                       |
//! | `qemu-storage-daemon`, read-only, `force-share=on` on both nodes | 100                |                       |
//! | `qemu-io -r -U`                                               | 100                   | 200                   |
//! | `qemu-img info -U` *                                          | none                  | none                  |
//!
//! Every traced tool first probes the whole file once (`F_OFD_GETLK`, start 0,
//! length 0) to learn whether OFD locks work, then locks, then probes.
//! A read-write qcow2 open holds consistent read, write and resize (not
//! write unchanged) and refuses to share write and resize. A read-only open
//! refuses to share write and resize too, which is why a read-write QEMU
//! cannot start while `qemu-img info` or a read-only NBD export runs.
//!
//! # What [`lock`] takes
//!
//! | [`Access`]                  | modelled on            | locks         | probes                |
//! |-----------------------------|------------------------|---------------|-----------------------|
//! | [`Access::Read`]            | `qemu-io -r`, `qemu-nbd -r` | 100 201 203 | 200 101 103        |
//! | [`Access::ReadForceShare`]  | `qemu-io -r -U`        | 100           | none (see below)      |
//! | [`Access::Write`]           | read-write qcow2 open  | 100 101 103 201 203 | 200 201 203 101 103 |
//!
//! [`Access::ReadForceShare`] never fails because of other holders. QEMU's
//! `-U` additionally probes byte 200 (someone refusing to share consistent
//! read, which ordinary QEMU opens never do); it is deliberately skipped, in
//! keeping with force-share meaning "read whatever is there".
//!
//! # Lifetime and release
//!
//! OFD locks belong to the open file description, not to the process or to
//! [`ImageLock`]: they are released when the last descriptor referring to it
//! is closed (dropping the [`File`] and every `try_clone` of it). Unlike
//! classic POSIX `F_SETLK` locks, two descriptions opened by the same process
//! conflict with each other, and closing an unrelated descriptor of the same
//! file does not drop them. A child process that is between `fork` and `exec`
//! also holds a copy of every descriptor (close-on-exec ones included), so a
//! process that spawns children concurrently may see the release lag a drop
//! by that short window. Call [`lock`] once per opened file: a failed call
//! releases the bytes it tried to take, which would include bytes an earlier
//! call on the same description held.
//!
//! # Filesystems without OFD locks
//!
//! When the kernel lacks OFD locks (`EINVAL`), QEMU's default `locking=auto`
//! simply does not lock (that is what the initial whole-file probe is for;
//! `locking=on` falls back to POSIX locks with a warning). When the
//! filesystem refuses byte-range locks (`ENOTSUP`/`EOPNOTSUPP`), QEMU fails
//! the open with "Failed to lock byte 100" unless `locking=off` is given.
//! [`lock`] degrades in both cases, by design of this crate: it returns `Ok`
//! with [`ImageLock::locks_unavailable`] set and no bytes locked, and the
//! caller decides whether to warn or refuse. Other errors (`EBADF` for a
//! descriptor not open for reading, `ENOLCK`, ...) are [`ErrorKind::Io`]
//! errors. On targets other than Linux and Android locks are always
//! unavailable.

use std::fs::File;
use std::io;

use crate::error::{Error, ErrorKind, Result};

/// How the image is going to be used; selects the QEMU permissions to lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-only, like `qemu-io -r`: holds consistent read and refuses to share
    /// write and resize. Fails while a QEMU writer has the image open, and a
    /// QEMU writer cannot open it while this lock is held.
    Read,
    /// Read-only with force-share, like `-U`: holds consistent read, refuses
    /// nothing, and never fails because of other holders.
    ReadForceShare,
    /// Read-write, like a QEMU read-write qcow2 open: holds consistent read,
    /// write and resize, refuses to share write and resize. Fails while any
    /// QEMU process (reader without `-U`, or writer) has the image open.
    Write,
}

/// One QEMU block-layer permission bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Perm {
    ConsistentRead = 0,
    Write = 1,
    Resize = 3,
}

impl Perm {
    /// The name QEMU uses in its lock error messages.
    fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::Resize => "resize",
        }
    }

    /// The byte locked by a holder of this permission.
    fn held_byte(self) -> u64 {
        HELD_BASE + self as u64
    }

    /// The byte locked by someone who refuses to share this permission.
    fn unshared_byte(self) -> u64 {
        UNSHARED_BASE + self as u64
    }
}

/// First byte of the "holds permission i" range.
const HELD_BASE: u64 = 100;
/// First byte of the "does not share permission i" range.
const UNSHARED_BASE: u64 = 200;

/// The permissions an [`Access`] holds and refuses to share, and whether to probe.
struct Plan {
    held: &'static [Perm],
    unshared: &'static [Perm],
    probe: bool,
}

impl Access {
    fn plan(self) -> Plan {
        use Perm::*;
        match self {
            Access::Read => Plan {
                held: &[ConsistentRead],
                unshared: &[Write, Resize],
                probe: true,
            },
            Access::ReadForceShare => Plan {
                held: &[ConsistentRead],
                unshared: &[],
                probe: false,
            },
            Access::Write => Plan {
                held: &[ConsistentRead, Write, Resize],
                unshared: &[Write, Resize],
                probe: true,
            },
        }
    }
}

/// A record of the locks [`lock`] took; it owns nothing.
///
/// The locks live as long as the open file description of the [`File`] passed
/// to [`lock`]; dropping this value does not release them (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLock {
    access: Access,
    bytes: Vec<u64>,
    unavailable: bool,
}

impl ImageLock {
    /// The access the locks were taken for.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The byte offsets holding a shared lock, ascending; empty when
    /// [`ImageLock::locks_unavailable`].
    pub fn locked_bytes(&self) -> &[u64] {
        &self.bytes
    }

    /// True when the kernel or filesystem does not support OFD locks and the
    /// image was opened without any lock (see the module docs).
    pub fn locks_unavailable(&self) -> bool {
        self.unavailable
    }
}

/// Takes QEMU's shared byte-range locks on `file` for `access`.
///
/// `file` must be open for reading. `path_for_messages` only names the image
/// in errors. See the module docs for the exact bytes.
///
/// # Errors
/// [`ErrorKind::Locked`] when another open file description (another process,
/// or another `open` of the same file in this process) holds a conflicting
/// lock; the message names the permission and the byte, e.g.
/// `disk.qcow2: failed to get "write" lock: image is in use by another process
/// (conflicting lock on byte 201)`. [`ErrorKind::Io`] when `fcntl` fails for
/// another reason. Unsupported locking is not an error (see
/// [`ImageLock::locks_unavailable`]).
pub fn lock(file: &File, path_for_messages: &str, access: Access) -> Result<ImageLock> {
    let plan = access.plan();
    let mut bytes: Vec<u64> = plan.held.iter().map(|p| p.held_byte()).collect();
    bytes.extend(plan.unshared.iter().map(|p| p.unshared_byte()));
    bytes.sort_unstable();

    // Unsupported locking degrades to "no locks"; anything else is an I/O error.
    let give_up = |e: io::Error| {
        if is_unsupported(&e) {
            Ok(ImageLock {
                access,
                bytes: Vec::new(),
                unavailable: true,
            })
        } else {
            Err(Error::io(
                format!("{path_for_messages}: image lock"),
                None,
                e,
            ))
        }
    };

    // Take first, then probe: two racing openers then see each other.
    for (i, &byte) in bytes.iter().enumerate() {
        if let Err(e) = ofd_fcntl(file, Op::SetShared, byte) {
            release(file, &bytes[..i]);
            return give_up(e);
        }
    }

    if plan.probe {
        // Someone refuses to share a permission we hold, then someone holds a
        // permission we refuse to share (QEMU's order).
        let probes = plan
            .held
            .iter()
            .map(|&p| (p, p.unshared_byte(), false))
            .chain(plan.unshared.iter().map(|&p| (p, p.held_byte(), true)));
        for (perm, byte, shared) in probes {
            let conflict = match ofd_fcntl(file, Op::Probe, byte) {
                Ok(conflict) => conflict,
                Err(e) => {
                    release(file, &bytes);
                    return give_up(e);
                }
            };
            if conflict {
                release(file, &bytes);
                return Err(locked_error(path_for_messages, perm, shared, byte));
            }
        }
    }

    Ok(ImageLock {
        access,
        bytes,
        unavailable: false,
    })
}

/// The one-line conflict error, worded like QEMU's
/// `Failed to get shared "write" lock` / `Failed to get "write" lock`.
fn locked_error(path: &str, perm: Perm, shared: bool, byte: u64) -> Error {
    let shared = if shared { "shared " } else { "" };
    let message = format!(
        "failed to get {shared}\"{}\" lock: image is in use by another process \
         (conflicting lock on byte {byte})",
        perm.name()
    );
    Error::new(ErrorKind::Locked, path, None, message)
}

/// Releases `bytes` after a failed attempt; errors are ignored (closing the
/// file releases everything anyway).
fn release(file: &File, bytes: &[u64]) {
    for &byte in bytes {
        let _ = ofd_fcntl(file, Op::Unlock, byte);
    }
}

/// Errors meaning "no OFD locks here": old kernels (`EINVAL`) and filesystems
/// that refuse byte-range locks (`ENOTSUP`/`EOPNOTSUPP`).
fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == libc::EINVAL || c == libc::ENOTSUP || c == libc::EOPNOTSUPP)
}

/// One single-byte OFD lock operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// `F_OFD_SETLK` with `F_RDLCK`.
    SetShared,
    /// `F_OFD_SETLK` with `F_UNLCK`.
    Unlock,
    /// `F_OFD_GETLK` with `F_WRLCK`: is any other description locking the byte?
    Probe,
}

/// Runs `op` on the single byte `byte` of `file`'s open file description.
/// Returns whether a conflicting lock exists (always false except for `Probe`).
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
fn ofd_fcntl(file: &File, op: Op, byte: u64) -> io::Result<bool> {
    use std::os::fd::AsRawFd;

    let (cmd, l_type) = match op {
        Op::SetShared => (libc::F_OFD_SETLK, libc::F_RDLCK),
        Op::Unlock => (libc::F_OFD_SETLK, libc::F_UNLCK),
        Op::Probe => (libc::F_OFD_GETLK, libc::F_WRLCK),
    };
    // SAFETY: `struct flock` is a plain C struct of integers (plus, on some
    // targets, integer padding), for which all-zero bytes are a valid value;
    // a zero `l_pid` is also what OFD commands require.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as _;
    fl.l_whence = libc::SEEK_SET as _;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: the descriptor is valid for the duration of the call because
    // `file` is borrowed; `fl` is an initialised, exclusively borrowed `struct
    // flock`, which F_OFD_SETLK only reads and F_OFD_GETLK overwrites in place,
    // and the kernel keeps no pointer to it after the call returns.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(op == Op::Probe && i64::from(fl.l_type) != i64::from(libc::F_UNLCK))
}

/// Without OFD locks every operation is unsupported; [`lock`] degrades.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn ofd_fcntl(_file: &File, op: Op, byte: u64) -> io::Result<bool> {
    let _ = (op, byte);
    Err(io::Error::from_raw_os_error(libc::ENOTSUP))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::MetadataExt;

    fn image() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        f
    }

    fn open(img: &tempfile::NamedTempFile) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(img.path())
            .unwrap()
    }

    /// Bytes locked on `img` by anyone, from /proc/locks (OFD lines only).
    fn proc_locks(img: &tempfile::NamedTempFile) -> Vec<u64> {
        let ino = img.as_file().metadata().unwrap().ino();
        let suffix = format!(":{ino}");
        let text = std::fs::read_to_string("/proc/locks").unwrap();
        let mut bytes = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 8 && f[1] == "OFDLCK" && f[5].ends_with(&suffix) {
                let (s, e): (u64, u64) = (f[6].parse().unwrap(), f[7].parse().unwrap());
                bytes.extend(s..=e);
            }
        }
        bytes.sort_unstable();
        bytes
    }

    /// Waits (at most 5 s) until exactly `expected` is locked on `img`. A drop
    /// releases at once unless another test thread is forking a child at that
    /// moment (the child briefly holds a copy of every descriptor).
    fn wait_for(img: &tempfile::NamedTempFile, expected: &[u64]) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while proc_locks(img) != expected {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                proc_locks(img)
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn wait_released(img: &tempfile::NamedTempFile) {
        wait_for(img, &[]);
    }

    fn expect_locked(r: Result<ImageLock>, needle: &str) {
        let e = r.expect_err("lock should conflict");
        assert_eq!(e.kind(), ErrorKind::Locked);
        let text = e.to_string();
        assert!(text.starts_with("img: failed to get "), "{text}");
        assert!(text.contains(needle), "{text}");
        assert!(text.contains("lock"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn bytes_per_access_match_qemu() {
        let img = image();
        for (access, bytes) in [
            (Access::Read, vec![100, 201, 203]),
            (Access::ReadForceShare, vec![100]),
            (Access::Write, vec![100, 101, 103, 201, 203]),
        ] {
            let f = open(&img);
            let l = lock(&f, "img", access).unwrap();
            assert!(!l.locks_unavailable());
            assert_eq!(l.access(), access);
            assert_eq!(l.locked_bytes(), bytes.as_slice());
            assert_eq!(proc_locks(&img), bytes);
            drop(f);
            wait_released(&img);
        }
    }

    #[test]
    fn read_and_read_share() {
        let img = image();
        let (a, b) = (open(&img), open(&img));
        lock(&a, "img", Access::Read).unwrap();
        lock(&b, "img", Access::Read).unwrap();
    }

    #[test]
    fn read_then_write_fails() {
        let img = image();
        let (a, b) = (open(&img), open(&img));
        lock(&a, "img", Access::Read).unwrap();
        expect_locked(
            lock(&b, "img", Access::Write),
            "\"write\" lock: image is in use",
        );
        // The reader's bytes are still there, the failed writer's are gone.
        assert_eq!(proc_locks(&img), vec![100, 201, 203]);
    }

    #[test]
    fn write_then_read_fails() {
        let img = image();
        let (a, b) = (open(&img), open(&img));
        lock(&a, "img", Access::Write).unwrap();
        expect_locked(
            lock(&b, "img", Access::Read),
            "shared \"write\" lock: image is in use by another process \
             (conflicting lock on byte 101)",
        );
        assert_eq!(proc_locks(&img), vec![100, 101, 103, 201, 203]);
    }

    #[test]
    fn write_then_write_fails() {
        let img = image();
        let (a, b) = (open(&img), open(&img));
        lock(&a, "img", Access::Write).unwrap();
        expect_locked(
            lock(&b, "img", Access::Write),
            "(conflicting lock on byte 201)",
        );
    }

    #[test]
    fn force_share_always_succeeds() {
        let img = image();
        let (a, b, c) = (open(&img), open(&img), open(&img));
        lock(&a, "img", Access::Write).unwrap();
        lock(&b, "img", Access::ReadForceShare).unwrap();
        drop(a);
        wait_for(&img, &[100]);
        // A force-share reader does not keep a writer out (as with QEMU's -U).
        lock(&c, "img", Access::Write).unwrap();
        let d = open(&img);
        lock(&d, "img", Access::ReadForceShare).unwrap();
    }

    #[test]
    fn dropping_the_file_releases() {
        let img = image();
        let a = open(&img);
        lock(&a, "img", Access::Write).unwrap();
        drop(a);
        wait_released(&img);
        let b = open(&img);
        lock(&b, "img", Access::Write).unwrap();
    }

    #[test]
    fn clone_keeps_the_lock_until_all_descriptors_close() {
        let img = image();
        let a = open(&img);
        lock(&a, "img", Access::Write).unwrap();
        let a2 = a.try_clone().unwrap();
        drop(a);
        expect_locked(lock(&open(&img), "img", Access::Read), "byte 101");
        drop(a2);
        wait_released(&img);
        lock(&open(&img), "img", Access::Read).unwrap();
    }

    #[test]
    fn failed_attempt_leaves_no_bytes_behind() {
        let img = image();
        let (a, b) = (open(&img), open(&img));
        lock(&a, "img", Access::Write).unwrap();
        assert!(lock(&b, "img", Access::Read).is_err());
        drop(a);
        wait_released(&img);
        // `b` is still open; had it kept 201/203, this writer would fail.
        let c = open(&img);
        lock(&c, "img", Access::Write).unwrap();
    }

    #[test]
    fn unsupported_errnos_degrade() {
        for code in [libc::EINVAL, libc::ENOTSUP, libc::EOPNOTSUPP] {
            assert!(is_unsupported(&io::Error::from_raw_os_error(code)));
        }
        assert!(!is_unsupported(&io::Error::from_raw_os_error(libc::EBADF)));
        assert!(!is_unsupported(&io::Error::from_raw_os_error(libc::ENOLCK)));
    }

    #[test]
    fn write_only_descriptor_is_an_io_error() {
        let img = image();
        let f = OpenOptions::new().write(true).open(img.path()).unwrap();
        let e = lock(&f, "img", Access::Read).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().starts_with("img: image lock: "), "{e}");
    }
}
