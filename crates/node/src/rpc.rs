//! The node RPC server of cluster mode: [`NodeService`] and [`BuildService`]
//! over HTTP, as [`arca_proto::rpc`] describes the wire.
//!
//! This is an adapter: it parses a request into one trait call and writes
//! the call's result back; what a call may do in which state is the
//! service's business. Every route needs the cluster token.
//!
//! ```
//! # fn wire(
//! #     node: std::sync::Arc<dyn arca_proto::node::NodeService>,
//! #     builder: std::sync::Arc<dyn arca_proto::build::BuildService>,
//! # ) {
//! let app = arca_node::rpc::router(node, builder, "s3cret".into(), None);
//! # let _ = app; }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use arca_proto::build::{BuildFailure, BuildLog, BuildResult, BuildService, BuildSpec};
use arca_proto::cluster::bearer;
use arca_proto::node::{NodeError, NodeService, SandboxEvent, SandboxSpec};
use arca_proto::rpc::{self, BuildLine, RpcRejection};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use futures_util::Stream;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::sync::{broadcast, mpsc};
use tokio::time::{Instant, Interval, MissedTickBehavior};

/// What every handler shares.
#[derive(Clone)]
struct Rpc {
    node: Arc<dyn NodeService>,
    builder: Arc<dyn BuildService>,
}

/// `router` as the node `node_id`: a request naming another node in
/// [`rpc::NODE_ID_HEADER`] is refused (421) before it does anything, and
/// every answer names this node, so a client made for another node never
/// acts on this one (an address reused by another machine is never taken
/// for the node that had it).
pub fn identify(router: Router, node_id: &str) -> Router {
    let value = HeaderValue::from_str(node_id).ok();
    router.layer(middleware::from_fn(move |req: Request, next: Next| {
        let value = value.clone();
        async move {
            let misdirected = match (req.headers().get(rpc::NODE_ID_HEADER), &value) {
                (Some(asked), Some(me)) => asked != me,
                _ => false,
            };
            let mut resp = if misdirected {
                let mut r = Response::new(Body::from(
                    "this is another node; the caller's node is no longer at this address",
                ));
                *r.status_mut() = StatusCode::MISDIRECTED_REQUEST;
                r
            } else {
                next.run(req).await
            };
            if let Some(v) = value {
                resp.headers_mut().insert(rpc::NODE_ID_HEADER, v);
            }
            resp
        }
    }))
}

/// The RPC routes of a node, under [`rpc::PREFIX`], with `extra` (the
/// template transfer routes) nested under [`rpc::TRANSFER`].
///
/// Every route, `extra`'s and unknown ones included, answers 401 unless the
/// request carries `Authorization: Bearer <token>`; an empty `token`
/// refuses every request. Bodies of the calls above
/// [`rpc::MAX_REQUEST_BYTES`] are refused with 413; `extra` sets its own
/// limits.
pub fn router(
    node: Arc<dyn NodeService>,
    builder: Arc<dyn BuildService>,
    token: String,
    extra: Option<Router>,
) -> Router {
    let calls = Router::new()
        .route(rpc::CREATE, post(create))
        .route(rpc::KILL, post(kill))
        .route(rpc::SET_END_AT, post(set_end_at))
        .route(rpc::GET, post(get_one))
        .route(rpc::LIST, post(list))
        .route(rpc::METRICS, post(metrics))
        .route(rpc::LOGS, post(logs))
        .route(rpc::EVENTS, get(events))
        .route(rpc::PAUSE, post(pause))
        .route(rpc::RESUME, post(resume))
        .route(rpc::FORK, post(fork))
        .route(rpc::SNAPSHOT, post(snapshot))
        .route(rpc::UPDATE_NETWORK, post(update_network))
        .route(rpc::NETWORK_LOGS, post(network_logs))
        .route(rpc::BUILD, post(build))
        .route(rpc::DELETE_BUILD, post(delete_build))
        .layer(DefaultBodyLimit::max(rpc::MAX_REQUEST_BYTES))
        .with_state(Rpc { node, builder });
    let routes = match extra {
        Some(extra) => calls.nest(rpc::TRANSFER, extra),
        None => calls,
    };
    // Layers added last wrap everything above, the fallback included, so
    // nothing is reachable (or even told apart from a missing route)
    // without the token.
    routes
        .fallback(no_route)
        .layer(middleware::from_fn_with_state(
            Arc::new(Token::new(&token)),
            require_token,
        ))
}

/// The expected `Authorization` value, kept as a digest so the comparison
/// takes the same time whatever the length of what was sent.
struct Token {
    digest: Option<[u8; 32]>,
}

