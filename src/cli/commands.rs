//! One function per subcommand. Each opens the image read-only through the
//! public API, gathers what it prints, and hands it to `output`.

use super::Failure;
use super::args::{Cli, Command, ReadOpts};
use super::output;
use qcow2_bitmap::lock::Access;
use qcow2_bitmap::read::{self, Image};
use qcow2_bitmap::report::InfoDoc;
use qcow2_bitmap::storage::MappedFile;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

type Outcome = Result<ExitCode, Failure>;

/// Runs the parsed command.
pub fn dispatch(cli: Cli) -> Outcome {
    match cli.command {
        Command::Info { json, read, image } => info(&image, &read, json),
        Command::Extents {
            json,
            read,
            all,
            force,
            offset,
            length,
            image,
            bitmap,
        } => {
            let range = ExtentsRange { offset, length };
            extents(
                &image,
                &read,
                &bitmap,
                ExtentsOpts {
                    json,
                    all,
                    force,
                    range,
                },
            )
        }
        Command::Hash {
            read,
            force,
            image,
            bitmap,
        } => hash(&image, &read, &bitmap, force),
        Command::Dump {
            json,
            read,
            image,
            bitmap,
        } => dump(&image, &read, json, bitmap.as_deref()),
        Command::Map {
            json,
            read,
            offset,
            length,
            image,
        } => super::map::map(
            &image,
            &read,
            super::map::MapOpts {
                json,
                offset,
                length,
            },
        ),
        Command::Backup(a) => super::backup_cmds::backup(&a),
        Command::Restore {
            format,
            progress,
            backup,
            output,
        } => super::backup_cmds::restore(&backup, &output, format, progress),
        Command::Apply {
            progress,
            backup,
            target,
        } => super::backup_cmds::apply(&backup, &target, progress),
        Command::Verify {
            json,
            source,
            backup,
        } => super::backup_cmds::verify(&backup, source.as_deref(), json),
        write => super::write_cmds::dispatch(&write),
    }
}

fn open(path: &Path, opts: &ReadOpts) -> Result<Image<MappedFile>, Failure> {
    let access = if opts.force_share {
        Access::ReadForceShare
    } else {
        Access::Read
    };
    read::open_path(path, access).map_err(|e| Failure::Lib(e.context(path.display())))
}

fn stdout() -> BufWriter<io::StdoutLock<'static>> {
    BufWriter::with_capacity(1 << 16, io::stdout().lock())
}

fn info(path: &Path, opts: &ReadOpts, json: bool) -> Outcome {
    let image = open(path, opts)?;
    // The JSON document has no density picture: skip that part of the pass.
    let columns = if json { 0 } else { output::DENSITY_COLUMNS };
    let doc = InfoDoc::gather(path, &image, columns);
    let mut out = stdout();
    if json {
        output::write_json(&mut out, &doc)?;
    } else {
        output::write_info(&mut out, &doc, &image)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `--offset`/`--length` as given.
#[derive(Debug, Clone, Copy)]
pub struct ExtentsRange {
    offset: Option<u64>,
    length: Option<u64>,
}

/// Flags of `extents`.
#[derive(Debug, Clone, Copy)]
pub struct ExtentsOpts {
    json: bool,
    all: bool,
    force: bool,
    range: ExtentsRange,
}

fn extents(path: &Path, opts: &ReadOpts, name: &str, o: ExtentsOpts) -> Outcome {
    let image = open(path, opts)?;
    let b = image.find(name)?;
    let offset = o.range.offset.unwrap_or(0);
    let length = match o.range.length {
        Some(l) => l,
        None => image.virtual_size().checked_sub(offset).ok_or_else(|| {
            qcow2_bitmap::Error::invalid_input(
                "--offset",
                format!("{offset} is past the virtual size {}", image.virtual_size()),
            )
        })?,
    };
    let (lo, hi) = image.check_range(Some((offset, length)))?;
    let iter = image.extents(b, Some((lo, hi - lo)), o.force)?;
    let mut out = stdout();
    let mut printer = output::ExtentPrinter::new(o.json, o.all, lo, hi);
    for e in iter {
        printer.dirty(&mut out, e?)?;
    }
    printer.finish(&mut out)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn hash(path: &Path, opts: &ReadOpts, name: &str, force: bool) -> Outcome {
    let image = open(path, opts)?;
    let b = image.find(name)?;
    let digest = image.sha256(b, force)?;
    let mut out = stdout();
    writeln!(out, "{}", read::hex(&digest))?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn dump(path: &Path, opts: &ReadOpts, json: bool, bitmap: Option<&str>) -> Outcome {
    let image = open(path, opts)?;
    let table = match bitmap {
        Some(name) => Some(output::dump_table(&image, image.find(name)?)),
        None => None,
    };
    let doc = output::DumpDoc::new(path, &image, table);
    let mut out = stdout();
    if json {
        output::write_json(&mut out, &doc)?;
    } else {
        output::write_dump(&mut out, &doc)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
