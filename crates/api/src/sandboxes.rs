//! Sandbox endpoints (CONTRACT 2.3 and 4.4): create, connect, info, list,
//! kill, timeouts, metrics and logs, for both SDK generations.

use std::collections::BTreeMap;

use arca_proto::node::{
    NodeError, NodeService, PauseMode, RUNTIME_METADATA_KEY, Runtime, SandboxId, SandboxSpec,
    SandboxStatus, TimeoutAction,
};
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDateTime, SubsecRound as _, TimeDelta, Utc};
use http::{HeaderMap, StatusCode};
use tracing::Instrument as _;

use crate::Api;
use crate::db::{Claim, Cursor, ListFilter, Order, RecordState, SandboxRecord};
use crate::error::{ApiError, chain};
use crate::http::{JsonBody, QueryParams, SandboxPath, Team};
use crate::ids;
use crate::models::{
    ConnectSandbox, ListedSandbox, NewSandbox, PauseRequest, RefreshRequest, ResumeRequest,
    SandboxBody, SandboxDetail, SandboxLog, SandboxLogEntry, SandboxLogs, SandboxLogsV2,
    SandboxMetric, TimeoutRequest,
};
use crate::network::{NetworkConfig, ingress_spec, traffic_token_for};
use crate::templates::refs::{self, TemplateRef};
use crate::templates::resources;

/// Lifetime of a v1-created sandbox when the request has none.
pub(crate) const V1_DEFAULT_TIMEOUT_SECS: i64 = 15;
/// Lifetime of a v2-created sandbox, and the v2 connect extension, when the
/// request has none.
const V2_DEFAULT_TIMEOUT_SECS: i64 = 300;
/// Default and upper bound of the deprecated keep-alive (`/refreshes`).
const DEFAULT_REFRESH_SECS: i64 = 15;
const MAX_REFRESH_SECS: i64 = 3600;
/// Page size of `GET /v2/sandboxes`: default and maximum.
const MAX_PAGE: i64 = 100;
/// Lines of a log answer: default and maximum.
const MAX_LOG_LINES: i64 = 1000;
/// How long an `Idempotency-Key` is remembered.
const IDEMPOTENCY_WINDOW: TimeDelta = TimeDelta::days(1);
/// Longest `Idempotency-Key` (CONTRACT 1.4).
const MAX_IDEMPOTENCY_KEY: usize = 255;
/// Bytes of randomness in an envd access token.
pub(crate) const ENVD_TOKEN_BYTES: usize = 32;

// ---- validation -------------------------------------------------------------

/// A create request after validation.
#[derive(Debug, Clone)]
struct CreateRequest {
    template: TemplateRef,
    timeout_secs: i64,
    auto_pause: bool,
    auto_pause_memory: bool,
    auto_resume: bool,
    allow_internet_access: Option<bool>,
    metadata: BTreeMap<String, String>,
    env_vars: BTreeMap<String, String>,
    network: Option<NetworkConfig>,
    /// The isolation backend asked for (else the template's or `ns`).
    runtime: Option<Runtime>,
}

