//! Running the xmoe-top binary the way a user does, for the CLI tests.

use std::path::Path;
use std::process::{Command, Output};

/// Runs xmoe-top with `args` in `dir`, without colours.
pub fn xmoe(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xmoe-top"))
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

/// stdout and stderr as text.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}
