//! Where sandboxes run: the one in-process node of `arca up`, or the
//! registered nodes of a cluster (ADR 0006).
//!
//! In cluster mode every api replica reads the `nodes` table (refreshed
//! about every second) and keeps one [`NodeClient`] per node. A node is
//! `lost` when its last heartbeat is older than `lost_after`; its
//! sandboxes stay in the database, are reported with `nodeStatus: "lost"`
//! and cannot be reached until it returns. Placement picks the best of K
//! random ready nodes by load, preferring nodes that hold the template's
//! build, and falls through to the next node when one is full. Each
//! replica follows each node's event stream (at the RPC URL the node last
//! registered), and reconciles a node's records with what it runs whenever
//! that stream (re)connects or the node comes back from being lost, so a
//! node that returns after a loss, or an api that restarts, converges.

mod client;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use arca_proto::build::BuildService;
use arca_proto::cluster::{NodeInfo, NodeRegistration, NodeStatus, RegistrationReply, RouteInfo};
use arca_proto::node::NodeService;
use chrono::{DateTime, Utc};
use rand::seq::SliceRandom as _;
use tokio::sync::watch;

pub use client::NodeClient;

use crate::db::Db;
use crate::db::nodes::NodeRow;
use crate::error::{ApiError, chain};
use crate::{Api, Inner};

/// The node id of `arca up`'s in-process node (and of every record made
/// before cluster mode existed).
pub(crate) const LOCAL_NODE: &str = "local";

/// Default heartbeat period.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);
/// Default silence after which a node is lost.
pub const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(10);
/// Default K of "best of K".
pub const DEFAULT_PLACEMENT_CHOICES: usize = 3;

/// How often each replica re-reads the node table.
const REFRESH: Duration = Duration::from_secs(1);
/// A `creating` record older than this on a node that does not have the
/// sandbox belongs to a create that died with its api.
pub(crate) const STALE_CREATING: Duration = Duration::from_secs(600);

/// Settings of cluster mode (`arca api`). `Debug` leaves the token out.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Shared secret of nodes, proxies and api replicas.
    pub token: String,
    /// How often nodes heartbeat.
    pub heartbeat: Duration,
    /// Silence after which a node is lost.
    pub lost_after: Duration,
    /// K: ready nodes sampled per placement.
    pub placement_choices: usize,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("token", &"<redacted>")
            .field("heartbeat", &self.heartbeat)
            .field("lost_after", &self.lost_after)
            .field("placement_choices", &self.placement_choices)
            .finish()
    }
}

impl ClusterConfig {
    /// Defaults with `token`.
    pub fn new(token: impl Into<String>) -> ClusterConfig {
        ClusterConfig {
            token: token.into(),
            heartbeat: DEFAULT_HEARTBEAT,
            lost_after: DEFAULT_LOST_AFTER,
            placement_choices: DEFAULT_PLACEMENT_CHOICES,
        }
    }
}

/// The api's nodes.
pub(crate) enum Nodes {
    /// `arca up`: one node in this process, which also builds templates.
    Local {
        node: Arc<dyn NodeService>,
        builder: Arc<dyn BuildService>,
    },
    /// Registered nodes over RPC.
    Cluster(Arc<Registry>),
}

/// A node a create may go to.
pub(crate) struct Candidate {
    pub(crate) node_id: String,
    pub(crate) node: Arc<dyn NodeService>,
    /// RPC URL of another node holding the build, when this one lacks it.
    pub(crate) template_source: Option<String>,
}

impl Nodes {
    /// The node of a record.
    pub(crate) fn node(&self, node_id: &str) -> Result<Arc<dyn NodeService>, ApiError> {
        match self {
            Nodes::Local { node, .. } => Ok(Arc::clone(node)),
            Nodes::Cluster(reg) => reg.client_of(node_id),
        }
    }

    /// As [`Nodes::node`], reading the node table again first when this
    /// replica does not know the node yet (it may have registered through
    /// another replica a moment ago).
    pub(crate) async fn node_fresh(&self, node_id: &str) -> Result<Arc<dyn NodeService>, ApiError> {
        if let Nodes::Cluster(reg) = self {
            if !reg.read().nodes.iter().any(|n| n.row.id == node_id) {
                reg.refresh().await?;
            }
        }
        self.node(node_id)
    }

