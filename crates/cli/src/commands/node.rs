//! `arca node`: one node of a cluster (ADR 0006). It runs sandboxes like
//! `arca up`'s node, serves the node RPC to the api (and template pulls to
//! its peers) behind the cluster token, serves its sandboxes' traffic on
//! its edge proxy, and registers with the api and heartbeats.
//!
//! The node's own settings (sandbox network, warm pool, pause-to-disk,
//! template builds) are the same flags as `arca up`'s ([`NodeArgs`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use arca_proto::build::BuildService;
use arca_proto::cluster::{
    CLUSTER_PREFIX, CachedBuild, Heartbeat, NodeCapacity, NodeLoad, NodeRegistration,
    RegistrationReply,
};
use arca_proto::node::{NodeService, RouteSource, SandboxState};

use super::cluster::{HttpJson, TokenArgs};
use super::up::NodeArgs;

/// Options of `arca node`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// State directory of this node: templates, sandboxes, its node id.
    #[arg(long, env = "ARCA_HOME", default_value = super::up::DEFAULT_HOME)]
    home: PathBuf,
    /// The api's URL (any replica), e.g. http://10.0.0.2:3000.
    #[arg(long, env = "ARCA_API_URL")]
    api: String,
    #[command(flatten)]
    token: TokenArgs,
    /// This node's id (default: the one kept in $ARCA_HOME/node_id, made on
    /// the first start).
    #[arg(long)]
    node_id: Option<String>,
    /// Address of the node RPC the api calls.
    #[arg(long, default_value = "0.0.0.0:3100")]
    listen: SocketAddr,
    /// Address of the edge proxy the cluster's proxies send sandbox
    /// traffic to.
    #[arg(long, default_value = "0.0.0.0:3101")]
    edge_listen: SocketAddr,
    /// The IP address the api and proxies reach this node at (default: the
    /// listen address, which must then not be 0.0.0.0).
    #[arg(long)]
    advertise: Option<std::net::IpAddr>,
    /// Most sandboxes (running or paused) this node takes; a create beyond
    /// it is placed on another node (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_sandboxes: u32,
    /// Use the base template of another Arca home on this machine (an
    /// `arca up` home, say) instead of pulling it from a peer.
    #[arg(long, value_name = "HOME")]
    base_from: Option<PathBuf>,
    /// Build the base template here (debootstrap, a few minutes) if this
    /// node does not have it, as `arca up` does. Without it (or
    /// --base-from), the node pulls base from a peer on first use.
    #[arg(long)]
    build_base: bool,
    #[command(flatten)]
    node: NodeArgs,
}

/// Load figures of the node now.
async fn load(node: &arca_node::Node) -> NodeLoad {
    let list = node.list().await.unwrap_or_default();
    let mut l = NodeLoad {
        sandboxes: u32::try_from(list.len()).unwrap_or(u32::MAX),
        memory_available_mb: meminfo_mb("MemAvailable:"),
        ..NodeLoad::default()
    };
    for s in list.iter().filter(|s| s.state == SandboxState::Running) {
        l.running += 1;
        l.cpu_allocated += s.cpu_count;
        l.memory_allocated_mb += u64::from(s.memory_mb);
    }
    l
}

fn meminfo_mb(name: &str) -> u64 {
    arca_node::meminfo_kib(name).map_or(0, |kib| kib / 1024)
}

