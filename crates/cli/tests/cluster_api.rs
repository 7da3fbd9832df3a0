//! Cluster mode of the api end to end (issue 7, ADR 0006), without root:
//! `arca_api::Api::open_cluster` on a real database and a real HTTP port,
//! and fake nodes each behind the real node RPC server
//! (`arca_node::rpc::router`) on a loopback port. The tests play the
//! nodes' part of the protocol themselves (registration, heartbeats they
//! can stop) and look only at what users and nodes see: E2B REST answers,
//! `/cluster/v1` answers, and which sandboxes each fake node holds.
//!
//! No test depends on how long anything takes: waits poll for a condition
//! and give up after [`WAIT`].
#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arca_api::{Api, ApiConfig, ClusterConfig};
use arca_proto::build::{
    BASE_BUILD_ID, BASE_TEMPLATE_ID, BuildFailure, BuildLogSink, BuildResult, BuildService,
    BuildSpec,
};
use arca_proto::cluster::{
    CachedBuild, Heartbeat, NodeCapacity, NodeInfo, NodeLoad, NodeRegistration, NodeStatus,
    RouteInfo, bearer,
};
use arca_proto::network::{EgressLogEntry, NetworkSpec};
use arca_proto::node::{
    BoxFuture, EndReason, LogEntry, MetricSample, NodeError, NodeService, PauseMode, SandboxEvent,
    SandboxId, SandboxSpec, SandboxState, SandboxStatus,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{Method, Request};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

// Fresh databases per test, on SQLite or (with ARCA_TEST_PG_URL) PostgreSQL:
// the api's own helper, shared rather than copied.
#[path = "../../api/src/db/test_db.rs"]
#[allow(dead_code, unused_macros, unused_imports, unreachable_pub)]
mod test_db;
use test_db::TestDb;

const TOKEN: &str = "cluster-api-test-token-0123456789";
/// How often the test's nodes heartbeat.
const HEARTBEAT: Duration = Duration::from_millis(200);
/// Silence after which the api counts a node lost: ten heartbeats, so a
/// busy machine does not lose a node by accident.
const LOST_AFTER: Duration = Duration::from_millis(2000);
/// Upper bound of every wait; reaching it fails the test.
const WAIT: Duration = Duration::from_secs(20);

// ---- a fake node ---------------------------------------------------------------

/// A node that keeps its sandboxes in a map, refuses creates beyond `max`
/// as a real node does, and records every create it was asked for.
struct FakeNode {
    max: usize,
    sandboxes: Mutex<BTreeMap<SandboxId, SandboxStatus>>,
    /// Every create's spec, refused ones included.
    specs: Mutex<Vec<SandboxSpec>>,
    events: broadcast::Sender<SandboxEvent>,
}

impl FakeNode {
    fn new(max: usize) -> Arc<FakeNode> {
        Arc::new(FakeNode {
            max,
            sandboxes: Mutex::default(),
            specs: Mutex::default(),
            events: broadcast::channel(256).0,
        })
    }

    /// Ids of the sandboxes it holds.
    fn ids(&self) -> BTreeSet<String> {
        self.sandboxes
            .lock()
            .unwrap()
            .keys()
            .map(|id| id.as_str().to_string())
            .collect()
    }

    fn count(&self) -> usize {
        self.sandboxes.lock().unwrap().len()
    }

    fn specs(&self) -> Vec<SandboxSpec> {
        self.specs.lock().unwrap().clone()
    }

    /// The spec of the create that made `id`.
    fn spec_of(&self, id: &str) -> Option<SandboxSpec> {
        self.specs
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|s| s.sandbox_id.as_str() == id)
            .cloned()
    }

    /// Readers of its event stream (the api replicas following it).
    fn followers(&self) -> usize {
        self.events.receiver_count()
    }

    /// The sandbox ends by itself (its init exited), as a node says so.
    fn end(&self, id: &str) {
        let id = SandboxId::parse(id).unwrap();
        assert!(self.sandboxes.lock().unwrap().remove(&id).is_some());
        let _ = self.events.send(SandboxEvent::Ended {
            sandbox_id: id,
            reason: EndReason::Exited,
        });
    }

    /// The sandbox vanishes without a word (lost while the node was away).
    fn lose(&self, id: &str) {
        let id = SandboxId::parse(id).unwrap();
        assert!(self.sandboxes.lock().unwrap().remove(&id).is_some());
    }

    /// A sandbox appears that no api asked for.
    fn adopt(&self, id: &str) {
        let id = SandboxId::parse(id).unwrap();
        let status = SandboxStatus {
            sandbox_id: id.clone(),
            template_id: BASE_TEMPLATE_ID.into(),
            team_id: "someone".into(),
            state: SandboxState::Running,
            started_at: Utc::now(),
            end_at: Utc::now() + chrono::TimeDelta::hours(1),
            cpu_count: 1,
            memory_mb: 256,
            disk_size_mb: 1024,
            envd_version: "0.6.13".into(),
            pause_mode: None,
            runtime: Default::default(),
        };
        self.sandboxes.lock().unwrap().insert(id, status);
    }

    fn with<T>(
        &self,
        id: &SandboxId,
        f: impl FnOnce(&mut SandboxStatus) -> T,
    ) -> Result<T, NodeError> {
        let mut map = self.sandboxes.lock().unwrap();
        let s = map
            .get_mut(id)
            .ok_or_else(|| NodeError::SandboxNotFound(id.clone()))?;
        Ok(f(s))
    }
}

