//! The command-line front end. Uses only the library's public API.
//!
//! Exit status: 0 success, 1 error (usage errors included, like qemu-img).
//! Errors are one line on stderr starting with `qcow2-bitmap: `.

mod args;
mod backup_cmds;
mod commands;
mod integrity;
mod map;
mod output;
mod size;
mod write_cmds;

use std::ffi::OsString;
use std::io::{self, Write};
use std::process::ExitCode;

/// What a command failed with: a library error or a CLI-level message.
#[derive(Debug)]
pub enum Failure {
    /// From the library.
    Lib(qcow2_bitmap::Error),
    /// Writing to stdout failed (a closed pipe ends quietly).
    Io(io::Error),
}

impl From<qcow2_bitmap::Error> for Failure {
    fn from(e: qcow2_bitmap::Error) -> Self {
        Failure::Lib(e)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

/// Parses `argv`, runs the command, prints errors, returns the exit status.
pub fn run(argv: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match args::parse(argv) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match commands::dispatch(cli) {
        Ok(code) => code,
        Err(Failure::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(Failure::Io(e)) => fail(&format!("writing output: {e}")),
        Err(Failure::Lib(e)) => fail(&e.to_string()),
    }
}

fn fail(msg: &str) -> ExitCode {
    let _ = writeln!(io::stderr(), "qcow2-bitmap: {msg}");
    ExitCode::from(1)
}
