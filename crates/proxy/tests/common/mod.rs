//! Fixtures for proxy tests on real sockets: network namespaces made by the
//! test, HTTP servers bound to 127.0.0.1 inside them, a fake route source
//! and the proxy itself.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arca_proto::cluster::{CLUSTER_PREFIX, NodeStatus, RouteInfo, bearer};
use arca_proto::network::IngressSpec;
use arca_proto::node::{BoxFuture, Route, RouteSource, SandboxId};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, broadcast, mpsc};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Default wait for anything in these tests.
pub const WAIT: Duration = Duration::from_secs(5);

/// Whether privileged tests can run here; prints why not. Fails when
/// `ARCA_TEST_PRIVILEGED=1` asks for them but they cannot run.
pub fn privileged() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let asked = std::env::var("ARCA_TEST_PRIVILEGED").is_ok_and(|v| v == "1");
    if !root {
        assert!(!asked, "ARCA_TEST_PRIVILEGED=1 but not running as root");
        eprintln!(
            "skipped: needs root to create network namespaces (set ARCA_TEST_PRIVILEGED=1 as root)"
        );
    }
    root
}

/// A network namespace named `arcapx<unique>`, with loopback up, deleted on
/// drop (also when the test fails).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "arcapx{}x{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            nanos % 100_000
        );
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A listener on 127.0.0.1:`port` inside the namespace: made on a thread
    /// that joined it, so the socket belongs to it.
    pub fn listen(&self, port: u16) -> TcpListener {
        let path = self.path();
        let listener = std::thread::spawn(move || {
            let ns = File::open(path).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        })
        .join()
        .unwrap();
        TcpListener::from_std(listener).unwrap()
    }

    /// A client connection to 127.0.0.1:`port` inside the namespace.
    pub fn connect(&self, port: u16) -> TcpStream {
        let path = self.path();
        let stream = std::thread::spawn(move || {
            let ns = File::open(path).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let s = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .join()
        .unwrap();
        TcpStream::from_std(stream).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(status.success(), "{args:?} failed");
}

/// The node's side, in memory.
#[derive(Default)]
pub struct FakeRouteSource {
    routes: Mutex<HashMap<String, Route>>,
    /// Paused sandboxes: no route, but ingress settings and a wake-up.
    paused: Mutex<HashMap<String, Route>>,
    ended: Mutex<Option<broadcast::Sender<SandboxId>>>,
    /// Ids `wake` was called with.
    pub wakes: Mutex<Vec<String>>,
}

impl FakeRouteSource {
    pub fn new() -> Arc<FakeRouteSource> {
        let fake = FakeRouteSource::default();
        *fake.ended.lock().unwrap() = Some(broadcast::channel(16).0);
        Arc::new(fake)
    }

    pub fn insert(&self, id: &str, netns: PathBuf, token: Option<&str>) {
        let route = Route {
            sandbox_id: SandboxId::parse(id).unwrap(),
            netns,
            envd_access_token: token.map(str::to_string),
            ingress: Default::default(),
            relay: None,
            address: None,
        };
        self.routes.lock().unwrap().insert(id.to_string(), route);
    }

    /// Sets the ingress settings of a running sandbox.
    pub fn set_ingress(&self, id: &str, ingress: IngressSpec) {
        self.routes.lock().unwrap().get_mut(id).unwrap().ingress = ingress;
    }

    /// Pauses a sandbox: its route goes (and its traffic is cut, as a node
    /// does), a `wake` brings it back.
    pub fn pause(&self, id: &str) {
        let route = self.routes.lock().unwrap().remove(id).unwrap();
        self.paused.lock().unwrap().insert(id.to_string(), route);
        let tx = self.ended.lock().unwrap();
        let _ = tx.as_ref().unwrap().send(SandboxId::parse(id).unwrap());
    }

    /// Removes the route, then announces the end, as a node does.
    pub fn end(&self, id: &str) {
        self.routes.lock().unwrap().remove(id);
        let tx = self.ended.lock().unwrap();
        let _ = tx.as_ref().unwrap().send(SandboxId::parse(id).unwrap());
    }
}

impl RouteSource for FakeRouteSource {
    fn route(&self, sandbox_id: &str) -> Option<Route> {
        self.routes.lock().unwrap().get(sandbox_id).cloned()
    }
    fn routes(&self) -> Vec<Route> {
        self.routes.lock().unwrap().values().cloned().collect()
    }
    fn ended(&self) -> broadcast::Receiver<SandboxId> {
        self.ended.lock().unwrap().as_ref().unwrap().subscribe()
    }
    fn wake<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            self.wakes.lock().unwrap().push(sandbox_id.to_string());
            let Some(route) = self.paused.lock().unwrap().remove(sandbox_id) else {
                return false;
            };
            self.routes
                .lock()
                .unwrap()
                .insert(sandbox_id.to_string(), route);
            true
        })
    }
    fn ingress(&self, sandbox_id: &str) -> Option<IngressSpec> {
        let running = self.route(sandbox_id).map(|r| r.ingress);
        running.or_else(|| {
            self.paused
                .lock()
                .unwrap()
                .get(sandbox_id)
                .map(|r| r.ingress.clone())
        })
    }
}

