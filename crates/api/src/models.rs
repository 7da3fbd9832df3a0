//! E2B REST request and response bodies (CONTRACT 2.3), as this server
//! reads and writes them.
//!
//! Requests accept unknown fields (newer SDKs add some) and `null` for
//! optional ones. Responses carry every field the SDK parsers require and
//! omit unset optional ones.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};

use crate::db::{RecordState, SandboxRecord};
use crate::network::NetworkConfig;

/// Legacy `clientID`; any constant works, this is the reference's.
pub(crate) const CLIENT_ID: &str = "6532622b";

/// RFC 3339 with microseconds and `Z`, as the SDKs' `isoparse` reads.
fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// `NewSandbox` (v1, `POST /sandboxes`) and `NewSandboxV2` (v2): the same
/// keys but `secure`, which this server ignores (every sandbox gets an envd
/// access token; the SDKs send it whenever one is returned).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NewSandbox {
    #[serde(rename = "templateID")]
    pub(crate) template_id: String,
    /// Seconds; the default differs between v1 and v2.
    pub(crate) timeout: Option<i64>,
    pub(crate) auto_pause: Option<bool>,
    pub(crate) auto_pause_memory: Option<bool>,
    pub(crate) auto_resume: Option<AutoResume>,
    #[serde(rename = "allow_internet_access")]
    pub(crate) allow_internet_access: Option<bool>,
    pub(crate) metadata: Option<BTreeMap<String, String>>,
    pub(crate) env_vars: Option<BTreeMap<String, String>>,
    /// `SandboxNetworkConfig` (CONTRACT 2.6), checked by
    /// [`crate::network::NetworkConfig::from_create`].
    pub(crate) network: Option<NetworkBody>,
    /// Arca's isolation backend (`ns`, `gvisor`, `vm`); the metadata key
    /// `arca.runtime` says the same for SDKs that send no extra fields.
    pub(crate) runtime: Option<String>,
}

/// `SandboxNetworkConfig` as a create request sends it. What this server
/// refuses (`rules`, `egressProxy`, `httpsPorts`) is read loosely, so the
/// answer can be a 400 naming the key rather than a parse error.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NetworkBody {
    pub(crate) allow_out: Option<Vec<String>>,
    pub(crate) deny_out: Option<Vec<String>>,
    pub(crate) dns_servers: Option<Vec<String>>,
    pub(crate) rules: Option<serde_json::Value>,
    pub(crate) egress_proxy: Option<serde_json::Value>,
    pub(crate) allow_public_traffic: Option<bool>,
    pub(crate) mask_request_host: Option<String>,
    pub(crate) https_ports: Option<serde_json::Value>,
}

/// `SandboxNetworkUpdateConfig` (`PUT /sandboxes/{id}/network`): the whole
/// egress configuration; an omitted key is cleared.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NetworkUpdate {
    pub(crate) allow_out: Option<Vec<String>>,
    pub(crate) deny_out: Option<Vec<String>>,
    pub(crate) dns_servers: Option<Vec<String>>,
    pub(crate) rules: Option<serde_json::Value>,
    pub(crate) egress_proxy: Option<serde_json::Value>,
    #[serde(rename = "allow_internet_access")]
    pub(crate) allow_internet_access: Option<bool>,
}

/// `{"enabled": bool}`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub(crate) struct AutoResume {
    #[serde(default)]
    pub(crate) enabled: bool,
}

/// `ConnectSandbox` (v1: `timeout` required) and `ConnectSandboxV2`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ConnectSandbox {
    pub(crate) timeout: Option<i64>,
}

/// `SandboxPauseRequest`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PauseRequest {
    pub(crate) memory: Option<bool>,
}

/// `ResumedSandbox` (deprecated resume).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ResumeRequest {
    pub(crate) timeout: Option<i64>,
}

/// `SandboxTimeoutRequest`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct TimeoutRequest {
    pub(crate) timeout: i64,
}

/// `SandboxRefreshRequest`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RefreshRequest {
    pub(crate) duration: Option<i64>,
}

