//! Locks against real QEMU processes: while a read-write QEMU holder
//! (qemu-storage-daemon, qemu-nbd) has the image, every write command and
//! every read command without `-U` fails with a one-line lock error and the
//! image keeps its bytes (`-U` reads it and sees in-use bitmaps); while a
//! read-only holder has it, writes fail and reads work; while our write lock
//! is held, `qemu-img bitmap`, `qemu-io` and `qemu-img info` cannot open the
//! image, and can once it is released.

use crate::util::*;
use qcow2_bitmap::lock::{self, Access};
use qcow2_bitmap::read::{BitmapState, Image};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOOLS: [&str; 4] = ["qemu-img", "qemu-storage-daemon", "qemu-nbd", "qemu-io"];
const FIXTURE: &str = "several.qcow2";
/// QEMU's lock bytes for a read-write and a read-only qcow2 open (see src/lock.rs).
const RW_BYTES: [u64; 5] = [100, 101, 103, 201, 203];
const RO_BYTES: [u64; 3] = [100, 201, 203];

/// Bytes of `path` under an OFD lock, from /proc/locks (by inode).
fn locked_bytes(path: &Path) -> Vec<u64> {
    let suffix = format!(":{}", std::fs::metadata(path).unwrap().ino());
    let text = std::fs::read_to_string("/proc/locks").unwrap();
    let mut bytes = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 8 && f[1] == "OFDLCK" && f[5].ends_with(&suffix) {
            if let (Ok(s), Ok(e)) = (f[6].parse::<u64>(), f[7].parse::<u64>()) {
                bytes.extend(s..=e);
            }
        }
    }
    bytes.sort_unstable();
    bytes.dedup();
    bytes
}

/// Polls `f` every 10 ms for at most 10 s.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    StorageDaemonRw,
    StorageDaemonRo,
    NbdRw,
    NbdRo,
}

impl Kind {
    fn writable(self) -> bool {
        matches!(self, Kind::StorageDaemonRw | Kind::NbdRw)
    }
}

/// A QEMU process holding an image; killed on drop.
struct Holder {
    child: Child,
    kind: Kind,
    log: PathBuf,
}

impl Holder {
    /// Starts `kind` on `img` and waits until it holds its locks (and, when
    /// read-write, has marked the bitmaps in-use, its last write).
    fn start(kind: Kind, img: &Path, dir: &Path) -> Holder {
        let sock = dir.join(format!("{kind:?}.sock"));
        let log = dir.join(format!("{kind:?}.log"));
        let mut cmd;
        if matches!(kind, Kind::NbdRw | Kind::NbdRo) {
            cmd = Command::new("qemu-nbd");
            cmd.args(["-f", "qcow2", "-k"]).arg(&sock);
            if kind == Kind::NbdRo {
                cmd.arg("-r");
            }
            cmd.arg(img);
        } else {
            let ro = if kind.writable() { "off" } else { "on" };
            let writable = if kind.writable() { "on" } else { "off" };
            cmd = Command::new("qemu-storage-daemon");
            cmd.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=f0,filename={},read-only={ro}",
                    img.display()
                ))
                .arg("--blockdev")
                .arg(format!("driver=qcow2,node-name=q0,file=f0,read-only={ro}"))
                .arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={}", sock.display()))
                .arg("--export")
                .arg(format!("type=nbd,id=e0,node-name=q0,writable={writable}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start {kind:?}: {e}"));
        let mut h = Holder { child, kind, log };
        let want: &[u64] = if kind.writable() {
            &RW_BYTES
        } else {
            &RO_BYTES
        };
        wait_until(&format!("{kind:?} to lock {want:?}"), || {
            h.assert_alive();
            locked_bytes(img) == want
        });
        if kind.writable() {
            wait_until(&format!("{kind:?} to mark the bitmaps in-use"), || {
                let Ok(image) = Image::open(std::fs::read(img).unwrap()) else {
                    return false;
                };
                image
                    .bitmaps()
                    .iter()
                    .all(|b| image.status(b).state == BitmapState::InUse)
            });
        }
        h
    }

    fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{:?} exited ({status}): {}",
                self.kind,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A copy of the fixture in `dir`.
fn copy(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    std::fs::copy(fixture(FIXTURE), &img).unwrap();
    img
}

