//! SHA-256 of a bitmap exactly as QEMU's QMP `x-debug-block-dirty-bitmap-sha256`
//! computes it: the serialized bitmap (`ceil(nbits / 8)` bytes, bits past
//! `nbits` zero) zero-padded to a multiple of 8 bytes, at least 8 bytes.
//! Streams cluster by cluster; all-zero and all-ones entries are synthesised.

use super::{BitmapEntry, Image};
use crate::error::Result;
use crate::format::bitmap_table::TableEntry;
use crate::storage::ReadAt;
use sha2::{Digest, Sha256};

const CHUNK: usize = 64 * 1024;

impl<S: ReadAt> Image<S> {
    /// QEMU's debug SHA-256 of bitmap `b`.
    ///
    /// # Errors
    /// `Untrusted` unless `b` is `ok` or `force`; table and I/O errors.
    pub fn sha256(&self, b: &BitmapEntry, force: bool) -> Result<[u8; 32]> {
        self.require_ok(b, force)?;
        let t = self.table(b)?;
        let mut h = Sha256::new();
        let mut scratch = Vec::new();
        let mut fed = 0u64;
        for k in 0..t.entries.len() {
            let (first, end) = t.cluster_bits(k);
            let nbits = end - first;
            match t.entries[k] {
                TableEntry::Data(off) => {
                    let bytes = self.cluster_bytes(off, nbits, &mut scratch)?;
                    feed_masked(&mut h, bytes, nbits);
                }
                TableEntry::Ones => feed_ones(&mut h, nbits),
                _ => feed_fill(&mut h, 0, nbits.div_ceil(8)),
            }
            fed += nbits.div_ceil(8);
        }
        let padded = fed.div_ceil(8).max(1) * 8;
        feed_fill(&mut h, 0, padded - fed);
        Ok(h.finalize().into())
    }
}

/// Feeds `bytes` (which hold `nbits` bits) with the bits past `nbits` cleared.
fn feed_masked(h: &mut Sha256, bytes: &[u8], nbits: u64) {
    let rem = (nbits % 8) as u32;
    match bytes.split_last() {
        Some((&last, head)) if rem != 0 => {
            h.update(head);
            h.update([last & ((1u8 << rem) - 1)]);
        }
        _ => h.update(bytes),
    }
}

fn feed_ones(h: &mut Sha256, nbits: u64) {
    feed_fill(h, 0xff, nbits / 8);
    let rem = (nbits % 8) as u32;
    if rem != 0 {
        h.update([(1u8 << rem) - 1]);
    }
}

fn feed_fill(h: &mut Sha256, byte: u8, mut n: u64) {
    let buf = [byte; CHUNK];
    while n > 0 {
        let step = n.min(CHUNK as u64) as usize;
        h.update(&buf[..step]);
        n -= step as u64;
    }
}

/// Lower-case hex of a digest.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(f: impl FnOnce(&mut Sha256)) -> String {
        let mut h = Sha256::new();
        f(&mut h);
        hex(&h.finalize())
    }

    #[test]
    fn masking_and_fill_match_plain_bytes() {
        let plain = digest(|h| h.update([0xff, 0x0f]));
        assert_eq!(digest(|h| feed_masked(h, &[0xff, 0xff], 12)), plain);
        assert_eq!(digest(|h| feed_ones(h, 12)), plain);
        assert_eq!(digest(|h| feed_fill(h, 0, 100_000)), digest(|h| h.update(vec![0u8; 100_000])));
        // SHA-256 of 8 zero bytes, the hash QEMU reports for an empty tiny bitmap.
        assert_eq!(digest(|h| feed_fill(h, 0, 8)), "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc");
    }
}