    /// Cluster mode: a node's health (`None` under `arca up`).
    pub(crate) fn status(&self, node_id: &str) -> Option<NodeStatus> {
        match self {
            Nodes::Local { .. } => None,
            Nodes::Cluster(reg) => Some(reg.status(node_id)),
        }
    }

    /// Nodes to try for a new sandbox of a build, best first.
    /// `runtime`: only nodes that run it (the local node checks itself).
    pub(crate) async fn candidates(
        &self,
        template_id: &str,
        build_id: &str,
        runtime: Option<arca_proto::node::Runtime>,
    ) -> Result<Vec<Candidate>, ApiError> {
        match self {
            Nodes::Local { node, .. } => Ok(vec![Candidate {
                node_id: LOCAL_NODE.to_string(),
                node: Arc::clone(node),
                template_source: None,
            }]),
            Nodes::Cluster(reg) => reg.candidates(template_id, build_id, runtime).await,
        }
    }

    /// Where a new template build runs.
    pub(crate) fn builder(&self) -> Result<(String, Arc<dyn BuildService>), ApiError> {
        match self {
            Nodes::Local { builder, .. } => Ok((LOCAL_NODE.to_string(), Arc::clone(builder))),
            Nodes::Cluster(reg) => reg.builder(),
        }
    }

    /// Every reachable builder a deleted build must be removed from.
    pub(crate) fn all_builders(&self) -> Vec<(String, Arc<dyn BuildService>)> {
        match self {
            Nodes::Local { builder, .. } => vec![(LOCAL_NODE.to_string(), Arc::clone(builder))],
            Nodes::Cluster(reg) => reg.reachable_builders(),
        }
    }
}

/// One node as this replica last read it.
#[derive(Debug, Clone)]
struct NodeView {
    row: NodeRow,
    status: NodeStatus,
}

#[derive(Default)]
struct View {
    nodes: Vec<NodeView>,
}

/// Cluster mode's node table, clients and followers of one api replica.
pub(crate) struct Registry {
    db: Db,
    config: ClusterConfig,
    view: RwLock<View>,
    /// Node id -> (RPC URL it was made for, client).
    clients: Mutex<HashMap<String, (String, NodeClient)>>,
    /// Nodes whose events this replica follows: node id -> the RPC URL
    /// followed, and the handle whose drop stops following it there.
    followed: Mutex<HashMap<String, (String, watch::Sender<()>)>>,
    /// Nodes seen lost at one refresh and back at a later one: their
    /// records must be reconciled even if their event stream never
    /// dropped (only their heartbeats did), since `DELETE` skipped the
    /// node while it was lost.
    returned: Mutex<HashSet<String>>,
    /// Held through a refresh: one that read the table earlier never
    /// replaces the view of one that read it later (a registration's
    /// refresh overtaken by the periodic one would hide the node again).
    refreshing: tokio::sync::Mutex<()>,
    /// When this replica started, or last read the table after failing to:
    /// nodes get `lost_after` from then before
    /// a silence counts, so a replica that starts after an outage does
    /// not report every node lost until their next heartbeat.
    started: Mutex<DateTime<Utc>>,
    /// The last read of the table failed (the database stalled: heartbeats
    /// could not be recorded either).
    stalled: std::sync::atomic::AtomicBool,
}

