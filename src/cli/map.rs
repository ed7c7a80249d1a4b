//! `map`: the guest view's allocation map, byte for byte as `qemu-img map`
//! prints it (JSON and human layouts).

use super::Failure;
use super::args::ReadOpts;
use qcow2_bitmap::Error;
use qcow2_bitmap::guest::{Chain, MapEntry};
use qcow2_bitmap::lock::Access;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

/// Options of `map`.
#[derive(Debug, Clone, Copy)]
pub struct MapOpts {
    /// JSON output.
    pub json: bool,
    /// `--offset`.
    pub offset: Option<u64>,
    /// `--length`.
    pub length: Option<u64>,
}

/// Opens the chain of `path` with the read locks `-U` selects.
pub fn open_chain(path: &Path, opts: &ReadOpts) -> Result<Chain, Failure> {
    let access = if opts.force_share {
        Access::ReadForceShare
    } else {
        Access::Read
    };
    Chain::open(path, access).map_err(|e| Failure::Lib(e.context(path.display())))
}

/// Runs `map`.
pub fn map(path: &Path, read: &ReadOpts, o: MapOpts) -> Result<ExitCode, Failure> {
    let chain = open_chain(path, read)?;
    let size = chain.virtual_size();
    let offset = o.offset.unwrap_or(0);
    let length = match o.length {
        Some(l) => l,
        None => size.checked_sub(offset).ok_or_else(|| {
            Error::invalid_input(
                "--offset",
                format!("{offset} is past the virtual size {size}"),
            )
        })?,
    };
    let mut reader = chain.reader();
    let entries = reader.map(offset, length)?;
    let mut out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    if o.json {
        out.write_all(b"[")?;
        let mut first = true;
        for e in entries {
            let e = e?;
            if !first {
                out.write_all(b",\n")?;
            }
            first = false;
            json_entry(&mut out, &e)?;
        }
        if first && size == 0 && o.offset.is_none() && o.length.is_none() {
            // qemu-img prints one empty entry for a 0-byte image.
            out.write_all(
                b"{ \"start\": 0, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}",
            )?;
        }
        out.write_all(b"]\n")?;
    } else {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )?;
        for e in entries {
            let e = e?;
            if !e.data || e.zero {
                continue;
            }
            let Some(host) = e.offset else {
                out.flush()?;
                return Err(Failure::Lib(Error::invalid_input(
                    format!("{}: guest range at {:#x}", path.display(), e.start),
                    "File contains external, encrypted or compressed clusters \
                     (compressed data has no host offset; --json shows it)",
                )));
            };
            writeln!(
                out,
                "{:<16}{:<16}{:<16}{}",
                hex(e.start),
                hex(e.length),
                hex(host),
                chain.host_file_name(e.depth)
            )?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// C's `%#x`: `0` for zero, else `0x...`.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

fn json_entry(out: &mut impl Write, e: &MapEntry) -> io::Result<()> {
    write!(
        out,
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    )?;
    if let Some(o) = e.offset {
        write!(out, ", \"offset\": {o}")?;
    }
    out.write_all(b"}")
}
