//! The node RPC end to end (issue 7): `arca_node::rpc::router` serving a
//! fake node on a loopback port, driven through `arca_api::NodeClient`
//! over real HTTP. Every `NodeService` and `BuildService` call, every
//! `NodeError` kind, the token, the event stream across a node restart,
//! and build logs streamed ahead of the result.
#![allow(clippy::unwrap_used, clippy::tests_outside_test_module, missing_docs)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arca_api::NodeClient;
use arca_proto::build::{
    BuildBase, BuildFailure, BuildLog, BuildLogLevel, BuildLogSink, BuildResult, BuildService,
    BuildSource, BuildSpec,
};
use arca_proto::network::{EgressLogEntry, NetworkSpec, Verdict};
use arca_proto::node::{
    BoxFuture, EndReason, LogEntry, MetricSample, NodeError, NodeService, PauseMode, SandboxEvent,
    SandboxId, SandboxSpec, SandboxState, SandboxStatus, TimeoutAction,
};
use arca_proto::rpc;
use chrono::{DateTime, TimeZone as _, Utc};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};

const TOKEN: &str = "cluster-secret";

fn id(s: &str) -> SandboxId {
    SandboxId::parse(s).unwrap()
}

fn at(minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 2, 3, minute, 0).unwrap()
}

fn spec(sandbox: &str) -> SandboxSpec {
    SandboxSpec {
        sandbox_id: id(sandbox),
        template_id: "tpl".into(),
        build_id: "b1".into(),
        team_id: "team".into(),
        cpu_count: 2,
        memory_mb: 512,
        disk_size_mb: 1024,
        env_vars: BTreeMap::from([("A".into(), "1".into())]),
        envd_access_token: "tok".into(),
        end_at: at(10),
        on_timeout: TimeoutAction::Kill,
        auto_resume: false,
        timeout_secs: 300,
        auto_pause_mode: PauseMode::Full,
        allow_internet_access: true,
        network: NetworkSpec::default(),
        ingress: Default::default(),
        template_source: None,
        runtime: None,
    }
}

fn build_spec(template: &str) -> BuildSpec {
    BuildSpec {
        template_id: template.into(),
        build_id: "b9".into(),
        team_id: "team".into(),
        source: BuildSource::Steps {
            base: BuildBase::Image {
                reference: "alpine:3".into(),
                auth: None,
            },
            steps: vec![],
        },
        force: false,
        start_cmd: None,
        ready_cmd: None,
        cpu_count: 1,
        memory_mb: 256,
        disk_size_mb: 1024,
    }
}

fn log_line(message: &str) -> BuildLog {
    BuildLog {
        timestamp: at(1),
        level: BuildLogLevel::Info,
        step: Some("1".into()),
        message: message.into(),
    }
}

/// A node that keeps sandboxes in a map and records what it was asked.
struct Fake {
    sandboxes: Mutex<BTreeMap<SandboxId, SandboxStatus>>,
    /// Returned (once) by the next call instead of its result.
    fail_next: Mutex<Option<NodeError>>,
    /// Calls that leave no other trace.
    calls: Mutex<Vec<String>>,
    events: broadcast::Sender<SandboxEvent>,
    /// Lets a build of template `gated` go past its first line.
    build_go: Notify,
    /// Set when a build future is dropped before it returned.
    build_dropped: Arc<AtomicBool>,
}

impl Fake {
    fn new() -> Arc<Fake> {
        Arc::new(Fake {
            sandboxes: Mutex::default(),
            fail_next: Mutex::default(),
            calls: Mutex::default(),
            events: broadcast::channel(64).0,
            build_go: Notify::new(),
            build_dropped: Arc::default(),
        })
    }

