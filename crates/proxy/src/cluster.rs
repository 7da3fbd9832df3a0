//! Routes of a cluster's front proxy (issue 7, ADR 0006): which node's edge
//! proxy holds a sandbox, as the api says.
//!
//! [`RouteSource::route`] is synchronous and called on every request, so it
//! only reads a cache. An id missing from it, or whose entry is older than
//! the TTL, makes the proxy call [`RouteSource::wake`], which asks the api
//! (`GET {api}/cluster/v1/routes/{id}`, one request per id at a time however
//! many requests wait for it) and caches the answer:
//!
//! - a sandbox on a `ready` or `draining` node: a route whose
//!   [`relay`](Route::relay) is the node's edge, served for the TTL;
//! - no such sandbox (404), or its node is `lost`: "not found", remembered
//!   for the shorter negative TTL so that a flood of requests for it costs
//!   the api one request per negative TTL;
//! - the api failing (unreachable, 5xx, a timeout): a route confirmed within
//!   the stale-if-error time is served on (an api restart must not make
//!   running sandboxes "not found", which the SDKs take as their end) and
//!   asked for again after the negative TTL; otherwise "not found".
//!
//! A route that goes from reachable to gone or lost on such a refetch is
//! announced on [`RouteSource::ended`], which makes the proxy reset what is
//! still in flight to it (the edge of a lost node cannot do so itself).
//!
//! The cache holds at most [`ClusterRoutesConfig::max_entries`] ids; when
//! full, expired entries are dropped first, then arbitrary ones.
//!
//! The edge checks traffic tokens, masks hosts and refuses what it refuses:
//! these routes carry no ingress settings and [`RouteSource::ingress`] knows
//! none, so the front proxy passes every request on.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arca_proto::cluster::{CLUSTER_PREFIX, NodeStatus, RouteInfo, bearer};
use arca_proto::network::IngressSpec;
use arca_proto::node::{BoxFuture, Route, RouteSource, SandboxId};
use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::uri::InvalidUri;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use crate::BoxError;
use crate::config::{ClusterRoutesConfig, MIN_ROUTE_TTL};

/// Largest route answer read from the api, in bytes (a [`RouteInfo`] is a
/// few hundred).
const MAX_ROUTE_BODY: usize = 64 * 1024;
/// Ends queued for a slow [`RouteSource::ended`] subscriber.
const ENDED_CAPACITY: usize = 1024;

/// Last time (`log_allowed`) a failed api request was logged.
static API_WARNED: AtomicU64 = AtomicU64::new(0);

/// Invalid settings given to [`ClusterRoutes::new`].
#[derive(Debug, thiserror::Error)]
pub enum ClusterRoutesError {
    /// The api URL does not parse.
    #[error("invalid api url '{url}'")]
    InvalidApiUrl {
        /// As given.
        url: String,
        /// Why.
        #[source]
        source: InvalidUri,
    },
    /// The api URL is not `http://host[:port][/path]`.
    #[error("api url '{url}' must be http://<host>[:<port>][/<path>] without a query")]
    UnsupportedApiUrl {
        /// As given.
        url: String,
    },
    /// The cluster token cannot be sent in a header (not shown: it is a
    /// secret).
    #[error("the cluster token contains characters a header cannot carry")]
    InvalidToken,
}

