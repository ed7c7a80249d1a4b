//! The core loop of an offline incremental backup: for each dirty extent of
//! a checkpoint bitmap, ask the guest-data view what the range holds (data
//! or zeros, through the whole backing chain) and read the data bytes.
//! Prints one line per piece and a SHA-256 of the dirty data, so the output
//! can be compared with what `qemu-nbd` + `nbdcopy` would copy.
//!
//! `cargo run --release --example dirty_data -- fixtures/demo.qcow2 ckpt-2`

use qcow2_bitmap::guest::Chain;
use qcow2_bitmap::lock::Access;
use qcow2_bitmap::read::{hex, open_path};
use sha2::{Digest, Sha256};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(name)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: dirty_data IMAGE BITMAP");
        return ExitCode::from(1);
    };
    match dirty_data(path, name) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dirty_data: {e}");
            ExitCode::from(1)
        }
    }
}

fn dirty_data(path: &str, name: &str) -> qcow2_bitmap::Result<()> {
    // The bitmap says what changed; the chain says what the guest sees there.
    let image = open_path(path.as_ref(), Access::Read)?;
    let bitmap = image.find(name)?;
    let chain = Chain::open(path.as_ref(), Access::Read)?;
    let mut reader = chain.reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut digest = Sha256::new();
    let (mut data, mut zeros) = (0u64, 0u64);
    for extent in image.extents(bitmap, None, false)? {
        let extent = extent?;
        // Collect the map entries first: the reader is borrowed by the map.
        let pieces: Vec<_> = reader
            .map(extent.offset, extent.length)?
            .collect::<qcow2_bitmap::Result<_>>()?;
        for piece in pieces {
            if piece.zero {
                // Discarded or zeroed since the checkpoint: a backup stores zeros.
                println!("{} {} zero", piece.start, piece.length);
                zeros += piece.length;
                continue;
            }
            println!(
                "{} {} data depth {}",
                piece.start, piece.length, piece.depth
            );
            let mut at = piece.start;
            while at < piece.end() {
                let n = (piece.end() - at).min(buf.len() as u64) as usize;
                reader.read_at(at, &mut buf[..n])?;
                digest.update(&buf[..n]);
                at += n as u64;
            }
            data += piece.length;
        }
    }
    println!(
        "{data} data bytes, {zeros} zero bytes, sha256 of the data {}",
        hex(&digest.finalize())
    );
    Ok(())
}
