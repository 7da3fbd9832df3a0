//! Test support: an in-memory [`FakeNode`], a scriptable [`FakeBuilder`] and
//! a real HTTP server on `127.0.0.1:0` with a client for it.
#![allow(unreachable_pub, dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arca_api::{Api, ApiConfig};
use arca_proto::build::{
    BuildFailure, BuildLog, BuildLogLevel, BuildLogSink, BuildResult, BuildService, BuildSource,
    BuildSpec,
};
use arca_proto::network::{EgressLogEntry, NetworkSpec};
use arca_proto::node::{
    BoxFuture, EndReason, LogEntry, MetricSample, NodeError, NodeService, PauseMode, SandboxEvent,
    SandboxId, SandboxSpec, SandboxState, SandboxStatus,
};
use bytes::Bytes;
use chrono::{DateTime, TimeDelta, Utc};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{Semaphore, broadcast};

// The database helper of the unit tests, shared rather than copied.
#[path = "../../src/db/test_db.rs"]
#[allow(unused_macros)] // test files that run on one backend only
mod test_db;
#[allow(unused_imports)] // not every test file runs on both backends
pub(crate) use test_db::{TestDb, on_both_backends};

/// A node that keeps sandboxes in a map and can be told to fail.
pub struct FakeNode {
    sandboxes: Mutex<BTreeMap<SandboxId, SandboxStatus>>,
    events: broadcast::Sender<SandboxEvent>,
    fail_next: Mutex<Option<NodeError>>,
    /// Every spec `create` was called with.
    pub specs: Mutex<Vec<SandboxSpec>>,
    /// Every id `kill` was called with.
    pub kills: Mutex<Vec<SandboxId>>,
    /// Every `fork` call: the source and the specs.
    pub forks: Mutex<Vec<(SandboxId, Vec<SandboxSpec>)>>,
    /// Forks (by index in a call's specs) that fail, once each.
    fail_forks: Mutex<BTreeMap<usize, NodeError>>,
    fail_next_fork: Mutex<Option<NodeError>>,
    /// Every snapshot it registered: `(source, template_id, build_id)`.
    pub snapshots: Mutex<Vec<(SandboxId, String, String)>>,
    fail_next_snapshot: Mutex<Option<NodeError>>,
    /// Every `update_network` call: id, egress spec, allow_internet_access.
    pub network_updates: Mutex<Vec<(SandboxId, NetworkSpec, bool)>>,
    fail_next_network_update: Mutex<Option<NodeError>>,
    /// What `network_logs` answers per sandbox (a known sandbox without an
    /// entry has an empty log).
    pub egress_logs: Mutex<BTreeMap<SandboxId, Vec<EgressLogEntry>>>,
}

impl FakeNode {
    pub fn new() -> Arc<FakeNode> {
        Arc::new(FakeNode {
            sandboxes: Mutex::new(BTreeMap::new()),
            events: broadcast::channel(64).0,
            fail_next: Mutex::new(None),
            specs: Mutex::new(Vec::new()),
            kills: Mutex::new(Vec::new()),
            forks: Mutex::new(Vec::new()),
            fail_forks: Mutex::new(BTreeMap::new()),
            fail_next_fork: Mutex::new(None),
            snapshots: Mutex::new(Vec::new()),
            fail_next_snapshot: Mutex::new(None),
            network_updates: Mutex::new(Vec::new()),
            fail_next_network_update: Mutex::new(None),
            egress_logs: Mutex::new(BTreeMap::new()),
        })
    }

    /// The next `update_network` fails with `err`.
    pub fn fail_next_network_update(&self, err: NodeError) {
        *self.fail_next_network_update.lock().unwrap() = Some(err);
    }

    /// Sets the egress log of a sandbox.
    pub fn set_egress_log(&self, id: &str, entries: Vec<EgressLogEntry>) {
        self.egress_logs
            .lock()
            .unwrap()
            .insert(SandboxId::parse(id).unwrap(), entries);
    }

