//! Settings of the proxy.

use std::time::Duration;

/// Concurrent h2 streams a client may open per connection; clients open
/// more connections beyond it (CONTRACT 1.5: the reference edge uses 100).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
/// Time to connect to a port inside a sandbox, in seconds.
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 5;
/// Time an idle upstream connection is kept for reuse, in seconds.
pub const DEFAULT_POOL_IDLE_TIMEOUT_SECS: u64 = 90;
/// Idle upstream connections kept per (sandbox, port).
pub const DEFAULT_POOL_MAX_IDLE: usize = 32;
/// Time a client has to send a request head on HTTP/1.1, in seconds.
pub const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 30;

/// Settings of [`serve`](crate::serve). `Default` gives the values of the
/// `DEFAULT_*` constants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Concurrent h2 streams per client connection.
    pub max_concurrent_streams: u32,
    /// Time to connect to a port inside a sandbox; a sandbox that does not
    /// accept in time gets the "port is not open" 502.
    pub connect_timeout: Duration,
    /// Time an idle upstream connection is kept.
    pub pool_idle_timeout: Duration,
    /// Idle upstream connections kept per (sandbox, port); 0 disables reuse.
    pub pool_max_idle: usize,
    /// Time a client has to send an HTTP/1.1 request head (slow-loris guard).
    pub header_read_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            connect_timeout: Duration::from_secs(DEFAULT_CONNECT_TIMEOUT_SECS),
            pool_idle_timeout: Duration::from_secs(DEFAULT_POOL_IDLE_TIMEOUT_SECS),
            pool_max_idle: DEFAULT_POOL_MAX_IDLE,
            header_read_timeout: Duration::from_secs(DEFAULT_HEADER_READ_TIMEOUT_SECS),
        }
    }
}
