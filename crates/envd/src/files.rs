//! `GET /files` and `POST /files` (CONTRACT 3.5) and v1 URL signatures (3.6).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use arca_proto::connect::{Code, ConnectError};
use axum::body::Body;
use axum::extract::{Query, Request, State as AxState};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;

use crate::fsys::{METADATA_XATTR_PREFIX, make_dirs};
use crate::users::{ActAs, User};
use crate::{State, paths, sys};

/// Longest metadata key, in bytes.
const METADATA_KEY_MAX: usize = 246;
/// Largest total of one file's metadata, in bytes.
const METADATA_TOTAL_MAX: usize = 4096;
/// Size of the chunks a download is streamed in.
const DOWNLOAD_CHUNK: usize = 256 * 1024;

/// Query of both `/files` routes.
#[derive(Debug, Deserialize, Default)]
pub(crate) struct FilesQuery {
    path: Option<String>,
    username: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<i64>,
}

/// An HTTP error in the `{"code": <int>, "message": ...}` shape.
pub(crate) fn http_error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({"code": status.as_u16(), "message": message.into()});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A failed `/files` request: its status and a message for the user.
#[derive(Debug)]
pub(crate) struct FileError {
    status: StatusCode,
    message: String,
}

impl FileError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        FileError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for FileError {
    fn into_response(self) -> Response {
        http_error(self.status, self.message)
    }
}

fn connect_to_http(err: &ConnectError) -> FileError {
    let status = match err.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
        Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists => {
            StatusCode::BAD_REQUEST
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    FileError::new(status, err.message())
}

/// Checks access to `/files`: the access token header when sent, else a
/// valid signature, once a token is set.
fn authorize(
    state: &State,
    headers: &HeaderMap,
    q: &FilesQuery,
    operation: &str,
    now: i64,
) -> Result<(), FileError> {
    let Some(token) = state.init_state().access_token else {
        return Ok(());
    };
    if let Some(sent) = headers.get("x-access-token") {
        return if crate::http::token_matches(sent.as_bytes(), &token) {
            Ok(())
        } else {
            Err(FileError::new(
                StatusCode::UNAUTHORIZED,
                "invalid access token",
            ))
        };
    }
    let Some(sig) = &q.signature else {
        return Err(FileError::new(
            StatusCode::UNAUTHORIZED,
            "missing access token: send X-Access-Token or use a signed URL",
        ));
    };
    let expiration = q.signature_expiration.map(|e| e.to_string());
    let expected = arca_proto::files::signature(
        q.path.as_deref().unwrap_or(""),
        operation,
        q.username.as_deref().unwrap_or(""),
        &token,
        expiration.as_deref(),
    );
    if !crate::http::token_matches(sig.as_bytes(), &expected) {
        return Err(FileError::new(
            StatusCode::UNAUTHORIZED,
            "invalid signature",
        ));
    }
    if q.signature_expiration.is_some_and(|exp| exp < now) {
        return Err(FileError::new(
            StatusCode::UNAUTHORIZED,
            "signature has expired",
        ));
    }
    Ok(())
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

fn caller(state: &State, q: &FilesQuery) -> Result<User, FileError> {
    let name = match q.username.as_deref() {
        Some(u) if !u.is_empty() => u.to_string(),
        _ => state.init_state().default_user,
    };
    state
        .user(&name)
        .map_err(|e| FileError::new(StatusCode::UNAUTHORIZED, e.message()))
}

fn resolve(state: &State, user: &User, path: &str) -> Result<PathBuf, FileError> {
    paths::resolve(path, user, state.default_workdir().as_deref())
        .map_err(|e| FileError::new(StatusCode::BAD_REQUEST, e.message()))
}

fn accepts_gzip(headers: &HeaderMap) -> Result<bool, FileError> {
    let Some(v) = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(false);
    };
    let mut gzip = false;
    let mut identity_refused = false;
    for part in v.split(',') {
        let mut it = part.trim().split(';');
        let coding = it.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = it
            .find_map(|p| p.trim().strip_prefix("q="))
            .and_then(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match coding.as_str() {
            "gzip" | "*" if q > 0.0 => gzip = true,
            "identity" if q <= 0.0 => identity_refused = true,
            _ => {}
        }
    }
    if identity_refused && !gzip {
        return Err(FileError::new(
            StatusCode::NOT_ACCEPTABLE,
            "no acceptable content encoding; accept identity or gzip",
        ));
    }
    Ok(gzip)
}

/// A single `bytes=a-b` range, clamped to `len`.
fn parse_range(headers: &HeaderMap, len: u64) -> Option<Result<(u64, u64), ()>> {
    let v = headers.get(header::RANGE)?.to_str().ok()?;
    let spec = v.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None; // several ranges: serve the whole file
    }
    let (a, b) = spec.split_once('-')?;
    let range = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            if n == 0 || len == 0 {
                return Some(Err(()));
            }
            (len.saturating_sub(n), len - 1)
        }
        (start, end) => {
            let s: u64 = start.parse().ok()?;
            let e: u64 = if end.is_empty() {
                len.saturating_sub(1)
            } else {
                end.parse().ok()?
            };
            if s >= len || e < s {
                return Some(Err(()));
            }
            (s, e.min(len - 1))
        }
    };
    Some(Ok(range))
}