    /// The last spec `create` got for sandbox `id`.
    pub fn spec(&self, id: &str) -> SandboxSpec {
        self.specs
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|s| s.sandbox_id.as_str() == id)
            .cloned()
            .unwrap_or_else(|| panic!("no create of {id} reached the node"))
    }

    /// In the next `fork` call, the fork at `index` fails with `err`.
    pub fn fail_fork(&self, index: usize, err: NodeError) {
        self.fail_forks.lock().unwrap().insert(index, err);
    }

    /// The next `fork` call fails as a whole with `err`.
    pub fn fail_next_fork(&self, err: NodeError) {
        *self.fail_next_fork.lock().unwrap() = Some(err);
    }

    /// The next `snapshot` fails with `err`.
    pub fn fail_next_snapshot(&self, err: NodeError) {
        *self.fail_next_snapshot.lock().unwrap() = Some(err);
    }

    /// The next `create` fails with `err`.
    pub fn fail_next_create(&self, err: NodeError) {
        *self.fail_next.lock().unwrap() = Some(err);
    }

    /// Ends a sandbox by itself (as on expiry), broadcasting the event.
    pub fn end(&self, id: &str) {
        let id = SandboxId::parse(id).unwrap();
        self.sandboxes.lock().unwrap().remove(&id);
        let _ = self.events.send(SandboxEvent::Ended {
            sandbox_id: id,
            reason: EndReason::Expired,
        });
    }

    /// Adds a sandbox the api did not ask for.
    pub fn insert(&self, id: &str) {
        let now = Utc::now();
        let s = status(id, now, now + TimeDelta::seconds(60));
        self.sandboxes
            .lock()
            .unwrap()
            .insert(s.sandbox_id.clone(), s);
    }

    /// Ids of the sandboxes it has.
    pub fn ids(&self) -> Vec<String> {
        self.sandboxes
            .lock()
            .unwrap()
            .keys()
            .map(|k| k.to_string())
            .collect()
    }

    /// Current deadline of a sandbox.
    pub fn end_at(&self, id: &str) -> Option<DateTime<Utc>> {
        let id = SandboxId::parse(id).unwrap();
        self.sandboxes.lock().unwrap().get(&id).map(|s| s.end_at)
    }
}

fn status(id: &str, started: DateTime<Utc>, end: DateTime<Utc>) -> SandboxStatus {
    SandboxStatus {
        sandbox_id: SandboxId::parse(id).unwrap(),
        template_id: "base".into(),
        team_id: "t".into(),
        state: SandboxState::Running,
        started_at: started,
        end_at: end,
        cpu_count: 2,
        memory_mb: 512,
        disk_size_mb: 1024,
        envd_version: "0.6.13".into(),
        pause_mode: None,
        runtime: Default::default(),
    }
}

