//! The SDK's one error type.

use arca_proto::connect::ConnectError;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The server answered with an error status: an E2B error body from the
    /// API (`{"code": <status>, "message", "error_code"?}`), a Connect or
    /// plain error from envd, or the proxy's 502 for a sandbox it cannot
    /// reach.
    #[error("{message} (HTTP {status}{})", code.as_deref().map(|c| format!(", {c}")).unwrap_or_default())]
    Status {
        /// HTTP status.
        status: u16,
        /// Machine-readable code when the body has one: the API's
        /// `error_code` or envd's Connect code (`not_found`, ...).
        code: Option<String>,
        /// The server's message (or the raw body when it is not JSON).
        message: String,
    },
    /// envd ended a command's stream with a Connect error.
    #[error("envd: {0}")]
    Envd(#[from] ConnectError),
    /// The server could not be reached, or the connection broke.
    #[error("cannot reach {url}: {message}")]
    Transport {
        /// The URL called.
        url: String,
        /// What went wrong, with its causes.
        message: String,
    },
    /// The call took longer than its timeout.
    #[error("{url} did not answer within {secs} s")]
    Timeout {
        /// The URL called.
        url: String,
        /// The timeout in seconds.
        secs: u64,
    },
    /// The answer was not what the protocol says.
    #[error("unexpected answer from {url}: {message}")]
    Protocol {
        /// The URL called.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// The client is not configured well enough to make the call.
    #[error("{0}")]
    Config(String),
    /// Writing a command's output to the caller failed.
    #[error("writing command output")]
    Output(#[source] std::io::Error),
}

impl SdkError {
    /// The HTTP status of a [`SdkError::Status`] error (and 404 for an envd
    /// `not_found`).
    pub fn status(&self) -> Option<u16> {
        match self {
            SdkError::Status { status, .. } => Some(*status),
            SdkError::Envd(e) => Some(e.code().http_status()),
            _ => None,
        }
    }

    /// Whether the thing asked for does not exist (404).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// Whether the server could not be reached at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, SdkError::Transport { .. })
    }

    /// Reads an error body: E2B's `{"code": int, "message", "error_code"?}`,
    /// Connect's `{"code": "not_found", "message"}`, or anything else (the
    /// body becomes the message).
    pub(crate) fn from_body(status: u16, body: &[u8]) -> SdkError {
        let value: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let field = |k: &str| {
            value
                .as_ref()
                .and_then(|v| v.get(k))
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        };
        let message = field("message").unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body).trim().to_string();
            if text.is_empty() {
                http::StatusCode::from_u16(status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("error")
                    .to_string()
            } else {
                text
            }
        });
        // Integer `code` is the status again; a string one is Connect's.
        let code = field("error_code").or_else(|| field("code"));
        SdkError::Status {
            status,
            code,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e2b_bodies_become_status_errors() {
        let e = SdkError::from_body(404, br#"{"code":404,"message":"sandbox 'x' not found"}"#);
        assert!(e.is_not_found());
        assert_eq!(e.to_string(), "sandbox 'x' not found (HTTP 404)");
        let e = SdkError::from_body(
            409,
            br#"{"code":409,"message":"busy","error_code":"sandbox_busy"}"#,
        );
        assert!(matches!(&e, SdkError::Status { code: Some(c), .. } if c == "sandbox_busy"));
        assert_eq!(e.to_string(), "busy (HTTP 409, sandbox_busy)");
    }

    #[test]
    fn connect_and_plain_bodies_are_read_too() {
        let e = SdkError::from_body(404, br#"{"code":"not_found","message":"no file"}"#);
        assert!(
            matches!(&e, SdkError::Status { status: 404, code: Some(c), message } if c == "not_found" && message == "no file")
        );
        let e = SdkError::from_body(502, b"bad gateway\n");
        assert_eq!(e.to_string(), "bad gateway (HTTP 502)");
        let e = SdkError::from_body(503, b"");
        assert_eq!(e.to_string(), "Service Unavailable (HTTP 503)");
        assert!(!e.is_unreachable());
    }
}
