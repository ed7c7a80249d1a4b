//! What a backup or restore writes, in guest order: runs of clusters (a
//! qcow2 output) or byte pieces (a raw output), each data or zeros, derived
//! from the guest view's map over the ranges to copy.
//!
//! A qcow2 output has no subclusters, so a cluster with any byte that does
//! not read as zeros is stored whole as data; a cluster that reads as
//! zeros throughout is a zero cluster. Ranges are walked in windows so the
//! map entries held at once stay bounded.

use crate::error::Result;
use crate::guest::{MapEntry, Reader};

/// Guest bytes mapped per window: 16384 clusters (1 GiB at 64 KiB), so a
/// window holds at most that many map entries and a 16 TiB disk is walked
/// in 16384 windows; 1 GiB for raw outputs.
fn window(cluster: Option<u64>) -> u64 {
    cluster.map_or(1 << 30, |cs| cs << 14)
}

/// What a unit holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    /// Guest data, to read and store.
    Data,
    /// Reads as zeros, allocated as zeros in the source.
    Zero,
    /// Reads as zeros, not allocated in the source (nothing in the chain).
    Hole,
}

impl What {
    /// Whether the unit reads as zeros.
    pub fn is_zero(self) -> bool {
        self != What::Data
    }
}

/// A run of guest bytes of one kind. For qcow2 outputs `offset` and `len`
/// are whole clusters (the last may run past the virtual size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    /// First guest byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Data or zeros.
    pub what: What,
}

/// Which ranges a walk keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Backups: every byte of the ranges, data, zeros or holes.
    Everything,
    /// Restore: data only.
    DataOnly,
}

