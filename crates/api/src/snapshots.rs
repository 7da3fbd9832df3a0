//! Snapshots and forks (CONTRACT 2.5).
//!
//! - `POST /sandboxes/{id}/fork` makes `count` new sandboxes from a copy of
//!   a running sandbox (one node call for all of them); each succeeds or
//!   fails on its own. The source keeps its id and deadline.
//! - `POST /sandboxes/{id}/snapshots` makes a template of the team from a
//!   copy of a sandbox's files (filesystem snapshots only: this server has
//!   no memory snapshots yet). Its id, `<templateID>:default` or
//!   `<name>:<tag>`, is a template reference: sandboxes start from it
//!   through create, and `DELETE /templates/{snapshotID}` removes it.
//! - `GET /snapshots` lists the team's snapshots, newest first, paged like
//!   sandbox lists.

use std::collections::BTreeMap;

use arca_proto::node::SandboxId;
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;

use crate::Api;
use crate::db::snapshots::{SnapshotFilter, SnapshotRow};
use crate::db::templates::{BuildReason, BuildRow, DEFAULT_TAG, NameTaken, NewBuild, StartCmds};
use crate::db::{RecordState, SandboxRecord};
use crate::error::{ApiError, chain};
use crate::http::{JsonBody, QueryParams, SandboxPath, Team};
use crate::ids;
use crate::models::{
    ErrorBody, ForkRequest, ForkResult, SandboxBody, SnapshotInfo, SnapshotRequest,
};
use crate::network::TRAFFIC_TOKEN_BYTES;
use crate::sandboxes::{
    ENVD_TOKEN_BYTES, check_timeout, deadline, find, in_task, mark_started, node_failure, now,
    spec_for, undo_create,
};
use crate::templates::refs::{self, TemplateRef};
use crate::templates::{check_namespace, new_template_id};

/// Lifetime of a fork when the request has none (CONTRACT 2.5).
const FORK_DEFAULT_TIMEOUT_SECS: i64 = 15;
/// Most forks one request may ask for (the SDKs allow 20).
const MAX_FORKS: i64 = 100;
/// Page size of `GET /snapshots`: default and maximum.
const MAX_PAGE: i64 = 100;

// ---- fork -------------------------------------------------------------------

/// `POST /sandboxes/{id}/fork` (201): one entry per fork, in order, each
/// `{"sandbox": Sandbox}` or `{"error": {"code", "message"}}`.
pub(crate) async fn fork(
    State(api): State<Api>,
    Team(team): Team,
    SandboxPath(id): SandboxPath,
    JsonBody(body): JsonBody<ForkRequest>,
) -> Result<Response, ApiError> {
    let timeout = check_timeout(
        body.timeout.unwrap_or(FORK_DEFAULT_TIMEOUT_SECS),
        1,
        api.config().max_timeout_secs,
    )?;
    let count = body.count.unwrap_or(1);
    if !(1..=MAX_FORKS).contains(&count) {
        return Err(ApiError::BadRequest(format!(
            "count must be between 1 and {MAX_FORKS}, got {count}"
        )));
    }
    let source = find(&api, &team, &id).await?;
    // In a task of its own, as create: dropping it half-way would leave
    // sandboxes on the node without running records.
    let results = in_task(fork_all(api.clone(), source, timeout, count)).await?;
    Ok((StatusCode::CREATED, Json(results)).into_response())
}

/// The build a sandbox started from, if the registry still has it (for
/// sandboxes started before the api recorded builds: its template's
/// `default` build).
async fn source_build(api: &Api, rec: &SandboxRecord) -> Result<Option<BuildRow>, ApiError> {
    if let Some(b) = &rec.build_id {
        return api.db().build(&rec.template_id, b).await;
    }
    api.db().tagged_build(&rec.template_id, DEFAULT_TAG).await
}

