//! The contract between the listeners and the node: what the node tells
//! them about sandboxes ([`Enforcer::sandbox`]), what it does for them
//! ([`Enforcer::admit`], [`Enforcer::record`]), and what they keep
//! ([`AdmittedAddr`]).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arca_proto::network::{EgressLogEntry, EgressPolicy};
use arca_proto::node::{BoxFuture, SandboxId};

/// A sandbox as the listeners see it, found by its source address.
#[derive(Debug, Clone)]
pub struct SandboxView {
    /// Which sandbox.
    pub id: SandboxId,
    /// Its current egress policy.
    pub policy: Arc<EgressPolicy>,
}

/// One address to put into a sandbox's set of DNS-admitted addresses
/// (`x<i>` in ADR 0005).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Whose set.
    pub sandbox: SandboxId,
    /// The address.
    pub addr: Ipv4Addr,
    /// Element timeout: between 60 s and 3600 s, whole seconds.
    pub ttl: Duration,
}

/// An address a DNS answer admitted for a name, as kept by [`crate::Egress`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmittedAddr {
    /// The queried name, lowercase, without a trailing dot.
    pub name: String,
    /// The address (the end of the CNAME chain, if any).
    pub addr: Ipv4Addr,
    /// When the admission ends: the earlier of the name's TTL and the
    /// firewall element's timeout.
    pub expires: SystemTime,
}

/// What the node provides to the listeners.
///
/// Calls come from many tasks at once; `sandbox` and `record` are called
/// for every query and connection and must not block.
pub trait Enforcer: Send + Sync + 'static {
    /// The sandbox whose veth carries `source` (the reverse-path check pins
    /// sources to sandboxes), with its current policy; `None` for unknown
    /// sources, which are refused.
    fn sandbox(&self, source: Ipv4Addr) -> Option<SandboxView>;

    /// Puts the addresses into the sandboxes' firewall sets for their
    /// `ttl` (one nft commit for the whole batch; an address already there
    /// gets the new timeout). Returns once committed: the DNS answer that
    /// caused it waits, so the sandbox's first connection is not refused.
    /// A batch may hold several sandboxes; on error, the forwarder retries
    /// each sandbox's part alone so one broken slot fails only itself.
    fn admit(&self, batch: Vec<Admission>) -> BoxFuture<'_, Result<(), String>>;

    /// One entry for the sandbox's egress log (the node merges repeats and
    /// bounds the log).
    fn record(&self, sandbox: &SandboxId, entry: EgressLogEntry);
}