/// Why asking the api for a route failed (logged, never shown to clients).
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("cannot make the route url for sandbox {sandbox_id}")]
    Url {
        sandbox_id: String,
        #[source]
        source: http::Error,
    },
    #[error("cannot reach the api")]
    Request(#[source] hyper_util::client::legacy::Error),
    #[error("the api did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the api answered {0} (is the cluster token right?)")]
    Status(StatusCode),
    #[error("cannot read the api's answer")]
    Body(#[source] BoxError),
    #[error("cannot decode the api's route")]
    Decode(#[source] serde_json::Error),
    #[error("the api answered for sandbox {got} instead of {asked}")]
    OtherSandbox { asked: String, got: String },
    #[error("cannot resolve edge address '{addr}'")]
    ResolveEdge {
        addr: String,
        #[source]
        source: io::Error,
    },
}

/// What the api said about a sandbox.
#[derive(Debug)]
enum Fetched {
    /// Reachable through this route.
    Reachable(Route),
    /// No such sandbox.
    Gone,
    /// Its node is lost.
    Lost,
}

/// One cached answer.
#[derive(Debug)]
struct Entry {
    /// `Some`: reachable through it; `None`: not found (gone, lost, or the
    /// api failing with nothing to fall back on).
    route: Option<Route>,
    /// Served without asking the api until then.
    fresh_until: Instant,
    /// When the api last confirmed `route`.
    confirmed: Instant,
}

impl Entry {
    fn is_fresh(&self, now: Instant) -> bool {
        now < self.fresh_until
    }

    /// Whether a failing api leaves this route in service.
    fn usable_on_error(&self, now: Instant, stale_if_error: Duration) -> bool {
        self.route.is_some() && now < self.confirmed + stale_if_error
    }
}

/// A fetch in flight: waiters subscribe to its outcome (`Some(reachable)`),
/// sent when it lands.
#[derive(Debug)]
struct Flight {
    /// Tells this fetch from a later one of the same id.
    id: u64,
    outcome: watch::Sender<Option<bool>>,
}

#[derive(Debug, Default)]
struct State {
    cache: HashMap<String, Entry>,
    flights: HashMap<String, Flight>,
    next_flight: u64,
}

impl State {
    /// Removes the flight `flight` of `id`, if it is still the current one.
    fn land(&mut self, id: &str, flight: u64) -> Option<Flight> {
        if self.flights.get(id).is_some_and(|f| f.id == flight) {
            self.flights.remove(id)
        } else {
            None
        }
    }

    /// Caches `entry`, making room first when the cache is full.
    fn insert(&mut self, id: &str, entry: Entry, config: &ClusterRoutesConfig, now: Instant) {
        let max = config.max_entries.max(1);
        if !self.cache.contains_key(id) && self.cache.len() >= max {
            self.cache
                .retain(|_, e| e.is_fresh(now) || e.usable_on_error(now, config.stale_if_error));
            if self.cache.len() >= max {
                // Still full of live entries (a flood of distinct ids): drop
                // an eighth at once, so this scan is not paid on every
                // insert. Dropped ids are only asked for again.
                let keep = max.saturating_sub(max / 8 + 1);
                let excess = self.cache.len().saturating_sub(keep);
                let victims: Vec<String> = self.cache.keys().take(excess).cloned().collect();
                for victim in victims {
                    self.cache.remove(&victim);
                }
            }
        }
        self.cache.insert(id.to_string(), entry);
    }
}

/// [`RouteSource`] of a cluster's front proxy: asks the api which node's
/// edge holds a sandbox, and caches the answer (see the module docs of
/// `arca_proxy` and [`ClusterRoutesConfig`]).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let routes = arca_proxy::ClusterRoutes::new("http://10.0.0.2:3000", "cluster-token")?;
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:3001").await?;
/// arca_proxy::serve(listener, routes, arca_proxy::ProxyConfig::default()).await?;
/// # Ok(())
/// # }
/// ```
pub struct ClusterRoutes {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client<HttpConnector, Empty<Bytes>>,
    /// The api URL as given, for logs.
    api_url: String,
    /// `{api}/cluster/v1/routes/`, the sandbox id goes after it.
    routes_url: String,
    /// `Bearer <token>`, marked sensitive.
    auth: HeaderValue,
    config: ClusterRoutesConfig,
    state: Mutex<State>,
    ended: broadcast::Sender<SandboxId>,
}

impl std::fmt::Debug for ClusterRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterRoutes")
            .field("api_url", &self.inner.api_url)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl ClusterRoutes {
    /// Routes from the api at `api_url` (`http://host:port`, optionally with
    /// a path prefix), authenticated by the cluster `token`, with the
    /// default cache settings.
    pub fn new(api_url: &str, token: &str) -> Result<Arc<ClusterRoutes>, ClusterRoutesError> {
        ClusterRoutes::with_config(api_url, token, ClusterRoutesConfig::default())
    }

    /// As [`new`](Self::new), with these cache settings.
    pub fn with_config(
        api_url: &str,
        token: &str,
        mut config: ClusterRoutesConfig,
    ) -> Result<Arc<ClusterRoutes>, ClusterRoutesError> {
        let base = api_url.trim_end_matches('/');
        let uri: Uri = base
            .parse()
            .map_err(|source| ClusterRoutesError::InvalidApiUrl {
                url: api_url.to_string(),
                source,
            })?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() || uri.query().is_some() {
            return Err(ClusterRoutesError::UnsupportedApiUrl {
                url: api_url.to_string(),
            });
        }
        let mut auth =
            HeaderValue::from_str(&bearer(token)).map_err(|_| ClusterRoutesError::InvalidToken)?;
        auth.set_sensitive(true);
        config.ttl = config.ttl.max(MIN_ROUTE_TTL);

        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.api_timeout));
        let client = Client::builder(TokioExecutor::new()).build(http);
        Ok(Arc::new(ClusterRoutes {
            inner: Arc::new(Inner {
                client,
                api_url: api_url.to_string(),
                routes_url: format!("{base}{CLUSTER_PREFIX}/routes/"),
                auth,
                config,
                state: Mutex::default(),
                ended: broadcast::channel(ENDED_CAPACITY).0,
            }),
        }))
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks the api, then caches the answer and tells the waiters. Runs as
    /// its own task, so a request that gives up waiting does not cancel it
    /// for the others.
    async fn refresh(self: Arc<Self>, sandbox_id: SandboxId, flight: u64) {
        // Should this task die, its waiters learn it and the next request
        // starts another fetch.
        let landing = Landing {
            inner: &self,
            sandbox_id: sandbox_id.as_str(),
            flight,
        };
        let fetched = self.fetch(&sandbox_id).await;
        let id = sandbox_id.as_str();
        if let Err(err) = &fetched {
            // Api trouble hits every request: at most one line a second.
            if crate::log_allowed(&API_WARNED) {
                tracing::warn!(sandbox_id = id, api = %self.api_url, ?err, "cannot get a sandbox's route from the api");
            }
        }
        let (reachable, ended, waiters) = {
            let mut state = self.lock();
            let (reachable, ended) = self.store(&mut state, id, fetched);
            (reachable, ended, state.land(id, flight))
        };
        drop(landing);
        if ended {
            tracing::debug!(sandbox_id = id, "sandbox no longer reachable");
            // No subscriber (no proxy yet): nothing to abort.
            let _ = self.ended.send(sandbox_id.clone());
        }
        if let Some(waiters) = waiters {
            // All of them may have given up.
            let _ = waiters.outcome.send(Some(reachable));
        }
    }

    /// Caches a fetch's outcome: whether the sandbox is reachable, and
    /// whether it just stopped being so (gone or lost after a route).
    fn store(
        &self,
        state: &mut State,
        id: &str,
        fetched: Result<Fetched, FetchError>,
    ) -> (bool, bool) {
        let config = &self.config;
        let now = Instant::now();
        let was_reachable = state.cache.get(id).is_some_and(|e| e.route.is_some());
        let negative = Entry {
            route: None,
            fresh_until: now + config.negative_ttl,
            confirmed: now,
        };
        match fetched {
            Ok(Fetched::Reachable(route)) => {
                let entry = Entry {
                    route: Some(route),
                    fresh_until: now + config.ttl,
                    confirmed: now,
                };
                state.insert(id, entry, config, now);
                (true, false)
            }
            Ok(Fetched::Gone | Fetched::Lost) => {
                state.insert(id, negative, config, now);
                (false, was_reachable)
            }
            Err(_) => {
                if let Some(entry) = state.cache.get_mut(id) {
                    if entry.usable_on_error(now, config.stale_if_error) {
                        // Served on, and asked for again soon.
                        entry.fresh_until = now + config.negative_ttl.max(MIN_ROUTE_TTL);
                        return (true, false);
                    }
                }
                state.insert(id, negative, config, now);
                (false, false)
            }
        }
    }

    /// One route request to the api.
    async fn fetch(&self, sandbox_id: &SandboxId) -> Result<Fetched, FetchError> {
        let timeout = self.config.api_timeout;
        tokio::time::timeout(timeout, self.fetch_unbounded(sandbox_id))
            .await
            .map_err(|_| FetchError::Timeout(timeout))?
    }

    async fn fetch_unbounded(&self, sandbox_id: &SandboxId) -> Result<Fetched, FetchError> {
        let id = sandbox_id.as_str();
        let req = Request::get(format!("{}{id}", self.routes_url))
            .header(AUTHORIZATION, self.auth.clone())
            .body(Empty::new())
            .map_err(|source| FetchError::Url {
                sandbox_id: id.to_string(),
                source,
            })?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(FetchError::Request)?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(Fetched::Gone),
            other => return Err(FetchError::Status(other)),
        }
        let body = Limited::new(resp.into_body(), MAX_ROUTE_BODY)
            .collect()
            .await
            .map_err(FetchError::Body)?
            .to_bytes();
        let info: RouteInfo = serde_json::from_slice(&body).map_err(FetchError::Decode)?;
        if info.sandbox_id != id {
            return Err(FetchError::OtherSandbox {
                asked: id.to_string(),
                got: info.sandbox_id,
            });
        }
        match info.node_status {
            NodeStatus::Lost => return Ok(Fetched::Lost),
            NodeStatus::Ready | NodeStatus::Draining => {}
        }
        let relay = resolve_edge(&info.edge_addr).await?;
        Ok(Fetched::Reachable(Route {
            sandbox_id: sandbox_id.clone(),
            netns: PathBuf::new(),
            envd_access_token: None,
            ingress: IngressSpec::default(),
            relay: Some(relay),
            address: None,
        }))
    }
}