impl NodeService for FakeNode {
    fn create(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<SandboxStatus, NodeError>> {
        Box::pin(async move {
            self.specs.lock().unwrap().push(spec.clone());
            let mut map = self.sandboxes.lock().unwrap();
            if map.len() >= self.max {
                return Err(NodeError::Capacity(format!(
                    "this node holds {} sandboxes, its most",
                    self.max
                )));
            }
            if map.contains_key(&spec.sandbox_id) {
                return Err(NodeError::Conflict(format!(
                    "sandbox {} exists",
                    spec.sandbox_id
                )));
            }
            let status = SandboxStatus {
                sandbox_id: spec.sandbox_id.clone(),
                template_id: spec.template_id.clone(),
                team_id: spec.team_id.clone(),
                state: SandboxState::Running,
                started_at: Utc::now(),
                end_at: spec.end_at,
                cpu_count: spec.cpu_count,
                memory_mb: spec.memory_mb,
                disk_size_mb: spec.disk_size_mb,
                envd_version: "0.6.13".into(),
                pause_mode: None,
                runtime: spec.runtime.unwrap_or_default(),
            };
            map.insert(spec.sandbox_id, status.clone());
            Ok(status)
        })
    }

    fn kill<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            if self.sandboxes.lock().unwrap().remove(id).is_none() {
                return Err(NodeError::SandboxNotFound(id.clone()));
            }
            let _ = self.events.send(SandboxEvent::Ended {
                sandbox_id: id.clone(),
                reason: EndReason::Killed,
            });
            Ok(())
        })
    }

    fn set_end_at<'a>(
        &'a self,
        id: &'a SandboxId,
        end_at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<SandboxStatus, NodeError>> {
        Box::pin(async move {
            self.with(id, |s| {
                s.end_at = end_at;
                s.clone()
            })
        })
    }

    fn get<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<SandboxStatus, NodeError>> {
        Box::pin(async move { self.with(id, |s| s.clone()) })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<SandboxStatus>, NodeError>> {
        Box::pin(async move { Ok(self.sandboxes.lock().unwrap().values().cloned().collect()) })
    }

    fn metrics<'a>(
        &'a self,
        id: &'a SandboxId,
    ) -> BoxFuture<'a, Result<Vec<MetricSample>, NodeError>> {
        Box::pin(async move {
            self.with(id, |s| {
                vec![MetricSample {
                    timestamp: Utc::now(),
                    cpu_count: s.cpu_count,
                    cpu_used_pct: 1.0,
                    mem_used: 1 << 20,
                    mem_total: u64::from(s.memory_mb) << 20,
                    mem_cache: 0,
                    disk_used: 1 << 20,
                    disk_total: u64::from(s.disk_size_mb) << 20,
                }]
            })
        })
    }

    fn logs<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<Vec<LogEntry>, NodeError>> {
        Box::pin(async move { self.with(id, |_| Vec::new()) })
    }

    fn events(&self) -> broadcast::Receiver<SandboxEvent> {
        self.events.subscribe()
    }

    fn pause<'a>(
        &'a self,
        id: &'a SandboxId,
        mode: PauseMode,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            self.with(id, |s| {
                s.state = SandboxState::Paused;
                s.pause_mode = Some(mode);
            })
        })
    }

    fn resume<'a>(
        &'a self,
        id: &'a SandboxId,
        end_at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<SandboxStatus, NodeError>> {
        Box::pin(async move {
            self.with(id, |s| {
                s.state = SandboxState::Running;
                s.pause_mode = None;
                s.end_at = end_at;
                s.clone()
            })
        })
    }

    fn fork<'a>(
        &'a self,
        _source: &'a SandboxId,
        _specs: Vec<SandboxSpec>,
    ) -> BoxFuture<'a, Result<Vec<Result<SandboxStatus, NodeError>>, NodeError>> {
        Box::pin(async { Err(NodeError::InvalidInput("this fake does not fork".into())) })
    }

    fn snapshot<'a>(
        &'a self,
        _source: &'a SandboxId,
        _template_id: &'a str,
        _build_id: &'a str,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async {
            Err(NodeError::InvalidInput(
                "this fake does not snapshot".into(),
            ))
        })
    }

    fn update_network<'a>(
        &'a self,
        id: &'a SandboxId,
        _network: NetworkSpec,
        _allow_internet_access: bool,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move { self.with(id, |_| ()) })
    }

    fn network_logs<'a>(
        &'a self,
        id: &'a SandboxId,
    ) -> BoxFuture<'a, Result<Vec<EgressLogEntry>, NodeError>> {
        Box::pin(async move { self.with(id, |_| Vec::new()) })
    }
}

impl BuildService for FakeNode {
    fn build(
        &self,
        _spec: BuildSpec,
        _logs: BuildLogSink,
    ) -> BoxFuture<'_, Result<BuildResult, BuildFailure>> {
        Box::pin(async {
            Err(BuildFailure {
                message: "this fake does not build".into(),
                step: None,
            })
        })
    }

    fn delete_build<'a>(
        &'a self,
        _template_id: &'a str,
        _build_id: &'a str,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The real node RPC server over a fake node, on a thread and runtime of
/// its own, so that stopping it ends every connection at once, as a node
/// process that dies does.
struct RpcServer {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RpcServer {
    /// Serves `fake` on `addr` (port 0: any free port); returns the
    /// address bound.
    fn start(fake: Arc<FakeNode>, addr: SocketAddr) -> (RpcServer, SocketAddr) {
        let (stop, stopped) = oneshot::channel::<()>();
        let (bound_tx, bound) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                // A restarted node binds the port it had.
                socket.set_reuseaddr(true).unwrap();
                socket.bind(addr).unwrap();
                let listener = socket.listen(64).unwrap();
                bound_tx.send(listener.local_addr().unwrap()).unwrap();
                let app = arca_node::rpc::router(
                    Arc::clone(&fake) as Arc<dyn NodeService>,
                    fake as Arc<dyn BuildService>,
                    TOKEN.into(),
                    None,
                );
                tokio::select! {
                    r = axum::serve(listener, app) => r.unwrap(),
                    _ = stopped => {}
                }
            });
            drop(rt);
        });
        let addr = bound.recv().unwrap();
        (
            RpcServer {
                stop: Some(stop),
                thread: Some(thread),
            },
            addr,
        )
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- HTTP ----------------------------------------------------------------------

/// Status and JSON body (`Null` when empty) of an answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
}

#[derive(Clone)]
struct Http(Client<HttpConnector, Full<Bytes>>);

impl Http {
    fn new() -> Http {
        Http(Client::builder(TokioExecutor::new()).build(HttpConnector::new()))
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let bytes = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(v).unwrap())
            }
            None => Bytes::new(),
        };
        let call = async {
            let resp = self.0.request(req.body(Full::new(bytes)).unwrap()).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
        };
        let (status, body) = tokio::time::timeout(WAIT, call)
            .await
            .unwrap_or_else(|_| panic!("no answer to {url} within {WAIT:?}"))
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
        };
        Answer { status, body }
    }
}