/// Builds this node holds, from the running node's own store (opening the
/// store again would clean up under it, e.g. a build step's mounts).
async fn builds(node: &arca_node::Node) -> Vec<CachedBuild> {
    let store = arca_node::templates::TemplateStore::from(node.clone());
    let mut out: Vec<CachedBuild> = tokio::task::spawn_blocking(move || store.all())
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|b| CachedBuild {
            template_id: b.template_id,
            build_id: b.build_id,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The api's address when its URL names one by IP.
fn api_ip(url: &str) -> Option<std::net::IpAddr> {
    let authority = url.strip_prefix("http://")?.split('/').next()?;
    authority
        .parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| authority.parse())
        .ok()
}

/// The node id: given, or kept in `$ARCA_HOME/node_id` (made once).
fn node_id(home: &Path, given: Option<&str>) -> anyhow::Result<String> {
    let path = home.join("node_id");
    if let Some(id) = given {
        std::fs::write(&path, format!("{id}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
        return Ok(id.to_string());
    }
    if let Ok(s) = std::fs::read_to_string(&path) {
        let id = s.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    let id = format!("node-{:08x}", rand::random::<u32>());
    std::fs::write(&path, format!("{id}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    super::serve(node(args))
}

async fn node(args: &Args) -> anyhow::Result<ExitCode> {
    if !super::up::nix_is_root() {
        bail!(
            "arca node needs root (namespaces, cgroups, nftables); run it as root, and see `arca doctor`"
        );
    }
    let token = args.token.get()?;
    let advertise = match args.advertise {
        Some(ip) => ip,
        None if !args.listen.ip().is_unspecified() => args.listen.ip(),
        None => bail!(
            "--listen {} is every address: say which one the api and proxies reach this node at with --advertise IP",
            args.listen
        ),
    };
    let home = args.home.clone();
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    let node_id = node_id(&home, args.node_id.as_deref())?;
    let rpc_listener = super::listen(args.listen, "the node RPC (--listen)").await?;
    let edge_listener = super::listen(args.edge_listen, "the edge proxy (--edge-listen)").await?;
    let rpc_port = rpc_listener.local_addr()?.port();
    let edge_port = edge_listener.local_addr()?.port();

    if let Some(other) = &args.base_from {
        let (h, o) = (home.clone(), other.clone());
        tokio::task::spawn_blocking(move || {
            arca_node::templates::TemplateStore::open(&h)?
                .share_base_from(&arca_node::templates::TemplateStore::open(&o)?)
        })
        .await?
        .with_context(|| format!("using the base template of {}", other.display()))?;
    } else if args.build_base {
        super::up::ensure_base(&home).await?;
    }
    let has_base = {
        let h = home.clone();
        tokio::task::spawn_blocking(move || {
            arca_node::templates::TemplateStore::open(&h).map(|s| s.has_base())
        })
        .await??
    };
    let mut config = args.node.node_config(&home, has_base)?;
    config.cluster_token = Some(arca_node::ClusterToken::new(token.clone()));
    config.max_sandboxes = args.max_sandboxes;
    // Sandboxes never reach the api (the rest of the cluster's network:
    // --deny-net, docs/cluster.md).
    if let Some(ip) = api_ip(&args.api) {
        config.net.egress.node_deny.push(ip.to_string());
    }
    let node = arca_node::Node::start(config)
        .await
        .context("starting the node (try `arca doctor`)")?;

    let svc: Arc<dyn NodeService> = Arc::new(node.clone());
    let builder: Arc<dyn BuildService> = Arc::new(node.clone());
    let transfer = arca_node::transfer::router(node.clone());
    let rpc = arca_node::rpc::identify(
        arca_node::rpc::router(svc, builder, token.clone(), Some(transfer)),
        &node_id,
    );
    let mut rpc_task = tokio::spawn(async move { axum::serve(rpc_listener, rpc).await });
    let routes: Arc<dyn RouteSource> = Arc::new(node.clone());
    let mut edge_task = tokio::spawn(arca_proxy::serve(
        edge_listener,
        routes,
        arca_proxy::ProxyConfig::default(),
    ));

    let rpc_url = format!("http://{}", SocketAddr::new(advertise, rpc_port));
    let edge_addr = SocketAddr::new(advertise, edge_port).to_string();
    eprintln!(
        "arca: node {node_id}: RPC on {rpc_url}, edge on {edge_addr}; joining {}",
        args.api
    );
    let capacity = NodeCapacity {
        max_sandboxes: args.max_sandboxes,
        cpu_count: u32::try_from(std::thread::available_parallelism().map_or(1, usize::from))
            .unwrap_or(u32::MAX),
        memory_mb: meminfo_mb("MemTotal:"),
    };
    let member = Member {
        http: HttpJson::new(&args.api, &token)?,
        node: node.clone(),
        registration: NodeRegistration {
            node_id: node_id.clone(),
            rpc_url,
            edge_addr,
            capacity,
            runtimes: node
                .runtimes()
                .into_iter()
                .filter(|r| r.available)
                .map(|r| r.runtime.as_str().to_string())
                .collect(),
            builds: Vec::new(),
            load: NodeLoad::default(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        },
    };
    let mut member_task = tokio::spawn(member.run());

    tokio::select! {
        r = &mut rpc_task => { r??; bail!("the node RPC server stopped") }
        r = &mut edge_task => { r??; bail!("the edge proxy stopped") }
        r = &mut member_task => { r?; bail!("the heartbeat loop stopped") }
        () = super::stop_signal()? => {}
    }
    member_task.abort();
    node.stop().await;
    eprintln!(
        "arca: node stopping; running sandboxes stay up and are reattached on the next start"
    );
    Ok(ExitCode::SUCCESS)
}

/// Registration and heartbeats.
struct Member {
    http: HttpJson,
    node: arca_node::Node,
    registration: NodeRegistration,
}

impl Member {
    async fn register(&mut self) -> anyhow::Result<RegistrationReply> {
        self.registration.builds = builds(&self.node).await;
        self.registration.load = load(&self.node).await;
        let path = format!("{CLUSTER_PREFIX}/nodes");
        let (status, body) = self
            .http
            .post(&path, &self.registration, Duration::from_secs(10))
            .await?;
        if !status.is_success() {
            bail!("the api refused the registration ({status}): {body}");
        }
        serde_json::from_str(&body).context("reading the api's registration answer")
    }

    /// Registers (retrying until the api answers), then heartbeats; a
    /// heartbeat the api does not know leads to a new registration.
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let reply = match self.register().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "could not register with the api; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            eprintln!(
                "arca: node {} registered ({} builds)",
                self.registration.node_id,
                self.registration.builds.len()
            );
            let period = Duration::from_millis(reply.heartbeat_ms.clamp(100, 60_000));
            // A beat that hangs must not outlive the api's patience: a third
            // of the silence after which the node would be lost, at most.
            let patience = Duration::from_millis((reply.lost_after_ms / 3).max(100)).min(period);
            let mut last_builds = self.registration.builds.clone();
            let path = format!(
                "{CLUSTER_PREFIX}/nodes/{}/heartbeat",
                self.registration.node_id
            );
            // Beats at a fixed rate, whatever each one takes.
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut failing = false;
            loop {
                tick.tick().await;
                let now_builds = builds(&self.node).await;
                let beat = Heartbeat {
                    load: load(&self.node).await,
                    builds: (now_builds != last_builds).then(|| now_builds.clone()),
                };
                let answer = self.http.post(&path, &beat, patience).await;
                match answer {
                    Ok((s, _)) if s.is_success() => {
                        last_builds = now_builds;
                        if failing {
                            failing = false;
                            eprintln!("arca: heartbeats reach the api again");
                        }
                    }
                    Ok((s, _)) if s == http::StatusCode::NOT_FOUND => break,
                    // Said once per outage, not every beat.
                    Ok((s, body)) if !failing => {
                        failing = true;
                        tracing::warn!(status = %s, %body, "the api refused a heartbeat");
                    }
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %format!("{e:#}"), "heartbeat failed; retrying every beat");
                    }
                    Ok(_) | Err(_) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_addresses_come_from_ip_urls_only() {
        assert_eq!(
            super::api_ip("http://10.0.0.2:3000").map(|i| i.to_string()),
            Some("10.0.0.2".into())
        );
        assert_eq!(
            super::api_ip("http://10.0.0.2/").map(|i| i.to_string()),
            Some("10.0.0.2".into())
        );
        assert_eq!(super::api_ip("http://api.internal:3000"), None);
    }

    #[test]
    fn node_ids_are_made_once_and_kept() {
        let home = tempfile::tempdir().unwrap();
        let made = super::node_id(home.path(), None).unwrap();
        assert!(made.starts_with("node-") && made.len() == 13, "{made}");
        assert_eq!(super::node_id(home.path(), None).unwrap(), made);
        assert_eq!(super::node_id(home.path(), Some("n7")).unwrap(), "n7");
        assert_eq!(super::node_id(home.path(), None).unwrap(), "n7");
    }

    #[test]
    fn the_nodes_token_stays_out_of_debug_output() {
        let token = arca_node::ClusterToken::new("s3cr3t-s3cr3t-s3cr3t");
        assert_eq!(token.as_str(), "s3cr3t-s3cr3t-s3cr3t");
        assert!(!format!("{token:?}").contains("s3cr3t"));
    }
}
