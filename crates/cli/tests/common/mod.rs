//! Helpers shared by the integration tests that run the `arca` binary.
#![allow(unreachable_pub, dead_code)]

use std::process::{Command, Output};

/// `arca args` with none of the settings of the caller's environment.
pub fn arca(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_arca"));
    c.args(args);
    for v in [
        "ARCA_HOME",
        "E2B_API_URL",
        "E2B_API_KEY",
        "E2B_SANDBOX_URL",
        "ARCA_LOG",
    ] {
        c.env_remove(v);
    }
    c
}

/// Runs `c` to its end: exit code (-1 when killed), stdout, stderr.
pub fn run(c: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = c.output().unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}
