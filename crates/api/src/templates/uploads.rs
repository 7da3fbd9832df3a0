//! COPY archives: the upload link (`GET /templates/{id}/files/{hash}`) and
//! the upload itself (`PUT /uploads/{id}/{hash}?token=`).
//!
//! Archives are kept as `<uploads_dir>/<hash>`, where builders read them.
//! The SDK `PUT`s the archive to the link without an API key, so the link
//! carries a random token (only its SHA-256 is stored) that is valid for
//! [`UPLOAD_LINK_TTL`]. A body is streamed to a temporary file in the same
//! directory, checked against `Content-Length` and renamed into place, so a
//! reader never sees half an archive.
//!
//! The directory is shared by every team and an archive's hash is the
//! SDK's hash of the copied files, not of the archive: a team therefore
//! gets `present: true` only for archives it uploaded itself, never for
//! one another team put under the same hash.

use std::path::{Path as FsPath, PathBuf};

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use chrono::TimeDelta;
use http::{StatusCode, header};
use http_body_util::BodyExt as _;
use tokio::io::AsyncWriteExt as _;

use crate::Api;
use crate::db::templates::UploadRow;
use crate::error::ApiError;
use crate::http::{QueryParams, Team};
use crate::ids;
use crate::templates::builds::valid_hash;
use crate::templates::models::FileUpload;
use crate::templates::{now, own_template};

/// How long an upload link works.
pub(crate) const UPLOAD_LINK_TTL: TimeDelta = TimeDelta::hours(1);
/// Random bytes in an upload token.
const TOKEN_BYTES: usize = 32;

fn checked_hash(hash: &str) -> Result<String, ApiError> {
    if valid_hash(hash) {
        Ok(hash.to_ascii_lowercase())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid files hash '{hash}': expected 64 hex characters"
        )))
    }
}

/// `GET /templates/{templateID}/files/{hash}` (201): whether the archive is
/// there, else where to `PUT` it.
pub(crate) async fn file_upload_link(
    State(api): State<Api>,
    Team(team): Team,
    Path((template, hash)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let t = own_template(&api, &team, &template).await?;
    let hash = checked_hash(&hash)?;
    let path = api.config().uploads_dir.join(&hash);
    let on_disk = tokio::fs::try_exists(&path).await.unwrap_or(false);
    if on_disk && api.db().team_uploaded(&team, &hash).await? {
        let body = FileUpload {
            present: true,
            url: None,
        };
        return Ok((StatusCode::CREATED, Json(body)).into_response());
    }
    let token = ids::random_hex(TOKEN_BYTES);
    let now = now();
    api.db()
        .insert_upload(
            &ids::sha256_hex(token.as_bytes()),
            &UploadRow {
                team_id: team,
                template_id: t.id.clone(),
                files_hash: hash.clone(),
                expires_at: now + UPLOAD_LINK_TTL,
            },
            now,
        )
        .await?;
    let base = api.config().public_url.trim_end_matches('/');
    let body = FileUpload {
        present: false,
        url: Some(format!("{base}/uploads/{}/{hash}?token={token}", t.id)),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Removes a temporary file unless it was renamed into place.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            // Best effort: a leftover temp file only costs disk.
            let _ = std::fs::remove_file(p);
        }
    }
}

fn io_error(what: &str, path: &FsPath, e: &std::io::Error) -> ApiError {
    ApiError::Internal(format!("{what} {}: {e}", path.display()))
}

/// `PUT /uploads/{templateID}/{hash}?token=`: stores an archive (200).
/// Needs no API key: the token is the authorization.
pub(crate) async fn upload(
    State(api): State<Api>,
    Path((template, hash)): Path<(String, String)>,
    q: QueryParams,
    req: Request,
) -> Result<StatusCode, ApiError> {
    let hash = checked_hash(&hash)?;
    let denied = || ApiError::Forbidden("invalid or expired upload link; ask for a new one".into());
    let token = q
        .get("token")
        .filter(|t| !t.is_empty())
        .ok_or_else(denied)?;
    let token_hash = ids::sha256_hex(token.as_bytes());
    let link = api.db().upload(&token_hash).await?.ok_or_else(denied)?;
    if link.template_id != template || link.files_hash != hash || link.expires_at < now() {
        return Err(denied());
    }
    let max = api.config().max_upload_bytes;
    let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return Err(ApiError::LengthRequired(
            "an upload needs a Content-Length header".into(),
        ));
    };
    if len > max {
        return Err(ApiError::PayloadTooLarge(format!(
            "the archive is {len} bytes; this server accepts at most {max}"
        )));
    }
    let dir = api.config().uploads_dir.clone();
    let tmp_path = dir.join(format!(".upload-{}", ids::random_hex(8)));
    let mut file = tokio::fs::File::create(&tmp_path)
        .await
        .map_err(|e| io_error("creating", &tmp_path, &e))?;
    let mut guard = TempFile(Some(tmp_path.clone()));
    let mut body = req.into_body();
    let mut got: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::BadRequest(format!("reading the upload: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        got = got.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
        if got > len {
            return Err(ApiError::BadRequest(format!(
                "the upload is longer than its Content-Length of {len} bytes"
            )));
        }
        file.write_all(&data)
            .await
            .map_err(|e| io_error("writing", &tmp_path, &e))?;
    }
    if got != len {
        return Err(ApiError::BadRequest(format!(
            "the upload ended after {got} of {len} bytes"
        )));
    }
    file.sync_all()
        .await
        .map_err(|e| io_error("syncing", &tmp_path, &e))?;
    drop(file);
    let dest = dir.join(&hash);
    tokio::fs::rename(&tmp_path, &dest)
        .await
        .map_err(|e| io_error("renaming into", &dest, &e))?;
    guard.0 = None;
    api.db().mark_uploaded(&token_hash, now()).await?;
    tracing::info!(template_id = %template, files_hash = %hash, bytes = got, "archive uploaded");
    Ok(StatusCode::OK)
}
