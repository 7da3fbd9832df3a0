//! Network settings of sandboxes (CONTRACT 2.6, ADR 0005 sections 5 and 6).
//!
//! - Create takes `network` (`allowOut`, `denyOut`, `dnsServers`,
//!   `allowPublicTraffic`, `maskRequestHost`) and `allow_internet_access`;
//!   egress is checked by the shared [`EgressPolicy::compile`], and what this
//!   server cannot do (`rules`, `egressProxy`, `httpsPorts`) is a 400 naming
//!   the key rather than silently ignored. `allowPublicTraffic: false` gets
//!   the sandbox a traffic access token, which the edge then requires on
//!   user ports.
//! - `PUT /sandboxes/{id}/network` replaces the egress settings of a
//!   running sandbox (omitted keys are cleared); ingress settings stay as
//!   created.
//! - `GET /sandboxes/{id}/network/logs?start=&limit=` (Arca's own) returns
//!   the node's egress log, oldest first.

use std::str::FromStr as _;

use arca_proto::network::{EgressLogEntry, EgressPolicy, IngressSpec, NetworkSpec};
use arca_proto::node::SandboxId;
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::Api;
use crate::error::ApiError;
use crate::http::{JsonBody, QueryParams, SandboxPath, Team};
use crate::ids;
use crate::models::{NetworkBody, NetworkUpdate};
use crate::sandboxes::{find, in_task, node_failure};

/// Bytes of randomness in a traffic access token.
pub(crate) const TRAFFIC_TOKEN_BYTES: usize = 32;
/// Entries of a network log answer: default and maximum (the node keeps
/// 2000 per sandbox).
const DEFAULT_LOG_ENTRIES: i64 = 1000;
const MAX_LOG_ENTRIES: i64 = 2000;
/// Longest Host a mask may give (a DNS name's limit).
const MAX_MASK_LEN: usize = 253;
/// The placeholder of `maskRequestHost`.
const PORT_PLACEHOLDER: &str = "${PORT}";

/// A sandbox's network settings as stored and as `GET /sandboxes/{id}`
/// echoes them (`SandboxDetail.network`): only the keys that are set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NetworkConfig {
    /// `allowOut`, `denyOut`, `dnsServers`: replaced by `PUT .../network`.
    #[serde(flatten)]
    pub(crate) egress: NetworkSpec,
    /// As given at create; `false` means user ports need the traffic token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) allow_public_traffic: Option<bool>,
    /// Host header for requests to user ports, `${PORT}` replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) mask_request_host: Option<String>,
}

impl NetworkConfig {
    /// Checks a create request's `network` together with its
    /// `allow_internet_access`; `None` when no `network` was given.
    pub(crate) fn from_create(
        body: Option<NetworkBody>,
        allow_internet_access: Option<bool>,
    ) -> Result<Option<NetworkConfig>, ApiError> {
        let Some(body) = body else {
            check_egress(&NetworkSpec::default(), allow_internet_access)?;
            return Ok(None);
        };
        refuse_unsupported(body.rules.as_ref(), body.egress_proxy.as_ref())?;
        if body.https_ports.as_ref().is_some_and(|p| !is_blank(p)) {
            return Err(ApiError::BadRequest(
                "network.httpsPorts is not supported by this Arca server: the edge reaches \
                 sandbox ports over plain HTTP (serve HTTP on the port, or terminate TLS in \
                 front of the edge); omit httpsPorts or send []"
                    .into(),
            ));
        }
        // An empty mask reads as none.
        let mask = body.mask_request_host.filter(|m| !m.is_empty());
        if let Some(m) = &mask {
            check_mask(m)?;
        }
        let egress = NetworkSpec {
            allow_out: body.allow_out.unwrap_or_default(),
            deny_out: body.deny_out.unwrap_or_default(),
            dns_servers: body.dns_servers.unwrap_or_default(),
        };
        check_egress(&egress, allow_internet_access)?;
        Ok(Some(NetworkConfig {
            egress,
            allow_public_traffic: body.allow_public_traffic,
            mask_request_host: mask,
        }))
    }

    /// Whether user ports need the traffic access token.
    pub(crate) fn is_private(&self) -> bool {
        self.allow_public_traffic == Some(false)
    }
}

/// A fresh traffic access token for a sandbox with `network`, if its user
/// ports are private.
pub(crate) fn traffic_token_for(network: Option<&NetworkConfig>) -> Option<String> {
    network
        .is_some_and(NetworkConfig::is_private)
        .then(|| ids::random_hex(TRAFFIC_TOKEN_BYTES))
}

/// What the node enforces at the edge for a sandbox.
pub(crate) fn ingress_spec(
    network: Option<&NetworkConfig>,
    traffic_access_token: Option<&str>,
) -> IngressSpec {
    IngressSpec {
        traffic_access_token: traffic_access_token.map(str::to_string),
        mask_request_host: network.and_then(|n| n.mask_request_host.clone()),
    }
}

