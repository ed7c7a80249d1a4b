//! The crate's error type: what went wrong, on which object, at which file offset.
//!
//! Every error is one line. Parse errors name the structure and field
//! ("bitmap directory entry 'b0' granularity_bits"), the absolute file offset
//! and the offending value, so an operator can find the byte with `xxd`.
//! This module owns formatting only; it never decides policy.

use std::fmt;
use std::io;

/// Broad category of an [`Error`], for programs that branch on failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading or writing the image file failed.
    Io,
    /// The file is not a qcow2 image (bad magic).
    NotQcow2,
    /// A valid qcow2 feature this crate does not handle.
    Unsupported,
    /// On-disk metadata breaks the format.
    Corrupt,
    /// A caller-supplied argument is invalid (name, range, granularity).
    InvalidInput,
    /// A named bitmap does not exist.
    NotFound,
    /// The bitmap cannot be trusted (in-use, stale or invalid).
    Untrusted,
    /// Another process holds a conflicting lock on the image.
    Locked,
}

/// An error with its object, optional file offset and optional I/O cause.
///
/// `thiserror` derives `std::error::Error` (with the I/O cause as `source()`);
/// the one-line text is `OBJECT at offset N (0xN): MESSAGE`.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.render())]
pub struct Error {
    kind: ErrorKind,
    object: String,
    offset: Option<u64>,
    message: String,
    #[source]
    source: Option<io::Error>,
}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A general constructor: `object` names the structure and field, `message` what is wrong.
    pub fn new(
        kind: ErrorKind,
        object: impl Into<String>,
        offset: Option<u64>,
        message: impl Into<String>,
    ) -> Self {
        Error {
            kind,
            object: object.into(),
            offset,
            message: message.into(),
            source: None,
        }
    }

    /// Malformed metadata at a known file offset.
    pub fn corrupt(object: impl Into<String>, offset: u64, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, object, Some(offset), message)
    }

    /// An invalid argument from the caller.
    pub fn invalid_input(object: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, object, None, message)
    }

    /// An I/O failure while accessing `object`.
    pub fn io(object: impl Into<String>, offset: Option<u64>, err: io::Error) -> Self {
        let message = err.to_string();
        Error {
            kind: ErrorKind::Io,
            object: object.into(),
            offset,
            message,
            source: Some(err),
        }
    }

    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The structure or field the error is about.
    pub fn object(&self) -> &str {
        &self.object
    }

    /// The absolute file offset of the offending bytes, when known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// What is wrong, without the object and offset.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefixes the object with more context (e.g. the image path).
    /// (Nothing is added when the object already starts with it.)
    pub fn context(mut self, outer: impl fmt::Display) -> Self {
        let outer = outer.to_string();
        if !self.object.starts_with(&outer) {
            self.object = format!("{outer}: {}", self.object);
        }
        self
    }
}

impl Error {
    /// The same error about another object: `from` at the start of the
    /// object's name becomes `to` (a result shared by several bitmaps is
    /// reported under each one's own name).
    pub(crate) fn renamed(&self, from: &str, to: &str) -> Error {
        let object = match self.object.strip_prefix(from) {
            Some(rest) => format!("{to}{rest}"),
            None => self.object.clone(),
        };
        Error {
            kind: self.kind,
            object,
            offset: self.offset,
            message: self.message.clone(),
            source: None,
        }
    }

    fn render(&self) -> String {
        match self.offset {
            Some(off) => format!(
                "{} at offset {off} (0x{off:x}): {}",
                self.object, self.message
            ),
            None => format!("{}: {}", self.object, self.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_object_offset_and_value() {
        let e = Error::corrupt(
            "bitmap directory entry 'b0' name_size",
            0x30018,
            "2000 exceeds 1023",
        );
        assert_eq!(
            e.to_string(),
            "bitmap directory entry 'b0' name_size at offset 196632 (0x30018): 2000 exceeds 1023"
        );
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(e.offset(), Some(0x30018));
    }

    #[test]
    fn display_without_offset_and_context() {
        let e = Error::invalid_input("bitmap name", "empty").context("disk.qcow2");
        assert_eq!(e.to_string(), "disk.qcow2: bitmap name: empty");
        assert_eq!(
            e.context("disk.qcow2").to_string(),
            "disk.qcow2: bitmap name: empty"
        );
    }
}