impl Token {
    fn new(token: &str) -> Token {
        Token {
            digest: (!token.is_empty()).then(|| sha256(bearer(token).as_bytes())),
        }
    }

    fn admits(&self, sent: Option<&HeaderValue>) -> bool {
        let (Some(want), Some(sent)) = (&self.digest, sent) else {
            return false;
        };
        sha256(sent.as_bytes()).ct_eq(want).into()
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

async fn require_token(State(token): State<Arc<Token>>, req: Request, next: Next) -> Response {
    if token.admits(req.headers().get(header::AUTHORIZATION)) {
        return next.run(req).await;
    }
    // Debug only: anyone who can reach the port can make these.
    tracing::debug!(
        path = req.uri().path(),
        "node rpc: request without the cluster token"
    );
    rejection(
        StatusCode::UNAUTHORIZED,
        "missing or wrong cluster token (Authorization: Bearer <token>)",
    )
}

async fn no_route(req: Request) -> Response {
    rejection(
        StatusCode::NOT_FOUND,
        &format!(
            "no node rpc route for {} {}",
            req.method(),
            req.uri().path()
        ),
    )
}

fn rejection(status: StatusCode, error: &str) -> Response {
    let body = rpc::encode_line(&RpcRejection {
        error: error.to_string(),
    });
    with_type(status, rpc::JSON, body.into())
}

fn with_type(status: StatusCode, content_type: &'static str, body: Body) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A request body as `T`. A body that does not parse is the caller's
/// mistake (400); one over the limit keeps its 413.
struct Call<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Call<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|r| rejection(r.status(), &format!("request body: {}", r.body_text())))?;
        serde_json::from_slice(&bytes).map(Call).map_err(|e| {
            answer::<()>(
                "parse",
                Err(NodeError::InvalidInput(format!("request body: {e}"))),
            )
        })
    }
}

/// A call's result as its answer: 200 with the value, or the error's
/// status with the error.
fn answer<T: Serialize>(method: &'static str, result: Result<T, NodeError>) -> Response {
    match result {
        Ok(v) => with_type(StatusCode::OK, rpc::JSON, rpc::encode_line(&v).into()),
        Err(e) => {
            if let NodeError::Internal(msg) = &e {
                // Logged here once; the caller logs its side.
                tracing::warn!(method, error = %msg, "node rpc call failed");
            }
            let status = StatusCode::from_u16(rpc::status_of(&e))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            with_type(status, rpc::JSON, rpc::encode_line(&e).into())
        }
    }
}

async fn create(State(s): State<Rpc>, Call(spec): Call<SandboxSpec>) -> Response {
    answer("create", s.node.create(spec).await)
}

async fn kill(State(s): State<Rpc>, Call(r): Call<rpc::SandboxRef>) -> Response {
    answer("kill", s.node.kill(&r.sandbox_id).await)
}

async fn set_end_at(State(s): State<Rpc>, Call(r): Call<rpc::SetEndAtRequest>) -> Response {
    answer(
        "set_end_at",
        s.node.set_end_at(&r.sandbox_id, r.end_at).await,
    )
}

async fn get_one(State(s): State<Rpc>, Call(r): Call<rpc::SandboxRef>) -> Response {
    answer("get", s.node.get(&r.sandbox_id).await)
}

async fn list(State(s): State<Rpc>) -> Response {
    answer("list", s.node.list().await)
}

async fn metrics(State(s): State<Rpc>, Call(r): Call<rpc::SandboxRef>) -> Response {
    answer("metrics", s.node.metrics(&r.sandbox_id).await)
}

async fn logs(State(s): State<Rpc>, Call(r): Call<rpc::SandboxRef>) -> Response {
    answer("logs", s.node.logs(&r.sandbox_id).await)
}

async fn pause(State(s): State<Rpc>, Call(r): Call<rpc::PauseRequest>) -> Response {
    answer("pause", s.node.pause(&r.sandbox_id, r.mode).await)
}

async fn resume(State(s): State<Rpc>, Call(r): Call<rpc::ResumeRequest>) -> Response {
    answer("resume", s.node.resume(&r.sandbox_id, r.end_at).await)
}

async fn fork(State(s): State<Rpc>, Call(r): Call<rpc::ForkRequest>) -> Response {
    answer("fork", s.node.fork(&r.source, r.specs).await)
}

async fn snapshot(State(s): State<Rpc>, Call(r): Call<rpc::SnapshotRequest>) -> Response {
    answer(
        "snapshot",
        s.node
            .snapshot(&r.source, &r.template_id, &r.build_id)
            .await,
    )
}

