//! The template registry (CONTRACT 2.4): templates, their names, builds,
//! tags and build logs, and the endpoints the SDKs' `Template` builder, the
//! E2B CLI and the legacy v1 build flow call.
//!
//! A build's life: `POST /v3/templates` registers it (`waiting`, not
//! started); COPY archives are uploaded ([`uploads`]); `POST
//! /v2/templates/{id}/builds/{buildID}` starts it on the
//! [`BuildService`](arca_proto::build::BuildService) in a task of its own
//! (still `waiting` while all build slots are busy, then `building`); its log
//! lines are stored as they arrive and it ends `ready` (its tags now point
//! at it) or `error` with a `reason` (nothing changes for sandboxes: tags
//! keep pointing at earlier builds). Builds left `waiting` or `building` by
//! a previous api process end as `error` at start.
//!
//! Tags: a v3 request names the tags its build gets (`name:tag` and
//! `tags`); with none it gets `default`, the tag a sandbox starts from when
//! the reference names none. As the reference server does, building
//! `name:v2` leaves `name` (= `name:default`) alone, except for a
//! template's first ready build, which also becomes `default`.
//!
//! Arca extension: the v2 build start body may carry `dockerfile` (the
//! Dockerfile's text), `contextHash` (the hash under which an archive of
//! the build context was uploaded through `GET /templates/{id}/files/{hash}`
//! and its upload link) and `buildArgs` (`--build-arg` values) instead of
//! `fromImage`/`fromTemplate`/`steps`; `arca template build` uses it. The
//! legacy v1 `POST /templates` starts a Dockerfile build at once (no
//! context) instead of waiting for a `docker push` to a registry Arca does
//! not run.

mod builds;
pub(crate) mod models;
pub(crate) mod refs;
mod uploads;

use arca_proto::build::{BASE_TEMPLATE_ID, BuildSource, BuildSpec};
use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SubsecRound as _, Utc};
use http::StatusCode;

pub(crate) use builds::{build_logs, build_status, interrupt_unfinished, start_v2, trigger_v1};
pub(crate) use uploads::{file_upload_link, upload};

use crate::Api;
use crate::db::templates::{BuildRow, DEFAULT_TAG, NameTaken, NewBuild, StartCmds, TemplateRow};
use crate::error::{ApiError, chain};
use crate::http::{JsonBody, QueryParams, Team};
use crate::ids;
use crate::templates::models::{
    AliasResponse, AssignTags, AssignedTags, Build, BuildRequestV1, BuildRequestV3, DeleteTags,
    LegacyTemplate, RequestResponseV3, Resources, Tag, Template, UpdateResponse, UpdateTemplate,
};
use crate::templates::refs::TemplateRef;

/// Smallest memory a template may ask for, MiB (the reference's floor).
const MIN_MEMORY_MB: i64 = 128;
/// Page size of a template's builds: default and maximum.
const MAX_BUILDS_PAGE: i64 = 100;
/// Characters of a generated template id (`[a-z0-9]`, as the reference).
const TEMPLATE_ID_LEN: usize = 20;

/// The current time at the precision the database keeps.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A template path parameter, percent-decoded by the router.
fn path_ref(raw: &str) -> Result<TemplateRef, ApiError> {
    TemplateRef::parse(raw, "templateID")
}

/// A team's template by a path parameter, for changes: 404, or 403 when it
/// is someone else's or built in.
async fn own_template(api: &Api, team: &str, raw: &str) -> Result<TemplateRow, ApiError> {
    let r = path_ref(raw)?;
    let t = refs::find(api, team, &r).await?;
    refs::require_owner(&t, team, &r.raw)?;
    Ok(t)
}

/// A template whose builds `team` may read: its own or a built-in one.
async fn readable_template(api: &Api, team: &str, raw: &str) -> Result<TemplateRow, ApiError> {
    let r = path_ref(raw)?;
    let t = refs::find(api, team, &r).await?;
    if t.team_id.is_some() {
        refs::require_owner(&t, team, &r.raw)?;
    }
    Ok(t)
}

/// `teamID` of a request, which may only name the key's own team.
fn check_team(given: Option<&str>, team: &str) -> Result<(), ApiError> {
    match given.map(str::trim).filter(|t| !t.is_empty()) {
        Some(t) if t != team => Err(ApiError::Forbidden(format!(
            "teamID '{t}' is not the team of this API key; omit teamID"
        ))),
        _ => Ok(()),
    }
}