impl Registry {
    pub(crate) fn new(db: Db, config: ClusterConfig) -> Registry {
        Registry {
            db,
            config,
            view: RwLock::default(),
            clients: Mutex::default(),
            followed: Mutex::default(),
            returned: Mutex::default(),
            refreshing: tokio::sync::Mutex::default(),
            started: Mutex::new(Utc::now()),
            stalled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn status_of(&self, row: &NodeRow, now: DateTime<Utc>) -> NodeStatus {
        let since = *self.started.lock().unwrap_or_else(PoisonError::into_inner);
        let silent = (now - row.last_seen.max(since))
            .to_std()
            .unwrap_or_default();
        if silent > self.config.lost_after {
            NodeStatus::Lost
        } else if row.status == "draining" {
            NodeStatus::Draining
        } else {
            NodeStatus::Ready
        }
    }

    /// Re-reads the node table.
    pub(crate) async fn refresh(&self) -> Result<(), ApiError> {
        let _one_at_a_time = self.refreshing.lock().await;
        let rows = match self.db.nodes().await {
            Ok(r) => r,
            Err(e) => {
                self.stalled
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                return Err(e);
            }
        };
        let now = Utc::now();
        // After a database stall no node could heartbeat: count their
        // silences from now, not from before the stall.
        if self
            .stalled
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            *self.started.lock().unwrap_or_else(PoisonError::into_inner) = now;
        }
        let view = View {
            nodes: rows
                .into_iter()
                .map(|row| NodeView {
                    status: self.status_of(&row, now),
                    row,
                })
                .collect(),
        };
        let mut current = self.view.write().unwrap_or_else(PoisonError::into_inner);
        let back = view.nodes.iter().filter(|n| {
            n.status != NodeStatus::Lost
                && current
                    .nodes
                    .iter()
                    .any(|o| o.row.id == n.row.id && o.status == NodeStatus::Lost)
        });
        self.returned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(back.map(|n| n.row.id.clone()));
        *current = view;
        Ok(())
    }

    /// Nodes back from a loss since the last call, with their clients.
    fn take_returned(&self) -> Vec<(String, NodeClient)> {
        let ids =
            std::mem::take(&mut *self.returned.lock().unwrap_or_else(PoisonError::into_inner));
        let rows: Vec<NodeRow> = self
            .read()
            .nodes
            .iter()
            .filter(|n| ids.contains(&n.row.id))
            .map(|n| n.row.clone())
            .collect();
        rows.iter()
            .filter_map(|r| Some((r.id.clone(), self.client_for(r).ok()?)))
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// A node's health; unknown nodes count as lost.
    pub(crate) fn status(&self, node_id: &str) -> NodeStatus {
        self.read()
            .nodes
            .iter()
            .find(|n| n.row.id == node_id)
            .map_or(NodeStatus::Lost, |n| n.status)
    }

    fn client_for(&self, row: &NodeRow) -> Result<NodeClient, ApiError> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((url, c)) = clients.get(&row.id) {
            if *url == row.rpc_url {
                return Ok(c.clone());
            }
        }
        // The client checks every answer comes from this node: another
        // node now at the address must not be reconciled under this id.
        let c = NodeClient::for_node(&row.rpc_url, &self.config.token, &row.id)
            .map_err(|e| ApiError::Internal(format!("node {} has a bad RPC URL: {e}", row.id)))?;
        clients.insert(row.id.clone(), (row.rpc_url.clone(), c.clone()));
        Ok(c)
    }

    /// The client of a node that is not lost.
    fn client_of(&self, node_id: &str) -> Result<Arc<dyn NodeService>, ApiError> {
        let row = {
            let view = self.read();
            match view.nodes.iter().find(|n| n.row.id == node_id) {
                Some(n) if n.status != NodeStatus::Lost => n.row.clone(),
                Some(_) => {
                    return Err(ApiError::NodeUnavailable(format!(
                        "the sandbox's node {node_id} is lost (no heartbeat); its sandboxes come back when it does"
                    )));
                }
                None => {
                    return Err(ApiError::NodeUnavailable(format!(
                        "the sandbox's node {node_id} is not registered"
                    )));
                }
            }
        };
        Ok(Arc::new(self.client_for(&row)?))
    }

    /// Ready nodes ordered for a create: the best of K random ones first
    /// (by load, nodes with the build ahead), then the others the same way.
    async fn candidates(
        &self,
        template_id: &str,
        build_id: &str,
        runtime: Option<arca_proto::node::Runtime>,
    ) -> Result<Vec<Candidate>, ApiError> {
        // Counted now, not at the last refresh: creates in flight on every
        // replica already have their records.
        let placed: HashMap<String, i64> =
            self.db.sandboxes_per_node().await?.into_iter().collect();
        // Read now too: a build finished a moment ago is already recorded.
        let holders = self.db.nodes_with_build(template_id, build_id).await?;
        let (mut ready, sources) = {
            let view = self.read();
            let ready: Vec<NodeView> = view
                .nodes
                .iter()
                .filter(|n| n.status == NodeStatus::Ready)
                .filter(|n| runtime.is_none_or(|r| n.row.runtimes.iter().any(|x| x == r.as_str())))
                .cloned()
                .collect();
            // Any holder that answers can serve a pull, draining ones too;
            // ready ones first.
            let mut sources: Vec<&NodeView> = view
                .nodes
                .iter()
                .filter(|n| n.status != NodeStatus::Lost && holders.contains(&n.row.id))
                .collect();
            sources.sort_by_key(|n| n.status != NodeStatus::Ready);
            let sources: Vec<String> = sources.iter().map(|n| n.row.rpc_url.clone()).collect();
            (ready, sources)
        };
        if ready.is_empty() {
            if let Some(r) = runtime {
                let known = self
                    .read()
                    .nodes
                    .iter()
                    .any(|n| n.row.runtimes.iter().any(|x| x == r.as_str()));
                // Nodes that run it but are lost or draining: try later.
                if known {
                    return Err(ApiError::Capacity(format!(
                        "every node that runs runtime '{r}' is lost or draining"
                    )));
                }
                return Err(ApiError::BadRequest(format!(
                    "no node runs runtime '{r}' (see GET /cluster/v1/nodes)"
                )));
            }
            return Err(ApiError::Capacity(
                "no node is ready (none registered, or all lost or draining)".into(),
            ));
        }
        let source = sources.first().cloned();
        let score = |n: &NodeView| -> f64 {
            let count = placed
                .get(&n.row.id)
                .copied()
                .unwrap_or(0)
                .max(i64::from(n.row.load.sandboxes));
            #[allow(clippy::cast_precision_loss)]
            let mut s = if n.row.capacity.max_sandboxes > 0 {
                count as f64 / f64::from(n.row.capacity.max_sandboxes)
            } else {
                count as f64 / 100.0
            };
            if !holders.contains(&n.row.id) {
                // Pulling a template costs about what a few sandboxes do.
                s += 0.05;
            }
            s
        };
        ready.shuffle(&mut rand::rng());
        let k = self.config.placement_choices.clamp(1, ready.len());
        let (first, rest) = ready.split_at_mut(k);
        first.sort_by(|a, b| score(a).total_cmp(&score(b)));
        rest.sort_by(|a, b| score(a).total_cmp(&score(b)));
        let mut out = Vec::with_capacity(ready.len());
        for n in ready {
            let has = holders.contains(&n.row.id);
            if !has && source.is_none() {
                continue;
            }
            out.push(Candidate {
                node: Arc::new(self.client_for(&n.row)?),
                template_source: if has { None } else { source.clone() },
                node_id: n.row.id,
            });
        }
        if out.is_empty() {
            return Err(if holders.is_empty() {
                ApiError::NotFound(format!(
                    "template '{template_id}' (build {build_id}) is on no node"
                ))
            } else {
                ApiError::NodeUnavailable(format!(
                    "template '{template_id}' (build {build_id}) is only on nodes that are lost now"
                ))
            });
        }
        Ok(out)
    }

    fn builder(&self) -> Result<(String, Arc<dyn BuildService>), ApiError> {
        let row = {
            let view = self.read();
            view.nodes
                .iter()
                .filter(|n| n.status == NodeStatus::Ready)
                .min_by_key(|n| n.row.load.running)
                .map(|n| n.row.clone())
        };
        let row =
            row.ok_or_else(|| ApiError::Capacity("no node is ready to build the template".into()))?;
        Ok((row.id.clone(), Arc::new(self.client_for(&row)?)))
    }

    fn reachable_builders(&self) -> Vec<(String, Arc<dyn BuildService>)> {
        let rows: Vec<NodeRow> = self
            .read()
            .nodes
            .iter()
            .filter(|n| n.status != NodeStatus::Lost)
            .map(|n| n.row.clone())
            .collect();
        rows.into_iter()
            .filter_map(|r| {
                let c = self.client_for(&r).ok()?;
                Some((r.id, Arc::new(c) as Arc<dyn BuildService>))
            })
            .collect()
    }

    /// Every node as `GET /cluster/v1/nodes` lists it, with `placed`
    /// records per node.
    fn infos(&self, placed: &HashMap<String, i64>) -> Vec<NodeInfo> {
        self.read()
            .nodes
            .iter()
            .map(|n| NodeInfo {
                node_id: n.row.id.clone(),
                status: n.status,
                rpc_url: n.row.rpc_url.clone(),
                edge_addr: n.row.edge_addr.clone(),
                capacity: n.row.capacity,
                load: n.row.load,
                sandboxes: u32::try_from(placed.get(&n.row.id).copied().unwrap_or(0))
                    .unwrap_or(u32::MAX),
                last_seen: n.row.last_seen.to_rfc3339(),
                runtimes: n.row.runtimes.clone(),
            })
            .collect()
    }

    fn edge_of(&self, node_id: &str) -> Option<(String, NodeStatus)> {
        self.read()
            .nodes
            .iter()
            .find(|n| n.row.id == node_id)
            .map(|n| (n.row.edge_addr.clone(), n.status))
    }

    fn lost_nodes(&self) -> Vec<String> {
        self.read()
            .nodes
            .iter()
            .filter(|n| n.status == NodeStatus::Lost)
            .map(|n| n.row.id.clone())
            .collect()
    }

    /// Nodes this replica does not follow yet, or follows at an RPC URL
    /// they no longer have, marked followed at their URL; each with the
    /// receiver that says when to stop. Following a node at a new URL stops
    /// following it at the old one: whatever listens there now is not it.
    fn to_follow(&self) -> Vec<(NodeRow, watch::Receiver<()>)> {
        let rows: Vec<NodeRow> = self.read().nodes.iter().map(|n| n.row.clone()).collect();
        let mut followed = self.followed.lock().unwrap_or_else(PoisonError::into_inner);
        // Forgotten nodes: stop following them and drop their clients.
        let known: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        followed.retain(|id, _| known.contains(id.as_str()));
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, _| known.contains(id.as_str()));
        let mut out = Vec::new();
        for r in rows {
            if followed
                .get(&r.id)
                .is_some_and(|(url, _)| *url == r.rpc_url)
            {
                continue;
            }
            let (stop, stopped) = watch::channel(());
            // Replacing the entry drops the old sender: the old follower
            // ends.
            followed.insert(r.id.clone(), (r.rpc_url.clone(), stop));
            out.push((r, stopped));
        }
        out
    }
}

