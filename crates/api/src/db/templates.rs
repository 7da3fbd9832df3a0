//! The template registry's tables (`migrations/0002_templates.sql`):
//! templates, their names, builds, tags, build logs and upload links.
//!
//! Invariants kept here: a tag only ever points at a `ready` build; a build
//! leaves `building` exactly once (to `ready` or `error`), so a late result
//! never overwrites a cancellation; names are unique across teams.

use std::collections::BTreeSet;

use arca_proto::build::{BuildLog, BuildLogLevel};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use sqlx::any::AnyRow;

use super::{Arg, Db, decode_error, dialect, from_micros, micros, to_u32};
use crate::error::ApiError;

/// Tag a sandbox starts from when none is named.
pub(crate) const DEFAULT_TAG: &str = "default";

/// Where a build is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BuildStatus {
    /// Registered, or started and waiting for a free build slot.
    Waiting,
    /// On a builder.
    Building,
    /// Finished; sandboxes can start from it.
    Ready,
    /// Failed, was cancelled or interrupted; see its reason.
    Error,
}

impl BuildStatus {
    /// The wire (and stored) name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Waiting => "waiting",
            BuildStatus::Building => "building",
            BuildStatus::Ready => "ready",
            BuildStatus::Error => "error",
        }
    }

    fn parse(s: &str) -> Result<BuildStatus, sqlx::Error> {
        match s {
            "waiting" => Ok(BuildStatus::Waiting),
            "building" => Ok(BuildStatus::Building),
            "ready" => Ok(BuildStatus::Ready),
            "error" => Ok(BuildStatus::Error),
            other => Err(decode_error(format!("unknown build status '{other}'"))),
        }
    }
}

/// Why a build ended in `error` (stored as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BuildReason {
    /// For the user.
    pub(crate) message: String,
    /// The failing step (`base`, `1`.., `finalize`), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) step: Option<String>,
}

/// A template and its names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TemplateRow {
    pub(crate) id: String,
    /// `None`: built into Arca, visible to every team.
    pub(crate) team_id: Option<String>,
    pub(crate) public: bool,
    pub(crate) created_by: Option<String>,
    pub(crate) build_count: i64,
    pub(crate) spawn_count: i64,
    pub(crate) last_spawned_at: Option<DateTime<Utc>>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    /// Oldest first; may be empty (a v1 template made without alias).
    pub(crate) names: Vec<String>,
}

/// One build of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BuildRow {
    pub(crate) id: String,
    pub(crate) template_id: String,
    pub(crate) status: BuildStatus,
    pub(crate) reason: Option<BuildReason>,
    /// Tags to point at it once it is ready.
    pub(crate) tags: Vec<String>,
    /// 0 = not set (the api's default applies); likewise below.
    pub(crate) cpu_count: u32,
    pub(crate) memory_mb: u32,
    pub(crate) disk_size_mb: u32,
    pub(crate) start_cmd: Option<String>,
    pub(crate) ready_cmd: Option<String>,
    /// Empty until ready.
    pub(crate) envd_version: String,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) started_at: Option<DateTime<Utc>>,
    pub(crate) finished_at: Option<DateTime<Utc>>,
}

/// A build to register.
#[derive(Debug, Clone)]
pub(crate) struct NewBuild {
    pub(crate) id: String,
    pub(crate) template_id: String,
    pub(crate) tags: Vec<String>,
    pub(crate) cpu_count: u32,
    pub(crate) memory_mb: u32,
    pub(crate) disk_size_mb: u32,
    /// Set for v1 builds, which start as they are requested.
    pub(crate) start: Option<StartCmds>,
}

/// Start and ready command of a build being started.
#[derive(Debug, Clone, Default)]
pub(crate) struct StartCmds {
    pub(crate) start_cmd: Option<String>,
    pub(crate) ready_cmd: Option<String>,
}

/// A tag and the build it points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TagRow {
    pub(crate) tag: String,
    pub(crate) build_id: String,
    pub(crate) created_at: DateTime<Utc>,
}

/// One stored build log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogRow {
    pub(crate) seq: i64,
    pub(crate) timestamp: DateTime<Utc>,
    pub(crate) level: BuildLogLevel,
    pub(crate) step: Option<String>,
    pub(crate) message: String,
}