/// A build's resources with the api's defaults for unset values.
pub(crate) fn resources(api: &Api, b: &BuildRow) -> Resources {
    let cfg = api.config();
    let or = |v: u32, d: u32| if v == 0 { d } else { v };
    Resources {
        cpu_count: or(b.cpu_count, cfg.default_cpu),
        memory_mb: or(b.memory_mb, cfg.default_memory_mb),
        disk_size_mb: or(b.disk_size_mb, cfg.default_disk_mb),
    }
}

/// The resources a build request asks for, checked against the limits.
fn requested_resources(
    api: &Api,
    cpu: Option<i64>,
    memory: Option<i64>,
    min_free_disk: Option<i64>,
) -> Result<Resources, ApiError> {
    let cfg = api.config();
    let cpu_count = match cpu {
        None => cfg.default_cpu,
        Some(c) => u32::try_from(c)
            .ok()
            .filter(|c| (1..=cfg.max_cpu_count).contains(c))
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "cpuCount must be between 1 and {}, got {c}",
                    cfg.max_cpu_count
                ))
            })?,
    };
    let memory_mb = match memory {
        None => cfg.default_memory_mb,
        Some(m) => {
            let max = i64::from(cfg.max_memory_mb);
            if !(MIN_MEMORY_MB..=max).contains(&m) || m % 2 != 0 {
                return Err(ApiError::BadRequest(format!(
                    "memoryMB must be an even number between {MIN_MEMORY_MB} and {max}, got {m}"
                )));
            }
            u32::try_from(m).unwrap_or(cfg.default_memory_mb)
        }
    };
    let disk_size_mb = match min_free_disk {
        None => cfg.default_disk_mb,
        Some(d) => {
            let max = i64::from(cfg.max_disk_mb);
            if !(0..=max).contains(&d) {
                return Err(ApiError::BadRequest(format!(
                    "minFreeDiskMb must be between 0 and {max}, got {d}"
                )));
            }
            cfg.default_disk_mb.max(u32::try_from(d).unwrap_or(0))
        }
    };
    Ok(Resources {
        cpu_count,
        memory_mb,
        disk_size_mb,
    })
}

/// A fresh template id: 20 characters of `[a-z0-9]`.
pub(crate) fn new_template_id() -> String {
    ids::random_alnum(TEMPLATE_ID_LEN)
}

/// Registers a build of the team's template called `name` (its id works
/// too), making the template on first use. `Err(409)` when the name
/// belongs to another team or to a built-in template.
async fn register(
    api: &Api,
    team: &str,
    name: Option<&str>,
    tags: Vec<String>,
    res: Resources,
    start: Option<StartCmds>,
) -> Result<(TemplateRow, BuildRow), ApiError> {
    let db = api.db();
    let mut build = NewBuild {
        id: ids::new_uuid(),
        template_id: String::new(),
        tags,
        cpu_count: res.cpu_count,
        memory_mb: res.memory_mb,
        disk_size_mb: res.disk_size_mb,
        start,
    };
    // Twice at most: another request may claim the name between our look
    // and our insert.
    for _ in 0..2 {
        let existing = match name {
            None => None,
            Some(n) => match db.template_by_id(n).await? {
                Some(t) => Some(t),
                None => db.template_by_name(n).await?,
            },
        };
        let now = now();
        match existing {
            Some(t) if refs::owns(&t, team) => {
                build.template_id = t.id.clone();
                db.insert_build(&build, now).await?;
                return fetch_registered(api, &build).await;
            }
            Some(t) => {
                let whose = if t.team_id.is_none() {
                    "is built into Arca"
                } else {
                    "belongs to another team"
                };
                return Err(ApiError::Conflict {
                    message: format!(
                        "template name '{}' {whose}; choose another name",
                        name.unwrap_or_default()
                    ),
                    error_code: None,
                });
            }
            None => {
                build.template_id = new_template_id();
                match db
                    .insert_template(&build.template_id, team, name, &build, now)
                    .await?
                {
                    Ok(()) => {
                        tracing::info!(template_id = %build.template_id, name = ?name, "template created");
                        return fetch_registered(api, &build).await;
                    }
                    Err(NameTaken) => continue,
                }
            }
        }
    }
    Err(ApiError::Conflict {
        message: format!(
            "template name '{}' is being claimed by another request; try again",
            name.unwrap_or_default()
        ),
        error_code: None,
    })
}