/// The isolation backend a create asks for: the body's `runtime` or the
/// metadata key `arca.runtime` (which must agree when both are given).
fn requested_runtime(
    body: Option<&str>,
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<Option<Runtime>, ApiError> {
    let from_meta = metadata.and_then(|m| m.get(RUNTIME_METADATA_KEY));
    let parse = |s: &str| Runtime::parse(s).map_err(ApiError::BadRequest);
    match (body, from_meta) {
        (None, None) => Ok(None),
        (Some(b), None) => parse(b).map(Some),
        (None, Some(m)) => parse(m).map(Some),
        (Some(b), Some(m)) => {
            let (b, m) = (parse(b)?, parse(m)?);
            if b != m {
                return Err(ApiError::BadRequest(format!(
                    "runtime '{b}' and metadata {RUNTIME_METADATA_KEY}='{m}' disagree; give one"
                )));
            }
            Ok(Some(b))
        }
    }
}

impl CreateRequest {
    fn validate(
        body: NewSandbox,
        default_timeout: i64,
        max_timeout: u64,
    ) -> Result<CreateRequest, ApiError> {
        let timeout_secs = check_timeout(body.timeout.unwrap_or(default_timeout), 1, max_timeout)?;
        let auto_pause = body.auto_pause.unwrap_or(false);
        let auto_pause_memory = body.auto_pause_memory.unwrap_or(true);
        let auto_resume = body.auto_resume.is_some_and(|a| a.enabled);
        if !auto_pause_memory && !auto_pause {
            return Err(ApiError::BadRequest(
                "autoPauseMemory can only be set together with autoPause".into(),
            ));
        }
        if auto_resume && !auto_pause_memory {
            return Err(ApiError::BadRequest(
                "autoResume cannot be combined with autoPauseMemory: false".into(),
            ));
        }
        if auto_resume && !auto_pause {
            return Err(ApiError::BadRequest(
                "autoResume needs autoPause: only a paused sandbox can resume".into(),
            ));
        }
        let network = NetworkConfig::from_create(body.network, body.allow_internet_access)?;
        let runtime = requested_runtime(body.runtime.as_deref(), body.metadata.as_ref())?;
        Ok(CreateRequest {
            template: TemplateRef::parse(&body.template_id, "templateID")?,
            timeout_secs,
            auto_pause,
            auto_pause_memory,
            auto_resume,
            allow_internet_access: body.allow_internet_access,
            metadata: body.metadata.unwrap_or_default(),
            env_vars: body.env_vars.unwrap_or_default(),
            network,
            runtime,
        })
    }
}

/// `t` if it is within `min..=max` seconds; else a 400 naming the limits.
pub(crate) fn check_timeout(t: i64, min: i64, max: u64) -> Result<i64, ApiError> {
    let max_i = i64::try_from(max).unwrap_or(i64::MAX);
    if (min..=max_i).contains(&t) {
        return Ok(t);
    }
    let hint = if max % 3600 == 0 && max >= 3600 {
        format!(" ({} hours)", max / 3600)
    } else {
        String::new()
    };
    Err(ApiError::BadRequest(format!(
        "timeout must be between {min} and {max} seconds{hint}, got {t}"
    )))
}

/// The current time at the precision the database keeps (microseconds), so
/// that the api's and the node's copies of a deadline compare equal.
pub(crate) fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// `now + secs`, or a 400 when that is not a representable time.
pub(crate) fn deadline(now: DateTime<Utc>, secs: i64) -> Result<DateTime<Utc>, ApiError> {
    TimeDelta::try_seconds(secs)
        .and_then(|d| now.checked_add_signed(d))
        .ok_or_else(|| ApiError::BadRequest(format!("timeout of {secs} seconds is too large")))
}

// ---- create -----------------------------------------------------------------

/// `POST /sandboxes` (SDKs up to ~2.50).
pub(crate) async fn create_v1(
    State(api): State<Api>,
    Team(team): Team,
    JsonBody(body): JsonBody<NewSandbox>,
) -> Result<Response, ApiError> {
    let req =
        CreateRequest::validate(body, V1_DEFAULT_TIMEOUT_SECS, api.config().max_timeout_secs)?;
    let rec = in_task(create(api.clone(), team, req)).await?;
    Ok(created(&api, &rec))
}

/// `POST /v2/sandboxes` (newer SDKs), with optional `Idempotency-Key`.
pub(crate) async fn create_v2(
    State(api): State<Api>,
    Team(team): Team,
    headers: HeaderMap,
    JsonBody(raw): JsonBody<serde_json::Value>,
) -> Result<Response, ApiError> {
    let body: NewSandbox = serde_json::from_value(raw.clone())
        .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))?;
    let req =
        CreateRequest::validate(body, V2_DEFAULT_TIMEOUT_SECS, api.config().max_timeout_secs)?;
    let rec = match idempotency_key(&headers)? {
        None => in_task(create(api.clone(), team, req)).await?,
        Some(key) => {
            // Sorted-key JSON: the same document hashes the same whatever
            // the client's key order.
            let canonical = serde_json::to_vec(&raw)
                .map_err(|e| ApiError::Internal(format!("encoding request: {e}")))?;
            let hash = ids::sha256_hex(&canonical);
            in_task(idempotent_create(api.clone(), team, key, hash, req)).await?
        }
    };
    Ok(created(&api, &rec))
}

fn created(api: &Api, rec: &SandboxRecord) -> Response {
    let body = SandboxBody::new(rec, api.config().domain.as_deref());
    (StatusCode::CREATED, Json(body)).into_response()
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v.to_str().unwrap_or_default();
    let ok = !key.is_empty()
        && key.len() <= MAX_IDEMPOTENCY_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(Some(key.to_string()))
    } else {
        Err(ApiError::BadRequest(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters of [a-z0-9-]"
        )))
    }
}

/// Runs a create (or another change both the node and the record must
/// see) to completion even if the client goes away: dropping it half-way
/// could leave a sandbox on the node without a running record, or a record
/// that says otherwise than the node.
pub(crate) async fn in_task<F, T>(fut: F) -> Result<T, ApiError>
where
    F: Future<Output = Result<T, ApiError>> + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(fut.instrument(tracing::Span::current()))
        .await
        .map_err(|e| ApiError::Internal(format!("sandbox task failed: {e}")))?
}

