//! Aborting everything in flight for a sandbox when it ends.
//!
//! The SDKs tell "the sandbox died" from "the stream ended" by how the
//! connection breaks (CONTRACT 1.6, item 4): a clean end of a chunked body
//! or a Connect end-of-stream message gives the user a different exception.
//! So when a sandbox ends, every proxied request and tunnel of it is cut at
//! the transport level:
//!
//! - HTTP/1.1: the client's TCP connection is reset. Each client connection
//!   keeps a duplicate of its socket's file descriptor ([`ClientConn`]); the
//!   abort sets `SO_LINGER` to zero on it and drops the connection, so the
//!   kernel answers with RST instead of FIN. One request is in flight per
//!   HTTP/1.1 connection, so nothing else is hit.
//! - h2: only the stream is reset (`RST_STREAM`), by failing its response
//!   body or its service future; other sandboxes' streams on the connection
//!   go on.
//!
//! Each running sandbox that has traffic gets a [`CancellationToken`] in
//! [`Sandboxes`]; requests, bodies, tunnels and upstream connections of it
//! watch that token. A token nothing in flight holds any more is dropped
//! now and then ([`Sandboxes::prune`]): a cluster's front proxy sees many
//! sandboxes whose end it never hears of, and the next request for one
//! makes a new token anyway.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};

use arca_proto::node::RouteSource;
use nix::sys::socket::{setsockopt, sockopt};
use tokio_util::sync::CancellationToken;

use crate::BoxError;

/// One token per sandbox with traffic, cancelled when it ends.
///
/// The `Arc` around each token counts who holds it: requests, bodies and
/// tunnels in flight do (through [`Abort`]); idle pooled connections watch
/// a plain clone and do not, since they are dropped by sandbox id anyway.
#[derive(Debug, Default)]
pub(crate) struct Sandboxes {
    tokens: Mutex<HashMap<String, Arc<CancellationToken>>>,
}

impl Sandboxes {
    /// The sandbox's token, made on first use (then `true`).
    pub(crate) fn token(&self, sandbox_id: &str) -> (Arc<CancellationToken>, bool) {
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(token) = tokens.get(sandbox_id) {
            return (Arc::clone(token), false);
        }
        let token = Arc::new(CancellationToken::new());
        tokens.insert(sandbox_id.to_string(), Arc::clone(&token));
        (token, true)
    }

    /// Drops the tokens nothing in flight holds. Handing out a token and
    /// pruning take the same lock, so a token being handed out is never
    /// dropped; a later request makes a new one, as after an end.
    pub(crate) fn prune(&self) {
        self.tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, token| Arc::strong_count(token) > 1);
    }

    /// Cancels everything of the sandbox. Later requests make a new token
    /// (a resumed sandbox keeps its id).
    pub(crate) fn end(&self, sandbox_id: &str) {
        let token = self
            .tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(sandbox_id);
        if let Some(token) = token {
            token.cancel();
        }
    }

    /// Ends every sandbox with a token but no route: used when end
    /// notifications were missed (broadcast lag).
    pub(crate) fn reconcile(&self, routes: &dyn RouteSource) -> Vec<String> {
        let ids: Vec<String> = self
            .tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        let gone: Vec<String> = ids
            .into_iter()
            .filter(|id| routes.route(id).is_none())
            .collect();
        for id in &gone {
            self.end(id);
        }
        gone
    }
}

/// A client connection, as far as aborting it is concerned.
#[derive(Debug)]
pub(crate) struct ClientConn {
    /// A duplicate of the client socket's descriptor, only used to set
    /// `SO_LINGER`. Socket options belong to the socket, not the descriptor.
    /// Dropped together with the connection task, so it does not keep the
    /// socket open after hyper closes its own descriptor.
    socket: OwnedFd,
    /// Cancelled to drop the connection.
    kill: CancellationToken,
}

impl ClientConn {
    pub(crate) fn new(socket: OwnedFd) -> ClientConn {
        ClientConn {
            socket,
            kill: CancellationToken::new(),
        }
    }

    /// Cancelled when the connection must be dropped.
    pub(crate) fn killed(&self) -> &CancellationToken {
        &self.kill
    }

    /// Makes the close of this connection a reset, and has it closed.
    pub(crate) fn reset(&self) {
        let zero = nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        if let Err(err) = setsockopt(&self.socket, sockopt::Linger, &zero) {
            tracing::debug!(?err, "cannot set SO_LINGER on a client connection");
        }
        self.kill.cancel();
    }
}

/// What an in-flight request does when its sandbox ends.
#[derive(Debug, Clone)]
pub(crate) struct Abort {
    /// The sandbox's token (holding it keeps it from being pruned).
    pub(crate) token: Arc<CancellationToken>,
    /// The client connection carrying the request.
    pub(crate) client: Arc<ClientConn>,
    /// The request came over h2: reset the stream, not the connection.
    pub(crate) h2: bool,
}

/// The error that fails an aborted request or body.
#[derive(Debug, thiserror::Error)]
#[error("sandbox ended")]
pub(crate) struct SandboxEnded;

impl Abort {
    /// Cuts the client's transport for this request and returns the error
    /// to fail it with (hyper turns it into `RST_STREAM` on h2).
    pub(crate) fn fire(&self) -> BoxError {
        if !self.h2 {
            self.client.reset();
        }
        Box::new(SandboxEnded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_in_use_survive_pruning_and_unused_ones_go() {
        let sandboxes = Sandboxes::default();
        let (held, fresh) = sandboxes.token("alpha");
        assert!(fresh);
        let (unused, _) = sandboxes.token("bravo");
        drop(unused);
        sandboxes.prune();
        // alpha is held: the same token, not a fresh one.
        let (again, fresh) = sandboxes.token("alpha");
        assert!(!fresh);
        assert!(Arc::ptr_eq(&held, &again));
        // bravo was dropped: a new one is made.
        assert!(sandboxes.token("bravo").1);
        // An end still reaches holders of a token.
        sandboxes.end("alpha");
        assert!(held.is_cancelled());
    }
}