/// Asserts the contract's lock error: exit 1, nothing on stdout, one line on
/// stderr naming the image and containing `lock`.
fn assert_lock_error(args: &[&str], img: &Path) {
    let o = run(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert!(o.stdout.is_empty(), "{args:?} printed {}", stdout(&o));
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(err.starts_with("qcow2-bitmap: "), "{args:?}: {err}");
    assert!(err.contains("lock"), "{args:?}: {err}");
    assert!(
        err.contains(img.to_str().unwrap()),
        "{args:?}: the error does not name the image: {err}"
    );
}

fn assert_success(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    stdout(&o)
}

/// Every write command, each of which would succeed on an unheld copy.
fn write_commands<'a>(p: &'a str, other: &'a str) -> Vec<Vec<&'a str>> {
    vec![
        vec!["add", p, "new"],
        vec!["add", "-g", "4K", "--disabled", p, "new2"],
        vec!["remove", p, "a"],
        vec!["remove", p, "b", "c"],
        vec!["clear", p, "a"],
        vec!["enable", p, "b"],
        vec!["disable", p, "a"],
        vec!["merge", p, "b", "a"],
        vec!["merge", p, "d", "a", "c"],
        vec!["merge", "--source-image", other, p, "b", "a"],
    ]
}

fn read_commands(p: &str) -> Vec<Vec<&str>> {
    vec![
        vec!["info", p],
        vec!["info", "--json", p],
        vec!["extents", p, "a"],
        vec!["extents", "--all", "--json", p, "c"],
        vec!["hash", p, "b"],
        vec!["dump", p],
        vec!["dump", "--json", p, "--bitmap", "a"],
    ]
}

fn with_force_share<'a>(cmd: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![cmd[0], "-U"];
    v.extend_from_slice(&cmd[1..]);
    v
}

#[test]
fn write_commands_on_an_unheld_copy_succeed() {
    // The control for the tests below: without a holder each command works.
    let dir = tempfile::tempdir().unwrap();
    let other = copy(dir.path(), "other.qcow2");
    for (i, cmd) in write_commands("IMG", other.to_str().unwrap())
        .into_iter()
        .enumerate()
    {
        let img = copy(dir.path(), &format!("free{i}.qcow2"));
        let p = img.to_str().unwrap();
        let args: Vec<&str> = cmd
            .iter()
            .map(|a| if *a == "IMG" { p } else { a })
            .collect();
        assert_success(&args);
        assert!(
            std::fs::read(&img).unwrap() != std::fs::read(fixture(FIXTURE)).unwrap(),
            "{args:?} changed nothing"
        );
        assert_eq!(
            guest_fingerprint_of(&img),
            guest_fingerprint_of(&fixture(FIXTURE)),
            "{args:?} changed guest data"
        );
    }
}

