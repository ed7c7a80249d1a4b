//! Positional storage: the [`ReadAt`] trait the read path works on, with
//! implementations for memory (`[u8]`, `Vec<u8>`) and for a memory-mapped
//! file ([`MappedFile`]). Nothing here knows about qcow2.
//!
//! `read_at` returns a borrowed slice, so mapped files and memory images are
//! read without copying; only short reads past the end fail.

use std::fs::File;
use std::io;

/// Random-access, read-only byte storage.
pub trait ReadAt {
    /// Total length in bytes.
    fn len(&self) -> u64;

    /// Whether the storage is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `len` bytes at `offset`, borrowed when possible, else copied into `scratch`.
    ///
    /// # Errors
    /// `UnexpectedEof` when the range is not entirely inside the storage.
    fn read_at<'a>(
        &'a self,
        offset: u64,
        len: usize,
        scratch: &'a mut Vec<u8>,
    ) -> io::Result<&'a [u8]>;

    /// Copies `buf.len()` bytes at `offset` into `buf`. For one-pass scans of
    /// large areas: a mapped file answers with `pread`, so the scanned pages
    /// do not stay in the process's resident set.
    ///
    /// # Errors
    /// `UnexpectedEof` when the range is not entirely inside the storage.
    fn copy_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut scratch = Vec::new();
        let bytes = self.read_at(offset, buf.len(), &mut scratch)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
}

fn eof(offset: u64, len: usize, total: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("{len} bytes at offset {offset} run past the end of the file ({total} bytes)"),
    )
}

fn slice_at(bytes: &[u8], offset: u64, len: usize) -> io::Result<&[u8]> {
    let total = bytes.len() as u64;
    let start = usize::try_from(offset).map_err(|_| eof(offset, len, total))?;
    let end = start.checked_add(len).filter(|&e| e <= bytes.len());
    match end {
        Some(end) => Ok(&bytes[start..end]),
        None => Err(eof(offset, len, total)),
    }
}

impl ReadAt for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at<'a>(&'a self, offset: u64, len: usize, _: &'a mut Vec<u8>) -> io::Result<&'a [u8]> {
        slice_at(self, offset, len)
    }
}

impl ReadAt for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
    fn read_at<'a>(&'a self, offset: u64, len: usize, _: &'a mut Vec<u8>) -> io::Result<&'a [u8]> {
        slice_at(self, offset, len)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn copy_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).copy_at(offset, buf)
    }
    fn read_at<'a>(&'a self, offset: u64, len: usize, s: &'a mut Vec<u8>) -> io::Result<&'a [u8]> {
        (**self).read_at(offset, len, s)
    }
}

/// Positional storage that can also be written. Writes are not durable
/// until [`WriteAt::sync`] returns (the write path's commit protocol relies on
/// exactly that, and tests inject crashes between writes and syncs).
pub trait WriteAt: ReadAt {
    /// Writes all of `data` at `offset`, growing the storage if needed.
    ///
    /// # Errors
    /// I/O errors (including an injected crash in tests).
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;

    /// Makes every earlier write durable (fdatasync for files).
    ///
    /// # Errors
    /// I/O errors (including an injected crash in tests).
    fn sync(&mut self) -> io::Result<()>;
}

impl WriteAt for Vec<u8> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start
            .checked_add(data.len())
            .ok_or_else(|| io::Error::other("write past usize::MAX"))?;
        if end > self.len() {
            self.resize(end, 0);
        }
        self[start..end].copy_from_slice(data);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A file opened read-write, accessed with `pread`/`pwrite`.
///
/// Reads copy into the caller's scratch buffer (no mapping, so the file can
/// grow while it is open).
#[derive(Debug)]
pub struct RwFile {
    file: File,
    len: u64,
}

impl RwFile {
    /// Wraps a file opened read-write (which should already hold its locks).
    ///
    /// # Errors
    /// Fails when the file cannot be stat'ed.
    pub fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(RwFile { file, len })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The underlying file, given back.
    pub fn into_file(self) -> File {
        self.file
    }
}