async fn idempotent_create(
    api: Api,
    team: String,
    key: String,
    hash: String,
    req: CreateRequest,
) -> Result<SandboxRecord, ApiError> {
    let db = api.db().clone();
    let now = now();
    db.expire_idempotency(now - IDEMPOTENCY_WINDOW).await?;
    // Twice at most: a key whose sandbox is gone is released and claimed anew.
    for _ in 0..2 {
        match db.claim_idempotency(&team, &key, &hash, now).await? {
            Claim::Claimed => {
                let res = create(api.clone(), team.clone(), req).await;
                let book = match &res {
                    Ok(rec) => db.finish_idempotency(&team, &key, &rec.id).await,
                    Err(_) => db.release_idempotency(&team, &key).await,
                };
                if let Err(e) = book {
                    // The sandbox exists; a retry would make a second one,
                    // which is the lesser evil than failing this create.
                    tracing::warn!(error = %chain(&e), "could not record the Idempotency-Key outcome");
                }
                return res;
            }
            Claim::Existing { request_hash, .. } if request_hash != hash => {
                return Err(ApiError::Conflict {
                    message: "this Idempotency-Key was used with a different request body".into(),
                    error_code: Some("idempotency_request_mismatch"),
                });
            }
            Claim::Existing {
                sandbox_id: None, ..
            } => {
                return Err(ApiError::Conflict {
                    message: "a request with this Idempotency-Key is still in progress".into(),
                    error_code: Some("idempotency_in_progress"),
                });
            }
            Claim::Existing {
                sandbox_id: Some(id),
                ..
            } => {
                let found = match SandboxId::parse(&id) {
                    Ok(id) => db.get_sandbox(&team, &id).await?,
                    Err(_) => None,
                };
                if let Some(rec) = found {
                    return Ok(rec);
                }
                db.release_idempotency(&team, &key).await?;
            }
        }
    }
    Err(ApiError::Conflict {
        message: "a request with this Idempotency-Key is still in progress".into(),
        error_code: Some("idempotency_in_progress"),
    })
}

/// The create flow (ARCHITECTURE section 3): record as `creating`, start on
/// the node, mark `running`. On any failure the record is removed and the
/// node told to drop whatever it may have made.
async fn create(api: Api, team: String, req: CreateRequest) -> Result<SandboxRecord, ApiError> {
    let found = refs::resolve_build(&api, &team, &req.template).await?;
    let res = resources(&api, &found.build);
    let now = now();
    let rec = SandboxRecord {
        id: ids::new_sandbox_id(),
        team_id: team,
        template_id: found.template.id.clone(),
        alias: found.template.names.first().cloned(),
        state: RecordState::Creating,
        metadata: req.metadata,
        envd_access_token: ids::random_hex(ENVD_TOKEN_BYTES),
        envd_version: found.build.envd_version.clone(),
        started_at: now,
        end_at: deadline(now, req.timeout_secs)?,
        cpu_count: res.cpu_count,
        memory_mb: res.memory_mb,
        disk_size_mb: res.disk_size_mb,
        allow_internet_access: req.allow_internet_access,
        auto_pause: req.auto_pause,
        auto_pause_memory: req.auto_pause_memory,
        auto_resume: req.auto_resume,
        build_id: Some(found.build.id.clone()),
        traffic_access_token: traffic_token_for(req.network.as_ref()),
        network: req.network,
        node_id: String::new(),
    };
    tracing::Span::current().record("sandbox_id", rec.id.as_str());
    let candidates = api
        .nodes()
        .candidates(&found.template.id, &found.build.id, req.runtime)
        .await?;
    let mut rec = rec;
    let mut full = Vec::new();
    for (i, c) in candidates.into_iter().enumerate() {
        rec.node_id.clone_from(&c.node_id);
        // The record names its node before the node is asked, so a
        // reconciliation never takes the sandbox for an unknown one.
        if i == 0 {
            api.db().insert_sandbox(&rec).await?;
        } else if !api
            .db()
            .set_node_of_creating(rec.id.as_str(), &c.node_id)
            .await?
        {
            return Err(ApiError::Internal(format!(
                "the record of sandbox {} vanished while it was being placed",
                rec.id
            )));
        }
        let mut spec = spec_for(
            &rec,
            &found.build.id,
            req.env_vars.clone(),
            req.timeout_secs,
        );
        spec.template_source = c.template_source;
        spec.runtime = req.runtime;
        match c.node.create(spec).await {
            Ok(status) => return mark_started(&api, rec, status).await,
            // A full or unreachable node made nothing: try the next one.
            Err(NodeError::Capacity(m) | NodeError::Unavailable(m)) => {
                tracing::info!(node_id = %c.node_id, reason = %m, "node cannot take the sandbox; placing it elsewhere");
                full.push(format!("{}: {m}", c.node_id));
            }
            Err(e) => {
                undo_create(&api, c.node.as_ref(), &rec.id).await;
                return Err(ApiError::from_node(e));
            }
        }
    }
    if let Err(e) = api.db().delete_sandbox(rec.id.as_str()).await {
        tracing::warn!(error = %chain(&e), "could not delete the record of a failed create");
    }
    Err(ApiError::Capacity(if full.is_empty() {
        "no node can take the sandbox".into()
    } else {
        format!("no node could take the sandbox ({})", full.join("; "))
    }))
}

