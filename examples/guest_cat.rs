//! Copies guest bytes of an image (qcow2 or raw, whole backing chain) to
//! stdout: the whole disk, or `LENGTH` bytes from `OFFSET`. Reads go
//! through `Reader::read_at` in large buffers, so compressed clusters are
//! decompressed on all cores. Used by `benches/vs-qemu.sh --guest` against
//! `cat` of the same bytes.
//!
//! `cargo run --release --example guest_cat -- IMAGE [OFFSET LENGTH] > out.raw`

use qcow2_bitmap::guest::Chain;
use qcow2_bitmap::lock::Access;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::process::ExitCode;

/// Bytes per `read_at` (and per write to stdout).
const BUFFER: usize = 4 << 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let range = match args.len() {
        2 => None,
        4 => match (args[2].parse::<u64>(), args[3].parse::<u64>()) {
            (Ok(o), Ok(l)) => Some((o, l)),
            _ => return usage(),
        },
        _ => return usage(),
    };
    match cat(&args[1], range) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest_cat: {e}");
            ExitCode::from(1)
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: guest_cat IMAGE [OFFSET LENGTH]");
    ExitCode::from(1)
}

fn cat(path: &str, range: Option<(u64, u64)>) -> Result<(), String> {
    let chain = Chain::open(path.as_ref(), Access::Read).map_err(|e| e.to_string())?;
    let (mut at, length) = range.unwrap_or((0, chain.virtual_size()));
    let end = at
        .checked_add(length)
        .filter(|&e| e <= chain.virtual_size())
        .ok_or_else(|| {
            format!(
                "range {at}+{length} runs past the virtual size ({} bytes)",
                chain.virtual_size()
            )
        })?;
    let mut reader = chain.reader();
    let mut buf = vec![0u8; BUFFER.min(usize::try_from(length).unwrap_or(BUFFER))];
    // Unbuffered: stdout's LineWriter would split each write at its last newline.
    let mut out = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .map_err(|e| format!("stdout: {e}"))?;
    while at < end {
        let n = usize::try_from(end - at).map_or(buf.len(), |left| left.min(buf.len()));
        reader
            .read_at(at, &mut buf[..n])
            .map_err(|e| e.to_string())?;
        out.write_all(&buf[..n])
            .map_err(|e| format!("stdout: {e}"))?;
        at += n as u64;
    }
    out.flush().map_err(|e| format!("stdout: {e}"))
}