    fn check(&self) -> Result<(), NodeError> {
        match self.fail_next.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn with<T>(
        &self,
        sandbox: &SandboxId,
        f: impl FnOnce(&mut SandboxStatus) -> T,
    ) -> Result<T, NodeError> {
        self.check()?;
        let mut map = self.sandboxes.lock().unwrap();
        let s = map
            .get_mut(sandbox)
            .ok_or_else(|| NodeError::SandboxNotFound(sandbox.clone()))?;
        Ok(f(s))
    }
}

fn status_of(spec: &SandboxSpec) -> SandboxStatus {
    SandboxStatus {
        sandbox_id: spec.sandbox_id.clone(),
        template_id: spec.template_id.clone(),
        team_id: spec.team_id.clone(),
        state: SandboxState::Running,
        started_at: at(0),
        end_at: spec.end_at,
        cpu_count: spec.cpu_count,
        memory_mb: spec.memory_mb,
        disk_size_mb: spec.disk_size_mb,
        envd_version: "0.6.13".into(),
        pause_mode: None,
        runtime: Default::default(),
    }
}

impl NodeService for Fake {
    fn create(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<SandboxStatus, NodeError>> {
        Box::pin(async move {
            self.check()?;
            let status = status_of(&spec);
            self.sandboxes
                .lock()
                .unwrap()
                .insert(spec.sandbox_id, status.clone());
            Ok(status)
        })
    }

    fn kill<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            self.with(id, |_| ())?;
            self.sandboxes.lock().unwrap().remove(id);
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
        Box::pin(async move {
            self.check()?;
            Ok(self.sandboxes.lock().unwrap().values().cloned().collect())
        })
    }

    fn metrics<'a>(
        &'a self,
        id: &'a SandboxId,
    ) -> BoxFuture<'a, Result<Vec<MetricSample>, NodeError>> {
        Box::pin(async move {
            self.with(id, |s| {
                vec![MetricSample {
                    timestamp: at(2),
                    cpu_count: s.cpu_count,
                    cpu_used_pct: 12.5,
                    mem_used: 1 << 20,
                    mem_total: u64::from(s.memory_mb) << 20,
                    mem_cache: 4096,
                    disk_used: 1 << 30,
                    disk_total: 2 << 30,
                }]
            })
        })
    }

    fn logs<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<Vec<LogEntry>, NodeError>> {
        Box::pin(async move {
            self.with(id, |s| {
                vec![LogEntry {
                    timestamp: at(3),
                    level: "info".into(),
                    message: format!("hello from {}", s.sandbox_id),
                    fields: BTreeMap::from([("k".into(), "v".into())]),
                }]
            })
        })
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

    /// Ids starting with `full` find no room.
    fn fork<'a>(
        &'a self,
        source: &'a SandboxId,
        specs: Vec<SandboxSpec>,
    ) -> BoxFuture<'a, Result<Vec<Result<SandboxStatus, NodeError>>, NodeError>> {
        Box::pin(async move {
            self.with(source, |_| ())?;
            Ok(specs
                .iter()
                .map(|spec| {
                    if spec.sandbox_id.as_str().starts_with("full") {
                        Err(NodeError::Capacity(format!(
                            "no room for {}",
                            spec.sandbox_id
                        )))
                    } else {
                        Ok(status_of(spec))
                    }
                })
                .collect())
        })
    }

    fn snapshot<'a>(
        &'a self,
        source: &'a SandboxId,
        template_id: &'a str,
        build_id: &'a str,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            self.with(source, |_| ())?;
            self.record(format!("snapshot {source} {template_id} {build_id}"));
            Ok(())
        })
    }

    fn update_network<'a>(
        &'a self,
        id: &'a SandboxId,
        network: NetworkSpec,
        allow_internet_access: bool,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            self.with(id, |_| ())?;
            self.record(format!(
                "update_network {id} {:?} {allow_internet_access}",
                network.allow_out
            ));
            Ok(())
        })
    }

    fn network_logs<'a>(
        &'a self,
        id: &'a SandboxId,
    ) -> BoxFuture<'a, Result<Vec<EgressLogEntry>, NodeError>> {
        Box::pin(async move {
            self.with(id, |_| {
                vec![EgressLogEntry {
                    timestamp: at(4),
                    protocol: "tcp".into(),
                    destination: "198.18.0.2".into(),
                    port: Some(443),
                    name: Some("example.test".into()),
                    verdict: Verdict::Denied,
                    rule: "denyOut".into(),
                    count: 3,
                }]
            })
        })
    }
}

/// Sets a flag when dropped armed: whether a build future was cancelled.
struct DropFlag(Option<Arc<AtomicBool>>);