#[test]
fn a_read_write_qemu_holder_locks_out_writes_and_plain_reads() {
    if !qemu_available(
        "a_read_write_qemu_holder_locks_out_writes_and_plain_reads",
        &TOOLS,
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let other = copy(dir.path(), "other.qcow2");
    for kind in [Kind::StorageDaemonRw, Kind::NbdRw] {
        let img = copy(dir.path(), &format!("{kind:?}.qcow2"));
        let p = img.to_str().unwrap();
        let mut holder = Holder::start(kind, &img, dir.path());
        let before = std::fs::read(&img).unwrap();
        for cmd in write_commands(p, other.to_str().unwrap()) {
            assert_lock_error(&cmd, &img);
            assert!(
                std::fs::read(&img).unwrap() == before,
                "{kind:?}: {cmd:?} changed the image"
            );
        }
        for cmd in read_commands(p) {
            assert_lock_error(&cmd, &img);
        }
        // -U reads what is there: QEMU has marked every bitmap in-use.
        let info: serde_json::Value =
            serde_json::from_str(&assert_success(&["info", "-U", "--json", p])).unwrap();
        let states: Vec<&str> = info["bitmaps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["state"].as_str().unwrap())
            .collect();
        assert_eq!(states, ["in-use"; 4], "{kind:?}: {info}");
        for cmd in [
            vec!["info", "-U", p],
            vec!["extents", "-U", "--force", p, "a"],
            vec!["hash", "--force-share", "--force", p, "b"],
            vec!["dump", "-U", p],
            vec!["dump", "-U", "--json", p, "--bitmap", "a"],
        ] {
            assert_success(&cmd);
        }
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{kind:?}: the image changed"
        );
        holder.assert_alive();
        assert_eq!(locked_bytes(&img), RW_BYTES, "{kind:?}");
    }
}

#[test]
fn a_read_only_qemu_holder_locks_out_writes_only() {
    if !qemu_available("a_read_only_qemu_holder_locks_out_writes_only", &TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let other = copy(dir.path(), "other.qcow2");
    for kind in [Kind::NbdRo, Kind::StorageDaemonRo] {
        let img = copy(dir.path(), &format!("{kind:?}.qcow2"));
        let p = img.to_str().unwrap();
        let hash_b = assert_success(&["hash", p, "b"]);
        let mut holder = Holder::start(kind, &img, dir.path());
        for cmd in write_commands(p, other.to_str().unwrap()) {
            assert_lock_error(&cmd, &img);
        }
        // Readers share with a reader, with and without -U.
        for cmd in read_commands(p) {
            assert_success(&cmd);
            assert_success(&with_force_share(&cmd));
        }
        assert_eq!(assert_success(&["hash", p, "b"]), hash_b, "{kind:?}");
        assert!(
            std::fs::read(&img).unwrap() == std::fs::read(fixture(FIXTURE)).unwrap(),
            "{kind:?}: the image changed"
        );
        holder.assert_alive();
        assert_eq!(locked_bytes(&img), RO_BYTES, "{kind:?}");
    }
}

fn qemu(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool).args(args).output().unwrap()
}

/// Asserts `tool args` fails mentioning a lock.
fn assert_qemu_locked_out(tool: &str, args: &[&str]) {
    let o = qemu(tool, args);
    let text = format!("{}{}", stderr(&o), stdout(&o));
    assert!(!o.status.success(), "{tool} {args:?} succeeded: {text}");
    assert!(text.contains("lock"), "{tool} {args:?}: {text}");
}

#[test]
fn our_write_lock_keeps_qemu_out_until_released() {
    if !qemu_available("our_write_lock_keeps_qemu_out_until_released", &TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = copy(dir.path(), "ours.qcow2");
    let p = img.to_str().unwrap();
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let l = lock::lock(&held, p, Access::Write).unwrap();
    assert!(!l.locks_unavailable(), "no OFD locks on this filesystem");
    assert_eq!(locked_bytes(&img), RW_BYTES);

    assert_qemu_locked_out("qemu-img", &["bitmap", "--add", p, "x"]);
    assert_qemu_locked_out("qemu-io", &["-f", "qcow2", "-c", "write 0 4k", p]);
    assert_qemu_locked_out("qemu-io", &["-r", "-f", "qcow2", "-c", "read 0 4k", p]);
    assert_qemu_locked_out("qemu-img", &["info", p]);
    assert_lock_error(&["add", p, "y"], &img);
    assert_lock_error(&["info", p], &img);
    // Force-share readers still get in.
    let o = qemu("qemu-img", &["info", "-U", p]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_success(&["info", "-U", p]);
    assert!(
        std::fs::read(&img).unwrap() == std::fs::read(fixture(FIXTURE)).unwrap(),
        "the image changed while we held it"
    );

    drop(held);
    // The release can lag while another test thread forks a child.
    wait_until("qemu-img bitmap --add after release", || {
        qemu("qemu-img", &["bitmap", "--add", p, "x"])
            .status
            .success()
    });
    let o = qemu("qemu-io", &["-f", "qcow2", "-c", "write 0 4k", p]);
    assert!(o.status.success(), "qemu-io: {}", stderr(&o));
    let o = qemu("qemu-img", &["info", p]);
    assert!(o.status.success(), "qemu-img info: {}", stderr(&o));
    assert!(
        qemu_info_bitmaps(&img).iter().any(|b| b.0 == "x"),
        "qemu-img bitmap --add did not add x"
    );
    let (rc, check) = qemu_check(&img);
    assert_eq!(rc, 0, "{check}");
    // QEMU's write dirtied the enabled bitmaps at 0..4k; ours see it too.
    let out = assert_success(&["extents", "--json", p, "x"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["offset"], 0, "{out}");
    assert!(locked_bytes(&img).is_empty());
}
