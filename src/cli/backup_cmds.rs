//! `backup`, `restore`, `apply`, `verify`: thin wrappers over
//! [`qcow2_bitmap::backup`], with `-p` progress bars and `--json` documents.

use super::Failure;
use super::args::{BackupArgs, FormatArg, ThenArg};
use qcow2_bitmap::Error;
use qcow2_bitmap::backup::{self, BackupOptions, OutputFormat, Then};
use qcow2_bitmap::report::{BackupDoc, VerifyDoc};
use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

type Outcome = Result<ExitCode, Failure>;

fn format_of(f: FormatArg) -> OutputFormat {
    match f {
        FormatArg::Qcow2 => OutputFormat::Qcow2,
        FormatArg::Raw => OutputFormat::Raw,
    }
}

/// A progress bar on stderr, or nothing.
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn new(on: bool, what: &str) -> Self {
        Bar(on.then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            b.set_message(what.to_string());
            b
        }))
    }

    fn update(&self) -> impl FnMut(u64, u64) + '_ {
        move |done, total| {
            if let Some(b) = &self.0 {
                b.set_length(total);
                b.set_position(done);
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

/// Runs `backup`.
pub fn backup(a: &BackupArgs) -> Outcome {
    // Usage errors of the contract (exit 1), checked before anything is opened.
    if a.backing.is_some() && a.format == FormatArg::Raw {
        return usage("--backing needs --format qcow2");
    }
    if a.then.is_some() && a.next.is_none() {
        return usage("--then needs --next");
    }
    if a.next.is_some() && a.bitmap.is_none() {
        return usage("--next needs --bitmap");
    }
    if a.next.is_some() && a.read.force_share {
        return usage("-U cannot be used with --next");
    }
    if a.compress && a.format == FormatArg::Raw {
        return usage("-c needs --format qcow2");
    }
    let then = match a.then.unwrap_or(ThenArg::Keep) {
        ThenArg::Keep => Then::Keep,
        ThenArg::Disable => Then::Disable,
        ThenArg::Remove => Then::Remove,
    };
    let opts = BackupOptions {
        bitmap: a.bitmap.clone(),
        backing: a.backing.clone(),
        format: format_of(a.format),
        compress: a.compress,
        force_share: a.read.force_share,
        next: a.next.clone().map(|n| (n, then)),
    };
    let bar = Bar::new(a.progress, "backup");
    let mut update = bar.update();
    let summary = backup::backup(&a.image, &a.output, &opts, Some(&mut update));
    bar.finish();
    let s = summary?;
    if a.json {
        print_json(&BackupDoc::from(&s))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn usage(msg: &str) -> Outcome {
    Err(Failure::Lib(Error::invalid_input("usage", msg.to_string())))
}

fn print_json(doc: &impl serde::Serialize) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, doc).map_err(io::Error::other)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Runs `restore`.
pub fn restore(backup: &Path, output: &Path, format: FormatArg, progress: bool) -> Outcome {
    let bar = Bar::new(progress, "restore");
    let mut update = bar.update();
    let r = backup::restore::restore(backup, output, format_of(format), Some(&mut update));
    bar.finish();
    r?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `apply`.
pub fn apply(backup: &Path, target: &Path, progress: bool) -> Outcome {
    let bar = Bar::new(progress, "apply");
    let mut update = bar.update();
    let r = backup::apply::apply(backup, target, Some(&mut update));
    bar.finish();
    r?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `verify`: the report on stdout, exit 0 when everything holds.
pub fn verify(backup: &Path, source: Option<&Path>, json: bool) -> Outcome {
    let r = backup::verify::verify(backup, source)?;
    let mut out = io::stdout().lock();
    if json {
        drop(out);
        print_json(&VerifyDoc::from(&r))?;
    } else {
        for m in &r.members {
            let mf = if m.manifest {
                "manifest"
            } else {
                "no manifest"
            };
            if m.problems.is_empty() {
                writeln!(out, "{}: ok ({mf})", super::output::shown(&m.filename))?;
            }
            for p in &m.problems {
                writeln!(
                    out,
                    "{}: {}",
                    super::output::shown(&m.filename),
                    super::output::shown(p)
                )?;
            }
        }
        match r.source_equal {
            Some(true) => writeln!(out, "guest view equals the source")?,
            Some(false) => writeln!(out, "guest view DIFFERS from the source")?,
            None => {}
        }
        writeln!(
            out,
            "{}",
            if r.ok { "verify: ok" } else { "verify: FAILED" }
        )?;
        out.flush()?;
    }
    Ok(if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
