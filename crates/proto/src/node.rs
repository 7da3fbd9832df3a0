//! What the control plane asks of a node, and what the edge proxy needs to
//! know about its sandboxes.
//!
//! [`NodeService`] is implemented by the node agent; the api reaches it
//! in-process under `arca up` (an RPC client implements the same trait in
//! cluster mode). [`RouteSource`] is how the proxy resolves a sandbox id to
//! something it can dial, and learns when a sandbox ends so it can abort the
//! connections to it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A sandbox id: 1 to 64 lowercase ASCII letters and digits (`-` and `.`
/// would break host routing, CONTRACT 4.5).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SandboxId(String);

/// A string that is not a valid sandbox id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sandbox id '{0}': use 1 to 64 lowercase letters and digits")]
pub struct InvalidSandboxId(pub String);

impl SandboxId {
    /// Validates an id.
    pub fn parse(s: &str) -> Result<SandboxId, InvalidSandboxId> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if ok {
            Ok(SandboxId(s.to_string()))
        } else {
            Err(InvalidSandboxId(s.to_string()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SandboxId {
    type Err = InvalidSandboxId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SandboxId::parse(s)
    }
}

impl TryFrom<String> for SandboxId {
    type Error = InvalidSandboxId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        SandboxId::parse(&s)
    }
}

impl From<SandboxId> for String {
    fn from(id: SandboxId) -> String {
        id.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What happens when a sandbox reaches its `end_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutAction {
    /// Kill it (the default).
    #[default]
    Kill,
    /// Pause it (issue 5).
    Pause,
}

/// Everything a node needs to start a sandbox. Limits are validated by the
/// api before they get here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// New sandbox's id, chosen by the api.
    pub sandbox_id: SandboxId,
    /// Resolved template id (the node holds its file system).
    pub template_id: String,
    /// The template's build to start from (see [`crate::build`]).
    pub build_id: String,
    /// Owning team.
    pub team_id: String,
    /// CPUs (a CFS quota of this many cores).
    pub cpu_count: u32,
    /// Memory limit in MiB.
    pub memory_mb: u32,
    /// Writable disk in MiB.
    pub disk_size_mb: u32,
    /// Sandbox-wide environment for every process (`/init` envVars).
    pub env_vars: BTreeMap<String, String>,
    /// Token envd will require in `X-Access-Token`.
    pub envd_access_token: String,
    /// When the node ends it by itself (the api's copy may be stale).
    pub end_at: DateTime<Utc>,
    /// What the end is.
    pub on_timeout: TimeoutAction,
    /// A sandbox paused at its deadline resumes on inbound traffic through
    /// the edge (`autoResume`).
    #[serde(default)]
    pub auto_resume: bool,
    /// The lifetime asked for at create, seconds (an automatic resume gives
    /// it again; 0: unknown).
    #[serde(default)]
    pub timeout_secs: u64,
    /// What a pause at the deadline keeps (`autoPauseMemory`).
    #[serde(default)]
    pub auto_pause_mode: PauseMode,
    /// `false` denies all egress.
    pub allow_internet_access: bool,
    /// Egress rules (checked by [`crate::network::EgressPolicy::compile`]).
    #[serde(default)]
    pub network: crate::network::NetworkSpec,
    /// Ingress settings, fixed for the sandbox's life.
    #[serde(default)]
    pub ingress: crate::network::IngressSpec,
    /// Cluster mode: RPC base URL of another node that holds the build,
    /// for a node that does not have it yet to pull it from (ADR 0006).
    #[serde(default)]
    pub template_source: Option<String>,
    /// Isolation backend asked for (metadata key [`RUNTIME_METADATA_KEY`]);
    /// `None`: the template's (`LABEL arca.runtime=...`), else `ns`.
    #[serde(default)]
    pub runtime: Option<Runtime>,
}

/// The metadata key (of a sandbox, and as a Dockerfile `LABEL` of a
/// template) that names an isolation backend; the api also writes it into
/// every sandbox's metadata with the backend it runs under.
pub const RUNTIME_METADATA_KEY: &str = "arca.runtime";

/// An isolation backend of a sandbox (ARCHITECTURE section 2, `runtime`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// Linux namespaces, cgroups, seccomp, Landlock (the default).
    #[default]
    Ns,
    /// gVisor's `runsc`: a user-space kernel between the sandbox and the host's.
    Gvisor,
    /// A virtual machine (QEMU microvm; KVM where it works, else TCG).
    Vm,
}

impl Runtime {
    /// Every backend, weakest isolation first.
    pub const ALL: [Runtime; 3] = [Runtime::Ns, Runtime::Gvisor, Runtime::Vm];

    /// Its name on the wire and in metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Ns => "ns",
            Runtime::Gvisor => "gvisor",
            Runtime::Vm => "vm",
        }
    }

    /// The backend named `s`, or a message that lists the names.
    pub fn parse(s: &str) -> Result<Runtime, String> {
        Runtime::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown runtime '{s}' in {RUNTIME_METADATA_KEY}; use one of: ns, gvisor, vm"
                )
            })
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a node can run one backend, and why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeSupport {
    /// The backend.
    pub runtime: Runtime,
    /// It can start sandboxes here.
    pub available: bool,
    /// What it uses (binary, version, platform) or why it is unavailable.
    pub detail: String,
}

/// State of a sandbox as a node reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Processes run, envd answers.
    Running,
    /// Stopped but kept (issue 5).
    Paused,
}

/// What a pause keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PauseMode {
    /// Processes and memory (E2B's `full`): a resume continues them.
    #[default]
    Full,
    /// Files only: processes end, memory and network slot are released; a
    /// resume boots the sandbox again on its kept disk (new boot id).
    Filesystem,
}

impl PauseMode {
    /// E2B's name (`pauseMode`).
    pub fn as_str(self) -> &'static str {
        match self {
            PauseMode::Full => "full",
            PauseMode::Filesystem => "filesystem",
        }
    }
}

/// A node's view of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxStatus {
    /// Its id.
    pub sandbox_id: SandboxId,
    /// Template it was made from.
    pub template_id: String,
    /// Owning team.
    pub team_id: String,
    /// Running or paused.
    pub state: SandboxState,
    /// Creation time; kept across pause and resume.
    pub started_at: DateTime<Utc>,
    /// Current deadline.
    pub end_at: DateTime<Utc>,
    /// CPUs.
    pub cpu_count: u32,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// Disk in MiB.
    pub disk_size_mb: u32,
    /// envd protocol version inside.
    pub envd_version: String,
    /// What the pause kept, while paused.
    #[serde(default)]
    pub pause_mode: Option<PauseMode>,
    /// The isolation backend it runs under.
    #[serde(default)]
    pub runtime: Runtime,
}

/// One resource sample (CONTRACT `SandboxMetric`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSample {
    /// When it was taken.
    pub timestamp: DateTime<Utc>,
    /// CPUs.
    pub cpu_count: u32,
    /// CPU use in percent of all its CPUs.
    pub cpu_used_pct: f64,
    /// Memory in use, bytes.
    pub mem_used: u64,
    /// Memory limit, bytes.
    pub mem_total: u64,
    /// Page cache, bytes.
    pub mem_cache: u64,
    /// Disk in use, bytes.
    pub disk_used: u64,
    /// Disk size, bytes.
    pub disk_total: u64,
}

/// One line of a sandbox's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// When.
    pub timestamp: DateTime<Utc>,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// What happened.
    pub message: String,
    /// Structured fields.
    pub fields: BTreeMap<String, String>,
}

/// Why a sandbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// Killed through the api.
    Killed,
    /// Its `end_at` passed.
    Expired,
    /// Its init exited or was killed from inside.
    Exited,
    /// It was half-made or lost when the node restarted.
    Reaped,
}

/// Something that happened to a sandbox, broadcast by the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxEvent {
    /// The sandbox no longer exists.
    Ended {
        /// Which.
        sandbox_id: SandboxId,
        /// Why.
        reason: EndReason,
    },
    /// The node paused the sandbox by itself (its deadline came with
    /// [`TimeoutAction::Pause`]).
    Paused {
        /// Which.
        sandbox_id: SandboxId,
    },
    /// The node resumed a sandbox by itself (inbound traffic woke a
    /// sandbox with [`SandboxSpec::auto_resume`]).
    Resumed {
        /// Which.
        sandbox_id: SandboxId,
        /// Its new deadline.
        end_at: DateTime<Utc>,
    },
}

/// A failed node call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum NodeError {
    /// No such sandbox on this node.
    #[error("sandbox {0} not found")]
    SandboxNotFound(SandboxId),
    /// The node does not have this template.
    #[error("template '{0}' not found")]
    TemplateNotFound(String),
    /// The node is full.
    #[error("no capacity: {0}")]
    Capacity(String),
    /// The request cannot be honoured as asked.
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// The sandbox is not in a state that allows the call.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Something broke on the node; the message is for operators.
    #[error("node failure: {0}")]
    Internal(String),
    /// The node could not be reached: the call never arrived (cluster
    /// mode's RPC client), so trying another node is safe.
    #[error("node unavailable: {0}")]
    Unavailable(String),
}

/// Boxed future returned by the object-safe traits below.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The node agent's interface. Each method's doc says in which states it is
/// legal; every other state gives [`NodeError::Conflict`].
pub trait NodeService: Send + Sync + 'static {
    /// Creates and starts a sandbox; returns once envd answers and `/init`
    /// was applied. Legal for a new id only.
    fn create(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<SandboxStatus, NodeError>>;
    /// Ends a sandbox in any state and removes everything it had.
    fn kill<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<(), NodeError>>;
    /// Moves the deadline (earlier or later). Legal while running.
    fn set_end_at<'a>(
        &'a self,
        id: &'a SandboxId,
        end_at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<SandboxStatus, NodeError>>;
    /// One sandbox.
    fn get<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<SandboxStatus, NodeError>>;
    /// Every sandbox on the node.
    fn list(&self) -> BoxFuture<'_, Result<Vec<SandboxStatus>, NodeError>>;
    /// Samples taken so far (about every 5 s), oldest first.
    fn metrics<'a>(
        &'a self,
        id: &'a SandboxId,
    ) -> BoxFuture<'a, Result<Vec<MetricSample>, NodeError>>;
    /// The sandbox's log, oldest first.
    fn logs<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<Vec<LogEntry>, NodeError>>;
    /// Events from now on.
    fn events(&self) -> tokio::sync::broadcast::Receiver<SandboxEvent>;
    /// Stops every process of a running sandbox, keeping its files and id
    /// (and its memory with [`PauseMode::Full`]); the sandbox no longer
    /// expires. Legal while running.
    fn pause<'a>(
        &'a self,
        id: &'a SandboxId,
        mode: PauseMode,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        let _ = mode;
        Box::pin(async move {
            Err(NodeError::InvalidInput(format!(
                "sandbox {id}: this node cannot pause sandboxes"
            )))
        })
    }
    /// Lets a paused sandbox run again until `end_at`. Legal while paused.
    fn resume<'a>(
        &'a self,
        id: &'a SandboxId,
        end_at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<SandboxStatus, NodeError>> {
        let _ = end_at;
        Box::pin(async move {
            Err(NodeError::InvalidInput(format!(
                "sandbox {id}: this node cannot resume sandboxes"
            )))
        })
    }
    /// Makes one new sandbox per spec, each starting from a copy of the
    /// running source's files taken at one moment (the source is paused
    /// for the copy and keeps its id and deadline). The specs' template and
    /// build are the source's. One result per spec, in order; the outer
    /// error is for the source (not found, not running).
    fn fork<'a>(
        &'a self,
        source: &'a SandboxId,
        specs: Vec<SandboxSpec>,
    ) -> BoxFuture<'a, Result<Vec<Result<SandboxStatus, NodeError>>, NodeError>> {
        let _ = specs;
        Box::pin(async move {
            Err(NodeError::InvalidInput(format!(
                "sandbox {source}: this node cannot fork sandboxes"
            )))
        })
    }
    /// Registers the build `build_id` of template `template_id`: the
    /// source's template build plus a copy of the source's files, taken at
    /// one moment. Legal while running or paused; the source goes on.
    fn snapshot<'a>(
        &'a self,
        source: &'a SandboxId,
        template_id: &'a str,
        build_id: &'a str,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        let _ = (template_id, build_id);
        Box::pin(async move {
            Err(NodeError::InvalidInput(format!(
                "sandbox {source}: this node cannot snapshot sandboxes"
            )))
        })
    }

    /// Replaces a sandbox's egress rules at once (one firewall commit);
    /// connections to destinations that stay allowed are kept. Legal while
    /// running; a paused sandbox gives [`NodeError::Conflict`].
    fn update_network<'a>(
        &'a self,
        id: &'a SandboxId,
        network: crate::network::NetworkSpec,
        allow_internet_access: bool,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        let _ = (network, allow_internet_access);
        Box::pin(async move {
            Err(NodeError::InvalidInput(format!(
                "sandbox {id}: this node cannot change network rules"
            )))
        })
    }

    /// A sandbox's egress log, oldest first (bounded; see ADR 0005). Legal
    /// in any state.
    fn network_logs<'a>(
        &'a self,
        id: &'a SandboxId,
    ) -> BoxFuture<'a, Result<Vec<crate::network::EgressLogEntry>, NodeError>> {
        Box::pin(async move {
            Err(NodeError::InvalidInput(format!(
                "sandbox {id}: this node keeps no network log"
            )))
        })
    }

    /// The isolation backends this node can run, and why not the others
    /// (default: `ns` only).
    fn runtimes(&self) -> Vec<RuntimeSupport> {
        vec![RuntimeSupport {
            runtime: Runtime::Ns,
            available: true,
            detail: String::new(),
        }]
    }
}

/// Where the proxy sends traffic for a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The sandbox.
    pub sandbox_id: SandboxId,
    /// Its network namespace: the proxy dials `127.0.0.1:<port>` from a
    /// socket made inside it, so services bound to loopback are reachable.
    pub netns: PathBuf,
    /// envd's access token, to find the sandbox of a signed `/files` URL.
    pub envd_access_token: Option<String>,
    /// Ingress settings: traffic token for user ports, Host mask.
    pub ingress: crate::network::IngressSpec,
    /// Cluster mode: the node edge proxy to hand the request to, unchanged;
    /// `netns` is then unused, and so is `ingress` (the edge applies the
    /// sandbox's own settings).
    pub relay: Option<std::net::SocketAddr>,
    /// The sandbox's own address, dialed from the host instead of
    /// `127.0.0.1` in `netns`: a VM's loopback is the guest kernel's, so
    /// only services listening on its address are reachable.
    pub address: Option<std::net::Ipv4Addr>,
}

/// The proxy's view of live sandboxes.
pub trait RouteSource: Send + Sync + 'static {
    /// The route of a running sandbox.
    fn route(&self, sandbox_id: &str) -> Option<Route>;
    /// Routes of every running sandbox.
    fn routes(&self) -> Vec<Route>;
    /// Ids of sandboxes that stop running (killed, expired, paused) from now on.
    fn ended(&self) -> tokio::sync::broadcast::Receiver<SandboxId>;
    /// Called for traffic to a sandbox without a route: resumes it if it
    /// was paused at its deadline with auto-resume on; `true` when it runs
    /// again (the caller looks the route up anew).
    fn wake<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, bool> {
        let _ = sandbox_id;
        Box::pin(async { false })
    }
    /// Ingress settings of a sandbox that exists here, running or paused
    /// (checked before [`wake`](Self::wake), so a request without the
    /// traffic token cannot resume a sandbox).
    fn ingress(&self, sandbox_id: &str) -> Option<crate::network::IngressSpec> {
        let _ = sandbox_id;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_are_lowercase_alphanumerics() {
        assert!(SandboxId::parse("i0abc123").is_ok());
        for bad in ["", "Abc", "a-b", "a.b", &"a".repeat(65)] {
            assert!(SandboxId::parse(bad).is_err(), "{bad}");
        }
        let id: SandboxId = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(id.as_str(), "abc");
        assert!(serde_json::from_str::<SandboxId>("\"A\"").is_err());
    }
}