impl DropFlag {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for DropFlag {
    fn drop(&mut self) {
        if let Some(flag) = &self.0 {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

impl BuildService for Fake {
    /// Template `gated` says one line, waits for `build_go`, says two more
    /// and succeeds; `broken` says one line and fails; any other succeeds
    /// at once.
    fn build(
        &self,
        spec: BuildSpec,
        logs: BuildLogSink,
    ) -> BoxFuture<'_, Result<BuildResult, BuildFailure>> {
        Box::pin(async move {
            let flag = DropFlag(Some(Arc::clone(&self.build_dropped)));
            logs.send(log_line("step 1")).unwrap();
            match spec.template_id.as_str() {
                "broken" => {
                    flag.disarm();
                    return Err(BuildFailure {
                        message: "RUN false exited with 1".into(),
                        step: Some("1".into()),
                    });
                }
                "gated" => {
                    self.build_go.notified().await;
                    logs.send(log_line("step 2")).unwrap();
                    logs.send(log_line("step 3")).unwrap();
                }
                _ => {}
            }
            flag.disarm();
            Ok(BuildResult {
                envd_version: "0.6.13".into(),
                rootfs_size_mb: 42,
                cached_steps: 1,
                built_steps: 2,
            })
        })
    }

    fn delete_build<'a>(
        &'a self,
        template_id: &'a str,
        build_id: &'a str,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            self.check()?;
            self.record(format!("delete_build {template_id} {build_id}"));
            Ok(())
        })
    }
}

/// A node RPC server on a thread and runtime of its own, so that stopping
/// it ends every connection at once, as a node process that dies does.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serves `fake` on `addr` (port 0: any free port).
    fn start(fake: Arc<Fake>, addr: SocketAddr) -> Server {
        let (stop, stopped) = oneshot::channel::<()>();
        let (bound_tx, bound) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                // The restart test binds the port its predecessor used.
                socket.set_reuseaddr(true).unwrap();
                socket.bind(addr).unwrap();
                let listener = socket.listen(64).unwrap();
                bound_tx.send(listener.local_addr().unwrap()).unwrap();
                let transfer =
                    axum::Router::new().route("/ping", axum::routing::get(|| async { "pong" }));
                let app = arca_node::rpc::identify(
                    arca_node::rpc::router(
                        Arc::clone(&fake) as Arc<dyn NodeService>,
                        fake as Arc<dyn BuildService>,
                        TOKEN.into(),
                        Some(transfer),
                    ),
                    "n1",
                );
                tokio::select! {
                    r = axum::serve(listener, app) => r.unwrap(),
                    _ = stopped => {}
                }
            });
            // Dropping the runtime drops every connection task with it.
            drop(rt);
        });
        Server {
            addr: bound.recv().unwrap(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
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

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Guards a wait so that a broken stream fails the test instead of hanging
/// it; no test depends on how long anything takes.
async fn eventually<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("still waiting for {what}"))
}

/// Waits until `cond` holds, checking every few milliseconds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    eventually(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// One raw HTTP/1.1 request: status code and body.
async fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{head}\r\nHost: node\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    // The server may answer (and close) before it read a body it refuses.
    let _ = conn.write_all(body).await;
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn a_client_for_one_node_refuses_answers_from_another() {
    let fake = Fake::new();
    let server = Server::start(Arc::clone(&fake), any_port());
    // The node at the address is n1.
    let right = NodeClient::for_node(&server.url(), TOKEN, "n1").unwrap();
    right.create(spec("abc")).await.unwrap();
    assert_eq!(right.list().await.unwrap().len(), 1);
    // A client made for n2 (which used to be there, say) gets nothing
    // from n1: no list to reconcile against, no kill reaching it.
    let wrong = NodeClient::for_node(&server.url(), TOKEN, "n2").unwrap();
    let err = wrong.list().await.unwrap_err();
    assert!(
        matches!(&err, NodeError::Unavailable(m) if m.contains("'n1'") && m.contains("'n2'")),
        "{err:?}"
    );
    assert!(matches!(
        wrong.kill(&id("abc")).await,
        Err(NodeError::Unavailable(_))
    ));
    assert_eq!(fake_count(&right).await, 1);
}

async fn fake_count(node: &NodeClient) -> usize {
    node.list().await.unwrap().len()
}