async fn fetch_registered(api: &Api, b: &NewBuild) -> Result<(TemplateRow, BuildRow), ApiError> {
    let t = api.db().template_by_id(&b.template_id).await?;
    let build = api.db().build(&b.template_id, &b.id).await?;
    match (t, build) {
        (Some(t), Some(build)) => {
            tracing::info!(template_id = %t.id, build_id = %build.id, "template build registered");
            Ok((t, build))
        }
        _ => Err(ApiError::NotFound(format!(
            "template '{}' was deleted while the build was registered",
            b.template_id
        ))),
    }
}

/// The build a template is shown with: the one `default` points at, else
/// its newest.
async fn current_build(api: &Api, t: &TemplateRow) -> Result<BuildRow, ApiError> {
    if let Some(b) = api.db().tagged_build(&t.id, DEFAULT_TAG).await? {
        return Ok(b);
    }
    let (mut page, _) = api.db().builds_page(&t.id, None, 1).await?;
    page.pop()
        .ok_or_else(|| ApiError::Internal(format!("template {} has no build", t.id)))
}

async fn template_body(api: &Api, t: &TemplateRow) -> Result<Template, ApiError> {
    let b = current_build(api, t).await?;
    Ok(Template::new(t, &b, resources(api, &b)))
}

// ---- build requests -----------------------------------------------------------

/// `POST /v3/templates`: registers a build (`waiting`), making the template
/// on the first use of its name.
pub(crate) async fn request_v3(
    State(api): State<Api>,
    Team(team): Team,
    JsonBody(body): JsonBody<BuildRequestV3>,
) -> Result<Response, ApiError> {
    check_team(body.team_id.as_deref(), &team)?;
    let Some(raw) = body
        .name
        .as_deref()
        .or(body.alias.as_deref())
        .filter(|n| !n.trim().is_empty())
    else {
        return Err(ApiError::BadRequest(
            "name is required: the template's name, optionally with :tag".into(),
        ));
    };
    let r = TemplateRef::parse(raw, "name")?;
    check_namespace(&api, &team, &r).await?;
    let mut tags = refs::new_tags(
        r.tag
            .as_deref()
            .into_iter()
            .chain(body.tags.iter().flatten().map(String::as_str)),
    )?;
    if tags.is_empty() {
        tags.push(DEFAULT_TAG.to_string());
    }
    let res = requested_resources(&api, body.cpu_count, body.memory_mb, body.min_free_disk_mb)?;
    let (t, b) = register(&api, &team, Some(&r.name), tags, res, None).await?;
    let body = RequestResponseV3 {
        template_id: t.id.clone(),
        build_id: b.id.clone(),
        public: t.public,
        names: t.names.clone(),
        tags: b.tags.clone(),
        aliases: t.names,
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// 400 unless a reference's namespace, if any, is the team's own name.
pub(crate) async fn check_namespace(
    api: &Api,
    team: &str,
    r: &TemplateRef,
) -> Result<(), ApiError> {
    let Some(ns) = &r.namespace else {
        return Ok(());
    };
    let own = api.db().team_name(team).await?.unwrap_or_default();
    if own.to_lowercase() == *ns {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "namespace '{ns}' must be your team's name '{own}'"
        )))
    }
}

/// Starts a legacy v1 build from a Dockerfile at once.
fn start_dockerfile_build(api: &Api, team: &str, b: &BuildRow, dockerfile: String) {
    let res = resources(api, b);
    let spec = BuildSpec {
        template_id: b.template_id.clone(),
        build_id: b.id.clone(),
        team_id: team.to_string(),
        source: BuildSource::Dockerfile {
            dockerfile,
            context_hash: None,
            build_args: Default::default(),
        },
        force: false,
        start_cmd: b.start_cmd.clone(),
        ready_cmd: b.ready_cmd.clone(),
        cpu_count: res.cpu_count,
        memory_mb: res.memory_mb,
        disk_size_mb: res.disk_size_mb,
    };
    builds::spawn_build(api.clone(), spec);
}