/// `Sandbox`: the answer of create and connect.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SandboxBody {
    #[serde(rename = "sandboxID")]
    pub(crate) sandbox_id: String,
    #[serde(rename = "templateID")]
    pub(crate) template_id: String,
    #[serde(rename = "clientID")]
    pub(crate) client_id: &'static str,
    pub(crate) envd_version: String,
    pub(crate) envd_access_token: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) alias: Option<String>,
    /// Nullable in the contract: `null` unless `allowPublicTraffic` was
    /// false at create.
    pub(crate) traffic_access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) domain: Option<String>,
}

impl SandboxBody {
    pub(crate) fn new(r: &SandboxRecord, domain: Option<&str>) -> SandboxBody {
        SandboxBody {
            sandbox_id: r.id.to_string(),
            template_id: r.template_id.clone(),
            client_id: CLIENT_ID,
            envd_version: r.envd_version.clone(),
            envd_access_token: r.envd_access_token.clone(),
            alias: r.alias.clone(),
            traffic_access_token: r.traffic_access_token.clone(),
            domain: domain.map(str::to_string),
        }
    }
}

fn state_str(s: RecordState) -> &'static str {
    match s {
        RecordState::Paused => "paused",
        // Creating records are never shown.
        RecordState::Running | RecordState::Creating => "running",
    }
}

/// `SandboxLifecycle`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Lifecycle {
    auto_resume: bool,
    on_timeout: &'static str,
}

/// `SandboxDetail` (`GET /sandboxes/{id}`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SandboxDetail {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    #[serde(serialize_with = "rfc3339")]
    started_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    end_at: DateTime<Utc>,
    envd_version: String,
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u32,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    alias: Option<String>,
    metadata: BTreeMap<String, String>,
    envd_access_token: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    allow_internet_access: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<String>,
    /// The effective network settings, keys set only.
    #[serde(skip_serializing_if = "Option::is_none")]
    network: Option<NetworkConfig>,
    lifecycle: Lifecycle,
    /// `full` (memory kept) or `filesystem` once paused; absent while
    /// running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pause_mode: Option<&'static str>,
    /// Arca: its isolation backend (`ns`, `gvisor`, `vm`).
    runtime: &'static str,
    /// Cluster mode: the node it runs on and that node's health.
    #[serde(rename = "nodeID", skip_serializing_if = "Option::is_none")]
    node_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_status: Option<&'static str>,
}

impl SandboxDetail {
    /// `pause_mode`: what the node says the pause kept (`full` when it does
    /// not say).
    pub(crate) fn new(
        r: &SandboxRecord,
        domain: Option<&str>,
        pause_mode: Option<arca_proto::node::PauseMode>,
    ) -> SandboxDetail {
        SandboxDetail {
            template_id: r.template_id.clone(),
            sandbox_id: r.id.to_string(),
            client_id: CLIENT_ID,
            started_at: r.started_at,
            end_at: r.end_at,
            envd_version: r.envd_version.clone(),
            cpu_count: r.cpu_count,
            memory_mb: r.memory_mb,
            disk_size_mb: r.disk_size_mb,
            state: state_str(r.state),
            alias: r.alias.clone(),
            metadata: r.metadata.clone(),
            runtime: runtime_of(r),
            envd_access_token: r.envd_access_token.clone(),
            allow_internet_access: r.allow_internet_access,
            domain: domain.map(str::to_string),
            network: r.network.clone(),
            lifecycle: Lifecycle {
                auto_resume: r.auto_resume,
                on_timeout: if r.auto_pause { "pause" } else { "kill" },
            },
            pause_mode: (r.state == RecordState::Paused)
                .then(|| pause_mode.unwrap_or_default().as_str()),
            node_id: None,
            node_status: None,
        }
    }

    /// Adds where it runs (cluster mode).
    pub(crate) fn with_node(
        mut self,
        node_id: &str,
        status: arca_proto::cluster::NodeStatus,
    ) -> SandboxDetail {
        self.node_id = Some(node_id.to_string());
        self.node_status = Some(status.as_str());
        self
    }
}