/// `GET /files`.
pub(crate) async fn download(
    AxState(state): AxState<Arc<State>>,
    Query(q): Query<FilesQuery>,
    headers: HeaderMap,
) -> Result<Response, FileError> {
    authorize(&state, &headers, &q, "read", now_unix())?;
    let user = caller(&state, &q)?;
    let path = resolve(&state, &user, q.path.as_deref().unwrap_or(""))?;
    let gzip = accepts_gzip(&headers)?;
    let io =
        |e: std::io::Error, what: &str| connect_to_http(&crate::error::io_error(&e, what, &path));
    // Opened as the user, so a download reads only what the user may read.
    let (u, p) = (user.clone(), path.clone());
    let std_file = tokio::task::spawn_blocking(move || {
        let _as = ActAs::user(&u);
        std::fs::File::open(&p)
    })
    .await
    .map_err(|e| FileError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| io(e, "open"))?;
    let file = tokio::fs::File::from_std(std_file.try_clone().map_err(|e| io(e, "open"))?);
    let meta = file.metadata().await.map_err(|e| io(e, "stat"))?;
    if meta.is_dir() {
        return Err(FileError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{} is a directory; list it with files.list instead",
                path.display()
            ),
        ));
    }
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let len = meta.len();
    let etag = format!(
        "\"{:x}-{:x}-{:x}\"",
        meta.ino(),
        len,
        meta.mtime_nsec() ^ meta.mtime()
    );
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let mut builder = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ETAG, &etag)
        .header(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_str(&format!("inline; filename=\"{}\"", name.replace('"', "")))
                .unwrap_or_else(|_| HeaderValue::from_static("inline")),
        );
    let internal =
        |e: http::Error| FileError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    if gzip {
        // Compressed as it is sent, in a blocking thread: a large file is
        // never held in memory (envd is PID 1 and shares the sandbox's limit).
        let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
        let mut f = std_file;
        tokio::task::spawn_blocking(move || {
            let sink = ChunkSender {
                tx: tx.clone(),
                buf: Vec::with_capacity(DOWNLOAD_CHUNK),
            };
            let mut enc = flate2::write::GzEncoder::new(sink, flate2::Compression::fast());
            let result = std::io::copy(&mut f, &mut enc)
                .and_then(|_| enc.finish())
                .and_then(|mut sink| sink.send());
            if let Err(e) = result {
                // The body ends with an error: the client sees a broken
                // transfer, not a short file.
                let _ = tx.blocking_send(Err(e));
            }
        });
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        return builder
            .header(header::CONTENT_ENCODING, "gzip")
            .body(Body::from_stream(stream))
            .map_err(internal);
    }
    builder = builder.header(header::ACCEPT_RANGES, "bytes");
    let (status, start, count) = match parse_range(&headers, len) {
        None => (StatusCode::OK, 0, len),
        Some(Ok((s, e))) => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {s}-{e}/{len}"));
            (StatusCode::PARTIAL_CONTENT, s, e - s + 1)
        }
        Some(Err(())) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response());
        }
    };
    let body = file_body(file, start, count)
        .await
        .map_err(|e| io(e, "read"))?;
    builder
        .status(status)
        .header(header::CONTENT_LENGTH, count)
        .body(body)
        .map_err(internal)
}

