//! The one REST call arca-sdk does not make yet: Arca's own
//! `GET /sandboxes/{id}/network/logs?start=&limit=` (ADR 0005 section 4).
//! Failures are [`SdkError`]s, so they read like every other command's.

use std::time::Duration;

use arca_sdk::SdkError;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Entries asked for per request (the API's maximum).
pub(crate) const PAGE: usize = 2000;
/// Longest wait for one answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The API at one URL with one key.
pub(crate) struct NetworkLogApi {
    api_url: String,
    api_key: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl NetworkLogApi {
    pub(crate) fn new(api_url: &str, api_key: &str) -> NetworkLogApi {
        NetworkLogApi {
            api_url: api_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The URL of a sandbox's egress log, without query.
    pub(crate) fn url_of(&self, id: &str) -> String {
        format!("{}/sandboxes/{}/network/logs", self.api_url, encode(id))
    }

    /// Up to [`PAGE`] entries from `start` (RFC 3339, inclusive) on, as the
    /// API sent them.
    pub(crate) async fn fetch(
        &self,
        id: &str,
        start: Option<String>,
    ) -> Result<Vec<serde_json::Value>, SdkError> {
        let base = self.url_of(id);
        if !base.starts_with("http://") {
            return Err(SdkError::Config(format!(
                "{base}: only plain http:// API URLs are supported (E2B_API_URL, --api-url)"
            )));
        }
        let mut url = format!("{base}?limit={PAGE}");
        if let Some(s) = start {
            url.push_str("&start=");
            url.push_str(&encode(&s));
        }
        let req = Request::get(&url)
            .header("X-API-Key", &self.api_key)
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| SdkError::Config(format!("bad request URL {url}: {e}")))?;
        let transport = |message: String| SdkError::Transport {
            url: url.clone(),
            message,
        };
        let work = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| transport(chain(&e)))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| transport(chain(&e)))?
                .to_bytes();
            Ok::<_, SdkError>((status, body))
        };
        let (status, body) =
            tokio::time::timeout(REQUEST_TIMEOUT, work)
                .await
                .map_err(|_| SdkError::Timeout {
                    url: url.clone(),
                    secs: REQUEST_TIMEOUT.as_secs(),
                })??;
        if status != StatusCode::OK {
            return Err(status_error(status, &body));
        }
        let protocol = |message: String| SdkError::Protocol {
            url: url.clone(),
            message,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| protocol(format!("not JSON: {e}")))?;
        match v.get("entries") {
            Some(serde_json::Value::Array(entries)) => Ok(entries.clone()),
            _ => Err(protocol("no \"entries\" array in the answer".into())),
        }
    }
}

/// An E2B error body (`{"code", "message", "error_code"?}`) as an error.
fn status_error(status: StatusCode, body: &[u8]) -> SdkError {
    let v: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |k: &str| {
        v.as_ref()
            .and_then(|v| v.get(k))
            .and_then(|m| m.as_str())
            .map(str::to_owned)
    };
    let message = field("message").unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body).trim().to_string();
        if text.is_empty() {
            status.canonical_reason().unwrap_or("error").to_string()
        } else {
            text
        }
    });
    SdkError::Status {
        status: status.as_u16(),
        code: field("error_code"),
        message,
    }
}

/// `err` and its sources joined with `": "`.
fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

/// Percent-encodes all but RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_errors() {
        assert_eq!(
            encode("2026-01-01T00:00:00.5+01:00"),
            "2026-01-01T00%3A00%3A00.5%2B01%3A00"
        );
        let api = NetworkLogApi::new("http://h:1/", "k");
        assert_eq!(api.url_of("a b"), "http://h:1/sandboxes/a%20b/network/logs");
        let e = status_error(
            StatusCode::NOT_FOUND,
            br#"{"code":404,"message":"sandbox 'x' not found"}"#,
        );
        assert!(e.is_not_found());
        assert_eq!(e.to_string(), "sandbox 'x' not found (HTTP 404)");
        let e = status_error(StatusCode::BAD_GATEWAY, b"");
        assert_eq!(e.to_string(), "Bad Gateway (HTTP 502)");
    }
}
