//! Cluster mode's control messages (ADR 0006): what a node tells the api
//! when it joins and while it lives, and what a proxy asks the api about a
//! sandbox. All are JSON over HTTP on the api's port, under
//! [`CLUSTER_PREFIX`], authenticated by the cluster token
//! (`Authorization: Bearer <token>`, see [`bearer`]).
//!
//! The node's own RPC (the [`NodeService`](crate::node::NodeService) calls
//! the api makes) is in [`crate::rpc`].

use serde::{Deserialize, Serialize};

/// Path prefix of every cluster route on the api.
pub const CLUSTER_PREFIX: &str = "/cluster/v1";

/// Environment variable holding the cluster token (for `arca api`,
/// `arca proxy` and `arca node`; a token on the command line would be
/// visible in `ps`).
pub const TOKEN_ENV: &str = "ARCA_CLUSTER_TOKEN";

/// The `Authorization` header value for `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// What a node can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCapacity {
    /// Most sandboxes (running or paused) it takes; 0: no limit.
    pub max_sandboxes: u32,
    /// CPUs of the host.
    pub cpu_count: u32,
    /// Memory of the host, MiB.
    pub memory_mb: u64,
}

/// How busy a node is, sent with every heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Sandboxes it holds, running or paused.
    pub sandboxes: u32,
    /// Of those, running.
    pub running: u32,
    /// CPUs given to its running sandboxes.
    pub cpu_allocated: u32,
    /// Memory given to its running sandboxes, MiB.
    pub memory_allocated_mb: u64,
    /// Memory the host has available, MiB.
    pub memory_available_mb: u64,
}

/// One template build a node holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CachedBuild {
    /// Template id.
    pub template_id: String,
    /// Build id.
    pub build_id: String,
}

/// `POST /cluster/v1/nodes`: a node joins (or rejoins after a restart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    /// Stable id of the node (kept in its home across restarts): 1 to 64
    /// lowercase letters, digits and `-`.
    pub node_id: String,
    /// Base URL of its RPC (`http://10.0.0.5:3100`).
    pub rpc_url: String,
    /// Its edge proxy (`10.0.0.5:3101`), where the cluster's proxies send
    /// sandbox traffic.
    pub edge_addr: String,
    /// What it can hold.
    pub capacity: NodeCapacity,
    /// Isolation backends it can run (`ns`, ...).
    pub runtimes: Vec<String>,
    /// Template builds it has.
    pub builds: Vec<CachedBuild>,
    /// Its load now.
    pub load: NodeLoad,
    /// The `arca` version it runs.
    pub version: String,
}

/// The api's answer to a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationReply {
    /// How often to heartbeat, milliseconds.
    pub heartbeat_ms: u64,
    /// After how long without a heartbeat the node is marked lost.
    pub lost_after_ms: u64,
}

/// `POST /cluster/v1/nodes/{id}/heartbeat`. A 404 answer means the api
/// does not know the node (its record was removed): register again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Load now.
    pub load: NodeLoad,
    /// Template builds it has, when they changed since the last beat.
    #[serde(default)]
    pub builds: Option<Vec<CachedBuild>>,
}

/// Health of a node as the api sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Heartbeats arrive.
    Ready,
    /// Draining: keeps its sandboxes, gets no new ones.
    Draining,
    /// Missed its heartbeats; its sandboxes are unreachable.
    Lost,
}

impl NodeStatus {
    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Draining => "draining",
            NodeStatus::Lost => "lost",
        }
    }
}

/// One node as `GET /cluster/v1/nodes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its id.
    pub node_id: String,
    /// Health.
    pub status: NodeStatus,
    /// RPC base URL.
    pub rpc_url: String,
    /// Edge proxy address.
    pub edge_addr: String,
    /// What it can hold.
    pub capacity: NodeCapacity,
    /// Its last reported load.
    pub load: NodeLoad,
    /// Sandbox records the api places on it.
    pub sandboxes: u32,
    /// Last heartbeat, RFC 3339.
    pub last_seen: String,
    /// Isolation backends it runs.
    #[serde(default)]
    pub runtimes: Vec<String>,
}

/// `GET /cluster/v1/routes/{sandboxId}`: where a proxy sends a sandbox's
/// traffic (404 when the api has no such sandbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// The sandbox.
    pub sandbox_id: String,
    /// Its node.
    pub node_id: String,
    /// The node's edge proxy.
    pub edge_addr: String,
    /// The node's health: only `ready` and `draining` nodes are reachable.
    pub node_status: NodeStatus,
}
