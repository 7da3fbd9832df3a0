//! Template request and response bodies (CONTRACT 2.4), as the generated
//! clients of the SDKs read and write them.
//!
//! Requests accept unknown fields and `null` for optional ones. Responses
//! carry every field the Python parsers require (`d.pop("x")` without a
//! default) and omit unset optional ones, except the nullable required
//! `createdBy` and `lastSpawnedAt`.

use std::collections::BTreeMap;

use arca_proto::build::{BuildLogLevel, RegistryAuth};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};

use crate::db::templates::{BuildRow, LogRow, TagRow, TemplateRow, level_str};

fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

fn rfc3339_opt<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

fn level<S: Serializer>(l: &BuildLogLevel, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(level_str(*l))
}

// ---- requests ---------------------------------------------------------------

/// `TemplateBuildRequestV3` (`POST /v3/templates`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BuildRequestV3 {
    /// `[namespace/]name[:tag]`.
    pub(crate) name: Option<String>,
    pub(crate) tags: Option<Vec<String>>,
    /// Deprecated spelling of `name`.
    pub(crate) alias: Option<String>,
    #[serde(rename = "teamID")]
    pub(crate) team_id: Option<String>,
    pub(crate) cpu_count: Option<i64>,
    #[serde(rename = "memoryMB")]
    pub(crate) memory_mb: Option<i64>,
    pub(crate) min_free_disk_mb: Option<i64>,
}

/// `TemplateStep`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StepIn {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) args: Option<Vec<String>>,
    pub(crate) files_hash: Option<String>,
    pub(crate) force: Option<bool>,
}

/// `TemplateBuildStartV2` (`POST /v2/templates/{id}/builds/{buildID}`),
/// plus the Arca extension for Dockerfile builds: `dockerfile` (its text),
/// `contextHash` (hash an archive of the build context was uploaded under
/// through `GET /templates/{id}/files/{hash}`) and `buildArgs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BuildStartV2 {
    pub(crate) from_image: Option<String>,
    pub(crate) from_template: Option<String>,
    pub(crate) from_image_registry: Option<RegistryAuth>,
    pub(crate) force: Option<bool>,
    pub(crate) steps: Option<Vec<StepIn>>,
    pub(crate) start_cmd: Option<String>,
    pub(crate) ready_cmd: Option<String>,
    pub(crate) dockerfile: Option<String>,
    pub(crate) context_hash: Option<String>,
    pub(crate) build_args: Option<BTreeMap<String, String>>,
}

/// The legacy v1 `TemplateBuildRequest` (`POST /templates`,
/// `POST /templates/{id}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BuildRequestV1 {
    pub(crate) dockerfile: String,
    pub(crate) alias: Option<String>,
    #[serde(rename = "teamID")]
    pub(crate) team_id: Option<String>,
    pub(crate) start_cmd: Option<String>,
    pub(crate) ready_cmd: Option<String>,
    pub(crate) cpu_count: Option<i64>,
    #[serde(rename = "memoryMB")]
    pub(crate) memory_mb: Option<i64>,
}

/// `AssignTemplateTagsRequest`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct AssignTags {
    /// `name:tag` of the build to tag.
    pub(crate) target: String,
    pub(crate) tags: Vec<String>,
}

/// `DeleteTemplateTagsRequest`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct DeleteTags {
    pub(crate) name: String,
    pub(crate) tags: Vec<String>,
}

/// `TemplateUpdateRequest`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct UpdateTemplate {
    pub(crate) public: Option<bool>,
}

// ---- responses --------------------------------------------------------------

/// `TemplateRequestResponseV3`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RequestResponseV3 {
    #[serde(rename = "templateID")]
    pub(crate) template_id: String,
    #[serde(rename = "buildID")]
    pub(crate) build_id: String,
    pub(crate) public: bool,
    pub(crate) names: Vec<String>,
    pub(crate) tags: Vec<String>,
    pub(crate) aliases: Vec<String>,
}

/// `TemplateBuildFileUpload`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FileUpload {
    pub(crate) present: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) url: Option<String>,
}

/// `BuildLogEntry`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LogEntry {
    #[serde(serialize_with = "rfc3339")]
    pub(crate) timestamp: DateTime<Utc>,
    pub(crate) message: String,
    #[serde(serialize_with = "level")]
    pub(crate) level: BuildLogLevel,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) step: Option<String>,
}

impl From<&LogRow> for LogEntry {
    fn from(l: &LogRow) -> LogEntry {
        LogEntry {
            timestamp: l.timestamp,
            message: l.message.clone(),
            level: l.level,
            step: l.step.clone(),
        }
    }
}

/// `BuildStatusReason`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StatusReason {
    pub(crate) message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) step: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) log_entries: Option<Vec<LogEntry>>,
}

/// `TemplateBuildInfo`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BuildInfo {
    #[serde(rename = "templateID")]
    pub(crate) template_id: String,
    #[serde(rename = "buildID")]
    pub(crate) build_id: String,
    pub(crate) status: &'static str,
    pub(crate) logs: Vec<String>,
    pub(crate) log_entries: Vec<LogEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<StatusReason>,
}

/// `TemplateBuildLogsResponse`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BuildLogs {
    pub(crate) logs: Vec<LogEntry>,
}

