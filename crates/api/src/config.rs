//! The api's section of `arca.toml`.

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
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            domain: None,
            max_timeout_secs: DEFAULT_MAX_TIMEOUT_SECS,
            default_cpu: DEFAULT_CPU_COUNT,
            default_memory_mb: DEFAULT_MEMORY_MB,
            default_disk_mb: DEFAULT_DISK_MB,
        }
    }
}
