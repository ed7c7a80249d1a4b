//! `repair` over an in-memory image (`Vec<u8>` is a `WriteAt` storage), with
//! both in-use policies. Repair must refuse with a one-line error, or leave
//! an image that:
//!
//! - opens, and whose `check` verdict matches the report's `clean` flag;
//! - has nothing wrong with its bitmaps (no unusable bitmap, no bitmap
//!   corruption) and nothing left for a second repair to plan;
//! - is clean, unless the report says what was left alone (refcount errors
//!   outside the bitmaps, or leaks not freed because the owner walk was
//!   incomplete), as `repair`'s documentation promises.
//!
//! Anything else panics with a message naming the broken promise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_bitmap::read::{Image, Severity, Verdict};
use qcow2_bitmap::write::repair::{self, InUsePolicy};

fn one_line(e: &qcow2_bitmap::Error) {
    let s = e.to_string();
    assert!(!s.contains('\n'), "multi-line error: {s:?}");
}

fn run(data: &[u8], policy: InUsePolicy) {
    // The dry run must not fail where the read path works.
    if let Ok(img) = Image::open(data.to_vec()) {
        match repair::repair_dry_run(&img, policy) {
            Ok(_) => {}
            Err(e) => one_line(&e),
        }
    }
    let (out, report) = match repair::repair(data.to_vec(), policy) {
        Ok(r) => r,
        Err(e) => return one_line(&e),
    };
    let img = match Image::open(out) {
        Ok(img) => img,
        Err(e) => panic!("{policy:?}: repaired image does not open: {e}\nactions: {:#?}", report.actions),
    };
    let after = match img.check() {
        Ok(r) => r,
        Err(e) => panic!("{policy:?}: check after repair failed: {e}"),
    };
    let verdict = after.verdict();
    let why = || format!("{policy:?}: verdict {verdict:?}\nactions: {:#?}\nfindings: {:#?}", report.actions, after.findings);
    assert_eq!(report.clean, verdict == Verdict::Clean, "report.clean disagrees with check: {}", why());
    assert!(!after.bitmap_corruption, "bitmap corruption after repair: {}", why());
    assert_eq!(after.count(Severity::Unusable), 0, "unusable bitmaps after repair: {}", why());
    let second = repair::plan(&img, policy);
    assert!(second.is_empty(), "a second repair would still do {:#?}\n{}", second.actions, why());
    if verdict != Verdict::Clean {
        let explained = report.actions.iter().any(|a| {
            a.message.contains("were left alone") || a.message.contains("leaked clusters were not freed")
        });
        assert!(explained, "repair left the image unclean without saying why: {}", why());
    }
}

fuzz_target!(|data: &[u8]| {
    run(data, InUsePolicy::Dirty);
    run(data, InUsePolicy::Remove);
});
