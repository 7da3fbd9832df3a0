//! `arca __restore`: brings a checkpointed sandbox back with CRIU. CRIU
//! recreates every mount of the sandbox but its root, so this re-exec of
//! the `arca` binary mounts the root (disk and overlay, as `arca __init`
//! stage 1 does) in a private mount namespace of its own and then becomes
//! `criu restore` there; the restored tree keeps the root and the private
//! namespace goes with this process.

use std::io::Read;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::InitConfig;

/// What `arca __restore` reads on its stdin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreConfig {
    /// The sandbox as it was booted: only its root's mounts (`disk`,
    /// `lower_dirs`, `upper_dir`, `work_dir`, `root_dir`) are used.
    pub init: InitConfig,
    /// The `criu` binary.
    pub criu: PathBuf,
    /// Its arguments (`restore ...`, with `--root` at `init.root_dir`).
    pub args: Vec<String>,
}

/// Entry point of `arca __restore`: mounts the root and execs CRIU, whose
/// exit status becomes this process's. Prints a reason and returns 1 on a
/// failure before that.
pub fn restore_main() -> i32 {
    let mut input = String::new();
    let cfg = std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("reading the restore config: {e}"))
        .and_then(|_| {
            serde_json::from_str::<RestoreConfig>(&input)
                .map_err(|e| format!("bad restore config: {e}"))
        });
    let err = match cfg.and_then(|cfg| prepare(&cfg).map(|()| cfg)) {
        Ok(cfg) => {
            let e = std::process::Command::new(&cfg.criu).args(&cfg.args).exec();
            format!("running {}: {e}", cfg.criu.display())
        }
        Err(e) => e,
    };
    eprintln!("arca __restore: {err}");
    1
}

fn prepare(cfg: &RestoreConfig) -> Result<(), String> {
    // Into the sandbox's cgroup first: the memory CRIU restores is charged
    // to whoever allocates it, and a charge does not follow a task that
    // moves later. (CRIU's own few MiB count there too, until it exits.)
    crate::launch::join_cgroups(&cfg.init.cgroup_dirs)?;
    crate::launch::private_mounts()?;
    crate::init::mount_root(&cfg.init)
}
