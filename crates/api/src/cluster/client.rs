//! The api's side of the node RPC ([`arca_proto::rpc`]): a [`NodeService`]
//! and [`BuildService`] that reach one node over HTTP, so the rest of the
//! api does not know whether its node is in-process or on another host.
//!
//! Short calls (lookups, kill, deadlines, logs, network rules, deleting a
//! build) give up after [`SHORT_CALL_TIMEOUT`]; calls that make or move a
//! sandbox (create, fork, snapshot, pause, resume) and builds wait as long
//! as the node works on them, which can be minutes when a template is
//! pulled first. Streams count a connection as dead after
//! [`rpc::KEEPALIVE_TIMEOUT`] without a line. Failures to reach the node or
//! to understand it are [`NodeError::Internal`] naming the node's URL.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arca_proto::build::{BuildFailure, BuildLogSink, BuildResult, BuildService, BuildSpec};
use arca_proto::cluster::bearer;
use arca_proto::network::{EgressLogEntry, NetworkSpec};
use arca_proto::node::{
    BoxFuture, LogEntry, MetricSample, NodeError, NodeService, PauseMode, SandboxEvent, SandboxId,
    SandboxSpec, SandboxStatus,
};
use arca_proto::rpc::{self, BuildLine, LineBuffer};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, oneshot, watch};

/// How long a TCP connect to a node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a short call may take, answer read included.
const SHORT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// First pause before the event stream is opened again after it dropped.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between attempts to open the event stream.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Largest unary answer read, bytes (a list of 2000 egress log entries is
/// well under 1 MiB).
const MAX_ANSWER_BYTES: usize = 64 << 20;
/// Events kept for a slow subscriber before it sees `Lagged`.
const EVENTS_BUFFERED: usize = 1024;
/// TCP keep-alive on node connections, so a host that vanished is noticed
/// on long calls that send nothing for minutes.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// A node reached through its RPC. Cheap to clone; clones share one
/// connection pool and one event stream, which a background task keeps open
/// (reconnecting with backoff) from the first call of
/// [`events`](NodeService::events) or [`reconnects`](NodeClient::reconnects)
/// until the last clone is dropped.
#[derive(Clone)]
pub struct NodeClient {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    events: broadcast::Sender<SandboxEvent>,
    reconnects: watch::Receiver<u64>,
    /// Where the events task runs.
    runtime: tokio::runtime::Handle,
    /// What the events task takes when it starts, on the first call of
    /// [`NodeService::events`] or [`NodeClient::reconnects`]: a client made
    /// only to check a URL opens no stream.
    follow: Mutex<Option<Follow>>,
    /// Dropped with the last clone: tells the events task to end.
    _stop: oneshot::Sender<()>,
}

/// The events task's half.
struct Follow {
    count: watch::Sender<u64>,
    stopped: oneshot::Receiver<()>,
}

/// What a request needs: where, with which token, over which pool.
#[derive(Clone)]
struct Conn {
    /// `http://host:port`, no trailing slash.
    base: Arc<str>,
    auth: HeaderValue,
    http: Client<HttpConnector, Full<Bytes>>,
    /// The node id answers must carry, when they carry one at all.
    expected: Option<Arc<str>>,
}

impl fmt::Debug for NodeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the token.
        f.debug_struct("NodeClient")
            .field("url", &self.inner.conn.base)
            .finish_non_exhaustive()
    }
}

impl NodeClient {
    /// A client of the node whose RPC is at `rpc_url` (`http://host:port`,
    /// as the node registered it), authenticating with the cluster
    /// `token`. Must be called inside a Tokio runtime: the node's events
    /// are followed there once asked for.
    ///
    /// A URL that is not `http://host[:port]` or an empty token is
    /// [`NodeError::InvalidInput`]; no runtime is [`NodeError::Internal`].
    pub fn new(rpc_url: &str, token: &str) -> Result<NodeClient, NodeError> {
        NodeClient::make(rpc_url, token, None)
    }

    /// As [`NodeClient::new`], for the node `node_id`: an answer naming
    /// another node (in [`rpc::NODE_ID_HEADER`]) is refused as
    /// [`NodeError::Unavailable`], so a machine that took over the address
    /// is never taken for this node.
    pub fn for_node(rpc_url: &str, token: &str, node_id: &str) -> Result<NodeClient, NodeError> {
        NodeClient::make(rpc_url, token, Some(node_id))
    }