impl NodeService for FakeNode {
    fn create(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<SandboxStatus, NodeError>> {
        Box::pin(async move {
            self.specs.lock().unwrap().push(spec.clone());
            if let Some(e) = self.fail_next.lock().unwrap().take() {
                return Err(e);
            }
            // A snapshot template starts only from a build it registered.
            {
                let snaps = self.snapshots.lock().unwrap();
                let of_template: Vec<_> = snaps
                    .iter()
                    .filter(|(_, t, _)| *t == spec.template_id)
                    .collect();
                if !of_template.is_empty()
                    && !of_template.iter().any(|(_, _, b)| *b == spec.build_id)
                {
                    return Err(NodeError::TemplateNotFound(format!(
                        "{}/{}",
                        spec.template_id, spec.build_id
                    )));
                }
            }
            let mut s = status(spec.sandbox_id.as_str(), Utc::now(), spec.end_at);
            s.team_id = spec.team_id;
            s.template_id = spec.template_id;
            s.cpu_count = spec.cpu_count;
            s.memory_mb = spec.memory_mb;
            s.disk_size_mb = spec.disk_size_mb;
            self.sandboxes
                .lock()
                .unwrap()
                .insert(spec.sandbox_id, s.clone());
            Ok(s)
        })
    }

    fn kill<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            self.kills.lock().unwrap().push(id.clone());
            match self.sandboxes.lock().unwrap().remove(id) {
                Some(_) => Ok(()),
                None => Err(NodeError::SandboxNotFound(id.clone())),
            }
        })
    }

    fn set_end_at<'a>(
        &'a self,
        id: &'a SandboxId,
        end_at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<SandboxStatus, NodeError>> {
        Box::pin(async move {
            let s = {
                let mut map = self.sandboxes.lock().unwrap();
                let s = map
                    .get_mut(id)
                    .ok_or_else(|| NodeError::SandboxNotFound(id.clone()))?;
                s.end_at = end_at;
                s.clone()
            };
            if end_at <= Utc::now() {
                self.end(id.as_str());
            }
            Ok(s)
        })
    }

    fn get<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<SandboxStatus, NodeError>> {
        Box::pin(async move {
            self.sandboxes
                .lock()
                .unwrap()
                .get(id)
                .cloned()
                .ok_or_else(|| NodeError::SandboxNotFound(id.clone()))
        })
    }

    fn pause<'a>(
        &'a self,
        id: &'a SandboxId,
        mode: PauseMode,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            let mut map = self.sandboxes.lock().unwrap();
            let s = map
                .get_mut(id)
                .ok_or_else(|| NodeError::SandboxNotFound(id.clone()))?;
            if s.state == SandboxState::Paused {
                return Err(NodeError::Conflict("already paused".into()));
            }
            s.state = SandboxState::Paused;
            s.pause_mode = Some(mode);
            Ok(())
        })
    }

    fn resume<'a>(
        &'a self,
        id: &'a SandboxId,
        end_at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<SandboxStatus, NodeError>> {
        Box::pin(async move {
            let mut map = self.sandboxes.lock().unwrap();
            let s = map
                .get_mut(id)
                .ok_or_else(|| NodeError::SandboxNotFound(id.clone()))?;
            if s.state != SandboxState::Paused {
                return Err(NodeError::Conflict("not paused".into()));
            }
            s.state = SandboxState::Running;
            s.pause_mode = None;
            s.end_at = end_at;
            Ok(s.clone())
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<SandboxStatus>, NodeError>> {
        Box::pin(async move { Ok(self.sandboxes.lock().unwrap().values().cloned().collect()) })
    }

    fn metrics<'a>(
        &'a self,
        id: &'a SandboxId,
    ) -> BoxFuture<'a, Result<Vec<MetricSample>, NodeError>> {
        Box::pin(async move {
            if !self.sandboxes.lock().unwrap().contains_key(id) {
                return Err(NodeError::SandboxNotFound(id.clone()));
            }
            Ok((0..3)
                .map(|i| MetricSample {
                    timestamp: DateTime::from_timestamp(1_000 + i * 5, 0).unwrap(),
                    cpu_count: 2,
                    cpu_used_pct: 12.5,
                    mem_used: 100,
                    mem_total: 512 << 20,
                    mem_cache: 10,
                    disk_used: 1000,
                    disk_total: 1024 << 20,
                })
                .collect())
        })
    }

    fn logs<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<Vec<LogEntry>, NodeError>> {
        Box::pin(async move {
            if !self.sandboxes.lock().unwrap().contains_key(id) {
                return Err(NodeError::SandboxNotFound(id.clone()));
            }
            Ok(["debug", "info", "error"]
                .iter()
                .enumerate()
                .map(|(i, level)| LogEntry {
                    timestamp: DateTime::from_timestamp_millis(
                        1_000_000 + i64::try_from(i).unwrap() * 1000,
                    )
                    .unwrap(),
                    level: (*level).to_string(),
                    message: format!("line {i}"),
                    fields: BTreeMap::from([("n".to_string(), i.to_string())]),
                })
                .collect())
        })
    }

    fn events(&self) -> broadcast::Receiver<SandboxEvent> {
        self.events.subscribe()
    }

    fn fork<'a>(
        &'a self,
        source: &'a SandboxId,
        specs: Vec<SandboxSpec>,
    ) -> BoxFuture<'a, Result<Vec<Result<SandboxStatus, NodeError>>, NodeError>> {
        Box::pin(async move {
            self.forks
                .lock()
                .unwrap()
                .push((source.clone(), specs.clone()));
            if let Some(e) = self.fail_next_fork.lock().unwrap().take() {
                return Err(e);
            }
            let mut map = self.sandboxes.lock().unwrap();
            let src = map
                .get(source)
                .cloned()
                .ok_or_else(|| NodeError::SandboxNotFound(source.clone()))?;
            if src.state != SandboxState::Running {
                return Err(NodeError::Conflict(format!("sandbox {source} is paused")));
            }
            let mut fails = self.fail_forks.lock().unwrap();
            let mut out = Vec::new();
            for (i, spec) in specs.into_iter().enumerate() {
                if let Some(e) = fails.remove(&i) {
                    out.push(Err(e));
                    continue;
                }
                // Template, build and limits are the source's.
                let mut s = src.clone();
                s.sandbox_id = spec.sandbox_id.clone();
                s.team_id = spec.team_id;
                s.started_at = Utc::now();
                s.end_at = spec.end_at;
                map.insert(spec.sandbox_id, s.clone());
                out.push(Ok(s));
            }
            Ok(out)
        })
    }

    fn update_network<'a>(
        &'a self,
        id: &'a SandboxId,
        network: NetworkSpec,
        allow_internet_access: bool,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            if let Some(e) = self.fail_next_network_update.lock().unwrap().take() {
                return Err(e);
            }
            let state = self
                .sandboxes
                .lock()
                .unwrap()
                .get(id)
                .map(|s| s.state)
                .ok_or_else(|| NodeError::SandboxNotFound(id.clone()))?;
            if state == SandboxState::Paused {
                return Err(NodeError::Conflict(format!(
                    "sandbox {id} is paused; resume it to change its network rules"
                )));
            }
            self.network_updates
                .lock()
                .unwrap()
                .push((id.clone(), network, allow_internet_access));
            Ok(())
        })
    }

    fn network_logs<'a>(
        &'a self,
        id: &'a SandboxId,
    ) -> BoxFuture<'a, Result<Vec<EgressLogEntry>, NodeError>> {
        Box::pin(async move {
            if !self.sandboxes.lock().unwrap().contains_key(id) {
                return Err(NodeError::SandboxNotFound(id.clone()));
            }
            Ok(self
                .egress_logs
                .lock()
                .unwrap()
                .get(id)
                .cloned()
                .unwrap_or_default())
        })
    }

    fn snapshot<'a>(
        &'a self,
        source: &'a SandboxId,
        template_id: &'a str,
        build_id: &'a str,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            if let Some(e) = self.fail_next_snapshot.lock().unwrap().take() {
                return Err(e);
            }
            if !self.sandboxes.lock().unwrap().contains_key(source) {
                return Err(NodeError::SandboxNotFound(source.clone()));
            }
            self.snapshots.lock().unwrap().push((
                source.clone(),
                template_id.to_string(),
                build_id.to_string(),
            ));
            Ok(())
        })
    }
}