/// What a node needs to start the sandbox of `rec` (a new record) from
/// `build_id`, living `timeout_secs` from its start.
pub(crate) fn spec_for(
    rec: &SandboxRecord,
    build_id: &str,
    env_vars: BTreeMap<String, String>,
    timeout_secs: i64,
) -> SandboxSpec {
    SandboxSpec {
        sandbox_id: rec.id.clone(),
        template_id: rec.template_id.clone(),
        build_id: build_id.to_string(),
        team_id: rec.team_id.clone(),
        cpu_count: rec.cpu_count,
        memory_mb: rec.memory_mb,
        disk_size_mb: rec.disk_size_mb,
        env_vars,
        envd_access_token: rec.envd_access_token.clone(),
        end_at: rec.end_at,
        on_timeout: if rec.auto_pause {
            TimeoutAction::Pause
        } else {
            TimeoutAction::Kill
        },
        auto_resume: rec.auto_resume,
        timeout_secs: u64::try_from(timeout_secs).unwrap_or(0),
        auto_pause_mode: if rec.auto_pause_memory {
            PauseMode::Full
        } else {
            PauseMode::Filesystem
        },
        allow_internet_access: rec.allow_internet_access.unwrap_or(true),
        network: rec
            .network
            .as_ref()
            .map(|n| n.egress.clone())
            .unwrap_or_default(),
        ingress: ingress_spec(rec.network.as_ref(), rec.traffic_access_token.as_deref()),
        template_source: None,
        runtime: None,
    }
}

/// Marks the `creating` record of a sandbox the node started running,
/// with what the node reports. A record that cannot be written is undone
/// (sandbox killed); one that vanished meanwhile (the sandbox ended) is an
/// error.
pub(crate) async fn mark_started(
    api: &Api,
    mut rec: SandboxRecord,
    status: SandboxStatus,
) -> Result<SandboxRecord, ApiError> {
    if !status.envd_version.is_empty() {
        rec.envd_version = status.envd_version;
    }
    rec.end_at = status.end_at;
    rec.cpu_count = status.cpu_count;
    rec.memory_mb = status.memory_mb;
    rec.disk_size_mb = status.disk_size_mb;
    rec.state = RecordState::Running;
    // A backend other than the default is named where every SDK's
    // get_info shows it (the default adds nothing to the caller's
    // metadata; the REST detail has `runtime` either way).
    if status.runtime != Runtime::Ns {
        rec.metadata.insert(
            RUNTIME_METADATA_KEY.to_string(),
            status.runtime.as_str().to_string(),
        );
    }
    let marked = api
        .db()
        .mark_running(
            &rec.id,
            &rec.envd_version,
            rec.end_at,
            (rec.cpu_count, rec.memory_mb, rec.disk_size_mb),
            &rec.metadata,
        )
        .await;
    match marked {
        Ok(true) => {
            tracing::info!(sandbox_id = %rec.id, template_id = %rec.template_id, build_id = ?rec.build_id, "sandbox created");
            if let Err(e) = api.db().count_spawn(&rec.template_id, now()).await {
                tracing::warn!(error = %chain(&e), "could not count the template's spawn");
            }
            Ok(rec)
        }
        Ok(false) => {
            // The record went (the sandbox ended, or its node was forgotten
            // or reconciled meanwhile): no sandbox may run without one.
            if let Ok(node) = api.node_of(&rec) {
                undo_create(api, node.as_ref(), &rec.id).await;
            }
            Err(ApiError::Internal(format!(
                "sandbox {} ended while it was starting",
                rec.id
            )))
        }
        Err(e) => {
            if let Ok(node) = api.node_of(&rec) {
                undo_create(api, node.as_ref(), &rec.id).await;
            }
            Err(e)
        }
    }
}

/// Best-effort removal of a failed create from node and database.
pub(crate) async fn undo_create(api: &Api, node: &dyn NodeService, id: &SandboxId) {
    match node.kill(id).await {
        Ok(()) | Err(NodeError::SandboxNotFound(_)) => {}
        Err(e) => tracing::warn!(error = %e, "could not kill a half-created sandbox"),
    }
    if let Err(e) = api.db().delete_sandbox(id.as_str()).await {
        // The next start's reconciliation removes it.
        tracing::warn!(error = %chain(&e), "could not delete the record of a failed create");
    }
}

// ---- one sandbox ------------------------------------------------------------

/// The team's visible record of `id`, or 404.
pub(crate) async fn find(api: &Api, team: &str, id: &SandboxId) -> Result<SandboxRecord, ApiError> {
    api.db()
        .get_sandbox(team, id)
        .await?
        .ok_or_else(|| ApiError::sandbox_not_found(id.as_str()))
}

/// Maps a node failure on an existing record; a sandbox the node no longer
/// has loses its record on the way.
pub(crate) async fn node_failure(api: &Api, id: &SandboxId, err: NodeError) -> ApiError {
    if matches!(err, NodeError::SandboxNotFound(_)) {
        if let Err(e) = api.db().delete_sandbox(id.as_str()).await {
            return e;
        }
    }
    ApiError::from_node(err)
}

/// Moves the deadline on the node, then in the record.
async fn move_end_at(
    api: &Api,
    rec: &SandboxRecord,
    end_at: DateTime<Utc>,
) -> Result<DateTime<Utc>, ApiError> {
    let id = &rec.id;
    let status = match api.node_of(rec)?.set_end_at(id, end_at).await {
        Ok(s) => s,
        Err(e) => return Err(node_failure(api, id, e).await),
    };
    api.db().set_end_at(id, status.end_at).await?;
    Ok(status.end_at)
}

