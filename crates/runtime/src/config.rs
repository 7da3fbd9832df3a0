//! What the re-exec'd init needs to build a sandbox: serialized by the node,
//! read by `arca __init` on its stdin.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A contiguous id mapping of a user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    /// First id inside the sandbox (0: root).
    pub inside: u32,
    /// Host id it maps to.
    pub outside: u32,
    /// How many ids.
    pub count: u32,
}

/// Host uid/gid of sandbox root: one shared range for every sandbox (see
/// `docs/adr/0002-ns-runtime.md`); template files are stored shifted by it.
pub const DEFAULT_ID_MAP: IdMap = IdMap {
    inside: 0,
    outside: 100_000,
    count: 65_536,
};

/// Everything `arca __init` needs; paths are host paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitConfig {
    /// Sandbox id (for messages).
    pub sandbox_id: String,
    /// Host name inside.
    pub hostname: String,
    /// Read-only layers, upper-most first.
    pub lower_dirs: Vec<PathBuf>,
    /// Writable layer. With [`InitConfig::disk`] it must lie inside the
    /// disk's mount point and is created there.
    pub upper_dir: PathBuf,
    /// overlayfs work directory (same file system as `upper_dir`).
    pub work_dir: PathBuf,
    /// Empty directory the root file system is assembled on.
    pub root_dir: PathBuf,
    /// envd binary on the host; bind-mounted read-only at [`ENVD_PATH`].
    pub envd_binary: PathBuf,
    /// envd's arguments.
    pub envd_args: Vec<String>,
    /// envd's environment.
    pub env: Vec<(String, String)>,
    /// A network namespace of the sandbox's own, with only `lo` (up): the
    /// caller moves an interface in after launch. `false` keeps the host's
    /// (tests only).
    pub own_netns: bool,
    /// cgroup directories to join.
    pub cgroup_dirs: Vec<PathBuf>,
    /// User and group id mapping.
    pub id_map: IdMap,
    /// `/proc/sys/kernel/random/boot_id` inside.
    pub boot_id: String,
    /// Set `no_new_privs` (breaks setuid programs such as sudo).
    pub no_new_privs: bool,
    /// A file system image that holds the writable layer, so writes stop
    /// at its size; mounted only inside the sandbox's mount namespace.
    pub disk: Option<DiskSpec>,
    /// Files written into the root file system before envd starts (path
    /// inside, content), owned by sandbox root: `/etc/hosts` and the like.
    pub files: Vec<(String, String)>,
}

/// The sandbox's disk: an ext4 image attached to a loop device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The image file (its size is the disk's size).
    pub image: PathBuf,
    /// Empty directory it is mounted on (inside the sandbox's mount
    /// namespace only).
    pub mount_point: PathBuf,
}

/// Where envd appears inside every sandbox.
pub const ENVD_PATH: &str = "/run/arca/envd";
