//! The `xmoe-top` command line.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("xmoe-top: not yet usable");
    ExitCode::FAILURE
}