fn v1_parts(api: &Api, body: &BuildRequestV1) -> Result<(Resources, StartCmds), ApiError> {
    if body.dockerfile.trim().is_empty() {
        return Err(ApiError::BadRequest("dockerfile must not be empty".into()));
    }
    let res = requested_resources(api, body.cpu_count, body.memory_mb, None)?;
    let cmds = StartCmds {
        start_cmd: body.start_cmd.clone().filter(|c| !c.trim().is_empty()),
        ready_cmd: body.ready_cmd.clone().filter(|c| !c.trim().is_empty()),
    };
    Ok((res, cmds))
}

/// A v1 `alias`: a plain name (no namespace, no tag).
fn v1_alias(raw: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(raw) = raw.filter(|a| !a.trim().is_empty()) else {
        return Ok(None);
    };
    let r = TemplateRef::parse(raw, "alias")?;
    if r.namespace.is_some() || r.tag.is_some() || raw.contains(':') {
        return Err(ApiError::BadRequest(format!(
            "invalid alias '{raw}': an alias is a plain name, without namespace or tag"
        )));
    }
    Ok(Some(r.name))
}

/// `POST /templates` (legacy v1): registers and starts a Dockerfile build.
pub(crate) async fn request_v1(
    State(api): State<Api>,
    Team(team): Team,
    JsonBody(body): JsonBody<BuildRequestV1>,
) -> Result<Response, ApiError> {
    check_team(body.team_id.as_deref(), &team)?;
    let (res, cmds) = v1_parts(&api, &body)?;
    let alias = v1_alias(body.alias.as_deref())?;
    let tags = vec![DEFAULT_TAG.to_string()];
    let (t, b) = register(&api, &team, alias.as_deref(), tags, res, Some(cmds)).await?;
    start_dockerfile_build(&api, &team, &b, body.dockerfile);
    let out = LegacyTemplate::new(&t, &b, resources(&api, &b));
    Ok((StatusCode::ACCEPTED, Json(out)).into_response())
}

/// `POST /templates/{templateID}` (legacy v1 rebuild).
pub(crate) async fn rebuild_v1(
    State(api): State<Api>,
    Team(team): Team,
    Path(template): Path<String>,
    JsonBody(body): JsonBody<BuildRequestV1>,
) -> Result<Response, ApiError> {
    check_team(body.team_id.as_deref(), &team)?;
    let t = own_template(&api, &team, &template).await?;
    let (res, cmds) = v1_parts(&api, &body)?;
    if let Some(alias) = v1_alias(body.alias.as_deref())? {
        if !t.names.contains(&alias) {
            if !t.names.is_empty() {
                return Err(ApiError::BadRequest(format!(
                    "template '{}' is already called '{}'; renaming is not supported",
                    t.id,
                    t.names.join("', '")
                )));
            }
            if api.db().add_name(&t.id, &alias, now()).await?.is_err() {
                return Err(ApiError::Conflict {
                    message: format!("template name '{alias}' is taken; choose another name"),
                    error_code: None,
                });
            }
        }
    }
    let tags = vec![DEFAULT_TAG.to_string()];
    let (t, b) = register(&api, &team, Some(&t.id), tags, res, Some(cmds)).await?;
    start_dockerfile_build(&api, &team, &b, body.dockerfile);
    let out = LegacyTemplate::new(&t, &b, resources(&api, &b));
    Ok((StatusCode::ACCEPTED, Json(out)).into_response())
}

// ---- lookups ------------------------------------------------------------------

/// `GET /templates/aliases/{alias}` (`Template.exists`): 200 for a visible
/// template (and tag, if one is named), 403 for another team's private
/// one, 404 otherwise.
pub(crate) async fn get_alias(
    State(api): State<Api>,
    Team(team): Team,
    Path(alias): Path<String>,
) -> Result<Json<AliasResponse>, ApiError> {
    let r = TemplateRef::parse(&alias, "alias")?;
    let t = refs::find(&api, &team, &r).await?;
    if r.tag.is_some() && api.db().tagged_build(&t.id, r.tag()).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "template '{}' has no tag '{}'",
            r.name,
            r.tag()
        )));
    }
    Ok(Json(AliasResponse {
        template_id: t.id.clone(),
        public: t.public || t.team_id.is_none(),
    }))
}

