//! `arca up`: the api, the proxy and one node in one process, state in
//! `$ARCA_HOME` (SQLite, templates, sandboxes). The README's start command.
//!
//! On the first start it builds the `base` template (Debian via
//! debootstrap, a few minutes, with a progress bar), creates a team and an
//! API key, writes the key to `$ARCA_HOME/api_key` and prints the E2B
//! environment. Stopping `arca up` leaves running sandboxes running: the
//! next start reattaches them.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use arca_proto::build::BuildService;
use arca_proto::node::{NodeService, RouteSource};

/// Default `$ARCA_HOME`.
pub(crate) const DEFAULT_HOME: &str = "/var/lib/arca";

/// Options of `arca up`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// State directory: database, templates, sandboxes, the API key.
    #[arg(long, env = "ARCA_HOME", default_value = DEFAULT_HOME)]
    pub(crate) home: PathBuf,
    /// Address of the E2B REST API.
    #[arg(long, default_value = "127.0.0.1:3000")]
    api_listen: SocketAddr,
    /// Address of the sandbox proxy (E2B_SANDBOX_URL).
    #[arg(long, default_value = "127.0.0.1:3001")]
    proxy_listen: SocketAddr,
    /// Base domain returned to SDKs for host routing (recipe B); unset
    /// leaves the clients' E2B_DOMAIN.
    #[arg(long)]
    domain: Option<String>,
    /// The API's URL as clients reach it, for the upload links of template
    /// builds (default: the API's listen address; 127.0.0.1 when it listens
    /// on all addresses).
    #[arg(long, env = "ARCA_PUBLIC_URL")]
    public_url: Option<String>,
    #[command(flatten)]
    pub(crate) node: NodeArgs,
}

/// The node's settings, shared by `arca up` and `arca node`.
#[derive(clap::Args, Debug)]
pub(crate) struct NodeArgs {
    /// The static `arca-envd` binary mounted into sandboxes; default: next
    /// to `arca`, then the musl release build of this checkout.
    #[arg(long, env = "ARCA_ENVD_BIN")]
    envd: Option<PathBuf>,
    /// Address range of sandbox network slots.
    #[arg(long, default_value = "10.88.0.0/16")]
    sandbox_cidr: String,
    /// Name of this instance's network namespaces, veths, nftables table and
    /// cgroup directory (change it to run instances side by side).
    #[arg(long, default_value = "arca")]
    net_prefix: String,
    /// Network slots kept ready ahead of demand.
    #[arg(long, default_value_t = 8)]
    warm_slots: usize,
    /// A network no sandbox may reach whatever its rules (repeat the flag).
    /// Given at all, it replaces the default: 169.254.0.0/16 and
    /// 100.100.100.200 (cloud metadata services). Add your LAN to keep
    /// sandboxes off it.
    #[arg(long = "deny-net", value_name = "CIDR")]
    deny_net: Vec<String>,
    /// Ports of the node's DNS forwarder, TLS and HTTP name checks
    /// (DNS,TLS,HTTP; 0 picks a free port), which sandbox traffic reaches
    /// only through the firewall's redirects (docs/network.md).
    #[arg(long, value_name = "DNS,TLS,HTTP", value_delimiter = ',', default_values_t = [15353u16, 15443, 15080])]
    egress_ports: Vec<u16>,
    /// nflog group the firewall logs sandbox connection verdicts to (one
    /// reader per group on a host: instances side by side need their own).
    #[arg(long, default_value_t = 8710)]
    nflog_group: u16,
    /// Booted sandboxes kept ready per template in use, so a create only
    /// configures one (0 turns the warm pool off).
    #[arg(long, default_value_t = 2)]
    warm_pool: usize,
    /// Registry mirror for Docker Hub images in template builds (e.g.
    /// `mirror.example.com` or `http://127.0.0.1:5000`).
    #[arg(long, env = "ARCA_REGISTRY_MIRROR")]
    registry_mirror: Option<String>,
    /// A registry (`host:port`) spoken to over plain HTTP in template
    /// builds (repeatable; loopback registries always are).
    #[arg(long)]
    insecure_registry: Vec<String>,
    /// Disk each template build step may write, MiB.
    #[arg(long, default_value_t = arca_node::DEFAULT_BUILD_DISK_MB)]
    build_disk_mb: u32,
    /// Most sandboxes paused with their memory at once; beyond it the
    /// longest-paused are moved to disk, keeping their files only (0: no
    /// limit).
    #[arg(long, default_value_t = arca_node::DEFAULT_MAX_FROZEN)]
    max_frozen: usize,
    /// Move a sandbox paused with its memory to disk (files only) after it
    /// has been paused this many seconds (default: never for idleness).
    #[arg(long, value_name = "SECS")]
    pause_to_disk_after: Option<u64>,
    /// When less than this percentage of the host's memory is available,
    /// the longest-paused frozen sandbox is moved to disk (0 turns it off).
    #[arg(long, default_value_t = arca_node::DEFAULT_MIN_FREE_MEMORY_PCT, value_parser = clap::value_parser!(u8).range(0..=100))]
    min_free_memory_pct: u8,
    /// The CRIU binary (4.2 or later; scripts/build-criu.sh builds one).
    /// With it, sandboxes moved to disk keep their processes and memory.
    /// Default: /usr/local/sbin/criu, then criu on PATH.
    #[arg(long, env = "ARCA_CRIU")]
    criu: Option<PathBuf>,
    /// The runsc binary of the `gvisor` runtime (default: runsc on PATH;
    /// Debian's `runsc` package). Without one, `gvisor` is unavailable.
    #[arg(long, env = "ARCA_RUNSC")]
    runsc: Option<PathBuf>,
    /// runsc's platform (default: systrap where runsc has it, else ptrace).
    #[arg(long, value_name = "PLATFORM")]
    gvisor_platform: Option<String>,
    /// Kernel and modules of the `vm` runtime, as scripts/vm-assets.sh
    /// makes them (default: $ARCA_HOME/vm).
    #[arg(long, env = "ARCA_VM_ASSETS")]
    vm_assets: Option<PathBuf>,
}

