//! `edit()`: one write transaction as a context manager.
//!
//! The image is opened read-write with QEMU's write locks at `edit()`;
//! operations are staged in memory (a refused one raises and leaves the
//! image untouched); a clean exit from the `with` block commits them with
//! the library's crash-safe protocol, an exception discards them (nothing
//! was written). Either way the locks are released at the end of the block.

use crate::errors::{IntoPy, closed, invalid};
use crate::image::lock;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use qcow2_bitmap::lock::Access;
use qcow2_bitmap::read;
use qcow2_bitmap::storage::RwFile;
use qcow2_bitmap::write::{self, Transaction};
use std::path::PathBuf;
use std::sync::Mutex;

/// Opens `path` for a write transaction (QEMU's write locks: refused while
/// any QEMU process has the image open).
#[pyfunction]
pub fn edit(py: Python<'_>, path: PathBuf) -> PyResult<Edit> {
    let tx = py
        .detach(|| write::open_path(&path).map_err(|e| e.context(path.display())))
        .py()?;
    Ok(Edit {
        tx: Mutex::new(Some(tx)),
        shown: path.display().to_string(),
        notes: Mutex::new(Vec::new()),
    })
}

/// A write transaction on one image (see `edit`).
#[pyclass(module = "qcow2_bitmap", frozen)]
pub struct Edit {
    /// `None` after commit or discard. Only ever locked inside
    /// `Python::detach`, so a long commit never blocks a thread holding the GIL.
    tx: Mutex<Option<Transaction<RwFile>>>,
    shown: String,
    notes: Mutex<Vec<String>>,
}

impl Edit {
    /// Runs `op` on the open transaction with the GIL released.
    fn stage(
        &self,
        py: Python<'_>,
        op: impl Send + FnOnce(&mut Transaction<RwFile>) -> qcow2_bitmap::Result<()>,
    ) -> PyResult<()> {
        let shown = &self.shown;
        let r = py.detach(|| {
            let mut slot = lock(&self.tx);
            slot.as_mut().map(|tx| op(tx).map_err(|e| e.context(shown)))
        });
        match r {
            Some(r) => r.py(),
            None => Err(closed(&format!("transaction on {shown}"))),
        }
    }
}

#[pymethods]
impl Edit {
    /// The image path.
    #[getter]
    fn filename(&self) -> String {
        self.shown.clone()
    }

    /// Whether the transaction is still open (not committed or discarded).
    #[getter]
    fn active(&self, py: Python<'_>) -> bool {
        py.detach(|| lock(&self.tx).is_some())
    }

    /// The bitmap names as staged so far.
    fn names(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        py.detach(|| lock(&self.tx).as_ref().map(|tx| tx.names()))
            .ok_or_else(|| closed(&format!("transaction on {}", self.shown)))
    }

    /// Stages a new empty bitmap (granularity: bytes, default as qemu-img).
    #[pyo3(signature = (name, granularity = None, disabled = false))]
    fn add(
        &self,
        py: Python<'_>,
        name: &str,
        granularity: Option<u64>,
        disabled: bool,
    ) -> PyResult<()> {
        self.stage(py, |tx| tx.add(name, granularity, !disabled))
    }

    /// Stages the removal of bitmaps (also in-use or invalid ones).
    #[pyo3(signature = (*names))]
    fn remove(&self, py: Python<'_>, names: Vec<String>) -> PyResult<()> {
        if names.is_empty() {
            return Err(invalid("remove", "needs at least one bitmap name"));
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.stage(py, |tx| tx.remove(&names))
    }

    /// Stages clearing every bit of a bitmap.
    fn clear(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.stage(py, |tx| tx.clear(name))
    }

    /// Stages enabling a bitmap (QEMU records writes into it).
    fn enable(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.stage(py, |tx| tx.set_enabled(name, true))
    }

    /// Stages disabling a bitmap.
    fn disable(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.stage(py, |tx| tx.set_enabled(name, false))
    }

    /// Stages `target |= source` for each source (a name or a list of
    /// names), from this image or from `source_image` (a path).
    #[pyo3(signature = (target, sources, source_image = None))]
    fn merge(
        &self,
        py: Python<'_>,
        target: &str,
        sources: &Bound<'_, PyAny>,
        source_image: Option<PathBuf>,
    ) -> PyResult<()> {
        let sources: Vec<String> = match sources.extract::<String>() {
            Ok(one) => vec![one],
            Err(_) => sources.extract()?,
        };
        if sources.is_empty() {
            return Err(invalid("merge", "needs at least one source bitmap"));
        }
        let Some(src_path) = source_image else {
            return self.stage(py, |tx| {
                sources.iter().try_for_each(|s| tx.merge_bitmap(target, s))
            });
        };
        let shown = src_path.display().to_string();
        let source = py
            .detach(|| read::open_path(&src_path, Access::Read).map_err(|e| e.context(&shown)))
            .py()?;
        self.stage(py, |tx| {
            sources
                .iter()
                .try_for_each(|s| tx.merge_from_image_named(target, &source, s, &shown))
        })
    }

    /// Writes everything staged (crash-safe) and ends the transaction;
    /// returns the warnings (clusters a removal could not prove free).
    fn commit(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let shown = &self.shown;
        let out = py.detach(|| {
            let tx = lock(&self.tx).take()?;
            let notes = tx.notes();
            Some(tx.commit().map(|_| notes).map_err(|e| e.context(shown)))
        });
        let notes = out
            .ok_or_else(|| closed(&format!("transaction on {shown}")))?
            .py()?;
        py.detach(|| lock(&self.notes).clone_from(&notes));
        Ok(notes)
    }

    /// Discards everything staged (nothing is written) and releases the locks.
    fn discard(&self, py: Python<'_>) {
        let tx = py.detach(|| lock(&self.tx).take());
        drop(tx);
    }

    /// The warnings of the last commit.
    #[getter]
    fn notes(&self, py: Python<'_>) -> Vec<String> {
        py.detach(|| lock(&self.notes).clone())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Commits on a clean exit (if still open); discards when the block raised.
    #[pyo3(signature = (*args))]
    fn __exit__(&self, py: Python<'_>, args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        let raised = args.get_item(0).map(|t| !t.is_none()).unwrap_or(false);
        let open = py.detach(|| lock(&self.tx).is_some());
        if raised || !open {
            self.discard(py);
            return Ok(false);
        }
        self.commit(py)?;
        Ok(false)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let state = if self.active(py) { "open" } else { "closed" };
        format!("<qcow2_bitmap.Edit {:?} ({state})>", self.shown)
    }
}
