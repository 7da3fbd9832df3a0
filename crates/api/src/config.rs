//! The api's section of `arca.toml`.

use std::path::PathBuf;

use serde::Deserialize;

/// Longest sandbox lifetime a request may ask for, in seconds (24 hours, the
/// reference's Pro limit).
pub const DEFAULT_MAX_TIMEOUT_SECS: u64 = 86_400;
/// CPUs of a sandbox whose template does not say.
pub const DEFAULT_CPU_COUNT: u32 = 2;
/// Memory of a sandbox whose template does not say, in MiB.
pub const DEFAULT_MEMORY_MB: u32 = 512;
/// Writable disk of a sandbox whose template does not say, in MiB.
pub const DEFAULT_DISK_MB: u32 = 1024;
/// Most CPUs a template build may ask for.
pub const DEFAULT_MAX_CPU_COUNT: u32 = 8;
/// Most memory a template build may ask for, in MiB.
pub const DEFAULT_MAX_MEMORY_MB: u32 = 8192;
/// Most disk a template build may ask for (`minFreeDiskMb`), in MiB.
pub const DEFAULT_MAX_DISK_MB: u32 = 20_480;
/// Largest uploaded COPY archive, in bytes (1 GiB).
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 1 << 30;
/// Template builds that run at once; more wait their turn.
pub const DEFAULT_MAX_CONCURRENT_BUILDS: usize = 2;
/// Base URL of upload links when none is configured.
pub const DEFAULT_PUBLIC_URL: &str = "http://127.0.0.1:3000";

/// Settings of the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Base domain returned to SDKs as the sandbox `domain` (their envd host
    /// becomes `49983-<id>.<domain>`); `None` leaves it to the client's
    /// `E2B_DOMAIN`.
    pub domain: Option<String>,
    /// Upper bound of every `timeout` in seconds (create, connect,
    /// set_timeout).
    pub max_timeout_secs: u64,
    /// CPUs for templates that do not set their own.
    pub default_cpu: u32,
    /// Memory in MiB for templates that do not set their own.
    pub default_memory_mb: u32,
    /// Disk in MiB for templates that do not set their own.
    pub default_disk_mb: u32,
    /// Upper bound of a template build's `cpuCount`.
    pub max_cpu_count: u32,
    /// Upper bound of a template build's `memoryMB`.
    pub max_memory_mb: u32,
    /// Upper bound of a template build's `minFreeDiskMb`, MiB. A build's
    /// disk is the larger of that and `default_disk_mb`.
    pub max_disk_mb: u32,
    /// Where uploaded COPY archives are kept, as `<uploads_dir>/<hash>`.
    /// Builders read them from there (under `arca up` the node shares the
    /// directory); created at start if missing.
    pub uploads_dir: PathBuf,
    /// Largest archive the upload route accepts, in bytes.
    pub max_upload_bytes: u64,
    /// This server's base URL as SDKs reach it (no trailing slash needed).
    /// Upload links point there: `<public_url>/uploads/<template>/<hash>`.
    pub public_url: String,
    /// Template builds that run at once (at least 1); later ones report
    /// `waiting` until a slot frees up. Sandboxes are never held up by
    /// builds.
    pub max_concurrent_builds: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            domain: None,
            max_timeout_secs: DEFAULT_MAX_TIMEOUT_SECS,
            default_cpu: DEFAULT_CPU_COUNT,
            default_memory_mb: DEFAULT_MEMORY_MB,
            default_disk_mb: DEFAULT_DISK_MB,
            max_cpu_count: DEFAULT_MAX_CPU_COUNT,
            max_memory_mb: DEFAULT_MAX_MEMORY_MB,
            max_disk_mb: DEFAULT_MAX_DISK_MB,
            uploads_dir: std::env::temp_dir().join("arca-uploads"),
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            public_url: DEFAULT_PUBLIC_URL.to_string(),
            max_concurrent_builds: DEFAULT_MAX_CONCURRENT_BUILDS,
        }
    }
}
