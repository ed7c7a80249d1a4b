//! What an incremental backup program does with this crate: open the image
//! read-only, pick the checkpoint bitmap, and list the guest ranges to copy.
//! Falls back to a full backup when the bitmap cannot be trusted.
//!
//! `cargo run --example backup_plan -- fixtures/demo.qcow2 ckpt-2`

use qcow2_bitmap::ErrorKind;
use qcow2_bitmap::lock::Access;
use qcow2_bitmap::read::open_path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(name)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: backup_plan IMAGE BITMAP");
        return ExitCode::from(1);
    };
    match plan(path, name) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("backup_plan: {e}");
            ExitCode::from(1)
        }
    }
}

fn plan(path: &str, name: &str) -> qcow2_bitmap::Result<()> {
    let image = open_path(path.as_ref(), Access::Read)?;
    let bitmap = image.find(name)?;
    let extents = match image.extents(bitmap, None, false) {
        Ok(it) => it,
        Err(e) if e.kind() == ErrorKind::Untrusted => {
            println!("full backup needed: {e}");
            println!("copy 0 {}", image.virtual_size());
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let (mut n, mut bytes) = (0u64, 0u64);
    for extent in extents {
        let extent = extent?;
        println!("copy {} {}", extent.offset, extent.length);
        n += 1;
        bytes += extent.length;
    }
    println!(
        "incremental backup: {n} ranges, {bytes} bytes of {}",
        image.virtual_size()
    );
    Ok(())
}
