//! The `qcow2-bitmap` command-line tool: parse arguments, run one command
//! through the library's public API, map the outcome to an exit status.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::run(std::env::args_os())
}