/// Asserts an E2B error body: `{"code": status, "message": "..."}`.
fn assert_e2b_error(a: &Answer, status: u16) {
    assert_eq!(a.status, status, "{a:?}");
    assert_eq!(a.body["code"], status, "{a:?}");
    assert!(
        a.body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{a:?}"
    );
}

/// Waits until `cond` holds; fails the test after [`WAIT`].
async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still waiting for {what} after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- the api -------------------------------------------------------------------

fn cluster_config() -> ClusterConfig {
    ClusterConfig {
        token: TOKEN.into(),
        heartbeat: HEARTBEAT,
        lost_after: LOST_AFTER,
        placement_choices: 3,
    }
}

/// An api replica in cluster mode on `db_url`, serving on a loopback port;
/// returns its base URL.
async fn start_replica(db_url: &str, home: &Path) -> (Api, String) {
    let config = ApiConfig {
        uploads_dir: home.join("uploads"),
        ..ApiConfig::default()
    };
    let api = Api::open_cluster(db_url, config, cluster_config())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(api.clone().serve(listener));
    (api, url)
}

/// One or more api replicas over one database, and an API key.
struct Cluster {
    replicas: Vec<String>,
    key: String,
    http: Http,
    home: tempfile::TempDir,
    db: TestDb,
}

impl Cluster {
    async fn start(db: TestDb) -> Cluster {
        let home = tempfile::tempdir().unwrap();
        let (api, url) = start_replica(&db.url, home.path()).await;
        let key = api.ensure_bootstrap().await.unwrap().unwrap();
        Cluster {
            replicas: vec![url],
            key,
            http: Http::new(),
            home,
            db,
        }
    }

    async fn sqlite() -> Cluster {
        Cluster::start(TestDb::sqlite()).await
    }

    /// Another replica on the same database; returns its index.
    async fn add_replica(&mut self) -> usize {
        let (api, url) = start_replica(&self.db.url, self.home.path()).await;
        assert_eq!(api.ensure_bootstrap().await.unwrap(), None);
        self.replicas.push(url);
        self.replicas.len() - 1
    }

    fn url(&self) -> &str {
        &self.replicas[0]
    }

    /// An E2B call with the API key, to replica `r`.
    async fn e2b_at(&self, r: usize, method: Method, path: &str, body: Option<&Value>) -> Answer {
        let url = format!("{}{path}", self.replicas[r]);
        self.http
            .send(method, &url, &[("x-api-key", self.key.as_str())], body)
            .await
    }

    async fn e2b(&self, method: Method, path: &str, body: Option<&Value>) -> Answer {
        self.e2b_at(0, method, path, body).await
    }

    /// A cluster call with the cluster token, to replica `r`.
    async fn cluster_at(
        &self,
        r: usize,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Answer {
        let url = format!("{}/cluster/v1{path}", self.replicas[r]);
        let auth = bearer(TOKEN);
        self.http
            .send(method, &url, &[("authorization", auth.as_str())], body)
            .await
    }

    async fn cluster(&self, method: Method, path: &str, body: Option<&Value>) -> Answer {
        self.cluster_at(0, method, path, body).await
    }

    /// `POST /sandboxes` of template `base` through replica `r`.
    async fn create_at(&self, r: usize) -> Answer {
        let body = json!({ "templateID": "base", "timeout": 3600 });
        self.e2b_at(r, Method::POST, "/sandboxes", Some(&body))
            .await
    }

    async fn create(&self) -> Answer {
        self.create_at(0).await
    }

    /// A create that must succeed: the new sandbox's id.
    async fn create_ok(&self) -> String {
        let a = self.create().await;
        assert_eq!(a.status, 201, "{a:?}");
        a.body["sandboxID"].as_str().unwrap().to_string()
    }

    /// `GET /v2/sandboxes` through replica `r`: id -> item.
    async fn list_at(&self, r: usize) -> BTreeMap<String, Value> {
        let a = self
            .e2b_at(r, Method::GET, "/v2/sandboxes?limit=100", None)
            .await;
        assert_eq!(a.status, 200, "{a:?}");
        a.body
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["sandboxID"].as_str().unwrap().to_string(), s.clone()))
            .collect()
    }

    async fn list(&self) -> BTreeMap<String, Value> {
        self.list_at(0).await
    }

    async fn get(&self, id: &str) -> Answer {
        self.e2b(Method::GET, &format!("/sandboxes/{id}"), None)
            .await
    }

    /// `GET /cluster/v1/nodes` through replica `r`: id -> info.
    async fn nodes_at(&self, r: usize) -> BTreeMap<String, NodeInfo> {
        let a = self.cluster_at(r, Method::GET, "/nodes", None).await;
        assert_eq!(a.status, 200, "{a:?}");
        let infos: Vec<NodeInfo> = serde_json::from_value(a.body).unwrap();
        infos.into_iter().map(|n| (n.node_id.clone(), n)).collect()
    }

    async fn nodes(&self) -> BTreeMap<String, NodeInfo> {
        self.nodes_at(0).await
    }

    async fn node_status(&self, id: &str) -> Option<NodeStatus> {
        self.nodes().await.get(id).map(|n| n.status)
    }

    /// Sandbox records per node, creating ones included.
    async fn records_per_node(&self) -> BTreeMap<String, u32> {
        self.nodes()
            .await
            .into_iter()
            .map(|(id, n)| (id, n.sandboxes))
            .collect()
    }
}

// ---- a node of the test ----------------------------------------------------------

/// How a test node presents itself.
#[derive(Clone)]
struct NodeSetup {
    /// Sandboxes the fake node really takes.
    max: usize,
    /// `max_sandboxes` it registers with.
    advertised_max: u32,
    /// Sandboxes it reports beside the ones the test made (another tenant's
    /// load, say): makes it a worse choice for placement.
    busy: u32,
    /// Whether it holds the `base` build.
    has_base: bool,
    /// Isolation backends it registers.
    runtimes: &'static [&'static str],
}

impl Default for NodeSetup {
    fn default() -> NodeSetup {
        NodeSetup {
            max: 1000,
            advertised_max: 100,
            busy: 0,
            has_base: true,
            runtimes: &["ns"],
        }
    }
}