async fn update_network(
    State(s): State<Rpc>,
    Call(r): Call<rpc::UpdateNetworkRequest>,
) -> Response {
    answer(
        "update_network",
        s.node
            .update_network(&r.sandbox_id, r.network, r.allow_internet_access)
            .await,
    )
}

async fn network_logs(State(s): State<Rpc>, Call(r): Call<rpc::SandboxRef>) -> Response {
    answer("network_logs", s.node.network_logs(&r.sandbox_id).await)
}

async fn delete_build(State(s): State<Rpc>, Call(r): Call<rpc::DeleteBuildRequest>) -> Response {
    answer(
        "delete_build",
        s.builder.delete_build(&r.template_id, &r.build_id).await,
    )
}

/// A keep-alive timer whose first tick is one interval from now.
fn keepalive() -> Interval {
    let mut tick = tokio::time::interval_at(
        Instant::now() + rpc::KEEPALIVE_INTERVAL,
        rpc::KEEPALIVE_INTERVAL,
    );
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick
}

fn ndjson(lines: impl Stream<Item = Vec<u8>> + Send + 'static) -> Response {
    use futures_util::StreamExt as _;
    let body = Body::from_stream(lines.map(Ok::<_, std::convert::Infallible>));
    with_type(StatusCode::OK, rpc::NDJSON, body)
}

/// `GET /rpc/v1/events`. The stream is polled by the connection only: no
/// task of its own, so when the reader goes away (noticed at the latest
/// when a keep-alive cannot be written) the subscription is dropped with
/// the response body.
async fn events(State(s): State<Rpc>) -> Response {
    // Subscribed before the headers go out: see the module docs of
    // `arca_proto::rpc`.
    let rx = s.node.events();
    let lines = futures_util::stream::unfold((rx, keepalive()), |(mut rx, mut tick)| async move {
        let line = tokio::select! {
            ev = rx.recv() => match ev {
                Ok(ev) => rpc::encode_line::<SandboxEvent>(&ev),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // Ending the stream tells the reader there was a gap:
                    // it reconnects and reconciles.
                    tracing::warn!(missed = n, "node rpc: events reader fell behind, ending its stream");
                    return None;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            },
            _ = tick.tick() => rpc::KEEPALIVE_LINE.to_vec(),
        };
        Some((line, (rx, tick)))
    });
    ndjson(lines)
}

type BuildFuture = Pin<Box<dyn Future<Output = Result<BuildResult, BuildFailure>> + Send>>;

/// Where a build stream is.
struct BuildStream {
    /// The build, until it has returned.
    run: Option<BuildFuture>,
    logs: mpsc::UnboundedReceiver<BuildLog>,
    /// Its result, once the build returned, until the logs are drained.
    result: Option<Result<BuildResult, BuildFailure>>,
    tick: Interval,
}

/// `POST /rpc/v1/build`. The build future is polled by the response body:
/// a reader that goes away drops it, which cancels the build as dropping
/// it does in one process.
async fn build(State(s): State<Rpc>, Call(spec): Call<BuildSpec>) -> Response {
    let (tx, rx) = mpsc::unbounded_channel();
    let builder = Arc::clone(&s.builder);
    let run: BuildFuture = Box::pin(async move { builder.build(spec, tx).await });
    let state = BuildStream {
        run: Some(run),
        logs: rx,
        result: None,
        tick: keepalive(),
    };
    let lines = futures_util::stream::unfold(state, |mut st| async move {
        let line = next_build_line(&mut st).await?;
        Some((line, st))
    });
    ndjson(lines)
}

/// The next line of a build stream; `None` after the final one.
async fn next_build_line(st: &mut BuildStream) -> Option<Vec<u8>> {
    if let Some(run) = st.run.as_mut() {
        tokio::select! {
            // Lines before the result, in the order they were sent.
            biased;
            Some(log) = st.logs.recv() => return Some(rpc::encode_line(&BuildLine::Log(log))),
            r = run => {
                st.run = None;
                st.result = Some(r);
            }
            _ = st.tick.tick() => return Some(rpc::KEEPALIVE_LINE.to_vec()),
        }
    }
    // The build returned: what it said before returning is queued (a clone
    // of the sender it kept alive may still be open, so do not wait on it).
    if let Ok(log) = st.logs.try_recv() {
        return Some(rpc::encode_line(&BuildLine::Log(log)));
    }
    let line = match st.result.take()? {
        Ok(done) => BuildLine::Done(done),
        Err(failed) => BuildLine::Failed(failed),
    };
    Some(rpc::encode_line(&line))
}
