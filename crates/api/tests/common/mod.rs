//! Test support: an in-memory [`FakeNode`] and a real HTTP server on
#![allow(unreachable_pub, dead_code)]
//! `127.0.0.1:0` with a client for it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arca_api::{Api, ApiConfig};
use arca_proto::node::{
    BoxFuture, EndReason, LogEntry, MetricSample, NodeError, NodeService, SandboxEvent, SandboxId,
    SandboxSpec, SandboxState, SandboxStatus,
};
use bytes::Bytes;
use chrono::{DateTime, TimeDelta, Utc};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::broadcast;

/// A node that keeps sandboxes in a map and can be told to fail.
pub struct FakeNode {
    sandboxes: Mutex<BTreeMap<SandboxId, SandboxStatus>>,
    events: broadcast::Sender<SandboxEvent>,
    fail_next: Mutex<Option<NodeError>>,
    /// Every spec `create` was called with.
    pub specs: Mutex<Vec<SandboxSpec>>,
    /// Every id `kill` was called with.
    pub kills: Mutex<Vec<SandboxId>>,
}

impl FakeNode {
    pub fn new() -> Arc<FakeNode> {
        Arc::new(FakeNode {
            sandboxes: Mutex::new(BTreeMap::new()),
            events: broadcast::channel(64).0,
            fail_next: Mutex::new(None),
            specs: Mutex::new(Vec::new()),
            kills: Mutex::new(Vec::new()),
        })
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
    }
}

impl NodeService for FakeNode {
    fn create(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<SandboxStatus, NodeError>> {
        Box::pin(async move {
            self.specs.lock().unwrap().push(spec.clone());
            if let Some(e) = self.fail_next.lock().unwrap().take() {
                return Err(e);
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

/// An api on a real socket with a fake node and a bootstrapped key.
pub struct Server {
    pub base: String,
    pub api: Api,
    pub node: Arc<FakeNode>,
    pub key: String,
    pub db_path: std::path::PathBuf,
    pub dir: tempfile::TempDir,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(FakeNode::new(), tempfile::tempdir().unwrap()).await
    }

    pub async fn start_with(node: Arc<FakeNode>, dir: tempfile::TempDir) -> Server {
        let db_path = dir.path().join("home/arca.db");
        let url = format!("sqlite:{}", db_path.display());
        let config = ApiConfig {
            domain: Some("arca.test".into()),
            ..ApiConfig::default()
        };
        let api = Api::open(&url, config, node.clone()).await.unwrap();
        let key = match api.ensure_bootstrap().await.unwrap() {
            Some(k) => k,
            None => api.create_key("default").await.unwrap(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(api.clone().serve(listener));
        Server {
            base,
            api,
            node,
            key,
            db_path,
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
