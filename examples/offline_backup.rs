//! An offline incremental backup cycle with the library, the VM shut down:
//! a full backup, a checkpoint, guest writes (made here with `qemu-io`, as a
//! stand-in for the VM), an incremental backup with checkpoint rotation in
//! one transaction, the dirty data as a backup program with its own storage
//! would take it, a restore, and a verify.
//!
//! `cargo run --release --example offline_backup -- /tmp/backup-demo`

use qcow2_bitmap::backup::{self, BackupOptions, DirtyData, OutputFormat, Piece, Then};
use qcow2_bitmap::guest::Chain;
use qcow2_bitmap::lock::Access;
use qcow2_bitmap::read::open_path;
use std::path::Path;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: offline_backup WORKDIR (needs qemu-img and qemu-io)");
        return ExitCode::from(1);
    };
    match run(Path::new(&dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("offline_backup: {e}");
            ExitCode::from(1)
        }
    }
}

/// The "VM": qemu-io writes into the disk while no QEMU runs it.
fn guest_writes(disk: &Path, cmds: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(disk).output()?;
    if !out.status.success() {
        return Err(format!("qemu-io: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

fn run(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let disk = dir.join("disk.qcow2");
    for f in [
        "disk.qcow2",
        "full.qcow2",
        "full.qcow2.json",
        "inc1.qcow2",
        "inc1.qcow2.json",
        "restored.qcow2",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("256M")
        .status()?;
    if !st.success() {
        return Err("qemu-img create failed".into());
    }
    guest_writes(&disk, &["write -P 0xaa 0 16M", "write -P 0xbb 100M 4M"])?;

    // 1. Full backup, then the first checkpoint (one transaction).
    let full = dir.join("full.qcow2");
    let s = backup::backup(&disk, &full, &BackupOptions::default(), None)?;
    println!(
        "full backup: {} data bytes in {} extents",
        s.doc.data_bytes,
        s.doc.extents.len()
    );
    let mut tx = qcow2_bitmap::write::open_path(&disk)?;
    tx.add("ckpt-1", None, true)?;
    tx.commit()?;

    // 2. The guest runs: writes, a zero write and a discard (TRIM).
    guest_writes(
        &disk,
        &[
            "write -P 0x11 1M 64k",
            "write -z 100M 1M",
            "discard 8M 64k",
            "write -P 0x22 200M 4k",
        ],
    )?;

    // 3. What changed, as a backup program with its own storage takes it.
    {
        let image = open_path(&disk, Access::Read)?;
        let chain = Chain::open(&disk, Access::Read)?;
        let mut dirty = DirtyData::new(&chain, &image, "ckpt-1", 4 << 20)?;
        let (mut data, mut zeros) = (0u64, 0u64);
        while let Some(piece) = dirty.next_piece()? {
            match piece {
                Piece::Data { bytes, .. } => data += bytes.len() as u64,
                Piece::Zero { len, .. } => zeros += len,
            }
        }
        println!("dirty since ckpt-1: {data} bytes of data, {zeros} bytes now zero");
    }

    // 4. Incremental backup over the full one, rotating ckpt-1 -> ckpt-2.
    let inc = dir.join("inc1.qcow2");
    let opts = BackupOptions {
        bitmap: Some("ckpt-1".into()),
        backing: Some("full.qcow2".into()),
        format: OutputFormat::Qcow2,
        next: Some(("ckpt-2".into(), Then::Remove)),
        ..BackupOptions::default()
    };
    let s = backup::backup(&disk, &inc, &opts, None)?;
    println!(
        "incremental: {} data bytes, {} zero bytes; bitmaps now: {:?}",
        s.doc.data_bytes,
        s.doc.zero_bytes,
        open_path(&disk, Access::Read)?
            .bitmaps()
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
    );

    // 5. A synthetic full backup, and a verify of the chain against the disk.
    let restored = dir.join("restored.qcow2");
    backup::restore::restore(&inc, &restored, OutputFormat::Qcow2, None)?;
    let report = backup::verify::verify(&inc, Some(&disk))?;
    println!(
        "restore written; verify: ok={} source-equal={:?}",
        report.ok, report.source_equal
    );
    if !report.ok {
        return Err(format!("verify failed: {:?}", report.members).into());
    }
    Ok(())
}
