//! The HTTP side of the distribution protocol: one client (TLS with rustls
//! and the `ring` provider, roots from the host's CA store), and a session
//! per repository that handles auth challenges, redirects, size limits and
//! digest checks.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, USER_AGENT, WWW_AUTHENTICATE};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::Credentials;
use super::auth::{Challenge, parse_challenges};
use super::reference::is_insecure;
use crate::ImageError;
use crate::unpack::hex;

/// Connecting (TCP + TLS) must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Response headers must arrive within this after the request is sent.
const HEADERS_TIMEOUT: Duration = Duration::from_secs(60);
/// A body may stall for at most this long between chunks.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Redirects followed per request (registries redirect blobs to storage).
const MAX_REDIRECTS: usize = 5;
/// Largest manifest or index accepted (Docker's limit is 4 MiB).
pub(crate) const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Largest image config accepted.
pub(crate) const MAX_CONFIG_BYTES: usize = 16 << 20;
/// Largest token response or error body read.
const MAX_SMALL_BODY: usize = 1 << 20;
/// `User-Agent` of every request.
const AGENT: &str = concat!("arca/", env!("CARGO_PKG_VERSION"));

/// The rustls config, built once: `ring` provider (explicit, so another
/// crate enabling aws-lc-rs in the same binary changes nothing here), the
/// host's CA certificates as roots.
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                tracing::warn!(
                    errors = ?found.errors,
                    "no CA certificates found: HTTPS registries will fail; install ca-certificates"
                );
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("the ring provider supports rustls' default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// An HTTP(S) client for registries and token servers.
#[derive(Clone)]
pub(crate) struct Http {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl Http {
    pub(crate) fn new() -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls_config()).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Self {
            client: Client::builder(TokioExecutor::new()).build(https),
        }
    }

    /// One GET, no redirects, no auth handling.
    async fn get_once(
        &self,
        uri: &Uri,
        accept: Option<&str>,
        auth: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, ImageError> {
        let mut req = Request::get(uri.clone()).header(USER_AGENT, AGENT);
        if let Some(a) = accept {
            req = req.header(ACCEPT, a);
        }
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a.clone());
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| unreachable_err(uri, e))?;
        match tokio::time::timeout(HEADERS_TIMEOUT, self.client.request(req)).await {
            Err(_) => Err(unreachable_err(
                uri,
                format!("no response within {} s", HEADERS_TIMEOUT.as_secs()),
            )),
            Ok(Err(e)) => Err(unreachable_err(uri, e)),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// A GET following redirects; `auth` is only sent to `uri`'s own host.
    async fn get(
        &self,
        uri: Uri,
        accept: Option<&str>,
        auth: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, ImageError> {
        let origin = uri.authority().cloned();
        let mut uri = uri;
        for _ in 0..=MAX_REDIRECTS {
            let same_host = uri.authority() == origin.as_ref();
            let resp = self
                .get_once(&uri, accept, if same_host { auth } else { None })
                .await?;
            if resp.status().is_redirection() {
                if let Some(location) = resp.headers().get(LOCATION) {
                    uri = resolve_location(&uri, location)
                        .ok_or_else(|| protocol(&uri, "a redirect with an invalid Location"))?;
                    continue;
                }
            }
            return Ok(resp);
        }
        Err(protocol(&uri, "too many redirects"))
    }
}

/// Display name of a URI's host for errors.
fn host_of(uri: &Uri) -> String {
    uri.authority()
        .map_or_else(|| uri.to_string(), |a| a.as_str().to_owned())
}

fn unreachable_err(
    uri: &Uri,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> ImageError {
    ImageError::RegistryUnreachable {
        registry: host_of(uri),
        source: e.into(),
    }
}

fn protocol(uri: &Uri, detail: &str) -> ImageError {
    ImageError::RegistryProtocol {
        registry: host_of(uri),
        detail: format!("{detail} (from {uri})"),
    }
}

/// Resolves a `Location` header against the URI that answered with it.
pub(crate) fn resolve_location(base: &Uri, location: &HeaderValue) -> Option<Uri> {
    let loc = location.to_str().ok()?;
    let scheme = base.scheme_str()?;
    let authority = base.authority()?.as_str();
    let absolute = if loc.starts_with("http://") || loc.starts_with("https://") {
        loc.to_owned()
    } else if let Some(rest) = loc.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if loc.starts_with('/') {
        format!("{scheme}://{authority}{loc}")
    } else {
        let path = base.path();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        format!("{scheme}://{authority}{dir}{loc}")
    };
    absolute.parse().ok()
}

/// Reads a whole body, refusing more than `limit` bytes.
async fn read_body(uri: &Uri, resp: Response<Incoming>, limit: usize) -> Result<Bytes, ImageError> {
    let mut out = Vec::new();
    let mut body = resp.into_body();
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await {
            Err(_) => return Err(unreachable_err(uri, "the response stalled")),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(unreachable_err(uri, e)),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(protocol(
                    uri,
                    &format!("a response larger than {limit} bytes"),
                ));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.into())
}

/// The registry's error message from an error response body, for humans.
async fn error_detail(uri: &Uri, resp: Response<Incoming>) -> String {
    let Ok(body) = read_body(uri, resp, MAX_SMALL_BODY).await else {
        return String::new();
    };
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorItem {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(e) = serde_json::from_slice::<Errors>(&body) {
        return e
            .errors
            .iter()
            .map(|i| format!("{}: {}", i.code, i.message))
            .collect::<Vec<_>>()
            .join("; ");
    }
    String::from_utf8_lossy(&body)
        .chars()
        .take(200)
        .collect::<String>()
        .trim()
        .to_owned()
}

/// `sha256:<hex>` of bytes.
pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// A conversation with one repository of one registry.
pub(crate) struct Session<'a> {
    http: &'a Http,
    /// `scheme://host[:port][/prefix]` the `/v2/` API lives under.
    base: String,
    /// How errors name the registry.
    pub(crate) registry: String,
    repository: String,
    /// How errors name the image.
    reference: String,
    credentials: Option<&'a Credentials>,
    insecure: &'a [String],
    /// The `Authorization` value that worked last (basic or bearer).
    auth: Mutex<Option<HeaderValue>>,
}

impl<'a> Session<'a> {
    pub(crate) fn new(
        http: &'a Http,
        base: String,
        registry: String,
        repository: &str,
        reference: String,
        credentials: Option<&'a Credentials>,
        insecure: &'a [String],
    ) -> Self {
        Self {
            http,
            base,
            registry,
            repository: repository.to_owned(),
            reference,
            credentials,
            insecure,
            auth: Mutex::new(None),
        }
    }

    fn uri(&self, path: &str) -> Result<Uri, ImageError> {
        let url = format!("{}/v2/{}/{path}", self.base, self.repository);
        url.parse().map_err(|_| ImageError::InvalidReference {
            reference: self.reference.clone(),
            reason: format!("it does not make a valid URL ({url})"),
        })
    }

    fn current_auth(&self) -> Option<HeaderValue> {
        self.auth.lock().map_or(None, |a| a.clone())
    }

    fn set_auth(&self, value: HeaderValue) {
        if let Ok(mut a) = self.auth.lock() {
            *a = Some(value);
        }
    }

    /// GET `/v2/<repo>/<path>`, answering one auth challenge if needed.
    async fn get(
        &self,
        path: &str,
        accept: Option<&str>,
    ) -> Result<(Uri, Response<Incoming>), ImageError> {
        let uri = self.uri(path)?;
        let mut answered = false;
        loop {
            let sent = self.current_auth();
            let resp = self.http.get(uri.clone(), accept, sent.as_ref()).await?;
            match resp.status() {
                StatusCode::UNAUTHORIZED if !answered => {
                    let challenges: Vec<Challenge> = resp
                        .headers()
                        .get_all(WWW_AUTHENTICATE)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .flat_map(parse_challenges)
                        .collect();
                    self.answer(&challenges, &uri).await?;
                    answered = true;
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    let status = resp.status();
                    let detail = error_detail(&uri, resp).await;
                    let why = match (status, self.credentials.is_some()) {
                        (StatusCode::FORBIDDEN, _) => "access denied",
                        (_, true) => "the credentials were not accepted",
                        (_, false) => {
                            "authentication required and no credentials were given (or the \
                             repository does not exist)"
                        }
                    };
                    return Err(ImageError::Unauthorized {
                        registry: self.registry.clone(),
                        reference: self.reference.clone(),
                        detail: if detail.is_empty() {
                            why.to_owned()
                        } else {
                            format!("{why} ({detail})")
                        },
                    });
                }
                _ => return Ok((uri, resp)),
            }
        }
    }

    /// Sets `self.auth` from a 401's challenges.
    async fn answer(&self, challenges: &[Challenge], uri: &Uri) -> Result<(), ImageError> {
        let unauthorized = |detail: String| ImageError::Unauthorized {
            registry: self.registry.clone(),
            reference: self.reference.clone(),
            detail,
        };
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let token = self.fetch_token(bearer).await?;
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| protocol(uri, "a token that is not a valid header value"))?;
            self.set_auth(value);
            return Ok(());
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let Some(creds) = self.credentials else {
                return Err(unauthorized(
                    "the registry needs a username and password and none were given".to_owned(),
                ));
            };
            self.set_auth(basic_header(creds));
            return Ok(());
        }
        let schemes: Vec<&str> = challenges.iter().map(|c| c.scheme.as_str()).collect();
        Err(unauthorized(format!(
            "the registry asks for an unsupported authentication scheme ({})",
            if schemes.is_empty() {
                "none named".to_owned()
            } else {
                schemes.join(", ")
            }
        )))
    }

    /// Gets a bearer token from the challenge's realm, with the credentials
    /// (if any) as basic auth.
    async fn fetch_token(&self, challenge: &Challenge) -> Result<String, ImageError> {
        let realm = challenge
            .params
            .get("realm")
            .ok_or_else(|| ImageError::RegistryProtocol {
                registry: self.registry.clone(),
                detail: "a Bearer challenge without a realm".to_owned(),
            })?;
        let scope = challenge
            .params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
        let mut url = realm.clone();
        url.push(if url.contains('?') { '&' } else { '?' });
        if let Some(service) = challenge.params.get("service") {
            url.push_str(&format!(
                "service={}&",
                utf8_percent_encode(service, NON_ALPHANUMERIC)
            ));
        }
        url.push_str(&format!(
            "scope={}",
            utf8_percent_encode(&scope, NON_ALPHANUMERIC)
        ));
        let uri: Uri = url.parse().map_err(|_| ImageError::RegistryProtocol {
            registry: self.registry.clone(),
            detail: format!("a token realm that is not a URL: {realm}"),
        })?;
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") => {
                let host = host_of(&uri);
                if self.credentials.is_some() && !is_insecure(&host, self.insecure) {
                    return Err(ImageError::InsecureCredentials { url: realm.clone() });
                }
            }
            _ => {
                return Err(protocol(
                    &uri,
                    "a token realm that is neither http nor https",
                ));
            }
        }
        let auth = self.credentials.map(basic_header);
        let resp = self.http.get(uri.clone(), None, auth.as_ref()).await?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let detail = error_detail(&uri, resp).await;
            return Err(ImageError::Unauthorized {
                registry: format!("{} (token server {})", self.registry, host_of(&uri)),
                reference: self.reference.clone(),
                detail: match (self.credentials.is_some(), detail.is_empty()) {
                    (true, true) => "the token server rejected the credentials".to_owned(),
                    (true, false) => {
                        format!("the token server rejected the credentials ({detail})")
                    }
                    (false, _) => format!(
                        "the token server requires credentials and none were given{}",
                        if detail.is_empty() {
                            String::new()
                        } else {
                            format!(" ({detail})")
                        }
                    ),
                },
            });
        }
        if status != StatusCode::OK {
            let detail = error_detail(&uri, resp).await;
            return Err(ImageError::RegistryStatus {
                registry: host_of(&uri),
                url: realm.clone(),
                status: status.as_u16(),
                detail,
            });
        }
        let body = read_body(&uri, resp, MAX_SMALL_BODY).await?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            #[serde(default)]
            token: String,
            #[serde(default)]
            access_token: String,
        }
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| protocol(&uri, &format!("a token response that is not JSON: {e}")))?;
        let token = if t.token.is_empty() {
            t.access_token
        } else {
            t.token
        };
        if token.is_empty() {
            return Err(protocol(&uri, "a token response without a token"));
        }
        Ok(token)
    }

    /// Fetches a manifest by tag or digest; returns body, content type and
    /// its digest, checked against `reference` when that is a digest and
    /// against `Docker-Content-Digest` when the registry sends one.
    pub(crate) async fn manifest(
        &self,
        reference: &str,
        accept: &str,
    ) -> Result<(Bytes, Option<String>, String), ImageError> {
        let (uri, resp) = self
            .get(&format!("manifests/{reference}"), Some(accept))
            .await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(ImageError::ManifestUnknown {
                    reference: self.reference.clone(),
                    registry: self.registry.clone(),
                });
            }
            status => {
                let detail = error_detail(&uri, resp).await;
                return Err(ImageError::RegistryStatus {
                    registry: self.registry.clone(),
                    url: uri.to_string(),
                    status: status.as_u16(),
                    detail,
                });
            }
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_body(&uri, resp, MAX_MANIFEST_BYTES).await?;
        let digest = sha256_digest(&body);
        let expected = if reference.starts_with("sha256:") {
            Some(reference.to_owned())
        } else {
            header_digest.filter(|d| d.starts_with("sha256:"))
        };
        if let Some(expected) = expected {
            if expected != digest {
                return Err(ImageError::DigestMismatch {
                    what: format!("manifest {reference} of {}", self.reference),
                    expected,
                    actual: digest,
                });
            }
        }
        Ok((body, content_type, digest))
    }

    pub(crate) async fn blob_response(
        &self,
        digest: &str,
    ) -> Result<(Uri, Response<Incoming>), ImageError> {
        let (uri, resp) = self.get(&format!("blobs/{digest}"), None).await?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let detail = error_detail(&uri, resp).await;
            return Err(ImageError::RegistryStatus {
                registry: self.registry.clone(),
                url: uri.to_string(),
                status: status.as_u16(),
                detail,
            });
        }
        Ok((uri, resp))
    }

    /// A small blob (an image config) in memory, digest-checked.
    pub(crate) async fn blob_bytes(&self, digest: &str, limit: usize) -> Result<Bytes, ImageError> {
        let (uri, resp) = self.blob_response(digest).await?;
        let body = read_body(&uri, resp, limit).await?;
        let actual = sha256_digest(&body);
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                what: format!("blob {digest} of {}", self.reference),
                expected: digest.to_owned(),
                actual,
            });
        }
        Ok(body)
    }

    /// Streams a blob into `dest` (created), hashing as it goes; refuses more
    /// or fewer than `size` bytes and a digest mismatch. `progress` gets the
    /// bytes so far, at most once per MiB and once at the end. Returns false,
    /// having stopped early, if `cancel` became true.
    pub(crate) async fn blob_to_file(
        &self,
        digest: &str,
        size: u64,
        dest: &Path,
        progress: &(dyn Fn(u64) + Send + Sync),
        cancel: &AtomicBool,
    ) -> Result<bool, ImageError> {
        let (uri, resp) = self.blob_response(digest).await?;
        let file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| ImageError::io("create", dest, e))?;
        let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, file);
        let mut hasher = Sha256::new();
        let mut n: u64 = 0;
        let mut reported: u64 = 0;
        let mut body = resp.into_body();
        loop {
            let frame = match tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await {
                Err(_) => return Err(unreachable_err(&uri, "the download stalled")),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(unreachable_err(&uri, e)),
                Ok(Some(Ok(frame))) => frame,
            };
            if cancel.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let Ok(data) = frame.into_data() else {
                continue;
            };
            n += data.len() as u64;
            if n > size {
                return Err(ImageError::RegistryProtocol {
                    registry: self.registry.clone(),
                    detail: format!(
                        "blob {digest} is larger than the {size} bytes its manifest says"
                    ),
                });
            }
            hasher.update(&data);
            out.write_all(&data)
                .await
                .map_err(|e| ImageError::io("write", dest, e))?;
            if n - reported >= 1 << 20 {
                reported = n;
                progress(n);
            }
        }
        out.flush()
            .await
            .map_err(|e| ImageError::io("write", dest, e))?;
        if n != size {
            return Err(ImageError::RegistryProtocol {
                registry: self.registry.clone(),
                detail: format!("blob {digest} has {n} bytes, its manifest says {size}"),
            });
        }
        let actual = format!("sha256:{}", hex(&hasher.finalize()));
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                what: format!("blob {digest} of {}", self.reference),
                expected: digest.to_owned(),
                actual,
            });
        }
        progress(n);
        Ok(true)
    }
}

