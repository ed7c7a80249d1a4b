//! `check` and `repair`: reports, JSON documents and their exit statuses.

use super::Failure;
use super::args::{InUseArg, ReadOpts};
use super::output::write_json;
use qcow2_bitmap::lock::Access;
use qcow2_bitmap::read::{self, CheckReport, Finding, Severity};
use qcow2_bitmap::write::repair::{self, Action, InUsePolicy, RepairReport};
use serde::Serialize;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

type Outcome = Result<ExitCode, Failure>;

/// The `check --json` document (contract: cli.md, Integrity).
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct CheckDoc {
    filename: String,
    format: &'static str,
    check_errors: u64,
    corruptions: usize,
    leaks: u64,
    unusable_bitmaps: usize,
    image_end_offset: u64,
    problems: Vec<ProblemDoc>,
}

#[derive(Debug, Serialize)]
struct ProblemDoc {
    severity: &'static str,
    bitmap: Option<String>,
    offset: Option<u64>,
    message: String,
}

impl From<&Finding> for ProblemDoc {
    fn from(f: &Finding) -> Self {
        ProblemDoc {
            severity: f.severity.as_str(),
            bitmap: f.bitmap.clone(),
            offset: f.offset,
            message: f.message.clone(),
        }
    }
}

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
        write_json(&mut out, &check_doc(path, &report))?;
    } else {
        write_check(&mut out, &report)?;
    }
    out.flush()?;
    Ok(ExitCode::from(report.verdict().exit_code()))
}

fn check_doc(path: &Path, r: &CheckReport) -> CheckDoc {
    CheckDoc {
        filename: path.display().to_string(),
        format: "qcow2",
        check_errors: r.refcounts.check_errors,
        corruptions: r.count(Severity::Corruption),
        leaks: r.count(Severity::Leak) as u64,
        unusable_bitmaps: r.count(Severity::Unusable),
        image_end_offset: r.refcounts.image_end_offset,
        problems: r.findings.iter().map(ProblemDoc::from).collect(),
    }
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

/// The `repair --json` document.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct RepairDoc {
    filename: String,
    dry_run: bool,
    actions: Vec<ActionDoc>,
    leaks_freed: u64,
    clean: bool,
}

#[derive(Debug, Serialize)]
struct ActionDoc {
    bitmap: Option<String>,
    action: String,
}

impl From<&Action> for ActionDoc {
    fn from(a: &Action) -> Self {
        ActionDoc {
            bitmap: a.bitmap.clone(),
            action: a.message.clone(),
        }
    }
}

/// `repair`: exit 0 when the image is clean afterwards (dry run: would be).
pub fn repair_cmd(path: &Path, json: bool, dry_run: bool, in_use: InUseArg) -> Outcome {
    let policy = match in_use {
        InUseArg::Dirty => InUsePolicy::Dirty,
        InUseArg::Remove => InUsePolicy::Remove,
    };
    let report =
        run_repair(path, policy, dry_run).map_err(|e| Failure::Lib(e.context(path.display())))?;
    let mut out = BufWriter::new(io::stdout().lock());
    if json {
        let actions = report.actions.iter().map(ActionDoc::from).collect();
        let doc = RepairDoc {
            filename: path.display().to_string(),
            dry_run,
            actions,
            leaks_freed: report.leaks_freed,
            clean: report.clean,
        };
        write_json(&mut out, &doc)?;
    } else {
        write_repair(&mut out, &report, dry_run)?;
    }
    out.flush()?;
    Ok(ExitCode::from(if report.clean { 0 } else { 1 }))
}

fn run_repair(
    path: &Path,
    policy: InUsePolicy,
    dry_run: bool,
) -> qcow2_bitmap::Result<RepairReport> {
    if dry_run {
        let image = read::open_path(path, Access::Read)?;
        return repair::repair_dry_run(&image, policy);
    }
    let tx_file = qcow2_bitmap::write::open_rw(path)?;
    let (_, report) = repair::repair(tx_file, policy)?;
    Ok(report)
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