/// `GET /templates?teamID=`: the team's templates and the built-in ones.
pub(crate) async fn list(
    State(api): State<Api>,
    Team(team): Team,
    q: QueryParams,
) -> Result<Json<Vec<Template>>, ApiError> {
    check_team(q.get("teamID"), &team)?;
    let mut out = Vec::new();
    for t in api.db().list_templates(&team).await? {
        out.push(template_body(&api, &t).await?);
    }
    Ok(Json(out))
}

/// `GET /templates/{templateID}?limit=&nextToken=`: a template with its
/// builds, newest first, paged like sandbox lists (`X-Next-Token`).
pub(crate) async fn get(
    State(api): State<Api>,
    Team(team): Team,
    Path(template): Path<String>,
    q: QueryParams,
) -> Result<Response, ApiError> {
    let t = readable_template(&api, &team, &template).await?;
    let limit = q.int("limit")?.unwrap_or(MAX_BUILDS_PAGE);
    if !(1..=MAX_BUILDS_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_BUILDS_PAGE}, got {limit}"
        )));
    }
    let cursor = q
        .get("nextToken")
        .filter(|t| !t.is_empty())
        .map(decode_build_cursor)
        .transpose()?;
    let (page, more) = api
        .db()
        .builds_page(&t.id, cursor, u32::try_from(limit).unwrap_or(1))
        .await?;
    let builds = page
        .iter()
        .map(|b| Build::new(b, resources(&api, b)))
        .collect();
    let body = template_body(&api, &t).await?.with_builds(builds);
    let next = page.last().filter(|_| more).map(encode_build_cursor);
    crate::http::with_next_page(Json(body).into_response(), next)
}

fn encode_build_cursor(b: &BuildRow) -> String {
    crate::http::page_token(b.created_at, &b.id)
}

fn decode_build_cursor(token: &str) -> Result<(i64, String), ApiError> {
    crate::http::parse_page_token(token)
}

// ---- changes ------------------------------------------------------------------

/// `PATCH /templates/{templateID}` and `PATCH /v2/templates/{templateID}`:
/// sets `public`; answers the template's names.
pub(crate) async fn update(
    State(api): State<Api>,
    Team(team): Team,
    Path(template): Path<String>,
    JsonBody(body): JsonBody<UpdateTemplate>,
) -> Result<Json<UpdateResponse>, ApiError> {
    let t = own_template(&api, &team, &template).await?;
    if let Some(public) = body.public {
        if !api.db().set_public(&t.id, public, now()).await? {
            return Err(ApiError::NotFound(format!(
                "template '{template}' not found"
            )));
        }
        tracing::info!(template_id = %t.id, public, "template visibility changed");
    }
    Ok(Json(UpdateResponse { names: t.names }))
}

