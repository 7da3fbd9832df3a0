//! Starting builds, running them on the builder, and their status and logs.

use std::sync::Arc;

use arca_proto::build::{
    BASE_TEMPLATE_ID, BuildBase, BuildLog, BuildLogLevel, BuildService, BuildSource, BuildSpec,
    E2bStep,
};
use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use http::StatusCode;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::Api;
use crate::db::templates::{
    BuildReason, BuildRow, BuildStatus, LogRow, StartCmds, parse_level, rank,
};
use crate::error::{ApiError, chain};
use crate::http::{JsonBody, QueryParams, Team};
use crate::templates::models::{BuildInfo, BuildLogs, BuildStartV2, LogEntry, StatusReason};
use crate::templates::refs::{self, TemplateRef};
use crate::templates::{now, own_template, readable_template, resources};

/// Log lines per status answer: default and maximum (the SDK keeps polling
/// while a page is non-empty).
const MAX_STATUS_LOGS: i64 = 100;
/// Log lines per `/logs` answer: default and maximum.
const MAX_LOG_PAGE: i64 = 100;
/// Log lines stored per database transaction while a build runs.
const LOG_BATCH: usize = 256;
/// Image references the SDK uses for its default base
/// (`Template().from_base_image()`); Arca builds on its `base` template
/// instead, which is its equivalent and needs no registry.
const SDK_BASE_IMAGES: [&str; 2] = ["e2bdev/base", "e2bdev/base:latest"];

/// Why the previous api process's unfinished builds ended.
pub(crate) const INTERRUPTED: &str = "interrupted by a restart of the api; start the build again";

/// A build's path parameters.
fn build_path(template: &str, build: &str) -> Result<(), ApiError> {
    let ok = !build.is_empty()
        && build.len() <= 64
        && build.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!(
            "build '{build}' of template '{template}' not found"
        )))
    }
}

async fn find_build(api: &Api, template_id: &str, build: &str) -> Result<BuildRow, ApiError> {
    build_path(template_id, build)?;
    api.db()
        .build(template_id, &build.to_ascii_lowercase())
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "build '{build}' of template '{template_id}' not found"
            ))
        })
}

/// Whether `s` is a 64-character hex hash (as the SDKs send for COPY).
pub(crate) fn checked_hash(s: &str, field: &str) -> Result<String, ApiError> {
    if arca_proto::build::is_files_hash(s) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(ApiError::BadRequest(format!(
            "{field} must be 64 hex characters (a SHA-256), got '{s}'"
        )))
    }
}

