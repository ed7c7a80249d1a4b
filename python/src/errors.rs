//! The exception hierarchy: `Qcow2BitmapError` and one subclass per main
//! [`ErrorKind`], each carrying `kind`, `object`, `offset`, `message`
//! (and `errno` for I/O errors).

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use qcow2_bitmap::{Error, ErrorKind};

create_exception!(
    qcow2_bitmap,
    Qcow2BitmapError,
    PyException,
    "Any error of qcow2_bitmap: `kind`, `object`, `offset` (or None), `message`."
);
create_exception!(
    qcow2_bitmap,
    LockedError,
    Qcow2BitmapError,
    "Another process (a QEMU) holds a conflicting lock on the image."
);
create_exception!(
    qcow2_bitmap,
    UntrustedBitmapError,
    Qcow2BitmapError,
    "The bitmap is in-use, stale or invalid: take a full backup (or force)."
);
create_exception!(
    qcow2_bitmap,
    CorruptImageError,
    Qcow2BitmapError,
    "On-disk metadata breaks the format (`offset` says where)."
);
create_exception!(
    qcow2_bitmap,
    NotQcow2Error,
    Qcow2BitmapError,
    "The file is not a qcow2 image."
);
create_exception!(
    qcow2_bitmap,
    InvalidInputError,
    Qcow2BitmapError,
    "An argument is invalid (name, range, granularity, option)."
);
create_exception!(
    qcow2_bitmap,
    NotFoundError,
    Qcow2BitmapError,
    "The named bitmap does not exist."
);
create_exception!(
    qcow2_bitmap,
    UnsupportedError,
    Qcow2BitmapError,
    "A valid qcow2 feature this library does not handle."
);
create_exception!(
    qcow2_bitmap,
    ImageIOError,
    Qcow2BitmapError,
    "Reading or writing a file failed (`errno` when the system gave one)."
);
create_exception!(
    qcow2_bitmap,
    ClosedError,
    Qcow2BitmapError,
    "The image or transaction was closed (its `with` block ended)."
);

/// Adds the exception classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Qcow2BitmapError", py.get_type::<Qcow2BitmapError>())?;
    m.add("LockedError", py.get_type::<LockedError>())?;
    m.add(
        "UntrustedBitmapError",
        py.get_type::<UntrustedBitmapError>(),
    )?;
    m.add("CorruptImageError", py.get_type::<CorruptImageError>())?;
    m.add("NotQcow2Error", py.get_type::<NotQcow2Error>())?;
    m.add("InvalidInputError", py.get_type::<InvalidInputError>())?;
    m.add("NotFoundError", py.get_type::<NotFoundError>())?;
    m.add("UnsupportedError", py.get_type::<UnsupportedError>())?;
    m.add("ImageIOError", py.get_type::<ImageIOError>())?;
    m.add("ClosedError", py.get_type::<ClosedError>())?;
    Ok(())
}

/// The contract's name of a kind (as `--json` tools would print it).
fn kind_name(k: ErrorKind) -> &'static str {
    match k {
        ErrorKind::Io => "io",
        ErrorKind::NotQcow2 => "not-qcow2",
        ErrorKind::Unsupported => "unsupported",
        ErrorKind::Corrupt => "corrupt",
        ErrorKind::InvalidInput => "invalid-input",
        ErrorKind::NotFound => "not-found",
        ErrorKind::Untrusted => "untrusted",
        ErrorKind::Locked => "locked",
        _ => "other",
    }
}

/// The library error as a Python exception of the matching class.
pub fn to_py_err(e: Error) -> PyErr {
    let msg = e.to_string();
    let err = match e.kind() {
        ErrorKind::Io => ImageIOError::new_err(msg),
        ErrorKind::NotQcow2 => NotQcow2Error::new_err(msg),
        ErrorKind::Unsupported => UnsupportedError::new_err(msg),
        ErrorKind::Corrupt => CorruptImageError::new_err(msg),
        ErrorKind::InvalidInput => InvalidInputError::new_err(msg),
        ErrorKind::NotFound => NotFoundError::new_err(msg),
        ErrorKind::Untrusted => UntrustedBitmapError::new_err(msg),
        ErrorKind::Locked => LockedError::new_err(msg),
        _ => Qcow2BitmapError::new_err(msg),
    };
    let errno = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error);
    Python::attach(|py| {
        let v = err.value(py);
        // Setting attributes on a fresh exception instance cannot fail in
        // practice; if it did, the exception is still raised with its text.
        let _ = v.setattr("kind", kind_name(e.kind()));
        let _ = v.setattr("object", e.object());
        let _ = v.setattr("offset", e.offset());
        let _ = v.setattr("message", e.message());
        let _ = v.setattr("errno", errno);
    });
    err
}

/// An error of this layer with the library's shape (kind invalid-input).
pub fn invalid(object: &str, message: impl Into<String>) -> PyErr {
    to_py_err(Error::invalid_input(object, message))
}

/// The error for a use after the `with` block (or `close()`).
pub fn closed(what: &str) -> PyErr {
    let err = ClosedError::new_err(format!("{what} is closed"));
    Python::attach(|py| {
        let v = err.value(py);
        let _ = v.setattr("kind", "closed");
        let _ = v.setattr("object", what);
        let _ = v.setattr("offset", None::<u64>);
        let _ = v.setattr("message", "is closed");
        let _ = v.setattr("errno", None::<i32>);
    });
    err
}

/// `Result<T, Error>` to `PyResult<T>`.
pub trait IntoPy<T> {
    /// Converts the error.
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for qcow2_bitmap::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py_err)
    }
}