/// `Basic base64(user:password)`.
fn basic_header(creds: &Credentials) -> HeaderValue {
    let raw = format!("{}:{}", creds.username, creds.password);
    let mut value = HeaderValue::from_str(&format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    ))
    .expect("base64 output is a valid header value");
    value.set_sensitive(true);
    value
}

/// The API base URL for `host_port`: plain HTTP for insecure hosts, HTTPS otherwise.
pub(crate) fn base_url(host_port: &str, insecure: &[String]) -> String {
    let scheme = if is_insecure(host_port, insecure) {
        "http"
    } else {
        "https"
    };
    format!("{scheme}://{host_port}")
}

/// The API base URL for a mirror given as `http(s)://host[:port][/path]` or a
/// bare `host[:port]`.
pub(crate) fn mirror_url(mirror: &str, insecure: &[String]) -> Result<String, ImageError> {
    let invalid = || ImageError::InvalidReference {
        reference: mirror.to_owned(),
        reason: "the registry mirror must be http(s)://host[:port][/path] or host[:port]"
            .to_owned(),
    };
    let (scheme, rest) = if let Some(r) = mirror.strip_prefix("http://") {
        (Some("http"), r)
    } else if let Some(r) = mirror.strip_prefix("https://") {
        (Some("https"), r)
    } else {
        (None, mirror)
    };
    let rest = rest.trim_end_matches('/');
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || rest.contains(['?', '#', '@', ' ']) || rest.contains("://") {
        return Err(invalid());
    }
    let url = match scheme {
        Some(s) => format!("{s}://{rest}"),
        None if is_insecure(host, insecure) => format!("http://{rest}"),
        None => format!("https://{rest}"),
    };
    let uri: Uri = url.parse().map_err(|_| invalid())?;
    if uri.authority().is_none() {
        return Err(invalid());
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_against_the_request() {
        let base: Uri = "http://127.0.0.1:5000/v2/a/b/blobs/sha256:00"
            .parse()
            .unwrap();
        let r = |l: &str| {
            resolve_location(&base, &HeaderValue::from_str(l).unwrap()).map(|u| u.to_string())
        };
        assert_eq!(
            r("https://s3.example/x?sig=1").as_deref(),
            Some("https://s3.example/x?sig=1")
        );
        assert_eq!(
            r("/other/path").as_deref(),
            Some("http://127.0.0.1:5000/other/path")
        );
        assert_eq!(
            r("//cdn.example/y").as_deref(),
            Some("http://cdn.example/y")
        );
        assert_eq!(
            r("rel").as_deref(),
            Some("http://127.0.0.1:5000/v2/a/b/blobs/rel")
        );
    }

    #[test]
    fn endpoints_pick_the_scheme() {
        let none: Vec<String> = Vec::new();
        assert_eq!(base_url("127.0.0.1:5000", &none), "http://127.0.0.1:5000");
        assert_eq!(
            base_url("registry-1.docker.io", &none),
            "https://registry-1.docker.io"
        );
        assert_eq!(
            base_url("reg.lan", &["reg.lan".to_owned()]),
            "http://reg.lan"
        );
        assert_eq!(
            mirror_url("http://127.0.0.1:5000/", &none).unwrap(),
            "http://127.0.0.1:5000"
        );
        assert_eq!(
            mirror_url("mirror.example.com", &none).unwrap(),
            "https://mirror.example.com"
        );
        assert_eq!(
            mirror_url("localhost:5000", &none).unwrap(),
            "http://localhost:5000"
        );
        assert_eq!(
            mirror_url("https://m.example/prefix/", &none).unwrap(),
            "https://m.example/prefix"
        );
        for bad in [
            "http://",
            "",
            "/x",
            "http://u:p@m.example",
            "m.example?x",
            "ftp://m",
        ] {
            assert!(mirror_url(bad, &none).is_err(), "{bad}");
        }
    }

    #[test]
    fn basic_header_is_base64() {
        let h = basic_header(&Credentials::new("alice", "s3cret:x"));
        assert_eq!(h.to_str().unwrap(), "Basic YWxpY2U6czNjcmV0Ong=");
        assert!(h.is_sensitive());
    }
}
