//! Helpers of the unit tests that run on the real kernel (root and `nft`
//! needed; without them the tests print why and pass, unless
//! `ARCA_TEST_PRIVILEGED=1`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

/// Deletes the throwaway table, also when the test fails.
pub(crate) struct TableGuard {
    family: &'static str,
    name: String,
}

impl TableGuard {
    pub(crate) fn new(family: &'static str, name: &str) -> Self {
        Self {
            family,
            name: name.to_owned(),
        }
    }
}

impl Drop for TableGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", self.family, &self.name])
            .status();
    }
}

/// Runs `nft -f -` with `script`.
pub(crate) fn nft(script: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Why a real-kernel test cannot run here, if it cannot.
pub(crate) fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (netlink, nft)");
    }
    let nft_ok = std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !nft_ok {
        return Some("needs the nft binary");
    }
    None
}
