//! SHA-256 of a bitmap exactly as QEMU's QMP `x-debug-block-dirty-bitmap-sha256`
//! computes it: SHA-256 over QEMU's in-memory bitmap words, which are the
//! serialized bitmap bytes up to `ceil(nbits / 64) * 8` (at least 8 bytes).
//!
//! QEMU keeps the *tail bits* between `nbits` and the end of that last 64-bit
//! word as they are on disk (fixture `tail-bits.qcow2`: setting them changes
//! QEMU's hash but not its dirty count), and an all-ones table entry sets them
//! too (fixture `allones.qcow2`). Bits beyond the last word are dropped. So
//! the hash is over the raw bytes, unmasked, cluster by cluster; all-zero and
//! all-ones entries are synthesised.

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
        let padded = t.nbits.div_ceil(64).max(1) * 8;
        let per = t.geometry.cluster_size();
        let mut fed = 0u64;
        for entry in &t.entries {
            let n = per.min(padded - fed);
            match *entry {
                TableEntry::Data(off) => h.update(self.cluster_bytes(off, n * 8, &mut scratch)?),
                TableEntry::Ones => feed_fill(&mut h, 0xff, n),
                _ => feed_fill(&mut h, 0, n),
            }
            fed += n;
        }
        feed_fill(&mut h, 0, padded - fed);
        Ok(h.finalize().into())
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
    fn fill_matches_plain_bytes() {
        assert_eq!(
            digest(|h| feed_fill(h, 0, 100_000)),
            digest(|h| h.update(vec![0u8; 100_000]))
        );
        assert_eq!(
            digest(|h| feed_fill(h, 0xff, 70_000)),
            digest(|h| h.update(vec![0xffu8; 70_000]))
        );
        // SHA-256 of 8 zero bytes, the hash QEMU reports for an empty tiny bitmap.
        assert_eq!(
            digest(|h| feed_fill(h, 0, 8)),
            "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
        );
    }
}
