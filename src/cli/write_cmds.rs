//! The write commands: each is one transaction, prints nothing on success.

use super::Failure;
use super::args::{Command, MergeArgs};
use qcow2_bitmap::lock::Access;
use qcow2_bitmap::read;
use qcow2_bitmap::storage::RwFile;
use qcow2_bitmap::write::{self, Transaction};
use std::path::Path;
use std::process::ExitCode;

type Outcome = Result<ExitCode, Failure>;

/// Runs a write command (the read commands never reach here).
pub fn dispatch(cmd: &Command) -> Outcome {
    match cmd {
        Command::Add {
            granularity,
            disabled,
            image,
            name,
        } => run(image, |tx| tx.add(name, *granularity, !disabled)),
        Command::Remove { image, names } => {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            run(image, |tx| tx.remove(&names))
        }
        Command::Clear { image, name } => run(image, |tx| tx.clear(name)),
        Command::Enable { image, name } => run(image, |tx| tx.set_enabled(name, true)),
        Command::Disable { image, name } => run(image, |tx| tx.set_enabled(name, false)),
        Command::Merge(m) => merge(m),
        Command::Check { json, read, image } => super::integrity::check(image, read, *json),
        Command::Repair {
            json,
            dry_run,
            in_use,
            image,
        } => super::integrity::repair_cmd(image, *json, *dry_run, *in_use),
        Command::Backup(_)
        | Command::Restore { .. }
        | Command::Apply { .. }
        | Command::Verify { .. }
        | Command::Map { .. }
        | Command::Info { .. }
        | Command::Extents { .. }
        | Command::Hash { .. }
        | Command::Dump { .. } => Err(Failure::Lib(qcow2_bitmap::Error::invalid_input(
            "command",
            "not a write command",
        ))),
    }
}

fn run(
    image: &Path,
    op: impl FnOnce(&mut Transaction<RwFile>) -> qcow2_bitmap::Result<()>,
) -> Outcome {
    let ctx = |e: qcow2_bitmap::Error| Failure::Lib(e.context(image.display()));
    let mut tx = write::open_path(image).map_err(ctx)?;
    op(&mut tx).map_err(ctx)?;
    let notes = tx.notes();
    tx.commit().map_err(ctx)?;
    // What a removal could not prove (leaked clusters left behind) is said, not hidden.
    for n in notes {
        eprintln!("qcow2-bitmap: {}: warning: {n}", image.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn merge(m: &MergeArgs) -> Outcome {
    let Some(src_path) = &m.source_image else {
        return run(&m.image, |tx| {
            m.sources
                .iter()
                .try_for_each(|s| tx.merge_bitmap(&m.target, s))
        });
    };
    let source = read::open_path(src_path, Access::Read)
        .map_err(|e| Failure::Lib(e.context(src_path.display())))?;
    let shown = src_path.display().to_string();
    run(&m.image, |tx| {
        m.sources
            .iter()
            .try_for_each(|s| tx.merge_from_image_named(&m.target, &source, s, &shown))
    })
}
