//! Image locks against real QEMU processes: QEMU holders must block our
//! conflicting [`lock`] calls, and our locks must block conflicting QEMU opens.
//!
//! Needs `qemu-img`, `qemu-io`, `qemu-nbd` and `qemu-storage-daemon` on `PATH`.
//! Without them each test prints `SKIPPED: <tool> not found` and passes, unless
//! `QCOW2_BITMAP_REQUIRE_QEMU=1` is set, in which case it fails.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use qcow2_bitmap::ErrorKind;
use qcow2_bitmap::lock::{Access, lock};

const TOOLS: [&str; 4] = ["qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon"];

/// Whether `name` is an executable on `PATH`; prints a visible SKIPPED line
/// when it is not, or panics when `QCOW2_BITMAP_REQUIRE_QEMU=1`.
fn require_tool(name: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false);
    if !found {
        if std::env::var("QCOW2_BITMAP_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("{name} not found and QCOW2_BITMAP_REQUIRE_QEMU=1");
        }
        // Written to the stderr handle, not with `eprintln!`, so that libtest's
        // output capture does not hide it.
        let _ = writeln!(std::io::stderr(), "SKIPPED: {name} not found");
    }
    found
}

fn require_qemu() -> bool {
    TOOLS.iter().all(|t| require_tool(t))
}

/// A scratch directory with a fresh 1 MiB qcow2 image.
struct Scratch {
    dir: tempfile::TempDir,
    img: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.qcow2");
        let out = run(Command::new("qemu-img")
            .args(["create", "-f", "qcow2"])
            .arg(&img)
            .arg("1M"));
        assert!(out.status.success(), "qemu-img create: {}", stderr(&out));
        Scratch { dir, img }
    }

    fn img_str(&self) -> &str {
        self.img.to_str().unwrap()
    }

    fn open(&self) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.img)
            .unwrap()
    }

    fn sock(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Kills and reaps the child when dropped, even when the test panics.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Holder {
    fn spawn(cmd: &mut Command) -> Holder {
        Holder(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }

    /// Waits (at most 10 s) until exactly `expected` bytes of `img` are
    /// locked, failing early if the holder exits.
    fn wait_for_locks(&mut self, img: &Path, expected: &[u64]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = locked_bytes(img);
            if seen == expected {
                return;
            }
            if let Some(status) = self.0.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.0.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("holder exited with {status} before locking: {err}");
            }
            assert!(
                Instant::now() < deadline,
                "holder locked {seen:?}, expected {expected:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn qsd(s: &Scratch, read_only: bool) -> Holder {
    let ro = if read_only { ",read-only=on" } else { "" };
    let sock = s.sock(if read_only {
        "qsd-ro.sock"
    } else {
        "qsd-rw.sock"
    });
    Holder::spawn(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={}{ro}",
                s.img_str()
            ))
            .arg("--blockdev")
            .arg(format!("driver=qcow2,node-name=q0,file=f0{ro}"))
            .arg("--chardev")
            .arg(format!(
                "socket,id=m0,path={},server=on,wait=off",
                sock.display()
            ))
            .args(["--monitor", "chardev=m0"]),
    )
}

fn qemu_nbd_ro(s: &Scratch) -> Holder {
    Holder::spawn(
        Command::new("qemu-nbd")
            .args(["-r", "-f", "qcow2", "-k"])
            .arg(s.sock("nbd.sock"))
            .arg(&s.img),
    )
}

/// Runs a short QEMU command with a 20 s bound.
fn run(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} timed out");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a QEMU tool failed because of a lock.
fn assert_lock_failure(what: &str, out: &Output) {
    let err = stderr(out);
    assert!(!out.status.success(), "{what} succeeded despite our lock");
    assert!(
        err.contains("lock") && err.contains("Is another process using the image"),
        "{what}: {err}"
    );
}

fn assert_success(what: &str, out: &Output) {
    assert!(out.status.success(), "{what} failed: {}", stderr(out));
}

fn qemu_io(args: &[&str], img: &Path) -> Output {
    run(Command::new("qemu-io")
        .args(args)
        .args(["-f", "qcow2", "-c", "read 0 512"])
        .arg(img))
}

fn qemu_img(args: &[&str], img: &Path) -> Output {
    run(Command::new("qemu-img").args(args).arg(img))
}

fn bitmap_add(img: &Path) -> Output {
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(img)
        .arg("b0"))
}

