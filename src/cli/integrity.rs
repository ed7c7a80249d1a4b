//! `check` and `repair`: reports, JSON documents and their exit statuses.

use super::Failure;
use super::args::{InUseArg, ReadOpts};
use super::output::write_json;
use qcow2_bitmap::lock::Access;
use qcow2_bitmap::read::{self, CheckReport, Severity};
use qcow2_bitmap::report::{CheckDoc, RepairDoc};
use qcow2_bitmap::write::repair::{self, InUsePolicy, RepairReport};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

type Outcome = Result<ExitCode, Failure>;

/// `check`: exit 1 when the image cannot be opened at all (like qemu-img).
pub fn check(path: &Path, opts: &ReadOpts, json: bool) -> Outcome {
    let access = if opts.force_share {
        Access::ReadForceShare
    } else {
        Access::Read
    };
    let image =
        read::open_path(path, access).map_err(|e| Failure::Lib(e.context(path.display())))?;
    let report = image
        .check()
        .map_err(|e| Failure::Lib(e.context(path.display())))?;
    let mut out = BufWriter::new(io::stdout().lock());
    if json {
        write_json(
            &mut out,
            &CheckDoc::new(&path.display().to_string(), &report),
        )?;
    } else {
        write_check(&mut out, &report)?;
    }
    out.flush()?;
    Ok(ExitCode::from(report.verdict().exit_code()))
}

fn write_check(out: &mut impl Write, r: &CheckReport) -> io::Result<()> {
    for f in &r.findings {
        let who = f
            .bitmap
            .as_ref()
            .filter(|_| !f.message.starts_with("bitmap '"))
            .map(|b| format!("bitmap '{}': ", super::output::shown(b)))
            .unwrap_or_default();
        let at = f
            .offset
            .map(|o| format!(" (offset {o})"))
            .unwrap_or_default();
        writeln!(out, "{}: {who}{}{at}", f.severity.as_str(), f.message)?;
    }
    let (c, u, l) = (
        r.count(Severity::Corruption),
        r.count(Severity::Unusable),
        r.count(Severity::Leak),
    );
    if r.findings.is_empty() {
        writeln!(out, "No errors were found on the image.")?;
    } else {
        writeln!(
            out,
            "{c} corruptions, {l} leaked clusters, {u} unusable bitmaps"
        )?;
    }
    if r.refcounts.check_errors > 0 {
        writeln!(
            out,
            "{} errors kept the check from completing",
            r.refcounts.check_errors
        )?;
    }
    writeln!(out, "Image end offset: {}", r.refcounts.image_end_offset)
}

/// `repair`: exit 0 when the image is clean afterwards (dry run: would be).
pub fn repair_cmd(path: &Path, json: bool, dry_run: bool, in_use: InUseArg) -> Outcome {
    let policy = match in_use {
        InUseArg::Dirty => InUsePolicy::Dirty,
        InUseArg::Remove => InUsePolicy::Remove,
    };
    let report = repair::repair_path(path, policy, dry_run)
        .map_err(|e| Failure::Lib(e.context(path.display())))?;
    let mut out = BufWriter::new(io::stdout().lock());
    if json {
        let doc = RepairDoc::new(&path.display().to_string(), dry_run, &report);
        write_json(&mut out, &doc)?;
    } else {
        write_repair(&mut out, &report, dry_run)?;
    }
    out.flush()?;
    Ok(ExitCode::from(if report.clean { 0 } else { 1 }))
}

fn write_repair(out: &mut impl Write, r: &RepairReport, dry_run: bool) -> io::Result<()> {
    if r.actions.is_empty() {
        writeln!(out, "Nothing to repair.")?;
    }
    for a in &r.actions {
        let who = a
            .bitmap
            .as_ref()
            .map(|b| format!("bitmap '{}': ", super::output::shown(b)))
            .unwrap_or_default();
        writeln!(
            out,
            "{}{who}{}",
            if dry_run { "would: " } else { "" },
            a.message
        )?;
    }
    let state = match (dry_run, r.clean) {
        (true, true) => "the image would be clean afterwards",
        (true, false) => "the image would NOT be clean afterwards",
        (false, true) => "the image is clean",
        (false, false) => "the image is still NOT clean: run `qcow2-bitmap check`",
    };
    writeln!(out, "{state}")
}
