//! placeholder: the refcount layer is being written on branch `refcount`.
use crate::error::{Error, Result};
use crate::format::header::Header;
use crate::storage::{ReadAt, WriteAt};
use crate::types::HostCluster;

/// Refcounts (placeholder).
#[derive(Debug)]
pub struct Refcounts;

impl Refcounts {
    /// Loads (placeholder).
    pub fn load<S: ReadAt>(_s: &S, _h: &Header) -> Result<Self> {
        Err(Error::invalid_input("refcounts", "not implemented yet"))
    }
    /// Allocates (placeholder).
    pub fn allocate<S: ReadAt>(&mut self, _s: &S, _n: u64) -> Result<HostCluster> {
        Err(Error::invalid_input("refcounts", "not implemented yet"))
    }
    /// Queues a free (placeholder).
    pub fn queue_free(&mut self, _c: HostCluster) {}
    /// Flushes (placeholder).
    pub fn flush_increments<S: WriteAt>(&mut self, _s: &mut S) -> Result<()> {
        Ok(())
    }
    /// Applies frees (placeholder).
    pub fn apply_decrements<S: WriteAt>(&mut self, _s: &mut S) -> Result<()> {
        Ok(())
    }
}