async fn fork_all(
    api: Api,
    source: SandboxRecord,
    timeout: i64,
    count: i64,
) -> Result<Vec<ForkResult>, ApiError> {
    // The node starts forks from the source's own build; the spec names it
    // as far as the api knows it.
    let build_id = match &source.build_id {
        Some(b) => b.clone(),
        None => source_build(&api, &source)
            .await?
            .map(|b| b.id)
            .unwrap_or_default(),
    };
    let now = now();
    let end_at = deadline(now, timeout)?;
    let mut recs: Vec<SandboxRecord> = Vec::new();
    for _ in 0..count {
        let rec = SandboxRecord {
            id: ids::new_sandbox_id(),
            team_id: source.team_id.clone(),
            template_id: source.template_id.clone(),
            alias: source.alias.clone(),
            state: RecordState::Creating,
            metadata: source.metadata.clone(),
            envd_access_token: ids::random_hex(ENVD_TOKEN_BYTES),
            envd_version: source.envd_version.clone(),
            started_at: now,
            end_at,
            cpu_count: source.cpu_count,
            memory_mb: source.memory_mb,
            disk_size_mb: source.disk_size_mb,
            allow_internet_access: source.allow_internet_access,
            auto_pause: source.auto_pause,
            auto_pause_memory: source.auto_pause_memory,
            auto_resume: source.auto_resume,
            build_id: source.build_id.clone(),
            // Egress and ingress settings as the source's; a private
            // sandbox's forks each get a token of their own.
            network: source.network.clone(),
            traffic_access_token: source
                .traffic_access_token
                .as_ref()
                .map(|_| ids::random_hex(TRAFFIC_TOKEN_BYTES)),
            // Forks start from the source's files, which only its node has.
            node_id: source.node_id.clone(),
        };
        if let Err(e) = api.db().insert_sandbox(&rec).await {
            for r in &recs {
                if let Err(e) = api.db().delete_sandbox(r.id.as_str()).await {
                    tracing::warn!(sandbox_id = %r.id, error = %chain(&e), "could not delete the record of a failed fork");
                }
            }
            return Err(e);
        }
        recs.push(rec);
    }
    // Env vars, template and build are the source's: the node takes them
    // from it.
    let specs = recs
        .iter()
        .map(|r| spec_for(r, &build_id, BTreeMap::new(), timeout))
        .collect();
    let node = api.node_of(&source)?;
    let results = match node.fork(&source.id, specs).await {
        Ok(r) => r,
        Err(e) => {
            for r in &recs {
                undo_create(&api, node.as_ref(), &r.id).await;
            }
            return Err(node_failure(&api, &source.id, e).await);
        }
    };
    let mut results = results.into_iter();
    let mut out = Vec::with_capacity(recs.len());
    for rec in recs {
        let id = rec.id.clone();
        let started = match results.next() {
            Some(Ok(status)) => mark_started(&api, rec, status).await,
            Some(Err(e)) => {
                undo_create(&api, node.as_ref(), &id).await;
                Err(ApiError::from_node(e))
            }
            None => {
                undo_create(&api, node.as_ref(), &id).await;
                Err(ApiError::Internal(format!(
                    "the node answered no result for fork {id}"
                )))
            }
        };
        out.push(match started {
            Ok(rec) => {
                tracing::info!(sandbox_id = %rec.id, source = %source.id, "sandbox forked");
                ForkResult {
                    sandbox: Some(SandboxBody::new(&rec, api.config().domain.as_deref())),
                    error: None,
                }
            }
            Err(e) => {
                tracing::info!(sandbox_id = %id, source = %source.id, error = %e, "fork failed");
                ForkResult {
                    sandbox: None,
                    error: Some(ErrorBody {
                        code: e.status().as_u16(),
                        message: e.public_message(),
                    }),
                }
            }
        });
    }
    Ok(out)
}

// ---- snapshots --------------------------------------------------------------

