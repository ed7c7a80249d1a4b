//! `SEEK_DATA` / `SEEK_HOLE`: where a raw file's data and holes are, as
//! QEMU's file driver reports them for `qemu-img map`.

use std::fs::File;
use std::io;

/// The kind of region at an offset and where it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// Data up to this offset (exclusive).
    Data(u64),
    /// A hole up to this offset (exclusive).
    Hole(u64),
}

/// The region of `file` (of length `len`) containing `offset` (`offset < len`).
///
/// # Errors
/// An `lseek` failure other than "no more data".
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn region_at(file: &File, offset: u64, len: u64) -> io::Result<Region> {
    use std::os::fd::AsRawFd;
    if offset >= len {
        return Ok(Region::Hole(u64::MAX));
    }
    let fd = file.as_raw_fd();
    let pos = i64::try_from(offset).map_err(io::Error::other)?;
    let data = lseek(fd, pos, libc::SEEK_DATA);
    match data {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(Region::Hole(len)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Region::Data(len)),
        Err(e) => Err(e),
        Ok(d) if d > offset => Ok(Region::Hole(d.min(len))),
        Ok(_) => {
            let hole = lseek(fd, pos, libc::SEEK_HOLE)?;
            Ok(Region::Data(hole.clamp(offset + 1, len)))
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
fn lseek(fd: std::os::fd::RawFd, pos: i64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek only moves the offset of a file descriptor that `File`
    // keeps open for the duration of the call; it touches no memory of ours.
    let r = unsafe { libc::lseek(fd, pos, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// Without `SEEK_DATA`, the whole file is data.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn region_at(_file: &File, offset: u64, len: u64) -> io::Result<Region> {
    if offset >= len {
        Ok(Region::Hole(u64::MAX))
    } else {
        Ok(Region::Data(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn data_then_hole() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[2u8; 4096]).unwrap();
        let len = f.metadata().unwrap().len();
        assert_eq!(region_at(&f, 0, len).unwrap(), Region::Data(4096));
        match region_at(&f, 4096, len).unwrap() {
            // Some file systems (tmpfs, ext4) report the hole; others report data.
            Region::Hole(end) => assert_eq!(end, 1 << 20),
            Region::Data(end) => assert!(end > 4096),
        }
        assert_eq!(
            region_at(&f, (1 << 20) + 10, len).unwrap(),
            Region::Data(len)
        );
        assert_eq!(region_at(&f, len, len).unwrap(), Region::Hole(u64::MAX));
    }
}
