//! Templates through the REST API (CONTRACT 2.4): create a build, upload
//! its files, start it, follow its status and logs, list and delete.

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde::Deserialize;

use crate::{Client, SdkError, encode, json, parse};

/// A template and build the server made for a build request.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildRef {
    /// Template id.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Build id.
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// Names of the template.
    #[serde(default)]
    pub names: Vec<String>,
}

/// One line of a build's log.
#[derive(Debug, Clone, Deserialize)]
pub struct BuildLogEntry {
    /// When (RFC 3339).
    #[serde(default)]
    pub timestamp: String,
    /// `debug`, `info`, `warn` or `error`.
    #[serde(default)]
    pub level: String,
    /// Step: `base`, `1`..`n`, `finalize`.
    #[serde(default)]
    pub step: Option<String>,
    /// Text.
    #[serde(default)]
    pub message: String,
}

/// Why a build failed.
#[derive(Debug, Clone, Deserialize)]
pub struct BuildReason {
    /// What failed.
    pub message: String,
    /// In which step.
    #[serde(default)]
    pub step: Option<String>,
}

/// A build's state and the log lines after the requested offset.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildStatus {
    /// `building`, `waiting`, `ready` or `error`.
    pub status: String,
    /// New log lines.
    #[serde(default)]
    pub log_entries: Vec<BuildLogEntry>,
    /// Set on `error`.
    #[serde(default)]
    pub reason: Option<BuildReason>,
}

/// A template as listed.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateInfo {
    /// Id.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Current build.
    #[serde(rename = "buildID", default)]
    pub build_id: String,
    /// Names (aliases).
    #[serde(default)]
    pub names: Vec<String>,
    /// Build state of the current build.
    #[serde(default)]
    pub build_status: String,
    /// CPUs.
    #[serde(default)]
    pub cpu_count: u32,
    /// Memory, MiB.
    #[serde(rename = "memoryMB", default)]
    pub memory_mb: u32,
    /// Creation time (RFC 3339).
    #[serde(default)]
    pub created_at: String,
}

#[derive(Deserialize)]
struct UploadLink {
    present: bool,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
}

impl Client {
    /// Starts a build of the template called `name` (made if new):
    /// `POST /v3/templates`.
    pub async fn request_build(
        &self,
        name: &str,
        cpu_count: Option<u32>,
        memory_mb: Option<u32>,
    ) -> Result<TemplateBuildRef, SdkError> {
        let mut body = serde_json::json!({ "name": name });
        if let Some(c) = cpu_count {
            body["cpuCount"] = c.into();
        }
        if let Some(m) = memory_mb {
            body["memoryMB"] = m.into();
        }
        let req = self.rest_request(Method::POST, "/v3/templates", Some(json(&body)?))?;
        let (_, body) = self
            .call(req, &[StatusCode::ACCEPTED, StatusCode::OK])
            .await?;
        parse(&self.api_url, &body)
    }

    /// Uploads `archive` (a tar, optionally gzip-compressed) under `hash`
    /// unless the server has it already; returns whether it was sent.
    pub async fn upload_files(
        &self,
        template_id: &str,
        hash: &str,
        archive: Bytes,
    ) -> Result<bool, SdkError> {
        let req = self.rest_request(
            Method::GET,
            &format!("/templates/{}/files/{}", encode(template_id), encode(hash)),
            None,
        )?;
        let (_, body) = self
            .call(req, &[StatusCode::CREATED, StatusCode::OK])
            .await?;
        let link: UploadLink = parse(&self.api_url, &body)?;
        if link.present {
            return Ok(false);
        }
        let url = link.url.ok_or_else(|| SdkError::Protocol {
            url: self.api_url.clone(),
            message: "the server gave no upload URL for missing files".into(),
        })?;
        let mut b = http::Request::builder()
            .method(Method::PUT)
            .uri(&url)
            .header(http::header::CONTENT_LENGTH, archive.len());
        for (k, v) in &link.headers {
            b = b.header(k, v);
        }
        let req = b
            .body(Full::new(archive))
            .map_err(|e| SdkError::Config(format!("bad upload URL {url}: {e}")))?;
        self.call(
            req,
            &[StatusCode::OK, StatusCode::CREATED, StatusCode::NO_CONTENT],
        )
        .await?;
        Ok(true)
    }

    /// Starts a requested build with a `TemplateBuildStartV2` body (plus
    /// Arca's `dockerfile`, `contextHash` and `buildArgs`).
    pub async fn start_build(
        &self,
        template_id: &str,
        build_id: &str,
        body: &serde_json::Value,
    ) -> Result<(), SdkError> {
        let req = self.rest_request(
            Method::POST,
            &format!(
                "/v2/templates/{}/builds/{}",
                encode(template_id),
                encode(build_id)
            ),
            Some(json(body)?),
        )?;
        self.call(
            req,
            &[StatusCode::ACCEPTED, StatusCode::OK, StatusCode::NO_CONTENT],
        )
        .await?;
        Ok(())
    }

    /// A build's status with the log lines from `logs_offset` on.
    pub async fn build_status(
        &self,
        template_id: &str,
        build_id: &str,
        logs_offset: usize,
    ) -> Result<BuildStatus, SdkError> {
        let req = self.rest_request(
            Method::GET,
            &format!(
                "/templates/{}/builds/{}/status?logsOffset={logs_offset}",
                encode(template_id),
                encode(build_id)
            ),
            None,
        )?;
        let (_, body) = self.call(req, &[StatusCode::OK]).await?;
        parse(&self.api_url, &body)
    }

    /// The team's templates (and public ones).
    pub async fn list_templates(&self) -> Result<Vec<TemplateInfo>, SdkError> {
        let req = self.rest_request(Method::GET, "/templates", None)?;
        let (_, body) = self.call(req, &[StatusCode::OK]).await?;
        parse(&self.api_url, &body)
    }

    /// Deletes a template (by id or name): `true` if it existed.
    pub async fn delete_template(&self, template: &str) -> Result<bool, SdkError> {
        let req = self.rest_request(
            Method::DELETE,
            &format!("/templates/{}", encode(template)),
            None,
        )?;
        match self
            .call(req, &[StatusCode::NO_CONTENT, StatusCode::OK])
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
}