/// An upload link as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UploadRow {
    pub(crate) team_id: String,
    pub(crate) template_id: String,
    pub(crate) files_hash: String,
    pub(crate) expires_at: DateTime<Utc>,
}

/// The name asked for belongs to another template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NameTaken;

/// Levels from least to most severe, as stored.
pub(crate) const LEVELS: [BuildLogLevel; 4] = [
    BuildLogLevel::Debug,
    BuildLogLevel::Info,
    BuildLogLevel::Warn,
    BuildLogLevel::Error,
];

/// Severity order of a level (0 = debug).
pub(crate) fn rank(l: BuildLogLevel) -> usize {
    LEVELS.iter().position(|x| *x == l).unwrap_or(0)
}

/// The wire (and stored) name of a level.
pub(crate) fn level_str(l: BuildLogLevel) -> &'static str {
    match l {
        BuildLogLevel::Debug => "debug",
        BuildLogLevel::Info => "info",
        BuildLogLevel::Warn => "warn",
        BuildLogLevel::Error => "error",
    }
}

/// A level by its wire name.
pub(crate) fn parse_level(s: &str) -> Option<BuildLogLevel> {
    LEVELS.into_iter().find(|l| level_str(*l) == s)
}

const TEMPLATE_COLUMNS: &str = "t.id, t.team_id, t.public, t.created_by, t.build_count, \
     t.spawn_count, t.last_spawned_at, t.created_at, t.updated_at";

const BUILD_COLUMNS: &str = "b.id, b.template_id, b.status, b.reason, b.tags, b.cpu_count, \
     b.memory_mb, b.disk_size_mb, b.start_cmd, b.ready_cmd, b.envd_version, b.created_at, \
     b.updated_at, b.started_at, b.finished_at";

fn template_from_row(r: &AnyRow) -> Result<TemplateRow, sqlx::Error> {
    Ok(TemplateRow {
        id: r.try_get(0)?,
        team_id: r.try_get(1)?,
        public: r.try_get::<i64, _>(2)? != 0,
        created_by: r.try_get(3)?,
        build_count: r.try_get(4)?,
        spawn_count: r.try_get(5)?,
        last_spawned_at: r
            .try_get::<Option<i64>, _>(6)?
            .map(from_micros)
            .transpose()?,
        created_at: from_micros(r.try_get(7)?)?,
        updated_at: from_micros(r.try_get(8)?)?,
        names: Vec::new(),
    })
}

fn build_from_row(r: &AnyRow) -> Result<BuildRow, sqlx::Error> {
    let id: String = r.try_get(0)?;
    let reason = r
        .try_get::<Option<String>, _>(3)?
        .map(|s| serde_json::from_str::<BuildReason>(&s))
        .transpose()
        .map_err(|e| decode_error(format!("build {id} reason: {e}")))?;
    let tags: String = r.try_get(4)?;
    let tags =
        serde_json::from_str(&tags).map_err(|e| decode_error(format!("build {id} tags: {e}")))?;
    let opt_time = |i: usize| -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        r.try_get::<Option<i64>, _>(i)?.map(from_micros).transpose()
    };
    Ok(BuildRow {
        template_id: r.try_get(1)?,
        status: BuildStatus::parse(&r.try_get::<String, _>(2)?)?,
        reason,
        tags,
        cpu_count: to_u32(r.try_get(5)?)?,
        memory_mb: to_u32(r.try_get(6)?)?,
        disk_size_mb: to_u32(r.try_get(7)?)?,
        start_cmd: r.try_get(8)?,
        ready_cmd: r.try_get(9)?,
        envd_version: r.try_get(10)?,
        created_at: from_micros(r.try_get(11)?)?,
        updated_at: from_micros(r.try_get(12)?)?,
        started_at: opt_time(13)?,
        finished_at: opt_time(14)?,
        id,
    })
}

fn log_from_row(r: &AnyRow) -> Result<LogRow, sqlx::Error> {
    let level: String = r.try_get(2)?;
    Ok(LogRow {
        seq: r.try_get(0)?,
        timestamp: from_micros(r.try_get(1)?)?,
        level: parse_level(&level)
            .ok_or_else(|| decode_error(format!("unknown log level '{level}'")))?,
        step: r.try_get(3)?,
        message: r.try_get(4)?,
    })
}

fn to_json<T: Serialize>(v: &T) -> Result<String, ApiError> {
    serde_json::to_string(v).map_err(|e| ApiError::Internal(format!("encoding JSON: {e}")))
}