/// Starts the replica's background work: refreshing the node table,
/// following each node's events (reconciling on every (re)connection),
/// and removing records of expired sandboxes on lost nodes.
pub(crate) fn spawn_maintenance(inner: Weak<Inner>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else { break };
            let api = Api { inner };
            let Nodes::Cluster(reg) = api.nodes() else {
                break;
            };
            let reg = Arc::clone(reg);
            if let Err(e) = reg.refresh().await {
                tracing::warn!(error = %chain(&e), "could not read the node table");
                continue;
            }
            for (row, stop) in reg.to_follow() {
                match reg.client_for(&row) {
                    Ok(client) => {
                        follow(Arc::downgrade(&api.inner), row.id.clone(), client, stop);
                    }
                    Err(e) => {
                        tracing::warn!(node_id = %row.id, error = %chain(&e), "cannot follow node")
                    }
                }
            }
            for (node_id, client) in reg.take_returned() {
                let api = api.clone();
                tokio::spawn(async move {
                    tracing::info!(%node_id, "node is back; reconciling its sandboxes");
                    if let Err(e) =
                        crate::sync::reconcile_node(&api, &node_id, &client, false).await
                    {
                        tracing::warn!(%node_id, error = %chain(&e), "reconciling a node failed");
                    }
                });
            }
            let lost = reg.lost_nodes();
            if !lost.is_empty() {
                match api.db().delete_expired_on(&lost, Utc::now()).await {
                    Ok(gone) => {
                        for id in gone {
                            tracing::info!(sandbox_id = %id, "removed the record of an expired sandbox on a lost node");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %chain(&e), "could not sweep expired sandboxes of lost nodes");
                    }
                }
            }
        }
    });
}