impl ReadAt for RwFile {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at<'a>(
        &'a self,
        offset: u64,
        len: usize,
        scratch: &'a mut Vec<u8>,
    ) -> io::Result<&'a [u8]> {
        use std::os::unix::fs::FileExt;
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(eof(offset, len, self.len));
        }
        scratch.clear();
        scratch.resize(len, 0);
        self.file.read_exact_at(scratch, offset)?;
        Ok(scratch)
    }
    /// Copies only what the file system reports as data: holes (which a
    /// sparse copy of an image makes of every zero block of a bitmap's
    /// clusters) read as zeros without filling the page cache with zeroed
    /// pages. SEEK_DATA may report a hole as data, never data as a hole, and
    /// where it is not supported everything is read.
    fn copy_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = offset.checked_add(buf.len() as u64);
        let Some(end) = end.filter(|&end| end <= self.len) else {
            return Err(eof(offset, buf.len(), self.len));
        };
        let mut pos = offset;
        while pos < end {
            let at = |o: u64| (o - offset) as usize;
            let Some(data) = seek(&self.file, pos, Whence::Data) else {
                return self.file.read_exact_at(&mut buf[at(pos)..], pos);
            };
            let data = data.clamp(pos, end);
            buf[at(pos)..at(data)].fill(0);
            if data == end {
                break;
            }
            let hole = seek(&self.file, data, Whence::Hole).map_or(end, |h| h.clamp(data, end));
            // A hole right at `data` would contradict SEEK_DATA: read the rest.
            let hole = if hole == data { end } else { hole };
            self.file
                .read_exact_at(&mut buf[at(data)..at(hole)], data)?;
            pos = hole;
        }
        Ok(())
    }
}

/// Which `lseek` search.
#[derive(Clone, Copy)]
enum Whence {
    Data,
    Hole,
}

