//! Answers the proxy gives itself, with E2B-shaped JSON bodies.
//!
//! The SDKs classify a 502 by substring of its `message`: `was not found`
//! means the sandbox is gone, `port is not open` means it is unreachable
//! (CONTRACT 1.6, item 3); other errors carry `{"code", "message"}` with
//! `code` equal to the HTTP status (CONTRACT 1.8).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use serde::Serialize;

use crate::body::ProxyBody;

/// Why the proxy answered a request itself instead of forwarding it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// Only one of `E2b-Sandbox-Id` / `E2b-Sandbox-Port` was sent.
    #[error("both E2b-Sandbox-Id and E2b-Sandbox-Port headers are required")]
    MissingRoutingHeader,
    /// `E2b-Sandbox-Port` is not a port number.
    #[error("invalid E2b-Sandbox-Port '{0}': expected an integer port")]
    InvalidPort(String),
    /// `E2b-Sandbox-Id` is not `^[a-z0-9]+$`.
    #[error("invalid E2b-Sandbox-Id '{0}': expected lowercase letters and digits")]
    InvalidSandboxId(String),
    /// Neither a `<port>-<sandboxId>` host nor routing headers.
    #[error(
        "cannot tell which sandbox this request is for: use host <port>-<sandboxId>.<domain> or the E2b-Sandbox-Id and E2b-Sandbox-Port headers"
    )]
    NoRouting,
    /// A header-less unsigned `/files` request while not exactly one sandbox runs.
    #[error(
        "unsigned file URL without routing headers is ambiguous: {0} sandboxes are running, send E2b-Sandbox-Id and E2b-Sandbox-Port"
    )]
    Ambiguous(usize),
    /// `signature_expiration` is not an integer.
    #[error("invalid signature_expiration '{0}': expected Unix seconds")]
    InvalidExpiration(String),
    /// A signed header-less file URL that no running sandbox signed.
    #[error("The sandbox was not found: no running sandbox matches the file URL signature")]
    NoSignatureMatch,
    /// A route that only the orchestrator may use.
    #[error("this route is reserved for the orchestrator")]
    OrchestratorOnly {
        /// Sandbox addressed.
        sandbox_id: String,
    },
    /// A user port of a sandbox created with `allowPublicTraffic: false`,
    /// asked without its traffic access token (or with another one).
    #[error(
        "The sandbox's ports are private: send its traffic access token in the e2b-traffic-access-token header"
    )]
    TrafficTokenRequired {
        /// Sandbox addressed.
        sandbox_id: String,
    },
    /// No running sandbox with this id.
    #[error("The sandbox was not found")]
    SandboxNotFound {
        /// Sandbox addressed.
        sandbox_id: String,
    },
    /// The sandbox runs but nothing accepts connections on the port.
    #[error("The sandbox is running but port is not open")]
    PortNotOpen {
        /// Sandbox addressed.
        sandbox_id: String,
        /// Port addressed.
        port: u16,
    },
    /// Reaching the port failed otherwise, or the request to it failed.
    #[error("The sandbox is running but the request to it failed")]
    Upstream {
        /// Sandbox addressed.
        sandbox_id: String,
        /// Port addressed.
        port: u16,
        /// What failed.
        #[source]
        source: crate::BoxError,
    },
}

/// Body of a 502 about a sandbox, field order as the reference edge.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SandboxErrorBody<'a> {
    sandbox_id: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    code: u16,
}

/// Body of any other error.
#[derive(Serialize)]
struct ErrorBody {
    code: u16,
    message: String,
}

impl ProxyError {
    /// HTTP status of the answer.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingRoutingHeader
            | ProxyError::InvalidPort(_)
            | ProxyError::InvalidSandboxId(_)
            | ProxyError::NoRouting
            | ProxyError::Ambiguous(_)
            | ProxyError::InvalidExpiration(_) => StatusCode::BAD_REQUEST,
            ProxyError::OrchestratorOnly { .. } | ProxyError::TrafficTokenRequired { .. } => {
                StatusCode::FORBIDDEN
            }
            ProxyError::NoSignatureMatch
            | ProxyError::SandboxNotFound { .. }
            | ProxyError::PortNotOpen { .. }
            | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The JSON body.
    fn body(&self) -> Vec<u8> {
        let status = self.status().as_u16();
        let message = self.to_string();
        let sandbox = |sandbox_id, port| SandboxErrorBody {
            sandbox_id,
            message: message.clone(),
            port,
            code: status,
        };
        let encoded = match self {
            ProxyError::SandboxNotFound { sandbox_id }
            | ProxyError::OrchestratorOnly { sandbox_id }
            | ProxyError::TrafficTokenRequired { sandbox_id } => {
                serde_json::to_vec(&sandbox(sandbox_id.as_str(), None))
            }
            ProxyError::PortNotOpen { sandbox_id, port }
            | ProxyError::Upstream {
                sandbox_id, port, ..
            } => serde_json::to_vec(&sandbox(sandbox_id.as_str(), Some(*port))),
            _ => serde_json::to_vec(&ErrorBody {
                code: status,
                message: message.clone(),
            }),
        };
        // Serializing plain strings and integers cannot fail.
        encoded.unwrap_or_default()
    }

    /// The whole answer.
    pub(crate) fn into_response(self) -> Response<ProxyBody> {
        let mut resp = Response::new(
            Full::new(Bytes::from(self.body()))
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(e: &ProxyError) -> String {
        String::from_utf8(e.body()).unwrap()
    }

    #[test]
    fn bodies_match_the_reference_edge() {
        let e = ProxyError::SandboxNotFound {
            sandbox_id: "abc".into(),
        };
        assert_eq!(
            body(&e),
            r#"{"sandboxId":"abc","message":"The sandbox was not found","code":502}"#
        );
        let e = ProxyError::PortNotOpen {
            sandbox_id: "abc".into(),
            port: 8080,
        };
        assert_eq!(
            body(&e),
            r#"{"sandboxId":"abc","message":"The sandbox is running but port is not open","port":8080,"code":502}"#
        );
        let e = ProxyError::TrafficTokenRequired {
            sandbox_id: "abc".into(),
        };
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            body(&e),
            r#"{"sandboxId":"abc","message":"The sandbox's ports are private: send its traffic access token in the e2b-traffic-access-token header","code":403}"#
        );
        let e = ProxyError::MissingRoutingHeader;
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(body(&e).starts_with(r#"{"code":400,"message":"#));
    }
}