/// Follows one node: its events update the records; each (re)connection
/// of its event stream reconciles its records with what it runs. Stops
/// when `stop`'s sender is dropped.
fn follow(inner: Weak<Inner>, node_id: String, client: NodeClient, stop: watch::Receiver<()>) {
    let events = client.events();
    let mut stopped = stop.clone();
    crate::sync::spawn_event_loop_until(
        inner.clone(),
        events,
        node_id.clone(),
        Arc::new(client.clone()),
        async move {
            // Nothing is ever sent: this returns when the sender is dropped.
            let _ = stopped.changed().await;
        },
    );
    let mut reconnects = client.reconnects();
    let mut stop = stop;
    tokio::spawn(async move {
        loop {
            let connected = tokio::select! {
                r = reconnects.changed() => r.is_ok(),
                _ = stop.changed() => false,
            };
            if !connected {
                break;
            }
            let Some(inner) = inner.upgrade() else { break };
            let api = Api { inner };
            tracing::info!(%node_id, "node event stream connected; reconciling its sandboxes");
            if let Err(e) = crate::sync::reconcile_node(&api, &node_id, &client, false).await {
                tracing::warn!(%node_id, error = %chain(&e), "reconciling a node failed");
            }
        }
    });
}

/// Checks the cluster token of a request.
pub(crate) fn authorize(api: &Api, headers: &http::HeaderMap) -> Result<Arc<Registry>, ApiError> {
    let Nodes::Cluster(reg) = api.nodes() else {
        return Err(ApiError::NotFound(
            "this api runs in single-node mode (arca up); cluster routes need `arca api`".into(),
        ));
    };
    let given = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let expected = reg.config.token.as_bytes();
    if !bool::from(subtle::ConstantTimeEq::ct_eq(given.as_bytes(), expected)) {
        return Err(ApiError::Unauthorized(
            "missing or wrong cluster token (Authorization: Bearer <ARCA_CLUSTER_TOKEN>)".into(),
        ));
    }
    Ok(Arc::clone(reg))
}

fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && id != LOCAL_NODE
}

/// `POST /cluster/v1/nodes`.
pub(crate) async fn register(
    axum::extract::State(api): axum::extract::State<Api>,
    headers: http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<axum::Json<RegistrationReply>, ApiError> {
    let registry = authorize(&api, &headers)?;
    let reg: NodeRegistration = parse(&body)?;
    if !valid_node_id(&reg.node_id) {
        return Err(ApiError::BadRequest(format!(
            "node id '{}': use 1 to 64 lowercase letters, digits and '-' (not 'local')",
            reg.node_id
        )));
    }
    if reg.edge_addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(ApiError::BadRequest(format!(
            "edge address '{}' is not IP:port",
            reg.edge_addr
        )));
    }
    NodeClient::new(&reg.rpc_url, &registry.config.token)
        .map_err(|e| ApiError::BadRequest(format!("RPC URL '{}': {e}", reg.rpc_url)))?;
    api.db().register_node(&reg, Utc::now()).await?;
    registry.refresh().await?;
    tracing::info!(node_id = %reg.node_id, rpc_url = %reg.rpc_url, edge = %reg.edge_addr, builds = reg.builds.len(), "node registered");
    Ok(axum::Json(RegistrationReply {
        heartbeat_ms: u64::try_from(registry.config.heartbeat.as_millis()).unwrap_or(u64::MAX),
        lost_after_ms: u64::try_from(registry.config.lost_after.as_millis()).unwrap_or(u64::MAX),
    }))
}

/// `POST /cluster/v1/nodes/{id}/heartbeat`: 204, or 404 (register again).
pub(crate) async fn heartbeat(
    axum::extract::State(api): axum::extract::State<Api>,
    axum::extract::Path(node_id): axum::extract::Path<String>,
    headers: http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<http::StatusCode, ApiError> {
    authorize(&api, &headers)?;
    let beat: arca_proto::cluster::Heartbeat = parse(&body)?;
    let known = api
        .db()
        .node_heartbeat(&node_id, &beat.load, beat.builds.as_deref(), Utc::now())
        .await?;
    if known {
        Ok(http::StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "node '{node_id}' is not registered; register again"
        )))
    }
}