#[tokio::test]
async fn every_call_round_trips_through_the_rpc() {
    let fake = Fake::new();
    let server = Server::start(Arc::clone(&fake), any_port());
    let node = NodeClient::new(&server.url(), TOKEN).unwrap();
    assert_eq!(node.url(), server.url());

    let created = node.create(spec("abc")).await.unwrap();
    assert_eq!(created, status_of(&spec("abc")));
    assert_eq!(node.get(&id("abc")).await.unwrap(), created);
    assert_eq!(node.list().await.unwrap(), vec![created.clone()]);

    let moved = node.set_end_at(&id("abc"), at(30)).await.unwrap();
    assert_eq!(moved.end_at, at(30));

    let samples = node.metrics(&id("abc")).await.unwrap();
    assert_eq!(samples.len(), 1);
    assert_eq!(samples[0].cpu_count, 2);
    assert_eq!(samples[0].mem_total, 512 << 20);
    assert!((samples[0].cpu_used_pct - 12.5).abs() < f64::EPSILON);
    let logs = node.logs(&id("abc")).await.unwrap();
    assert_eq!(logs[0].message, "hello from abc");
    assert_eq!(logs[0].fields["k"], "v");

    node.pause(&id("abc"), PauseMode::Filesystem).await.unwrap();
    let paused = node.get(&id("abc")).await.unwrap();
    assert_eq!(paused.state, SandboxState::Paused);
    assert_eq!(paused.pause_mode, Some(PauseMode::Filesystem));
    let resumed = node.resume(&id("abc"), at(40)).await.unwrap();
    assert_eq!(
        (resumed.state, resumed.end_at, resumed.pause_mode),
        (SandboxState::Running, at(40), None)
    );

    let forks = node
        .fork(&id("abc"), vec![spec("copy1"), spec("full2")])
        .await
        .unwrap();
    assert_eq!(
        forks,
        vec![
            Ok(status_of(&spec("copy1"))),
            Err(NodeError::Capacity("no room for full2".into()))
        ]
    );

    node.snapshot(&id("abc"), "snaps", "b7").await.unwrap();
    let rules = NetworkSpec {
        allow_out: vec!["example.test".into()],
        deny_out: vec!["0.0.0.0/0".into()],
        dns_servers: vec![],
    };
    node.update_network(&id("abc"), rules, false).await.unwrap();
    let egress = node.network_logs(&id("abc")).await.unwrap();
    assert_eq!(egress.len(), 1);
    assert_eq!(
        (egress[0].port, egress[0].verdict, egress[0].count),
        (Some(443), Verdict::Denied, 3)
    );

    node.delete_build("tpl", "b1").await.unwrap();
    node.kill(&id("abc")).await.unwrap();
    assert_eq!(node.list().await.unwrap(), vec![]);
    assert_eq!(
        *fake.calls.lock().unwrap(),
        [
            "snapshot abc snaps b7",
            "update_network abc [\"example.test\"] false",
            "delete_build tpl b1",
        ]
    );
}