/// envd version of every build the fake builder finishes.
pub const BUILT_ENVD_VERSION: &str = "0.6.14";

/// A builder that logs a line per step and succeeds, unless a step's
/// arguments (or the Dockerfile) contain a marker:
///
/// - `FAIL`: that step fails (an `error` line, then a [`BuildFailure`] with
///   the step; a Dockerfile fails in step `1`);
/// - `PANIC`: the builder panics;
/// - `LOGS:<n>`: that step logs `n` extra lines (`warn` for odd ones).
///
/// When gated ([`FakeBuilder::gated`]) every build waits for a
/// [`FakeBuilder::release`] before it does anything.
pub struct FakeBuilder {
    gate: Semaphore,
    running: AtomicUsize,
    /// Most builds that ran at once.
    pub max_running: AtomicUsize,
    /// Every spec `build` was called with.
    pub specs: Mutex<Vec<BuildSpec>>,
    /// Every `(template_id, build_id)` `delete_build` was called with.
    pub deleted: Mutex<Vec<(String, String)>>,
}

impl FakeBuilder {
    pub fn new() -> Arc<FakeBuilder> {
        FakeBuilder::with_gate(Semaphore::MAX_PERMITS)
    }

    /// Builds wait for [`FakeBuilder::release`].
    pub fn gated() -> Arc<FakeBuilder> {
        FakeBuilder::with_gate(0)
    }