/// Ends a flight however its task ends (the normal end does it in
/// [`Inner::store`]; this covers a panic).
struct Landing<'a> {
    inner: &'a Inner,
    sandbox_id: &'a str,
    flight: u64,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        // Dropping the flight's sender wakes its waiters with an error.
        let flight = self.inner.lock().land(self.sandbox_id, self.flight);
        drop(flight);
    }
}

/// An edge address as nodes register it: `ip:port`, or `host:port`
/// resolved here (first address).
async fn resolve_edge(addr: &str) -> Result<SocketAddr, FetchError> {
    if let Ok(parsed) = addr.parse() {
        return Ok(parsed);
    }
    let resolve = |source| FetchError::ResolveEdge {
        addr: addr.to_string(),
        source,
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(resolve)?
        .next()
        .ok_or_else(|| resolve(io::ErrorKind::NotFound.into()))
}

impl RouteSource for ClusterRoutes {
    /// The cached route, while younger than the TTL.
    fn route(&self, sandbox_id: &str) -> Option<Route> {
        let now = Instant::now();
        let state = self.inner.lock();
        let entry = state.cache.get(sandbox_id)?;
        if entry.is_fresh(now) {
            entry.route.clone()
        } else {
            None
        }
    }

    /// The fresh cached routes: the sandboxes this proxy saw traffic for
    /// lately, not every sandbox of the cluster.
    fn routes(&self) -> Vec<Route> {
        let now = Instant::now();
        self.inner
            .lock()
            .cache
            .values()
            .filter(|e| e.is_fresh(now))
            .filter_map(|e| e.route.clone())
            .collect()
    }

    /// Sandboxes found gone or lost on a refetch.
    fn ended(&self) -> broadcast::Receiver<SandboxId> {
        self.inner.ended.subscribe()
    }

    /// Asks the api for the route (once at a time per id, and not again
    /// while a cached answer is fresh); `true` when the sandbox is on a
    /// reachable node. Nothing is resumed from here: a paused sandbox has no
    /// route at its edge, which wakes it when the request arrives there.
    fn wake<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let Ok(id) = SandboxId::parse(sandbox_id) else {
                return false;
            };
            let mut outcome = {
                let mut state = self.inner.lock();
                if let Some(entry) = state.cache.get(sandbox_id) {
                    if entry.is_fresh(Instant::now()) {
                        return entry.route.is_some();
                    }
                }
                match state.flights.get(sandbox_id) {
                    Some(flight) => flight.outcome.subscribe(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        let flight = state.next_flight;
                        state.next_flight += 1;
                        state.flights.insert(
                            sandbox_id.to_string(),
                            Flight {
                                id: flight,
                                outcome: tx,
                            },
                        );
                        tokio::spawn(Arc::clone(&self.inner).refresh(id, flight));
                        rx
                    }
                }
            };
            // An error: the fetching task died; this request finds nothing.
            outcome
                .wait_for(Option::is_some)
                .await
                .is_ok_and(|o| *o == Some(true))
        })
    }

    /// None: the edge knows the sandbox's ingress settings and checks them.
    fn ingress(&self, sandbox_id: &str) -> Option<IngressSpec> {
        let _ = sandbox_id;
        None
    }
}

