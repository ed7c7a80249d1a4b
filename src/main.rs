//! The `qcow2-bitmap` command-line tool (placeholder until the CLI lands).
fn main() {}