/// A fake node, its RPC server, and the heartbeats it sends.
struct Node {
    id: String,
    fake: Arc<FakeNode>,
    setup: NodeSetup,
    rpc: Option<RpcServer>,
    addr: SocketAddr,
    beats: Option<JoinHandle<()>>,
}

fn base_build() -> CachedBuild {
    CachedBuild {
        template_id: BASE_TEMPLATE_ID.into(),
        build_id: BASE_BUILD_ID.into(),
    }
}

fn load_of(fake: &FakeNode, busy: u32) -> NodeLoad {
    let n = busy + u32::try_from(fake.count()).unwrap();
    NodeLoad {
        sandboxes: n,
        running: n,
        ..NodeLoad::default()
    }
}

impl Node {
    /// A node whose RPC server is up; not registered yet.
    fn new(id: &str, setup: NodeSetup) -> Node {
        let fake = FakeNode::new(setup.max);
        let (rpc, addr) = RpcServer::start(Arc::clone(&fake), "127.0.0.1:0".parse().unwrap());
        Node {
            id: id.into(),
            fake,
            setup,
            rpc: Some(rpc),
            addr,
            beats: None,
        }
    }

    fn rpc_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where its edge would be (nothing listens there; only routes name it).
    fn edge_addr(&self) -> String {
        format!(
            "127.0.0.1:{}",
            10_000 + u32::from(self.addr.port()) % 50_000
        )
    }

    fn registration(&self) -> NodeRegistration {
        registration(
            &self.id,
            &self.rpc_url(),
            &self.edge_addr(),
            &self.setup,
            &self.fake,
        )
    }

    /// Registers with the api and starts heartbeating (registering again
    /// when the api answers 404), as `arca node` does.
    async fn join(&mut self, c: &Cluster) {
        let reg = serde_json::to_value(self.registration()).unwrap();
        let a = c.cluster(Method::POST, "/nodes", Some(&reg)).await;
        assert_eq!(a.status, 200, "registering {}: {a:?}", self.id);
        self.start_heartbeats(c);
    }

    fn start_heartbeats(&mut self, c: &Cluster) {
        self.stop_heartbeats();
        let http = c.http.clone();
        let api = c.url().to_string();
        let fake = Arc::clone(&self.fake);
        let (id, rpc_url, edge, setup) = (
            self.id.clone(),
            self.rpc_url(),
            self.edge_addr(),
            self.setup.clone(),
        );
        self.beats = Some(tokio::spawn(async move {
            let auth = bearer(TOKEN);
            let headers = [("authorization", auth.as_str())];
            loop {
                let beat = Heartbeat {
                    load: load_of(&fake, setup.busy),
                    builds: None,
                };
                let url = format!("{api}/cluster/v1/nodes/{id}/heartbeat");
                let body = serde_json::to_value(beat).unwrap();
                let a = http.send(Method::POST, &url, &headers, Some(&body)).await;
                if a.status == 404 {
                    let reg = registration(&id, &rpc_url, &edge, &setup, &fake);
                    let body = serde_json::to_value(reg).unwrap();
                    let url = format!("{api}/cluster/v1/nodes");
                    http.send(Method::POST, &url, &headers, Some(&body)).await;
                }
                tokio::time::sleep(HEARTBEAT).await;
            }
        }));
    }

    /// The node goes silent.
    fn stop_heartbeats(&mut self) {
        if let Some(b) = self.beats.take() {
            b.abort();
        }
    }

    /// Its RPC server goes away (connections refused from now on).
    fn stop_rpc(&mut self) {
        if let Some(mut rpc) = self.rpc.take() {
            rpc.stop();
        }
    }

    /// Its RPC server comes back on the same address.
    fn restart_rpc(&mut self) {
        assert!(self.rpc.is_none());
        let (rpc, addr) = RpcServer::start(Arc::clone(&self.fake), self.addr);
        assert_eq!(addr, self.addr);
        self.rpc = Some(rpc);
    }

    /// Its RPC server comes back on another port (a node restarted with a
    /// new address).
    fn move_rpc(&mut self) {
        assert!(self.rpc.is_none());
        let (rpc, addr) = RpcServer::start(Arc::clone(&self.fake), "127.0.0.1:0".parse().unwrap());
        assert_ne!(addr, self.addr);
        self.addr = addr;
        self.rpc = Some(rpc);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_heartbeats();
    }
}

fn registration(
    id: &str,
    rpc_url: &str,
    edge: &str,
    setup: &NodeSetup,
    fake: &FakeNode,
) -> NodeRegistration {
    NodeRegistration {
        node_id: id.into(),
        rpc_url: rpc_url.into(),
        edge_addr: edge.into(),
        capacity: NodeCapacity {
            max_sandboxes: setup.advertised_max,
            cpu_count: 8,
            memory_mb: 16_384,
        },
        runtimes: setup.runtimes.iter().map(|r| (*r).to_string()).collect(),
        builds: if setup.has_base {
            vec![base_build()]
        } else {
            Vec::new()
        },
        load: load_of(fake, setup.busy),
        version: "test".into(),
    }
}

/// Registered, heartbeating nodes `n1`.. with `setups`.
async fn nodes(c: &Cluster, setups: &[NodeSetup]) -> Vec<Node> {
    let mut out = Vec::new();
    for (i, s) in setups.iter().enumerate() {
        let mut n = Node::new(&format!("n{}", i + 1), s.clone());
        n.join(c).await;
        out.push(n);
    }
    out
}

/// The sandbox ids every node holds, together.
fn held(nodes: &[Node]) -> BTreeSet<String> {
    nodes.iter().flat_map(|n| n.fake.ids()).collect()
}

// ---- 1. auth and validation ------------------------------------------------------