    fn make(rpc_url: &str, token: &str, node_id: Option<&str>) -> Result<NodeClient, NodeError> {
        let base = base_url(rpc_url)?;
        if token.is_empty() {
            return Err(NodeError::InvalidInput("the cluster token is empty".into()));
        }
        let mut auth = HeaderValue::from_str(&bearer(token)).map_err(|_| {
            NodeError::InvalidInput("the cluster token is not valid in an HTTP header".into())
        })?;
        auth.set_sensitive(true);
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            NodeError::Internal("a node client must be made inside a Tokio runtime".into())
        })?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(TCP_KEEPALIVE));
        let conn = Conn {
            base: base.into(),
            auth,
            http: Client::builder(TokioExecutor::new()).build(connector),
            expected: node_id.map(Arc::from),
        };
        let (events, _) = broadcast::channel(EVENTS_BUFFERED);
        let (count, reconnects) = watch::channel(0);
        let (stop, stopped) = oneshot::channel();
        Ok(NodeClient {
            inner: Arc::new(Inner {
                conn,
                events,
                reconnects,
                runtime,
                follow: Mutex::new(Some(Follow { count, stopped })),
                _stop: stop,
            }),
        })
    }

    /// Starts the events task unless it runs.
    fn follow_events(&self) {
        let inner = &self.inner;
        let taken = inner
            .follow
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(Follow { count, stopped }) = taken {
            inner.runtime.spawn(follow_events(
                inner.conn.clone(),
                inner.events.clone(),
                count,
                stopped,
            ));
        }
    }

    /// The node's RPC base URL.
    pub fn url(&self) -> &str {
        &self.inner.conn.base
    }

    /// How many times the event stream was opened: 1 after the first
    /// connection, one more after each reconnection. Events sent while it
    /// was down are lost, so a change means "reconcile with `list`".
    pub fn reconnects(&self) -> watch::Receiver<u64> {
        self.follow_events();
        self.inner.reconnects.clone()
    }

    async fn short<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        body: Bytes,
    ) -> Result<T, NodeError> {
        let conn = &self.inner.conn;
        tokio::time::timeout(SHORT_CALL_TIMEOUT, conn.call(method, path, body))
            .await
            .unwrap_or_else(|_| {
                Err(conn.failure(
                    method,
                    &format!("no answer within {}s", SHORT_CALL_TIMEOUT.as_secs()),
                ))
            })
    }

    async fn long<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        body: Bytes,
    ) -> Result<T, NodeError> {
        self.inner.conn.call(method, path, body).await
    }
}

/// `http://host[:port]` from what a node registered, trailing `/` dropped.
fn base_url(rpc_url: &str) -> Result<String, NodeError> {
    let invalid = || {
        NodeError::InvalidInput(format!(
            "node rpc url '{rpc_url}' is not of the form http://host:port"
        ))
    };
    let uri: http::Uri = rpc_url.parse().map_err(|_| invalid())?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(invalid());
    };
    let bare_path = matches!(uri.path(), "" | "/") && uri.query().is_none();
    if scheme != "http" || !bare_path || authority.as_str().contains('@') {
        return Err(invalid());
    }
    Ok(format!("http://{authority}"))
}

fn json<T: Serialize>(v: &T) -> Bytes {
    rpc::encode_line(v).into()
}

impl Conn {
    fn failure(&self, method: &str, reason: &str) -> NodeError {
        NodeError::Internal(format!("node {}: {method}: {reason}", self.base))
    }