/// What a test can observe of, and do to, a sandbox's server.
pub struct Ctl {
    /// Lets `/stream` send its second chunk.
    pub next_chunk: Notify,
    /// Every frame `/upload` receives, as it arrives.
    pub uploads: Mutex<Option<mpsc::UnboundedSender<Bytes>>>,
    /// Connections accepted.
    pub conns: AtomicUsize,
}

/// A body fed by a channel.
pub struct ChanBody(pub mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

pub fn full(s: impl Into<Bytes>) -> TestBody {
    Full::new(s.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A sandbox: a netns with the test server on 49983 and 8080.
pub struct Sandbox {
    pub id: String,
    pub ns: Netns,
    pub ctl: Arc<Ctl>,
}

impl Sandbox {
    pub fn start(id: &str) -> Sandbox {
        let ns = Netns::new();
        let (tx, _) = mpsc::unbounded_channel();
        let ctl = Arc::new(Ctl {
            next_chunk: Notify::new(),
            uploads: Mutex::new(Some(tx)),
            conns: AtomicUsize::new(0),
        });
        for port in [49983, 8080] {
            tokio::spawn(upstream(
                ns.listen(port),
                format!("{id}:{port}"),
                Arc::clone(&ctl),
            ));
        }
        Sandbox {
            id: id.to_string(),
            ns,
            ctl,
        }
    }

    pub fn uploads(&self) -> mpsc::UnboundedReceiver<Bytes> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.ctl.uploads.lock().unwrap() = Some(tx);
        rx
    }
}

/// The test server inside a sandbox.
async fn upstream(listener: TcpListener, name: String, ctl: Arc<Ctl>) {
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        ctl.conns.fetch_add(1, Ordering::SeqCst);
        let (name, ctl) = (name.clone(), Arc::clone(&ctl));
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (name, ctl) = (name.clone(), Arc::clone(&ctl));
                async move { Ok::<_, Infallible>(answer(&name, &ctl, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

async fn answer(name: &str, ctl: &Arc<Ctl>, mut req: Request<Incoming>) -> Response<TestBody> {
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), ToString::to_string);
    let seen = req
        .headers()
        .get("e2b-sandbox-id")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    match req.uri().path() {
        "/stream" | "/forever" => {
            let (tx, rx) = mpsc::channel(4);
            let forever = req.uri().path() == "/forever";
            let ctl = Arc::clone(ctl);
            tokio::spawn(async move {
                tx.send(Bytes::from_static(b"one")).await.unwrap();
                if forever {
                    std::future::pending::<()>().await;
                }
                ctl.next_chunk.notified().await;
                let _ = tx.send(Bytes::from_static(b"two")).await;
            });
            Response::new(ChanBody(rx).boxed_unsync())
        }
        "/no-answer" => std::future::pending().await,
        "/upload" => {
            let mut all = Vec::new();
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                let data = frame.unwrap().into_data().unwrap_or_default();
                all.extend_from_slice(&data);
                if let Some(tx) = ctl.uploads.lock().unwrap().as_ref() {
                    let _ = tx.send(data);
                }
            }
            Response::new(full(all))
        }
        "/ws" => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let upgraded = on_upgrade.await.unwrap();
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(full(""))
                .unwrap()
        }
        _ => {
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default()
            };
            Response::builder()
                .header("x-seen-sandbox-id", seen)
                .header("x-seen-sandbox-port", header("e2b-sandbox-port"))
                .header("x-seen-host", header("host"))
                .header("x-seen-traffic-token", header("e2b-traffic-access-token"))
                .header("x-seen-test", header("x-test"))
                .body(full(format!("{name} {} {pq}", req.method())))
                .unwrap()
        }
    }
}

/// A running proxy over a fake route source.
pub struct Proxy {
    pub addr: SocketAddr,
    pub routes: Arc<FakeRouteSource>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(sandboxes: &[(&Sandbox, Option<&str>)]) -> Proxy {
        let routes = FakeRouteSource::new();
        for (sb, token) in sandboxes {
            routes.insert(&sb.id, sb.ns.path(), *token);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source: Arc<dyn RouteSource> = routes.clone();
        let task = tokio::spawn(async move {
            arca_proxy::serve(listener, source, arca_proxy::ProxyConfig::default())
                .await
                .unwrap();
        });
        Proxy { addr, routes, task }
    }

    /// An HTTP/1.1 client connection to the proxy.
    pub async fn h1(&self) -> hyper::client::conn::http1::SendRequest<TestBody> {
        h1_to(self.addr).await
    }
}

/// An HTTP/1.1 client connection to `addr`.
pub async fn h1_to(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// A GET routed by the E2B headers.
pub fn get(addr: SocketAddr, id: &str, port: u16, path: &str) -> Request<TestBody> {
    Request::builder()
        .uri(path)
        .header("host", addr.to_string())
        .header("e2b-sandbox-id", id)
        .header("e2b-sandbox-port", port.to_string())
        .body(full(""))
        .unwrap()
}

/// Status, content type and body of a whole response.
pub async fn text(resp: Response<Incoming>) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ct, String::from_utf8(body.to_vec()).unwrap())
}

/// Sends `req` on a fresh connection and reads the whole answer.
pub async fn fetch(proxy: &Proxy, req: Request<TestBody>) -> (u16, String, String) {
    fetch_at(proxy.addr, req).await
}

/// Sends `req` to `addr` on a fresh connection and reads the whole answer.
pub async fn fetch_at(addr: SocketAddr, req: Request<TestBody>) -> (u16, String, String) {
    let mut c = h1_to(addr).await;
    let resp = tokio::time::timeout(WAIT, c.send_request(req))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(WAIT, text(resp)).await.unwrap()
}

/// Reads from a raw socket until `needle` was seen; returns all bytes read.
pub async fn read_until(stream: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    while !all.windows(needle.len()).any(|w| w == needle) {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("timed out")
            .unwrap();
        assert!(
            n > 0,
            "eof before {:?} in {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(&all)
        );
        all.extend_from_slice(&buf[..n]);
    }
    all
}

/// Reads a raw socket after an abort: must end in a reset, never in a clean
/// end (EOF or a terminating chunk).
pub async fn expect_reset(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        let res = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("no reset within the wait");
        match res {
            Ok(0) => panic!("clean EOF instead of a reset"),
            Ok(n) => assert!(
                !buf[..n].windows(5).any(|w| w == b"0\r\n\r\n"),
                "clean chunked end instead of a reset"
            ),
            Err(err) => {
                assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
                return;
            }
        }
    }
}