    fn with_gate(permits: usize) -> Arc<FakeBuilder> {
        Arc::new(FakeBuilder {
            gate: Semaphore::new(permits),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            specs: Mutex::new(Vec::new()),
            deleted: Mutex::new(Vec::new()),
        })
    }

    /// Lets `n` waiting (or future) builds go on.
    pub fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }

    /// Builds that called `build` so far.
    pub fn started(&self) -> usize {
        self.specs.lock().unwrap().len()
    }

    /// The spec of the build with this id.
    pub fn spec(&self, build_id: &str) -> BuildSpec {
        self.specs
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.build_id == build_id)
            .cloned()
            .unwrap_or_else(|| panic!("build {build_id} never reached the builder"))
    }
}

fn line(level: BuildLogLevel, step: &str, message: String) -> BuildLog {
    BuildLog {
        timestamp: Utc::now(),
        level,
        step: Some(step.to_string()),
        message,
    }
}

impl FakeBuilder {
    fn run(&self, spec: &BuildSpec, logs: &BuildLogSink) -> Result<BuildResult, BuildFailure> {
        let send = |l: BuildLog| {
            let _ = logs.send(l);
        };
        send(line(
            BuildLogLevel::Info,
            "base",
            "preparing the base".into(),
        ));
        let steps: Vec<(String, String)> = match &spec.source {
            BuildSource::Steps { steps, .. } => steps
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    (
                        (i + 1).to_string(),
                        format!("{} {}", s.kind, s.args.join(" ")),
                    )
                })
                .collect(),
            BuildSource::Dockerfile { dockerfile, .. } => {
                vec![("1".to_string(), dockerfile.clone())]
            }
        };
        for (step, text) in &steps {
            send(line(
                BuildLogLevel::Info,
                step,
                format!("step {step}: {text}"),
            ));
            if text.contains("PANIC") {
                panic!("the fake builder panics as asked");
            }
            if let Some(n) = text
                .split_whitespace()
                .find_map(|w| w.strip_prefix("LOGS:"))
                .and_then(|n| n.parse::<usize>().ok())
            {
                for i in 0..n {
                    let level = if i % 2 == 1 {
                        BuildLogLevel::Warn
                    } else {
                        BuildLogLevel::Debug
                    };
                    send(line(level, step, format!("extra line {i}")));
                }
            }
            if text.contains("FAIL") {
                send(line(
                    BuildLogLevel::Error,
                    step,
                    "command exited with status 1".into(),
                ));
                return Err(BuildFailure {
                    message: format!("step {step} failed: command exited with status 1"),
                    step: Some(step.clone()),
                });
            }
        }
        send(line(BuildLogLevel::Info, "finalize", "build done".into()));
        Ok(BuildResult {
            envd_version: BUILT_ENVD_VERSION.into(),
            rootfs_size_mb: 100,
            cached_steps: 0,
            built_steps: u32::try_from(steps.len()).unwrap(),
        })
    }
}

