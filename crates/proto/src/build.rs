//! Template builds: what the control plane asks a node to build, and what
//! the node reports back while and after it builds.
//!
//! The api records templates, builds, tags and logs; a node turns a
//! [`BuildSpec`] into layers and a runnable template build
//! ([`BuildService::build`]). Under `arca up` both run in one process and
//! share the directory uploaded COPY archives are kept in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::node::{BoxFuture, NodeError};

/// Id of the built-in `base` template (also its name).
pub const BASE_TEMPLATE_ID: &str = "base";
/// Build id of the built-in `base` template's one build.
pub const BASE_BUILD_ID: &str = "00000000-0000-4000-8000-000000000000";

/// Whether `s` is a files hash (a SHA-256 as 64 hex characters): the form
/// COPY archives and build contexts are uploaded under.
pub fn is_files_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Where the api keeps a team's uploaded archive and the node reads it:
/// `<uploads_dir>/<team>/<hash>` (each team's files apart from the
/// others'). `None` when the team id or the hash could not be a single
/// path component.
pub fn upload_path(uploads_dir: &Path, team_id: &str, hash: &str) -> Option<PathBuf> {
    let team_ok = !team_id.is_empty()
        && team_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (team_ok && is_files_hash(hash)).then(|| uploads_dir.join(team_id).join(hash))
}

/// Credentials for a private registry (`fromImageRegistry`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RegistryAuth {
    /// User name and password (or token), sent as basic auth or traded for a
    /// bearer token as the registry asks.
    Registry {
        /// User name.
        username: String,
        /// Password or access token.
        password: String,
    },
    /// AWS ECR (not supported by Arca; refused with a clear error).
    Aws {
        /// Key id.
        #[serde(rename = "awsAccessKeyId")]
        access_key_id: String,
        /// Secret.
        #[serde(rename = "awsSecretAccessKey")]
        secret_access_key: String,
        /// Region.
        #[serde(rename = "awsRegion")]
        region: String,
    },
    /// Google Artifact Registry with a service account's JSON key, used as
    /// basic auth with user `_json_key`.
    Gcp {
        /// The key file's text.
        #[serde(rename = "serviceAccountJson")]
        service_account_json: String,
    },
}

/// Where a build's file system starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildBase {
    /// A registry image (`fromImage`).
    Image {
        /// Reference as the user wrote it (`python:3.12`, `ghcr.io/a/b@sha256:..`).
        reference: String,
        /// Credentials, when the registry needs them.
        auth: Option<RegistryAuth>,
    },
    /// A finished build of another template (`fromTemplate`), resolved by the api.
    Template {
        /// Template id.
        template_id: String,
        /// Its build.
        build_id: String,
    },
}

/// One E2B build step as the SDKs send it (`TemplateStep`), kept verbatim;
/// the node's template crate gives it meaning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct E2bStep {
    /// `COPY`, `ENV`, `RUN`, `WORKDIR` or `USER`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Arguments, per CONTRACT 2.4.
    #[serde(default)]
    pub args: Vec<String>,
    /// COPY: the hash the files were uploaded under.
    #[serde(default, rename = "filesHash", skip_serializing_if = "Option::is_none")]
    pub files_hash: Option<String>,
    /// Rebuild this step and every later one even when cached.
    #[serde(default)]
    pub force: bool,
}

/// What a build is made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildSource {
    /// The SDK's `Template` builder: a base and E2B steps.
    Steps {
        /// Starting point.
        base: BuildBase,
        /// Steps in order; step `i` is reported as step `i + 1`.
        steps: Vec<E2bStep>,
    },
    /// A Dockerfile (CLI, legacy v1 API).
    Dockerfile {
        /// Its text.
        dockerfile: String,
        /// Hash the build context's archive was uploaded under (as for a
        /// COPY step's `filesHash`); `None`: no context, so COPY from the
        /// context fails.
        context_hash: Option<String>,
        /// `--build-arg` values.
        build_args: BTreeMap<String, String>,
    },
}

/// A build the api asks of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSpec {
    /// Template being built.
    pub template_id: String,
    /// This build (a UUID).
    pub build_id: String,
    /// Team that owns it (templates of other teams are not visible to it).
    pub team_id: String,
    /// What to build.
    pub source: BuildSource,
    /// Ignore the layer cache for every step.
    pub force: bool,
    /// Started in every sandbox of the template (shell command).
    pub start_cmd: Option<String>,
    /// Polled until it exits 0 before a sandbox counts as started (shell command).
    pub ready_cmd: Option<String>,
    /// CPUs of the build sandboxes and of the template's sandboxes.
    pub cpu_count: u32,
    /// Memory of the build sandboxes, MiB.
    pub memory_mb: u32,
    /// Writable disk of each build step, MiB.
    pub disk_size_mb: u32,
}

/// Severity of a build log line (E2B's `LogLevel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildLogLevel {
    /// Detail.
    Debug,
    /// Progress.
    Info,
    /// Something the user should look at.
    Warn,
    /// A failure.
    Error,
}

/// One line of a build's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLog {
    /// When it was said.
    pub timestamp: DateTime<Utc>,
    /// Severity.
    pub level: BuildLogLevel,
    /// Step it belongs to: `"base"`, `"1"`..`"n"` (1-based among the user
    /// steps) or `"finalize"`.
    pub step: Option<String>,
    /// The text (one line, no newline).
    pub message: String,
}

/// A finished build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildResult {
    /// envd version sandboxes of it will report.
    pub envd_version: String,
    /// Size of its file system, MiB (rounded up).
    pub rootfs_size_mb: u64,
    /// Steps answered from the cache.
    pub cached_steps: u32,
    /// Steps run.
    pub built_steps: u32,
}

/// A failed build: what went wrong and in which step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{message}")]
pub struct BuildFailure {
    /// For the user: what failed and what to do.
    pub message: String,
    /// Step, named as in [`BuildLog::step`].
    pub step: Option<String>,
}

/// Sends a node's build log lines to whoever records them.
pub type BuildLogSink = tokio::sync::mpsc::UnboundedSender<BuildLog>;

/// Template builds on a node.
pub trait BuildService: Send + Sync + 'static {
    /// Runs a build to the end, sending log lines as they happen. On
    /// success the build can be used as [`crate::node::SandboxSpec::build_id`];
    /// on failure nothing of it is registered (cached layers of the steps
    /// that did succeed are kept).
    fn build(
        &self,
        spec: BuildSpec,
        logs: BuildLogSink,
    ) -> BoxFuture<'_, Result<BuildResult, BuildFailure>>;

    /// Forgets a build and frees the layers nothing else uses. Missing
    /// builds are not an error.
    fn delete_build<'a>(
        &'a self,
        template_id: &'a str,
        build_id: &'a str,
    ) -> BoxFuture<'a, Result<(), NodeError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_kept_per_team_under_their_hash() {
        let h = "ab".repeat(32);
        let root = Path::new("/u");
        assert_eq!(
            upload_path(root, "team-1", &h),
            Some(root.join("team-1").join(&h))
        );
        for team in ["", "..", "a/b", "t.x"] {
            assert_eq!(upload_path(root, team, &h), None, "{team:?}");
        }
        for hash in ["", "../x", &"a".repeat(63), &"g".repeat(64)] {
            assert_eq!(upload_path(root, "t", hash), None, "{hash:?}");
        }
    }
}