/// `GET /sandboxes/{id}`.
pub(crate) async fn get_info(
    State(api): State<Api>,
    Team(team): Team,
    SandboxPath(id): SandboxPath,
) -> Result<Json<SandboxDetail>, ApiError> {
    let rec = find(&api, &team, &id).await?;
    // What a pause kept is the node's to say.
    let pause_mode = match api.node_of(&rec) {
        Ok(node) if rec.state == RecordState::Paused => {
            node.get(&id).await.ok().and_then(|s| s.pause_mode)
        }
        _ => None,
    };
    let detail = SandboxDetail::new(&rec, api.config().domain.as_deref(), pause_mode);
    Ok(Json(match api.nodes().status(&rec.node_id) {
        Some(status) => detail.with_node(&rec.node_id, status),
        None => detail,
    }))
}

/// `DELETE /sandboxes/{id}`: 204, or 404 if there was nothing to kill.
pub(crate) async fn kill(
    State(api): State<Api>,
    Team(team): Team,
    SandboxPath(id): SandboxPath,
) -> Result<StatusCode, ApiError> {
    let rec = find(&api, &team, &id).await?;
    match api.nodes().node_fresh(&rec.node_id).await {
        Ok(node) => match node.kill(&id).await {
            Ok(()) | Err(NodeError::SandboxNotFound(_)) => {}
            Err(e) => return Err(ApiError::from_node(e)),
        },
        // A lost node kills what the database no longer knows when it
        // returns (ADR 0006).
        Err(ApiError::NodeUnavailable(why)) => {
            tracing::info!(node_id = %rec.node_id, %why, "sandbox record removed while its node is away");
        }
        Err(e) => return Err(e),
    }
    api.db().delete_sandbox(id.as_str()).await?;
    tracing::info!("sandbox killed");
    Ok(StatusCode::NO_CONTENT)
}