/// A `Write` that hands what is written to an async body in chunks.
struct ChunkSender {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChunkSender {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

impl std::io::Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= DOWNLOAD_CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

async fn file_body(mut file: tokio::fs::File, start: u64, count: u64) -> std::io::Result<Body> {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start)).await?;
    }
    let stream = futures_util::stream::unfold((file, count), |(mut file, left)| async move {
        if left == 0 {
            return None;
        }
        let want = usize::try_from(left.min(DOWNLOAD_CHUNK as u64)).unwrap_or(DOWNLOAD_CHUNK);
        let mut buf = vec![0u8; want];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((
                    Ok::<_, std::io::Error>(Bytes::from(buf)),
                    (file, left - n as u64),
                ))
            }
            Err(e) => Some((Err(e), (file, 0))),
        }
    });
    Ok(Body::from_stream(stream))
}

/// Validated `X-Metadata-*` headers.
fn metadata(headers: &HeaderMap) -> Result<BTreeMap<String, String>, FileError> {
    let mut out = BTreeMap::new();
    let mut total = 0;
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix("x-metadata-") else {
            continue;
        };
        let value = value
            .to_str()
            .ok()
            .filter(|v| v.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .ok_or_else(|| {
                FileError::new(
                    StatusCode::BAD_REQUEST,
                    format!("metadata '{key}': value must be printable ASCII"),
                )
            })?;
        if key.is_empty() || key.len() > METADATA_KEY_MAX {
            return Err(FileError::new(
                StatusCode::BAD_REQUEST,
                format!("metadata key must be 1 to {METADATA_KEY_MAX} bytes"),
            ));
        }
        total += key.len() + value.len();
        out.insert(key.to_string(), value.to_string());
    }
    if total > METADATA_TOTAL_MAX {
        return Err(FileError::new(
            StatusCode::BAD_REQUEST,
            format!("metadata of a file may total at most {METADATA_TOTAL_MAX} bytes"),
        ));
    }
    Ok(out)
}

/// An upload in progress: the file is open, owned by the user, and truncated.
struct Upload {
    path: PathBuf,
    file: std::fs::File,
}

impl Upload {
    /// Opens `path` for writing as the CONTRACT describes: parents made,
    /// new files created 0666 (0644 after umask) then chowned, existing
    /// files chowned before being truncated.
    fn open(path: PathBuf, user: &User, acting: bool) -> Result<Upload, FileError> {
        let err = |e: std::io::Error, what: &str| {
            connect_to_http(&crate::error::io_error(&e, what, &path))
        };
        if std::fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
            return Err(FileError::new(
                StatusCode::BAD_REQUEST,
                format!("{} is a directory; give the path of a file", path.display()),
            ));
        }
        if let Some(parent) = path.parent() {
            make_dirs(parent, user).map_err(|e| connect_to_http(&e))?;
        }
        let exists = std::fs::symlink_metadata(&path).is_ok();
        if exists {
            // Acting as a user, a file someone else owns keeps its owner
            // (the write itself is still checked as the user).
            let owned = std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid));
            if let Err(e) = owned {
                if !(acting && e.raw_os_error() == Some(nix::libc::EPERM)) {
                    return Err(err(e, "chown"));
                }
            }
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o666)
            .open(&path)
            .map_err(|e| err(e, "open"))?;
        if !exists {
            std::os::unix::fs::fchown(&file, Some(user.uid), Some(user.gid))
                .map_err(|e| err(e, "chown"))?;
        }
        Ok(Upload { path, file })
    }

    fn write(&mut self, data: &[u8]) -> Result<(), FileError> {
        self.file
            .write_all(data)
            .map_err(|e| connect_to_http(&crate::error::io_error(&e, "write", &self.path)))
    }

    /// Replaces the file's metadata xattrs; untouched when there is none
    /// either side, so plain uploads raise no extra CHMOD event.
    fn finish(self, meta: &BTreeMap<String, String>) -> Result<serde_json::Value, FileError> {
        drop(self.file);
        let path = &self.path;
        let existing: Vec<String> = sys::list_xattrs(path)
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.starts_with(METADATA_XATTR_PREFIX))
            .collect();
        for name in existing {
            if !meta.contains_key(&name[METADATA_XATTR_PREFIX.len()..]) {
                let _ = sys::remove_xattr(path, &name);
            }
        }
        for (k, v) in meta {
            sys::set_xattr(path, &format!("{METADATA_XATTR_PREFIX}{k}"), v.as_bytes()).map_err(
                |e| {
                    FileError::new(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "cannot store metadata on {}: {e} (the file system needs user xattrs)",
                            path.display()
                        ),
                    )
                },
            )?;
        }
        let mut entry = serde_json::json!({
            "path": path.display().to_string(),
            "name": path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            "type": "file",
        });
        if !meta.is_empty() {
            entry["metadata"] = serde_json::to_value(meta).unwrap_or_default();
        }
        Ok(entry)
    }
}

