//! Idle upstream connections per (sandbox, port, relay).
//!
//! Upstream is always HTTP/1.1, over a socket dialed inside the sandbox's
//! netns (which costs a thread) or, in cluster mode, over TCP to the node's
//! edge proxy; keeping idle connections makes a proxied request cost one
//! round trip. The two kinds never share a key: a connection into a netns
//! is never handed a relayed request, nor the reverse, and a sandbox's
//! relay connections are not reused for another edge should its route
//! change. A connection goes back into the pool
//! only once its response body was read to the end and hyper says it is
//! ready for another request, so the pool holds ready connections only.
//! Every connection task also watches its sandbox's token: when the sandbox
//! ends, its connections close, idle or not.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arca_proto::node::Route;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::body::ProxyBody;
use crate::dial::{DialError, dial, dial_address, dial_relay};

/// Sends requests on one upstream connection.
pub(crate) type Sender = http1::SendRequest<ProxyBody>;

/// Pool key: sandbox id, port and, for a relayed route, the edge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub(crate) sandbox_id: String,
    pub(crate) port: u16,
    pub(crate) relay: Option<SocketAddr>,
}

impl Key {
    /// The key of requests to `port` over `route`.
    pub(crate) fn new(route: &Route, port: u16) -> Key {
        Key {
            sandbox_id: route.sandbox_id.to_string(),
            port,
            relay: route.relay,
        }
    }
}

/// A failed connection attempt.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// Dialing failed.
    #[error("cannot dial")]
    Dial(#[from] DialError),
    /// The HTTP/1.1 handshake failed.
    #[error("cannot start an HTTP/1.1 connection")]
    Handshake(#[source] hyper::Error),
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

/// The pool.
#[derive(Debug)]
pub(crate) struct Pool {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    idle_timeout: Duration,
    max_idle_per_key: usize,
    connect_timeout: Duration,
}

impl Pool {
    pub(crate) fn new(
        idle_timeout: Duration,
        max_idle_per_key: usize,
        connect_timeout: Duration,
    ) -> Pool {
        Pool {
            idle: Mutex::default(),
            idle_timeout,
            max_idle_per_key,
            connect_timeout,
        }
    }

    /// A ready idle connection, most recently used first.
    pub(crate) fn take(&self, key: &Key) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(key)?;
        let mut found = None;
        while let Some(entry) = list.pop() {
            if entry.since.elapsed() < self.idle_timeout
                && !entry.sender.is_closed()
                && entry.sender.is_ready()
            {
                found = Some(entry.sender);
                break;
            }
        }
        if list.is_empty() {
            idle.remove(key);
        }
        found
    }

    /// Dials a new connection (to the route's edge when it has a relay),
    /// whose task ends when `token` is cancelled.
    pub(crate) async fn connect(
        &self,
        route: &Route,
        port: u16,
        token: CancellationToken,
    ) -> Result<Sender, ConnectError> {
        let stream = match (route.relay, route.address) {
            (Some(addr), _) => dial_relay(addr, self.connect_timeout).await?,
            // A VM: its own address, from the host.
            (None, Some(ip)) => dial_address(ip, port, self.connect_timeout).await?,
            (None, None) => dial(&route.netns, port, self.connect_timeout).await?,
        };
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        let sandbox_id = route.sandbox_id.clone();
        tokio::spawn(async move {
            tokio::select! {
                res = conn.with_upgrades() => {
                    if let Err(err) = res {
                        tracing::debug!(%sandbox_id, port, ?err, "upstream connection failed");
                    }
                }
                () = token.cancelled() => {}
            }
        });
        Ok(sender)
    }

    /// Returns a connection whose last response was read to the end; it is
    /// kept once hyper has it ready for the next request.
    pub(crate) fn put(self: &Arc<Self>, key: Key, mut sender: Sender) {
        // Bodies may be dropped outside the runtime (at shutdown): then the
        // connection just closes.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = Arc::clone(self);
        runtime.spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let list = idle.entry(key).or_default();
            if list.len() < pool.max_idle_per_key {
                list.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        });
    }

    /// Drops every idle connection of a sandbox.
    pub(crate) fn evict(&self, sandbox_id: &str) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|key, _| key.sandbox_id != sandbox_id);
    }

    /// Drops idle connections that timed out or closed.
    pub(crate) fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        for list in idle.values_mut() {
            list.retain(|e| e.since.elapsed() < self.idle_timeout && !e.sender.is_closed());
        }
        idle.retain(|_, list| !list.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use arca_proto::node::SandboxId;

    use super::*;

    #[test]
    fn relayed_and_netns_connections_never_share_a_key() {
        let mut route = Route {
            sandbox_id: SandboxId::parse("alpha").unwrap(),
            netns: PathBuf::from("/run/netns/alpha"),
            envd_access_token: None,
            ingress: Default::default(),
            relay: None,
            address: None,
        };
        let netns = Key::new(&route, 8080);
        route.relay = Some("10.0.0.5:3101".parse().unwrap());
        let relayed = Key::new(&route, 8080);
        route.relay = Some("10.0.0.6:3101".parse().unwrap());
        let elsewhere = Key::new(&route, 8080);
        assert_ne!(netns, relayed);
        assert_ne!(relayed, elsewhere);
        assert_ne!(relayed, Key::new(&route, 49983));
    }
}