/// What the start body asks to build from.
async fn build_source(api: &Api, team: &str, body: &BuildStartV2) -> Result<BuildSource, ApiError> {
    let steps = body.steps.as_deref().unwrap_or_default();
    if let Some(dockerfile) = &body.dockerfile {
        if body.from_image.is_some()
            || body.from_template.is_some()
            || body.from_image_registry.is_some()
            || !steps.is_empty()
        {
            return Err(ApiError::BadRequest(
                "dockerfile cannot be combined with fromImage, fromTemplate, fromImageRegistry or steps".into(),
            ));
        }
        if dockerfile.trim().is_empty() {
            return Err(ApiError::BadRequest("dockerfile must not be empty".into()));
        }
        return Ok(BuildSource::Dockerfile {
            dockerfile: dockerfile.clone(),
            context_hash: body
                .context_hash
                .as_deref()
                .map(|h| checked_hash(h, "contextHash"))
                .transpose()?,
            build_args: body.build_args.clone().unwrap_or_default(),
        });
    }
    if body.context_hash.is_some() || body.build_args.is_some() {
        return Err(ApiError::BadRequest(
            "contextHash and buildArgs belong to a dockerfile build".into(),
        ));
    }
    let base = match (&body.from_image, &body.from_template) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "set only one of fromImage and fromTemplate".into(),
            ));
        }
        (None, Some(t)) => {
            if body.from_image_registry.is_some() {
                return Err(ApiError::BadRequest(
                    "fromImageRegistry belongs to fromImage, not fromTemplate".into(),
                ));
            }
            template_base(api, team, &TemplateRef::parse(t, "fromTemplate")?).await?
        }
        (Some(image), None) => {
            let image = image.trim();
            if image.is_empty() {
                return Err(ApiError::BadRequest("fromImage must not be empty".into()));
            }
            if SDK_BASE_IMAGES.contains(&image) && body.from_image_registry.is_none() {
                template_base(api, team, &TemplateRef::parse(BASE_TEMPLATE_ID, "base")?).await?
            } else {
                BuildBase::Image {
                    reference: image.to_string(),
                    auth: body.from_image_registry.clone(),
                }
            }
        }
        (None, None) => {
            if body.from_image_registry.is_some() {
                return Err(ApiError::BadRequest(
                    "fromImageRegistry needs fromImage".into(),
                ));
            }
            template_base(api, team, &TemplateRef::parse(BASE_TEMPLATE_ID, "base")?).await?
        }
    };
    let mut out = Vec::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        if s.kind.trim().is_empty() {
            return Err(ApiError::BadRequest(format!("step {} has no type", i + 1)));
        }
        out.push(E2bStep {
            kind: s.kind.clone(),
            args: s.args.clone().unwrap_or_default(),
            files_hash: s
                .files_hash
                .as_deref()
                .map(|h| checked_hash(h, &format!("filesHash of step {}", i + 1)))
                .transpose()?,
            force: s.force.unwrap_or(false),
        });
    }
    Ok(BuildSource::Steps { base, steps: out })
}

async fn template_base(api: &Api, team: &str, r: &TemplateRef) -> Result<BuildBase, ApiError> {
    let found = refs::resolve_build(api, team, r).await?;
    Ok(BuildBase::Template {
        template_id: found.template.id,
        build_id: found.build.id,
    })
}

/// `POST /v2/templates/{templateID}/builds/{buildID}`: starts a registered
/// build (202, empty body).
pub(crate) async fn start_v2(
    State(api): State<Api>,
    Team(team): Team,
    Path((template, build)): Path<(String, String)>,
    JsonBody(body): JsonBody<BuildStartV2>,
) -> Result<StatusCode, ApiError> {
    let t = own_template(&api, &team, &template).await?;
    let b = find_build(&api, &t.id, &build).await?;
    if b.status == BuildStatus::Error {
        let why = b.reason.map(|r| r.message).unwrap_or_default();
        return Err(ApiError::Conflict {
            message: format!(
                "build {} cannot start: {why}; request a new build with POST /v3/templates",
                b.id
            ),
            error_code: None,
        });
    }
    if b.started_at.is_some() {
        return Err(ApiError::Conflict {
            message: format!("build {} was already started", b.id),
            error_code: None,
        });
    }
    let source = build_source(&api, &team, &body).await?;
    let cmds = StartCmds {
        start_cmd: body.start_cmd.clone().filter(|c| !c.trim().is_empty()),
        ready_cmd: body.ready_cmd.clone().filter(|c| !c.trim().is_empty()),
    };
    if !api.db().start_build(&b.id, &cmds, now()).await? {
        return Err(ApiError::Conflict {
            message: format!("build {} was started, cancelled or deleted meanwhile", b.id),
            error_code: None,
        });
    }
    let res = resources(&api, &b);
    spawn_build(
        api.clone(),
        BuildSpec {
            template_id: t.id.clone(),
            build_id: b.id.clone(),
            team_id: team,
            source,
            force: body.force.unwrap_or(false),
            start_cmd: cmds.start_cmd,
            ready_cmd: cmds.ready_cmd,
            cpu_count: res.cpu_count,
            memory_mb: res.memory_mb,
            disk_size_mb: res.disk_size_mb,
        },
    );
    Ok(StatusCode::ACCEPTED)
}

