//! The api's one error type and its HTTP mapping.
//!
//! Every non-2xx answer carries the E2B error body
//! `{"code": <status>, "message": "..."}` (plus `error_code` where the
//! contract names one): the Python SDK decodes error bodies of documented
//! statuses, and the JS SDK reads "not found" from the body's `code`
//! (CONTRACT 1.8). 4xx answers are the client's business and logged at debug;
//! 5xx answers get a generic body and their cause chain is logged once, here.

use std::path::PathBuf;

use arca_proto::node::NodeError;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

/// Message of every 500 answer; the cause is in the server log.
const INTERNAL_MESSAGE: &str = "internal server error; the cause is in the Arca server log";

/// Why a request or an api operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or an unknown API key (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The request is malformed or asks for something out of range (400).
    #[error("{0}")]
    BadRequest(String),
    /// The resource exists but belongs to another team (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such sandbox, template, key or route for this team (404).
    #[error("{0}")]
    NotFound(String),
    /// The state of a resource forbids the call (409).
    #[error("{message}")]
    Conflict {
        /// For the user.
        message: String,
        /// Machine-readable code (CONTRACT 2.7), if the contract has one.
        error_code: Option<&'static str>,
    },
    /// An upload without `Content-Length` (411).
    #[error("{0}")]
    LengthRequired(String),
    /// The request body is larger than the server accepts (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request body is not JSON (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The route exists but not with this method (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// A feature this server does not have yet (501).
    #[error("{0}")]
    NotImplemented(String),
    /// No node can take the sandbox now (503, `sandbox_capacity_unavailable`).
    #[error("no capacity to start the sandbox: {0}")]
    Capacity(String),
    /// The sandbox's node is lost or unknown (503); its sandboxes come
    /// back when it does.
    #[error("{0}")]
    NodeUnavailable(String),
    /// A node call failed for a reason the user cannot fix (500).
    #[error("node call failed")]
    Node(#[source] NodeError),
    /// A database query failed (500).
    #[error("database query failed")]
    Db(#[from] sqlx::Error),
    /// The schema could not be brought up to date (at start).
    #[error("applying database migrations failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database could not be opened (at start).
    #[error("opening database {url} failed")]
    OpenDb {
        /// The URL as given.
        url: String,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// The directory of a SQLite file, or the uploads directory, could not
    /// be created (at start).
    #[error("creating database directory {path} failed")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database URL names a backend this build does not have.
    #[error(
        "unsupported database URL '{0}': use sqlite:<path>, postgres://... or postgresql://..."
    )]
    UnsupportedDatabase(String),
    /// An invariant broke; the message is for operators (500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// Maps a node failure to what the SDK should see (CONTRACT 2.2).
    pub(crate) fn from_node(err: NodeError) -> ApiError {
        match err {
            NodeError::SandboxNotFound(id) => ApiError::sandbox_not_found(id.as_str()),
            NodeError::TemplateNotFound(t) => {
                ApiError::NotFound(format!("template '{t}' not found on the node"))
            }
            NodeError::Capacity(m) => ApiError::Capacity(m),
            NodeError::Unavailable(m) => ApiError::NodeUnavailable(m),
            NodeError::InvalidInput(m) => ApiError::BadRequest(m),
            NodeError::Conflict(m) => ApiError::Conflict {
                message: m,
                error_code: None,
            },
            err @ NodeError::Internal(_) => ApiError::Node(err),
        }
    }

    /// The 404 for a sandbox that does not exist or belongs to another team
    /// (the two are indistinguishable on purpose).
    pub(crate) fn sandbox_not_found(id: &str) -> ApiError {
        ApiError::NotFound(format!("sandbox '{id}' not found"))
    }

    /// The message an answer with this error carries: generic for a 500
    /// (whose cause is logged here, once), else the error itself.
    pub(crate) fn public_message(&self) -> String {
        if self.status() == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %chain(self), "request failed");
            INTERNAL_MESSAGE.to_string()
        } else {
            self.to_string()
        }
    }

    /// HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::LengthRequired(_) => StatusCode::LENGTH_REQUIRED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Capacity(_) | ApiError::NodeUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Node(_)
            | ApiError::Db(_)
            | ApiError::Migrate(_)
            | ApiError::OpenDb { .. }
            | ApiError::CreateDir { .. }
            | ApiError::UnsupportedDatabase(_)
            | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_code(&self) -> Option<&'static str> {
        match self {
            ApiError::Conflict { error_code, .. } => *error_code,
            ApiError::Capacity(_) => Some("sandbox_capacity_unavailable"),
            e if e.status() == StatusCode::INTERNAL_SERVER_ERROR => Some("internal_server_error"),
            _ => None,
        }
    }
}

pub(crate) use arca_proto::error_chain as chain;

/// The E2B error body with `status` as both HTTP status and `code`.
pub(crate) fn error_response(
    status: StatusCode,
    message: &str,
    error_code: Option<&str>,
) -> Response {
    let mut body = serde_json::json!({ "code": status.as_u16(), "message": message });
    if let Some(code) = error_code {
        body["error_code"] = code.into();
    }
    (status, axum::Json(body)).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            // Logged once, inside the request span; the body stays generic so
            // no internal detail reaches the client.
            tracing::error!(error = %chain(&self), "request failed");
            return error_response(status, INTERNAL_MESSAGE, self.error_code());
        }
        if status.is_server_error() {
            tracing::warn!(error = %self, "request refused");
        } else {
            tracing::debug!(%status, error = %self, "request rejected");
        }
        let mut resp = error_response(status, &self.to_string(), self.error_code());
        if matches!(self, ApiError::Capacity(_)) {
            // Python 2.63 retries 503s three times within seconds (CONTRACT
            // 1.8); a full node rarely frees a slot that fast, and each retry
            // would be another create attempt on it. Let the caller decide.
            resp.headers_mut()
                .insert("should-retry", HeaderValue::from_static("false"));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("X-API-Key"),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_proto::node::SandboxId;

    #[test]
    fn node_errors_map_to_e2b_statuses() {
        let id = SandboxId::parse("iabc").unwrap();
        let cases = [
            (NodeError::SandboxNotFound(id), StatusCode::NOT_FOUND),
            (
                NodeError::TemplateNotFound("x".into()),
                StatusCode::NOT_FOUND,
            ),
            (
                NodeError::Capacity("full".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                NodeError::InvalidInput("bad".into()),
                StatusCode::BAD_REQUEST,
            ),
            (NodeError::Conflict("busy".into()), StatusCode::CONFLICT),
            (
                NodeError::Internal("boom".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (err, status) in cases {
            assert_eq!(ApiError::from_node(err).status(), status);
        }
    }

    #[test]
    fn chains_join_sources() {
        let e = ApiError::Node(NodeError::Internal("disk gone".into()));
        assert_eq!(chain(&e), "node call failed: node failure: disk gone");
    }
}
