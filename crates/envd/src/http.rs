//! envd's HTTP server: routes, access-token checks, CORS, and the plain
//! routes `/health`, `/init`, `/envs` and `/metrics` (CONTRACT 3.5).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State as AxState};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde::Deserialize;
use subtle::ConstantTimeEq as _;

use crate::files::http_error;
use crate::{ENVD_VERSION, State, files, metrics, rpc};

/// Headers browsers may read from responses (Connect's plus a few).
const EXPOSED_HEADERS: &str = "Connect-Protocol-Version, Connect-Content-Encoding, Connect-Accept-Encoding, Grpc-Status, Grpc-Message, Grpc-Status-Details-Bin, Content-Encoding, Content-Length, Location, Cache-Control, X-Content-Type-Options, X-Envd-Version";

/// Constant-time comparison of a presented secret with the expected one.
pub(crate) fn token_matches(presented: &[u8], expected: &str) -> bool {
    presented.ct_eq(expected.as_bytes()).into()
}

fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/init", post(init))
        .route("/envs", get(envs))
        .route("/metrics", get(metrics_route))
        .route("/files", get(files::download).post(files::upload))
        .route("/process.Process/{method}", post(rpc::process_service))
        .route(
            "/filesystem.Filesystem/{method}",
            post(rpc::filesystem_service),
        )
        .layer(middleware::from_fn_with_state(state.clone(), access))
        .layer(middleware::from_fn(cors))
        .with_state(state)
}

/// Serves HTTP/1.1 and h2c (prior knowledge) on `listener`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
) -> std::io::Result<()> {
    let app = router(state);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder.http2().max_concurrent_streams(100);
            let _ = builder
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Once a token is set, everything but `/health`, `/files` and `/init`
/// needs `X-Access-Token` (the `/files` routes check it themselves because
/// they also accept signatures, and `/init` checks it for rotations).
async fn access(AxState(state): AxState<Arc<State>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let open = matches!(path, "/health" | "/files" | "/init") || req.method() == Method::OPTIONS;
    if !open {
        if let Some(token) = state.init_state().access_token {
            let ok = req
                .headers()
                .get("x-access-token")
                .is_some_and(|v| token_matches(v.as_bytes(), &token));
            if !ok {
                return http_error(
                    StatusCode::UNAUTHORIZED,
                    "missing or invalid X-Access-Token; use the envdAccessToken of this sandbox",
                );
            }
        }
    }
    next.run(req).await
}

async fn cors(req: Request, next: Next) -> Response {
    let preflight = req.method() == Method::OPTIONS;
    let mut resp = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSED_HEADERS),
    );
    if preflight {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("HEAD, GET, POST, PUT, PATCH, DELETE"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("*"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("7200"),
        );
    }
    resp
}

async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// Body of `POST /init`; every key optional, unknown keys ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InitRequest {
    env_vars: Option<BTreeMap<String, String>>,
    access_token: Option<String>,
    timestamp: Option<String>,
    default_user: Option<String>,
    default_workdir: Option<String>,
}

/// Whether envd should set its clock to `sent`: only when it drifted by
/// more than a second from what the orchestrator sent.
pub(crate) fn clock_needs_setting(
    now: chrono::DateTime<chrono::Utc>,
    sent: chrono::DateTime<chrono::Utc>,
) -> bool {
    (now - sent).num_milliseconds().abs() > 1000
}