/// `$first, $first+1, ..` for `n` values, and the level names from `min`.
fn level_list(min: BuildLogLevel, first: usize) -> (String, Vec<&'static str>) {
    let names: Vec<&'static str> = LEVELS
        .into_iter()
        .filter(|l| rank(*l) >= rank(min))
        .map(level_str)
        .collect();
    let params = (0..names.len())
        .map(|i| format!("${}", first + i))
        .collect::<Vec<_>>()
        .join(", ");
    (params, names)
}

impl Db {
    // ---- templates ------------------------------------------------------

    pub(super) async fn with_names(&self, mut t: TemplateRow) -> Result<TemplateRow, ApiError> {
        let rows = sqlx::query(
            "SELECT name FROM template_names WHERE template_id = $1 ORDER BY created_at, name",
        )
        .bind(t.id.as_str())
        .fetch_all(&self.pool)
        .await?;
        t.names = rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        Ok(t)
    }

    /// The template with this id.
    pub(crate) async fn template_by_id(&self, id: &str) -> Result<Option<TemplateRow>, ApiError> {
        let sql = format!("SELECT {TEMPLATE_COLUMNS} FROM templates t WHERE t.id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        match row.as_ref().map(template_from_row).transpose()? {
            Some(t) => Ok(Some(self.with_names(t).await?)),
            None => Ok(None),
        }
    }

    /// The template that has this name.
    pub(crate) async fn template_by_name(
        &self,
        name: &str,
    ) -> Result<Option<TemplateRow>, ApiError> {
        let sql = format!(
            "SELECT {TEMPLATE_COLUMNS} FROM templates t \
             JOIN template_names n ON n.template_id = t.id WHERE n.name = $1"
        );
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        match row.as_ref().map(template_from_row).transpose()? {
            Some(t) => Ok(Some(self.with_names(t).await?)),
            None => Ok(None),
        }
    }

