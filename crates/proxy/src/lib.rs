//! `arca-proxy`: the edge that lets the unmodified E2B SDKs reach ports
//! inside sandboxes (CONTRACT.md 1.5 and 1.6).
//!
//! Every request is routed on its own, since a kept-alive client connection
//! carries requests for many sandboxes:
//!
//! - by the `E2b-Sandbox-Id` and `E2b-Sandbox-Port` headers the SDKs send on
//!   every envd call, when the host is shared (`localhost`, an IP literal,
//!   `sandbox.*`: the `E2B_SANDBOX_URL` recipe);
//! - by the host `<port>-<sandboxId>.<domain>` otherwise (`get_host()` URLs
//!   and wildcard DNS);
//! - header-less signed `/files` URLs go to the sandbox whose access token
//!   reproduces the signature.
//!
//! Clients may speak HTTP/1.1 or h2 (h2c here, TLS being left to a front);
//! the sandbox side is always HTTP/1.1 to `127.0.0.1:<port>`, dialed from a
//! socket made inside the sandbox's network namespace, so services bound to
//! loopback are reachable. Bodies stream both ways without buffering;
//! upgrades (websocket or any other) become raw tunnels. Missing sandboxes
//! and closed ports get the E2B-shaped 502s the SDKs classify; envd's
//! `/init` is refused. When a sandbox ends, everything in flight for it is
//! reset, not ended cleanly, so the SDKs report the sandbox's end.
//!
//! Ingress settings (ADR 0005 section 5): every port but envd's of a
//! sandbox created with `allowPublicTraffic: false` needs its token in
//! `e2b-traffic-access-token` (an E2B-shaped 403 otherwise, decided before
//! a paused sandbox would be woken); the header never reaches the sandbox.
//! `maskRequestHost` replaces the Host sent to those ports.
//!
//! Cluster mode (`arca proxy` in front of N `arca node`s): each node runs
//! this proxy as its edge, over its own routes. A front proxy serves the
//! same code over [`ClusterRoutes`], which asks the api which node holds a
//! sandbox (cached for a couple of seconds) and gives routes with a
//! [`relay`](arca_proto::node::Route::relay): the request goes to that
//! node's edge unchanged, which applies every rule above itself. When the
//! edge cuts a sandbox's traffic, the front passes the reset on; a node that
//! cannot be reached, or that the api reports lost, makes its sandboxes
//! "not found".
//!
//! Dialing into a namespace needs `CAP_SYS_ADMIN` (the node runs as root);
//! a front proxy needs no privilege.
//!
//! ```no_run
//! use std::sync::Arc;
//! use arca_proto::node::RouteSource;
//!
//! async fn run(routes: Arc<dyn RouteSource>) -> std::io::Result<()> {
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
//!     arca_proxy::serve(listener, routes, arca_proxy::ProxyConfig::default()).await
//! }
//! ```
#![forbid(unsafe_code)]

mod abort;
mod body;
mod cluster;
mod config;
mod dial;
mod error;
mod forward;
mod pool;
mod route;

use std::io;
use std::os::fd::AsFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arca_proto::node::{RouteSource, SandboxId};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub use crate::cluster::{ClusterRoutes, ClusterRoutesError};
pub use crate::config::{
    ClusterRoutesConfig, DEFAULT_API_TIMEOUT_MS, DEFAULT_CONNECT_TIMEOUT_SECS,
    DEFAULT_HEADER_READ_TIMEOUT_SECS, DEFAULT_MAX_CONCURRENT_STREAMS, DEFAULT_NEGATIVE_TTL_MS,
    DEFAULT_POOL_IDLE_TIMEOUT_SECS, DEFAULT_POOL_MAX_IDLE, DEFAULT_ROUTE_CACHE_MAX,
    DEFAULT_ROUTE_TTL_MS, DEFAULT_STALE_IF_ERROR_SECS, MIN_ROUTE_TTL, ProxyConfig,
};
/// envd's port inside every sandbox; `/init` on it is refused.
pub const ENVD_PORT: u16 = route::ENVD_PORT;

use crate::abort::{ClientConn, Sandboxes};
use crate::forward::Shared;
use crate::pool::Pool;

