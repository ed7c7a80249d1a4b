//! Reading guest bytes: each run in one `pread` (contiguous host clusters
//! together), zeros filled in, compressed clusters decompressed (in
//! parallel when one read spans several of them).

use super::compressed::Decompressor;
use super::layer::{Kind, Layer, Qcow2Layer};
use super::{Chain, Reader};
use crate::error::{Error, Result};
use crate::format::l2::CompressedDescriptor;
use crate::storage::ReadAt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

/// One compressed cluster that a read needs, and where its bytes go.
struct Job<'b> {
    depth: usize,
    desc: CompressedDescriptor,
    gofs: u64,
    within: usize,
    out: &'b mut [u8],
}

/// The cores this process may use, asked once (on Linux the answer reads
/// cgroup files: not something to do on every read).
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Fewest compressed clusters in one read worth spreading over threads.
const PARALLEL_MIN_JOBS: usize = 4;

impl Reader<'_> {
    /// Fills `buf` with the guest bytes at `offset`.
    ///
    /// # Errors
    /// A range past the virtual size, I/O errors, and every metadata problem
    /// met on the way (a read never returns zeros for a corrupt mapping).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.chain.check_range(offset, buf.len() as u64)?;
        let chain = self.chain;
        let mut jobs: Vec<Job<'_>> = Vec::new();
        let mut pos = offset;
        let mut out = buf;
        while !out.is_empty() {
            let st = self.resolve(pos, out.len() as u64, true)?;
            // A run is at most `out.len()` bytes, so it fits in usize.
            let n = usize::try_from(st.len).unwrap_or(out.len()).min(out.len());
            let (head, rest) = std::mem::take(&mut out).split_at_mut(n);
            let member = &chain.members()[st.depth];
            match st.kind {
                Kind::Data { host } | Kind::DataHole { host } => {
                    member
                        .layer
                        .data_storage()
                        .copy_at(host, head)
                        .map_err(|e| {
                            Error::io(
                                format!(
                                    "{}: guest data at {pos:#x}",
                                    chain.host_file_name(st.depth)
                                ),
                                Some(host),
                                e,
                            )
                        })?;
                }
                Kind::Compressed { desc, within } => jobs.push(Job {
                    depth: st.depth,
                    desc,
                    gofs: pos - within,
                    within: within as usize,
                    out: head,
                }),
                Kind::ZeroAlloc { .. } | Kind::ZeroPlain | Kind::Unallocated { .. } => head.fill(0),
            }
            pos += n as u64;
            out = rest;
        }
        if jobs.is_empty() {
            return Ok(());
        }
        let threads = cores();
        if jobs.len() >= PARALLEL_MIN_JOBS && threads > 1 {
            // The reader's own buffer is used as scratch: forget what it held.
            self.cached = None;
            return decompress_parallel(
                chain,
                jobs,
                threads,
                &mut self.decompressor,
                &mut self.cluster,
            );
        }
        for job in jobs {
            self.compressed_into(job)?;
        }
        Ok(())
    }

    /// Serves one job from the last decompressed cluster, decompressing on a miss.
    fn compressed_into(&mut self, job: Job<'_>) -> Result<()> {
        let key = (job.depth, job.desc.offset);
        if self.cached != Some(key) {
            self.cached = None;
            let q = qcow2_of(self.chain, job.depth)?;
            self.cluster.resize(q.geometry().cluster_len(), 0);
            self.decompressor
                .cluster(q, job.desc, job.gofs, &mut self.cluster)
                .map_err(|e| e.context(self.chain.members()[job.depth].path.display()))?;
            self.cached = Some(key);
        }
        job.out
            .copy_from_slice(&self.cluster[job.within..job.within + job.out.len()]);
        Ok(())
    }
}

fn qcow2_of(chain: &Chain, depth: usize) -> Result<&Qcow2Layer> {
    match &chain.members()[depth].layer {
        Layer::Qcow2(q) => Ok(q),
        Layer::Raw(_) => Err(Error::invalid_input(
            chain.members()[depth].path.display().to_string(),
            "a raw file has no compressed clusters (a bug)",
        )),
    }
}

/// Decompresses `jobs` on `threads` threads, the caller's among them. The
/// threads take jobs one at a time from a shared queue in guest order, so a
/// thread that gets less CPU (a loaded machine) does fewer of them; the
/// error returned is that of the first failing job in guest order.
fn decompress_parallel(
    chain: &Chain,
    jobs: Vec<Job<'_>>,
    threads: usize,
    decompressor: &mut Decompressor,
    cluster: &mut Vec<u8>,
) -> Result<()> {
    let helpers = threads.min(jobs.len()) - 1;
    let queue = Mutex::new(jobs.into_iter().enumerate());
    let failed = AtomicBool::new(false);
    let work = |d: &mut Decompressor, cluster: &mut Vec<u8>| -> Option<(usize, Error)> {
        while !failed.load(Ordering::Relaxed) {
            let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
            let Some((i, job)) = next else { break };
            let member = &chain.members()[job.depth];
            let r = qcow2_of(chain, job.depth).and_then(|q| {
                cluster.resize(q.geometry().cluster_len(), 0);
                d.cluster(q, job.desc, job.gofs, cluster)
                    .map_err(|e| e.context(member.path.display()))
            });
            if let Err(e) = r {
                failed.store(true, Ordering::Relaxed);
                return Some((i, e));
            }
            job.out
                .copy_from_slice(&cluster[job.within..job.within + job.out.len()]);
        }
        None
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..helpers)
            .map(|_| s.spawn(|| work(&mut Decompressor::new(), &mut Vec::new())))
            .collect();
        // Jobs before a failing one were all taken before it, so the lowest
        // index among the failures is the first failing job.
        let mut first = work(decompressor, cluster);
        for h in handles {
            let r = h.join().unwrap_or_else(|_| {
                Some((
                    0,
                    Error::invalid_input("decompression thread", "panicked (a bug)"),
                ))
            });
            if let Some((i, e)) = r
                && first.as_ref().is_none_or(|(j, _)| i < *j)
            {
                first = Some((i, e));
            }
        }
        first.map_or(Ok(()), |(_, e)| Err(e))
    })
}