impl NodeArgs {
    /// The node's configuration in `home`; `prewarm_base` keeps warm
    /// sandboxes of the base template.
    pub(crate) fn node_config(
        &self,
        home: &Path,
        prewarm_base: bool,
    ) -> anyhow::Result<arca_node::NodeConfig> {
        let envd = envd_binary(self)?;
        let [dns_port, tls_port, http_port] = self.egress_ports[..] else {
            anyhow::bail!(
                "--egress-ports takes three ports, DNS,TLS,HTTP (for example 15353,15443,15080; 0 picks a free one)"
            );
        };
        let net = arca_net::NetConfig {
            cidr: self.sandbox_cidr.clone(),
            warm_slots: self.warm_slots,
            name_prefix: self.net_prefix.clone(),
            nft_table: self.net_prefix.clone(),
            egress: arca_net::EgressHooks {
                dns_port,
                tls_port,
                http_port,
                nflog_group: self.nflog_group,
                node_deny: if self.deny_net.is_empty() {
                    arca_net::EgressHooks::default().node_deny
                } else {
                    self.deny_net.clone()
                },
            },
        };
        Ok(arca_node::NodeConfig {
            home: home.to_path_buf(),
            init_exe: std::env::current_exe().context("cannot find the arca binary's own path")?,
            envd_binary: envd,
            net,
            pids_limit: arca_node::DEFAULT_PIDS_LIMIT,
            warm_pool: self.warm_pool,
            prewarm: if prewarm_base {
                vec![(
                    arca_proto::build::BASE_TEMPLATE_ID.to_string(),
                    arca_proto::build::BASE_BUILD_ID.to_string(),
                    arca_api::DEFAULT_DISK_MB,
                )]
            } else {
                Vec::new()
            },
            uploads_dir: home.join("uploads"),
            registry_mirror: self.registry_mirror.clone(),
            insecure_registries: self.insecure_registry.clone(),
            build_disk_mb: self.build_disk_mb,
            max_frozen: self.max_frozen,
            frozen_to_disk_after: self.pause_to_disk_after.map(std::time::Duration::from_secs),
            criu: self.criu.clone(),
            min_free_memory_pct: self.min_free_memory_pct,
            max_sandboxes: 0,
            cluster_token: None,
            runsc: self.runsc.clone(),
            gvisor_platform: self.gvisor_platform.clone(),
            vm_assets: self.vm_assets.clone(),
        })
    }
}

