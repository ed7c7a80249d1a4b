//! Benchmark inputs shared by the bit benchmarks: a seeded generator and
//! bitmaps of typical densities (sparse, half, clustered dirty extents).
#![allow(dead_code)]

use qcow2_bitmap::bits::Bitmap;

/// splitmix64: a tiny deterministic generator for benchmark inputs.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// All-zero bitmap whose pages are really mapped (not the shared zero page).
pub fn touched_zeros(len: u64) -> Bitmap {
    let mut b = Bitmap::ones(len);
    b.clear_range(0..len);
    b
}

/// About `len / per` bits set at random positions.
pub fn sparse(len: u64, per: u64, rng: &mut Rng) -> Bitmap {
    let mut b = touched_zeros(len);
    for _ in 0..(len / per).max(1) {
        b.set(rng.next() % len);
    }
    b
}

/// Each bit set with probability 1/2.
pub fn half(len: u64, rng: &mut Rng) -> Bitmap {
    let words = (0..len.div_ceil(64)).map(|_| rng.next()).collect();
    Bitmap::from_words(words, len)
}

/// Dirty-extent-like clusters: runs of 1..=4096 bits separated by gaps of
/// 1..=65536 bits.
pub fn clustered(len: u64, rng: &mut Rng) -> Bitmap {
    let mut b = touched_zeros(len);
    let mut pos = 0;
    while pos < len {
        pos += 1 + rng.next() % 65536;
        let run = 1 + rng.next() % 4096;
        b.set_range(pos..pos.saturating_add(run));
        pos += run;
    }
    b
}