async fn init(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let req: InitRequest = if body.iter().all(u8::is_ascii_whitespace) {
        InitRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return http_error(
                    StatusCode::BAD_REQUEST,
                    format!("malformed /init body: {e}"),
                );
            }
        }
    };
    let current = state.init_state();
    // Once a token is set only its holder (the orchestrator) may reconfigure.
    if let Some(token) = &current.access_token {
        let ok = headers
            .get("x-access-token")
            .is_some_and(|v| token_matches(v.as_bytes(), token));
        if !ok {
            return http_error(
                StatusCode::UNAUTHORIZED,
                "missing or invalid X-Access-Token for /init",
            );
        }
    }
    let sent = match req
        .timestamp
        .as_deref()
        .map(chrono::DateTime::parse_from_rfc3339)
    {
        None => None,
        Some(Ok(t)) => Some(t.with_timezone(&chrono::Utc)),
        Some(Err(e)) => {
            return http_error(
                StatusCode::BAD_REQUEST,
                format!("timestamp is not RFC 3339: {e}"),
            );
        }
    };
    if let (Some(sent), Some(last)) = (sent, current.last_timestamp) {
        if sent < last {
            // A replay of an older /init: keep the newer configuration.
            return init_ok();
        }
    }
    if let Some(user) = &req.default_user {
        if state.users.lookup(user).is_none() {
            return http_error(
                StatusCode::BAD_REQUEST,
                format!("default user '{user}' does not exist"),
            );
        }
    }
    if let Some(sent) = sent {
        if clock_needs_setting(chrono::Utc::now(), sent) {
            let ts = nix::sys::time::TimeSpec::new(
                sent.timestamp(),
                i64::from(sent.timestamp_subsec_nanos()),
            );
            if let Err(e) = nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts) {
                tracing::debug!(error = %e, "cannot set the clock");
            }
        }
    }
    {
        let mut s = state
            .init
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(env) = req.env_vars {
            s.env_vars = env;
        }
        if let Some(token) = req.access_token {
            s.access_token = if token.is_empty() { None } else { Some(token) };
        }
        if let Some(user) = req.default_user {
            s.default_user = user;
        }
        if let Some(dir) = req.default_workdir {
            s.default_workdir = if dir.is_empty() {
                None
            } else {
                Some(dir.into())
            };
        }
        if sent.is_some() {
            s.last_timestamp = sent;
        }
    }
    init_ok()
}

fn init_ok() -> Response {
    (StatusCode::NO_CONTENT, [("x-envd-version", ENVD_VERSION)]).into_response()
}

async fn envs(AxState(state): AxState<Arc<State>>) -> Response {
    let mut env: BTreeMap<String, String> = state
        .base_env
        .iter()
        .filter(|(k, _)| k.as_str() != "PATH")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.extend(state.init_state().env_vars);
    axum::Json(env).into_response()
}

async fn metrics_route(AxState(state): AxState<Arc<State>>) -> Response {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let now = metrics::cpu_sample(&read("/proc/stat"));
    let prev = {
        let mut last = state
            .cpu
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::replace(&mut *last, now)
    };
    let prev = match prev {
        Some(p) => Some(p),
        None => {
            // First call: measure over a short window instead of since boot.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let again = metrics::cpu_sample(&read("/proc/stat"));
            *state
                .cpu
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = again;
            let p = now;
            return metrics_body(p, again).into_response();
        }
    };
    metrics_body(prev, now).into_response()
}

fn metrics_body(
    prev: Option<metrics::CpuSample>,
    now: Option<metrics::CpuSample>,
) -> axum::Json<serde_json::Value> {
    let pct = match (prev, now) {
        (Some(a), Some(b)) => metrics::cpu_pct(a, b),
        _ => 0.0,
    };
    let (mem_total, mem_used, mem_cache) =
        metrics::memory(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default());
    let (disk_total, disk_used) = metrics::disk(std::path::Path::new("/"));
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    axum::Json(serde_json::json!({
        "ts": chrono::Utc::now().timestamp(),
        "cpu_count": cpus,
        "cpu_used_pct": (pct * 100.0).round() / 100.0,
        "mem_total": mem_total,
        "mem_used": mem_used,
        "mem_cache": mem_cache,
        "mem_total_mib": mem_total >> 20,
        "mem_used_mib": mem_used >> 20,
        "disk_used": disk_used,
        "disk_total": disk_total,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(token_matches(b"abc", "abc"));
        assert!(!token_matches(b"abd", "abc"));
        assert!(!token_matches(b"ab", "abc"));
    }

    #[test]
    fn clock_is_set_only_on_real_drift() {
        let now = chrono::Utc::now();
        assert!(!clock_needs_setting(
            now,
            now + chrono::Duration::milliseconds(500)
        ));
        assert!(clock_needs_setting(now, now - chrono::Duration::seconds(5)));
    }
}
