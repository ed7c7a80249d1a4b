//! Newtypes for the three units this format mixes up: host file offsets,
//! host clusters and guest bytes; and [`Geometry`], computed once from a
//! validated header so no other code shifts by `cluster_bits` by hand.

use std::fmt;

/// A byte offset in the image file (host side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

/// A cluster index in the image file: `HostOffset / cluster_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostCluster(pub u64);

/// A byte offset on the virtual disk (guest side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:x}", self.0)
    }
}

/// Cluster arithmetic of one image. Built only from a validated header
/// (`cluster_bits` in 9..=21), so every shift here is in range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    cluster_bits: u32,
}

impl Geometry {
    /// Smallest cluster size QEMU accepts (512 B).
    pub const MIN_CLUSTER_BITS: u32 = 9;
    /// Largest cluster size QEMU accepts (2 MiB).
    pub const MAX_CLUSTER_BITS: u32 = 21;

    /// Geometry for `cluster_bits`, or `None` outside QEMU's 9..=21.
    pub fn new(cluster_bits: u32) -> Option<Self> {
        (Self::MIN_CLUSTER_BITS..=Self::MAX_CLUSTER_BITS)
            .contains(&cluster_bits)
            .then_some(Geometry { cluster_bits })
    }

    /// Geometry for `cluster_bits` clamped into 9..=21 (for values already validated).
    pub fn clamped(cluster_bits: u32) -> Self {
        Geometry {
            cluster_bits: cluster_bits.clamp(Self::MIN_CLUSTER_BITS, Self::MAX_CLUSTER_BITS),
        }
    }

    /// log2 of the cluster size.
    pub fn cluster_bits(self) -> u32 {
        self.cluster_bits
    }

    /// Cluster size in bytes.
    pub fn cluster_size(self) -> u64 {
        1 << self.cluster_bits
    }

    /// Cluster size in bytes as `usize` (at most 2 MiB, so it always fits).
    pub fn cluster_len(self) -> usize {
        1 << self.cluster_bits
    }

    /// Whether `off` is a multiple of the cluster size.
    pub fn is_aligned(self, off: u64) -> bool {
        off & (self.cluster_size() - 1) == 0
    }

    /// The cluster containing `off`.
    pub fn cluster_of(self, off: HostOffset) -> HostCluster {
        HostCluster(off.0 >> self.cluster_bits)
    }

    /// The first byte of cluster `c` (`None` on overflow).
    pub fn offset_of(self, c: HostCluster) -> Option<HostOffset> {
        c.0.checked_mul(self.cluster_size()).map(HostOffset)
    }

    /// Number of clusters needed to hold `bytes` bytes.
    pub fn clusters_for(self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_limits_and_arithmetic() {
        assert!(Geometry::new(8).is_none());
        assert!(Geometry::new(22).is_none());
        let g = Geometry::new(16).unwrap();
        assert_eq!(g.cluster_size(), 65536);
        assert!(g.is_aligned(0x110000));
        assert!(!g.is_aligned(0x110200));
        assert_eq!(g.cluster_of(HostOffset(0x110001)), HostCluster(0x11));
        assert_eq!(g.offset_of(HostCluster(0x11)), Some(HostOffset(0x110000)));
        assert_eq!(g.offset_of(HostCluster(u64::MAX)), None);
        assert_eq!(g.clusters_for(65537), 2);
        assert_eq!(g.clusters_for(0), 0);
    }
}