/// A snapshot as the SDKs see it: its id is a template reference.
fn snapshot_info(s: &SnapshotRow) -> SnapshotInfo {
    let name = s.names.first().unwrap_or(&s.template_id);
    SnapshotInfo {
        snapshot_id: format!("{name}:{}", s.tag),
        names: s.names.clone(),
    }
}

/// `POST /sandboxes/{id}/snapshots` (201 `SnapshotInfo`): a filesystem
/// snapshot of the sandbox, which goes on running.
pub(crate) async fn create_snapshot(
    State(api): State<Api>,
    Team(team): Team,
    SandboxPath(id): SandboxPath,
    JsonBody(body): JsonBody<SnapshotRequest>,
) -> Result<Response, ApiError> {
    if body.memory == Some(true) {
        return Err(ApiError::BadRequest(
            "memory snapshots are not supported by this Arca server yet (it makes filesystem \
             snapshots: files kept, processes not); omit memory or pass false"
                .into(),
        ));
    }
    let name = body
        .name
        .as_deref()
        .filter(|n| !n.trim().is_empty())
        .map(|n| TemplateRef::parse(n, "name"))
        .transpose()?;
    let tag = match name.as_ref().and_then(|r| r.tag.as_deref()) {
        Some(t) => refs::new_tags([t])?.remove(0),
        None => DEFAULT_TAG.to_string(),
    };
    if let Some(r) = &name {
        check_namespace(&api, &team, r).await?;
    }
    let source = find(&api, &team, &id).await?;
    let info = in_task(snapshot(api.clone(), team, source, name, tag)).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn snapshot(
    api: Api,
    team: String,
    source: SandboxRecord,
    name: Option<TemplateRef>,
    tag: String,
) -> Result<SnapshotInfo, ApiError> {
    let from = source_build(&api, &source).await?;
    let envd_version = from
        .as_ref()
        .map(|b| b.envd_version.clone())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| source.envd_version.clone());
    let mut build = NewBuild {
        id: ids::new_uuid(),
        template_id: String::new(),
        tags: vec![tag.clone()],
        cpu_count: source.cpu_count,
        memory_mb: source.memory_mb,
        disk_size_mb: source.disk_size_mb,
        // Marks the build started as it is registered.
        start: Some(StartCmds {
            start_cmd: from.as_ref().and_then(|b| b.start_cmd.clone()),
            ready_cmd: from.as_ref().and_then(|b| b.ready_cmd.clone()),
        }),
    };
    let new_template = register(&api, &team, name.as_ref(), &mut build, &source.id, &tag).await?;
    let gone = || {
        ApiError::NotFound(format!(
            "snapshot template '{}' was deleted while the snapshot was made",
            build.template_id
        ))
    };
    if !api.db().set_building(&build.id, now()).await? {
        return Err(gone());
    }
    // The node copies the files before anything can start from the build.
    let node = match api.node_of(&source) {
        Ok(n) => n,
        Err(e) => {
            undo(&api, &build, new_template, &e.to_string()).await;
            return Err(e);
        }
    };
    if let Err(e) = node
        .snapshot(&source.id, &build.template_id, &build.id)
        .await
    {
        undo(&api, &build, new_template, &e.to_string()).await;
        return Err(node_failure(&api, &source.id, e).await);
    }
    // From here a failure also takes the node's copy away again.
    let recorded = async {
        // Placement finds the build on the source's node, from the moment
        // it is ready.
        api.db()
            .add_node_build(&source.node_id, &build.template_id, &build.id)
            .await?;
        if !api
            .db()
            .finish_ready(&build.id, &envd_version, now())
            .await?
        {
            return Ok(false);
        }
        api.db()
            .snapshot_made(&build.template_id, source.id.as_str(), &tag, now())
            .await?;
        Ok::<bool, ApiError>(true)
    }
    .await;
    match recorded {
        Ok(true) => {}
        Ok(false) => {
            forget_build(&api, &build).await;
            return Err(gone());
        }
        Err(e) => {
            undo(&api, &build, new_template, &e.to_string()).await;
            return Err(e);
        }
    }
    let snap = api
        .db()
        .snapshot(&build.template_id)
        .await?
        .ok_or_else(gone)?;
    tracing::info!(sandbox_id = %source.id, template_id = %build.template_id, build_id = %build.id, "snapshot made");
    Ok(snapshot_info(&snap))
}