    /// Name of a team.
    pub(crate) async fn team_name(&self, team_id: &str) -> Result<Option<String>, ApiError> {
        let row = sqlx::query("SELECT name FROM teams WHERE id = $1")
            .bind(team_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// The team's own templates and the built-in ones, oldest first.
    pub(crate) async fn list_templates(&self, team_id: &str) -> Result<Vec<TemplateRow>, ApiError> {
        let sql = format!(
            "SELECT {TEMPLATE_COLUMNS} FROM templates t \
             WHERE t.team_id = $1 OR t.team_id IS NULL ORDER BY t.created_at, t.id"
        );
        let rows = sqlx::query(&sql)
            .bind(team_id)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(self.with_names(template_from_row(r)?).await?);
        }
        Ok(out)
    }

    /// Creates a template (with `name`, if any) and its first build.
    pub(crate) async fn insert_template(
        &self,
        id: &str,
        team_id: &str,
        name: Option<&str>,
        build: &NewBuild,
        now: DateTime<Utc>,
    ) -> Result<Result<(), NameTaken>, ApiError> {
        let mut tx = self.pool.begin().await?;
        if let Err(taken) = insert_template(&mut tx, id, team_id, name, build, now).await? {
            return Ok(Err(taken));
        }
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// Gives a template one more name; `Err(NameTaken)` if it is used.
    pub(crate) async fn add_name(
        &self,
        template_id: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<Result<(), NameTaken>, ApiError> {
        let r = sqlx::query(
            "INSERT INTO template_names (name, template_id, created_at) VALUES ($1, $2, $3)",
        )
        .bind(name)
        .bind(template_id)
        .bind(micros(now))
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(Ok(())),
            Err(e) if dialect::is_unique_violation(&e) => Ok(Err(NameTaken)),
            Err(e) => Err(e.into()),
        }
    }

    /// Registers another build of an existing template. Builds that were
    /// registered for one of the same tags but never started are cancelled:
    /// the newer request supersedes them (an SDK that gave up on a build
    /// never starts it).
    pub(crate) async fn insert_build(
        &self,
        build: &NewBuild,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, tags FROM template_builds \
             WHERE template_id = $1 AND status = 'waiting' AND started_at IS NULL",
        )
        .bind(build.template_id.as_str())
        .fetch_all(&mut *tx)
        .await?;
        let reason = to_json(&BuildReason {
            message: "the build was cancelled: a newer build of the same template and tag was \
                      requested before it started"
                .into(),
            step: None,
        })?;
        for r in rows {
            let id: String = r.try_get(0)?;
            let tags: Vec<String> = serde_json::from_str(&r.try_get::<String, _>(1)?)
                .map_err(|e| decode_error(format!("build {id} tags: {e}")))?;
            if tags.iter().any(|t| build.tags.contains(t)) {
                sqlx::query(
                    "UPDATE template_builds SET status = 'error', reason = $2, updated_at = $3, \
                     finished_at = $3 WHERE id = $1 AND status = 'waiting'",
                )
                .bind(id.as_str())
                .bind(reason.as_str())
                .bind(micros(now))
                .execute(&mut *tx)
                .await?;
            }
        }
        insert_build(&mut tx, build, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Counts a sandbox start from a template.
    pub(crate) async fn count_spawn(
        &self,
        template_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        sqlx::query(
            "UPDATE templates SET spawn_count = spawn_count + 1, last_spawned_at = $2 WHERE id = $1",
        )
        .bind(template_id)
        .bind(micros(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Sets the public flag; `false` if there is no such template.
    pub(crate) async fn set_public(
        &self,
        template_id: &str,
        public: bool,
        now: DateTime<Utc>,
    ) -> Result<bool, ApiError> {
        let r = sqlx::query("UPDATE templates SET public = $2, updated_at = $3 WHERE id = $1")
            .bind(template_id)
            .bind(i64::from(public))
            .bind(micros(now))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Deletes a template with its names, tags, builds and logs; returns
    /// the ids of its builds (`None` if it did not exist).
    pub(crate) async fn delete_template(
        &self,
        template_id: &str,
    ) -> Result<Option<Vec<String>>, ApiError> {
        let mut tx = self.pool.begin().await?;
        let builds: Vec<String> = sqlx::query(
            "SELECT id FROM template_builds WHERE template_id = $1 ORDER BY created_at",
        )
        .bind(template_id)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
        for sql in [
            "DELETE FROM template_build_logs WHERE build_id IN \
             (SELECT id FROM template_builds WHERE template_id = $1)",
            "DELETE FROM template_tags WHERE template_id = $1",
            "DELETE FROM template_builds WHERE template_id = $1",
            "DELETE FROM template_names WHERE template_id = $1",
            "DELETE FROM snapshots WHERE template_id = $1",
        ] {
            sqlx::query(sql).bind(template_id).execute(&mut *tx).await?;
        }
        let r = sqlx::query("DELETE FROM templates WHERE id = $1")
            .bind(template_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((r.rows_affected() > 0).then_some(builds))
    }

    // ---- builds ---------------------------------------------------------

    /// A build of a template.
    pub(crate) async fn build(
        &self,
        template_id: &str,
        build_id: &str,
    ) -> Result<Option<BuildRow>, ApiError> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM template_builds b WHERE b.id = $1 AND b.template_id = $2"
        );
        let row = sqlx::query(&sql)
            .bind(build_id)
            .bind(template_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(build_from_row).transpose()?)
    }

    /// The build a tag points at.
    pub(crate) async fn tagged_build(
        &self,
        template_id: &str,
        tag: &str,
    ) -> Result<Option<BuildRow>, ApiError> {
        let sql = format!(
            "SELECT {BUILD_COLUMNS} FROM template_builds b \
             JOIN template_tags g ON g.build_id = b.id \
             WHERE g.template_id = $1 AND g.tag = $2"
        );
        let row = sqlx::query(&sql)
            .bind(template_id)
            .bind(tag)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(build_from_row).transpose()?)
    }

    /// Whether any build of the template is ready.
    pub(crate) async fn has_ready_build(&self, template_id: &str) -> Result<bool, ApiError> {
        let row = sqlx::query(
            "SELECT 1 FROM template_builds WHERE template_id = $1 AND status = 'ready' LIMIT 1",
        )
        .bind(template_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Builds of a template, newest first, after `cursor`
    /// (`(created_at, id)` of the last one seen); and whether more follow.
    pub(crate) async fn builds_page(
        &self,
        template_id: &str,
        cursor: Option<(i64, String)>,
        limit: u32,
    ) -> Result<(Vec<BuildRow>, bool), ApiError> {
        let mut sql =
            format!("SELECT {BUILD_COLUMNS} FROM template_builds b WHERE b.template_id = $1");
        let mut args = vec![Arg::Text(template_id.to_string())];
        if let Some((t, id)) = cursor {
            sql.push_str(" AND (b.created_at < $2 OR (b.created_at = $2 AND b.id < $3))");
            args.push(Arg::Int(t));
            args.push(Arg::Text(id));
        }
        sql.push_str(&format!(
            " ORDER BY b.created_at DESC, b.id DESC LIMIT ${}",
            args.len() + 1
        ));
        args.push(Arg::Int(i64::from(limit) + 1));
        let rows = bind_all(sqlx::query(&sql), args)
            .fetch_all(&self.pool)
            .await?;
        let mut out = rows
            .iter()
            .map(build_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let more = out.len() > usize::try_from(limit).unwrap_or(usize::MAX);
        if more {
            out.pop();
        }
        Ok((out, more))
    }

    /// Marks a registered build started (still `waiting` until a build slot
    /// is free); `false` if it was started, cancelled or deleted already.
    pub(crate) async fn start_build(
        &self,
        build_id: &str,
        cmds: &StartCmds,
        now: DateTime<Utc>,
    ) -> Result<bool, ApiError> {
        let r = sqlx::query(
            "UPDATE template_builds SET started_at = $2, updated_at = $2, start_cmd = $3, \
             ready_cmd = $4 WHERE id = $1 AND status = 'waiting' AND started_at IS NULL",
        )
        .bind(build_id)
        .bind(micros(now))
        .bind(cmds.start_cmd.as_deref())
        .bind(cmds.ready_cmd.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// `waiting` -> `building`; `false` if the build is gone or cancelled.
    pub(crate) async fn set_building(
        &self,
        build_id: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, ApiError> {
        let r = sqlx::query(
            "UPDATE template_builds SET status = 'building', updated_at = $2 \
             WHERE id = $1 AND status = 'waiting'",
        )
        .bind(build_id)
        .bind(micros(now))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// `building` -> `ready`, pointing the build's tags at it (and
    /// `default` too when the template has no `default` yet, so that the
    /// plain name of a template whose first build was tagged works).
    /// `false` if the build is no longer `building` (deleted meanwhile).
    pub(crate) async fn finish_ready(
        &self,
        build_id: &str,
        envd_version: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, ApiError> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "UPDATE template_builds SET status = 'ready', envd_version = $2, updated_at = $3, \
             finished_at = $3 WHERE id = $1 AND status = 'building'",
        )
        .bind(build_id)
        .bind(envd_version)
        .bind(micros(now))
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        let row = sqlx::query("SELECT template_id, tags FROM template_builds WHERE id = $1")
            .bind(build_id)
            .fetch_one(&mut *tx)
            .await?;
        let template_id: String = row.try_get(0)?;
        let mut tags: BTreeSet<String> = serde_json::from_str(&row.try_get::<String, _>(1)?)
            .map_err(|e| decode_error(format!("build {build_id} tags: {e}")))?;
        let has_default =
            sqlx::query("SELECT 1 FROM template_tags WHERE template_id = $1 AND tag = $2")
                .bind(template_id.as_str())
                .bind(DEFAULT_TAG)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
        if !has_default {
            tags.insert(DEFAULT_TAG.to_string());
        }
        for tag in &tags {
            point_tag(&mut tx, &template_id, tag, build_id, now).await?;
        }
        sqlx::query("UPDATE templates SET updated_at = $2 WHERE id = $1")
            .bind(template_id.as_str())
            .bind(micros(now))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// `waiting`/`building` -> `error` with `reason`; `false` if the build
    /// already ended or is gone.
    pub(crate) async fn finish_error(
        &self,
        build_id: &str,
        reason: &BuildReason,
        now: DateTime<Utc>,
    ) -> Result<bool, ApiError> {
        let r = sqlx::query(
            "UPDATE template_builds SET status = 'error', reason = $2, updated_at = $3, \
             finished_at = $3 WHERE id = $1 AND status IN ('waiting', 'building')",
        )
        .bind(build_id)
        .bind(to_json(reason)?)
        .bind(micros(now))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Ends every `waiting` or `building` build with `reason`; the number
    /// of builds ended.
    pub(crate) async fn interrupt_builds(
        &self,
        reason: &BuildReason,
        now: DateTime<Utc>,
    ) -> Result<u64, ApiError> {
        let r = sqlx::query(
            "UPDATE template_builds SET status = 'error', reason = $1, updated_at = $2, \
             finished_at = $2 WHERE status IN ('waiting', 'building') AND started_at IS NOT NULL",
        )
        .bind(to_json(reason)?)
        .bind(micros(now))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    // ---- build logs -----------------------------------------------------

    /// Stores log lines numbered from `first_seq`.
    pub(crate) async fn append_build_logs(
        &self,
        build_id: &str,
        first_seq: i64,
        logs: &[BuildLog],
    ) -> Result<(), ApiError> {
        let mut tx = self.pool.begin().await?;
        for (seq, l) in (first_seq..).zip(logs) {
            sqlx::query(
                "INSERT INTO template_build_logs (build_id, seq, logged_at, level, step, message) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(build_id)
            .bind(seq)
            .bind(micros(l.timestamp))
            .bind(level_str(l.level))
            .bind(l.step.as_deref())
            .bind(l.message.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Lines at `min` level or above, skipping the first `offset` of them.
    pub(crate) async fn build_logs(
        &self,
        build_id: &str,
        min: BuildLogLevel,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<LogRow>, ApiError> {
        let (levels, names) = level_list(min, 2);
        let sql = format!(
            "SELECT seq, logged_at, level, step, message FROM template_build_logs \
             WHERE build_id = $1 AND level IN ({levels}) ORDER BY seq LIMIT ${} OFFSET ${}",
            names.len() + 2,
            names.len() + 3
        );
        let mut q = sqlx::query(&sql).bind(build_id);
        for n in names {
            q = q.bind(n);
        }
        let rows = q.bind(limit).bind(offset).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(log_from_row).collect::<Result<_, _>>()?)
    }

    /// Lines at `min` level or above from a time on (`cursor`, inclusive),
    /// oldest first, or up to it, newest first (`backward`).
    pub(crate) async fn build_logs_by_time(
        &self,
        build_id: &str,
        min: BuildLogLevel,
        cursor: Option<DateTime<Utc>>,
        backward: bool,
        limit: i64,
    ) -> Result<Vec<LogRow>, ApiError> {
        let (levels, names) = level_list(min, 2);
        let mut n = names.len() + 2;
        let mut sql = format!(
            "SELECT seq, logged_at, level, step, message FROM template_build_logs \
             WHERE build_id = $1 AND level IN ({levels})"
        );
        if cursor.is_some() {
            let cmp = if backward { "<=" } else { ">=" };
            sql.push_str(&format!(" AND logged_at {cmp} ${n}"));
            n += 1;
        }
        let dir = if backward { "DESC" } else { "ASC" };
        sql.push_str(&format!(" ORDER BY seq {dir} LIMIT ${n}"));
        let mut q = sqlx::query(&sql).bind(build_id);
        for l in names {
            q = q.bind(l);
        }
        if let Some(c) = cursor {
            q = q.bind(micros(c));
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(log_from_row).collect::<Result<_, _>>()?)
    }

    // ---- tags -----------------------------------------------------------

    /// Tags of a template, by name.
    pub(crate) async fn tags(&self, template_id: &str) -> Result<Vec<TagRow>, ApiError> {
        let rows = sqlx::query(
            "SELECT tag, build_id, created_at FROM template_tags WHERE template_id = $1 ORDER BY tag",
        )
        .bind(template_id)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(TagRow {
                tag: r.try_get(0)?,
                build_id: r.try_get(1)?,
                created_at: from_micros(r.try_get(2)?)?,
            });
        }
        Ok(out)
    }

    /// Points `tags` at a ready build of the template.
    pub(crate) async fn assign_tags(
        &self,
        template_id: &str,
        build_id: &str,
        tags: &[String],
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        let mut tx = self.pool.begin().await?;
        for tag in tags {
            point_tag(&mut tx, template_id, tag, build_id, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Removes tags (missing ones are ignored).
    pub(crate) async fn delete_tags(
        &self,
        template_id: &str,
        tags: &[String],
    ) -> Result<(), ApiError> {
        let mut tx = self.pool.begin().await?;
        for tag in tags {
            sqlx::query("DELETE FROM template_tags WHERE template_id = $1 AND tag = $2")
                .bind(template_id)
                .bind(tag.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    // ---- uploads --------------------------------------------------------

    /// Stores an upload link (by its token's hash) and forgets expired,
    /// unused ones.
    pub(crate) async fn insert_upload(
        &self,
        token_hash: &str,
        up: &UploadRow,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        sqlx::query("DELETE FROM template_uploads WHERE expires_at < $1 AND uploaded_at IS NULL")
            .bind(micros(now))
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO template_uploads (token_hash, team_id, template_id, files_hash, \
             created_at, expires_at, uploaded_at) VALUES ($1, $2, $3, $4, $5, $6, NULL)",
        )
        .bind(token_hash)
        .bind(up.team_id.as_str())
        .bind(up.template_id.as_str())
        .bind(up.files_hash.as_str())
        .bind(micros(now))
        .bind(micros(up.expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The upload link whose token has this hash.
    pub(crate) async fn upload(&self, token_hash: &str) -> Result<Option<UploadRow>, ApiError> {
        let row = sqlx::query(
            "SELECT team_id, template_id, files_hash, expires_at FROM template_uploads \
             WHERE token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        Ok(Some(UploadRow {
            team_id: r.try_get(0)?,
            template_id: r.try_get(1)?,
            files_hash: r.try_get(2)?,
            expires_at: from_micros(r.try_get(3)?)?,
        }))
    }

    /// Records that the archive of a link arrived.
    pub(crate) async fn mark_uploaded(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        sqlx::query("UPDATE template_uploads SET uploaded_at = $2 WHERE token_hash = $1")
            .bind(token_hash)
            .bind(micros(now))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether the team uploaded an archive with this hash.
    pub(crate) async fn team_uploaded(
        &self,
        team_id: &str,
        files_hash: &str,
    ) -> Result<bool, ApiError> {
        let row = sqlx::query(
            "SELECT 1 FROM template_uploads WHERE team_id = $1 AND files_hash = $2 \
             AND uploaded_at IS NOT NULL LIMIT 1",
        )
        .bind(team_id)
        .bind(files_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }
}

/// Inserts a private template of `team_id`, its name if any and its first
/// build; `Err(NameTaken)` (the transaction must then be dropped) when the
/// name is used.
pub(super) async fn insert_template(
    conn: &mut sqlx::AnyConnection,
    id: &str,
    team_id: &str,
    name: Option<&str>,
    build: &NewBuild,
    now: DateTime<Utc>,
) -> Result<Result<(), NameTaken>, ApiError> {
    sqlx::query(
        "INSERT INTO templates (id, team_id, public, created_by, build_count, spawn_count, \
         last_spawned_at, created_at, updated_at) VALUES ($1, $2, 0, NULL, 0, 0, NULL, $3, $3)",
    )
    .bind(id)
    .bind(team_id)
    .bind(micros(now))
    .execute(&mut *conn)
    .await?;
    if let Some(name) = name {
        let r = sqlx::query(
            "INSERT INTO template_names (name, template_id, created_at) VALUES ($1, $2, $3)",
        )
        .bind(name)
        .bind(id)
        .bind(micros(now))
        .execute(&mut *conn)
        .await;
        match r {
            Err(e) if dialect::is_unique_violation(&e) => return Ok(Err(NameTaken)),
            r => r?,
        };
    }
    insert_build(conn, build, now).await?;
    Ok(Ok(()))
}

pub(super) async fn insert_build(
    conn: &mut sqlx::AnyConnection,
    b: &NewBuild,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let started = b.start.as_ref().map(|_| micros(now));
    let cmds = b.start.clone().unwrap_or_default();
    sqlx::query(
        "INSERT INTO template_builds (id, template_id, status, reason, tags, cpu_count, \
         memory_mb, disk_size_mb, start_cmd, ready_cmd, envd_version, created_at, updated_at, \
         started_at, finished_at) \
         VALUES ($1, $2, 'waiting', NULL, $3, $4, $5, $6, $7, $8, '', $9, $9, $10, NULL)",
    )
    .bind(b.id.as_str())
    .bind(b.template_id.as_str())
    .bind(to_json(&b.tags)?)
    .bind(i64::from(b.cpu_count))
    .bind(i64::from(b.memory_mb))
    .bind(i64::from(b.disk_size_mb))
    .bind(cmds.start_cmd)
    .bind(cmds.ready_cmd)
    .bind(micros(now))
    .bind(started)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE templates SET build_count = build_count + 1, updated_at = $2 WHERE id = $1",
    )
    .bind(b.template_id.as_str())
    .bind(micros(now))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Points one tag at a build (replacing where it pointed before).
async fn point_tag(
    conn: &mut sqlx::AnyConnection,
    template_id: &str,
    tag: &str,
    build_id: &str,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    // One upsert rather than delete + insert: on PostgreSQL two transactions
    // pointing the same new tag would both find nothing to delete and the
    // second insert would fail (SQLite serializes them). Both have ON
    // CONFLICT (SQLite since 3.24).
    sqlx::query(
        "INSERT INTO template_tags (template_id, tag, build_id, created_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (template_id, tag) DO UPDATE SET build_id = excluded.build_id, \
         created_at = excluded.created_at",
    )
    .bind(template_id)
    .bind(tag)
    .bind(build_id)
    .bind(micros(now))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    args: Vec<Arg>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for a in args {
        q = match a {
            Arg::Text(s) => q.bind(s),
            Arg::Int(i) => q.bind(i),
        };
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::dialect::testing::{TestDb, on_both_backends};

    #[test]
    fn levels_filter_from_the_minimum() {
        let (params, names) = level_list(BuildLogLevel::Warn, 2);
        assert_eq!(params, "$2, $3");
        assert_eq!(names, ["warn", "error"]);
        assert_eq!(level_list(BuildLogLevel::Debug, 1).1.len(), 4);
        for l in LEVELS {
            assert_eq!(parse_level(level_str(l)), Some(l));
        }
        assert_eq!(parse_level("fatal"), None);
    }

    async fn the_base_template_is_seeded_with_its_build_and_tag(test_db: TestDb) {
        let db = Db::open(&test_db.url).await.unwrap();
        let base = db.template_by_name("base").await.unwrap().unwrap();
        assert_eq!(base.id, arca_proto::build::BASE_TEMPLATE_ID);
        assert_eq!(base.team_id, None);
        assert!(base.public);
        assert_eq!(base.names, ["base"]);
        let build = db.tagged_build("base", DEFAULT_TAG).await.unwrap().unwrap();
        assert_eq!(build.id, arca_proto::build::BASE_BUILD_ID);
        assert_eq!(build.status, BuildStatus::Ready);
        assert_eq!(
            (build.cpu_count, build.memory_mb, build.disk_size_mb),
            (2, 512, 1024)
        );
        assert_eq!(build.envd_version, "0.6.13");
    }
    on_both_backends!(the_base_template_is_seeded_with_its_build_and_tag);

    /// Two ready builds of one template pointed at by the same new tags at
    /// the same moment: every assignment succeeds and each tag ends up on one
    /// of them. (PostgreSQL runs such transactions side by side.)
    async fn concurrent_tag_moves_all_succeed(test_db: TestDb) {
        let db = Db::open(&test_db.url).await.unwrap();
        let now = Utc::now();
        db.insert_team("t", "team", now).await.unwrap();
        let build = |id: &str| NewBuild {
            id: id.into(),
            template_id: "app".into(),
            tags: vec![],
            cpu_count: 1,
            memory_mb: 128,
            disk_size_mb: 512,
            start: Some(StartCmds::default()),
        };
        db.insert_template("app", "t", Some("app"), &build("b1"), now)
            .await
            .unwrap()
            .unwrap();
        db.insert_build(&build("b2"), now).await.unwrap();
        for b in ["b1", "b2"] {
            assert!(db.set_building(b, now).await.unwrap());
            assert!(db.finish_ready(b, "0.6.13", now).await.unwrap());
        }
        let tags: Vec<String> = (0..40).map(|i| format!("v{i}")).collect();
        let moves = ["b1", "b2"].map(|b| {
            let (db, tags) = (db.clone(), tags.clone());
            tokio::spawn(async move {
                for tag in &tags {
                    db.assign_tags("app", b, std::slice::from_ref(tag), Utc::now())
                        .await?;
                }
                Ok::<_, ApiError>(())
            })
        });
        for m in moves {
            m.await.unwrap().unwrap();
        }
        let got = db.tags("app").await.unwrap();
        for tag in &tags {
            let row = got.iter().find(|r| &r.tag == tag).unwrap();
            assert!(["b1", "b2"].contains(&row.build_id.as_str()), "{row:?}");
        }
    }
    on_both_backends!(concurrent_tag_moves_all_succeed);
}