async fn connect(
    api: Api,
    team: String,
    id: SandboxId,
    timeout: i64,
) -> Result<Response, ApiError> {
    let timeout = check_timeout(timeout, 0, api.config().max_timeout_secs)?;
    let mut rec = find(&api, &team, &id).await?;
    sync_state(&api, &mut rec).await?;
    if rec.state == RecordState::Paused {
        if timeout == 0 {
            return Err(ApiError::BadRequest(
                "timeout must be at least 1 second to resume a paused sandbox".into(),
            ));
        }
        // Resumed in place: same id and token, `endAt = now + timeout`.
        match resume_record(&api, rec.clone(), timeout).await {
            Ok(rec) => {
                let body = SandboxBody::new(&rec, api.config().domain.as_deref());
                return Ok((StatusCode::CREATED, Json(body)).into_response());
            }
            // Resumed meanwhile (another connect, inbound traffic): it
            // runs, so this is an ordinary connect.
            Err(ApiError::Conflict { .. }) => sync_state(&api, &mut rec).await?,
            Err(e) => return Err(e),
        }
    }
    // Connecting never shortens a sandbox's life (CONTRACT 4.4).
    let wanted = deadline(now(), timeout)?;
    if wanted > rec.end_at {
        rec.end_at = move_end_at(&api, &rec, wanted).await?;
    }
    let body = SandboxBody::new(&rec, api.config().domain.as_deref());
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// `POST /sandboxes/{id}/connect` (v1: `timeout` required).
pub(crate) async fn connect_v1(
    State(api): State<Api>,
    Team(team): Team,
    SandboxPath(id): SandboxPath,
    JsonBody(body): JsonBody<ConnectSandbox>,
) -> Result<Response, ApiError> {
    let Some(timeout) = body.timeout else {
        return Err(ApiError::BadRequest("timeout is required".into()));
    };
    connect(api, team, id, timeout).await
}

/// `POST /v2/sandboxes/{id}/connect`.
pub(crate) async fn connect_v2(
    State(api): State<Api>,
    Team(team): Team,
    SandboxPath(id): SandboxPath,
    JsonBody(body): JsonBody<ConnectSandbox>,
) -> Result<Response, ApiError> {
    let timeout = body.timeout.unwrap_or(V2_DEFAULT_TIMEOUT_SECS);
    connect(api, team, id, timeout).await
}

/// `POST /sandboxes/{id}/timeout`: `endAt = now + timeout`, shorter or
/// longer; 0 ends the sandbox now.
pub(crate) async fn set_timeout(
    State(api): State<Api>,
    Team(team): Team,
    SandboxPath(id): SandboxPath,
    JsonBody(body): JsonBody<TimeoutRequest>,
) -> Result<StatusCode, ApiError> {
    let timeout = check_timeout(body.timeout, 0, api.config().max_timeout_secs)?;
    let rec = find(&api, &team, &id).await?;
    move_end_at(&api, &rec, deadline(now(), timeout)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/refreshes` (deprecated keep-alive): like connect,
/// extends to `now + duration` and never shortens.
pub(crate) async fn refresh(
    State(api): State<Api>,
    Team(team): Team,
    SandboxPath(id): SandboxPath,
    JsonBody(body): JsonBody<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    let duration = body.duration.unwrap_or(DEFAULT_REFRESH_SECS);
    if !(0..=MAX_REFRESH_SECS).contains(&duration) {
        return Err(ApiError::BadRequest(format!(
            "duration must be between 0 and {MAX_REFRESH_SECS} seconds, got {duration}"
        )));
    }
    let rec = find(&api, &team, &id).await?;
    let wanted = deadline(now(), duration)?;
    if wanted > rec.end_at {
        move_end_at(&api, &rec, wanted).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Makes the record's state the node's (the node pauses by itself at
/// deadlines and resumes on traffic; an event about it may be missed).
async fn sync_state(api: &Api, rec: &mut SandboxRecord) -> Result<(), ApiError> {
    let status = match api.node_of(rec)?.get(&rec.id).await {
        Ok(s) => s,
        Err(e) => return Err(node_failure(api, &rec.id, e).await),
    };
    let state = RecordState::from(status.state);
    if state != rec.state {
        api.db().set_state(&rec.id, state).await?;
        api.db().set_end_at(&rec.id, status.end_at).await?;
        rec.state = state;
        rec.end_at = status.end_at;
    }
    Ok(())
}

/// Thaws a paused sandbox on its node with a deadline `timeout` seconds
/// from now and records it running.
async fn resume_record(
    api: &Api,
    mut rec: SandboxRecord,
    timeout: i64,
) -> Result<SandboxRecord, ApiError> {
    let id = rec.id.clone();
    let status = match api
        .node_of(&rec)?
        .resume(&id, deadline(now(), timeout)?)
        .await
    {
        Ok(s) => s,
        Err(e) => return Err(node_failure(api, &id, e).await),
    };
    api.db().set_end_at(&id, status.end_at).await?;
    if !api.db().set_state(&id, RecordState::Running).await? {
        return Err(ApiError::NotFound(format!("sandbox {id} not found")));
    }
    rec.end_at = status.end_at;
    rec.state = RecordState::Running;
    Ok(rec)
}

/// `POST /sandboxes/{id}/pause` (204): every process stops where it is,
/// memory and files kept (`memory: false`: files only, processes end);
/// 409 when already paused.
pub(crate) async fn pause(
    State(api): State<Api>,
    Team(team): Team,
    SandboxPath(id): SandboxPath,
    JsonBody(body): JsonBody<PauseRequest>,
) -> Result<StatusCode, ApiError> {
    let rec = find(&api, &team, &id).await?;
    let mode = if body.memory == Some(false) {
        PauseMode::Filesystem
    } else {
        PauseMode::Full
    };
    match api.node_of(&rec)?.pause(&id, mode).await {
        Ok(()) => {}
        Err(NodeError::Conflict(m)) => {
            // Paused already (at its deadline, say): the record learns it.
            api.db().set_state(&id, RecordState::Paused).await?;
            return Err(ApiError::Conflict {
                message: m,
                error_code: None,
            });
        }
        Err(e) => return Err(node_failure(&api, &id, e).await),
    }
    api.db().set_state(&id, RecordState::Paused).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/resume` (deprecated, 201): resumes a paused
/// sandbox for `timeout` seconds (default 15); 409 when it is running.
pub(crate) async fn resume(
    State(api): State<Api>,
    Team(team): Team,
    SandboxPath(id): SandboxPath,
    JsonBody(body): JsonBody<ResumeRequest>,
) -> Result<Response, ApiError> {
    let mut rec = find(&api, &team, &id).await?;
    sync_state(&api, &mut rec).await?;
    if rec.state != RecordState::Paused {
        return Err(ApiError::Conflict {
            message: format!("sandbox {id} is already running"),
            error_code: None,
        });
    }
    let timeout = body.timeout.unwrap_or(15);
    let timeout = check_timeout(timeout, 1, api.config().max_timeout_secs)?;
    let rec = resume_record(&api, rec, timeout).await?;
    let body = SandboxBody::new(&rec, api.config().domain.as_deref());
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /sandboxes/{id}/metrics?start=&end=` (Unix seconds, inclusive).
pub(crate) async fn metrics(
    State(api): State<Api>,
    Team(team): Team,
    SandboxPath(id): SandboxPath,
    q: QueryParams,
) -> Result<Json<Vec<SandboxMetric>>, ApiError> {
    let start = q.int("start")?;
    let end = q.int("end")?;
    if let (Some(s), Some(e)) = (start, end) {
        if s > e {
            return Err(ApiError::BadRequest("start must not be after end".into()));
        }
    }
    let rec = find(&api, &team, &id).await?;
    let samples = match api.node_of(&rec)?.metrics(&id).await {
        Ok(s) => s,
        Err(e) => return Err(node_failure(&api, &id, e).await),
    };
    let out = samples
        .into_iter()
        .filter(|m| {
            let t = m.timestamp.timestamp();
            start.is_none_or(|s| t >= s) && end.is_none_or(|e| t <= e)
        })
        .map(|m| SandboxMetric {
            timestamp: m.timestamp,
            timestamp_unix: m.timestamp.timestamp(),
            cpu_count: m.cpu_count,
            cpu_used_pct: m.cpu_used_pct,
            mem_used: m.mem_used,
            mem_total: m.mem_total,
            mem_cache: m.mem_cache,
            disk_used: m.disk_used,
            disk_total: m.disk_total,
        })
        .collect();
    Ok(Json(out))
}

/// Log levels in increasing severity; anything else reads as `info`.
const LEVELS: [&str; 4] = ["debug", "info", "warn", "error"];

fn level_rank(level: &str) -> usize {
    match level.to_ascii_lowercase().as_str() {
        "debug" | "trace" => 0,
        "warn" | "warning" => 2,
        "error" | "fatal" | "panic" => 3,
        _ => 1,
    }
}

fn log_limit(q: &QueryParams) -> Result<usize, ApiError> {
    let limit = q.int("limit")?.unwrap_or(MAX_LOG_LINES);
    if !(0..=MAX_LOG_LINES).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 0 and {MAX_LOG_LINES}"
        )));
    }
    Ok(usize::try_from(limit).unwrap_or(0))
}

fn entry(e: arca_proto::node::LogEntry) -> SandboxLogEntry {
    SandboxLogEntry {
        timestamp: e.timestamp,
        level: LEVELS[level_rank(&e.level)],
        message: e.message,
        fields: e.fields,
    }
}

async fn node_logs(
    api: &Api,
    team: &str,
    id: &SandboxId,
) -> Result<Vec<arca_proto::node::LogEntry>, ApiError> {
    let rec = find(api, team, id).await?;
    match api.node_of(&rec)?.logs(id).await {
        Ok(l) => Ok(l),
        Err(e) => Err(node_failure(api, id, e).await),
    }
}

/// `GET /sandboxes/{id}/logs?start=<ms>&limit=` (v1, oldest first).
pub(crate) async fn logs_v1(
    State(api): State<Api>,
    Team(team): Team,
    SandboxPath(id): SandboxPath,
    q: QueryParams,
) -> Result<Json<SandboxLogs>, ApiError> {
    let start = q.int("start")?;
    let limit = log_limit(&q)?;
    let entries: Vec<SandboxLogEntry> = node_logs(&api, &team, &id)
        .await?
        .into_iter()
        .filter(|e| start.is_none_or(|s| e.timestamp.timestamp_millis() >= s))
        .take(limit)
        .map(entry)
        .collect();
    let logs = entries
        .iter()
        .map(|e| SandboxLog {
            timestamp: e.timestamp,
            line: e.message.clone(),
        })
        .collect();
    Ok(Json(SandboxLogs {
        logs,
        log_entries: entries,
    }))
}

/// `GET /v2/sandboxes/{id}/logs?cursor=<ms>&limit=&direction=&level=&search=`.
pub(crate) async fn logs_v2(
    State(api): State<Api>,
    Team(team): Team,
    SandboxPath(id): SandboxPath,
    q: QueryParams,
) -> Result<Json<SandboxLogsV2>, ApiError> {
    let cursor = q.int("cursor")?;
    let limit = log_limit(&q)?;
    let backward = match q.get("direction").unwrap_or("forward") {
        "forward" => false,
        "backward" => true,
        other => {
            return Err(ApiError::BadRequest(format!(
                "direction must be forward or backward, got '{other}'"
            )));
        }
    };
    let min_level = match q.get("level") {
        None => 0,
        Some(l) if LEVELS.contains(&l) => level_rank(l),
        Some(l) => {
            return Err(ApiError::BadRequest(format!(
                "level must be one of debug, info, warn, error; got '{l}'"
            )));
        }
    };
    let search = q.get("search").map(str::to_lowercase);
    let mut entries: Vec<_> = node_logs(&api, &team, &id)
        .await?
        .into_iter()
        .filter(|e| {
            let ms = e.timestamp.timestamp_millis();
            cursor.is_none_or(|c| if backward { ms <= c } else { ms >= c })
                && level_rank(&e.level) >= min_level
                && search
                    .as_deref()
                    .is_none_or(|s| e.message.to_lowercase().contains(s))
        })
        .collect();
    if backward {
        entries.reverse();
    }
    let logs = entries.into_iter().take(limit).map(entry).collect();
    Ok(Json(SandboxLogsV2 { logs }))
}

// ---- listing ----------------------------------------------------------------

/// `metadata=k1=v1&k2=v2` (already decoded once): pairs with each key and
/// value percent-decoded again, as the SDKs encode them twice.
fn parse_metadata(q: &QueryParams) -> Result<Vec<(String, String)>, ApiError> {
    let mut pairs = Vec::new();
    for m in q.all("metadata") {
        for pair in m.split('&').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(ApiError::BadRequest(format!(
                    "metadata filter '{pair}' is not key=value"
                )));
            };
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            pairs.push((dec(k), dec(v)));
        }
    }
    Ok(pairs)
}

fn parse_states(q: &QueryParams) -> Result<Vec<RecordState>, ApiError> {
    let mut states = Vec::new();
    for s in q.all("state").flat_map(|v| v.split(',')).map(str::trim) {
        let st = match s {
            "" => continue,
            "running" => RecordState::Running,
            "paused" => RecordState::Paused,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "state must be running or paused, got '{other}'"
                )));
            }
        };
        if !states.contains(&st) {
            states.push(st);
        }
    }
    if states.is_empty() {
        states = vec![RecordState::Running, RecordState::Paused];
    }
    Ok(states)
}

/// RFC 3339 with any offset; a naive time (Python's `isoformat()` of a
/// naive datetime) is taken as UTC.
fn parse_time(s: &str) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .map(|n| n.and_utc())
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "startedAfter must be an RFC 3339 date-time, got '{s}'"
            ))
        })
}

fn encode_cursor(r: &SandboxRecord) -> String {
    crate::http::page_token(r.started_at, r.id.as_str())
}

fn decode_cursor(token: &str) -> Result<Cursor, ApiError> {
    let (started_at_micros, id) = crate::http::parse_page_token(token)?;
    let id = SandboxId::parse(&id).map_err(|_| crate::http::bad_page_token())?;
    Ok(Cursor {
        started_at_micros,
        id: id.to_string(),
    })
}

/// `GET /v2/sandboxes`: filters, order and cursor paging (CONTRACT 2.3).
pub(crate) async fn list_v2(
    State(api): State<Api>,
    Team(team): Team,
    q: QueryParams,
) -> Result<Response, ApiError> {
    let order = match q.get("order").unwrap_or("desc") {
        "desc" => Order::Desc,
        "asc" => Order::Asc,
        other => {
            return Err(ApiError::BadRequest(format!(
                "order must be asc or desc, got '{other}'"
            )));
        }
    };
    let limit = q.int("limit")?.unwrap_or(MAX_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}, got {limit}"
        )));
    }
    let filter = ListFilter {
        team_id: team,
        states: parse_states(&q)?,
        metadata: parse_metadata(&q)?,
        template: q
            .get("template")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_lowercase),
        started_after: q.get("startedAfter").map(parse_time).transpose()?,
        order,
        cursor: q
            .get("nextToken")
            .filter(|t| !t.is_empty())
            .map(decode_cursor)
            .transpose()?,
        limit: Some(u32::try_from(limit).unwrap_or(1)),
    };
    let (page, more) = api.db().list_sandboxes(&filter).await?;
    let body: Vec<ListedSandbox> = page.iter().map(|r| listed(&api, r)).collect();
    let next = page.last().filter(|_| more).map(encode_cursor);
    crate::http::with_next_page(Json(body).into_response(), next)
}

/// A list item, with its node's health in cluster mode.
fn listed(api: &Api, r: &SandboxRecord) -> ListedSandbox {
    let item = ListedSandbox::from(r);
    match api.nodes().status(&r.node_id) {
        Some(status) => item.with_node(&r.node_id, status),
        None => item,
    }
}

/// `GET /sandboxes` (deprecated): every running sandbox, metadata filter only.
pub(crate) async fn list_v1(
    State(api): State<Api>,
    Team(team): Team,
    q: QueryParams,
) -> Result<Json<Vec<ListedSandbox>>, ApiError> {
    let filter = ListFilter {
        team_id: team,
        states: vec![RecordState::Running],
        metadata: parse_metadata(&q)?,
        template: None,
        started_after: None,
        order: Order::Desc,
        cursor: None,
        limit: None,
    };
    let (all, _) = api.db().list_sandboxes(&filter).await?;
    Ok(Json(all.iter().map(|r| listed(&api, r)).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn timeouts_are_bounded_and_name_the_limit() {
        assert_eq!(check_timeout(1, 1, 86_400).unwrap(), 1);
        let msg = check_timeout(86_401, 1, 86_400).unwrap_err().to_string();
        assert!(msg.contains("86400") && msg.contains("24 hours"), "{msg}");
        assert!(check_timeout(0, 1, 86_400).is_err());
        assert!(check_timeout(0, 0, 86_400).is_ok());
        assert!(check_timeout(-5, 0, u64::MAX).is_err());
        assert!(deadline(now(), i64::MAX).is_err());
    }

    #[test]
    fn cursors_round_trip_and_junk_is_rejected() {
        let c = decode_cursor(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("123:iabc"))
            .unwrap();
        assert_eq!(c.started_at_micros, 123);
        assert_eq!(c.id, "iabc");
        assert!(decode_cursor("!!").is_err());
        assert!(decode_cursor("YWJj").is_err());
    }

    #[test]
    fn metadata_and_states_parse() {
        let q = QueryParams(vec![
            ("metadata".into(), "a%3Db=c%26d&e=f".into()),
            ("state".into(), "running,paused".into()),
        ]);
        assert_eq!(
            parse_metadata(&q).unwrap(),
            vec![("a=b".into(), "c&d".into()), ("e".into(), "f".into())]
        );
        assert_eq!(parse_states(&q).unwrap().len(), 2);
        let bad = QueryParams(vec![("state".into(), "dead".into())]);
        assert!(parse_states(&bad).is_err());
    }

    #[test]
    fn naive_and_offset_times_parse() {
        let a = parse_time("2026-01-01T01:00:00+01:00").unwrap();
        let b = parse_time("2026-01-01T00:00:00").unwrap();
        assert_eq!(a, b);
        assert!(parse_time("yesterday").is_err());
    }
}