impl BuildService for FakeBuilder {
    fn build(
        &self,
        spec: BuildSpec,
        logs: BuildLogSink,
    ) -> BoxFuture<'_, Result<BuildResult, BuildFailure>> {
        Box::pin(async move {
            self.specs.lock().unwrap().push(spec.clone());
            self.gate.acquire().await.unwrap().forget();
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(now, Ordering::SeqCst);
            // Yield so that concurrent builds overlap when they can.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let r = self.run(&spec, &logs);
            self.running.fetch_sub(1, Ordering::SeqCst);
            r
        })
    }

    fn delete_build<'a>(
        &'a self,
        template_id: &'a str,
        build_id: &'a str,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            self.deleted
                .lock()
                .unwrap()
                .push((template_id.to_string(), build_id.to_string()));
            Ok(())
        })
    }
}

/// An answer.
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts a status.
    pub fn assert_status(&self, status: u16) {
        assert_eq!(
            self.status,
            status,
            "{:?}",
            String::from_utf8_lossy(&self.body)
        );
    }

    /// Asserts the E2B error body for `status`.
    pub fn assert_error(&self, status: u16) -> serde_json::Value {
        assert_eq!(
            self.status,
            status,
            "{:?}",
            String::from_utf8_lossy(&self.body)
        );
        let v = self.json();
        assert_eq!(v["code"], status, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        v
    }
}

/// How to start a [`Server`].
pub struct Opts {
    pub node: Arc<FakeNode>,
    pub builder: Arc<FakeBuilder>,
    pub dir: tempfile::TempDir,
    /// `ApiConfig::max_concurrent_builds`.
    pub max_builds: usize,
    /// `ApiConfig::max_upload_bytes`.
    pub max_upload: u64,
    /// The database; `None`: a SQLite file in `dir`.
    pub db: Option<TestDb>,
}

impl Opts {
    pub fn new() -> Opts {
        Opts {
            node: FakeNode::new(),
            builder: FakeBuilder::new(),
            dir: tempfile::tempdir().unwrap(),
            max_builds: 2,
            max_upload: 1 << 20,
            db: None,
        }
    }
}

