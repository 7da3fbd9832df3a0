//! `arca-sdk`: a Rust client for Arca (and any E2B-compatible server).
//!
//! - the REST control plane (CONTRACT 2.3): [`Client::create`],
//!   [`Client::list`], [`Client::get`], [`Client::kill`],
//!   [`Client::set_timeout`], [`Client::logs`], [`Client::metrics`], and
//!   Arca's own [`Client::network_logs`] (a sandbox's egress log);
//! - envd inside a sandbox, reached through the proxy with the routing
//!   headers `E2b-Sandbox-Id` / `E2b-Sandbox-Port` (CONTRACT 1.6):
//!   [`Client::run`] (a command through `/bin/bash -l -c`, as the official
//!   SDKs do, streaming its output), [`Client::read_file`],
//!   [`Client::write_file`].
//!
//! Plain `http://` only (recipe A of CONTRACT 1.7), HTTP/1.1.
//!
//! ```no_run
//! # async fn demo() -> Result<(), arca_sdk::SdkError> {
//! use arca_sdk::{Client, Output, RunOptions};
//!
//! let client = Client::from_env()?;
//! let sandbox = client.create("base", Some(60), &Default::default(), &Default::default()).await?;
//! let status = client
//!     .run(&sandbox, "echo hello", &RunOptions::default(), |out| {
//!         if let Output::Stdout(b) = out {
//!             print!("{}", String::from_utf8_lossy(b));
//!         }
//!         Ok(())
//!     })
//!     .await?;
//! assert_eq!(status.exit_code, 0);
//! client.kill(&sandbox.id).await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod envd;
mod error;
mod models;
mod templates;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

pub use crate::envd::{ExitStatus, Output, RunOptions};
pub use crate::error::SdkError;
pub use crate::models::{LogEntry, LogLine, Metric, Sandbox, SandboxInfo, SandboxLogs, WriteInfo};
pub use crate::templates::{
    BuildLogEntry, BuildReason, BuildStatus, TemplateBuildRef, TemplateInfo,
};
pub use arca_proto::network::{EgressLogEntry, Verdict};

/// Default control-plane URL (`arca up`'s API).
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:3000";
/// Default sandbox URL (`arca up`'s proxy).
pub const DEFAULT_SANDBOX_URL: &str = "http://127.0.0.1:3001";
/// Default `$ARCA_HOME`, where `arca up` writes the first API key.
pub const DEFAULT_ARCA_HOME: &str = "/var/lib/arca";
/// envd's port inside every sandbox.
pub const ENVD_PORT: u16 = 49983;
/// Default timeout of REST calls and file transfers.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Page size of list calls (the API's maximum).
const LIST_PAGE: u32 = 100;
/// The `User-Agent` sent on every request.
const USER_AGENT: &str = concat!("arca-sdk/", env!("CARGO_PKG_VERSION"));