    /// Sends a request and waits for the answer's head.
    async fn send(
        &self,
        method: &'static str,
        verb: Method,
        path: &str,
        body: Bytes,
    ) -> Result<http::Response<Incoming>, NodeError> {
        let mut req = Request::builder()
            .method(verb)
            .uri(format!("{}{path}", self.base))
            .header(header::AUTHORIZATION, self.auth.clone())
            .header(header::CONTENT_TYPE, rpc::JSON);
        if let Some(expected) = &self.expected {
            // The node refuses a request meant for another node.
            req = req.header(rpc::NODE_ID_HEADER, expected.as_ref());
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| self.failure(method, &e.to_string()))?;
        let resp = self.http.request(req).await.map_err(|e| {
            let why = arca_proto::error_chain(&e);
            if e.is_connect() {
                // Nothing was sent: another node may be tried.
                NodeError::Unavailable(format!("node {}: {method}: {why}", self.base))
            } else {
                self.failure(method, &why)
            }
        })?;
        if let (Some(expected), Some(answered)) =
            (&self.expected, resp.headers().get(rpc::NODE_ID_HEADER))
        {
            if answered.as_bytes() != expected.as_bytes() {
                return Err(NodeError::Unavailable(format!(
                    "node {}: {method}: answered by node '{}', not '{expected}'",
                    self.base,
                    String::from_utf8_lossy(answered.as_bytes())
                )));
            }
        }
        Ok(resp)
    }

    /// A unary call: its result, or the error the answer stands for.
    async fn call<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        body: Bytes,
    ) -> Result<T, NodeError> {
        let resp = self.send(method, Method::POST, path, body).await?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| self.failure(method, &format!("reading the answer: {e}")))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(rpc::error_from_answer(&self.base, status.as_u16(), &body));
        }
        serde_json::from_slice(&body)
            .map_err(|e| self.failure(method, &format!("answer does not parse: {e}")))
    }

    /// Opens a stream: its body once the node answered 200.
    async fn open_stream(
        &self,
        method: &'static str,
        verb: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Incoming, NodeError> {
        let resp = self.send(method, verb, path, body).await?;
        let status = resp.status();
        if status == StatusCode::OK {
            return Ok(resp.into_body());
        }
        let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Err(rpc::error_from_answer(&self.base, status.as_u16(), &body))
    }
}

/// Reads NDJSON lines off a stream body, noticing a silent peer.
struct Lines {
    body: Incoming,
    buf: LineBuffer,
}

impl Lines {
    fn new(body: Incoming) -> Lines {
        Lines {
            body,
            buf: LineBuffer::new(rpc::MAX_LINE_BYTES),
        }
    }

    /// The next line, keep-alives included; `Ok(None)` at a clean end.
    async fn next(&mut self) -> Result<Option<Vec<u8>>, String> {
        loop {
            if let Some(line) = self.buf.next_line().map_err(|e| e.to_string())? {
                return Ok(Some(line));
            }
            let frame = tokio::time::timeout(rpc::KEEPALIVE_TIMEOUT, self.body.frame())
                .await
                .map_err(|_| format!("nothing heard for {}s", rpc::KEEPALIVE_TIMEOUT.as_secs()))?;
            match frame {
                None if self.buf.pending() == 0 => return Ok(None),
                None => return Err("stream cut in the middle of a line".into()),
                Some(Err(e)) => return Err(arca_proto::error_chain(&e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.push(&data);
                    }
                }
            }
        }
    }
}