/// `ListedSandbox` (items of `GET /v2/sandboxes` and `GET /sandboxes`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListedSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    #[serde(serialize_with = "rfc3339")]
    started_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    end_at: DateTime<Utc>,
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u32,
    state: &'static str,
    envd_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    alias: Option<String>,
    metadata: BTreeMap<String, String>,
    /// Arca: its isolation backend (`ns`, `gvisor`, `vm`).
    runtime: &'static str,
    /// Cluster mode: the node it runs on and that node's health.
    #[serde(rename = "nodeID", skip_serializing_if = "Option::is_none")]
    node_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_status: Option<&'static str>,
}

impl ListedSandbox {
    /// Adds where it runs (cluster mode).
    pub(crate) fn with_node(
        mut self,
        node_id: &str,
        status: arca_proto::cluster::NodeStatus,
    ) -> ListedSandbox {
        self.node_id = Some(node_id.to_string());
        self.node_status = Some(status.as_str());
        self
    }
}

impl From<&SandboxRecord> for ListedSandbox {
    fn from(r: &SandboxRecord) -> ListedSandbox {
        ListedSandbox {
            template_id: r.template_id.clone(),
            sandbox_id: r.id.to_string(),
            client_id: CLIENT_ID,
            started_at: r.started_at,
            end_at: r.end_at,
            cpu_count: r.cpu_count,
            memory_mb: r.memory_mb,
            disk_size_mb: r.disk_size_mb,
            state: state_str(r.state),
            envd_version: r.envd_version.clone(),
            alias: r.alias.clone(),
            metadata: r.metadata.clone(),
            runtime: runtime_of(r),
            node_id: None,
            node_status: None,
        }
    }
}

/// The isolation backend of a record: the metadata key the api writes for
/// any but the default.
fn runtime_of(r: &SandboxRecord) -> &'static str {
    r.metadata
        .get(arca_proto::node::RUNTIME_METADATA_KEY)
        .and_then(|m| arca_proto::node::Runtime::parse(m).ok())
        .unwrap_or_default()
        .as_str()
}

/// `SandboxMetric`; every key is required by the Python parser.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SandboxMetric {
    #[serde(serialize_with = "rfc3339")]
    pub(crate) timestamp: DateTime<Utc>,
    pub(crate) timestamp_unix: i64,
    pub(crate) cpu_count: u32,
    pub(crate) cpu_used_pct: f64,
    pub(crate) mem_used: u64,
    pub(crate) mem_total: u64,
    pub(crate) mem_cache: u64,
    pub(crate) disk_used: u64,
    pub(crate) disk_total: u64,
}

/// An item of `SandboxLogs.logs` (v1).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SandboxLog {
    #[serde(serialize_with = "rfc3339")]
    pub(crate) timestamp: DateTime<Utc>,
    pub(crate) line: String,
}

/// `SandboxLogEntry`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SandboxLogEntry {
    #[serde(serialize_with = "rfc3339")]
    pub(crate) timestamp: DateTime<Utc>,
    pub(crate) level: &'static str,
    pub(crate) message: String,
    pub(crate) fields: BTreeMap<String, String>,
}

/// `SandboxLogs` (v1 logs).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SandboxLogs {
    pub(crate) logs: Vec<SandboxLog>,
    pub(crate) log_entries: Vec<SandboxLogEntry>,
}

/// `SandboxLogsV2Response`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SandboxLogsV2 {
    pub(crate) logs: Vec<SandboxLogEntry>,
}

/// `SandboxForkRequest`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ForkRequest {
    pub(crate) timeout: Option<i64>,
    pub(crate) count: Option<i64>,
}

/// `Error` inside a fork result.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ErrorBody {
    pub(crate) code: u16,
    pub(crate) message: String,
}

/// `SandboxForkResult`: the fork's sandbox, or why it did not start.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ForkResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) sandbox: Option<SandboxBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<ErrorBody>,
}

/// `SandboxSnapshotRequest`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct SnapshotRequest {
    pub(crate) name: Option<String>,
    pub(crate) memory: Option<bool>,
}

/// `SnapshotInfo` (create and list answers).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    pub(crate) snapshot_id: String,
    pub(crate) names: Vec<String>,
}