/// Characters left alone in query values and path segments (RFC 3986 unreserved).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a query value or path segment.
pub(crate) fn encode(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// A client of one Arca (or E2B-compatible) deployment. Cheap to clone:
/// clones share the connection pool.
#[derive(Clone)]
pub struct Client {
    api_url: String,
    api_key: String,
    sandbox_url: String,
    request_timeout: Duration,
    http: HttpClient,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Client")
            .field("api_url", &self.api_url)
            .field("sandbox_url", &self.sandbox_url)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the API at `api_url` with `api_key`, reaching sandboxes
    /// through the proxy at `sandbox_url` (E2B_SANDBOX_URL). URLs are
    /// `http://host:port` with an optional path prefix.
    pub fn new(
        api_url: impl Into<String>,
        api_key: impl Into<String>,
        sandbox_url: impl Into<String>,
    ) -> Client {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Client {
            api_url: trim_base(api_url.into()),
            api_key: api_key.into(),
            sandbox_url: trim_base(sandbox_url.into()),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            http,
        }
    }

    /// A client configured like the E2B SDKs: `E2B_API_URL`, `E2B_API_KEY`,
    /// `E2B_SANDBOX_URL`; without them `arca up`'s defaults
    /// ([`DEFAULT_API_URL`], [`DEFAULT_SANDBOX_URL`]) and the key it saved in
    /// `$ARCA_HOME/api_key` (see [`Client::resolve`]).
    pub fn from_env() -> Result<Client, SdkError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = var("ARCA_HOME").map(PathBuf::from);
        Client::resolve(
            var("E2B_API_URL").as_deref(),
            var("E2B_API_KEY").as_deref(),
            var("E2B_SANDBOX_URL").as_deref(),
            home.as_deref(),
        )
    }

    /// A client from explicit settings where given, defaults elsewhere: the
    /// key falls back to the first line of `<home>/api_key` (`home` default
    /// [`DEFAULT_ARCA_HOME`]), which `arca up` writes on its first start.
    pub fn resolve(
        api_url: Option<&str>,
        api_key: Option<&str>,
        sandbox_url: Option<&str>,
        home: Option<&Path>,
    ) -> Result<Client, SdkError> {
        let key = match api_key {
            Some(k) => k.trim().to_string(),
            None => {
                let home = home.unwrap_or(Path::new(DEFAULT_ARCA_HOME));
                read_key_file(home)?
            }
        };
        Ok(Client::new(
            api_url.unwrap_or(DEFAULT_API_URL),
            key,
            sandbox_url.unwrap_or(DEFAULT_SANDBOX_URL),
        ))
    }

    /// The same client with another timeout for REST calls and file
    /// transfers (commands have their own, [`RunOptions::timeout`]).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Client {
        self.request_timeout = timeout;
        self
    }

    /// The control-plane URL.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// The sandbox (proxy) URL.
    pub fn sandbox_url(&self) -> &str {
        &self.sandbox_url
    }

    // ---- REST --------------------------------------------------------------

    /// Creates a sandbox from `template` (id or alias) living `timeout_secs`
    /// (the server's default, 300 s, when `None`), with user `metadata` and
    /// environment variables `envs` for every process in it.
    pub async fn create(
        &self,
        template: &str,
        timeout_secs: Option<u64>,
        metadata: &BTreeMap<String, String>,
        envs: &BTreeMap<String, String>,
    ) -> Result<Sandbox, SdkError> {
        let body = models::NewSandbox {
            template_id: template,
            timeout: timeout_secs,
            metadata,
            env_vars: envs,
        };
        let req = self.rest_request(Method::POST, "/v2/sandboxes", Some(json(&body)?))?;
        let (_, body) = self
            .call(req, &[StatusCode::CREATED, StatusCode::OK])
            .await?;
        parse(&self.api_url, &body)
    }

    /// Every running and paused sandbox of the key's team, newest first.
    pub async fn list(&self) -> Result<Vec<SandboxInfo>, SdkError> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!("/v2/sandboxes?limit={LIST_PAGE}");
            if let Some(t) = &token {
                path.push_str("&nextToken=");
                path.push_str(&encode(t));
            }
            let req = self.rest_request(Method::GET, &path, None)?;
            let (resp, body) = self.call(req, &[StatusCode::OK]).await?;
            let page: Vec<SandboxInfo> = parse(&self.api_url, &body)?;
            let next = resp
                .headers()
                .get("x-next-token")
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_owned);
            let empty = page.is_empty();
            all.extend(page);
            match next {
                Some(t) if !empty && token.as_deref() != Some(t.as_str()) => token = Some(t),
                _ => return Ok(all),
            }
        }
    }

    /// One sandbox, with its envd access token.
    pub async fn get(&self, id: &str) -> Result<SandboxInfo, SdkError> {
        let req = self.rest_request(Method::GET, &format!("/sandboxes/{}", encode(id)), None)?;
        let (_, body) = self.call(req, &[StatusCode::OK]).await?;
        parse(&self.api_url, &body)
    }

    /// Kills a sandbox: `true` when it was killed, `false` when there was no
    /// such sandbox (404), as the E2B SDKs do.
    pub async fn kill(&self, id: &str) -> Result<bool, SdkError> {
        let req = self.rest_request(Method::DELETE, &format!("/sandboxes/{}", encode(id)), None)?;
        match self
            .call(req, &[StatusCode::NO_CONTENT, StatusCode::OK])
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes a sandbox end `secs` from now (0: now).
    pub async fn set_timeout(&self, id: &str, secs: u64) -> Result<(), SdkError> {
        let req = self.rest_request(
            Method::POST,
            &format!("/sandboxes/{}/timeout", encode(id)),
            Some(serde_json::json!({ "timeout": secs }).to_string().into()),
        )?;
        self.call(req, &[StatusCode::NO_CONTENT, StatusCode::OK])
            .await?;
        Ok(())
    }

    /// A sandbox's logs.
    pub async fn logs(&self, id: &str) -> Result<SandboxLogs, SdkError> {
        let req = self.rest_request(
            Method::GET,
            &format!("/sandboxes/{}/logs", encode(id)),
            None,
        )?;
        let (_, body) = self.call(req, &[StatusCode::OK]).await?;
        parse(&self.api_url, &body)
    }

    /// A sandbox's resource samples (may be empty right after start).
    pub async fn metrics(&self, id: &str) -> Result<Vec<Metric>, SdkError> {
        let req = self.rest_request(
            Method::GET,
            &format!("/sandboxes/{}/metrics", encode(id)),
            None,
        )?;
        let (_, body) = self.call(req, &[StatusCode::OK]).await?;
        parse(&self.api_url, &body)
    }

    /// A sandbox's egress log (Arca's own
    /// `GET /sandboxes/{id}/network/logs`, ADR 0005): oldest first, from
    /// `start` on (inclusive, sent with nanosecond precision), at most
    /// `limit` entries (the server's default, 1000, when `None`; it allows
    /// at most 2000).
    pub async fn network_logs(
        &self,
        id: &str,
        start: Option<DateTime<Utc>>,
        limit: Option<usize>,
    ) -> Result<Vec<EgressLogEntry>, SdkError> {
        let mut query = Vec::new();
        if let Some(l) = limit {
            query.push(format!("limit={l}"));
        }
        if let Some(s) = start {
            query.push(format!(
                "start={}",
                encode(&s.to_rfc3339_opts(SecondsFormat::Nanos, true))
            ));
        }
        let mut path = format!("/sandboxes/{}/network/logs", encode(id));
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query.join("&"));
        }
        let req = self.rest_request(Method::GET, &path, None)?;
        let (_, body) = self.call(req, &[StatusCode::OK]).await?;
        let logs: models::NetworkLogs = parse(&self.api_url, &body)?;
        Ok(logs.entries)
    }

    // ---- plumbing ----------------------------------------------------------

    /// A control-plane request: `path` (with its query) under the API URL,
    /// the key in `X-API-Key`, a JSON body if any.
    pub(crate) fn rest_request(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Request<Full<Bytes>>, SdkError> {
        let url = format!("{}{path}", self.api_url);
        check_http(&url)?;
        if self.api_key.is_empty() {
            return Err(SdkError::Config(
                "no API key: set E2B_API_KEY (the key `arca up` printed, or one from `arca keys create`)".into(),
            ));
        }
        let mut b = Request::builder()
            .method(method)
            .uri(&url)
            .header("X-API-Key", &self.api_key)
            .header(header::USER_AGENT, USER_AGENT)
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        b.body(Full::new(body.unwrap_or_default()))
            .map_err(|e| SdkError::Config(format!("bad request URL {url}: {e}")))
    }

    /// Sends a request and returns the response head, with the error
    /// mapping and no timeout (callers wrap it).
    pub(crate) async fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, SdkError> {
        let url = req.uri().to_string();
        self.http
            .request(req)
            .await
            .map_err(|e| SdkError::Transport {
                url,
                message: chain(&e),
            })
    }

    /// Sends a request within the request timeout and reads the whole body;
    /// a status not in `ok` becomes [`SdkError::Status`].
    pub(crate) async fn call(
        &self,
        req: Request<Full<Bytes>>,
        ok: &[StatusCode],
    ) -> Result<(Response<()>, Bytes), SdkError> {
        let url = req.uri().to_string();
        let work = async {
            let resp = self.send(req).await?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| SdkError::Transport {
                    url: url.clone(),
                    message: chain(&e),
                })?
                .to_bytes();
            Ok::<_, SdkError>((Response::from_parts(parts, ()), body))
        };
        let (resp, body) = tokio::time::timeout(self.request_timeout, work)
            .await
            .map_err(|_| SdkError::Timeout {
                url: url.clone(),
                secs: self.request_timeout.as_secs(),
            })??;
        if !ok.contains(&resp.status()) {
            return Err(SdkError::from_body(resp.status().as_u16(), &body));
        }
        Ok((resp, body))
    }
}