/// Keeps `GET /rpc/v1/events` open and feeds `events`, until `stop`
/// resolves (the last [`NodeClient`] clone was dropped).
async fn follow_events(
    conn: Conn,
    events: broadcast::Sender<SandboxEvent>,
    count: watch::Sender<u64>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut backoff = FIRST_BACKOFF;
    // Warn once per outage, not on every attempt of it.
    let mut warned = false;
    loop {
        let ended = tokio::select! {
            _ = &mut stop => return,
            ended = stream_events(&conn, &events, &count) => ended,
        };
        match ended {
            Ended::Refused(e) if !warned => {
                tracing::warn!(node = %conn.base, error = %e, "cannot open the node's event stream; retrying");
                warned = true;
            }
            Ended::Refused(e) => {
                tracing::debug!(node = %conn.base, error = %e, "cannot open the node's event stream");
            }
            Ended::Dropped(e) => {
                tracing::warn!(node = %conn.base, error = %e, "the node's event stream dropped; reconnecting");
                backoff = FIRST_BACKOFF;
                warned = true;
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How an event stream ended.
enum Ended {
    /// It could not be opened.
    Refused(String),
    /// It was open and then ended.
    Dropped(String),
}

async fn stream_events(
    conn: &Conn,
    events: &broadcast::Sender<SandboxEvent>,
    count: &watch::Sender<u64>,
) -> Ended {
    // Bounded: a node that takes the connection but never answers would
    // otherwise keep the stream down without a retry.
    let opened = tokio::time::timeout(
        SHORT_CALL_TIMEOUT,
        conn.open_stream("events", Method::GET, rpc::EVENTS, Bytes::new()),
    )
    .await;
    let body = match opened {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => return Ended::Refused(e.to_string()),
        Err(_) => return Ended::Refused("no answer".into()),
    };
    count.send_modify(|n| *n += 1);
    if *count.borrow() > 1 {
        tracing::info!(node = %conn.base, "the node's event stream is open again");
    }
    let mut lines = Lines::new(body);
    loop {
        let line = match lines.next().await {
            Ok(Some(line)) => line,
            Ok(None) => return Ended::Dropped("the node ended the stream".into()),
            Err(e) => return Ended::Dropped(e),
        };
        match rpc::decode_event_line(&line) {
            Ok(Some(ev)) => {
                // No subscriber yet is fine: nobody to tell.
                let _ = events.send(ev);
            }
            Ok(None) => {}
            Err(e) => {
                // A newer node's event this api does not know: skipping it
                // is all it can do; the next reconciliation catches up.
                tracing::warn!(node = %conn.base, error = %e, "skipping an event line that does not parse");
            }
        }
    }
}

impl NodeService for NodeClient {
    fn create(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<SandboxStatus, NodeError>> {
        Box::pin(async move { self.long("create", rpc::CREATE, json(&spec)).await })
    }

    fn kill<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move { self.short("kill", rpc::KILL, json(&sandbox_ref(id))).await })
    }

    fn set_end_at<'a>(
        &'a self,
        id: &'a SandboxId,
        end_at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<SandboxStatus, NodeError>> {
        let body = json(&rpc::SetEndAtRequest {
            sandbox_id: id.clone(),
            end_at,
        });
        Box::pin(async move { self.short("set_end_at", rpc::SET_END_AT, body).await })
    }

    fn get<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<SandboxStatus, NodeError>> {
        Box::pin(async move { self.short("get", rpc::GET, json(&sandbox_ref(id))).await })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<SandboxStatus>, NodeError>> {
        Box::pin(async move { self.short("list", rpc::LIST, Bytes::new()).await })
    }

    fn metrics<'a>(
        &'a self,
        id: &'a SandboxId,
    ) -> BoxFuture<'a, Result<Vec<MetricSample>, NodeError>> {
        Box::pin(async move {
            self.short("metrics", rpc::METRICS, json(&sandbox_ref(id)))
                .await
        })
    }

    fn logs<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<Vec<LogEntry>, NodeError>> {
        Box::pin(async move { self.short("logs", rpc::LOGS, json(&sandbox_ref(id))).await })
    }

    /// Events from now on; starts following the node's event stream
    /// (see [`NodeClient::reconnects`]).
    fn events(&self) -> broadcast::Receiver<SandboxEvent> {
        let rx = self.inner.events.subscribe();
        self.follow_events();
        rx
    }

    fn pause<'a>(
        &'a self,
        id: &'a SandboxId,
        mode: PauseMode,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        let body = json(&rpc::PauseRequest {
            sandbox_id: id.clone(),
            mode,
        });
        Box::pin(async move { self.long("pause", rpc::PAUSE, body).await })
    }

    fn resume<'a>(
        &'a self,
        id: &'a SandboxId,
        end_at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<SandboxStatus, NodeError>> {
        let body = json(&rpc::ResumeRequest {
            sandbox_id: id.clone(),
            end_at,
        });
        Box::pin(async move { self.long("resume", rpc::RESUME, body).await })
    }

    fn fork<'a>(
        &'a self,
        source: &'a SandboxId,
        specs: Vec<SandboxSpec>,
    ) -> BoxFuture<'a, Result<Vec<Result<SandboxStatus, NodeError>>, NodeError>> {
        let body = json(&rpc::ForkRequest {
            source: source.clone(),
            specs,
        });
        Box::pin(async move { self.long("fork", rpc::FORK, body).await })
    }

    fn snapshot<'a>(
        &'a self,
        source: &'a SandboxId,
        template_id: &'a str,
        build_id: &'a str,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        let body = json(&rpc::SnapshotRequest {
            source: source.clone(),
            template_id: template_id.to_string(),
            build_id: build_id.to_string(),
        });
        Box::pin(async move { self.long("snapshot", rpc::SNAPSHOT, body).await })
    }

    fn update_network<'a>(
        &'a self,
        id: &'a SandboxId,
        network: NetworkSpec,
        allow_internet_access: bool,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        let body = json(&rpc::UpdateNetworkRequest {
            sandbox_id: id.clone(),
            network,
            allow_internet_access,
        });
        Box::pin(async move {
            self.short("update_network", rpc::UPDATE_NETWORK, body)
                .await
        })
    }

    fn network_logs<'a>(
        &'a self,
        id: &'a SandboxId,
    ) -> BoxFuture<'a, Result<Vec<EgressLogEntry>, NodeError>> {
        Box::pin(async move {
            self.short("network_logs", rpc::NETWORK_LOGS, json(&sandbox_ref(id)))
                .await
        })
    }
}