/// `POST /templates/{templateID}/builds/{buildID}` (legacy v1 trigger after
/// a `docker push`): v1 builds start when they are requested, so this is a
/// 202 no-op for a started build.
pub(crate) async fn trigger_v1(
    State(api): State<Api>,
    Team(team): Team,
    Path((template, build)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let t = own_template(&api, &team, &template).await?;
    let b = find_build(&api, &t.id, &build).await?;
    if b.started_at.is_some() {
        return Ok(StatusCode::ACCEPTED);
    }
    Err(ApiError::BadRequest(format!(
        "build {} was requested through POST /v3/templates; start it with POST /v2/templates/{}/builds/{}",
        b.id, t.id, b.id
    )))
}

// ---- running ------------------------------------------------------------------

/// Stores a build's log lines in order.
struct LogWriter {
    api: Api,
    build_id: String,
    next_seq: i64,
}

impl LogWriter {
    async fn write(&mut self, lines: Vec<BuildLog>) {
        if lines.is_empty() {
            return;
        }
        let n = i64::try_from(lines.len()).unwrap_or(i64::MAX);
        match self
            .api
            .db()
            .append_build_logs(&self.build_id, self.next_seq, &lines)
            .await
        {
            Ok(()) => self.next_seq += n,
            // A lost log line must not fail the build.
            Err(e) => {
                tracing::warn!(error = %chain(&e), lines = n, "could not store build log lines")
            }
        }
    }

    async fn say(&mut self, level: BuildLogLevel, message: String) {
        self.write(vec![BuildLog {
            timestamp: now(),
            level,
            step: None,
            message,
        }])
        .await;
    }
}

/// Runs a started build in a task of its own; see the module docs.
pub(crate) fn spawn_build(api: Api, spec: BuildSpec) {
    let span = tracing::info_span!(
        "template_build",
        template_id = %spec.template_id,
        build_id = %spec.build_id,
    );
    tokio::spawn(run_build(api, spec).instrument(span));
}

async fn run_build(api: Api, spec: BuildSpec) {
    let build_id = spec.build_id.clone();
    let template_id = spec.template_id.clone();
    let mut logs = LogWriter {
        api: api.clone(),
        build_id: build_id.clone(),
        next_seq: 0,
    };
    let slots = api.build_slots();
    let permit = match Arc::clone(&slots).try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            let n = api.config().max_concurrent_builds.max(1);
            logs.say(
                BuildLogLevel::Info,
                format!("waiting for a free build slot ({n} builds run at once)"),
            )
            .await;
            match slots.acquire_owned().await {
                Ok(p) => p,
                Err(_) => return, // The semaphore is never closed.
            }
        }
    };
    match api.db().set_building(&build_id, now()).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!("build was deleted or cancelled before it ran");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %chain(&e), "could not mark the build as building");
            return;
        }
    }
    tracing::info!("template build started");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (builder_node, builder): (String, Arc<dyn BuildService>) = match api.nodes().builder() {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %chain(&e), "no node can run the build");
            let reason = BuildReason {
                message: format!("{e}; start the build again when a node is ready"),
                step: None,
            };
            if let Err(e) = api.db().finish_error(&build_id, &reason, now()).await {
                tracing::warn!(error = %chain(&e), "could not record the build's failure");
            }
            return;
        }
    };
    let builder_for_task = Arc::clone(&builder);
    // A task of its own, so that a panicking builder fails this build only.
    let mut task = tokio::spawn(
        async move { builder_for_task.build(spec, tx).await }.instrument(tracing::Span::current()),
    );
    let joined = loop {
        tokio::select! {
            Some(first) = rx.recv() => {
                let mut batch = vec![first];
                while batch.len() < LOG_BATCH {
                    match rx.try_recv() {
                        Ok(l) => batch.push(l),
                        Err(_) => break,
                    }
                }
                logs.write(batch).await;
            }
            r = &mut task => break r,
        }
    };
    // Lines sent just before the end; every line is stored before the
    // status changes, so a client that saw `ready` can read all of them.
    let mut rest = Vec::new();
    while let Ok(l) = rx.try_recv() {
        rest.push(l);
    }
    logs.write(rest).await;
    let db = api.db();
    let recorded = match joined {
        Ok(Ok(result)) => {
            tracing::info!(
                cached = result.cached_steps,
                built = result.built_steps,
                "template build finished"
            );
            // Where it is, before anyone can see it ready and create from
            // it (the node reports it with its next heartbeat anyway).
            if let Err(e) = db
                .add_node_build(&builder_node, &template_id, &build_id)
                .await
            {
                tracing::warn!(error = %chain(&e), "could not record which node holds the build");
            }
            let r = db
                .finish_ready(&build_id, &result.envd_version, now())
                .await;
            if matches!(r, Ok(false)) {
                // Deleted while it ran: free what the builder made.
                if let Err(e) = builder.delete_build(&template_id, &build_id).await {
                    tracing::warn!(error = %chain(&e), "could not delete the build of a deleted template");
                }
            }
            r
        }
        Ok(Err(failure)) => {
            tracing::info!(step = ?failure.step, reason = %failure.message, "template build failed");
            let reason = BuildReason {
                message: failure.message,
                step: failure.step,
            };
            db.finish_error(&build_id, &reason, now()).await
        }
        Err(e) => {
            tracing::error!(error = %e, "the template build task failed");
            let message =
                "the build failed inside the Arca server; the cause is in its log".to_string();
            logs.say(BuildLogLevel::Error, message.clone()).await;
            let reason = BuildReason {
                message,
                step: None,
            };
            db.finish_error(&build_id, &reason, now()).await
        }
    };
    if let Err(e) = recorded {
        tracing::warn!(error = %chain(&e), "could not record the end of the build");
    }
    drop(permit);
}