/// `DELETE /templates/{templateID}`: the template, its names, tags, builds
/// and logs (and its snapshot record, for a snapshot, whose id `name:tag`
/// is accepted here); each build is also deleted on the builder.
/// Sandboxes started from it keep running.
pub(crate) async fn delete(
    State(api): State<Api>,
    Team(team): Team,
    Path(template): Path<String>,
) -> Result<StatusCode, ApiError> {
    let r = path_ref(&template)?;
    let t = refs::find(&api, &team, &r).await?;
    if let Some(tag) = &r.tag {
        // A snapshot id names a tag (`name:tag`, CONTRACT 2.5): it deletes
        // the snapshot. Other templates are deleted by name or id only.
        if api.db().snapshot(&t.id).await?.is_none() {
            return Err(ApiError::BadRequest(format!(
                "'{}' names a tag: delete the template by its name or id, or remove the tag with DELETE /templates/tags",
                r.raw
            )));
        }
        refs::require_owner(&t, &team, &r.raw)?;
        if api.db().tagged_build(&t.id, tag).await?.is_none() {
            return Err(ApiError::NotFound(format!(
                "snapshot '{}' not found",
                r.raw
            )));
        }
    }
    if t.team_id.is_none() || t.id == BASE_TEMPLATE_ID {
        return Err(ApiError::BadRequest(format!(
            "'{}' is built into Arca and cannot be deleted",
            r.raw
        )));
    }
    refs::require_owner(&t, &team, &r.raw)?;
    let Some(builds) = api.db().delete_template(&t.id).await? else {
        return Err(ApiError::NotFound(format!(
            "template '{}' not found",
            r.raw
        )));
    };
    let builders = api.nodes().all_builders();
    for b in &builds {
        for (node_id, builder) in &builders {
            if let Err(e) = builder.delete_build(&t.id, b).await {
                // The registry no longer knows it; the node's leftovers
                // only cost disk.
                tracing::warn!(%node_id, template_id = %t.id, build_id = %b, error = %chain(&e), "could not delete a build on a node");
            }
        }
    }
    tracing::info!(template_id = %t.id, builds = builds.len(), "template deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ---- tags ---------------------------------------------------------------------

/// `POST /templates/tags`: points tags at the build `target`
/// (`name[:tag]`) points at.
pub(crate) async fn assign_tags(
    State(api): State<Api>,
    Team(team): Team,
    JsonBody(body): JsonBody<AssignTags>,
) -> Result<Response, ApiError> {
    let tags = refs::new_tags(body.tags.iter().map(String::as_str))?;
    if tags.is_empty() {
        return Err(ApiError::BadRequest("at least one tag is required".into()));
    }
    let r = TemplateRef::parse(&body.target, "target")?;
    let found = refs::resolve_build(&api, &team, &r).await?;
    refs::require_owner(&found.template, &team, &r.raw)?;
    api.db()
        .assign_tags(&found.template.id, &found.build.id, &tags, now())
        .await?;
    tracing::info!(template_id = %found.template.id, build_id = %found.build.id, ?tags, "tags assigned");
    let out = AssignedTags {
        tags,
        build_id: found.build.id,
    };
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// `DELETE /templates/tags`: removes tags from a template (not `default`).
pub(crate) async fn delete_tags(
    State(api): State<Api>,
    Team(team): Team,
    JsonBody(body): JsonBody<DeleteTags>,
) -> Result<StatusCode, ApiError> {
    let tags = body
        .tags
        .iter()
        .map(|t| refs::parse_tag(t))
        .collect::<Result<Vec<_>, _>>()?;
    if tags.is_empty() {
        return Err(ApiError::BadRequest("at least one tag is required".into()));
    }
    if tags.iter().any(|t| t == DEFAULT_TAG) {
        return Err(ApiError::BadRequest(format!(
            "the '{DEFAULT_TAG}' tag cannot be removed; delete the template instead"
        )));
    }
    let r = TemplateRef::parse(&body.name, "name")?;
    if r.tag.is_some() || body.name.contains(':') {
        return Err(ApiError::BadRequest(
            "name must not contain a tag; list the tags in 'tags'".into(),
        ));
    }
    let t = refs::find(&api, &team, &r).await?;
    refs::require_owner(&t, &team, &r.raw)?;
    api.db().delete_tags(&t.id, &tags).await?;
    tracing::info!(template_id = %t.id, ?tags, "tags removed");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /templates/{templateID}/tags`.
pub(crate) async fn list_tags(
    State(api): State<Api>,
    Team(team): Team,
    Path(template): Path<String>,
) -> Result<Json<Vec<Tag>>, ApiError> {
    let r = path_ref(&template)?;
    let t = refs::find(&api, &team, &r).await?;
    let tags = api.db().tags(&t.id).await?;
    Ok(Json(tags.into_iter().map(Tag::from).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_cursors_round_trip() {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("12:abc");
        assert_eq!(decode_build_cursor(&token).unwrap(), (12, "abc".into()));
        assert!(decode_build_cursor("!").is_err());
        assert!(check_team(Some("x"), "y").is_err());
        assert!(check_team(Some(" "), "y").is_ok());
        assert!(check_team(Some("y"), "y").is_ok());
    }

    #[test]
    fn v1_aliases_are_plain_names() {
        assert_eq!(v1_alias(Some("My-App")).unwrap().as_deref(), Some("my-app"));
        assert_eq!(v1_alias(Some(" ")).unwrap(), None);
        assert!(v1_alias(Some("a:default")).is_err());
        assert!(v1_alias(Some("t/a")).is_err());
    }
}