#[tokio::test]
async fn cluster_routes_need_the_token_and_check_registrations() {
    let c = Cluster::sqlite().await;
    let node = Node::new("n1", NodeSetup::default());
    let reg = serde_json::to_value(node.registration()).unwrap();
    let beat = serde_json::to_value(Heartbeat {
        load: NodeLoad::default(),
        builds: None,
    })
    .unwrap();
    let wrong = bearer("not-the-cluster-token-at-all");
    let bad_auths: [&[(&str, &str)]; 4] = [
        &[],
        &[("authorization", wrong.as_str())],
        // The token without "Bearer ".
        &[("authorization", TOKEN)],
        // An E2B API key is not the cluster token.
        &[("x-api-key", c.key.as_str())],
    ];
    let calls: [(Method, &str, Option<&Value>); 5] = [
        (Method::GET, "/cluster/v1/nodes", None),
        (Method::POST, "/cluster/v1/nodes", Some(&reg)),
        (Method::POST, "/cluster/v1/nodes/n1/heartbeat", Some(&beat)),
        (Method::POST, "/cluster/v1/nodes/n1/drain", None),
        (Method::GET, "/cluster/v1/routes/isomething", None),
    ];
    for headers in bad_auths {
        for (method, path, body) in &calls {
            let url = format!("{}{path}", c.url());
            let a = c.http.send(method.clone(), &url, headers, *body).await;
            assert_e2b_error(&a, 401);
        }
    }
    // Nothing of the above registered the node.
    assert!(c.nodes().await.is_empty());

    let mut bad_ids = vec![
        String::new(),
        "N1".into(),
        "node_1".into(),
        "local".into(),
        "a/b".into(),
        "x".repeat(65),
    ];
    bad_ids.push("nöde".into());
    for id in bad_ids {
        let mut r = node.registration();
        r.node_id = id.clone();
        let a = c
            .cluster(
                Method::POST,
                "/nodes",
                Some(&serde_json::to_value(r).unwrap()),
            )
            .await;
        assert_e2b_error(&a, 400);
        assert!(
            a.body["message"].as_str().unwrap().contains("node id"),
            "{id}: {a:?}"
        );
    }
    for edge in ["", "127.0.0.1", "edge.example:3101", "127.0.0.1:port"] {
        let mut r = node.registration();
        r.edge_addr = edge.into();
        let a = c
            .cluster(
                Method::POST,
                "/nodes",
                Some(&serde_json::to_value(r).unwrap()),
            )
            .await;
        assert_e2b_error(&a, 400);
        assert!(
            a.body["message"].as_str().unwrap().contains("edge"),
            "{edge}: {a:?}"
        );
    }
    for rpc in [
        "",
        "https://127.0.0.1:3100",
        "http://127.0.0.1:3100/rpc",
        "nowhere",
    ] {
        let mut r = node.registration();
        r.rpc_url = rpc.into();
        let a = c
            .cluster(
                Method::POST,
                "/nodes",
                Some(&serde_json::to_value(r).unwrap()),
            )
            .await;
        assert_e2b_error(&a, 400);
    }
    assert!(c.nodes().await.is_empty());

    // A heartbeat of a node the api does not know: 404, "register again".
    let a = c
        .cluster(Method::POST, "/nodes/n1/heartbeat", Some(&beat))
        .await;
    assert_e2b_error(&a, 404);

    // A good registration is answered with the timings and listed ready.
    let a = c.cluster(Method::POST, "/nodes", Some(&reg)).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["heartbeat_ms"], 200);
    assert_eq!(a.body["lost_after_ms"], 2000);
    let a = c
        .cluster(Method::POST, "/nodes/n1/heartbeat", Some(&beat))
        .await;
    assert_eq!(a.status, 204, "{a:?}");
    let listed = c.nodes().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed["n1"].status, NodeStatus::Ready);
    assert_eq!(listed["n1"].rpc_url, node.rpc_url());
    assert_eq!(listed["n1"].edge_addr, node.edge_addr());
}

// ---- 2. placement ----------------------------------------------------------------

