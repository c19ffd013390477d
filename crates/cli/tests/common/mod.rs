//! Helpers shared by the CLI integration tests: the repository root and running the
//! `tooltrain` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `tooltrain` with `args` (in the test's working directory, without RUST_LOG).
pub fn tooltrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tooltrain"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run tooltrain")
}

/// The process's standard error.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Standard output and standard error.
pub fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), stderr(o))
}