/// An api on a real socket with a fake node and builder and a
/// bootstrapped key.
pub struct Server {
    pub base: String,
    pub api: Api,
    pub node: Arc<FakeNode>,
    pub builder: Arc<FakeBuilder>,
    pub key: String,
    /// The database's URL.
    pub db_url: String,
    /// The SQLite file (empty for PostgreSQL).
    pub db_path: std::path::PathBuf,
    /// The database when it was given in [`Opts::db`] (pass it on to
    /// restart on the same one).
    pub db: Option<TestDb>,
    pub uploads: std::path::PathBuf,
    pub dir: tempfile::TempDir,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_opts(Opts::new()).await
    }

    /// A server on `db`.
    pub async fn on(db: TestDb) -> Server {
        Server::start_opts(Opts {
            db: Some(db),
            ..Opts::new()
        })
        .await
    }

    pub async fn start_with(node: Arc<FakeNode>, dir: tempfile::TempDir) -> Server {
        Server::start_opts(Opts {
            node,
            dir,
            ..Opts::new()
        })
        .await
    }

    pub async fn start_opts(o: Opts) -> Server {
        let Opts {
            node,
            builder,
            dir,
            max_builds,
            max_upload,
            db,
        } = o;
        let (db_path, url) = match &db {
            Some(db) => (db.sqlite_path().unwrap_or_default(), db.url.clone()),
            None => {
                let path = dir.path().join("home/arca.db");
                let url = format!("sqlite:{}", path.display());
                (path, url)
            }
        };
        let uploads = dir.path().join("home/uploads");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let config = ApiConfig {
            domain: Some("arca.test".into()),
            uploads_dir: uploads.clone(),
            public_url: format!("{base}/"),
            max_concurrent_builds: max_builds,
            max_upload_bytes: max_upload,
            ..ApiConfig::default()
        };
        let api = Api::open(&url, config, node.clone(), builder.clone())
            .await
            .unwrap();
        let key = match api.ensure_bootstrap().await.unwrap() {
            Some(k) => k,
            None => api.create_key("default").await.unwrap(),
        };
        tokio::spawn(api.clone().serve(listener));
        Server {
            base,
            api,
            node,
            builder,
            key,
            db_url: url,
            db_path,
            db,
            uploads,
            dir,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// A request with `headers` and an optional body.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Resp {
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .unwrap();
        let resp = self.client.request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Resp {
            status,
            headers,
            body,
        }
    }

    /// A request authenticated with `key` and, if given, a JSON body.
    pub async fn call_as(
        &self,
        key: &str,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Resp {
        let mut headers = vec![("X-API-Key", key)];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        self.raw(
            method,
            path,
            &headers,
            body.map(|b| serde_json::to_vec(&b).unwrap()),
        )
        .await
    }

    /// [`Server::call_as`] with the bootstrapped key.
    pub async fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> Resp {
        self.call_as(&self.key.clone(), method, path, body).await
    }

    /// Creates a sandbox through v2 and returns its id.
    pub async fn create(&self, body: serde_json::Value) -> String {
        let r = self.call("POST", "/v2/sandboxes", Some(body)).await;
        assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
        r.json()["sandboxID"].as_str().unwrap().to_string()
    }
}

/// Template build helpers.
impl Server {
    /// `POST /v3/templates` with `body`; returns `(templateID, buildID)`.
    pub async fn request_build(&self, body: serde_json::Value) -> (String, String) {
        let r = self.call("POST", "/v3/templates", Some(body)).await;
        assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        (
            v["templateID"].as_str().unwrap().to_string(),
            v["buildID"].as_str().unwrap().to_string(),
        )
    }

    /// `POST /v2/templates/{t}/builds/{b}` with `body`, expecting 202.
    pub async fn start_build(&self, t: &str, b: &str, body: serde_json::Value) {
        let r = self
            .call("POST", &format!("/v2/templates/{t}/builds/{b}"), Some(body))
            .await;
        assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
        assert!(r.body.is_empty());
    }

    /// The status answer of a build (all its log lines from `offset`).
    pub async fn build_status(&self, t: &str, b: &str, query: &str) -> serde_json::Value {
        let r = self
            .call(
                "GET",
                &format!("/templates/{t}/builds/{b}/status{query}"),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        r.json()
    }

    /// Polls a build's status until it is `ready` or `error`.
    pub async fn wait_build(&self, t: &str, b: &str) -> serde_json::Value {
        for _ in 0..500 {
            let v = self.build_status(t, b, "").await;
            if v["status"] == "ready" || v["status"] == "error" {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("build {b} of {t} never finished");
    }

    /// Polls until a build has `status`.
    pub async fn wait_status(&self, t: &str, b: &str, status: &str) -> serde_json::Value {
        for _ in 0..500 {
            let v = self.build_status(t, b, "").await;
            if v["status"] == status {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("build {b} of {t} never became {status}");
    }

    /// Registers and starts a build of `name` from `start`, waits for its
    /// end; returns `(templateID, buildID, final status)`.
    pub async fn build(
        &self,
        name: &str,
        start: serde_json::Value,
    ) -> (String, String, serde_json::Value) {
        let (t, b) = self
            .request_build(serde_json::json!({ "name": name }))
            .await;
        self.start_build(&t, &b, start).await;
        let v = self.wait_build(&t, &b).await;
        (t, b, v)
    }
}

/// A start body building on `base` with one `RUN` per command.
pub fn run_steps(cmds: &[&str]) -> serde_json::Value {
    let steps: Vec<serde_json::Value> = cmds
        .iter()
        .map(|c| serde_json::json!({"type": "RUN", "args": [c], "force": false}))
        .collect();
    serde_json::json!({"fromTemplate": "base", "steps": steps, "force": false})
}
