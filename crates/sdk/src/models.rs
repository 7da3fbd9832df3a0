//! E2B REST bodies as the client reads and writes them (CONTRACT 2.3).
//! Unknown fields are ignored; optional ones may be missing or `null`.

use std::collections::BTreeMap;

use arca_proto::network::EgressLogEntry;
use serde::{Deserialize, Serialize};

/// A sandbox to talk to: what create answers, enough to reach its envd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    /// Sandbox id.
    #[serde(rename = "sandboxID")]
    pub id: String,
    /// Resolved template id.
    #[serde(rename = "templateID", default)]
    pub template_id: String,
    /// Version of envd in the sandbox.
    #[serde(default)]
    pub envd_version: String,
    /// Token envd requires in `X-Access-Token` (absent for insecure sandboxes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    /// Template alias used, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Base domain of the sandbox's hosts, if the server set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// A sandbox as listed (`GET /v2/sandboxes`) or described
/// (`GET /sandboxes/{id}`, which adds the access token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxInfo {
    /// Sandbox id.
    #[serde(rename = "sandboxID")]
    pub id: String,
    /// Template id.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Template alias, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Creation time (RFC 3339).
    pub started_at: String,
    /// Current expiry (RFC 3339).
    pub end_at: String,
    /// `running` or `paused`.
    pub state: String,
    /// CPUs.
    #[serde(default)]
    pub cpu_count: u32,
    /// Memory in MiB.
    #[serde(rename = "memoryMB", default)]
    pub memory_mb: u32,
    /// Disk in MiB.
    #[serde(rename = "diskSizeMB", default)]
    pub disk_size_mb: u32,
    /// Version of envd.
    #[serde(default)]
    pub envd_version: String,
    /// User labels.
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: BTreeMap<String, String>,
    /// envd's access token (only from `get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    /// Base domain of the sandbox's hosts (only from `get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Cluster mode: the node it runs on.
    #[serde(rename = "nodeID", default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Cluster mode: that node's health (`ready`, `draining`, `lost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_status: Option<String>,
}

impl SandboxInfo {
    /// The handle envd calls take. From [`Client::list`](crate::Client::list)
    /// it has no access token; use [`Client::get`](crate::Client::get) first
    /// for sandboxes that need one.
    pub fn sandbox(&self) -> Sandbox {
        Sandbox {
            id: self.id.clone(),
            template_id: self.template_id.clone(),
            envd_version: self.envd_version.clone(),
            envd_access_token: self.envd_access_token.clone(),
            alias: self.alias.clone(),
            domain: self.domain.clone(),
        }
    }
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `NewSandboxV2`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NewSandbox<'a> {
    #[serde(rename = "templateID")]
    pub(crate) template_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) timeout: Option<u64>,
    pub(crate) metadata: &'a BTreeMap<String, String>,
    pub(crate) env_vars: &'a BTreeMap<String, String>,
}

/// A sandbox's logs (`GET /sandboxes/{id}/logs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxLogs {
    /// Plain lines.
    #[serde(default, deserialize_with = "null_as_default")]
    pub logs: Vec<LogLine>,
    /// Structured entries.
    #[serde(default, deserialize_with = "null_as_default")]
    pub log_entries: Vec<LogEntry>,
}

/// One plain log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When (RFC 3339).
    pub timestamp: String,
    /// The text.
    pub line: String,
}

/// One structured log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// When (RFC 3339).
    pub timestamp: String,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// The text.
    pub message: String,
    /// Extra fields.
    #[serde(default, deserialize_with = "null_as_default")]
    pub fields: BTreeMap<String, String>,
}

/// One resource sample (`GET /sandboxes/{id}/metrics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metric {
    /// When (RFC 3339).
    pub timestamp: String,
    /// When, in Unix seconds.
    #[serde(default)]
    pub timestamp_unix: i64,
    /// CPUs.
    #[serde(default)]
    pub cpu_count: u32,
    /// CPU use in percent of all CPUs.
    #[serde(default)]
    pub cpu_used_pct: f64,
    /// Memory used, bytes.
    #[serde(default)]
    pub mem_used: u64,
    /// Memory limit, bytes.
    #[serde(default)]
    pub mem_total: u64,
    /// Page cache, bytes.
    #[serde(default)]
    pub mem_cache: u64,
    /// Disk used, bytes.
    #[serde(default)]
    pub disk_used: u64,
    /// Disk limit, bytes.
    #[serde(default)]
    pub disk_total: u64,
}

/// Answer of `GET /sandboxes/{id}/network/logs`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct NetworkLogs {
    pub(crate) entries: Vec<EgressLogEntry>,
}

/// A file written by [`Client::write_file`](crate::Client::write_file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteInfo {
    /// Absolute path in the sandbox.
    pub path: String,
    /// Base name.
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_has_the_v2_keys() {
        let metadata = BTreeMap::from([("a".to_string(), "1".to_string())]);
        let envs = BTreeMap::new();
        let body = NewSandbox {
            template_id: "base",
            timeout: Some(60),
            metadata: &metadata,
            env_vars: &envs,
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap_or_default(),
            serde_json::json!({"templateID": "base", "timeout": 60, "metadata": {"a": "1"}, "envVars": {}})
        );
        let body = NewSandbox {
            timeout: None,
            ..body
        };
        assert!(
            serde_json::to_value(&body)
                .unwrap_or_default()
                .get("timeout")
                .is_none()
        );
    }

    #[test]
    fn listed_and_detailed_sandboxes_parse_with_unknown_and_null_fields() {
        let v = serde_json::json!({
            "templateID": "base", "sandboxID": "iabc", "clientID": "6532622b",
            "startedAt": "2026-01-01T00:00:00.000000Z", "endAt": "2026-01-01T00:05:00.000000Z",
            "cpuCount": 2, "memoryMB": 512, "diskSizeMB": 1024, "state": "running",
            "envdVersion": "0.6.13", "metadata": null, "somethingNew": [1]
        });
        let info: SandboxInfo = serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(info.id, "iabc");
        assert_eq!(info.memory_mb, 512);
        assert!(info.metadata.is_empty() && info.envd_access_token.is_none());
        let s = info.sandbox();
        assert_eq!((s.id.as_str(), s.template_id.as_str()), ("iabc", "base"));
    }

    #[test]
    fn logs_and_metrics_parse() {
        let logs: SandboxLogs = serde_json::from_str(
            r#"{"logs":[{"timestamp":"t","line":"hello"}],"logEntries":[{"timestamp":"t","level":"info","message":"m","fields":{"k":"v"}}]}"#,
        )
        .unwrap_or_default();
        assert_eq!(logs.logs[0].line, "hello");
        assert_eq!(logs.log_entries[0].fields["k"], "v");
        let m: Vec<Metric> = serde_json::from_str(
            r#"[{"timestamp":"t","timestampUnix":5,"cpuCount":2,"cpuUsedPct":1.5,"memUsed":1,"memTotal":2,"memCache":0,"diskUsed":3,"diskTotal":4}]"#,
        )
        .unwrap_or_default();
        assert_eq!(m[0].disk_total, 4);
        assert!((m[0].cpu_used_pct - 1.5).abs() < f64::EPSILON);
    }
}
