//! The file-level operations: `repair`, `backup`, `restore`, `apply`,
//! `verify`. Keyword arguments are the CLI's options; results are the
//! CLI's `--json` documents as dicts. Each runs with the GIL released; a
//! `progress(done, total)` callback is called (with the GIL) at most every
//! 100 ms and once at the end. An exception raised by the callback does not
//! interrupt the operation (the library has no cancellation point there): it
//! is raised when the operation returns.

use crate::errors::{IntoPy, invalid};
use crate::to_py;
use pyo3::prelude::*;
use qcow2_bitmap::backup::{self as lib_backup, BackupOptions, OutputFormat, Then};
use qcow2_bitmap::report::{ApplyDoc, BackupDoc, RepairDoc, RestoreDoc, VerifyDoc};
use qcow2_bitmap::write::repair::{self as lib_repair, InUsePolicy};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Most frequent progress callback.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Calls the Python callback, throttled; keeps the first exception.
struct Progress<'a> {
    callback: Option<&'a Py<PyAny>>,
    last: Option<Instant>,
    error: Option<PyErr>,
}

impl<'a> Progress<'a> {
    fn new(callback: Option<&'a Py<PyAny>>) -> Self {
        Progress {
            callback,
            last: None,
            error: None,
        }
    }

    fn tick(&mut self, done: u64, total: u64) {
        let Some(cb) = self.callback else { return };
        if self.error.is_some() {
            return;
        }
        let now = Instant::now();
        let due = done >= total || self.last.is_none_or(|t| now - t >= PROGRESS_EVERY);
        if !due {
            return;
        }
        self.last = Some(now);
        Python::attach(|py| {
            if let Err(e) = cb.call1(py, (done, total)) {
                self.error = Some(e);
            }
        });
    }

    /// The library's result, or the callback's exception.
    fn finish<T>(self, r: qcow2_bitmap::Result<T>) -> PyResult<T> {
        let v = r.py()?;
        match self.error {
            Some(e) => Err(e),
            None => Ok(v),
        }
    }
}

fn output_format(name: &str) -> PyResult<OutputFormat> {
    match name {
        "qcow2" => Ok(OutputFormat::Qcow2),
        "raw" => Ok(OutputFormat::Raw),
        other => Err(invalid(
            "format",
            format!("{other:?} is not one of \"qcow2\", \"raw\""),
        )),
    }
}

/// Makes the image consistent and openable by QEMU again, keeping every
/// bitmap that can be kept (`dry_run`: only says what it would do);
/// `in_use` is `"dirty"` or `"remove"`. Returns the `repair --json` document.
#[pyfunction]
#[pyo3(signature = (path, dry_run = false, in_use = "dirty"))]
pub fn repair<'py>(
    py: Python<'py>,
    path: PathBuf,
    dry_run: bool,
    in_use: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let policy = match in_use {
        "dirty" => InUsePolicy::Dirty,
        "remove" => InUsePolicy::Remove,
        other => {
            return Err(invalid(
                "in_use",
                format!("{other:?} is not one of \"dirty\", \"remove\""),
            ));
        }
    };
    let report = py
        .detach(|| {
            lib_repair::repair_path(&path, policy, dry_run).map_err(|e| e.context(path.display()))
        })
        .py()?;
    to_py(
        py,
        &RepairDoc::new(&path.display().to_string(), dry_run, &report),
    )
}

/// Writes a full (no `bitmap`) or incremental backup of the image's guest
/// view to `output` with its manifest `output + ".json"`; `next` adds the
/// next checkpoint bitmap in the same run (`then`: `"keep"`, `"disable"` or
/// `"remove"` the old one). Returns the `backup --json` document.
#[pyfunction]
#[pyo3(signature = (
    image, output, bitmap = None, backing = None, format = "qcow2", compress = false,
    force_share = false, next = None, then = None, progress = None
))]
#[allow(clippy::too_many_arguments)]
pub fn backup<'py>(
    py: Python<'py>,
    image: PathBuf,
    output: PathBuf,
    bitmap: Option<String>,
    backing: Option<String>,
    format: &str,
    compress: bool,
    force_share: bool,
    next: Option<String>,
    then: Option<&str>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let then = match (then, &next) {
        (None, _) => Then::Keep,
        (Some(_), None) => return Err(invalid("then", "needs next")),
        (Some("keep"), _) => Then::Keep,
        (Some("disable"), _) => Then::Disable,
        (Some("remove"), _) => Then::Remove,
        (Some(other), _) => {
            return Err(invalid(
                "then",
                format!("{other:?} is not one of \"keep\", \"disable\", \"remove\""),
            ));
        }
    };
    let opts = BackupOptions {
        bitmap,
        backing,
        format: output_format(format)?,
        compress,
        force_share,
        next: next.map(|n| (n, then)),
    };
    let mut p = Progress::new(progress.as_ref());
    let r = py.detach(|| {
        let mut tick = |d, t| p.tick(d, t);
        lib_backup::backup(&image, &output, &opts, Some(&mut tick))
    });
    let summary = p.finish(r)?;
    to_py(py, &BackupDoc::from(&summary))
}

/// Flattens a backup chain into a new standalone image (`format`: `"qcow2"`
/// or `"raw"`); `output` must not exist. Returns `output`, `data-bytes`,
/// `virtual-size`.
#[pyfunction]
#[pyo3(signature = (backup, output, format = "qcow2", progress = None))]
pub fn restore<'py>(
    py: Python<'py>,
    backup: PathBuf,
    output: PathBuf,
    format: &str,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let format = output_format(format)?;
    let mut p = Progress::new(progress.as_ref());
    let r = py.detach(|| {
        let mut tick = |d, t| p.tick(d, t);
        lib_backup::restore::restore(&backup, &output, format, Some(&mut tick))
    });
    let restored = p.finish(r)?;
    to_py(
        py,
        &RestoreDoc::new(&output.display().to_string(), &restored),
    )
}

/// Lays one backup (with its manifest) onto a raw image or block device in
/// place. Returns `target`, `data-bytes`, `zero-bytes`.
#[pyfunction]
#[pyo3(signature = (backup, target, progress = None))]
pub fn apply<'py>(
    py: Python<'py>,
    backup: PathBuf,
    target: PathBuf,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let mut p = Progress::new(progress.as_ref());
    let r = py.detach(|| {
        let mut tick = |d, t| p.tick(d, t);
        lib_backup::apply::apply(&backup, &target, Some(&mut tick))
    });
    let applied = p.finish(r)?;
    to_py(py, &ApplyDoc::new(&target.display().to_string(), &applied))
}

/// Checks a backup and its chain against their manifests (and, with
/// `source`, the guest view against the source image). Returns the
/// `verify --json` document; `ok` says whether everything holds.
#[pyfunction]
#[pyo3(signature = (backup, source = None))]
pub fn verify<'py>(
    py: Python<'py>,
    backup: PathBuf,
    source: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    let report = py
        .detach(|| lib_backup::verify::verify(&backup, source.as_deref()))
        .py()?;
    to_py(py, &VerifyDoc::from(&report))
}
