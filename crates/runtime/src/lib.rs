//! Isolation backends of Arca sandboxes.
//!
//! The `ns` backend (the default, and the only one so far) builds a sandbox
//! from Linux namespaces: a re-exec of the `arca` binary ([`init_main`],
//! behind the hidden `arca __init` command) joins the sandbox's cgroup and
//! network namespace, assembles an overlay root with `/proc`, a minimal
//! `/dev`, read-only `/sys` and envd mounted read-only, pivots into it,
//! enters a user namespace (sandbox root is host uid 100000), installs a
//! seccomp filter, trims the capability bounding set and execs envd as PID 1.
//!
//! ```no_run
//! use arca_runtime::{InitConfig, cgroup::Layout, launch};
//! # fn run(cfg: InitConfig) -> Result<(), Box<dyn std::error::Error>> {
//! Layout::detect()?.check()?;
//! let pid = launch(std::path::Path::new("/usr/local/bin/arca"), &cfg)?;
//! # let _ = pid; Ok(()) }
//! ```
#![deny(unsafe_code)]

mod apply;
pub mod cgroup;
mod config;
pub mod gvisor;
mod init;
mod launch;
mod restore;
pub mod seccomp;
#[allow(unsafe_code)]
mod sys;
pub mod vm;

use std::path::PathBuf;

pub use apply::{ApplyOptions, apply, apply_main};
pub use config::{DEFAULT_ID_MAP, DiskSpec, ENVD_PATH, IdMap, InitConfig};
pub use gvisor::{GvisorConfig, gvisor_main};
pub use init::init_main;
pub use launch::launch;
pub use restore::{RestoreConfig, restore_main};
pub use vm::vm_main;

/// Starting a sandbox failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The init binary could not be run.
    #[error("cannot run the sandbox init {exe}")]
    Spawn {
        /// The binary.
        exe: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The init ran and reported a failure (its message names the step).
    #[error("sandbox init failed: {0}")]
    Init(String),
}

/// `PATH`'s first executable file called `name` (a backend's tool: runsc,
/// QEMU).
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A fresh boot id (a random UUID v4 in its text form).
pub fn new_boot_id() -> String {
    let b: [u8; 16] = rand::random();
    let mut b = b;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn boot_ids_are_uuid_v4_and_differ() {
        let a = super::new_boot_id();
        let b = super::new_boot_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