/// Waits (at most 5 s) until no OFD lock remains on `img`.
///
/// Dropping a [`File`] releases its locks at once unless a child process is
/// between `fork` and `exec` (other tests spawn QEMU in parallel): the child
/// then holds a copy of the descriptor, close-on-exec or not, for a moment.
fn wait_released(img: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !locked_bytes(img).is_empty() {
        assert!(
            Instant::now() < deadline,
            "locks not released: {:?}",
            locked_bytes(img)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// OFD-locked bytes on `img`'s inode, from /proc/locks, ascending.
fn locked_bytes(img: &Path) -> Vec<u64> {
    let ino = std::fs::metadata(img).unwrap().ino();
    let suffix = format!(":{ino}");
    let text = std::fs::read_to_string("/proc/locks").unwrap();
    let mut bytes = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 8 && f[1] == "OFDLCK" && f[5].ends_with(&suffix) {
            bytes.extend(f[6].parse::<u64>().unwrap()..=f[7].parse::<u64>().unwrap());
        }
    }
    bytes.sort_unstable();
    bytes
}

const RW_BYTES: [u64; 5] = [100, 101, 103, 201, 203];
const RO_BYTES: [u64; 3] = [100, 201, 203];

fn expect_locked(s: &Scratch, access: Access, needle: &str) {
    let f = s.open();
    let e = lock(&f, s.img_str(), access).expect_err("lock should conflict with QEMU");
    assert_eq!(e.kind(), ErrorKind::Locked);
    let text = e.to_string();
    assert!(
        text.starts_with(s.img_str()) && text.contains(needle),
        "{text}"
    );
}

#[test]
fn qemu_writer_blocks_read_and_write_but_not_force_share() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let mut h = qsd(&s, false);
    h.wait_for_locks(&s.img, &RW_BYTES);
    expect_locked(&s, Access::Read, "failed to get shared \"write\" lock");
    expect_locked(&s, Access::Write, "failed to get \"write\" lock");
    let f = s.open();
    let l = lock(&f, s.img_str(), Access::ReadForceShare).unwrap();
    assert_eq!(l.locked_bytes(), &[100]);
}

#[test]
fn qemu_readers_block_write_but_not_read() {
    if !require_qemu() {
        return;
    }
    for name in ["qsd read-only", "qemu-nbd -r"] {
        let s = Scratch::new();
        let mut h = if name == "qemu-nbd -r" {
            qemu_nbd_ro(&s)
        } else {
            qsd(&s, true)
        };
        h.wait_for_locks(&s.img, &RO_BYTES);
        expect_locked(&s, Access::Write, "failed to get \"write\" lock");
        let (a, b) = (s.open(), s.open());
        let r = lock(&a, s.img_str(), Access::Read).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.locked_bytes(), &RO_BYTES);
        lock(&b, s.img_str(), Access::ReadForceShare).unwrap();
    }
}

#[test]
fn our_locks_take_the_same_bytes_as_qemu() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    for (access, bytes) in [
        (Access::Write, &RW_BYTES[..]),
        (Access::Read, &RO_BYTES[..]),
    ] {
        let f = s.open();
        let l = lock(&f, s.img_str(), access).unwrap();
        assert_eq!(l.locked_bytes(), bytes);
        assert_eq!(locked_bytes(&s.img), bytes);
        drop(f);
        wait_released(&s.img);
    }
}

#[test]
fn our_write_lock_blocks_qemu_until_released() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let f = s.open();
    lock(&f, s.img_str(), Access::Write).unwrap();

    assert_lock_failure("qemu-io", &qemu_io(&[], &s.img));
    assert_lock_failure("qemu-io -r", &qemu_io(&["-r"], &s.img));
    assert_lock_failure("qemu-img bitmap --add", &bitmap_add(&s.img));
    assert_lock_failure("qemu-img info", &qemu_img(&["info"], &s.img));
    assert_success("qemu-img info -U", &qemu_img(&["info", "-U"], &s.img));
    assert_success("qemu-io -r -U", &qemu_io(&["-r", "-U"], &s.img));

    drop(f);
    wait_released(&s.img);
    assert_success("qemu-img bitmap --add after release", &bitmap_add(&s.img));
}

#[test]
fn our_read_lock_blocks_qemu_writers_only() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let f = s.open();
    lock(&f, s.img_str(), Access::Read).unwrap();
    assert_lock_failure("qemu-io", &qemu_io(&[], &s.img));
    assert_lock_failure("qemu-img bitmap --add", &bitmap_add(&s.img));
    assert_success("qemu-io -r", &qemu_io(&["-r"], &s.img));
    assert_success("qemu-img info", &qemu_img(&["info"], &s.img));
}

#[test]
fn our_force_share_lock_blocks_nobody() {
    if !require_qemu() {
        return;
    }
    let s = Scratch::new();
    let f = s.open();
    lock(&f, s.img_str(), Access::ReadForceShare).unwrap();
    assert_success("qemu-io", &qemu_io(&[], &s.img));
    assert_success("qemu-img bitmap --add", &bitmap_add(&s.img));
}