/// Boxed error of bodies and services.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Pause after a failed `accept` (out of descriptors, mostly), which also
/// bounds the warnings it logs.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves the proxy on `listener` until the returned future is dropped;
/// dropping it also closes every client connection and tunnel.
///
/// `routes` is asked for a sandbox's route on each request (an in-memory
/// lookup is expected) and for the whole table only by header-less `/files`
/// requests; its [`RouteSource::ended`] feed aborts what is in flight for a
/// sandbox and drops its idle upstream connections.
///
/// Failing `accept`s are logged and retried, so this only returns by being
/// dropped.
pub async fn serve(
    listener: TcpListener,
    routes: Arc<dyn RouteSource>,
    config: ProxyConfig,
) -> io::Result<()> {
    let shutdown = CancellationToken::new();
    let _stop_tasks = shutdown.clone().drop_guard();
    let shared = Arc::new(Shared {
        routes: Arc::clone(&routes),
        pool: Arc::new(Pool::new(
            config.pool_idle_timeout,
            config.pool_max_idle,
            config.connect_timeout,
        )),
        sandboxes: Sandboxes::default(),
    });
    // Subscribe before the first accept, so no end is missed.
    tokio::spawn(watch_ended(
        Arc::clone(&shared),
        routes.ended(),
        shutdown.clone(),
    ));
    tokio::spawn(sweep(
        Arc::clone(&shared),
        config.pool_idle_timeout,
        shutdown.clone(),
    ));

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    builder
        .http2()
        .max_concurrent_streams(config.max_concurrent_streams);
    let builder = Arc::new(builder);

    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(err) => {
                tracing::warn!(?err, "proxy cannot accept a connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        tokio::spawn(serve_connection(
            Arc::clone(&builder),
            Arc::clone(&shared),
            stream,
            shutdown.clone(),
        ));
    }
}

/// Whether a rate-limited log line may be written now: at most one a second
/// per `last` (seconds since the Unix epoch of the last line).
pub(crate) fn log_allowed(last: &AtomicU64) -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let prev = last.load(Ordering::Relaxed);
    now > prev
        && last
            .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Serves one client connection (HTTP/1.1 or h2) until it closes, is killed
/// by an abort, or the proxy stops.
async fn serve_connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    shared: Arc<Shared>,
    stream: TcpStream,
    shutdown: CancellationToken,
) {
    // Envd streams are many small messages; never hold them back.
    let _ = stream.set_nodelay(true);
    let socket = match stream.as_fd().try_clone_to_owned() {
        Ok(socket) => socket,
        Err(err) => {
            tracing::warn!(?err, "cannot duplicate a client socket");
            return;
        }
    };
    let client = Arc::new(ClientConn::new(socket));
    let killed = client.killed().clone();
    // The service owns the only handle to `client` but tunnels' and
    // in-flight requests': it goes with the connection.
    let service =
        service_fn(move |req| forward::handle(Arc::clone(&shared), Arc::clone(&client), req));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::select! {
        res = conn => {
            if let Err(err) = res {
                tracing::debug!(?err, "client connection ended with an error");
            }
        }
        () = killed.cancelled() => {}
        () = shutdown.cancelled() => {}
    }
}

/// Aborts a sandbox's traffic and drops its pooled connections when it ends.
async fn watch_ended(
    shared: Arc<Shared>,
    mut ended: broadcast::Receiver<SandboxId>,
    shutdown: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            next = ended.recv() => next,
            () = shutdown.cancelled() => return,
        };
        match next {
            Ok(id) => {
                shared.sandboxes.end(id.as_str());
                shared.pool.evict(id.as_str());
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "proxy missed sandbox end notifications, reconciling"
                );
                for id in shared.sandboxes.reconcile(&*shared.routes) {
                    shared.pool.evict(&id);
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Drops idle upstream connections past their time, and abort tokens
/// nothing holds, now and then.
async fn sweep(shared: Arc<Shared>, idle_timeout: Duration, shutdown: CancellationToken) {
    let period = (idle_timeout / 2).max(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {
                shared.pool.sweep();
                shared.sandboxes.prune();
            }
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_logs_allow_one_line_a_second() {
        let last = AtomicU64::new(0);
        assert!(log_allowed(&last));
        assert!(last.load(Ordering::Relaxed) > 0);
        // A line was written "later" than now: none until then.
        let last = AtomicU64::new(u64::MAX);
        assert!(!log_allowed(&last));
    }
}