/// The cluster token the fake api accepts.
pub const CLUSTER_TOKEN: &str = "cluster-token";

/// The api's `GET /cluster/v1/routes/{id}`, answering from memory on
/// 127.0.0.1; requests without the cluster token get 401.
pub struct FakeApi {
    pub url: String,
    /// Sandbox id to (edge address, node status); others are 404.
    routes: Mutex<HashMap<String, (String, NodeStatus)>>,
}

impl FakeApi {
    pub async fn start() -> Arc<FakeApi> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = Arc::new(FakeApi {
            url: format!("http://{}", listener.local_addr().unwrap()),
            routes: Mutex::default(),
        });
        let server = Arc::clone(&api);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let api = Arc::clone(&server);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let api = Arc::clone(&api);
                        async move { Ok::<_, Infallible>(api.answer(&req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        api
    }

    fn answer(&self, req: &Request<Incoming>) -> Response<TestBody> {
        let status = |s: StatusCode| Response::builder().status(s).body(full("")).unwrap();
        let token = req.headers().get("authorization");
        if token.is_none_or(|t| t.as_bytes() != bearer(CLUSTER_TOKEN).as_bytes()) {
            return status(StatusCode::UNAUTHORIZED);
        }
        let prefix = format!("{CLUSTER_PREFIX}/routes/");
        let Some(id) = req.uri().path().strip_prefix(prefix.as_str()) else {
            return status(StatusCode::BAD_REQUEST);
        };
        let Some((edge_addr, node_status)) = self.routes.lock().unwrap().get(id).cloned() else {
            return status(StatusCode::NOT_FOUND);
        };
        let info = RouteInfo {
            sandbox_id: id.to_string(),
            node_id: "node1".into(),
            edge_addr,
            node_status,
        };
        Response::new(full(serde_json::to_vec(&info).unwrap()))
    }

    /// Places `id` on the node whose edge is at `edge`.
    pub fn set(&self, id: &str, edge: SocketAddr, status: NodeStatus) {
        self.routes
            .lock()
            .unwrap()
            .insert(id.to_string(), (edge.to_string(), status));
    }
}

/// A cluster's front proxy: [`arca_proxy::ClusterRoutes`] over a fake api.
pub struct Front {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Front {
    /// A front whose cached routes live `ttl`, misses `negative_ttl`.
    pub async fn start(api: &FakeApi, ttl: Duration, negative_ttl: Duration) -> Front {
        let config = arca_proxy::ClusterRoutesConfig {
            ttl,
            negative_ttl,
            api_timeout: WAIT,
            ..Default::default()
        };
        let routes =
            arca_proxy::ClusterRoutes::with_config(&api.url, CLUSTER_TOKEN, config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            arca_proxy::serve(listener, routes, arca_proxy::ProxyConfig::default())
                .await
                .unwrap();
        });
        Front { addr, task }
    }
}