fn envd_binary(args: &NodeArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.envd {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().context("cannot find the arca binary's own path")?;
    let beside = me.with_file_name("arca-envd");
    if beside.is_file() {
        return Ok(beside);
    }
    bail!(
        "the static arca-envd was not found next to {}; build it with `cargo build --release -p arca-envd --target x86_64-unknown-linux-musl` and pass --envd PATH (scripts/up.sh does both)",
        me.display()
    )
}

/// Builds the `base` template if this node does not have it yet.
pub(crate) async fn ensure_base(home: &Path) -> anyhow::Result<()> {
    // Opening the store also moves a base made by an older version
    // (`templates/base/rootfs`) into the layer store.
    let h = home.to_path_buf();
    let has_base = tokio::task::spawn_blocking(move || {
        arca_node::templates::TemplateStore::open(&h).map(|s| s.has_base())
    })
    .await??;
    if has_base {
        return Ok(());
    }
    let parent = home.join("tmp");
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let building = parent.join("base.building");
    if building.exists() {
        std::fs::remove_dir_all(&building)
            .with_context(|| format!("removing the half-built {}", building.display()))?;
    }
    eprintln!(
        "arca: building the base template (Debian bookworm via debootstrap; a few minutes, once)"
    );
    let started = std::time::Instant::now();
    let opts = arca_image::debian::BootstrapOptions::base(&building);
    // A bar redrawn in place on a terminal; one line per phase in a log.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let last_phase = std::sync::Mutex::new(None);
    let progress = |p: arca_image::debian::Progress| {
        if !tty {
            let mut last = last_phase
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *last != Some(p.phase) {
                *last = Some(p.phase);
                eprintln!("  {:>3.0}% {}", p.fraction * 100.0, p.message);
            }
            return;
        }
        let width = 30usize;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let done = ((p.fraction.clamp(0.0, 1.0) * width as f32) as usize).min(width);
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r  [{}{}] {:>3.0}% {:<40.40}",
            "#".repeat(done),
            " ".repeat(width - done),
            p.fraction * 100.0,
            p.message
        );
        let _ = err.flush();
    };
    arca_image::debian::bootstrap(&opts, &progress)
        .await
        .context("building the base template")?;
    if tty {
        eprintln!();
    }
    let b = building.clone();
    tokio::task::spawn_blocking(move || {
        arca_image::shift::shift_ownership(&b, arca_runtime::DEFAULT_ID_MAP.outside)
    })
    .await?
    .context("shifting the base template's ownership into the sandbox id range")?;
    let h = home.to_path_buf();
    tokio::task::spawn_blocking(move || {
        arca_node::templates::TemplateStore::open(&h)?.install_base_from(&building)
    })
    .await?
    .context("adding the base template to the layer store")?;
    eprintln!(
        "arca: base template ready in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes `$ARCA_HOME/api_key` (mode 0600): where `arca up`, `arca keys`
/// and the SDK fallbacks find the first API key.
pub(crate) fn write_key(home: &Path, key: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = home.join("api_key");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{key}")?;
    Ok(path)
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    super::serve(up(args))
}

async fn up(args: &Args) -> anyhow::Result<ExitCode> {
    if !nix_is_root() {
        bail!(
            "arca up needs root (namespaces, cgroups, nftables); run it as root, and see `arca doctor`"
        );
    }
    let home = args.home.clone();
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    let config = args.node.node_config(&home, true)?;
    // Bind first: a second `arca up` fails here, before touching anything.
    let api_listener = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for the API; is another arca up running? (--api-listen)",
                args.api_listen
            )
        })?;
    let proxy_listener = tokio::net::TcpListener::bind(args.proxy_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for the proxy; is another arca up running? (--proxy-listen)",
                args.proxy_listen
            )
        })?;

    ensure_base(&home).await?;

    let node = arca_node::Node::start(config)
        .await
        .context("starting the node (try `arca doctor`)")?;

    let db = format!("sqlite:{}", home.join("arca.db").display());
    let config = arca_api::ApiConfig {
        domain: args.domain.clone(),
        // Shared with the node, which reads COPY archives from there.
        uploads_dir: home.join("uploads"),
        public_url: super::public_url(args.public_url.as_deref(), args.api_listen),
        ..arca_api::ApiConfig::default()
    };
    let node_svc: Arc<dyn NodeService> = Arc::new(node.clone());
    // The node builds templates too.
    let builder: Arc<dyn BuildService> = Arc::new(node.clone());
    let api = arca_api::Api::open(&db, config, node_svc, builder)
        .await
        .context("opening the database")?;
    if let Some(key) = api
        .ensure_bootstrap()
        .await
        .context("creating the first API key")?
    {
        let path = write_key(&home, &key)?;
        eprintln!(
            "arca: created the first API key, saved to {}",
            path.display()
        );
    }
    let key = std::fs::read_to_string(home.join("api_key")).unwrap_or_default();
    eprintln!(
        "arca: API on http://{}, sandboxes through http://{}",
        args.api_listen, args.proxy_listen
    );
    eprintln!("arca: use the E2B SDKs with:");
    println!("export E2B_API_URL=http://{}", args.api_listen);
    println!("export E2B_SANDBOX_URL=http://{}", args.proxy_listen);
    println!("export E2B_API_KEY={}", key.trim());
    println!(
        "export E2B_DOMAIN={}",
        args.domain.as_deref().unwrap_or("e2b.localhost")
    );

    let routes: Arc<dyn RouteSource> = Arc::new(node.clone());
    let mut api_task = tokio::spawn(api.serve(api_listener));
    let mut proxy_task = tokio::spawn(arca_proxy::serve(
        proxy_listener,
        routes,
        arca_proxy::ProxyConfig::default(),
    ));
    tokio::select! {
        r = &mut api_task => { r??; bail!("the API server stopped") }
        r = &mut proxy_task => { r??; bail!("the proxy stopped") }
        () = super::stop_signal()? => {}
    }
    // Warm sandboxes and unused slots belong to nobody: remove them.
    // Handed-out sandboxes keep running; the next `arca up` reattaches them.
    node.stop().await;
    eprintln!("arca: stopping; running sandboxes stay up and are reattached on the next start");
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn nix_is_root() -> bool {
    // SAFETY-free check through /proc: the effective uid is the 2nd field of Uid:.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
