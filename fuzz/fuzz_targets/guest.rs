//! The guest-data path over a whole hostile image: the input is written to
//! a file on tmpfs (`guest::Chain::open` takes a path; see the README), then
//! everything the data commands do with it: open the chain, `map` the whole
//! virtual size, read a few ranges. Ok or Err, never a panic or an abort,
//! and what succeeds must be consistent:
//!
//! - map entries are non-empty, contiguous from the range start, and end
//!   inside the range (at most `MAX_ENTRIES` are taken);
//! - a range the map reports as reading zeros reads as zeros;
//! - every error is one line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_bitmap::guest::Chain;
use qcow2_bitmap::lock::Access;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Map entries taken per input (a 2 PiB image can have billions).
const MAX_ENTRIES: usize = 10_000;
/// Bytes per read, so that one input allocates little.
const READ: u64 = 128 << 10;

fn one_line(e: &qcow2_bitmap::Error) {
    let s = e.to_string();
    assert!(!s.contains('\n'), "multi-line error: {s:?}");
}

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("qcow2-bitmap-fuzz-guest-{}.qcow2", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(path, data).expect("write the scratch image");
    let chain = match Chain::open(path, Access::Read) {
        Ok(c) => c,
        Err(e) => return one_line(&e),
    };
    let size = chain.virtual_size();
    let mut reader = chain.reader();
    let mut zeros: Vec<(u64, u64)> = Vec::new();
    match reader.map(0, size) {
        Ok(it) => {
            let mut pos = 0;
            for e in it.take(MAX_ENTRIES) {
                match e {
                    Ok(e) => {
                        assert_eq!(e.start, pos, "entry {e:?} does not continue at {pos}");
                        assert!(e.length > 0, "empty entry {e:?}");
                        pos = e.start.checked_add(e.length).expect("entry end overflows");
                        assert!(pos <= size, "entry {e:?} past the virtual size {size}");
                        if e.zero && zeros.len() < 8 {
                            zeros.push((e.start, e.length.min(READ)));
                        }
                    }
                    Err(e) => {
                        one_line(&e);
                        break;
                    }
                }
            }
        }
        Err(e) => one_line(&e),
    }
    let mut buf = vec![0u8; READ as usize];
    for (start, len) in zeros {
        match reader.read_at(start, &mut buf[..len as usize]) {
            Ok(()) => assert!(
                buf[..len as usize].iter().all(|&b| b == 0),
                "map says {start}+{len} reads as zeros, the read disagrees"
            ),
            Err(e) => one_line(&e),
        }
    }
    for start in [0, size / 2, size.saturating_sub(READ)] {
        let len = READ.min(size - start.min(size));
        if len == 0 {
            continue;
        }
        if let Err(e) = reader.read_at(start, &mut buf[..len as usize]) {
            one_line(&e);
        }
    }
});
