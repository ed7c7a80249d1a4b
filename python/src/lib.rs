//! `qcow2_bitmap._native`: the Python bindings of the `qcow2_bitmap` crate.
//!
//! A thin layer over the public Rust API: every answer comes from the
//! library (the `--json` documents from [`qcow2_bitmap::report`]), this crate
//! only converts. Long work runs with the GIL released, and no lock of ours
//! is ever waited for while holding the GIL (every `Mutex` is taken inside
//! `Python::detach`, or held only for a moment by code that never waits for
//! the GIL).
//!
//! Errors become one exception hierarchy rooted at `Qcow2BitmapError`, with
//! the library's kind, object, offset and one-line message as attributes.

mod edit;
mod errors;
mod image;
mod ops;

use pyo3::intern;
use pyo3::prelude::*;

/// A `serde` document (the library's `--json` documents) as Python objects
/// through `json.loads`: dicts with the CLI's keys, in the CLI's order.
pub(crate) fn to_py<'py>(
    py: Python<'py>,
    doc: &impl serde::Serialize,
) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(doc)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
    py.import(intern!(py, "json"))?
        .call_method1(intern!(py, "loads"), (text,))
}

/// The native module; `qcow2_bitmap/__init__.py` re-exports it.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<image::Image>()?;
    m.add_class::<image::Bitmap>()?;
    m.add_class::<image::ExtentIter>()?;
    m.add_class::<image::MapIter>()?;
    m.add_class::<edit::Edit>()?;
    m.add_function(wrap_pyfunction!(image::open, m)?)?;
    m.add_function(wrap_pyfunction!(edit::edit, m)?)?;
    m.add_function(wrap_pyfunction!(ops::repair, m)?)?;
    m.add_function(wrap_pyfunction!(ops::backup, m)?)?;
    m.add_function(wrap_pyfunction!(ops::restore, m)?)?;
    m.add_function(wrap_pyfunction!(ops::apply, m)?)?;
    m.add_function(wrap_pyfunction!(ops::verify, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_READ", image::MAX_READ)?;
    Ok(())
}
