//! The HTTP edge: routes, request spans, authentication, body and query
//! parsing, and E2B-shaped bodies for every error, the router's own 404 and
//! 405 included.

use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};
use bytes::Bytes;
use http::request::Parts;
use http::{StatusCode, header};
use serde::de::DeserializeOwned;
use tracing::Instrument as _;

use crate::error::{ApiError, error_response};
use crate::{Api, keys, network, sandboxes, snapshots, templates};

/// Largest request body accepted. E2B bodies are small JSON documents; env
/// vars and metadata of a create fit many times over.
pub(crate) const MAX_BODY_BYTES: usize = 1 << 20;

pub(crate) fn router(api: Api) -> Router {
    Router::new()
        .route("/health", get(health))
        .route(
            "/sandboxes",
            post(sandboxes::create_v1).get(sandboxes::list_v1),
        )
        .route(
            "/v2/sandboxes",
            post(sandboxes::create_v2).get(sandboxes::list_v2),
        )
        .route(
            "/sandboxes/{id}",
            get(sandboxes::get_info).delete(sandboxes::kill),
        )
        .route("/sandboxes/{id}/connect", post(sandboxes::connect_v1))
        .route("/v2/sandboxes/{id}/connect", post(sandboxes::connect_v2))
        .route("/sandboxes/{id}/timeout", post(sandboxes::set_timeout))
        .route("/sandboxes/{id}/refreshes", post(sandboxes::refresh))
        .route("/sandboxes/{id}/pause", post(sandboxes::pause))
        .route("/sandboxes/{id}/resume", post(sandboxes::resume))
        .route("/sandboxes/{id}/metrics", get(sandboxes::metrics))
        .route("/sandboxes/{id}/logs", get(sandboxes::logs_v1))
        .route("/v2/sandboxes/{id}/logs", get(sandboxes::logs_v2))
        .route("/sandboxes/{id}/network", put(network::update))
        .route("/sandboxes/{id}/network/logs", get(network::logs))
        .route("/sandboxes/{id}/fork", post(snapshots::fork))
        .route(
            "/sandboxes/{id}/snapshots",
            post(snapshots::create_snapshot),
        )
        .route("/snapshots", get(snapshots::list_snapshots))
        .route("/v3/templates", post(templates::request_v3))
        .route(
            "/templates",
            get(templates::list).post(templates::request_v1),
        )
        .route(
            "/templates/tags",
            post(templates::assign_tags).delete(templates::delete_tags),
        )
        .route("/templates/aliases/{alias}", get(templates::get_alias))
        .route(
            "/templates/{templateID}",
            get(templates::get)
                .post(templates::rebuild_v1)
                .patch(templates::update)
                .delete(templates::delete),
        )
        .route(
            "/v2/templates/{templateID}",
            axum::routing::patch(templates::update),
        )
        .route("/templates/{templateID}/tags", get(templates::list_tags))
        .route(
            "/templates/{templateID}/files/{hash}",
            get(templates::file_upload_link),
        )
        .route(
            "/templates/{templateID}/builds/{buildID}",
            post(templates::trigger_v1),
        )
        .route(
            "/v2/templates/{templateID}/builds/{buildID}",
            post(templates::start_v2),
        )
        .route(
            "/templates/{templateID}/builds/{buildID}/status",
            get(templates::build_status),
        )
        .route(
            "/templates/{templateID}/builds/{buildID}/logs",
            get(templates::build_logs),
        )
        // No API key: the link's token authorizes; the body is streamed,
        // so the JSON body limit does not apply.
        .route("/uploads/{templateID}/{hash}", put(templates::upload))
        // Cluster mode (ADR 0006): nodes and proxies, with the cluster token.
        .route(
            "/cluster/v1/nodes",
            post(crate::cluster::register).get(crate::cluster::list_nodes),
        )
        .route(
            "/cluster/v1/nodes/{id}",
            axum::routing::delete(crate::cluster::forget_node),
        )
        .route(
            "/cluster/v1/nodes/{id}/heartbeat",
            post(crate::cluster::heartbeat),
        )
        .route(
            "/cluster/v1/nodes/{id}/{action}",
            post(crate::cluster::set_draining),
        )
        .route("/cluster/v1/routes/{id}", get(crate::cluster::route))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(e2b_error_bodies))
        .layer(middleware::from_fn(request_span))
        .with_state(api)
}

async fn health() -> &'static str {
    "ok"
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

/// One span per request with method, matched route and (recorded by the
/// handler) sandbox id; errors are logged inside it by [`ApiError`].
async fn request_span(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("<none>", MatchedPath::as_str)
        .to_string();
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        route = %route,
        sandbox_id = tracing::field::Empty,
    );
    let start = Instant::now();
    async move {
        let resp = next.run(req).await;
        tracing::debug!(
            status = resp.status().as_u16(),
            elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
            "request done"
        );
        resp
    }
    .instrument(span)
    .await
}