/// A cluster route's JSON body, read after the token was checked.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not the expected JSON: {e}")))
}

/// `DELETE /cluster/v1/nodes/{id}`: forgets a lost node for good, with
/// the records of its sandboxes (an operator's answer to a machine that
/// will not come back). 409 unless the node is lost; 404 if unknown. A
/// node that does come back later registers anew, and reconciling it kills
/// every sandbox it still runs.
pub(crate) async fn forget_node(
    axum::extract::State(api): axum::extract::State<Api>,
    axum::extract::Path(node_id): axum::extract::Path<String>,
    headers: http::HeaderMap,
) -> Result<http::StatusCode, ApiError> {
    let reg = authorize(&api, &headers)?;
    reg.refresh().await?;
    match reg.read().nodes.iter().find(|n| n.row.id == node_id) {
        None => {
            return Err(ApiError::NotFound(format!(
                "node '{node_id}' is not registered"
            )));
        }
        Some(n) if n.status != NodeStatus::Lost => {
            return Err(ApiError::Conflict {
                message: format!(
                    "node '{node_id}' is {}; only a lost node can be forgotten (drain it and stop it first)",
                    n.status.as_str()
                ),
                error_code: None,
            });
        }
        Some(_) => {}
    }
    let records = api.db().forget_node(&node_id).await?;
    reg.refresh().await?;
    tracing::warn!(%node_id, records, "forgot a lost node and its sandbox records");
    Ok(http::StatusCode::NO_CONTENT)
}

/// `GET /cluster/v1/nodes`.
pub(crate) async fn list_nodes(
    axum::extract::State(api): axum::extract::State<Api>,
    headers: http::HeaderMap,
) -> Result<axum::Json<Vec<NodeInfo>>, ApiError> {
    let reg = authorize(&api, &headers)?;
    reg.refresh().await?;
    // Counted here, not at every refresh: only this listing needs them.
    let placed = api.db().sandboxes_per_node().await?.into_iter().collect();
    Ok(axum::Json(reg.infos(&placed)))
}

/// `POST /cluster/v1/nodes/{id}/drain` and `/ready`.
pub(crate) async fn set_draining(
    axum::extract::State(api): axum::extract::State<Api>,
    axum::extract::Path((node_id, action)): axum::extract::Path<(String, String)>,
    headers: http::HeaderMap,
) -> Result<http::StatusCode, ApiError> {
    let reg = authorize(&api, &headers)?;
    let status = match action.as_str() {
        "drain" => "draining",
        "ready" => "ready",
        other => {
            return Err(ApiError::NotFound(format!(
                "no node action '{other}' (drain, ready)"
            )));
        }
    };
    if !api.db().set_node_status(&node_id, status).await? {
        return Err(ApiError::NotFound(format!(
            "node '{node_id}' is not registered"
        )));
    }
    reg.refresh().await?;
    Ok(http::StatusCode::NO_CONTENT)
}

/// `GET /cluster/v1/routes/{sandboxId}`.
pub(crate) async fn route(
    axum::extract::State(api): axum::extract::State<Api>,
    axum::extract::Path(sandbox_id): axum::extract::Path<String>,
    headers: http::HeaderMap,
) -> Result<axum::Json<RouteInfo>, ApiError> {
    let reg = authorize(&api, &headers)?;
    let Some(node_id) = api.db().node_of(&sandbox_id).await? else {
        return Err(ApiError::sandbox_not_found(&sandbox_id));
    };
    let (edge_addr, node_status) = reg
        .edge_of(&node_id)
        .unwrap_or((String::new(), NodeStatus::Lost));
    Ok(axum::Json(RouteInfo {
        sandbox_id,
        node_id,
        edge_addr,
        node_status,
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_token_stays_out_of_debug_output() {
        let shown = format!("{:?}", super::ClusterConfig::new("s3cr3t-s3cr3t-s3cr3t"));
        assert!(
            !shown.contains("s3cr3t") && shown.contains("lost_after"),
            "{shown}"
        );
    }
}
