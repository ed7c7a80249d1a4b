//! A small, bounded cache of L2 tables, shared by every layer of a chain.
//! Tables are copied out of the file (one `pread` per table), so scanning a
//! 16 TiB image's tables keeps the resident set at the cache's budget.

use crate::error::Result;
use std::collections::HashMap;

/// Total bytes of L2 tables kept.
const BUDGET: usize = 4 << 20;
/// Most tables kept, whatever their size.
const MAX_SLOTS: usize = 256;

/// FIFO-evicted L2 tables keyed by (layer depth, table offset).
#[derive(Debug, Default)]
pub struct L2Cache {
    index: HashMap<(usize, u64), usize>,
    slots: Vec<((usize, u64), Vec<u8>)>,
    next: usize,
    loads: u64,
}

impl L2Cache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tables read from the files so far.
    pub fn loads(&self) -> u64 {
        self.loads
    }

    /// The table at `offset` of layer `depth`, `len` bytes, loaded with `load` on a miss.
    pub fn get(
        &mut self,
        depth: usize,
        offset: u64,
        len: usize,
        load: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<&[u8]> {
        let key = (depth, offset);
        if let Some(&i) = self.index.get(&key) {
            return Ok(&self.slots[i].1);
        }
        let capacity = (BUDGET / len.max(1)).clamp(2, MAX_SLOTS);
        let i = if self.slots.len() < capacity {
            self.slots.push((key, vec![0; len]));
            self.slots.len() - 1
        } else {
            let i = self.next % self.slots.len();
            self.next = i + 1;
            let old = self.slots[i].0;
            self.index.remove(&old);
            self.slots[i].0 = key;
            self.slots[i].1.resize(len, 0);
            i
        };
        if let Err(e) = load(&mut self.slots[i].1) {
            // Leave no half-loaded table behind.
            self.slots.swap_remove(i);
            self.index.clear();
            for (j, s) in self.slots.iter().enumerate() {
                self.index.insert(s.0, j);
            }
            return Err(e);
        }
        self.loads += 1;
        self.index.insert(key, i);
        Ok(&self.slots[i].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_evicts_and_forgets_failed_loads() {
        let mut c = L2Cache::new();
        let len = BUDGET / 2; // capacity 2
        for off in [0u64, 1, 0, 1] {
            let t = c.get(0, off, len, |b| {
                b[0] = off as u8 + 1;
                Ok(())
            });
            assert_eq!(t.unwrap()[0], off as u8 + 1);
        }
        assert_eq!(c.loads(), 2);
        c.get(1, 0, len, |b| {
            b[0] = 9;
            Ok(())
        })
        .unwrap();
        assert_eq!(c.loads(), 3);
        let e = c.get(2, 0, len, |_| Err(crate::Error::invalid_input("t", "boom")));
        assert!(e.is_err());
        // The failed table is not cached.
        let t = c.get(2, 0, len, |b| {
            b[0] = 7;
            Ok(())
        });
        assert_eq!(t.unwrap()[0], 7);
        assert_eq!(c.get(1, 0, len, |_| unreachable!()).unwrap()[0], 9);
    }
}