// ---- status and logs ----------------------------------------------------------

fn entries(rows: &[LogRow]) -> Vec<LogEntry> {
    rows.iter().map(LogEntry::from).collect()
}

fn min_level(q: &QueryParams) -> Result<BuildLogLevel, ApiError> {
    match q.get("level") {
        None | Some("") => Ok(BuildLogLevel::Debug),
        Some(l) => parse_level(l).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "level must be one of debug, info, warn, error; got '{l}'"
            ))
        }),
    }
}

fn bounded(q: &QueryParams, name: &str, max: i64) -> Result<i64, ApiError> {
    match q.int(name)? {
        None => Ok(max),
        Some(n) if n < 0 => Err(ApiError::BadRequest(format!("{name} must not be negative"))),
        // As the reference: larger asks get the maximum.
        Some(n) => Ok(n.min(max)),
    }
}

/// `GET /templates/{templateID}/builds/{buildID}/status?logsOffset=&limit=&level=`.
pub(crate) async fn build_status(
    State(api): State<Api>,
    Team(team): Team,
    Path((template, build)): Path<(String, String)>,
    q: QueryParams,
) -> Result<Json<BuildInfo>, ApiError> {
    let t = readable_template(&api, &team, &template).await?;
    let offset = q.int("logsOffset")?.unwrap_or(0);
    if offset < 0 {
        return Err(ApiError::BadRequest(
            "logsOffset must not be negative".into(),
        ));
    }
    let limit = bounded(&q, "limit", MAX_STATUS_LOGS)?;
    let level = min_level(&q)?;
    // Status before logs: a build's lines are all stored before its status
    // changes, so `ready` here means the logs below are complete.
    let b = find_build(&api, &t.id, &build).await?;
    let rows = api.db().build_logs(&b.id, level, offset, limit).await?;
    let log_entries = entries(&rows);
    let logs = rows
        .iter()
        .map(|l| {
            format!(
                "[{}] {}\n",
                l.timestamp
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                l.message
            )
        })
        .collect();
    let reason = match (b.status, b.reason) {
        (BuildStatus::Error, Some(r)) => Some(StatusReason {
            log_entries: r.step.as_ref().map(|s| {
                log_entries
                    .iter()
                    .filter(|e| {
                        e.step.as_ref() == Some(s) && rank(e.level) >= rank(BuildLogLevel::Warn)
                    })
                    .cloned()
                    .collect()
            }),
            message: r.message,
            step: r.step,
        }),
        (BuildStatus::Error, None) => Some(StatusReason {
            message: "the build failed".into(),
            step: None,
            log_entries: None,
        }),
        _ => None,
    };
    Ok(Json(BuildInfo {
        template_id: t.id,
        build_id: b.id,
        status: b.status.as_str(),
        logs,
        log_entries,
        reason,
    }))
}