/// The first line of `<home>/api_key`.
fn read_key_file(home: &Path) -> Result<String, SdkError> {
    let path = home.join("api_key");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        SdkError::Config(format!(
            "no API key: E2B_API_KEY is not set and {} could not be read ({e}); set E2B_API_KEY, or ARCA_HOME to the home of a running `arca up`",
            path.display()
        ))
    })?;
    let key = text.lines().next().unwrap_or("").trim().to_string();
    if key.is_empty() {
        return Err(SdkError::Config(format!(
            "no API key: {} is empty; set E2B_API_KEY (make one with `arca keys create`)",
            path.display()
        )));
    }
    Ok(key)
}

fn trim_base(mut url: String) -> String {
    while url.ends_with('/') {
        url.pop();
    }
    url
}

fn check_http(url: &str) -> Result<(), SdkError> {
    if url.starts_with("http://") {
        Ok(())
    } else if url.starts_with("https://") {
        Err(SdkError::Config(format!(
            "{url}: https is not supported by arca-sdk yet; use the plain http:// URLs of `arca up` (E2B_API_URL, E2B_SANDBOX_URL)"
        )))
    } else {
        Err(SdkError::Config(format!(
            "{url} is not an http:// URL; set E2B_API_URL and E2B_SANDBOX_URL like http://127.0.0.1:3000"
        )))
    }
}