/// Registers the snapshot's template and build (`build.template_id` is set
/// here): a new template, or a new build of the team's snapshot that has
/// the name. Returns whether the template is new. A name used by another
/// team, by a built-in template or by a template of the team that is not a
/// snapshot is a 409, as template names are.
async fn register(
    api: &Api,
    team: &str,
    name: Option<&TemplateRef>,
    build: &mut NewBuild,
    source: &SandboxId,
    tag: &str,
) -> Result<bool, ApiError> {
    let db = api.db();
    let Some(r) = name else {
        build.template_id = new_template_id();
        return match db
            .insert_snapshot_template(team, None, build, source.as_str(), tag, now())
            .await?
        {
            Ok(()) => Ok(true),
            Err(NameTaken) => Err(ApiError::Internal(
                "a snapshot without name hit a name conflict".into(),
            )),
        };
    };
    let conflict = |message: String| ApiError::Conflict {
        message,
        error_code: None,
    };
    // Twice at most: another request may claim the name between our look
    // and our insert.
    for _ in 0..2 {
        let existing = match db.template_by_id(&r.name).await? {
            Some(t) => Some(t),
            None => db.template_by_name(&r.name).await?,
        };
        match existing {
            // One snapshot per name: its id then names exactly one copy,
            // which delete and list can act on.
            Some(t) if refs::owns(&t, team) => {
                return Err(conflict(if db.snapshot(&t.id).await?.is_some() {
                    format!(
                        "a snapshot named '{}' exists; delete it (DELETE /templates/{}) or choose another name",
                        r.name, r.name
                    )
                } else {
                    format!(
                        "template name '{}' is used by a template that is not a snapshot; \
                         choose another name",
                        r.name
                    )
                }));
            }
            Some(t) => {
                let whose = if t.team_id.is_none() {
                    "is built into Arca"
                } else {
                    "belongs to another team"
                };
                return Err(conflict(format!(
                    "template name '{}' {whose}; choose another name",
                    r.name
                )));
            }
            None => {
                build.template_id = new_template_id();
                let made = db
                    .insert_snapshot_template(
                        team,
                        Some(&r.name),
                        build,
                        source.as_str(),
                        tag,
                        now(),
                    )
                    .await?;
                // Err(NameTaken): claimed meanwhile; look again.
                if made.is_ok() {
                    return Ok(true);
                }
            }
        }
    }
    Err(conflict(format!(
        "template name '{}' is being claimed by another request; try again",
        r.name
    )))
}

/// Undoes a snapshot the node could not make: a new template goes with its
/// rows; a new build of an existing one ends as `error`.
async fn undo(api: &Api, build: &NewBuild, new_template: bool, why: &str) {
    let res = if new_template {
        api.db()
            .delete_template(&build.template_id)
            .await
            .map(|_| ())
    } else {
        let reason = BuildReason {
            message: format!("the snapshot failed: {why}"),
            step: None,
        };
        api.db()
            .finish_error(&build.id, &reason, now())
            .await
            .map(|_| ())
    };
    if let Err(e) = res {
        tracing::warn!(template_id = %build.template_id, build_id = %build.id, error = %chain(&e), "could not undo the records of a failed snapshot");
    }
    forget_build(api, build).await;
}

/// Best-effort removal of a snapshot build from the nodes.
async fn forget_build(api: &Api, build: &NewBuild) {
    for (node_id, builder) in api.nodes().all_builders() {
        if let Err(e) = builder.delete_build(&build.template_id, &build.id).await {
            tracing::warn!(%node_id, template_id = %build.template_id, build_id = %build.id, error = %chain(&e), "could not delete a snapshot build on a node");
        }
    }
}