/// Walks `ranges` (sorted, non-overlapping guest ranges) and calls `emit`
/// with coalesced units. `cluster`: round to this cluster size (qcow2
/// output), or `None` for byte pieces (raw output).
///
/// # Errors
/// Metadata errors from the map, and whatever `emit` returns.
pub fn walk<F>(
    reader: &mut Reader<'_>,
    ranges: impl Iterator<Item = Result<(u64, u64)>>,
    cluster: Option<u64>,
    mode: Mode,
    emit: F,
) -> Result<()>
where
    F: FnMut(&mut Reader<'_>, Unit) -> Result<()>,
{
    let size = reader.chain().virtual_size();
    let mut w = Walker {
        cluster,
        mode,
        entries: Vec::new(),
        units: Vec::new(),
        pending: None,
        emit,
    };
    let mut rounded = Rounder::new(cluster, size);
    for r in ranges {
        let (off, len) = r?;
        if let Some((a, b)) = rounded.push(off, len) {
            w.range(reader, a, b)?;
        }
    }
    if let Some((a, b)) = rounded.finish() {
        w.range(reader, a, b)?;
    }
    if let Some(p) = w.pending.take() {
        (w.emit)(reader, p)?;
    }
    Ok(())
}

struct Walker<F> {
    cluster: Option<u64>,
    mode: Mode,
    entries: Vec<MapEntry>,
    units: Vec<Unit>,
    pending: Option<Unit>,
    emit: F,
}

impl<F> Walker<F>
where
    F: FnMut(&mut Reader<'_>, Unit) -> Result<()>,
{
    fn range(&mut self, reader: &mut Reader<'_>, a: u64, b: u64) -> Result<()> {
        let mut at = a;
        while at < b {
            let end = b.min(at.saturating_add(window(self.cluster)));
            self.entries.clear();
            for e in reader.map(at, end - at)? {
                self.entries.push(e?);
            }
            self.units.clear();
            match self.cluster {
                Some(cs) => classify_clusters(&self.entries, cs, self.mode, &mut self.units),
                None => classify_bytes(&self.entries, self.mode, &mut self.units),
            }
            for i in 0..self.units.len() {
                let u = self.units[i];
                match &mut self.pending {
                    Some(p) if p.what == u.what && p.offset + p.len == u.offset => p.len += u.len,
                    _ => {
                        if let Some(p) = self.pending.replace(u) {
                            (self.emit)(reader, p)?;
                        }
                    }
                }
            }
            at = end;
        }
        Ok(())
    }
}

/// Rounds ranges out to clusters (clipped to the disk) and merges those
/// that touch, so each cluster is walked once.
struct Rounder {
    cluster: Option<u64>,
    size: u64,
    cur: Option<(u64, u64)>,
}

impl Rounder {
    fn new(cluster: Option<u64>, size: u64) -> Self {
        Rounder {
            cluster,
            size,
            cur: None,
        }
    }

    fn push(&mut self, off: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 {
            return None;
        }
        let (a, b) = match self.cluster {
            Some(cs) => (
                off / cs * cs,
                off.saturating_add(len)
                    .div_ceil(cs)
                    .saturating_mul(cs)
                    .min(self.size),
            ),
            None => (off, off.saturating_add(len).min(self.size)),
        };
        match self.cur {
            Some((ca, cb)) if a <= cb => {
                self.cur = Some((ca, cb.max(b)));
                None
            }
            Some(done) => {
                self.cur = Some((a, b));
                Some(done)
            }
            None => {
                self.cur = Some((a, b));
                None
            }
        }
    }

    fn finish(&mut self) -> Option<(u64, u64)> {
        self.cur.take()
    }
}

fn keep(mode: Mode, data: bool, present: bool) -> Option<What> {
    match (mode, data, present) {
        (_, true, _) => Some(What::Data),
        (Mode::Everything, false, true) => Some(What::Zero),
        (Mode::Everything, false, false) => Some(What::Hole),
        (Mode::DataOnly, false, _) => None,
    }
}

fn push(units: &mut Vec<Unit>, u: Unit) {
    match units.last_mut() {
        Some(l) if l.what == u.what && l.offset + l.len == u.offset => l.len += u.len,
        _ => units.push(u),
    }
}

fn classify_bytes(entries: &[MapEntry], mode: Mode, units: &mut Vec<Unit>) {
    for e in entries {
        if let Some(what) = keep(mode, !e.zero, e.present) {
            push(
                units,
                Unit {
                    offset: e.start,
                    len: e.length,
                    what,
                },
            );
        }
    }
}

fn classify_clusters(entries: &[MapEntry], cs: u64, mode: Mode, units: &mut Vec<Unit>) {
    // (cluster, any data, any allocated) of a cluster seen in part so far.
    let mut partial: Option<(u64, bool, bool)> = None;
    let close = |units: &mut Vec<Unit>, c: u64, data: bool, present: bool| {
        if let Some(what) = keep(mode, data, present) {
            push(
                units,
                Unit {
                    offset: c * cs,
                    len: cs,
                    what,
                },
            );
        }
    };
    for e in entries {
        let (data, present) = (!e.zero, e.present);
        let mut s = e.start;
        let end = e.end();
        while s < end {
            let c = s / cs;
            let c_end = (c + 1) * cs;
            if s % cs == 0 && end >= c_end {
                if let Some((pc, pd, pp)) = partial.take() {
                    close(units, pc, pd, pp);
                }
                let n = (end - s) / cs;
                if let Some(what) = keep(mode, data, present) {
                    push(
                        units,
                        Unit {
                            offset: s,
                            len: n * cs,
                            what,
                        },
                    );
                }
                s += n * cs;
            } else {
                match &mut partial {
                    Some((pc, pd, pp)) if *pc == c => {
                        *pd |= data;
                        *pp |= present;
                    }
                    _ => {
                        if let Some((pc, pd, pp)) = partial.take() {
                            close(units, pc, pd, pp);
                        }
                        partial = Some((c, data, present));
                    }
                }
                s = end.min(c_end);
            }
        }
    }
    if let Some((pc, pd, pp)) = partial {
        close(units, pc, pd, pp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(start: u64, length: u64, zero: bool, present: bool) -> MapEntry {
        MapEntry {
            start,
            length,
            depth: 0,
            present,
            zero,
            data: !zero,
            compressed: false,
            offset: None,
        }
    }

    #[test]
    fn clusters_with_any_data_are_data() {
        let cs = 100;
        let entries = [
            e(0, 150, true, false),  // zeros: cluster 0, half of 1
            e(150, 10, false, true), // data inside cluster 1
            e(160, 240, true, true), // zeros to 400
            e(400, 50, false, true), // data, partial last cluster
        ];
        let mut u = Vec::new();
        classify_clusters(&entries, cs, Mode::Everything, &mut u);
        let got: Vec<_> = u.iter().map(|u| (u.offset, u.len, u.what)).collect();
        assert_eq!(
            got,
            [
                (0, 100, What::Hole),
                (100, 100, What::Data),
                (200, 200, What::Zero),
                (400, 100, What::Data)
            ]
        );
        let mut u = Vec::new();
        classify_clusters(&entries, cs, Mode::DataOnly, &mut u);
        assert_eq!(u.len(), 2);
    }

    #[test]
    fn rounding_merges_touching_ranges() {
        let mut r = Rounder::new(Some(100), 1000);
        assert_eq!(r.push(10, 10), None);
        assert_eq!(r.push(150, 10), None); // touches [0, 200)
        assert_eq!(r.push(450, 10), Some((0, 200)));
        assert_eq!(r.push(990, 100), Some((400, 500)));
        assert_eq!(r.finish(), Some((900, 1000)));
    }
}