/// Safety net: an error answer that is not JSON yet (axum's 405, a
/// rejection we did not map) gets the E2B body, headers kept.
async fn e2b_error_bodies(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed for this route".to_string(),
        s => s
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase(),
    };
    let (mut parts, _) = resp.into_parts();
    let fresh = error_response(status, &message, None);
    parts.headers.remove(header::CONTENT_LENGTH);
    let (fresh_parts, body) = fresh.into_parts();
    parts.headers.extend(fresh_parts.headers);
    Response::from_parts(parts, body)
}

/// The team an `X-API-Key` belongs to (the header name is case-insensitive
/// as all HTTP header names).
#[derive(Debug, Clone)]
pub(crate) struct Team(pub(crate) String);

impl FromRequestParts<Api> for Team {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Api) -> Result<Team, ApiError> {
        let Some(key) = parts.headers.get("x-api-key") else {
            return Err(ApiError::Unauthorized(
                "missing API key: send it in the X-API-Key header".into(),
            ));
        };
        let key = key.to_str().map(str::trim).unwrap_or_default();
        match api.db().team_for_key(&keys::hash_key(key)).await? {
            Some(team) => Ok(Team(team)),
            None => Err(ApiError::Unauthorized("invalid API key".into())),
        }
    }
}

/// A JSON request body. An empty body reads as `{}` (some clients send none
/// for all-optional bodies); otherwise `Content-Type` must be JSON. Unknown
/// fields are accepted. Every failure is an E2B-shaped 400, 413 or 415.
#[derive(Debug, Clone)]
pub(crate) struct JsonBody<T>(pub(crate) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<JsonBody<T>, ApiError> {
        let json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                let essence = v
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                essence == "application/json" || essence.ends_with("+json")
            });
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(format!(
                    "request body is larger than {MAX_BODY_BYTES} bytes"
                ))
            } else {
                ApiError::BadRequest(format!("cannot read request body: {}", r.body_text()))
            }
        })?;
        let blank = bytes.iter().all(u8::is_ascii_whitespace);
        if !blank && !json_type {
            return Err(ApiError::UnsupportedMediaType(
                "request body must be JSON with Content-Type: application/json".into(),
            ));
        }
        let data: &[u8] = if blank { b"{}" } else { &bytes };
        serde_json::from_slice(data)
            .map(JsonBody)
            .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))
    }
}

/// Query parameters in order, decoded (`+` is a space), repeats kept.
#[derive(Debug, Clone, Default)]
pub(crate) struct QueryParams(pub(crate) Vec<(String, String)>);

impl QueryParams {
    /// The last value of `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`.
    pub(crate) fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `name` as an integer, if present.
    pub(crate) fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|v| {
                v.trim().parse::<i64>().map_err(|_| {
                    ApiError::BadRequest(format!("query parameter {name} must be an integer"))
                })
            })
            .transpose()
    }
}

fn form_decode(s: &str) -> String {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8_lossy()
        .into_owned()
}

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<QueryParams, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        Ok(QueryParams(
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (form_decode(k), form_decode(v))
                })
                .collect(),
        ))
    }
}

/// The `{id}` path parameter as a sandbox id (legacy suffix dropped), also
/// recorded in the request span.
#[derive(Debug, Clone)]
pub(crate) struct SandboxPath(pub(crate) arca_proto::node::SandboxId);

impl<S: Send + Sync> FromRequestParts<S> for SandboxPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<SandboxPath, ApiError> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|r| ApiError::BadRequest(r.body_text()))?;
        let id = crate::ids::parse_path_id(&raw)?;
        tracing::Span::current().record("sandbox_id", id.as_str());
        Ok(SandboxPath(id))
    }
}

/// `X-Next-Token` of a listing ordered by (time, id): where the next page
/// starts, opaque to clients.
pub(crate) fn page_token(at: chrono::DateTime<chrono::Utc>, id: &str) -> String {
    use base64::Engine as _;
    let raw = format!("{}:{id}", crate::db::micros(at));
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

/// The error of a `nextToken` that is not one this api handed out.
pub(crate) fn bad_page_token() -> crate::error::ApiError {
    crate::error::ApiError::BadRequest(
        "invalid nextToken: pass the X-Next-Token value as is".into(),
    )
}

/// `resp` with `X-Next-Token: next` when a next page exists.
pub(crate) fn with_next_page(
    mut resp: Response,
    next: Option<String>,
) -> Result<Response, crate::error::ApiError> {
    if let Some(next) = next {
        let token = http::HeaderValue::from_str(&next).map_err(|e| {
            crate::error::ApiError::Internal(format!("cursor is not a header value: {e}"))
        })?;
        resp.headers_mut().insert("x-next-token", token);
    }
    Ok(resp)
}

/// Reads a [`page_token`] back: (Unix microseconds, id).
pub(crate) fn parse_page_token(token: &str) -> Result<(i64, String), crate::error::ApiError> {
    use base64::Engine as _;
    let bad = bad_page_token;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let (t, id) = raw.split_once(':').ok_or_else(bad)?;
    Ok((t.parse().map_err(|_| bad())?, id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_form_decoded() {
        assert_eq!(form_decode("a%3Db%26c+d"), "a=b&c d");
    }
}