/// `null`, `{}` and `[]`: nothing asked for.
fn is_blank(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Object(m) => m.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// 400 for `rules` and `egressProxy`, which this server does not have.
fn refuse_unsupported(
    rules: Option<&serde_json::Value>,
    egress_proxy: Option<&serde_json::Value>,
) -> Result<(), ApiError> {
    if rules.is_some_and(|r| !is_blank(r)) {
        return Err(ApiError::BadRequest(
            "network.rules (header transforms) are not supported by this Arca server: \
             injecting headers into HTTPS requests needs TLS interception of the sandbox's \
             traffic, which it does not do; omit rules or send {}"
                .into(),
        ));
    }
    if egress_proxy.is_some_and(|p| !p.is_null()) {
        return Err(ApiError::BadRequest(
            "network.egressProxy is not supported by this Arca server yet: sandbox traffic \
             goes out directly; omit egressProxy or send null"
                .into(),
        ));
    }
    Ok(())
}

/// The shared egress checks (ADR 0005 section 6); the message names the
/// entry.
fn check_egress(spec: &NetworkSpec, allow_internet_access: Option<bool>) -> Result<(), ApiError> {
    EgressPolicy::compile(spec, allow_internet_access.unwrap_or(true))
        .map(drop)
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// A mask must make a sane Host value: printable ASCII, no spaces, at most
/// 253 bytes once `${PORT}` is replaced.
fn check_mask(mask: &str) -> Result<(), ApiError> {
    let expanded = mask.replace(PORT_PLACEHOLDER, "65535");
    if expanded.len() <= MAX_MASK_LEN && expanded.bytes().all(|b| b.is_ascii_graphic()) {
        return Ok(());
    }
    let shown: String = mask.chars().take(64).collect();
    Err(ApiError::BadRequest(format!(
        "network.maskRequestHost must be a Host value of at most {MAX_MASK_LEN} printable \
         ASCII characters without spaces ({PORT_PLACEHOLDER} stands for the port), got \
         '{}'",
        shown.escape_default()
    )))
}

/// `PUT /sandboxes/{id}/network` (204): replaces the egress settings of a
/// running sandbox at once; 409 while paused. `allowPublicTraffic` and
/// `maskRequestHost` keep their create-time values.
pub(crate) async fn update(
    State(api): State<Api>,
    Team(team): Team,
    SandboxPath(id): SandboxPath,
    JsonBody(body): JsonBody<NetworkUpdate>,
) -> Result<StatusCode, ApiError> {
    refuse_unsupported(body.rules.as_ref(), body.egress_proxy.as_ref())?;
    let egress = NetworkSpec {
        allow_out: body.allow_out.unwrap_or_default(),
        deny_out: body.deny_out.unwrap_or_default(),
        dns_servers: body.dns_servers.unwrap_or_default(),
    };
    check_egress(&egress, body.allow_internet_access)?;
    // In a task of its own: a client going away after the node applied the
    // rules must not leave the record with the old ones.
    in_task(replace(api, team, id, egress, body.allow_internet_access)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Applies checked egress settings on the node, then records them.
async fn replace(
    api: Api,
    team: String,
    id: SandboxId,
    egress: NetworkSpec,
    allow_internet_access: Option<bool>,
) -> Result<(), ApiError> {
    // One update of a sandbox at a time, so the record ends with what the
    // node applied last.
    let _guard = api.sandbox_locks().lock(id.as_str()).await;
    let rec = find(&api, &team, &id).await?;
    let allow = allow_internet_access.unwrap_or(true);
    if let Err(e) = api
        .node_of(&rec)?
        .update_network(&id, egress.clone(), allow)
        .await
    {
        return Err(node_failure(&api, &id, e).await);
    }
    let kept = rec.network.unwrap_or_default();
    let network = NetworkConfig {
        egress,
        allow_public_traffic: kept.allow_public_traffic,
        mask_request_host: kept.mask_request_host,
    };
    if !api
        .db()
        .set_network(&id, &network, allow_internet_access)
        .await?
    {
        // It ended meanwhile.
        return Err(ApiError::sandbox_not_found(id.as_str()));
    }
    tracing::info!(
        allow_internet_access = allow,
        "sandbox network rules replaced"
    );
    Ok(())
}

/// Answer of `GET /sandboxes/{id}/network/logs`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct NetworkLogs {
    entries: Vec<EgressLogEntry>,
}

/// `start` of the log query: Unix milliseconds or an RFC 3339 date-time.
fn parse_start(s: &str) -> Result<DateTime<Utc>, ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "start must be Unix milliseconds or an RFC 3339 date-time, got '{s}'"
        ))
    };
    let s = s.trim();
    if let Ok(ms) = i64::from_str(s) {
        return DateTime::from_timestamp_millis(ms).ok_or_else(bad);
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| bad())
}