/// `lseek(SEEK_DATA | SEEK_HOLE)` from `pos`: the next data (or hole)
/// offset, the file length when there is no data after `pos` (ENXIO), or
/// None when the search is not available (then everything counts as data).
/// Moves the descriptor's file position, which positional I/O ignores.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
fn seek(file: &File, pos: u64, whence: Whence) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let how = match whence {
        Whence::Data => libc::SEEK_DATA,
        Whence::Hole => libc::SEEK_HOLE,
    };
    let off = libc::off_t::try_from(pos).ok()?;
    // SAFETY: lseek takes plain integers and touches no memory of ours; the
    // descriptor is valid for the call because `file` is borrowed.
    let ret = unsafe { libc::lseek(file.as_raw_fd(), off, how) };
    if ret >= 0 {
        return u64::try_from(ret).ok();
    }
    match io::Error::last_os_error().raw_os_error() {
        // No data at or after `pos`: the rest is a hole.
        Some(libc::ENXIO) if matches!(whence, Whence::Data) => {
            file.metadata().ok().map(|m| m.len())
        }
        _ => None,
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn seek(_: &File, _: u64, _: Whence) -> Option<u64> {
    None
}

impl WriteAt for RwFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(data, offset)?;
        self.len = self.len.max(offset.saturating_add(data.len() as u64));
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A file opened read-only and mapped into memory.
///
/// The [`File`] is kept so that its byte-range locks live as long as the map.
#[derive(Debug)]
pub struct MappedFile {
    file: File,
    map: Option<memmap2::Mmap>,
}

impl MappedFile {
    /// Maps `file` (which should already hold the locks the caller needs).
    ///
    /// # Errors
    /// Fails when the file cannot be stat'ed or mapped.
    pub fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        // An empty file cannot be mapped on every platform; treat it as no bytes.
        let map = if len == 0 {
            None
        } else {
            Some(map_readonly(&file)?)
        };
        Ok(MappedFile { file, map })
    }

    /// The underlying file (for locks and metadata).
    pub fn file(&self) -> &File {
        &self.file
    }

    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// The crate's one `unsafe` block that maps a file.
///
/// SAFETY: `Mmap::map` is unsafe because another process may truncate or
/// modify the file while it is mapped. We hold QEMU's shared read lock with
/// "write" and "resize" unshared (unless the user passed `--force-share`), so
/// no cooperating writer can change or shrink the file while we read it. With
/// `--force-share`, QEMU itself reads the same racy bytes; a concurrent
/// truncation could raise SIGBUS, which is the documented risk of `-U`.
#[allow(unsafe_code)]
fn map_readonly(file: &File) -> io::Result<memmap2::Mmap> {
    // SAFETY: see the function documentation above.
    unsafe { memmap2::Mmap::map(file) }
}

impl ReadAt for MappedFile {
    fn len(&self) -> u64 {
        self.bytes().len() as u64
    }
    fn read_at<'a>(&'a self, offset: u64, len: usize, _: &'a mut Vec<u8>) -> io::Result<&'a [u8]> {
        slice_at(self.bytes(), offset, len)
    }
    fn copy_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        slice_at(self.bytes(), offset, buf.len())?;
        self.file.read_exact_at(buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn rw_file_copies_holes_as_zeros_and_data_as_written() {
        let tmp = tempfile::tempfile().unwrap();
        let mut f = RwFile::new(tmp).unwrap();
        // Data at 0..4K, 68K..72K (unaligned start 70000) and the last byte of 1 MiB.
        f.write_at(0, &[0xaa; 4096]).unwrap();
        f.write_at(70_000, &[0xbb; 100]).unwrap();
        f.write_at((1 << 20) - 1, &[0xcc]).unwrap();
        let mut whole = vec![0u8; 1 << 20];
        f.file().read_exact_at(&mut whole, 0).unwrap();
        for (off, len) in [
            (0u64, 1usize << 20),
            (1, 4096),
            (4096, 65536),
            (65536, 65536),
            (69_999, 102),
            ((1 << 20) - 4096, 4096),
            (200_000, 0),
        ] {
            let mut buf = vec![0x55u8; len];
            f.copy_at(off, &mut buf).unwrap();
            assert!(
                buf == whole[off as usize..off as usize + len],
                "{off} {len}"
            );
        }
        let mut past = [0u8; 2];
        assert!(f.copy_at((1 << 20) - 1, &mut past).is_err());
    }

    #[test]
    fn memory_writes_grow() {
        let mut v = vec![1u8, 2];
        v.write_at(4, &[9, 9]).unwrap();
        assert_eq!(v, [1, 2, 0, 0, 9, 9]);
        v.write_at(0, &[7]).unwrap();
        assert_eq!(v[0], 7);
        v.sync().unwrap();
    }

    #[test]
    fn rw_file_reads_what_it_wrote() {
        let f = tempfile::tempfile().unwrap();
        let mut rw = RwFile::new(f).unwrap();
        rw.write_at(10, b"abc").unwrap();
        assert_eq!(ReadAt::len(&rw), 13);
        let mut s = Vec::new();
        assert_eq!(rw.read_at(10, 3, &mut s).unwrap(), b"abc");
        assert!(rw.read_at(11, 3, &mut s).is_err());
        rw.sync().unwrap();
    }

    #[test]
    fn memory_reads_and_bounds() {
        let v: Vec<u8> = (0..16).collect();
        let mut s = Vec::new();
        assert_eq!(v.read_at(4, 3, &mut s).unwrap(), &[4, 5, 6]);
        assert_eq!(v.read_at(16, 0, &mut s).unwrap(), &[] as &[u8]);
        assert!(v.read_at(15, 2, &mut s).is_err());
        assert!(v.read_at(u64::MAX, 2, &mut s).is_err());
        assert_eq!(ReadAt::len(&v), 16);
    }
}