fn sandbox_ref(id: &SandboxId) -> rpc::SandboxRef {
    rpc::SandboxRef {
        sandbox_id: id.clone(),
    }
}

impl BuildService for NodeClient {
    /// Forwards each log line to `logs` as it arrives; every line is sent
    /// before the result is returned.
    fn build(
        &self,
        spec: BuildSpec,
        logs: BuildLogSink,
    ) -> BoxFuture<'_, Result<BuildResult, BuildFailure>> {
        Box::pin(async move {
            let conn = &self.inner.conn;
            let failure = |reason: String| BuildFailure {
                message: format!("build on node {}: {reason}", conn.base),
                step: None,
            };
            let body = conn
                .open_stream("build", Method::POST, rpc::BUILD, json(&spec))
                .await
                .map_err(|e| failure(e.to_string()))?;
            let mut lines = Lines::new(body);
            loop {
                let line = match lines.next().await {
                    Ok(Some(line)) => line,
                    Ok(None) => {
                        return Err(failure("the node ended the stream without a result".into()));
                    }
                    Err(e) => return Err(failure(format!("lost the node: {e}"))),
                };
                match rpc::decode_build_line(&line) {
                    Ok(Some(BuildLine::Log(log))) => {
                        // The receiver may have stopped listening; the
                        // build goes on.
                        let _ = logs.send(log);
                    }
                    Ok(Some(BuildLine::Done(result))) => return Ok(result),
                    Ok(Some(BuildLine::Failed(failed))) => return Err(failed),
                    Ok(None) => {}
                    Err(e) => return Err(failure(format!("a stream line does not parse: {e}"))),
                }
            }
        })
    }

    fn delete_build<'a>(
        &'a self,
        template_id: &'a str,
        build_id: &'a str,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        let body = json(&rpc::DeleteBuildRequest {
            template_id: template_id.to_string(),
            build_id: build_id.to_string(),
        });
        Box::pin(async move { self.short("delete_build", rpc::DELETE_BUILD, body).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bare_http_urls_name_a_node() {
        assert_eq!(
            base_url("http://10.0.0.5:3100").unwrap(),
            "http://10.0.0.5:3100"
        );
        assert_eq!(
            base_url("http://node-1:3100/").unwrap(),
            "http://node-1:3100"
        );
        for bad in [
            "",
            "10.0.0.5:3100",
            "https://10.0.0.5:3100",
            "http://10.0.0.5:3100/rpc",
            "http://10.0.0.5:3100/?x=1",
            "http://user:pw@10.0.0.5:3100",
            "ftp://10.0.0.5",
        ] {
            assert!(
                matches!(base_url(bad), Err(NodeError::InvalidInput(_))),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_client_needs_a_token() {
        assert!(matches!(
            NodeClient::new("http://127.0.0.1:1", ""),
            Err(NodeError::InvalidInput(_))
        ));
        assert!(matches!(
            NodeClient::new("http://127.0.0.1:1", "a\nb"),
            Err(NodeError::InvalidInput(_))
        ));
    }

    #[test]
    fn a_client_outside_a_runtime_is_refused_not_a_panic() {
        assert!(matches!(
            NodeClient::new("http://127.0.0.1:1", "t"),
            Err(NodeError::Internal(_))
        ));
    }
}