#[cfg(test)]
impl ClusterRoutes {
    /// Requests waiting on the fetch in flight for `id`.
    fn waiters(&self, id: &str) -> usize {
        self.inner
            .lock()
            .flights
            .get(id)
            .map_or(0, |f| f.outcome.receiver_count())
    }

    /// Ids cached.
    fn cached(&self) -> usize {
        self.inner.lock().cache.len()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::Response;
    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio::task::JoinSet;

    use super::*;

    const TOKEN: &str = "cluster-s3cret";
    const HOUR: Duration = Duration::from_secs(3600);
    /// Upper bound on any wait, against hangs.
    const WAIT: Duration = Duration::from_secs(10);

    /// The api's cluster routes, in memory.
    struct FakeApi {
        url: String,
        /// Sandbox id to (edge address, node status); others are 404.
        routes: Mutex<HashMap<String, (String, NodeStatus)>>,
        /// Answer every request with this status instead.
        failing: Mutex<Option<StatusCode>>,
        /// Requests received, counted on arrival.
        hits: AtomicUsize,
        /// Answers are held while this is false.
        open: watch::Sender<bool>,
    }

    impl FakeApi {
        async fn start() -> Arc<FakeApi> {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let api = Arc::new(FakeApi {
                url: format!("http://{}", listener.local_addr().unwrap()),
                routes: Mutex::default(),
                failing: Mutex::default(),
                hits: AtomicUsize::new(0),
                open: watch::channel(true).0,
            });
            let server = Arc::clone(&api);
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let api = Arc::clone(&server);
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            let api = Arc::clone(&api);
                            async move { Ok::<_, Infallible>(api.answer(req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
            api
        }

        async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
            self.hits.fetch_add(1, Ordering::SeqCst);
            let _ = self.open.subscribe().wait_for(|open| *open).await;
            let status = |s: StatusCode| {
                let mut resp = Response::new(Full::default());
                *resp.status_mut() = s;
                resp
            };
            let authorized = req
                .headers()
                .get(AUTHORIZATION)
                .is_some_and(|v| v.as_bytes() == bearer(TOKEN).as_bytes());
            if !authorized {
                return status(StatusCode::UNAUTHORIZED);
            }
            if let Some(s) = *self.failing.lock().unwrap() {
                return status(s);
            }
            let prefix = format!("{CLUSTER_PREFIX}/routes/");
            let Some(id) = req.uri().path().strip_prefix(prefix.as_str()) else {
                return status(StatusCode::BAD_REQUEST);
            };
            let Some((edge, node_status)) = self.routes.lock().unwrap().get(id).cloned() else {
                return status(StatusCode::NOT_FOUND);
            };
            let info = RouteInfo {
                sandbox_id: id.to_string(),
                node_id: "node1".into(),
                edge_addr: edge,
                node_status,
            };
            Response::new(Full::new(serde_json::to_vec(&info).unwrap().into()))
        }

        fn set(&self, id: &str, edge: &str, status: NodeStatus) {
            self.routes
                .lock()
                .unwrap()
                .insert(id.into(), (edge.into(), status));
        }

        fn remove(&self, id: &str) {
            self.routes.lock().unwrap().remove(id);
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    /// Times long enough that only [`pass`] makes anything expire.
    fn config() -> ClusterRoutesConfig {
        ClusterRoutesConfig {
            ttl: HOUR,
            negative_ttl: HOUR,
            max_entries: 1000,
            api_timeout: WAIT,
            stale_if_error: 2 * HOUR,
        }
    }

    /// Moves the clock on by `d` (the tests run on a current-thread runtime).
    async fn pass(d: Duration) {
        tokio::time::pause();
        tokio::time::advance(d).await;
        tokio::time::resume();
    }

    async fn wake(routes: &ClusterRoutes, id: &str) -> bool {
        tokio::time::timeout(WAIT, routes.wake(id)).await.unwrap()
    }

    fn relay(routes: &ClusterRoutes, id: &str) -> Option<SocketAddr> {
        routes.route(id).map(|r| r.relay.unwrap())
    }

    #[tokio::test]
    async fn routes_are_fetched_with_the_token_and_served_until_the_ttl() {
        let api = FakeApi::start().await;
        api.set("alpha", "10.0.0.5:3101", NodeStatus::Ready);
        let routes = ClusterRoutes::with_config(&format!("{}/", api.url), TOKEN, config()).unwrap();

        // `route` only reads the cache.
        assert_eq!(routes.route("alpha"), None);
        assert_eq!(api.hits(), 0);
        assert!(wake(&routes, "alpha").await);
        let route = routes.route("alpha").unwrap();
        assert_eq!(route.sandbox_id.as_str(), "alpha");
        assert_eq!(route.relay, Some("10.0.0.5:3101".parse().unwrap()));
        assert_eq!(
            (route.envd_access_token, route.ingress),
            (None, IngressSpec::default())
        );
        assert_eq!(routes.routes().len(), 1);
        assert_eq!(routes.ingress("alpha"), None);

        // Fresh: neither `route` nor `wake` asks again.
        assert!(wake(&routes, "alpha").await);
        assert!(routes.route("alpha").is_some());
        assert_eq!(api.hits(), 1);

        // The sandbox moved (a resume elsewhere); the cache learns it after
        // the TTL.
        api.set("alpha", "10.0.0.6:3101", NodeStatus::Draining);
        pass(HOUR + Duration::from_millis(1)).await;
        assert_eq!(routes.route("alpha"), None);
        assert!(routes.routes().is_empty());
        assert!(wake(&routes, "alpha").await);
        assert_eq!(api.hits(), 2);
        assert_eq!(
            relay(&routes, "alpha"),
            Some("10.0.0.6:3101".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn a_wrong_token_finds_nothing() {
        let api = FakeApi::start().await;
        api.set("alpha", "10.0.0.5:3101", NodeStatus::Ready);
        let routes = ClusterRoutes::with_config(&api.url, "not-the-token", config()).unwrap();
        assert!(!wake(&routes, "alpha").await);
        assert_eq!(api.hits(), 1);
        assert_eq!(routes.route("alpha"), None);
    }

    #[tokio::test]
    async fn misses_are_cached_for_the_negative_ttl() {
        let api = FakeApi::start().await;
        api.set("lost", "10.0.0.5:3101", NodeStatus::Lost);
        let mut cfg = config();
        cfg.negative_ttl = Duration::from_secs(60);
        let routes = ClusterRoutes::with_config(&api.url, TOKEN, cfg).unwrap();

        for _ in 0..5 {
            assert!(!wake(&routes, "nosuch").await);
            assert!(!wake(&routes, "lost").await);
        }
        assert_eq!(
            api.hits(),
            2,
            "a miss was asked for again within the negative TTL"
        );
        assert_eq!((routes.route("nosuch"), routes.route("lost")), (None, None));

        api.set("nosuch", "10.0.0.7:3101", NodeStatus::Ready);
        pass(Duration::from_secs(61)).await;
        assert!(wake(&routes, "nosuch").await);
        assert!(!wake(&routes, "lost").await);
        assert_eq!(api.hits(), 4);
        // Ids that cannot be sandbox ids are not asked for.
        assert!(!wake(&routes, "Not-An-Id").await);
        assert_eq!(api.hits(), 4);
    }

    #[tokio::test]
    async fn one_fetch_serves_every_concurrent_miss() {
        let api = FakeApi::start().await;
        api.set("alpha", "10.0.0.5:3101", NodeStatus::Ready);
        api.open.send_replace(false);
        let routes = ClusterRoutes::with_config(&api.url, TOKEN, config()).unwrap();

        let mut requests = JoinSet::new();
        for _ in 0..8 {
            let routes = Arc::clone(&routes);
            requests.spawn(async move { routes.wake("alpha").await });
        }
        tokio::time::timeout(WAIT, async {
            while routes.waiters("alpha") < 8 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the requests did not join one fetch");
        api.open.send_replace(true);
        while let Some(woke) = tokio::time::timeout(WAIT, requests.join_next())
            .await
            .unwrap()
        {
            assert!(woke.unwrap());
        }
        assert_eq!(api.hits(), 1);
    }

    #[tokio::test]
    async fn a_fetch_outlives_the_request_that_started_it() {
        let api = FakeApi::start().await;
        api.set("alpha", "10.0.0.5:3101", NodeStatus::Ready);
        api.open.send_replace(false);
        let routes = ClusterRoutes::with_config(&api.url, TOKEN, config()).unwrap();

        let leader = {
            let routes = Arc::clone(&routes);
            tokio::spawn(async move { routes.wake("alpha").await })
        };
        let follower = {
            let routes = Arc::clone(&routes);
            tokio::spawn(async move { routes.wake("alpha").await })
        };
        tokio::time::timeout(WAIT, async {
            while routes.waiters("alpha") < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        api.open.send_replace(true);
        assert!(tokio::time::timeout(WAIT, follower).await.unwrap().unwrap());
        assert_eq!(api.hits(), 1);
        assert!(routes.route("alpha").is_some());
    }

    #[tokio::test]
    async fn sandboxes_found_gone_or_lost_are_announced_once() {
        let api = FakeApi::start().await;
        let routes = ClusterRoutes::with_config(&api.url, TOKEN, config()).unwrap();
        let mut ended = routes.ended();
        for id in ["alpha", "bravo"] {
            api.set(id, "10.0.0.5:3101", NodeStatus::Ready);
            assert!(wake(&routes, id).await);
        }
        // Never reachable: nothing to announce.
        api.set("charlie", "10.0.0.5:3101", NodeStatus::Lost);
        assert!(!wake(&routes, "charlie").await);
        assert!(!wake(&routes, "delta").await);

        api.remove("alpha");
        api.set("bravo", "10.0.0.5:3101", NodeStatus::Lost);
        pass(HOUR + Duration::from_millis(1)).await;
        assert!(!wake(&routes, "alpha").await);
        assert!(!wake(&routes, "bravo").await);
        assert_eq!(ended.try_recv().unwrap().as_str(), "alpha");
        assert_eq!(ended.try_recv().unwrap().as_str(), "bravo");
        // Asked again, still gone: no second announcement.
        pass(HOUR + Duration::from_millis(1)).await;
        assert!(!wake(&routes, "alpha").await);
        assert!(!wake(&routes, "charlie").await);
        assert!(matches!(
            ended.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ));
    }

    #[tokio::test]
    async fn a_failing_api_keeps_recent_routes_only() {
        let api = FakeApi::start().await;
        api.set("alpha", "10.0.0.5:3101", NodeStatus::Ready);
        let routes = ClusterRoutes::with_config(&api.url, TOKEN, config()).unwrap();
        let mut ended = routes.ended();
        assert!(wake(&routes, "alpha").await);

        *api.failing.lock().unwrap() = Some(StatusCode::SERVICE_UNAVAILABLE);
        api.set("bravo", "10.0.0.5:3101", NodeStatus::Ready);
        pass(HOUR + Duration::from_millis(1)).await;
        // Confirmed an hour ago, within the two of stale-if-error.
        assert!(wake(&routes, "alpha").await);
        assert!(routes.route("alpha").is_some());
        // Never confirmed: nothing to fall back on.
        assert!(!wake(&routes, "bravo").await);
        assert_eq!(api.hits(), 3);

        // Past stale-if-error the route goes, without an end announced: the
        // api never said it ended.
        pass(HOUR + Duration::from_millis(1)).await;
        assert!(!wake(&routes, "alpha").await);
        assert_eq!(routes.route("alpha"), None);
        assert!(ended.try_recv().is_err());

        // The api is back.
        *api.failing.lock().unwrap() = None;
        pass(HOUR + Duration::from_millis(1)).await;
        assert!(wake(&routes, "alpha").await);
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let api = FakeApi::start().await;
        let mut cfg = config();
        cfg.max_entries = 16;
        let routes = ClusterRoutes::with_config(&api.url, TOKEN, cfg).unwrap();
        for i in 0..100 {
            let id = format!("x{i}");
            api.set(&id, "10.0.0.5:3101", NodeStatus::Ready);
            assert!(wake(&routes, &id).await);
            assert!(routes.cached() <= 16, "{} cached", routes.cached());
            // The id just fetched is there for the request that asked.
            assert!(routes.route(&id).is_some());
        }
        assert_eq!(api.hits(), 100);
    }

    #[tokio::test]
    async fn edge_host_names_are_resolved() {
        let api = FakeApi::start().await;
        api.set("alpha", "localhost:4567", NodeStatus::Ready);
        api.set("bravo", "no-such-host.invalid:4567", NodeStatus::Ready);
        let routes = ClusterRoutes::with_config(&api.url, TOKEN, config()).unwrap();
        assert!(wake(&routes, "alpha").await);
        let addr = relay(&routes, "alpha").unwrap();
        assert!(addr.ip().is_loopback() && addr.port() == 4567, "{addr}");
        assert!(!wake(&routes, "bravo").await);
    }

    #[test]
    fn api_urls_must_be_plain_http() {
        let routes = ClusterRoutes::new("http://10.0.0.2:3000/prefix/", "t").unwrap();
        assert_eq!(
            routes.inner.routes_url,
            "http://10.0.0.2:3000/prefix/cluster/v1/routes/"
        );
        assert!(!format!("{routes:?}").contains("Bearer"));
        for bad in [
            "https://api:3000",
            "api:3000",
            "/cluster",
            "http://api/?x=1",
        ] {
            assert!(
                matches!(
                    ClusterRoutes::new(bad, "t"),
                    Err(ClusterRoutesError::UnsupportedApiUrl { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            ClusterRoutes::new("http://a b", "t"),
            Err(ClusterRoutesError::InvalidApiUrl { .. })
        ));
        assert!(matches!(
            ClusterRoutes::new("http://api:3000", "t\n"),
            Err(ClusterRoutesError::InvalidToken)
        ));
    }
}
