//! Compressed clusters: deflate (compression type 0) and zstd (type 1),
//! decompressed into a caller buffer of exactly one cluster.
//!
//! What QEMU accepts is accepted: a raw deflate stream with any window up
//! to 32 KiB whose output may run past the cluster (truncated); a zstd
//! stream of one or more frames, with or without checksum or content size,
//! followed by trailing bytes (QEMU's stored length always runs past the
//! frame). What QEMU refuses is refused: output shorter than a cluster, a
//! zstd stream decoding to more than a cluster, a stream that does not
//! decode. The output never exceeds one cluster, so a crafted cluster
//! cannot make us allocate more (zstd windows are capped too).

use super::layer::Qcow2Layer;
use crate::error::{Error, Result};
use crate::format::l2::CompressedDescriptor;
use crate::storage::ReadAt;
use flate2::{Decompress, FlushDecompress, Status};
use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

/// log2 of the largest zstd window we accept (8 MiB): enough for any
/// cluster (2 MiB) and far below libzstd's default, so a crafted frame
/// cannot make us allocate more.
const MAX_ZSTD_WINDOW_LOG: u32 = 23;

/// Reusable decompression state (one per thread).
pub struct Decompressor {
    inflate: Decompress,
    zstd: Option<Decoder<'static>>,
    input: Vec<u8>,
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decompressor").finish_non_exhaustive()
    }
}

impl Default for Decompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl Decompressor {
    /// Fresh state.
    pub fn new() -> Self {
        // Created on the first zstd cluster (most images use deflate).
        let zstd = None;
        Decompressor {
            inflate: Decompress::new(false),
            zstd,
            input: Vec::new(),
        }
    }

    /// Decompresses the cluster `desc` of `layer` (guest cluster at `gofs`)
    /// into `out` (exactly one cluster).
    ///
    /// # Errors
    /// The one-line error names the L1/L2 index, the guest offset and the host offset.
    pub fn cluster(
        &mut self,
        layer: &Qcow2Layer,
        desc: CompressedDescriptor,
        gofs: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let (l1, l2) = layer.indices(gofs);
        let object = || {
            format!("compressed cluster (L1 index {l1}, L2 index {l2}) at guest offset {gofs:#x}")
        };
        let file_len = layer.storage.len();
        // QEMU reads `len` bytes; a file ending earlier reads as zeros there.
        let avail = file_len.saturating_sub(desc.offset).min(desc.len());
        let n = usize::try_from(avail).unwrap_or(0);
        self.input.resize(n, 0);
        layer
            .storage
            .copy_at(desc.offset, &mut self.input)
            .map_err(|e| Error::io(object(), Some(desc.offset), e))?;
        let result = match layer.header.compression_type() {
            0 => inflate(&mut self.inflate, &self.input, out),
            _ => zstd_decoder(&mut self.zstd).and_then(|d| unzstd(d, &self.input, out)),
        };
        result.map_err(|msg| Error::corrupt(object(), desc.offset, msg))
    }
}

/// Raw deflate into `out`; output beyond `out` is dropped (as QEMU does).
fn inflate(d: &mut Decompress, input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    d.reset(false);
    let status = d
        .decompress(input, out, FlushDecompress::Finish)
        .map_err(|e| format!("deflate data does not decompress: {e}"))?;
    let got = d.total_out();
    if got == out.len() as u64 {
        return Ok(());
    }
    Err(match status {
        Status::StreamEnd => format!(
            "deflate data decompresses to {got} bytes, less than the cluster ({} bytes)",
            out.len()
        ),
        _ => format!(
            "deflate data ends after {got} of {} bytes (truncated stream)",
            out.len()
        ),
    })
}

fn zstd_decoder<'a>(
    d: &'a mut Option<Decoder<'static>>,
) -> std::result::Result<&'a mut Decoder<'static>, String> {
    if d.is_none() {
        let mut dec = Decoder::new().map_err(|e| format!("zstd decoder: {e}"))?;
        dec.set_parameter(DParameter::WindowLogMax(MAX_ZSTD_WINDOW_LOG))
            .map_err(|e| format!("zstd decoder: {e}"))?;
        *d = Some(dec);
    }
    d.as_mut().ok_or_else(|| "zstd decoder".to_string())
}

