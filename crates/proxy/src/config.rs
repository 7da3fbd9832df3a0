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
    /// accept in time gets the "port is not open" 502. In cluster mode also
    /// the time to connect to a node's edge proxy, past which the sandbox is
    /// "not found".
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

/// Time a route fetched from the api is served from the cache, in
/// milliseconds. The api is asked again after it, so a sandbox that ended or
/// whose node was lost stops being routed within this time at the latest
/// (its edge answers for it meanwhile).
pub const DEFAULT_ROUTE_TTL_MS: u64 = 2_000;
/// Time an id the api does not know (or whose node is lost) is answered
/// "not found" without asking again, in milliseconds: a flood of requests
/// for an unknown id costs the api one request per this time.
pub const DEFAULT_NEGATIVE_TTL_MS: u64 = 500;
/// Most sandbox ids the route cache holds.
pub const DEFAULT_ROUTE_CACHE_MAX: usize = 65_536;
/// Time one route request to the api may take, in milliseconds (the proxied
/// request waits for it).
pub const DEFAULT_API_TIMEOUT_MS: u64 = 3_000;
/// How long after its last confirmation a route is still served while the
/// api fails (unreachable, 5xx), in seconds, so an api restart does not make
/// running sandboxes "not found".
pub const DEFAULT_STALE_IF_ERROR_SECS: u64 = 30;

/// Settings of [`ClusterRoutes`](crate::ClusterRoutes). `Default` gives the
/// values of the `DEFAULT_*` constants above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRoutesConfig {
    /// Time a fetched route is served without asking the api again; at
    /// least [`MIN_ROUTE_TTL`] is used, so a route just fetched is always
    /// still there for the request that fetched it.
    pub ttl: Duration,
    /// Time an unknown id (or one on a lost node) is not asked for again.
    pub negative_ttl: Duration,
    /// Most ids cached; beyond it expired entries go first, then arbitrary
    /// ones.
    pub max_entries: usize,
    /// Time one request to the api may take.
    pub api_timeout: Duration,
    /// Time after its last confirmation that a route is still served when
    /// the api cannot be asked; zero turns this off.
    pub stale_if_error: Duration,
}

/// The shortest route TTL used, whatever is configured.
pub const MIN_ROUTE_TTL: Duration = Duration::from_millis(100);

impl Default for ClusterRoutesConfig {
    fn default() -> Self {
        ClusterRoutesConfig {
            ttl: Duration::from_millis(DEFAULT_ROUTE_TTL_MS),
            negative_ttl: Duration::from_millis(DEFAULT_NEGATIVE_TTL_MS),
            max_entries: DEFAULT_ROUTE_CACHE_MAX,
            api_timeout: Duration::from_millis(DEFAULT_API_TIMEOUT_MS),
            stale_if_error: Duration::from_secs(DEFAULT_STALE_IF_ERROR_SECS),
        }
    }
}