pub(crate) fn json<T: serde::Serialize>(v: &T) -> Result<Bytes, SdkError> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|e| SdkError::Config(format!("cannot encode the request: {e}")))
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(url: &str, body: &[u8]) -> Result<T, SdkError> {
    serde_json::from_slice(body).map_err(|e| SdkError::Protocol {
        url: url.to_string(),
        message: format!("malformed JSON body: {e}"),
    })
}

/// An error with its causes, `a: b: c`.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        Client::new("http://api:3000/", "e2b_k", "http://proxy:3001")
    }

    #[test]
    fn rest_requests_carry_the_key_and_json() {
        let c = client();
        let r = c
            .rest_request(Method::POST, "/v2/sandboxes", Some(Bytes::from("{}")))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.uri(), "http://api:3000/v2/sandboxes");
        assert_eq!(r.headers()["x-api-key"], "e2b_k");
        assert_eq!(r.headers()["content-type"], "application/json");
        let r = c
            .rest_request(Method::GET, "/sandboxes/a%2Fb", None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(r.headers().get("content-type").is_none());
        assert_eq!(r.uri().path(), "/sandboxes/a%2Fb");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn bad_urls_and_missing_keys_say_what_to_do() {
        let c = Client::new("https://x", "k", "http://y");
        let e = c.rest_request(Method::GET, "/", None).unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
        let c = Client::new("http://x", "", "http://y");
        let e = c.rest_request(Method::GET, "/", None).unwrap_err();
        assert!(e.to_string().contains("E2B_API_KEY"), "{e}");
    }

    #[test]
    fn resolve_falls_back_to_the_key_file_of_arca_home() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let e = Client::resolve(None, None, None, Some(dir.path())).unwrap_err();
        assert!(e.to_string().contains("api_key"), "{e}");
        std::fs::write(dir.path().join("api_key"), "e2b_abc\n").unwrap_or_default();
        let c =
            Client::resolve(None, None, None, Some(dir.path())).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.api_key, "e2b_abc");
        assert_eq!(c.api_url(), DEFAULT_API_URL);
        assert_eq!(c.sandbox_url(), DEFAULT_SANDBOX_URL);
        let c = Client::resolve(Some("http://a/"), Some("k"), Some("http://b"), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.api_url(), c.api_key.as_str()), ("http://a", "k"));
        assert!(!format!("{c:?}").contains("\"k\""));
    }
}