/// Writes one streamed body into a file, on a blocking thread.
async fn write_stream<S, E>(
    path: PathBuf,
    user: User,
    gzip: bool,
    meta: BTreeMap<String, String>,
    mut stream: S,
) -> Result<serde_json::Value, FileError>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let writer = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, FileError> {
        // Checked as the user: envd is root and must not write where the
        // user could not (through symlinks or otherwise).
        let identity = ActAs::user(&user);
        let mut up = Upload::open(path, &user, identity.is_active())?;
        if gzip {
            let mut dec = flate2::write::GzDecoder::new(Vec::new());
            while let Some(chunk) = rx.blocking_recv() {
                dec.write_all(&chunk).map_err(|e| {
                    FileError::new(StatusCode::BAD_REQUEST, format!("bad gzip body: {e}"))
                })?;
                let out = std::mem::take(dec.get_mut());
                up.write(&out)?;
            }
            let rest = dec.finish().map_err(|e| {
                FileError::new(StatusCode::BAD_REQUEST, format!("bad gzip body: {e}"))
            })?;
            up.write(&rest)?;
        } else {
            while let Some(chunk) = rx.blocking_recv() {
                up.write(&chunk)?;
            }
        }
        up.finish(&meta)
    });
    let mut failed = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                if tx.send(c).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            Err(e) => {
                failed = Some(FileError::new(
                    StatusCode::BAD_REQUEST,
                    format!("reading the upload: {e}"),
                ));
                break;
            }
        }
    }
    drop(tx);
    let result = writer
        .await
        .map_err(|e| FileError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match failed {
        Some(r) => Err(r),
        None => result,
    }
}

/// Request bytes read and thrown away after an upload failed, so the
/// client gets the error instead of a reset while it is still sending.
const DRAIN_LIMIT: usize = 8 << 20;
/// How long draining may take.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

type BodyChunk = Result<Bytes, axum::Error>;

/// A request body read by a task of its own: the handler consumes it as a
/// stream, and whatever the handler leaves unread is drained (up to
/// [`DRAIN_LIMIT`]) before the response goes out.
struct DrainingBody {
    rx: Option<tokio::sync::mpsc::Receiver<BodyChunk>>,
    pump: tokio::task::JoinHandle<()>,
}

impl DrainingBody {
    fn new(body: Body) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel::<BodyChunk>(16);
        let pump = tokio::spawn(async move {
            let mut stream = body.into_data_stream();
            let mut tx = Some(tx);
            let mut discarded = 0usize;
            while let Some(chunk) = stream.next().await {
                if let Some(t) = &tx {
                    if t.send(chunk).await.is_ok() {
                        continue;
                    }
                    tx = None;
                    continue;
                }
                discarded += chunk.as_ref().map_or(0, Bytes::len);
                if discarded > DRAIN_LIMIT {
                    return;
                }
            }
        });
        DrainingBody { rx: Some(rx), pump }
    }

    /// The body as a stream; can be taken once.
    fn stream(&mut self) -> impl futures_util::Stream<Item = BodyChunk> + Send + Unpin + 'static {
        let mut rx = self.rx.take();
        futures_util::stream::poll_fn(move |cx| match rx.as_mut() {
            Some(r) => r.poll_recv(cx),
            None => std::task::Poll::Ready(None),
        })
    }

    /// Waits until the rest of the body was read (or the limits hit).
    async fn finish(mut self) {
        drop(self.rx.take());
        if tokio::time::timeout(DRAIN_TIMEOUT, &mut self.pump)
            .await
            .is_err()
        {
            self.pump.abort();
        }
    }
}