/// A zstd stream of one or more frames into `out`, as QEMU reads it: frames
/// decoded until the cluster is full, the last one required to end there
/// (a frame running past the cluster is refused); trailing bytes after it
/// are ignored, checksums are checked.
fn unzstd(
    d: &mut Decoder<'static>,
    input: &[u8],
    out: &mut [u8],
) -> std::result::Result<(), String> {
    let want = out.len();
    let zerr = |e: std::io::Error| format!("zstd data does not decompress: {e}");
    d.reinit().map_err(zerr)?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let (in0, out0) = (inb.pos(), outb.pos());
        // 0 exactly when a frame is completely decoded and flushed.
        let hint = d.run(&mut inb, &mut outb).map_err(zerr)?;
        if outb.pos() == want {
            if hint == 0 {
                return Ok(());
            }
            // The cluster is full: only the frame's end (an empty last block,
            // the checksum) may remain.
            let mut one = [0u8; 1];
            let mut extra = OutBuffer::around(&mut one[..]);
            let hint = d.run(&mut inb, &mut extra).map_err(zerr)?;
            return if extra.pos() == 0 && hint == 0 {
                Ok(())
            } else {
                Err(format!(
                    "zstd data decompresses to more than the cluster ({want} bytes)"
                ))
            };
        }
        if hint == 0 && inb.pos() == input.len() || inb.pos() == in0 && outb.pos() == out0 {
            return Err(format!(
                "zstd data decompresses to {} bytes, less than the cluster ({want} bytes)",
                outb.pos()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::new(6), false);
        let mut out = vec![0u8; data.len() + 1024];
        c.compress(data, &mut out, FlushCompress::Finish).unwrap();
        out.truncate(c.total_out() as usize);
        out
    }

    fn cluster_data(seed: u8) -> Vec<u8> {
        (0..65536u32)
            .map(|i| ((i / 7) as u8).wrapping_mul(seed) ^ (i % 251) as u8)
            .collect()
    }

    #[test]
    fn deflate_exact_trailing_overlong_and_short() {
        let data = cluster_data(3);
        let mut stream = deflate(&data);
        let mut d = Decompress::new(false);
        let mut out = vec![0u8; 65536];
        inflate(&mut d, &stream, &mut out).unwrap();
        assert_eq!(out, data);
        // Trailing bytes after the stream (the next cluster's) are ignored.
        stream.extend_from_slice(&[0xff; 300]);
        inflate(&mut d, &stream, &mut out).unwrap();
        assert_eq!(out, data);
        // Output longer than the cluster is truncated, like QEMU.
        let long: Vec<u8> = data.iter().chain(data.iter()).copied().collect();
        inflate(&mut d, &deflate(&long), &mut out).unwrap();
        assert_eq!(out, data);
        // Shorter output, a truncated stream and garbage are errors.
        let e = inflate(&mut d, &deflate(&data[..1000]), &mut out).unwrap_err();
        assert!(e.contains("decompresses to 1000 bytes"), "{e}");
        let s = deflate(&data);
        assert!(inflate(&mut d, &s[..s.len() / 2], &mut out).is_err());
        assert!(inflate(&mut d, &[0xff; 64], &mut out).is_err());
    }

    /// Hand-made zstd frames: raw blocks only (the format allows them), so
    /// the tests need no encoder.
    fn zstd_raw_frame(data: &[u8], checksum: bool) -> Vec<u8> {
        let mut f = vec![0x28, 0xb5, 0x2f, 0xfd];
        // Frame header descriptor: no content size, not single segment,
        // checksum flag; window descriptor 2^(10+7) = 128 KiB.
        f.push(if checksum { 0x04 } else { 0x00 });
        f.push(7 << 3);
        let chunks: Vec<&[u8]> = data.chunks(32768).collect();
        for (i, c) in chunks.iter().enumerate() {
            let last = u32::from(i + 1 == chunks.len());
            let h = last | ((c.len() as u32) << 3); // block type 0 = raw
            // zstd block headers are little-endian (3 bytes).
            f.extend_from_slice(&[h as u8, (h >> 8) as u8, (h >> 16) as u8]);
            f.extend_from_slice(c);
        }
        if checksum {
            // A checksum that cannot match: the frame must be refused.
            f.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        }
        f
    }

    #[test]
    fn zstd_frames_like_qemu() {
        let data = cluster_data(5);
        let mut d = None;
        let d = zstd_decoder(&mut d).unwrap();
        let mut out = vec![0u8; 65536];
        let mut frame = zstd_raw_frame(&data, false);
        unzstd(d, &frame, &mut out).unwrap();
        assert_eq!(out, data);
        // Trailing bytes are ignored.
        frame.extend_from_slice(&[0xab; 200]);
        out.fill(0);
        unzstd(d, &frame, &mut out).unwrap();
        assert_eq!(out, data);
        // Two frames of half a cluster each.
        let mut two = zstd_raw_frame(&data[..32768], false);
        two.extend(zstd_raw_frame(&data[32768..], false));
        out.fill(0);
        unzstd(d, &two, &mut out).unwrap();
        assert_eq!(out, data);
        // Too short, too long, garbage.
        let e = unzstd(d, &zstd_raw_frame(&data[..100], false), &mut out).unwrap_err();
        assert!(e.contains("less than the cluster"), "{e}");
        let long: Vec<u8> = data.iter().chain(data.iter()).copied().collect();
        let e = unzstd(d, &zstd_raw_frame(&long, false), &mut out).unwrap_err();
        assert!(e.contains("more than the cluster"), "{e}");
        assert!(unzstd(d, &[0x11; 100], &mut out).is_err());
        // A wrong checksum is refused.
        let e = unzstd(d, &zstd_raw_frame(&data, true), &mut out).unwrap_err();
        assert!(e.contains("checksum"), "{e}");
        // A real compressed frame.
        let mut real = zstd::bulk::compress(&data, 3).unwrap();
        real.extend_from_slice(&[0x5a; 300]);
        out.fill(0);
        unzstd(d, &real, &mut out).unwrap();
        assert_eq!(out, data);
    }
}