/// `GET /templates/{templateID}/builds/{buildID}/logs?cursor=<ms>&limit=&direction=&level=&source=`.
pub(crate) async fn build_logs(
    State(api): State<Api>,
    Team(team): Team,
    Path((template, build)): Path<(String, String)>,
    q: QueryParams,
) -> Result<Json<BuildLogs>, ApiError> {
    let t = readable_template(&api, &team, &template).await?;
    let limit = bounded(&q, "limit", MAX_LOG_PAGE)?;
    let level = min_level(&q)?;
    let backward = match q.get("direction").unwrap_or("forward") {
        "forward" | "" => false,
        "backward" => true,
        other => {
            return Err(ApiError::BadRequest(format!(
                "direction must be forward or backward, got '{other}'"
            )));
        }
    };
    // Arca keeps one log per build; both sources read it.
    match q.get("source").unwrap_or("persistent") {
        "persistent" | "temporary" | "" => {}
        other => {
            return Err(ApiError::BadRequest(format!(
                "source must be persistent or temporary, got '{other}'"
            )));
        }
    }
    let cursor = q
        .int("cursor")?
        .map(|ms| {
            DateTime::<Utc>::from_timestamp_millis(ms)
                .ok_or_else(|| ApiError::BadRequest(format!("cursor {ms} is out of range")))
        })
        .transpose()?;
    let b = find_build(&api, &t.id, &build).await?;
    let rows = api
        .db()
        .build_logs_by_time(&b.id, level, cursor, backward, limit)
        .await?;
    Ok(Json(BuildLogs {
        logs: entries(&rows),
    }))
}

/// Ends builds a previous api process left unfinished (at start): their
/// tasks died with it and a builder cannot be re-attached to.
///
/// This assumes one api process per database, as under `arca up`; several
/// api replicas on one PostgreSQL (cluster mode) would need builds to record
/// which api runs them before this may stay.
pub(crate) async fn interrupt_unfinished(api: &Api) -> Result<(), ApiError> {
    let reason = BuildReason {
        message: INTERRUPTED.into(),
        step: None,
    };
    let n = api.db().interrupt_builds(&reason, now()).await?;
    if n > 0 {
        tracing::warn!(
            builds = n,
            "marked template builds of a previous run as interrupted"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::templates::level_str;

    #[test]
    fn hashes_and_build_ids_are_checked() {
        assert!(checked_hash(&"a".repeat(64), "h").is_ok());
        assert!(checked_hash(&"a".repeat(63), "h").is_err());
        assert!(checked_hash(&format!("../{}", "a".repeat(61)), "h").is_err());
        assert_eq!(checked_hash(&"A".repeat(64), "h").unwrap(), "a".repeat(64));
        assert!(build_path("t", "00000000-0000-4000-8000-000000000000").is_ok());
        assert!(build_path("t", "../x").is_err());
        assert_eq!(level_str(BuildLogLevel::Warn), "warn");
    }
}