/// `POST /files`.
pub(crate) async fn upload(
    AxState(state): AxState<Arc<State>>,
    Query(q): Query<FilesQuery>,
    req: Request,
) -> Result<Response, FileError> {
    let (parts, body) = req.into_parts();
    let mut body = DrainingBody::new(body);
    let result = upload_files(&state, &q, &parts.headers, &mut body).await;
    body.finish().await;
    result
}

async fn upload_files(
    state: &State,
    q: &FilesQuery,
    headers: &HeaderMap,
    body: &mut DrainingBody,
) -> Result<Response, FileError> {
    let headers = headers.clone();
    authorize(state, &headers, q, "write", now_unix())?;
    let user = caller(state, q)?;
    let meta = metadata(&headers)?;
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
    let media = ctype
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let results = if media == "multipart/form-data" {
        let boundary = multer::parse_boundary(&ctype).map_err(|_| {
            FileError::new(StatusCode::BAD_REQUEST, "multipart body without a boundary")
        })?;
        let mut mp = multer::Multipart::new(body.stream(), boundary);
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        while let Some(field) = mp.next_field().await.map_err(|e| {
            FileError::new(StatusCode::BAD_REQUEST, format!("bad multipart body: {e}"))
        })? {
            if field.name() != Some("file") {
                continue;
            }
            let target = match q.path.as_deref().filter(|p| !p.is_empty()) {
                Some(p) => p.to_string(),
                None => match field.file_name() {
                    Some(f) if !f.is_empty() => f.to_string(),
                    _ => {
                        return Err(FileError::new(
                            StatusCode::BAD_REQUEST,
                            "a file part has no file name and no path query parameter was given",
                        ));
                    }
                },
            };
            let path = resolve(state, &user, &target)?;
            if !seen.insert(path.clone()) {
                return Err(FileError::new(
                    StatusCode::BAD_REQUEST,
                    format!("{} is uploaded twice in one request", path.display()),
                ));
            }
            out.push(write_stream(path, user.clone(), false, meta.clone(), field).await?);
        }
        out
    } else if media == "application/octet-stream" {
        let target = q.path.as_deref().filter(|p| !p.is_empty()).ok_or_else(|| {
            FileError::new(
                StatusCode::BAD_REQUEST,
                "a raw upload needs the path query parameter",
            )
        })?;
        let path = resolve(state, &user, target)?;
        vec![write_stream(path, user, gzip, meta, body.stream()).await?]
    } else {
        return Err(FileError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "unsupported content type '{ctype}'; use multipart/form-data or application/octet-stream"
            ),
        ));
    };
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::Value::Array(results).to_string(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_parsed_and_clamped() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_range(&h, 10), None);
        h.insert(header::RANGE, "bytes=2-4".parse().unwrap());
        assert_eq!(parse_range(&h, 10), Some(Ok((2, 4))));
        h.insert(header::RANGE, "bytes=5-".parse().unwrap());
        assert_eq!(parse_range(&h, 10), Some(Ok((5, 9))));
        h.insert(header::RANGE, "bytes=-3".parse().unwrap());
        assert_eq!(parse_range(&h, 10), Some(Ok((7, 9))));
        h.insert(header::RANGE, "bytes=20-".parse().unwrap());
        assert_eq!(parse_range(&h, 10), Some(Err(())));
    }

    #[test]
    fn metadata_headers_are_validated() {
        let mut h = HeaderMap::new();
        h.insert("x-metadata-Owner", "me".parse().unwrap());
        assert_eq!(
            metadata(&h).unwrap().get("owner").map(String::as_str),
            Some("me")
        );
        h.insert("x-metadata-big", "x".repeat(5000).parse().unwrap());
        assert!(metadata(&h).is_err());
    }
}