/// `GET /sandboxes/{id}/network/logs?start=&limit=` (Arca's own): the
/// sandbox's egress log, oldest first, from `start` on (inclusive), at
/// most `limit` entries (default 1000, at most 2000).
pub(crate) async fn logs(
    State(api): State<Api>,
    Team(team): Team,
    SandboxPath(id): SandboxPath,
    q: QueryParams,
) -> Result<Json<NetworkLogs>, ApiError> {
    let start = q.get("start").map(parse_start).transpose()?;
    let limit = q.int("limit")?.unwrap_or(DEFAULT_LOG_ENTRIES);
    if !(0..=MAX_LOG_ENTRIES).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 0 and {MAX_LOG_ENTRIES}, got {limit}"
        )));
    }
    let rec = find(&api, &team, &id).await?;
    let mut entries = match api.node_of(&rec)?.network_logs(&id).await {
        Ok(e) => e,
        Err(e) => return Err(node_failure(&api, &id, e).await),
    };
    // The node answers oldest first; sorting again costs little and keeps
    // `start` and `limit` right whatever it did.
    entries.sort_by_key(|e| e.timestamp);
    let entries = entries
        .into_iter()
        .filter(|e| start.is_none_or(|s| e.timestamp >= s))
        .take(usize::try_from(limit).unwrap_or(0))
        .collect();
    Ok(Json(NetworkLogs { entries }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: serde_json::Value) -> NetworkBody {
        serde_json::from_value(v).unwrap()
    }

    fn create_err(v: serde_json::Value, allow: Option<bool>) -> String {
        NetworkConfig::from_create(Some(body(v)), allow)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn stored_form_has_only_the_keys_set() {
        let n = NetworkConfig::from_create(
            Some(body(serde_json::json!({
                "allowOut": ["a.test"], "denyOut": ["0.0.0.0/0"], "dnsServers": [],
                "rules": {}, "egressProxy": null, "httpsPorts": [],
                "allowPublicTraffic": false, "maskRequestHost": "${PORT}-x.test"
            }))),
            None,
        )
        .unwrap()
        .unwrap();
        assert!(n.is_private());
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "allowOut": ["a.test"], "denyOut": ["0.0.0.0/0"],
                "allowPublicTraffic": false, "maskRequestHost": "${PORT}-x.test"
            })
        );
        let back: NetworkConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, n);
        assert_eq!(
            serde_json::to_string(&NetworkConfig::default()).unwrap(),
            "{}"
        );
        assert!(
            NetworkConfig::from_create(None, Some(false))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn unsupported_keys_and_bad_entries_are_named() {
        let rules =
            serde_json::json!({"rules": {"a.test": [{"transform": {"headers": {"x": "y"}}}]}});
        assert!(create_err(rules, None).contains("network.rules"));
        let proxy = serde_json::json!({"egressProxy": {"address": "p:1080"}});
        assert!(create_err(proxy, None).contains("network.egressProxy"));
        let ports = serde_json::json!({"httpsPorts": [3000]});
        assert!(create_err(ports, None).contains("network.httpsPorts"));
        let domain = serde_json::json!({"allowOut": ["a.test"]});
        assert!(create_err(domain.clone(), None).contains("0.0.0.0/0"));
        // allow_internet_access: false denies all, so domains are fine.
        assert!(NetworkConfig::from_create(Some(body(domain)), Some(false)).is_ok());
        for mask in ["a b", "caf\u{e9}.test", "x\n", &"a".repeat(254)] {
            let m = serde_json::json!({ "maskRequestHost": mask });
            assert!(create_err(m, None).contains("maskRequestHost"), "{mask:?}");
        }
        let long = format!("{}{PORT_PLACEHOLDER}", "a".repeat(248));
        assert!(
            NetworkConfig::from_create(
                Some(body(serde_json::json!({ "maskRequestHost": long }))),
                None
            )
            .is_ok()
        );
    }

    #[test]
    fn ingress_carries_token_and_mask() {
        let n = NetworkConfig {
            allow_public_traffic: Some(false),
            mask_request_host: Some("m".into()),
            ..NetworkConfig::default()
        };
        let token = traffic_token_for(Some(&n)).unwrap();
        assert_eq!(token.len(), 64);
        let i = ingress_spec(Some(&n), Some(&token));
        assert_eq!(i.traffic_access_token.as_deref(), Some(token.as_str()));
        assert_eq!(i.mask_request_host.as_deref(), Some("m"));
        assert!(traffic_token_for(None).is_none());
        assert!(traffic_token_for(Some(&NetworkConfig::default())).is_none());
        assert_eq!(ingress_spec(None, None), IngressSpec::default());
    }

    #[test]
    fn log_start_reads_ms_and_rfc3339() {
        let a = parse_start("1700000000123").unwrap();
        let b = parse_start("2023-11-14T22:13:20.123Z").unwrap();
        assert_eq!(a, b);
        assert!(parse_start("yesterday").is_err());
    }
}
