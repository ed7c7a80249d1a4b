//! Placeholder; the real benchmarks follow.
fn main() {}