// ---- listing ----------------------------------------------------------------

fn encode_cursor(s: &SnapshotRow) -> String {
    crate::http::page_token(s.created_at, &s.template_id)
}

fn decode_cursor(token: &str) -> Result<(i64, String), ApiError> {
    crate::http::parse_page_token(token)
}

/// The template a `name` filter means, with the tag it names; `None`
/// when nothing of the team can match.
async fn name_filter(
    api: &Api,
    team: &str,
    raw: &str,
) -> Result<Option<(String, Option<String>)>, ApiError> {
    let Ok(r) = TemplateRef::parse(raw, "name") else {
        return Ok(None);
    };
    if let Some(ns) = &r.namespace {
        let own = api.db().team_name(team).await?.unwrap_or_default();
        if own.to_lowercase() != *ns {
            return Ok(None);
        }
    }
    let found = match api.db().template_by_id(&r.name).await? {
        Some(t) => Some(t),
        None => api.db().template_by_name(&r.name).await?,
    };
    Ok(found.filter(|t| refs::owns(t, team)).map(|t| (t.id, r.tag)))
}

/// `GET /snapshots?sandboxID=&name=&limit=&nextToken=`: the team's
/// snapshots, newest first; `X-Next-Token` when more follow.
pub(crate) async fn list_snapshots(
    State(api): State<Api>,
    Team(team): Team,
    q: QueryParams,
) -> Result<Response, ApiError> {
    let limit = q.int("limit")?.unwrap_or(MAX_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}, got {limit}"
        )));
    }
    let mut filter = SnapshotFilter {
        team_id: team.clone(),
        sandbox_id: None,
        template_id: None,
        tag: None,
        cursor: q
            .get("nextToken")
            .filter(|t| !t.is_empty())
            .map(decode_cursor)
            .transpose()?,
        limit: u32::try_from(limit).unwrap_or(1),
    };
    let none = || Json(Vec::<SnapshotInfo>::new()).into_response();
    if let Some(raw) = q.get("sandboxID").map(str::trim).filter(|s| !s.is_empty()) {
        match ids::parse_path_id(raw) {
            Ok(id) => filter.sandbox_id = Some(id.to_string()),
            Err(_) => return Ok(none()),
        }
    }
    if let Some(raw) = q.get("name").map(str::trim).filter(|s| !s.is_empty()) {
        match name_filter(&api, &team, raw).await? {
            Some((template_id, tag)) => {
                filter.template_id = Some(template_id);
                filter.tag = tag;
            }
            None => return Ok(none()),
        }
    }
    let (page, more) = api.db().list_snapshots(&filter).await?;
    let body: Vec<SnapshotInfo> = page.iter().map(snapshot_info).collect();
    let next = page.last().filter(|_| more).map(encode_cursor);
    crate::http::with_next_page(Json(body).into_response(), next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn snapshot_ids_are_template_references() {
        let mut s = SnapshotRow {
            template_id: "abc".into(),
            team_id: "t".into(),
            sandbox_id: "iabc".into(),
            tag: "default".into(),
            created_at: chrono::DateTime::from_timestamp(0, 0).unwrap(),
            names: vec![],
        };
        assert_eq!(snapshot_info(&s).snapshot_id, "abc:default");
        s.names = vec!["snap".into()];
        s.tag = "v1".into();
        let info = snapshot_info(&s);
        assert_eq!(info.snapshot_id, "snap:v1");
        assert_eq!(info.names, ["snap"]);
        let r = TemplateRef::parse(&info.snapshot_id, "templateID").unwrap();
        assert_eq!((r.name.as_str(), r.tag()), ("snap", "v1"));
    }

    #[test]
    fn cursors_round_trip() {
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("12:abc");
        assert_eq!(decode_cursor(&token).unwrap(), (12, "abc".into()));
        assert!(decode_cursor("!").is_err());
    }
}