#[tokio::test]
async fn each_node_error_comes_back_as_the_same_variant() {
    let fake = Fake::new();
    let server = Server::start(Arc::clone(&fake), any_port());
    let node = NodeClient::new(&server.url(), TOKEN).unwrap();
    node.create(spec("abc")).await.unwrap();

    let kinds = [
        NodeError::SandboxNotFound(id("zzz")),
        NodeError::TemplateNotFound("nope".into()),
        NodeError::Capacity("node full".into()),
        NodeError::InvalidInput("bad mode".into()),
        NodeError::Conflict("sandbox abc is paused".into()),
        NodeError::Internal("cgroup write failed".into()),
    ];
    for want in kinds {
        // Through calls of every shape: unit, status, list, fork.
        *fake.fail_next.lock().unwrap() = Some(want.clone());
        assert_eq!(node.get(&id("abc")).await, Err(want.clone()));
        *fake.fail_next.lock().unwrap() = Some(want.clone());
        assert_eq!(node.kill(&id("abc")).await, Err(want.clone()));
        *fake.fail_next.lock().unwrap() = Some(want.clone());
        assert_eq!(node.list().await, Err(want.clone()));
        *fake.fail_next.lock().unwrap() = Some(want.clone());
        assert_eq!(node.fork(&id("abc"), vec![]).await, Err(want.clone()));
        *fake.fail_next.lock().unwrap() = Some(want.clone());
        assert_eq!(node.delete_build("t", "b").await, Err(want.clone()));
    }
    // The real thing, not injected: the sandbox is gone.
    assert_eq!(
        node.metrics(&id("gone")).await,
        Err(NodeError::SandboxNotFound(id("gone")))
    );
    // The sandbox survived all the refused kills.
    assert_eq!(node.list().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_refused_on_every_route() {
    let fake = Fake::new();
    let server = Server::start(Arc::clone(&fake), any_port());

    let intruder = NodeClient::new(&server.url(), "not-the-token").unwrap();
    let err = intruder.create(spec("abc")).await.unwrap_err();
    let NodeError::Internal(msg) = &err else {
        panic!("expected Internal, got {err:?}");
    };
    assert!(msg.contains("401") && msg.contains(&server.url()), "{msg}");
    assert!(msg.to_lowercase().contains("unauthorized"), "{msg}");
    let failure = intruder
        .build(build_spec("plain"), mpsc::unbounded_channel().0)
        .await
        .unwrap_err();
    assert!(failure.message.contains("401"), "{failure:?}");
    // Nothing reached the node.
    assert!(fake.sandboxes.lock().unwrap().is_empty());

    let good = format!("Authorization: Bearer {TOKEN}");
    for (head, body) in [
        ("POST /rpc/v1/list HTTP/1.1", ""),
        ("GET /rpc/v1/events HTTP/1.1", ""),
        ("POST /rpc/v1/kill HTTP/1.1", r#"{"sandbox_id":"abc"}"#),
        ("GET /rpc/v1/transfer/ping HTTP/1.1", ""),
        ("GET /rpc/v1/no-such-route HTTP/1.1", ""),
        (
            "GET /rpc/v1/transfer/ping HTTP/1.1\r\nAuthorization: Bearer",
            "",
        ),
        (
            "GET /rpc/v1/transfer/ping HTTP/1.1\r\nAuthorization: cluster-secret",
            "",
        ),
        (
            "GET /rpc/v1/transfer/ping HTTP/1.1\r\nAuthorization: Bearer cluster-secreT",
            "",
        ),
    ] {
        let (status, answer) = raw(server.addr, head, body.as_bytes()).await;
        assert_eq!(status, 401, "{head}");
        let rejection: rpc::RpcRejection = serde_json::from_str(answer.trim()).unwrap();
        assert!(rejection.error.contains("token"), "{rejection:?}");
    }
    // The same requests with the token: the transfer routes are served.
    let (status, answer) = raw(
        server.addr,
        &format!("GET /rpc/v1/transfer/ping HTTP/1.1\r\n{good}"),
        b"",
    )
    .await;
    assert_eq!((status, answer.as_str()), (200, "pong"));
    let (status, answer) = raw(
        server.addr,
        &format!("GET /rpc/v1/no-such-route HTTP/1.1\r\n{good}"),
        b"",
    )
    .await;
    assert_eq!(status, 404);
    // Not a NodeError: a client reads it as a protocol failure, not as
    // "sandbox not found".
    assert!(serde_json::from_str::<NodeError>(answer.trim()).is_err());
    assert!(
        matches!(
            rpc::error_from_answer("n", status, answer.as_bytes()),
            NodeError::Internal(m) if m.contains("no node rpc route")
        ),
        "{answer}"
    );
}

#[tokio::test]
async fn bad_bodies_are_invalid_input_and_big_ones_are_refused() {
    let fake = Fake::new();
    let server = Server::start(Arc::clone(&fake), any_port());
    let auth = format!("Authorization: Bearer {TOKEN}");

    let (status, answer) = raw(
        server.addr,
        &format!("POST /rpc/v1/get HTTP/1.1\r\n{auth}"),
        br#"{"sandbox_id":"Not/An/Id"}"#,
    )
    .await;
    assert_eq!(status, 400);
    let err: NodeError = serde_json::from_str(answer.trim()).unwrap();
    assert!(matches!(err, NodeError::InvalidInput(_)), "{err:?}");

    let mut big = spec("abc");
    big.env_vars
        .insert("BIG".into(), "x".repeat(rpc::MAX_REQUEST_BYTES));
    let body = serde_json::to_vec(&big).unwrap();
    let (status, _) = raw(
        server.addr,
        &format!("POST /rpc/v1/create HTTP/1.1\r\n{auth}"),
        &body,
    )
    .await;
    assert_eq!(status, 413);
    assert!(fake.sandboxes.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_unreachable_node_is_unavailable_naming_it() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // The listener is gone: nothing answers on that port.
    let url = format!("http://{addr}");
    let node = NodeClient::new(&url, TOKEN).unwrap();
    let err = node.get(&id("abc")).await.unwrap_err();
    assert!(
        // Nothing reached it, so placement may try another node.
        matches!(&err, NodeError::Unavailable(m) if m.contains(&url) && m.contains("get")),
        "{err:?}"
    );
    let failure = node
        .build(build_spec("plain"), mpsc::unbounded_channel().0)
        .await
        .unwrap_err();
    assert!(failure.message.contains(&url), "{failure:?}");
}

#[tokio::test]
async fn events_arrive_in_order_and_follow_a_restarted_node() {
    let fake = Fake::new();
    let mut server = Server::start(Arc::clone(&fake), any_port());
    let node = NodeClient::new(&server.url(), TOKEN).unwrap();
    let mut events = node.events();
    let mut reconnects = node.reconnects();
    eventually("the event stream", reconnects.wait_for(|n| *n == 1))
        .await
        .unwrap();

    let sent = [
        SandboxEvent::Paused {
            sandbox_id: id("a"),
        },
        SandboxEvent::Resumed {
            sandbox_id: id("a"),
            end_at: at(20),
        },
        SandboxEvent::Ended {
            sandbox_id: id("a"),
            reason: EndReason::Killed,
        },
    ];
    for e in &sent {
        // The stream subscribed before it answered, so it hears all.
        fake.events.send(e.clone()).unwrap();
    }
    for want in &sent {
        assert_eq!(&eventually("an event", events.recv()).await.unwrap(), want);
    }

    // The node dies and comes back on the same address.
    let addr = server.addr;
    server.stop();
    let _server = Server::start(Arc::clone(&fake), addr);
    eventually("the stream to reconnect", reconnects.wait_for(|n| *n == 2))
        .await
        .unwrap();
    let after = SandboxEvent::Ended {
        sandbox_id: id("b"),
        reason: EndReason::Expired,
    };
    fake.events.send(after.clone()).unwrap();
    // The same subscription goes on; nothing stray arrived in between.
    assert_eq!(eventually("an event", events.recv()).await.unwrap(), after);
    assert!(events.try_recv().is_err());
    assert_eq!(*reconnects.borrow(), 2);
}

#[tokio::test]
async fn a_dropped_client_releases_its_event_stream_on_the_node() {
    let fake = Fake::new();
    let _server = Server::start(Arc::clone(&fake), any_port());
    let node = NodeClient::new(&_server.url(), TOKEN).unwrap();
    // A clone: the stream lives until the last one is gone.
    let other = node.clone();
    let events = node.events();
    eventually("the event stream", node.reconnects().wait_for(|n| *n == 1))
        .await
        .unwrap();
    assert_eq!(fake.events.receiver_count(), 1);
    drop(node);
    drop(events);
    other.list().await.unwrap();
    assert_eq!(fake.events.receiver_count(), 1);
    drop(other);
    // The client's task ends, its connection closes, and the node's side
    // of the stream (its subscription) goes with it.
    until("the node to drop the subscription", || {
        fake.events.receiver_count() == 0
    })
    .await;
}

#[tokio::test]
async fn build_logs_stream_ahead_of_the_result() {
    let fake = Fake::new();
    let server = Server::start(Arc::clone(&fake), any_port());
    let node = NodeClient::new(&server.url(), TOKEN).unwrap();

    let (tx, mut logs) = mpsc::unbounded_channel();
    let builder = node.clone();
    let build = tokio::spawn(async move { builder.build(build_spec("gated"), tx).await });
    // The first line arrives while the build still waits on the node.
    let first = eventually("the first log line", logs.recv()).await.unwrap();
    assert_eq!(first.message, "step 1");
    assert!(!build.is_finished());
    fake.build_go.notify_one();
    let result = eventually("the build", build).await.unwrap().unwrap();
    assert_eq!(result.rootfs_size_mb, 42);
    // Every line was handed over before the result.
    let mut rest = Vec::new();
    while let Ok(l) = logs.try_recv() {
        rest.push(l.message);
    }
    assert_eq!(rest, ["step 2", "step 3"]);

    let (tx, mut logs) = mpsc::unbounded_channel();
    let failure = node.build(build_spec("broken"), tx).await.unwrap_err();
    assert_eq!(
        failure,
        BuildFailure {
            message: "RUN false exited with 1".into(),
            step: Some("1".into()),
        }
    );
    assert_eq!(logs.try_recv().unwrap(), log_line("step 1"));
    assert!(!fake.build_dropped.load(Ordering::SeqCst));
}

#[tokio::test]
async fn a_build_whose_caller_goes_away_is_cancelled_on_the_node() {
    let fake = Fake::new();
    let server = Server::start(Arc::clone(&fake), any_port());
    let node = NodeClient::new(&server.url(), TOKEN).unwrap();
    let (tx, mut logs) = mpsc::unbounded_channel();
    let build = tokio::spawn(async move { node.build(build_spec("gated"), tx).await });
    eventually("the first log line", logs.recv()).await.unwrap();
    build.abort();
    until("the node to drop the build", || {
        fake.build_dropped.load(Ordering::SeqCst)
    })
    .await;
}