async fn creates_spread_over_the_nodes(db: TestDb) {
    let c = Cluster::start(db).await;
    let nodes = nodes(
        &c,
        &[
            NodeSetup::default(),
            NodeSetup::default(),
            NodeSetup::default(),
        ],
    )
    .await;
    let mut made = BTreeSet::new();
    for _ in 0..30 {
        assert!(made.insert(c.create_ok().await));
    }
    let counts: Vec<usize> = nodes.iter().map(|n| n.fake.count()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 30);
    assert!(
        counts.iter().all(|&n| (1..=14).contains(&n)),
        "30 sandboxes over 3 equal nodes went {counts:?}"
    );
    assert_eq!(held(&nodes), made);

    let listed = c.list().await;
    assert_eq!(listed.keys().cloned().collect::<BTreeSet<_>>(), made);
    for n in &nodes {
        for id in n.fake.ids() {
            let item = &listed[&id];
            assert_eq!(item["nodeID"], n.id.as_str(), "{item}");
            assert_eq!(item["nodeStatus"], "ready", "{item}");
            assert_eq!(item["state"], "running", "{item}");
        }
        // Every create reached its node as asked: no pull for a held build.
        assert!(n.fake.specs().iter().all(|s| s.template_source.is_none()));
    }
    let detail = c.get(made.first().unwrap()).await;
    assert_eq!(detail.status, 200, "{detail:?}");
    assert_eq!(detail.body["nodeStatus"], "ready");

    let infos = c.nodes().await;
    for n in &nodes {
        assert_eq!(infos[&n.id].status, NodeStatus::Ready);
        assert_eq!(infos[&n.id].sandboxes as usize, n.fake.count(), "{}", n.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_spread_over_the_nodes_sqlite() {
    creates_spread_over_the_nodes(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_spread_over_the_nodes_postgres() {
    if let Some(db) = TestDb::postgres().await {
        creates_spread_over_the_nodes(db).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_goes_only_to_nodes_that_run_it() {
    let c = Cluster::sqlite().await;
    let nodes = nodes(
        &c,
        &[
            NodeSetup::default(),
            NodeSetup {
                runtimes: &["ns", "gvisor"],
                ..NodeSetup::default()
            },
        ],
    )
    .await;
    for _ in 0..6 {
        let body = json!({ "templateID": "base", "metadata": { "arca.runtime": "gvisor" } });
        let a = c.e2b(Method::POST, "/sandboxes", Some(&body)).await;
        assert_eq!(a.status, 201, "{a:?}");
    }
    // Every one on n2, asked for gvisor; none tried on n1.
    assert_eq!(nodes[1].fake.ids().len(), 6);
    assert!(nodes[0].fake.specs.lock().unwrap().is_empty());
    assert!(
        nodes[1]
            .fake
            .specs
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.runtime == Some(arca_proto::node::Runtime::Gvisor))
    );
    // The backend is in every record's metadata.
    assert!(
        c.list()
            .await
            .values()
            .all(|s| s["metadata"]["arca.runtime"] == "gvisor")
    );
    // No node runs vm: a 400 that says so, and no record.
    let body = json!({ "templateID": "base", "metadata": { "arca.runtime": "vm" } });
    let a = c.e2b(Method::POST, "/sandboxes", Some(&body)).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.body["message"].as_str().unwrap().contains("runtime 'vm'"),
        "{a:?}"
    );
    assert_eq!(c.list().await.len(), 6);
    // The node listing says who runs what.
    let listed = c.cluster(Method::GET, "/nodes", None).await;
    let runtimes: Vec<&Value> = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|n| &n["runtimes"])
        .collect();
    assert_eq!(
        runtimes,
        [&json!(["ns"]), &json!(["ns", "gvisor"])],
        "{listed:?}"
    );
}

// ---- 3. capacity -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_passes_the_create_on_and_all_full_is_503() {
    let c = Cluster::sqlite().await;
    // n1 is the better choice by what it reports, but takes only 2; n2
    // looks busy and takes 1.
    let nodes = nodes(
        &c,
        &[
            NodeSetup {
                max: 2,
                ..NodeSetup::default()
            },
            NodeSetup {
                max: 1,
                busy: 50,
                ..NodeSetup::default()
            },
        ],
    )
    .await;
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let a = c.create_ok().await;
    let b = c.create_ok().await;
    assert_eq!(n1.fake.ids(), BTreeSet::from([a.clone(), b.clone()]));
    let third = c.create_ok().await;
    assert_eq!(n2.fake.ids(), BTreeSet::from([third.clone()]));
    // It was offered to n1 first, which refused.
    assert!(n1.fake.spec_of(&third).is_some());
    let listed = c.list().await;
    assert_eq!(listed[&third]["nodeID"], "n2");
    assert_eq!(listed[&a]["nodeID"], "n1");

    // Everything full: E2B's capacity error, tried everywhere, no record.
    let specs_before = (n1.fake.specs().len(), n2.fake.specs().len());
    let full = c.create().await;
    assert_e2b_error(&full, 503);
    assert_eq!(
        full.body["error_code"], "sandbox_capacity_unavailable",
        "{full:?}"
    );
    assert_eq!(
        (n1.fake.specs().len(), n2.fake.specs().len()),
        (specs_before.0 + 1, specs_before.1 + 1)
    );
    let listed = c.list().await;
    assert_eq!(
        listed.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([a, b, third])
    );
    // Not even a `creating` record stays behind.
    assert_eq!(
        c.records_per_node().await,
        BTreeMap::from([("n1".into(), 2), ("n2".into(), 1)])
    );
    assert_eq!((n1.fake.count(), n2.fake.count()), (2, 1));
}

// ---- 4. unreachable node ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_node_is_passed_over() {
    let c = Cluster::sqlite().await;
    // n1 is the best choice by load, but its RPC server is down although
    // it heartbeats (its RPC port is firewalled, say).
    let mut n1 = Node::new("n1", NodeSetup::default());
    n1.stop_rpc();
    n1.join(&c).await;
    let mut n2 = Node::new(
        "n2",
        NodeSetup {
            busy: 50,
            ..NodeSetup::default()
        },
    );
    n2.join(&c).await;
    let mut made = BTreeSet::new();
    for _ in 0..5 {
        made.insert(c.create_ok().await);
    }
    assert_eq!(n2.fake.ids(), made);
    assert_eq!(n1.fake.specs().len(), 0);
    let listed = c.list().await;
    assert!(listed.values().all(|s| s["nodeID"] == "n2"), "{listed:?}");
    assert_eq!(
        c.records_per_node().await.get("n1").copied().unwrap_or(0),
        0
    );

    // Reachable again: the next create goes to n1, the better choice.
    n1.restart_rpc();
    let id = c.create_ok().await;
    assert_eq!(n1.fake.ids(), BTreeSet::from([id.clone()]));
    assert_eq!(c.list().await[&id]["nodeID"], "n1");
}

// ---- 5. templates between nodes ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_build_is_told_where_to_pull_it() {
    let c = Cluster::sqlite().await;
    let mut nodes = nodes(
        &c,
        &[
            NodeSetup {
                max: 1,
                ..NodeSetup::default()
            },
            NodeSetup {
                has_base: false,
                ..NodeSetup::default()
            },
        ],
    )
    .await;
    let first = c.create_ok().await;
    assert_eq!(nodes[0].fake.ids(), BTreeSet::from([first.clone()]));
    assert_eq!(nodes[0].fake.spec_of(&first).unwrap().template_source, None);

    // n1, the only holder of the build, is full: n2 gets the create and
    // the address to pull the build from.
    let second = c.create_ok().await;
    assert_eq!(nodes[1].fake.ids(), BTreeSet::from([second.clone()]));
    let spec = nodes[1].fake.spec_of(&second).unwrap();
    assert_eq!(spec.template_source, Some(nodes[0].rpc_url()));
    assert_eq!(spec.build_id, BASE_BUILD_ID);
    assert_eq!(c.list().await[&second]["nodeID"], "n2");

    // The holder goes silent: no node that answers has the build, so it
    // cannot be pulled either (503: it comes back with its node).
    nodes[0].stop_heartbeats();
    until("n1 lost", async || {
        c.node_status("n1").await == Some(NodeStatus::Lost)
    })
    .await;
    let tried = nodes[1].fake.specs().len();
    let a = c.create().await;
    assert_e2b_error(&a, 503);
    assert_eq!(nodes[1].fake.specs().len(), tried);
    assert_eq!(c.list().await.len(), 2);
    assert_eq!(
        c.records_per_node().await.values().sum::<u32>(),
        2,
        "a refused create left a record"
    );
}

// ---- 6. lost nodes ---------------------------------------------------------------

/// n1 (preferred by load) with three sandboxes, n2 beside it.
async fn two_nodes_three_sandboxes(c: &Cluster) -> (Vec<Node>, [String; 3]) {
    let nodes = nodes(
        c,
        &[
            NodeSetup::default(),
            NodeSetup {
                busy: 50,
                ..NodeSetup::default()
            },
        ],
    )
    .await;
    let ids = [
        c.create_ok().await,
        c.create_ok().await,
        c.create_ok().await,
    ];
    assert_eq!(nodes[0].fake.ids(), BTreeSet::from(ids.clone()));
    // The api follows n1's events (and has reconciled it once).
    until("the api following n1", async || {
        nodes[0].fake.followers() > 0
    })
    .await;
    (nodes, ids)
}

/// What users see of a lost node's sandboxes, and the records deleted
/// while it is away.
async fn check_lost(c: &Cluster, nodes: &[Node], ids: &[String; 3]) {
    until("n1's sandboxes listed as lost", async || {
        c.list().await[&ids[0]]["nodeStatus"] == "lost"
    })
    .await;
    let listed = c.list().await;
    for id in ids {
        assert_eq!(listed[id]["nodeID"], "n1");
        assert_eq!(listed[id]["nodeStatus"], "lost");
        assert_eq!(listed[id]["state"], "running");
    }
    let detail = c.get(&ids[0]).await;
    assert_eq!(detail.status, 200, "{detail:?}");
    assert_eq!(detail.body["nodeStatus"], "lost");
    assert_eq!(detail.body["state"], "running");
    let route = c
        .cluster(Method::GET, &format!("/routes/{}", ids[0]), None)
        .await;
    assert_eq!(route.status, 200, "{route:?}");
    let route: RouteInfo = serde_json::from_value(route.body).unwrap();
    assert_eq!(route.node_id, "n1");
    assert_eq!(route.node_status, NodeStatus::Lost);

    // New sandboxes avoid it although it looks the least busy.
    let before = nodes[0].fake.specs().len();
    let fresh = c.create_ok().await;
    assert!(nodes[1].fake.ids().contains(&fresh));
    assert_eq!(nodes[0].fake.specs().len(), before);

    // Calls that need the node: 503.
    let m = c
        .e2b(Method::GET, &format!("/sandboxes/{}/metrics", ids[1]), None)
        .await;
    assert_e2b_error(&m, 503);

    // Deleting works; the node kills the sandbox when it is back.
    let d = c
        .e2b(Method::DELETE, &format!("/sandboxes/{}", ids[0]), None)
        .await;
    assert_eq!(d.status, 204, "{d:?}");
    assert_e2b_error(&c.get(&ids[0]).await, 404);
    assert!(!c.list().await.contains_key(&ids[0]));
    assert_eq!(route_status(c, &ids[0]).await, 404);
}

async fn route_status(c: &Cluster, id: &str) -> u16 {
    c.cluster(Method::GET, &format!("/routes/{id}"), None)
        .await
        .status
}

/// After n1 is back: the sandbox deleted while it was away is killed, the
/// one it lost has no record, the stranger it ran is killed, the one that
/// survived is reachable again.
async fn check_back(c: &Cluster, nodes: &[Node], ids: &[String; 3], stranger: &str) {
    until("n1 ready", async || {
        c.node_status("n1").await == Some(NodeStatus::Ready)
    })
    .await;
    until("n1 reconciled", async || {
        nodes[0].fake.ids() == BTreeSet::from([ids[1].clone()])
            && !c.list().await.contains_key(&ids[2])
    })
    .await;
    assert!(!nodes[0].fake.ids().contains(stranger));
    let listed = c.list().await;
    assert_eq!(listed[&ids[1]]["nodeStatus"], "ready");
    let m = c
        .e2b(Method::GET, &format!("/sandboxes/{}/metrics", ids[1]), None)
        .await;
    assert_eq!(m.status, 200, "{m:?}");
    assert_e2b_error(&c.get(&ids[2]).await, 404);
    // Records and sandboxes agree again.
    assert_eq!(listed.keys().cloned().collect::<BTreeSet<_>>(), held(nodes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_keeps_its_records_and_is_reconciled_when_it_returns() {
    let c = Cluster::sqlite().await;
    let (mut nodes, ids) = two_nodes_three_sandboxes(&c).await;
    // n1 goes away entirely: no heartbeats, no RPC.
    nodes[0].stop_heartbeats();
    nodes[0].stop_rpc();
    check_lost(&c, &nodes, &ids).await;
    // While away, it lost one sandbox and runs one nobody asked for.
    nodes[0].fake.lose(&ids[2]);
    let stranger = "izzzstranger0000000000";
    nodes[0].fake.adopt(stranger);
    // Back on the same address, registering again.
    nodes[0].restart_rpc();
    nodes[0].join(&c).await;
    check_back(&c, &nodes, &ids, stranger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_returning_at_another_address_is_followed_there() {
    let c = Cluster::sqlite().await;
    let (mut nodes, ids) = two_nodes_three_sandboxes(&c).await;
    nodes[0].stop_heartbeats();
    nodes[0].stop_rpc();
    check_lost(&c, &nodes, &ids).await;
    nodes[0].fake.lose(&ids[2]);
    let stranger = "izzzstranger0000000000";
    nodes[0].fake.adopt(stranger);
    // Back with a new RPC address (and edge), registering it.
    nodes[0].move_rpc();
    nodes[0].join(&c).await;
    check_back(&c, &nodes, &ids, stranger).await;
    let route = c
        .cluster(Method::GET, &format!("/routes/{}", ids[1]), None)
        .await;
    assert_eq!(route.body["edge_addr"], nodes[0].edge_addr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_by_its_heartbeats_alone_is_reconciled_when_they_resume() {
    let c = Cluster::sqlite().await;
    let (mut nodes, ids) = two_nodes_three_sandboxes(&c).await;
    // Only the heartbeats stop (the node's way to the api is cut, say):
    // the api's event stream to it stays open throughout.
    nodes[0].stop_heartbeats();
    check_lost(&c, &nodes, &ids).await;
    nodes[0].fake.lose(&ids[2]);
    let stranger = "izzzstranger0000000000";
    nodes[0].fake.adopt(stranger);
    nodes[0].start_heartbeats(&c);
    check_back(&c, &nodes, &ids, stranger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_lost_node_can_be_forgotten_and_its_records_go_with_it() {
    let c = Cluster::sqlite().await;
    let (mut nodes, ids) = two_nodes_three_sandboxes(&c).await;
    // A ready node is not forgotten; an unknown one is not found.
    let busy = c.cluster(Method::DELETE, "/nodes/n1", None).await;
    assert_e2b_error(&busy, 409);
    assert_e2b_error(&c.cluster(Method::DELETE, "/nodes/ghost", None).await, 404);
    assert_eq!(c.list().await.len(), 3);
    nodes[0].stop_heartbeats();
    nodes[0].stop_rpc();
    until("n1 lost", async || {
        c.node_status("n1").await == Some(NodeStatus::Lost)
    })
    .await;
    let forgot = c.cluster(Method::DELETE, "/nodes/n1", None).await;
    assert_eq!(forgot.status, 204, "{:?}", forgot.body);
    assert!(!c.nodes().await.contains_key("n1"));
    for id in &ids {
        assert_e2b_error(&c.get(id).await, 404);
    }
    assert!(c.list().await.is_empty());
    // Should it come back after all, it runs nothing the api knows: its
    // sandboxes are killed when it registers again.
    nodes[0].restart_rpc();
    nodes[0].join(&c).await;
    until("n1's sandboxes killed", async || nodes[0].fake.count() == 0).await;
}

// ---- 7. events -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_the_node_ends_loses_its_record() {
    let c = Cluster::sqlite().await;
    let nodes = nodes(&c, &[NodeSetup::default()]).await;
    until("the api following n1", async || {
        nodes[0].fake.followers() > 0
    })
    .await;
    let ended = c.create_ok().await;
    let kept = c.create_ok().await;
    nodes[0].fake.end(&ended);
    until("the ended sandbox's record gone", async || {
        !c.list().await.contains_key(&ended)
    })
    .await;
    assert_e2b_error(&c.get(&ended).await, 404);
    assert_eq!(route_status(&c, &ended).await, 404);
    let listed = c.list().await;
    assert_eq!(
        listed.keys().cloned().collect::<Vec<_>>(),
        vec![kept.clone()]
    );
    assert_eq!(nodes[0].fake.ids(), BTreeSet::from([kept]));
}

// ---- 8. routes -------------------------------------------------------------------

#[tokio::test]
async fn routes_name_the_node_and_its_edge() {
    let c = Cluster::sqlite().await;
    let nodes = nodes(&c, &[NodeSetup::default(), NodeSetup::default()]).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(c.create_ok().await);
    }
    for id in &ids {
        let a = c.cluster(Method::GET, &format!("/routes/{id}"), None).await;
        assert_eq!(a.status, 200, "{a:?}");
        let route: RouteInfo = serde_json::from_value(a.body).unwrap();
        let node = nodes.iter().find(|n| n.fake.ids().contains(id)).unwrap();
        assert_eq!(
            route,
            RouteInfo {
                sandbox_id: id.clone(),
                node_id: node.id.clone(),
                edge_addr: node.edge_addr(),
                node_status: NodeStatus::Ready,
            }
        );
    }
    let a = c.cluster(Method::GET, "/routes/inosuchsandbox", None).await;
    assert_e2b_error(&a, 404);
}

// ---- 9. two replicas -------------------------------------------------------------

async fn two_replicas_place_without_conflict(db: TestDb) {
    let mut c = Cluster::start(db).await;
    let second = c.add_replica().await;
    let nodes = nodes(
        &c,
        &[
            NodeSetup::default(),
            NodeSetup::default(),
            NodeSetup::default(),
        ],
    )
    .await;
    // The second replica reads the node table on its own.
    until("the second replica seeing every node ready", async || {
        let seen = c.nodes_at(second).await;
        seen.len() == 3 && seen.values().all(|n| n.status == NodeStatus::Ready)
    })
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    let c = Arc::new(c);
    for i in 0..24 {
        let c = Arc::clone(&c);
        tasks.spawn(async move { c.create_at(i % 2).await });
    }
    let mut made = BTreeSet::new();
    while let Some(a) = tasks.join_next().await {
        let a = a.unwrap();
        assert_eq!(a.status, 201, "{a:?}");
        assert!(made.insert(a.body["sandboxID"].as_str().unwrap().to_string()));
    }
    assert_eq!(made.len(), 24);
    // Each sandbox on exactly one node; the nodes hold exactly the records.
    let total: usize = nodes.iter().map(|n| n.fake.count()).sum();
    assert_eq!(total, 24);
    assert_eq!(held(&nodes), made);
    for r in [0, second] {
        let listed = c.list_at(r).await;
        assert_eq!(listed.keys().cloned().collect::<BTreeSet<_>>(), made);
        for n in &nodes {
            for id in n.fake.ids() {
                assert_eq!(listed[&id]["nodeID"], n.id.as_str());
            }
        }
    }
    // Either replica acts on sandboxes the other made.
    let id = made.first().unwrap().clone();
    let d = c
        .e2b_at(second, Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await;
    assert_eq!(d.status, 204, "{d:?}");
    assert!(!held(&nodes).contains(&id));
    assert!(!c.list_at(0).await.contains_key(&id));
    // Both follow the nodes' events; an end seen by both removes one record.
    let other = made.iter().nth(1).unwrap().clone();
    until("both replicas following every node", async || {
        nodes.iter().all(|n| n.fake.followers() >= 2)
    })
    .await;
    let holder = nodes
        .iter()
        .find(|n| n.fake.ids().contains(&other))
        .unwrap();
    holder.fake.end(&other);
    until("the ended sandbox gone from both replicas", async || {
        !c.list_at(0).await.contains_key(&other) && !c.list_at(second).await.contains_key(&other)
    })
    .await;
    assert_eq!(c.list_at(second).await.len(), 22);
    assert_eq!(held(&nodes).len(), 22);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_place_without_conflict_sqlite() {
    two_replicas_place_without_conflict(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_place_without_conflict_postgres() {
    if let Some(db) = TestDb::postgres().await {
        two_replicas_place_without_conflict(db).await;
    }
}