/// `TemplateAliasResponse`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AliasResponse {
    #[serde(rename = "templateID")]
    pub(crate) template_id: String,
    pub(crate) public: bool,
}

/// `AssignedTemplateTags`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AssignedTags {
    pub(crate) tags: Vec<String>,
    #[serde(rename = "buildID")]
    pub(crate) build_id: String,
}

/// `TemplateTag`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Tag {
    pub(crate) tag: String,
    #[serde(rename = "buildID")]
    pub(crate) build_id: String,
    #[serde(serialize_with = "rfc3339")]
    pub(crate) created_at: DateTime<Utc>,
}

impl From<TagRow> for Tag {
    fn from(t: TagRow) -> Tag {
        Tag {
            tag: t.tag,
            build_id: t.build_id,
            created_at: t.created_at,
        }
    }
}

/// `TemplateUpdateResponse`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct UpdateResponse {
    pub(crate) names: Vec<String>,
}

/// `TemplateBuild` (items of `TemplateWithBuilds.builds`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Build {
    #[serde(rename = "buildID")]
    build_id: String,
    status: &'static str,
    #[serde(serialize_with = "rfc3339")]
    created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    updated_at: DateTime<Utc>,
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u32,
    #[serde(
        serialize_with = "rfc3339_opt",
        skip_serializing_if = "Option::is_none"
    )]
    finished_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "String::is_empty")]
    envd_version: String,
}

/// Resources with the api's defaults applied for unset (0) values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resources {
    pub(crate) cpu_count: u32,
    pub(crate) memory_mb: u32,
    pub(crate) disk_size_mb: u32,
}

impl Build {
    pub(crate) fn new(b: &BuildRow, r: Resources) -> Build {
        Build {
            build_id: b.id.clone(),
            status: b.status.as_str(),
            created_at: b.created_at,
            updated_at: b.updated_at,
            cpu_count: r.cpu_count,
            memory_mb: r.memory_mb,
            disk_size_mb: r.disk_size_mb,
            finished_at: b.finished_at,
            envd_version: b.envd_version.clone(),
        }
    }
}

/// `{"id": uuid, "email": str|null}`; never made (API keys have no user).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CreatedBy {
    id: String,
    email: Option<String>,
}

/// `Template` (items of `GET /templates`), and with `builds` set
/// `TemplateWithBuilds` (`GET /templates/{id}`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Template {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "buildID")]
    build_id: String,
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u32,
    public: bool,
    aliases: Vec<String>,
    names: Vec<String>,
    #[serde(serialize_with = "rfc3339")]
    created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    updated_at: DateTime<Utc>,
    created_by: Option<CreatedBy>,
    #[serde(serialize_with = "rfc3339_opt")]
    last_spawned_at: Option<DateTime<Utc>>,
    spawn_count: i64,
    build_count: i64,
    envd_version: String,
    build_status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    builds: Option<Vec<Build>>,
}

impl Template {
    /// `current` is the build the template is shown with (see
    /// `templates::current_build`).
    pub(crate) fn new(t: &TemplateRow, current: &BuildRow, r: Resources) -> Template {
        Template {
            template_id: t.id.clone(),
            build_id: current.id.clone(),
            cpu_count: r.cpu_count,
            memory_mb: r.memory_mb,
            disk_size_mb: r.disk_size_mb,
            public: t.public || t.team_id.is_none(),
            aliases: t.names.clone(),
            names: t.names.clone(),
            created_at: t.created_at,
            updated_at: t.updated_at,
            created_by: None,
            last_spawned_at: t.last_spawned_at,
            spawn_count: t.spawn_count,
            build_count: t.build_count,
            envd_version: current.envd_version.clone(),
            build_status: current.status.as_str(),
            builds: None,
        }
    }

    /// Turns it into a `TemplateWithBuilds`.
    pub(crate) fn with_builds(mut self, builds: Vec<Build>) -> Template {
        self.builds = Some(builds);
        self
    }
}

/// The legacy v1/v2 answer to a build request (`Template` without names,
/// status and builds).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LegacyTemplate {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "buildID")]
    build_id: String,
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u32,
    public: bool,
    aliases: Vec<String>,
    #[serde(serialize_with = "rfc3339")]
    created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    updated_at: DateTime<Utc>,
    created_by: Option<CreatedBy>,
    #[serde(serialize_with = "rfc3339_opt")]
    last_spawned_at: Option<DateTime<Utc>>,
    spawn_count: i64,
    build_count: i64,
    envd_version: String,
}

impl LegacyTemplate {
    pub(crate) fn new(t: &TemplateRow, build: &BuildRow, r: Resources) -> LegacyTemplate {
        LegacyTemplate {
            template_id: t.id.clone(),
            build_id: build.id.clone(),
            cpu_count: r.cpu_count,
            memory_mb: r.memory_mb,
            disk_size_mb: r.disk_size_mb,
            public: t.public,
            aliases: t.names.clone(),
            created_at: t.created_at,
            updated_at: t.updated_at,
            created_by: None,
            last_spawned_at: t.last_spawned_at,
            spawn_count: t.spawn_count,
            build_count: t.build_count,
            envd_version: build.envd_version.clone(),
        }
    }
}
