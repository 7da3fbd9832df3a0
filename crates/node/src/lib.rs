//! The Arca node agent: every sandbox on this host, from create to teardown.
//!
//! [`Node`] implements [`NodeService`] (what the api asks) and
//! [`RouteSource`] (what the proxy needs). For each sandbox it takes a
//! network slot, makes a cgroup with the sandbox's limits and an overlay
//! upper dir, starts envd as PID 1 through `arca __init` (the `ns` runtime),
//! waits for envd, sends `/init`, and then enforces the deadline itself, so
//! time limits hold while the api is down. A state file per sandbox is
//! written before any resource is made: a restarted node reattaches running
//! sandboxes and reaps half-made ones.
//!
//! ```no_run
//! # async fn run(config: arca_node::NodeConfig) -> Result<(), arca_node::StartError> {
//! let node = arca_node::Node::start(config).await?;
//! # let _ = node; Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod backends;
mod build;
mod criu;
mod disk;
mod egress;
mod egress_log;
mod envd;
mod lifecycle;
pub mod rpc;
mod startcmd;
mod state;
pub mod templates;
pub mod transfer;
mod vmboot;

pub use backends::runtime_support;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arca_net::{NetConfig, Slot, SlotPool};
use arca_proto::node::{
    BoxFuture, EndReason, LogEntry, MetricSample, NodeError, NodeService, PauseMode, Route,
    RouteSource, Runtime, RuntimeSupport, SandboxEvent, SandboxId, SandboxSpec, SandboxState,
    SandboxStatus, TimeoutAction,
};
use arca_runtime::cgroup::{Cgroup, Layout, Limits};
use arca_runtime::{DEFAULT_ID_MAP, InitConfig};
use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use crate::envd::EnvdClient;
use crate::state::{Phase, StateFile};
use crate::templates::{TemplateBuild, TemplateStore};

/// Version of the envd protocol the node's envd speaks.
pub const ENVD_VERSION: &str = "0.6.13";
/// Most processes and threads one sandbox may have.
pub const DEFAULT_PIDS_LIMIT: u64 = 2048;
/// Samples of metrics kept per sandbox (about 10 minutes at 5 s).
const METRICS_KEPT: usize = 120;
/// Log lines kept per sandbox.
const LOGS_KEPT: usize = 1000;
/// Egress log entries kept per sandbox.
const EGRESS_LOG_KEPT: usize = 2000;
/// Where a checkpointed sandbox's CRIU images live, in its directory.
const CHECKPOINT_DIR: &str = "checkpoint";
/// How long a stopped sandbox's disk may take to leave its loop device.
const DISK_RELEASED_WITHIN: Duration = Duration::from_secs(10);
/// How long envd has to answer after start.
const ENVD_READY_WITHIN: Duration = Duration::from_secs(15);

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// `$ARCA_HOME`: `sandboxes/` and `templates/` live here.
    pub home: PathBuf,
    /// The binary whose `__init` subcommand starts sandboxes (`arca`).
    pub init_exe: PathBuf,
    /// The static envd binary mounted into every sandbox.
    pub envd_binary: PathBuf,
    /// Network slots.
    pub net: NetConfig,
    /// Process limit per sandbox.
    pub pids_limit: u64,
    /// Booted sandboxes kept ready per template in use (0: none).
    pub warm_pool: usize,
    /// (template, build, disk MiB) to keep warm from the start, before
    /// first use.
    pub prewarm: Vec<(String, String, u32)>,
    /// Where the api keeps uploaded COPY archives (by hash).
    pub uploads_dir: PathBuf,
    /// Registry mirror for Docker Hub images in builds.
    pub registry_mirror: Option<String>,
    /// Registries spoken to over plain HTTP (besides loopback ones).
    pub insecure_registries: Vec<String>,
    /// Writable disk of each build step, MiB: what one RUN may write.
    pub build_disk_mb: u32,
    /// Most sandboxes paused with their memory (frozen) at once; beyond it
    /// the longest-paused go to disk (0: no limit).
    pub max_frozen: usize,
    /// A frozen sandbox goes to disk after this long paused (`None`: never
    /// for idleness).
    pub frozen_to_disk_after: Option<Duration>,
    /// Below this share of the host's memory available (MemAvailable, in
    /// percent), the longest-paused frozen sandbox moves to disk.
    pub min_free_memory_pct: u8,
    /// The `criu` binary (default: `/usr/local/sbin/criu`, then `PATH`).
    /// When a usable one is found, sandboxes moved to disk keep their
    /// processes and memory.
    pub criu: Option<PathBuf>,
    /// Most sandboxes (running or paused, warm ones not counted) this node
    /// holds; creates and forks beyond it get [`NodeError::Capacity`], which
    /// a cluster's placement answers by trying another node (0: no limit).
    pub max_sandboxes: u32,
    /// Cluster mode: the token this node presents to other nodes when it
    /// pulls a template build it lacks from them
    /// ([`SandboxSpec::template_source`]); `None` outside a cluster.
    pub cluster_token: Option<ClusterToken>,
    /// The `runsc` binary of the `gvisor` backend (default: `runsc` on
    /// `PATH`); without one the backend is unavailable.
    pub runsc: Option<PathBuf>,
    /// runsc's platform (default: `systrap` where runsc has it, else
    /// `ptrace`; `kvm` only when asked).
    pub gvisor_platform: Option<String>,
    /// Directory with the `vm` backend's kernel and modules
    /// (`scripts/vm-assets.sh` fills it; default `$ARCA_HOME/vm`).
    pub vm_assets: Option<PathBuf>,
}

/// The cluster token, kept out of `Debug` output (of [`NodeConfig`]).
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterToken(String);

impl ClusterToken {
    /// The token as given.
    pub fn new(token: impl Into<String>) -> ClusterToken {
        ClusterToken(token.into())
    }

    /// The token itself.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterToken(<redacted>)")
    }
}

/// Whether this host has a CRIU the node can use (the one `explicit`
/// names, else the default): its path and version, or why not. Blocking.
pub fn criu_status(explicit: Option<&Path>) -> Result<(PathBuf, String), String> {
    criu::Criu::detect(explicit).map(|c| (c.bin().to_path_buf(), c.version().to_string()))
}

/// Default [`NodeConfig::min_free_memory_pct`].
pub const DEFAULT_MIN_FREE_MEMORY_PCT: u8 = 10;

/// Default [`NodeConfig::max_frozen`].
pub const DEFAULT_MAX_FROZEN: usize = 64;

/// Default [`NodeConfig::build_disk_mb`].
pub const DEFAULT_BUILD_DISK_MB: u32 = 8192;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The host's cgroups lack something.
    #[error(transparent)]
    Cgroup(#[from] arca_runtime::cgroup::CgroupError),
    /// The network slots could not be made.
    #[error(transparent)]
    Net(#[from] arca_net::NetError),
    /// `$ARCA_HOME` is not usable.
    #[error("cannot use {path}")]
    Home {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A required file is missing.
    #[error("{0}")]
    Missing(String),
    /// Templates or layers cannot be read.
    #[error(transparent)]
    Templates(#[from] templates::StoreError),
}

/// What runs of a sandbox: its init, cgroup and network slot.
struct Running {
    pid: i32,
    pid_start: u64,
    slot: Option<Slot>,
    sandbox_ip: std::net::Ipv4Addr,
    netns: PathBuf,
    cgroup: Cgroup,
}

/// One sandbox of this node, running or paused.
struct Instance {
    spec: SandboxSpec,
    started_at: DateTime<Utc>,
    end_at: Mutex<DateTime<Utc>>,
    /// Gone while paused to disk (filesystem-only).
    run: Mutex<Option<Running>>,
    /// The network slot of a VM saved to a file: its memory holds the
    /// slot's address, so the slot waits for it.
    kept_slot: Mutex<Option<Slot>>,
    dir: PathBuf,
    logs: Mutex<VecDeque<LogEntry>>,
    metrics: Mutex<VecDeque<MetricSample>>,
    last_cpu: Mutex<Option<(Instant, u64)>>,
    /// Frozen by a pause.
    paused: std::sync::atomic::AtomicBool,
    /// Paused by its deadline (auto-resume applies only then).
    paused_at_deadline: std::sync::atomic::AtomicBool,
    /// The pause keeps files only (set before the processes go).
    on_disk: std::sync::atomic::AtomicBool,
    /// With `on_disk`: processes and memory are saved by CRIU.
    checkpointed: std::sync::atomic::AtomicBool,
    /// Its processes came from a CRIU restore: they cannot be checkpointed
    /// again (CRIU leaves them non-dumpable for the host's user namespace).
    restored: std::sync::atomic::AtomicBool,
    /// When the current pause began (for moving frozen sandboxes to disk).
    paused_since: Mutex<Option<Instant>>,
    /// The deadline loop is acting on it (pausing or ending it).
    deadline_busy: std::sync::atomic::AtomicBool,
    /// Serialises pause, resume and kill of this sandbox.
    transition: tokio::sync::Mutex<()>,
    /// Current egress settings (`PUT .../network` replaces them).
    network: Mutex<(arca_proto::network::NetworkSpec, bool)>,
    /// What it tried to reach (bounded).
    egress_log: egress_log::EgressLog,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Instance {
    /// A sandbox as its state file describes it.
    fn new(spec: SandboxSpec, st: &StateFile, dir: PathBuf, run: Option<Running>) -> Instance {
        Instance {
            started_at: st.started_at,
            end_at: Mutex::new(st.end_at),
            run: Mutex::new(run),
            kept_slot: Mutex::new(None),
            logs: Mutex::new(VecDeque::new()),
            metrics: Mutex::new(VecDeque::new()),
            last_cpu: Mutex::new(None),
            paused: std::sync::atomic::AtomicBool::new(st.paused),
            paused_at_deadline: std::sync::atomic::AtomicBool::new(st.paused_at_deadline),
            on_disk: std::sync::atomic::AtomicBool::new(st.on_disk),
            checkpointed: std::sync::atomic::AtomicBool::new(st.on_disk && st.checkpoint),
            restored: std::sync::atomic::AtomicBool::new(st.restored),
            paused_since: Mutex::new(st.paused.then(Instant::now)),
            deadline_busy: std::sync::atomic::AtomicBool::new(false),
            transition: tokio::sync::Mutex::new(()),
            network: Mutex::new((spec.network.clone(), spec.allow_internet_access)),
            egress_log: egress_log::EgressLog::open(&dir.join("egress.jsonl"), EGRESS_LOG_KEPT),
            dir,
            spec,
        }
    }

    /// Records new egress settings (already loaded into the firewall,
    /// whose pool also holds their compiled form).
    fn set_network(&self, network: arca_proto::network::NetworkSpec, allow_internet: bool) {
        *lock(&self.network) = (network, allow_internet);
    }

    /// Its spec with the current egress settings.
    fn current_spec(&self) -> SandboxSpec {
        let mut spec = self.spec.clone();
        let (network, allow) = lock(&self.network).clone();
        spec.network = network;
        spec.allow_internet_access = allow;
        spec
    }

    /// Index of its network slot, unless paused to disk.
    fn slot_index(&self) -> Option<u32> {
        lock(&self.run)
            .as_ref()
            .and_then(|r| r.slot.as_ref())
            .map(|s| s.index)
    }

    fn log(&self, level: &str, message: impl Into<String>) {
        let mut logs = lock(&self.logs);
        if logs.len() >= LOGS_KEPT {
            logs.pop_front();
        }
        logs.push_back(LogEntry {
            timestamp: Utc::now(),
            level: level.to_string(),
            message: message.into(),
            fields: BTreeMap::new(),
        });
    }

    fn status(&self) -> SandboxStatus {
        SandboxStatus {
            sandbox_id: self.spec.sandbox_id.clone(),
            template_id: self.spec.template_id.clone(),
            team_id: self.spec.team_id.clone(),
            state: if self.is_paused() {
                SandboxState::Paused
            } else {
                SandboxState::Running
            },
            pause_mode: self.is_paused().then(|| {
                if self.is_on_disk() && !self.is_checkpointed() {
                    PauseMode::Filesystem
                } else {
                    PauseMode::Full
                }
            }),
            started_at: self.started_at,
            end_at: *lock(&self.end_at),
            cpu_count: self.spec.cpu_count,
            memory_mb: self.spec.memory_mb,
            disk_size_mb: self.spec.disk_size_mb,
            envd_version: ENVD_VERSION.to_string(),
            runtime: self.runtime(),
        }
    }

    /// The isolation backend it runs under (set at create).
    fn runtime(&self) -> Runtime {
        self.spec.runtime.unwrap_or_default()
    }

    fn is_paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn is_on_disk(&self) -> bool {
        self.on_disk.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn is_checkpointed(&self) -> bool {
        self.checkpointed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The cgroup, unless paused to disk.
    fn cgroup(&self) -> Option<Cgroup> {
        lock(&self.run).as_ref().map(|r| r.cgroup.clone())
    }

    /// (network namespace, address), unless paused to disk.
    fn network(&self) -> Option<(PathBuf, std::net::Ipv4Addr)> {
        lock(&self.run)
            .as_ref()
            .map(|r| (r.netns.clone(), r.sandbox_ip))
    }

    /// (pid, start time) of the init, unless paused to disk.
    fn init_pid(&self) -> Option<(i32, u64)> {
        lock(&self.run).as_ref().map(|r| (r.pid, r.pid_start))
    }

    /// Writes the state file; `false` (logged) if it could not be written.
    fn save_state(&self) -> bool {
        let (pid, slot_index) = {
            let run = lock(&self.run);
            (
                run.as_ref().map(|r| (r.pid, r.pid_start)),
                run.as_ref()
                    .and_then(|r| r.slot.as_ref())
                    .or(lock(&self.kept_slot).as_ref())
                    .map(|s| s.index),
            )
        };
        let st = StateFile {
            phase: Phase::Running,
            spec: Some(self.current_spec()),
            started_at: self.started_at,
            end_at: *lock(&self.end_at),
            pid: pid.map(|p| p.0),
            pid_start: pid.map(|p| p.1),
            slot_index,
            paused: self.is_paused(),
            paused_at_deadline: self
                .paused_at_deadline
                .load(std::sync::atomic::Ordering::SeqCst),
            on_disk: self.is_on_disk(),
            checkpoint: self.is_checkpointed(),
            restored: self.restored.load(std::sync::atomic::Ordering::SeqCst),
        };
        match st.save(&self.dir) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(sandbox_id = %self.spec.sandbox_id, error = %e, "cannot save state");
                false
            }
        }
    }
}

struct Inner {
    config: NodeConfig,
    layout: Layout,
    /// CRIU, when this host has a usable one.
    criu: Option<criu::Criu>,
    /// The isolation backends this host can run.
    backends: backends::Backends,
    slots: SlotPool,
    /// DNS forwarder and name checks of domain rules.
    egress: std::sync::OnceLock<arca_egress::Egress>,
    sandboxes: Mutex<HashMap<SandboxId, Arc<Instance>>>,
    creating: Mutex<std::collections::HashSet<SandboxId>>,
    events: broadcast::Sender<SandboxEvent>,
    ended: broadcast::Sender<SandboxId>,
    envd: EnvdClient,
    disks: Arc<disk::DiskTemplates>,
    /// Booted, unclaimed sandboxes by (template, build, disk size).
    warm: Mutex<HashMap<WarmKey, Vec<Booted>>>,
    /// Keys to keep warm sandboxes of.
    hot: Mutex<std::collections::HashSet<WarmKey>>,
    /// Template builds and layers.
    templates: TemplateStore,
    /// Layers running builds use, kept from garbage collection.
    pinned: Mutex<Vec<String>>,
    /// (template, build) of sandboxes being made (cold or warm), which a
    /// deletion of the build must treat as running.
    booting: Mutex<Vec<(String, String)>>,
    refill: Arc<tokio::sync::Notify>,
    /// Warm sandboxes wanted per hot template (starts at `warm_pool`).
    warm_target: std::sync::atomic::AtomicUsize,
    /// One maker at a time per VM template image (by file name).
    vm_images: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// (template, build, disk MiB) of interchangeable warm sandboxes.
type WarmKey = (String, String, u32);

/// The node agent. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

fn sandboxes_dir(home: &Path) -> PathBuf {
    home.join("sandboxes")
}

impl Node {
    /// Starts the node: checks the host, reattaches sandboxes that survived
    /// a restart, reaps half-made ones, prepares network slots, and starts
    /// the deadline, liveness and metrics loops.
    pub async fn start(config: NodeConfig) -> Result<Node, StartError> {
        // Sandbox cgroups live under the same name as the network prefix, so
        // instances side by side (tests) never touch each other's.
        let layout = Layout::detect()?.with_parent(&config.net.name_prefix);
        layout.check()?;
        for (what, p) in [
            ("arca binary", &config.init_exe),
            ("static envd", &config.envd_binary),
        ] {
            if !p.is_file() {
                return Err(StartError::Missing(format!(
                    "{what} not found at {}; build it (scripts/up.sh does) or pass its path",
                    p.display()
                )));
            }
        }
        // Sandbox inits are re-parented to the node when `arca __init`
        // exits, so the node can reap them the moment they end.
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| StartError::Missing(format!("cannot become a child subreaper: {e}")))?;
        let dir = sandboxes_dir(&config.home);
        std::fs::create_dir_all(&dir).map_err(|source| StartError::Home {
            path: dir.clone(),
            source,
        })?;

        // Read every state file first: running sandboxes keep their slots.
        let mut survivors: Vec<(PathBuf, StateFile)> = Vec::new();
        let mut on_disk: Vec<(PathBuf, StateFile)> = Vec::new();
        let mut dead: Vec<(PathBuf, Option<StateFile>)> = Vec::new();
        for entry in std::fs::read_dir(&dir)
            .map_err(|source| StartError::Home {
                path: dir.clone(),
                source,
            })?
            .flatten()
        {
            let path = entry.path();
            match StateFile::load(&path) {
                Ok(st) if st.phase == Phase::Running && st.paused && st.on_disk => {
                    on_disk.push((path, st));
                }
                Ok(st)
                    if st.phase == Phase::Running
                        && st
                            .pid
                            .zip(st.pid_start)
                            .is_some_and(|(p, s)| state::same_process(p, s)) =>
                {
                    survivors.push((path, st));
                }
                Ok(st) => dead.push((path, Some(st))),
                Err(_) => dead.push((path, None)),
            }
        }
        let in_use: Vec<u32> = survivors
            .iter()
            .chain(&on_disk)
            .filter_map(|(_, s)| s.slot_index)
            .collect();
        // The egress listeners first: the firewall redirects to their ports.
        let cell = Arc::new(std::sync::OnceLock::new());
        let pool = arca_proto::network::Ipv4Net::parse(&config.net.cidr)
            .map_err(|e| StartError::Missing(format!("network cidr: {e}")))?;
        let mut forbidden = vec![pool];
        for d in &config.net.egress.node_deny {
            if let Ok(n) = arca_proto::network::Ipv4Net::parse(d) {
                forbidden.push(n);
            }
        }
        let egress_service = arca_egress::Egress::start(
            arca_egress::EgressConfig {
                dns_port: config.net.egress.dns_port,
                tls_port: config.net.egress.tls_port,
                http_port: config.net.egress.http_port,
                host_resolvers: egress::host_resolvers(),
                forbidden,
                ..arca_egress::EgressConfig::default()
            },
            Arc::new(egress::NodeEnforcer {
                inner: cell.clone(),
                pool,
            }),
        )
        .await
        .map_err(|e| {
            StartError::Missing(format!(
                "cannot start the egress listeners (DNS {}, TLS {}, HTTP {}): {e}; another Arca node may use these ports",
                config.net.egress.dns_port, config.net.egress.tls_port, config.net.egress.http_port
            ))
        })?;
        let mut net = config.net.clone();
        (
            net.egress.dns_port,
            net.egress.tls_port,
            net.egress.http_port,
        ) = egress_service.local_ports();
        // Sandboxes paused to disk keep a slot in their state file only
        // when a crash cut a resume short: what that resume started may
        // run until it is stopped below, under its rules.
        let adopted = Node::adopted_egress(survivors.iter().chain(&on_disk));
        let slots = SlotPool::new_with_egress(net.clone(), &in_use, &adopted).await?;
        let disks_dir = config.home.join("disks");
        let templates = TemplateStore::open(&config.home)?;
        let warm_pool = config.warm_pool;
        let explicit = config.criu.clone();
        let criu = match tokio::task::spawn_blocking(move || {
            criu::Criu::detect(explicit.as_deref())
        })
        .await
        {
            Ok(Ok(c)) => {
                tracing::info!(criu = %c.bin().display(), version = c.version(), "CRIU found: sandboxes moved to disk keep their processes");
                Some(c)
            }
            Ok(Err(why)) => {
                tracing::info!(%why, "no usable CRIU: sandboxes moved to disk keep their files only");
                None
            }
            Err(_) => None,
        };
        let backends = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || backends::Backends::detect(&config))
                .await
                .map_err(|e| StartError::Missing(format!("detecting runtimes: {e}")))?
        };
        for s in &backends.support {
            tracing::info!(runtime = %s.runtime, available = s.available, detail = %s.detail, "isolation backend");
        }
        let (events, _) = broadcast::channel(1024);
        let (ended, _) = broadcast::channel(1024);
        let node = Node {
            inner: Arc::new(Inner {
                config,
                layout,
                criu,
                backends,
                slots,
                egress: std::sync::OnceLock::from(egress_service),
                sandboxes: Mutex::new(HashMap::new()),
                creating: Mutex::new(std::collections::HashSet::new()),
                events,
                ended,
                envd: EnvdClient::new(),
                disks: Arc::new(disk::DiskTemplates::new(disks_dir, DEFAULT_ID_MAP.outside)),
                warm: Mutex::new(HashMap::new()),
                hot: Mutex::new(std::collections::HashSet::new()),
                refill: Arc::new(tokio::sync::Notify::new()),
                warm_target: std::sync::atomic::AtomicUsize::new(warm_pool),
                templates,
                pinned: Mutex::new(Vec::new()),
                booting: Mutex::new(Vec::new()),
                vm_images: Mutex::new(HashMap::new()),
            }),
        };
        let _ = cell.set(Arc::downgrade(&node.inner));
        node.spawn_nflog(net.egress.nflog_group);
        for (path, st) in dead {
            node.reap_leftover(&path, st.as_ref());
        }
        for (path, st) in survivors {
            node.reattach(path, st);
        }
        for (path, st) in on_disk {
            node.reattach_on_disk(path, st).await;
        }
        // cgroups of sandboxes that have no state directory at all (every
        // live or reattached sandbox has one, named like its cgroup).
        for name in node.inner.layout.sandbox_names() {
            let dir = sandboxes_dir(&node.inner.config.home).join(&name);
            if !dir.exists() {
                if let Ok(cg) = node.inner.layout.open(&name) {
                    teardown(Some(&cg), 0, None, &node.inner.slots, &dir);
                    tracing::info!(cgroup = %name, "removed a leftover cgroup");
                }
            }
        }
        for key in &node.inner.config.prewarm {
            if node.inner.templates.get(&key.0, &key.1).is_some() {
                lock(&node.inner.hot).insert(key.clone());
            }
        }
        node.spawn_loops();
        {
            let weak = Arc::downgrade(&node.inner);
            let wake = node.inner.refill.clone();
            tokio::spawn(async move {
                // Holds only a weak reference while waiting, and never
                // cancels a boot half-way.
                loop {
                    let Some(inner) = weak.upgrade() else { return };
                    let booted = Node { inner }.refill_round().await;
                    if !booted {
                        let _ = tokio::time::timeout(Duration::from_secs(5), wake.notified()).await;
                    }
                }
            });
        }
        Ok(node)
    }

    fn reattach(&self, dir: PathBuf, st: StateFile) {
        let Some(spec) = st.spec.clone() else {
            self.reap_leftover(&dir, Some(&st));
            return;
        };
        let id = spec.sandbox_id.clone();
        let instance = dir_name(&dir).unwrap_or_default();
        let Some(slot) = st.slot_index.and_then(|i| self.inner.slots.take_adopted(i)) else {
            tracing::warn!(sandbox_id = %id, "running sandbox without its network slot; reaping it");
            self.reap_leftover(&dir, Some(&st));
            return;
        };
        let Ok(cgroup) = self.inner.layout.open(&instance) else {
            self.inner.slots.release(slot);
            self.reap_leftover(&dir, Some(&st));
            return;
        };
        let run = Running {
            pid: st.pid.unwrap_or(0),
            pid_start: st.pid_start.unwrap_or(0),
            sandbox_ip: slot.sandbox_ip,
            netns: slot.netns_path.clone(),
            slot: Some(slot),
            cgroup: cgroup.clone(),
        };
        let inst = Arc::new(Instance::new(spec, &st, dir, Some(run)));
        // The freezer and the state file agree again whatever a crash
        // between freezing and saving left (both writes are idempotent).
        if let Err(e) = cgroup.set_frozen(st.paused) {
            tracing::warn!(sandbox_id = %id, error = %e, "cannot set the freezer of a reattached sandbox");
        }
        // Likewise a VM's vCPUs, which a crash may have left stopped by a
        // pause that was never recorded.
        if !st.paused && inst.runtime() == Runtime::Vm {
            let d = inst.dir.clone();
            tokio::spawn(async move {
                if let Err(e) = vmboot::qmp(&d, |q| q.cont()).await {
                    tracing::warn!(error = %e, "cannot continue a reattached VM");
                }
            });
        }
        if let Some(e) = self.inner.egress.get() {
            e.restore(&id, egress::load_admissions(&inst.dir));
        }
        inst.log("info", "reattached after a node restart");
        tracing::info!(sandbox_id = %id, "reattached a running sandbox");
        lock(&self.inner.sandboxes).insert(id, inst);
    }

    /// Takes back a sandbox paused to disk. Whatever a pause or resume that
    /// a crash interrupted left running goes: the sandbox stays paused.
    async fn reattach_on_disk(&self, dir: PathBuf, st: StateFile) {
        let Some(spec) = st.spec.clone() else {
            self.reap_leftover(&dir, Some(&st));
            return;
        };
        let name = dir_name(&dir).unwrap_or_default();
        let cgroup = self.inner.layout.open(&name).ok();
        let slot = st.slot_index.and_then(|i| self.inner.slots.take_adopted(i));
        // A VM saved to a file keeps the slot its memory names.
        let (slot, kept) = if st.checkpoint && spec.runtime == Some(Runtime::Vm) {
            (None, slot)
        } else {
            (slot, None)
        };
        let (inner, image) = (self.inner.clone(), dir.join("disk.img"));
        let _ = tokio::task::spawn_blocking(move || {
            stop_runtime(cgroup.as_ref(), 0, slot, &inner.slots);
            disk::wait_released(&image, DISK_RELEASED_WITHIN);
        })
        .await;
        let inst = Arc::new(Instance::new(spec, &st, dir, None));
        *lock(&inst.kept_slot) = kept;
        inst.save_state();
        inst.log("info", "reattached after a node restart (paused to disk)");
        tracing::info!(sandbox_id = %inst.spec.sandbox_id, "reattached a sandbox paused to disk");
        lock(&self.inner.sandboxes).insert(inst.spec.sandbox_id.clone(), inst);
    }

    /// Removes whatever a sandbox that is not running left behind.
    fn reap_leftover(&self, dir: &Path, st: Option<&StateFile>) {
        let name = dir_name(dir).unwrap_or_default();
        let slot = st
            .and_then(|s| s.slot_index)
            .and_then(|i| self.inner.slots.take_adopted(i));
        let cgroup = self.inner.layout.open(&name).ok();
        teardown(cgroup.as_ref(), 0, slot, &self.inner.slots, dir);
        // A claimed warm sandbox lives in a directory named after its boot
        // name: report it under its sandbox id.
        let id = st
            .and_then(|s| s.spec.as_ref())
            .map(|s| s.sandbox_id.clone())
            .or_else(|| SandboxId::parse(&name).ok());
        if let Some(id) = id {
            let _ = self.inner.events.send(SandboxEvent::Ended {
                sandbox_id: id.clone(),
                reason: EndReason::Reaped,
            });
            let _ = self.inner.ended.send(id);
        }
        tracing::info!(sandbox = %name, "reaped a sandbox that was not running");
    }

    fn spawn_loops(&self) {
        // Deadlines and liveness, four times a second.
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let node = Node { inner };
                for (inst, why) in node.frozen_to_evict() {
                    let n = node.clone();
                    tokio::spawn(async move { n.move_to_disk(inst, why).await });
                }
                let now = Utc::now();
                let all: Vec<Arc<Instance>> =
                    lock(&node.inner.sandboxes).values().cloned().collect();
                for inst in all {
                    // A paused sandbox does not expire (it is kept until
                    // resumed or killed); its processes still must exist.
                    let expired = !inst.is_paused() && *lock(&inst.end_at) <= now;
                    let exited = !expired
                        && inst
                            .init_pid()
                            .is_some_and(|(pid, start)| !state::same_process(pid, start));
                    // Each action is a task of its own, so a slow one (a
                    // pause to disk) holds up no other sandbox's deadline;
                    // one at a time per sandbox.
                    if !(expired || exited)
                        || inst
                            .deadline_busy
                            .swap(true, std::sync::atomic::Ordering::SeqCst)
                    {
                        continue;
                    }
                    let node = node.clone();
                    tokio::spawn(async move {
                        node.deadline_action(&inst, expired).await;
                        inst.deadline_busy
                            .store(false, std::sync::atomic::Ordering::SeqCst);
                    });
                }
            }
        });
        // Metrics every five seconds.
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let all: Vec<Arc<Instance>> = lock(&inner.sandboxes).values().cloned().collect();
                // Only runsc and QEMU leave the node orphans to reap.
                let orphans = (inner.backends.gvisor.is_some() || inner.backends.vm.is_some())
                    .then(|| {
                        (
                            inner.config.net.name_prefix.clone(),
                            inner.config.init_exe.clone(),
                        )
                    });
                drop(inner);
                if let Some((prefix, exe)) = orphans {
                    let _ = tokio::task::spawn_blocking(move || reap_orphans(&prefix, &exe)).await;
                }
                for inst in all {
                    sample(&inst);
                }
            }
        });
    }

    /// What the deadline loop does to a sandbox whose deadline passed
    /// (`expired`: pause or end it) or whose init is gone (end it).
    async fn deadline_action(&self, inst: &Arc<Instance>, expired: bool) {
        let id = inst.spec.sandbox_id.clone();
        if !expired {
            self.end(&id, EndReason::Exited).await;
            return;
        }
        if inst.spec.on_timeout == TimeoutAction::Pause {
            match self
                .pause_sandbox(&id, true, inst.spec.auto_pause_mode)
                .await
            {
                Ok(()) => {
                    inst.log("info", "paused at its deadline");
                    let _ = self
                        .inner
                        .events
                        .send(SandboxEvent::Paused { sandbox_id: id });
                    return;
                }
                // Paused, resumed with a later deadline or killed
                // meanwhile: nothing to do now.
                Err(NodeError::Conflict(_) | NodeError::SandboxNotFound(_)) => return,
                Err(e) => inst.log(
                    "warn",
                    format!("pausing at the deadline failed ({e}); killing"),
                ),
            }
        }
        self.end(&id, EndReason::Expired).await;
    }

    /// Ends a sandbox: kills every process, removes its cgroup, files and
    /// slot, and tells subscribers. Idempotent.
    async fn end(&self, id: &SandboxId, reason: EndReason) -> bool {
        let Some(inst) = lock(&self.inner.sandboxes).remove(id) else {
            return false;
        };
        // Abort proxied connections first: the SDK must see a reset.
        let _ = self.inner.ended.send(id.clone());
        if let Some(e) = self.inner.egress.get() {
            e.forget(id);
        }
        // A pause or resume in flight finishes first, and later ones see
        // the sandbox gone from the map and stop: no freeze lands after
        // the kill.
        drop(inst.transition.lock().await);
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let run = lock(&inst.run).take();
            let kept = lock(&inst.kept_slot).take();
            let (cgroup, pid, slot) = match run {
                Some(r) => (Some(r.cgroup), r.pid, r.slot),
                None => (None, 0, None),
            };
            teardown(cgroup.as_ref(), pid, slot.or(kept), &inner.slots, &inst.dir);
        })
        .await;
        // Again: a query in the moments before the kill may have made the
        // listeners remember it.
        if let Some(e) = self.inner.egress.get() {
            e.forget(id);
        }
        tracing::info!(sandbox_id = %id, ?reason, "sandbox ended");
        let _ = self.inner.events.send(SandboxEvent::Ended {
            sandbox_id: id.clone(),
            reason,
        });
        true
    }

    /// Freezes every process of a running sandbox (cgroup freezer) and
    /// takes it out of routing, aborting proxied connections as a kill
    /// does; memory, files, network slot and id are kept.
    ///
    /// `at_deadline`: the deadline loop's pause, which only happens if the
    /// deadline still has passed once the sandbox is ours (a connect may
    /// just have moved it).
    async fn pause_sandbox(
        &self,
        id: &SandboxId,
        at_deadline: bool,
        mode: PauseMode,
    ) -> Result<(), NodeError> {
        let inst = self.instance(id)?;
        let _t = inst.transition.lock().await;
        if !lock(&self.inner.sandboxes).contains_key(id) {
            return Err(NodeError::SandboxNotFound(id.clone()));
        }
        if inst.is_paused() {
            return Err(NodeError::Conflict(format!(
                "sandbox {id} is already paused"
            )));
        }
        if at_deadline && *lock(&inst.end_at) > Utc::now() {
            return Err(NodeError::Conflict(format!(
                "sandbox {id}'s deadline moved"
            )));
        }
        let cg = inst
            .cgroup()
            .ok_or_else(|| NodeError::Internal(format!("sandbox {id} has no cgroup")))?;
        // Whatever a later move to disk, fork or snapshot copies is then on
        // the disk (not in runsc's or the guest kernel's caches).
        self.flush_guest(&inst).await;
        if inst.runtime() == Runtime::Vm {
            // Its vCPUs stop first: a later save to a file thaws QEMU, and
            // the guest must not run meanwhile.
            vmboot::qmp(&inst.dir, |q| q.stop())
                .await
                .map_err(|e| NodeError::Internal(format!("stopping sandbox {id}'s VM: {e}")))?;
        }
        let frozen = tokio::task::spawn_blocking(move || cg.set_frozen(true))
            .await
            .map_err(|e| NodeError::Internal(e.to_string()))
            .and_then(|r| {
                r.map_err(|e| NodeError::Internal(format!("freezing sandbox {id}: {e}")))
            });
        if let Err(e) = frozen {
            if inst.runtime() == Runtime::Vm {
                let _ = vmboot::qmp(&inst.dir, |q| q.cont()).await;
            }
            return Err(e);
        }
        inst.paused.store(true, std::sync::atomic::Ordering::SeqCst);
        inst.paused_at_deadline
            .store(at_deadline, std::sync::atomic::Ordering::SeqCst);
        let to_disk = mode == PauseMode::Filesystem;
        // Saved before the processes go: a crash from here on leaves the
        // sandbox paused to disk (a restart finishes the stop).
        inst.on_disk
            .store(to_disk, std::sync::atomic::Ordering::SeqCst);
        *lock(&inst.paused_since) = Some(Instant::now());
        if !inst.save_state() && to_disk {
            // Without the record a restart would take the sandbox for
            // dead and remove its disk: it goes on running instead.
            inst.on_disk
                .store(false, std::sync::atomic::Ordering::SeqCst);
            inst.paused
                .store(false, std::sync::atomic::Ordering::SeqCst);
            *lock(&inst.paused_since) = None;
            if let Some(cg) = inst.cgroup() {
                let _ = tokio::task::spawn_blocking(move || cg.set_frozen(false)).await;
            }
            if inst.runtime() == Runtime::Vm {
                let _ = vmboot::qmp(&inst.dir, |q| q.cont()).await;
            }
            return Err(NodeError::Internal(format!(
                "sandbox {id}: cannot record the pause (is the disk of the Arca home full?)"
            )));
        }
        // Connections through the proxy are cut, as the SDKs expect.
        let _ = self.inner.ended.send(id.clone());
        if to_disk {
            self.release_runtime(&inst).await;
            inst.log("info", "paused to disk: files kept, processes ended");
        } else {
            inst.log("info", "paused");
        }
        Ok(())
    }

    /// Sets a guest kernel's clock to the host's through envd's `/init`.
    async fn set_guest_clock(&self, inst: &Instance) {
        let Some((_, ip)) = inst.network() else {
            return;
        };
        let body = serde_json::json!({ "timestamp": Utc::now().to_rfc3339() });
        let token = inst.spec.envd_access_token.clone();
        if let Err(e) = self.inner.envd.init(ip, Some(&token), &body).await {
            inst.log(
                "warn",
                format!("setting the VM's clock after the resume failed: {e}"),
            );
        }
    }

    /// Has a sandbox whose file writes may sit in a kernel of its own
    /// (gVisor's, a VM's) write them to its disk: `sync` through envd. An
    /// `ns` sandbox's writes are the host's, which the node syncs itself.
    pub(crate) async fn flush_guest(&self, inst: &Instance) {
        if inst.runtime() == Runtime::Ns || inst.is_paused() {
            return;
        }
        let Some((_, ip)) = inst.network() else {
            return;
        };
        let argv = ["sync".to_string()];
        let cmd = envd::RunCommand {
            user: "root",
            argv: &argv,
            env: &[],
            cwd: None,
            timeout: Duration::from_secs(30),
        };
        let token = inst.spec.envd_access_token.clone();
        match self.inner.envd.run(ip, Some(&token), &cmd, |_, _| {}).await {
            Ok(0) => {}
            Ok(code) => inst.log("warn", format!("sync before a pause or copy exited {code}")),
            Err(e) => inst.log("warn", format!("sync before a pause or copy failed: {e}")),
        }
    }

    /// Moves a frozen sandbox to disk (files kept, processes ended, memory
    /// and slot released), for `why`; nothing if it was resumed, killed or
    /// moved meanwhile.
    async fn move_to_disk(&self, inst: Arc<Instance>, why: &str) {
        let _t = inst.transition.lock().await;
        let id = &inst.spec.sandbox_id;
        let current = lock(&self.inner.sandboxes)
            .get(id)
            .is_some_and(|i| Arc::ptr_eq(i, &inst));
        if !current || !inst.is_paused() || inst.is_on_disk() {
            return;
        }
        // With CRIU the processes and memory go to disk too (not those of a
        // restored sandbox, which CRIU cannot save again). The state file
        // says so before anything is dumped or killed: a crash from here on
        // leaves it paused to disk, and a restore that finds no usable
        // images falls back to its files.
        let restored = inst.restored.load(std::sync::atomic::Ordering::SeqCst);
        let dump = match (&self.inner.criu, inst.cgroup(), inst.init_pid()) {
            (Some(criu), Some(cg), Some((pid, _)))
                if !restored && inst.runtime() == Runtime::Ns =>
            {
                Some((criu.clone(), cg, pid))
            }
            _ => None,
        };
        // A VM's whole machine goes to a file (QEMU's migration).
        let vm_save = inst.runtime() == Runtime::Vm;
        inst.checkpointed.store(
            dump.is_some() || vm_save,
            std::sync::atomic::Ordering::SeqCst,
        );
        inst.on_disk
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if !inst.save_state() {
            // Nothing was touched: it stays frozen as it was.
            inst.on_disk
                .store(false, std::sync::atomic::Ordering::SeqCst);
            inst.checkpointed
                .store(false, std::sync::atomic::Ordering::SeqCst);
            return;
        }
        let saved = match dump {
            Some((criu, cg, pid)) => {
                let images = inst.dir.join(CHECKPOINT_DIR);
                let t0 = Instant::now();
                let dumped = tokio::task::spawn_blocking(move || {
                    criu.dump(pid, cg.freezer_dir(), &images, false)
                })
                .await;
                match dumped {
                    Ok(Ok(())) => {
                        tracing::debug!(sandbox_id = %id, ms = t0.elapsed().as_secs_f64() * 1e3, "checkpointed");
                        true
                    }
                    Ok(Err(e)) => {
                        inst.log(
                            "warn",
                            format!("checkpoint failed ({e}); keeping its files only"),
                        );
                        false
                    }
                    Err(_) => false,
                }
            }
            None if vm_save => match self.save_vm(&inst).await {
                Ok(()) => true,
                Err(e) => {
                    inst.log(
                        "warn",
                        format!("saving the VM failed ({e}); keeping its files only"),
                    );
                    false
                }
            },
            None => false,
        };
        if !saved {
            inst.checkpointed
                .store(false, std::sync::atomic::Ordering::SeqCst);
            inst.save_state();
        } else if vm_save {
            // The saved guest holds its address: its slot waits for it.
            let slot = lock(&inst.run).as_mut().and_then(|r| r.slot.take());
            *lock(&inst.kept_slot) = slot;
            inst.save_state();
        }
        self.release_runtime(&inst).await;
        if saved {
            inst.log(
                "info",
                format!("moved to disk ({why}): processes and memory saved"),
            );
        } else {
            let _ = std::fs::remove_dir_all(inst.dir.join(CHECKPOINT_DIR));
            inst.log(
                "info",
                format!("moved to disk ({why}): files kept, processes ended"),
            );
        }
        tracing::info!(sandbox_id = %id, why, checkpoint = saved, "a frozen sandbox was moved to disk");
    }

    /// Frozen sandboxes to move to disk now, each with the reason: more
    /// frozen than `--max-frozen` (the longest paused go; ones CRIU can
    /// save before restored ones, which lose their processes), paused
    /// longer than `--pause-to-disk-after` (not restored ones, whose
    /// processes would end), or the host short of memory (the longest
    /// paused one).
    fn frozen_to_evict(&self) -> Vec<(Arc<Instance>, &'static str)> {
        let mut frozen: Vec<(Instant, Arc<Instance>)> = lock(&self.inner.sandboxes)
            .values()
            .filter(|i| i.is_paused() && !i.is_on_disk())
            .filter_map(|i| lock(&i.paused_since).map(|t| (t, i.clone())))
            .collect();
        if frozen.is_empty() {
            return Vec::new();
        }
        let cfg = &self.inner.config;
        // A restored sandbox cannot be checkpointed again (CRIU).
        let keeps_processes_only_frozen = |i: &Instance| {
            self.inner.criu.is_some() && i.restored.load(std::sync::atomic::Ordering::SeqCst)
        };
        frozen.sort_by_key(|(t, i)| (keeps_processes_only_frozen(i), *t));
        let over = match cfg.max_frozen {
            0 => 0,
            max => frozen.len().saturating_sub(max),
        };
        let short = memory_short(cfg.min_free_memory_pct);
        let oldest = frozen.iter().map(|(t, _)| *t).min();
        let mut out = Vec::new();
        for (n, (since, inst)) in frozen.into_iter().enumerate() {
            if n < over {
                out.push((inst, "more frozen sandboxes than --max-frozen"));
            } else if !keeps_processes_only_frozen(&inst)
                && cfg
                    .frozen_to_disk_after
                    .is_some_and(|after| since.elapsed() >= after)
            {
                out.push((inst, "paused longer than --pause-to-disk-after"));
            } else if short && Some(since) == oldest {
                out.push((inst, "the host is short of memory"));
            }
        }
        out
    }

    /// Ends the processes of a sandbox being paused to disk and gives its
    /// cgroup (so its memory) and network slot back; its disk stays, and
    /// is detached from the kernel before this returns.
    async fn release_runtime(&self, inst: &Arc<Instance>) {
        let run = lock(&inst.run).take();
        let (inner, image) = (self.inner.clone(), inst.dir.join("disk.img"));
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(r) = run {
                stop_runtime(Some(&r.cgroup), r.pid, r.slot, &inner.slots);
            }
            if !disk::wait_released(&image, DISK_RELEASED_WITHIN) {
                tracing::warn!(image = %image.display(), "a paused sandbox's disk is still attached");
            }
        })
        .await;
        inst.save_state();
    }

    /// Thaws a paused sandbox and gives it a new deadline.
    async fn resume_sandbox(
        &self,
        id: &SandboxId,
        end_at: DateTime<Utc>,
    ) -> Result<SandboxStatus, NodeError> {
        let inst = self.instance(id)?;
        let _t = inst.transition.lock().await;
        if !lock(&self.inner.sandboxes).contains_key(id) {
            return Err(NodeError::SandboxNotFound(id.clone()));
        }
        if !inst.is_paused() {
            return Err(NodeError::Conflict(format!("sandbox {id} is not paused")));
        }
        // The deadline first: the deadline loop must not see it expired.
        *lock(&inst.end_at) = end_at;
        if inst.is_on_disk() {
            let back = if inst.is_checkpointed() {
                match self.restore_checkpoint(&inst).await {
                    Ok(()) => Ok(()),
                    // Images that cannot be restored (a crash during the
                    // dump, a changed envd binary, ...) would fail every
                    // time: the sandbox comes back with its files instead.
                    Err(e) => {
                        inst.log(
                            "warn",
                            format!(
                                "restoring its checkpoint failed ({e}); booting it on its files"
                            ),
                        );
                        inst.checkpointed
                            .store(false, std::sync::atomic::Ordering::SeqCst);
                        if let Some(slot) = lock(&inst.kept_slot).take() {
                            self.inner.slots.release(slot);
                        }
                        inst.save_state();
                        let _ = std::fs::remove_dir_all(inst.dir.join(CHECKPOINT_DIR));
                        self.boot_again(&inst).await
                    }
                }
            } else {
                self.boot_again(&inst).await
            };
            if let Err(e) = back {
                // Still paused; the state file names no half-made runtime.
                inst.save_state();
                inst.log("error", format!("resume failed: {e}"));
                return Err(e);
            }
        } else {
            let cg = inst
                .cgroup()
                .ok_or_else(|| NodeError::Internal(format!("sandbox {id} has no cgroup")))?;
            tokio::task::spawn_blocking(move || cg.set_frozen(false))
                .await
                .map_err(|e| NodeError::Internal(e.to_string()))?
                .map_err(|e| NodeError::Internal(format!("thawing sandbox {id}: {e}")))?;
            if inst.runtime() == Runtime::Vm {
                vmboot::qmp(&inst.dir, |q| q.cont()).await.map_err(|e| {
                    NodeError::Internal(format!("continuing sandbox {id}'s VM: {e}"))
                })?;
            }
        }
        inst.on_disk
            .store(false, std::sync::atomic::Ordering::SeqCst);
        inst.checkpointed
            .store(false, std::sync::atomic::Ordering::SeqCst);
        inst.paused
            .store(false, std::sync::atomic::Ordering::SeqCst);
        inst.paused_at_deadline
            .store(false, std::sync::atomic::Ordering::SeqCst);
        *lock(&inst.paused_since) = None;
        inst.save_state();
        // Only now that the state says it runs: a crash before this must
        // still find the images.
        let _ = std::fs::remove_dir_all(inst.dir.join(CHECKPOINT_DIR));
        inst.log("info", "resumed");
        if inst.runtime() == Runtime::Vm {
            // A VM's clock stood still while it was stopped: envd sets it.
            self.set_guest_clock(&inst).await;
        }
        Ok(inst.status())
    }

    /// Boots a sandbox paused to disk again on its kept disk: a fresh
    /// init (new boot id), the template's start command, `/init` with the
    /// sandbox's own settings. Its processes are not back (files are).
    async fn boot_again(&self, inst: &Arc<Instance>) -> Result<(), NodeError> {
        let spec = &inst.current_spec();
        let build = self.build_of(inst)?;
        let name = dir_name(&inst.dir)?;
        let image = inst.dir.join("disk.img");
        disk_released(&image, &spec.sandbox_id).await?;
        let mut plan = self.sandbox_plan(build, spec.disk_size_mb)?;
        plan.upper = Upper::Existing {
            mb: spec.disk_size_mb,
            image,
        };
        plan.egress = Some(spec.clone());
        plan.runtime = inst.runtime();
        plan.resume = Some(StateFile::load(&inst.dir).map_err(|e| {
            NodeError::Internal(format!(
                "reading the state of sandbox {}: {e}",
                spec.sandbox_id
            ))
        })?);
        let mut b = self.boot(name, plan).await?;
        let run = self.configure(&mut b, spec).await?;
        *lock(&inst.run) = Some(run);
        // Freshly booted processes: CRIU can save these.
        inst.restored
            .store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn instance(&self, id: &SandboxId) -> Result<Arc<Instance>, NodeError> {
        lock(&self.inner.sandboxes)
            .get(id)
            .cloned()
            .ok_or_else(|| NodeError::SandboxNotFound(id.clone()))
    }

    async fn create_sandbox(&self, mut spec: SandboxSpec) -> Result<SandboxStatus, NodeError> {
        let id = spec.sandbox_id.clone();
        // A backend this node lacks is refused before anything is pulled.
        if let Some(r) = spec.runtime {
            self.inner
                .backends
                .check(r)
                .map_err(NodeError::InvalidInput)?;
        }
        let _booting = Booting::new(&self.inner, &spec.template_id, &spec.build_id);
        let build = match self.inner.templates.get(&spec.template_id, &spec.build_id) {
            Some(b) => Some(b),
            // Cluster mode: built on another node; pulled once, then kept
            // (not by a node that would refuse the sandbox anyway).
            None => {
                self.check_capacity(1)?;
                let token = self
                    .inner
                    .config
                    .cluster_token
                    .as_ref()
                    .map(ClusterToken::as_str);
                transfer::pull_for(&self.inner.templates, &spec, token).await?
            }
        };
        let build = build.map(Arc::new).ok_or_else(|| {
            NodeError::TemplateNotFound(format!("{} (build {})", spec.template_id, spec.build_id))
        })?;
        // The request's backend, else the template's, else `ns`; recorded
        // in the spec (and so in the state file) for resumes and restarts.
        let runtime = spec.runtime.or(build.runtime).unwrap_or_default();
        self.inner.backends.check(runtime).map_err(|e| {
            NodeError::InvalidInput(format!("template {} asks for it: {e}", spec.template_id))
        })?;
        spec.runtime = Some(runtime);
        if lock(&self.inner.sandboxes).contains_key(&id)
            || !lock(&self.inner.creating).insert(id.clone())
        {
            return Err(NodeError::Conflict(format!("sandbox {id} already exists")));
        }
        if let Err(e) = self.check_capacity(0) {
            lock(&self.inner.creating).remove(&id);
            return Err(e);
        }
        let key = (
            spec.template_id.clone(),
            spec.build_id.clone(),
            spec.disk_size_mb,
        );
        // Warm sandboxes are `ns` ones: other backends boot on demand.
        let warm = if runtime == Runtime::Ns {
            lock(&self.inner.warm).get_mut(&key).and_then(Vec::pop)
        } else {
            None
        };
        let result = async {
            let booted = match warm {
                Some(b) => b,
                None => {
                    let mut plan = self.sandbox_plan(build, spec.disk_size_mb)?;
                    plan.egress = Some(spec.clone());
                    plan.runtime = runtime;
                    self.boot(id.to_string(), plan).await?
                }
            };
            self.activate(booted, spec).await
        }
        .await;
        lock(&self.inner.creating).remove(&id);
        if result.is_ok() && runtime == Runtime::Ns {
            // This template is in use: keep sandboxes of it ready.
            lock(&self.inner.hot).insert(key);
            self.inner.refill.notify_one();
        }
        result
    }

    /// [`NodeError::Capacity`] when `more` sandboxes beyond those held and
    /// being created would pass `max_sandboxes`.
    fn check_capacity(&self, more: usize) -> Result<(), NodeError> {
        let max = self.inner.config.max_sandboxes as usize;
        if max == 0 {
            return Ok(());
        }
        // Counted one lock at a time: a create moving from one set to the
        // other may be counted twice, which errs on the full side.
        let held = lock(&self.inner.sandboxes).len();
        let creating = lock(&self.inner.creating).len();
        if held + creating + more > max {
            return Err(NodeError::Capacity(format!(
                "this node holds {max} sandboxes, its limit (--max-sandboxes)"
            )));
        }
        Ok(())
    }

    /// How to boot a sandbox of `build` with a disk of `disk_mb`.
    fn sandbox_plan(&self, build: Arc<TemplateBuild>, disk_mb: u32) -> Result<BootPlan, NodeError> {
        let lowers = self
            .inner
            .templates
            .lower_dirs(&build)
            .map_err(|e| NodeError::Internal(e.to_string()))?;
        Ok(BootPlan {
            runtime: Runtime::Ns,
            egress: None,
            resume: None,
            lowers,
            upper: Upper::Disk(disk_mb),
            limits: None,
            template: Some(build),
        })
    }

    /// Starts a sandbox without an identity: slot, cgroup, disk, envd up.
    async fn boot(&self, instance_id: String, mut plan: BootPlan) -> Result<Booted, NodeError> {
        let inner = &self.inner;
        let disk_size_mb = mb_of(&plan.upper);
        let dir = sandboxes_dir(&inner.config.home).join(&instance_id);
        let internal =
            |what: &str, e: &dyn std::fmt::Display| NodeError::Internal(format!("{what}: {e}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| internal("creating the sandbox directory", &e))?;
        // A resume keeps the paused sandbox's state and records only what
        // it makes: a crash half-way leaves the sandbox paused.
        let resuming = plan.resume.is_some();
        let st = plan.resume.take().unwrap_or_else(StateFile::creating);
        st.save(&dir)
            .map_err(|e| internal("writing the state file", &e))?;
        let mut b = Booted::empty(
            self,
            instance_id.clone(),
            dir.clone(),
            plan.template.clone(),
        );
        b.keep_dir = resuming;
        b.disk_size_mb = disk_size_mb;
        b.runtime = plan.runtime;
        match self.boot_into(&mut b, st, plan).await {
            Ok(()) => Ok(b),
            Err(e) => {
                // What the boot made is gone before the error is told: a
                // retry (a resume, above all) must not meet it half-removed.
                b.shutdown().await;
                Err(e)
            }
        }
    }

    /// The steps of [`Node::boot`] that make something: slot, cgroup, disk,
    /// init, network, envd, the template's start command.
    async fn boot_into(
        &self,
        b: &mut Booted,
        mut st: StateFile,
        plan: BootPlan,
    ) -> Result<(), NodeError> {
        let inner = &self.inner;
        let internal =
            |what: &str, e: &dyn std::fmt::Display| NodeError::Internal(format!("{what}: {e}"));
        let (dir, instance_id) = (b.dir.clone(), b.instance_id.clone());
        let t0 = Instant::now();
        let slot = inner
            .slots
            .acquire()
            .await
            .map_err(|e| NodeError::Capacity(format!("no network slot: {e}")))?;
        let sandbox_ip = slot.sandbox_ip;
        let slot_host_ip = slot.host_ip;
        let index = slot.index;
        st.slot_index = Some(slot.index);
        b.slot = Some(slot);
        st.save(&dir)
            .map_err(|e| internal("writing the state file", &e))?;
        if let Some(spec) = &plan.egress {
            self.load_egress(index, spec).await?;
            b.egress_for = Some(spec.sandbox_id.clone());
        }

        let t_slot = t0.elapsed();
        // A VM's memory is all QEMU's from the start: its own limits now.
        let limits = match (&plan.egress, plan.runtime) {
            (Some(spec), Runtime::Vm) => Some(self.limits_of(spec)),
            _ => plan.limits,
        };
        let cgroup = inner
            .layout
            .create(
                &instance_id,
                limits.unwrap_or(Limits {
                    pids: inner.config.pids_limit,
                    ..WARM_LIMITS
                }),
            )
            .map_err(|e| internal("creating the cgroup", &e))?;
        b.cgroup = Some(cgroup.clone());
        if plan.runtime == Runtime::Vm {
            return self.boot_vm_into(b, st, plan, t0).await;
        }

        // The writable layer lives on the sandbox's own ext4 image so that
        // writes stop at diskSizeMB; it is mounted inside the sandbox only.
        // A build step writes into the layer it is making instead.
        let (disk_dir, root) = (dir.join("disk"), dir.join("root"));
        for d in [&disk_dir, &root] {
            std::fs::create_dir_all(d)
                .map_err(|e| internal("creating the sandbox directories", &e))?;
        }
        let t_cgroup = t0.elapsed();
        let (upper_dir, work_dir, disk) = match plan.upper {
            upper @ (Upper::Disk(_) | Upper::DiskAt { .. } | Upper::Existing { .. }) => {
                let mb = mb_of(&upper);
                let (image, fresh) = match upper {
                    Upper::DiskAt { image, .. } => (image, true),
                    Upper::Existing { image, .. } => (image, false),
                    Upper::Disk(_) | Upper::Dir { .. } => (dir.join("disk.img"), true),
                };
                if fresh {
                    let disks = inner.disks.clone();
                    let img = image.clone();
                    tokio::task::spawn_blocking(move || {
                        disks.template(mb).and_then(|t| disk::sparse_copy(&t, &img))
                    })
                    .await
                    .map_err(|e| internal("disk task", &e))?
                    .map_err(|e| internal("making the sandbox's disk", &e))?;
                }
                (
                    disk_dir.join("upper"),
                    disk_dir.join("work"),
                    Some(arca_runtime::DiskSpec {
                        image,
                        mount_point: disk_dir,
                    }),
                )
            }
            Upper::Dir { upper, work } => (upper, work, None),
        };
        // Name resolution inside: the node's DNS forwarder, reached at the
        // gateway (the firewall redirects it), which applies the sandbox's
        // domain rules.
        let mut files = etc_files(&instance_id);
        files.push(("/etc/resolv.conf".to_string(), resolv_conf(slot_host_ip)));
        let cfg = InitConfig {
            sandbox_id: instance_id.clone(),
            hostname: instance_id.clone(),
            lower_dirs: plan.lowers,
            upper_dir,
            work_dir,
            root_dir: root,
            envd_binary: inner.config.envd_binary.clone(),
            envd_args: vec![],
            env: vec![(
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            )],
            own_netns: true,
            cgroup_dirs: cgroup.dirs().to_vec(),
            id_map: DEFAULT_ID_MAP,
            boot_id: arca_runtime::new_boot_id(),
            no_new_privs: false,
            disk,
            files,
        };
        let exe = inner.config.init_exe.clone();
        let t_disk = t0.elapsed();
        let pid = match plan.runtime {
            Runtime::Ns => tokio::task::spawn_blocking(move || arca_runtime::launch(&exe, &cfg))
                .await
                .map_err(|e| internal("init task", &e))?
                .map_err(|e| internal("starting the sandbox", &e))?,
            Runtime::Gvisor => {
                let slot = b
                    .slot
                    .as_ref()
                    .ok_or_else(|| NodeError::Internal("a gvisor boot without a slot".into()))?;
                // runsc joins the slot's own namespace, where its `eth0`
                // already has the sandbox's address and route.
                let g = inner.backends.gvisor.clone().ok_or_else(|| {
                    NodeError::InvalidInput("runtime 'gvisor' is not available on this node".into())
                })?;
                let gcfg = arca_runtime::GvisorConfig {
                    init: InitConfig {
                        own_netns: false,
                        files: Vec::new(),
                        ..cfg
                    },
                    netns: slot.netns_path.clone(),
                    runsc: g.runsc,
                    platform: g.platform,
                    state_dir: dir.join("runsc"),
                    bundle_dir: dir.join("bundle"),
                    container_id: instance_id.clone(),
                    debug_log: std::env::var_os("ARCA_RUNSC_DEBUG_LOG").map(PathBuf::from),
                };
                tokio::task::spawn_blocking(move || arca_runtime::gvisor::launch(&exe, &gcfg))
                    .await
                    .map_err(|e| internal("runsc task", &e))?
                    .map_err(|e| internal("starting the sandbox under gVisor", &e))?
            }
            Runtime::Vm => {
                return Err(NodeError::InvalidInput(
                    "runtime 'vm' is not available on this node".into(),
                ));
            }
        };
        let t_launch = t0.elapsed();
        b.pid = pid;
        b.pid_start = state::process_start(pid)
            .ok_or_else(|| NodeError::Internal("sandbox init exited at once".into()))?;
        st.pid = Some(pid);
        st.pid_start = Some(b.pid_start);
        st.save(&dir)
            .map_err(|e| internal("writing the state file", &e))?;
        // The sandbox made its network namespace (its user namespace owns
        // it): the slot's interface moves in.
        if let (Runtime::Ns, Some(slot)) = (plan.runtime, &b.slot) {
            inner
                .slots
                .attach(slot, pid)
                .await
                .map_err(|e| internal("connecting the sandbox to its network slot", &e))?;
        }
        let t_net = t0.elapsed();
        inner
            .envd
            .wait_ready(sandbox_ip, ENVD_READY_WITHIN)
            .await
            .map_err(|e| internal("waiting for envd", &e))?;
        if let Some(build) = &plan.template {
            self.start_template_process(sandbox_ip, build, None)
                .await
                .map_err(NodeError::Internal)?;
        }
        tracing::debug!(
            instance = %instance_id,
            slot_ms = t_slot.as_secs_f64() * 1e3,
            cgroup_ms = t_cgroup.as_secs_f64() * 1e3,
            disk_ms = t_disk.as_secs_f64() * 1e3,
            launch_ms = t_launch.as_secs_f64() * 1e3,
            net_ms = t_net.as_secs_f64() * 1e3,
            total_ms = t0.elapsed().as_secs_f64() * 1e3,
            "booted (cumulative times)"
        );
        Ok(())
    }

    /// Gives a booted sandbox its identity: limits, `/init`, state file,
    /// registry. This is all a warm create costs.
    async fn activate(&self, mut b: Booted, spec: SandboxSpec) -> Result<SandboxStatus, NodeError> {
        let dir = b.dir.clone();
        let restored = b.envd_token.is_some();
        let run = self.configure(&mut b, &spec).await?;
        let st = StateFile {
            phase: Phase::Running,
            end_at: spec.end_at,
            restored,
            ..StateFile::creating()
        };
        let inst = Arc::new(Instance::new(spec, &st, dir, Some(run)));
        inst.save_state();
        inst.log("info", "sandbox started");
        let status = inst.status();
        sample(&inst);
        lock(&self.inner.sandboxes).insert(inst.spec.sandbox_id.clone(), inst);
        Ok(status)
    }

    /// Gives a booted sandbox the identity and settings of `spec` (limits,
    /// host name, `/init`) and hands over what runs of it.
    async fn configure(&self, b: &mut Booted, spec: &SandboxSpec) -> Result<Running, NodeError> {
        let inner = &self.inner;
        let internal =
            |what: &str, e: &dyn std::fmt::Display| NodeError::Internal(format!("{what}: {e}"));
        let cgroup = b
            .cgroup
            .clone()
            .ok_or_else(|| NodeError::Internal("booted without a cgroup".into()))?;
        cgroup
            .set_limits(self.limits_of(spec))
            .map_err(|e| internal("setting the sandbox's limits", &e))?;
        let (sandbox_ip, netns, index) = match &b.slot {
            Some(s) => (s.sandbox_ip, s.netns_path.clone(), s.index),
            None => return Err(NodeError::Internal("booted without a slot".into())),
        };
        // Its egress rules before anything of the sandbox's own runs
        // (a boot for this sandbox has loaded them already).
        if b.egress_for.as_ref() != Some(&spec.sandbox_id) {
            self.load_egress(index, spec).await?;
        }
        let renamed = b.instance_id != spec.sandbox_id.as_str() || b.envd_token.is_some();
        if renamed {
            // A warm sandbox booted under another name: it takes the id now.
            let (pid, start, name) = (b.pid, b.pid_start, spec.sandbox_id.to_string());
            tokio::task::spawn_blocking(move || set_host_name(pid, start, &name))
                .await
                .map_err(|e| internal("host name task", &e))?
                .map_err(|e| internal("setting the sandbox's host name", &e))?;
        }
        // The template's ENV, then the create request's, then E2B's own.
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        let (user, workdir) = match &b.template {
            Some(t) => {
                env.extend(t.env.iter().cloned());
                let user = t.default_user().to_string();
                let workdir = t
                    .workdir
                    .clone()
                    .or_else(|| (user == "user").then(|| "/home/user".to_string()));
                (user, workdir)
            }
            None => ("user".to_string(), Some("/home/user".to_string())),
        };
        env.extend(spec.env_vars.clone());
        env.insert("E2B_SANDBOX_ID".into(), spec.sandbox_id.to_string());
        env.insert("E2B_TEMPLATE_ID".into(), spec.template_id.clone());
        let mut init = serde_json::json!({
            "envVars": env,
            "accessToken": spec.envd_access_token,
            "defaultUser": user,
            "timestamp": Utc::now().to_rfc3339(),
        });
        if let Some(w) = workdir {
            init["defaultWorkdir"] = serde_json::Value::String(w);
        }
        inner
            .envd
            .init(sandbox_ip, b.envd_token.as_deref(), &init)
            .await
            .map_err(|e| internal("configuring envd", &e))?;
        if renamed || b.runtime != Runtime::Ns {
            // Other backends' roots are not written from the host (a
            // symlink in the template could lead there): envd writes them.
            let mut files = etc_files(spec.sandbox_id.as_str());
            if b.runtime != Runtime::Ns {
                if let Some(s) = &b.slot {
                    files.push(("/etc/resolv.conf".into(), resolv_conf(s.host_ip)));
                }
            }
            for (path, content) in files {
                inner
                    .envd
                    .write_file(sandbox_ip, &spec.envd_access_token, &path, content)
                    .await
                    .map_err(|e| internal("naming the sandbox", &e))?;
            }
        }
        let run = Running {
            pid: b.pid,
            pid_start: b.pid_start,
            slot: b.slot.take(),
            sandbox_ip,
            netns,
            cgroup,
        };
        b.disarm();
        Ok(run)
    }

    /// One round of keeping `warm_pool` booted sandboxes ready for each
    /// template in use; returns whether it booted any.
    async fn refill_round(&self) -> bool {
        let keys: Vec<WarmKey> = lock(&self.inner.hot).iter().cloned().collect();
        let mut booted_any = false;
        for key in keys {
            let have = lock(&self.inner.warm).get(&key).map_or(0, Vec::len);
            if have
                >= self
                    .inner
                    .warm_target
                    .load(std::sync::atomic::Ordering::Relaxed)
            {
                continue;
            }
            let _booting = Booting::new(&self.inner, &key.0, &key.1);
            let Some(build) = self.inner.templates.get(&key.0, &key.1) else {
                // The build was deleted: stop keeping it warm.
                lock(&self.inner.hot).remove(&key);
                continue;
            };
            let id = format!("w{}", random_suffix());
            let plan = match self.sandbox_plan(Arc::new(build), key.2) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(template = %key.0, error = %e, "cannot prepare a warm sandbox");
                    continue;
                }
            };
            match self.boot(id, plan).await {
                Ok(b) => {
                    // The target may have dropped while this one booted.
                    let target = self
                        .inner
                        .warm_target
                        .load(std::sync::atomic::Ordering::Relaxed);
                    let mut warm = lock(&self.inner.warm);
                    // The build may have been deleted while this booted.
                    let still_hot = lock(&self.inner.hot).contains(&key);
                    let list = warm.entry(key).or_default();
                    if still_hot && list.len() < target {
                        list.push(b);
                        booted_any = true;
                    } else {
                        drop(warm);
                        drop(b);
                    }
                }
                Err(e) => {
                    tracing::warn!(template = %key.0, error = %e, "cannot prepare a warm sandbox");
                }
            }
        }
        booted_any
    }
}

/// Sets the host name inside a running sandbox's uts namespace, from a
/// thread of its own (which `setns` changes). Touches no file: the files
/// are written by envd, inside the sandbox.
fn set_host_name(pid: i32, pid_start: u64, name: &str) -> std::io::Result<()> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/uts"))?;
    // The pid must still be the sandbox's init once the namespace is open.
    if !state::same_process(pid, pid_start) {
        return Err(std::io::Error::other("the sandbox's init is gone"));
    }
    let n = name.to_string();
    std::thread::spawn(move || -> std::io::Result<()> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWUTS)?;
        nix::unistd::sethostname(&n)?;
        Ok(())
    })
    .join()
    .map_err(|_| std::io::Error::other("the host name thread panicked"))?
}

/// `/etc/resolv.conf` of a sandbox: the node's DNS forwarder, reached at
/// the gateway (the firewall redirects it), which applies the sandbox's
/// domain rules.
fn resolv_conf(gateway: std::net::Ipv4Addr) -> String {
    format!("nameserver {gateway}\n")
}

/// `/etc` files that name the sandbox.
fn etc_files(host: &str) -> Vec<(String, String)> {
    vec![
        ("/etc/hostname".to_string(), format!("{host}\n")),
        (
            "/etc/hosts".to_string(),
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{host}\n"
            ),
        ),
    ]
}

/// Marks a (template, build) as having a sandbox in the making while it
/// lives.
struct Booting {
    inner: Arc<Inner>,
    key: (String, String),
}

impl Booting {
    fn new(inner: &Arc<Inner>, template_id: &str, build_id: &str) -> Booting {
        let key = (template_id.to_string(), build_id.to_string());
        lock(&inner.booting).push(key.clone());
        Booting {
            inner: inner.clone(),
            key,
        }
    }
}

impl Drop for Booting {
    fn drop(&mut self) {
        let mut b = lock(&self.inner.booting);
        if let Some(i) = b.iter().position(|k| *k == self.key) {
            b.swap_remove(i);
        }
    }
}

/// What [`Node::boot`] makes.
struct BootPlan {
    /// The state file of a sandbox paused to disk that this boot resumes:
    /// kept as it is but for the pid and slot, and the sandbox directory
    /// survives a failed boot.
    resume: Option<StateFile>,
    /// Overlay lower dirs, upper-most first.
    lowers: Vec<PathBuf>,
    /// Where writes go.
    upper: Upper,
    /// cgroup limits while booted (default: [`WARM_LIMITS`]).
    limits: Option<Limits>,
    /// The template build whose start and ready commands run at boot.
    template: Option<Arc<TemplateBuild>>,
    /// The egress rules of the sandbox this boot is for, when it is known
    /// (not for warm sandboxes and builds): loaded as soon as the slot is
    /// taken, before anything on the sandbox's disk runs.
    egress: Option<SandboxSpec>,
    /// The isolation backend (builds and warm sandboxes: `ns`).
    runtime: Runtime,
}

/// The writable layer of a sandbox.
enum Upper {
    /// A fresh ext4 disk of this many MiB.
    Disk(u32),
    /// The same, with its image at a path that outlives the sandbox (a
    /// build step's: the node copies the writes out afterwards).
    DiskAt { mb: u32, image: PathBuf },
    /// Host directories (a build step's layer).
    Dir { upper: PathBuf, work: PathBuf },
    /// A disk image that already holds the writable layer (a sandbox paused
    /// to disk, a fork's copy), used as it is.
    Existing { mb: u32, image: PathBuf },
}

fn mb_of(upper: &Upper) -> u32 {
    match upper {
        Upper::Disk(mb) | Upper::DiskAt { mb, .. } | Upper::Existing { mb, .. } => *mb,
        Upper::Dir { .. } => 0,
    }
}

/// Limits of a warm sandbox until it is claimed.
const WARM_LIMITS: Limits = Limits {
    cpus: 1,
    memory_mib: 512,
    pids: DEFAULT_PIDS_LIMIT,
};

fn random_suffix() -> String {
    use rand::Rng as _;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..19)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// A sandbox that was booted but not (yet) handed out; everything it holds
/// is torn down when it is dropped, unless it was disarmed by activation.
struct Booted {
    /// A failed boot leaves the sandbox directory (a resume's).
    keep_dir: bool,
    /// The token envd already requires: a tree restored from another
    /// sandbox's checkpoint (a fork) carries that sandbox's envd, name and
    /// token, which `configure` replaces.
    envd_token: Option<String>,
    /// The template build it runs, for sandboxes.
    template: Option<Arc<TemplateBuild>>,
    /// Whose egress rules its slot has (loaded at boot).
    egress_for: Option<SandboxId>,
    node: Node,
    instance_id: String,
    dir: PathBuf,
    slot: Option<Slot>,
    cgroup: Option<Cgroup>,
    pid: i32,
    pid_start: u64,
    disk_size_mb: u32,
    /// Its isolation backend.
    runtime: Runtime,
}

impl Booted {
    /// Nothing made yet for `instance_id` in `dir`.
    fn empty(
        node: &Node,
        instance_id: String,
        dir: PathBuf,
        template: Option<Arc<TemplateBuild>>,
    ) -> Booted {
        Booted {
            keep_dir: false,
            envd_token: None,
            template,
            egress_for: None,
            node: node.clone(),
            instance_id,
            dir,
            slot: None,
            cgroup: None,
            pid: 0,
            pid_start: 0,
            disk_size_mb: 0,
            runtime: Runtime::Ns,
        }
    }

    /// The sandbox's address.
    fn sandbox_ip(&self) -> Option<std::net::Ipv4Addr> {
        self.slot.as_ref().map(|s| s.sandbox_ip)
    }

    /// Tears it down and waits until it is gone.
    async fn shutdown(mut self) {
        if let Some(teardown) = self.take_teardown() {
            let _ = tokio::task::spawn_blocking(teardown).await;
        }
    }

    fn disarm(&mut self) {
        self.dir = PathBuf::new();
        self.cgroup = None;
    }

    /// Gives what a restore brought back (processes, cgroup, slot) to the
    /// paused sandbox `inst`; torn down instead if a part is missing.
    async fn hand_over(mut self, inst: &Instance) -> Result<(), NodeError> {
        let (Some(slot), Some(cgroup)) = (self.slot.take(), self.cgroup.clone()) else {
            self.shutdown().await;
            return Err(NodeError::Internal(
                "restored without a slot or cgroup".into(),
            ));
        };
        let run = Running {
            pid: self.pid,
            pid_start: self.pid_start,
            sandbox_ip: slot.sandbox_ip,
            netns: slot.netns_path.clone(),
            slot: Some(slot),
            cgroup,
        };
        self.disarm();
        *lock(&inst.run) = Some(run);
        Ok(())
    }
}

impl Booted {
    /// Takes what must be torn down, leaving the value disarmed.
    fn take_teardown(&mut self) -> Option<impl FnOnce() + Send + 'static> {
        if self.dir.as_os_str().is_empty() {
            return None;
        }
        let (cgroup, slot, dir, pid) = (
            self.cgroup.take(),
            self.slot.take(),
            std::mem::take(&mut self.dir),
            self.pid,
        );
        let (node, instance, disk_mb, keep_dir) = (
            self.node.clone(),
            self.instance_id.clone(),
            self.disk_size_mb,
            self.keep_dir,
        );
        Some(move || {
            if keep_dir {
                stop_runtime(cgroup.as_ref(), pid, slot, &node.inner.slots);
                disk::wait_released(&dir.join("disk.img"), DISK_RELEASED_WITHIN);
            } else {
                teardown(cgroup.as_ref(), pid, slot, &node.inner.slots, &dir);
            }
            tracing::debug!(instance = %instance, disk_mb, "unused sandbox removed");
        })
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        let Some(teardown) = self.take_teardown() else {
            return;
        };
        // Killing and removing can take seconds: never on an async thread.
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(teardown);
            }
            Err(_) => teardown(),
        }
    }
}

/// Removes everything a sandbox holds on the host: kills its processes,
/// reaps its init, removes its cgroup and files, gives its slot back.
/// Blocking (seconds at worst): call it from a blocking thread.
fn teardown(cgroup: Option<&Cgroup>, pid: i32, slot: Option<Slot>, slots: &SlotPool, dir: &Path) {
    stop_runtime(cgroup, pid, None, slots);
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(error = %e, dir = %dir.display(), "removing a sandbox's files");
        }
    }
    if let Some(slot) = slot {
        slots.release(slot);
    }
}

/// Kills a sandbox's processes, reaps its init, removes its cgroup and
/// gives its slot back; its files stay. Blocking.
fn stop_runtime(cgroup: Option<&Cgroup>, pid: i32, slot: Option<Slot>, slots: &SlotPool) {
    if let Some(cg) = cgroup {
        let members = cg.procs();
        if let Err(e) = cg.kill_all() {
            tracing::warn!(error = %e, "killing a sandbox's processes");
        }
        // The node is the sandbox init's parent (child subreaper): reap it
        // now, or its zombie keeps the cgroup busy. After a restart the init
        // belongs to the host's init and this returns at once. runsc's
        // gofer and QEMU's helpers are orphans of the node as well.
        if pid > 0 {
            reap(pid);
        }
        for p in members.into_iter().filter(|p| *p != pid && *p > 0) {
            reap(p);
        }
        if let Err(e) = cg.remove() {
            tracing::warn!(error = ?e, "removing a sandbox's cgroup");
        }
    }
    if let Some(slot) = slot {
        slots.release(slot);
    }
}

/// Reaps the zombies sandboxes left to the node (a child subreaper): a
/// sandbox process whose parent ended first (runsc's gofer and stubs when
/// its sandbox process dies, QEMU's helpers) becomes the node's child.
/// Only zombies that died in a sandbox cgroup under `cgroup_parent`, and
/// not the node's own `arca` helpers (whose waits are their launchers').
fn reap_orphans(cgroup_parent: &str, init_exe: &Path) {
    let me = std::process::id().to_string();
    let marker = format!("/{cgroup_parent}/");
    let own_comm = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
    // The helpers are `init_exe` re-executed; the kernel keeps 15 bytes of
    // a command's name.
    let helper_comm: String = init_exe
        .file_name()
        .map(|n| n.to_string_lossy().chars().take(15).collect::<String>() + "\n")
        .unwrap_or_default();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) S ppid ...": the comm may hold anything, so after
        // its last ')'.
        let mut rest = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_ascii_whitespace();
        if rest.next() != Some("Z") || rest.next() != Some(me.as_str()) {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if comm != own_comm && comm != helper_comm && cgroup.contains(&marker) {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
}

/// Reaps a sandbox init that was just killed, if the node is its parent;
/// gives up after a few seconds rather than hang on a process stuck in the
/// kernel.
fn reap(pid: i32) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let pid = nix::unistd::Pid::from_raw(pid);
    for _ in 0..500 {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(10)),
            _ => return,
        }
    }
}

/// Runs a state change of a sandbox as a task of its own and waits for it:
/// a caller that stops waiting (a client gone, a timeout) cannot cut it off
/// half-way.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, NodeError>> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::spawn(work)
        .await
        .map_err(|e| NodeError::Internal(format!("a sandbox task failed: {e}")))?
}

use arca_proto::error_chain;

/// The name of a sandbox's directory, which its cgroup shares.
fn dir_name(dir: &Path) -> Result<String, NodeError> {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| NodeError::Internal(format!("{} has no name", dir.display())))
}

/// Waits until no loop device holds `image` any more (a sandbox's last run
/// lets go of its disk as its mount namespace ends): never a second mount
/// of one ext4 image.
async fn disk_released(image: &Path, sandbox: &impl std::fmt::Display) -> Result<(), NodeError> {
    let img = image.to_path_buf();
    let released =
        tokio::task::spawn_blocking(move || disk::wait_released(&img, DISK_RELEASED_WITHIN))
            .await
            .map_err(|e| NodeError::Internal(e.to_string()))?;
    if released {
        Ok(())
    } else {
        Err(NodeError::Internal(format!(
            "sandbox {sandbox}: its disk is still held by its last run; try again"
        )))
    }
}

/// Whether the host has less than a tenth of its memory available.
fn memory_short(min_free_pct: u8) -> bool {
    std::fs::read_to_string("/proc/meminfo").is_ok_and(|info| short_of_memory(&info, min_free_pct))
}

/// The field `name` (`"MemAvailable:"`, ...) of this host's
/// `/proc/meminfo`, in KiB.
pub fn meminfo_kib(name: &str) -> Option<u64> {
    meminfo_field(&std::fs::read_to_string("/proc/meminfo").ok()?, name)
}

/// The field `name` of `/proc/meminfo` text, in KiB.
fn meminfo_field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Whether `/proc/meminfo` text shows less than `min_free_pct` percent of
/// the memory available.
fn short_of_memory(info: &str, min_free_pct: u8) -> bool {
    let field = |name: &str| meminfo_field(info, name);
    match (field("MemTotal:"), field("MemAvailable:")) {
        (Some(total), Some(avail)) => {
            u128::from(avail) * 100 < u128::from(total) * u128::from(min_free_pct)
        }
        _ => false,
    }
}

/// Takes one metrics sample of a sandbox from its cgroup.
fn sample(inst: &Instance) {
    // Nothing runs of a sandbox paused to disk.
    let (Some(cgroup), Some((pid, _))) = (inst.cgroup(), inst.init_pid()) else {
        return;
    };
    let used_us = cgroup.cpu_usage_us();
    let now = Instant::now();
    let cpus = f64::from(inst.spec.cpu_count.max(1));
    let pct = {
        let mut last = lock(&inst.last_cpu);
        let pct = last.map_or(0.0, |(t, u)| {
            let wall = now.duration_since(t).as_micros() as f64;
            if wall > 0.0 {
                (used_us.saturating_sub(u) as f64) * 100.0 / (wall * cpus)
            } else {
                0.0
            }
        });
        *last = Some((now, used_us));
        pct
    };
    let disk_total = u64::from(inst.spec.disk_size_mb) << 20;
    let s = MetricSample {
        timestamp: Utc::now(),
        cpu_count: inst.spec.cpu_count,
        cpu_used_pct: (pct.min(100.0) * 100.0).round() / 100.0,
        mem_used: cgroup.memory_used(),
        mem_total: u64::from(inst.spec.memory_mb) << 20,
        mem_cache: cgroup.memory_cache(),
        // The merged root of the sandbox reports its upper file system: the
        // sandbox's own disk.
        disk_used: disk::usage(Path::new(&format!("/proc/{pid}/root"))).map_or(0, |(_, used)| used),
        disk_total,
    };
    let mut m = lock(&inst.metrics);
    if m.len() >= METRICS_KEPT {
        m.pop_front();
    }
    m.push_back(s);
}

impl NodeService for Node {
    // Creates and kills run as tasks of their own, as pauses and forks do:
    // a caller that goes away (an RPC connection closed by an api restart,
    // a timeout) cannot leave one half done.
    fn create(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<SandboxStatus, NodeError>> {
        let node = self.clone();
        Box::pin(detached(async move { node.create_sandbox(spec).await }))
    }

    fn kill<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<(), NodeError>> {
        let (node, id) = (self.clone(), id.clone());
        Box::pin(detached(async move {
            if node.end(&id, EndReason::Killed).await {
                Ok(())
            } else {
                Err(NodeError::SandboxNotFound(id))
            }
        }))
    }

    fn set_end_at<'a>(
        &'a self,
        id: &'a SandboxId,
        end_at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<SandboxStatus, NodeError>> {
        Box::pin(async move {
            let inst = self.instance(id)?;
            *lock(&inst.end_at) = end_at;
            inst.save_state();
            Ok(inst.status())
        })
    }

    fn get<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<SandboxStatus, NodeError>> {
        Box::pin(async move { Ok(self.instance(id)?.status()) })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<SandboxStatus>, NodeError>> {
        Box::pin(async move {
            let mut all: Vec<SandboxStatus> = lock(&self.inner.sandboxes)
                .values()
                .map(|i| i.status())
                .collect();
            all.sort_by_key(|s| s.started_at);
            Ok(all)
        })
    }

    fn metrics<'a>(
        &'a self,
        id: &'a SandboxId,
    ) -> BoxFuture<'a, Result<Vec<MetricSample>, NodeError>> {
        Box::pin(async move { Ok(lock(&self.instance(id)?.metrics).iter().cloned().collect()) })
    }

    fn logs<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<Vec<LogEntry>, NodeError>> {
        Box::pin(async move { Ok(lock(&self.instance(id)?.logs).iter().cloned().collect()) })
    }

    fn update_network<'a>(
        &'a self,
        id: &'a SandboxId,
        network: arca_proto::network::NetworkSpec,
        allow_internet_access: bool,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        let (node, id) = (self.clone(), id.clone());
        Box::pin(detached(async move {
            node.update_network_of(&id, network, allow_internet_access)
                .await
        }))
    }

    fn runtimes(&self) -> Vec<RuntimeSupport> {
        self.inner.backends.support.clone()
    }

    fn network_logs<'a>(
        &'a self,
        id: &'a SandboxId,
    ) -> BoxFuture<'a, Result<Vec<arca_proto::network::EgressLogEntry>, NodeError>> {
        Box::pin(async move {
            let inst = self.instance(id)?;
            Ok(inst.egress_log.entries(None, usize::MAX))
        })
    }

    fn events(&self) -> broadcast::Receiver<SandboxEvent> {
        self.inner.events.subscribe()
    }

    fn pause<'a>(
        &'a self,
        id: &'a SandboxId,
        mode: PauseMode,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        let (node, id) = (self.clone(), id.clone());
        Box::pin(detached(async move {
            node.pause_sandbox(&id, false, mode).await
        }))
    }

    fn resume<'a>(
        &'a self,
        id: &'a SandboxId,
        end_at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<SandboxStatus, NodeError>> {
        let (node, id) = (self.clone(), id.clone());
        Box::pin(detached(
            async move { node.resume_sandbox(&id, end_at).await },
        ))
    }

    fn fork<'a>(
        &'a self,
        source: &'a SandboxId,
        specs: Vec<SandboxSpec>,
    ) -> BoxFuture<'a, Result<Vec<Result<SandboxStatus, NodeError>>, NodeError>> {
        let (node, source) = (self.clone(), source.clone());
        if let Err(e) = self.check_capacity(specs.len()) {
            return Box::pin(async move { Err(e) });
        }
        Box::pin(detached(
            async move { node.fork_sandbox(&source, specs).await },
        ))
    }

    fn snapshot<'a>(
        &'a self,
        source: &'a SandboxId,
        template_id: &'a str,
        build_id: &'a str,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        let (node, source) = (self.clone(), source.clone());
        let (t, b) = (template_id.to_string(), build_id.to_string());
        Box::pin(detached(async move {
            node.snapshot_sandbox(&source, &t, &b).await
        }))
    }
}

impl RouteSource for Node {
    fn route(&self, sandbox_id: &str) -> Option<Route> {
        let id = SandboxId::parse(sandbox_id).ok()?;
        let inst = lock(&self.inner.sandboxes).get(&id).cloned()?;
        // A paused sandbox answers nothing: the edge says it is not there.
        if inst.is_paused() {
            return None;
        }
        let (netns, ip) = inst.network()?;
        Some(Route {
            sandbox_id: id,
            netns,
            envd_access_token: Some(inst.spec.envd_access_token.clone()),
            ingress: inst.spec.ingress.clone(),
            relay: None,
            address: (inst.runtime() == Runtime::Vm).then_some(ip),
        })
    }

    fn routes(&self) -> Vec<Route> {
        lock(&self.inner.sandboxes)
            .values()
            .filter(|inst| !inst.is_paused())
            .filter_map(|inst| {
                let (netns, ip) = inst.network()?;
                Some(Route {
                    sandbox_id: inst.spec.sandbox_id.clone(),
                    netns,
                    envd_access_token: Some(inst.spec.envd_access_token.clone()),
                    ingress: inst.spec.ingress.clone(),
                    relay: None,
                    address: (inst.runtime() == Runtime::Vm).then_some(ip),
                })
            })
            .collect()
    }

    fn wake<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let Ok(id) = SandboxId::parse(sandbox_id) else {
                return false;
            };
            let Ok(inst) = self.instance(&id) else {
                return false;
            };
            if !inst.spec.auto_resume {
                return false;
            }
            if !inst
                .paused_at_deadline
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                // Not paused by its deadline, or resumed a moment ago.
                return !inst.is_paused();
            }
            // It gets the lifetime it was created with again.
            let life = match i64::try_from(inst.spec.timeout_secs) {
                Ok(secs) if secs > 0 => chrono::TimeDelta::seconds(secs),
                _ => (inst.spec.end_at - inst.started_at).max(chrono::TimeDelta::seconds(1)),
            };
            let (node, rid) = (self.clone(), id.clone());
            let resumed =
                detached(async move { node.resume_sandbox(&rid, Utc::now() + life).await }).await;
            match resumed {
                Ok(status) => {
                    inst.log("info", "resumed by inbound traffic");
                    let _ = self.inner.events.send(SandboxEvent::Resumed {
                        sandbox_id: id,
                        end_at: status.end_at,
                    });
                    true
                }
                // Resumed meanwhile by someone else: it runs.
                Err(NodeError::Conflict(_)) => !inst.is_paused(),
                Err(e) => {
                    tracing::warn!(sandbox_id = %id, error = %e, "auto-resume failed");
                    false
                }
            }
        })
    }

    fn ingress(&self, sandbox_id: &str) -> Option<arca_proto::network::IngressSpec> {
        let id = SandboxId::parse(sandbox_id).ok()?;
        let inst = lock(&self.inner.sandboxes).get(&id).cloned()?;
        Some(inst.spec.ingress.clone())
    }

    fn ended(&self) -> broadcast::Receiver<SandboxId> {
        self.inner.ended.subscribe()
    }
}

impl Node {
    /// Changes how many warm sandboxes are kept per hot template; lowering
    /// it drops the surplus.
    pub fn set_warm_pool(&self, n: usize) {
        self.inner
            .warm_target
            .store(n, std::sync::atomic::Ordering::Relaxed);
        let surplus: Vec<Booted> = lock(&self.inner.warm)
            .values_mut()
            .flat_map(|v| {
                let keep = v.len().min(n);
                v.split_off(keep)
            })
            .collect();
        drop(surplus);
        self.inner.refill.notify_one();
    }

    /// Stops keeping warm sandboxes and removes the ready ones, returning
    /// once they are gone (on shutdown: they belong to nobody).
    pub async fn drain_warm(&self) {
        self.inner
            .warm_target
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let all: Vec<Booted> = lock(&self.inner.warm)
            .drain()
            .flat_map(|(_, v)| v)
            .collect();
        for mut b in all {
            if let Some(teardown) = b.take_teardown() {
                let _ = tokio::task::spawn_blocking(teardown).await;
            }
        }
    }

    /// A normal stop: removes warm sandboxes and unused network slots;
    /// running sandboxes, their slots and the host rules stay for the next
    /// start to reattach (all of it goes when nothing runs).
    pub async fn stop(&self) {
        let all: Vec<Arc<Instance>> = lock(&self.inner.sandboxes).values().cloned().collect();
        for inst in all {
            inst.egress_log.flush();
        }
        self.drain_warm().await;
        if let Some(e) = self.inner.egress.get() {
            e.shutdown().await;
        }
        if let Err(e) = self.inner.slots.close().await {
            tracing::warn!(error = %e, "removing unused network slots");
        }
    }

    /// Warm sandboxes ready for a template's build with a disk of `disk_mb`.
    pub fn warm_count(&self, template_id: &str, build_id: &str, disk_mb: u32) -> usize {
        lock(&self.inner.warm)
            .get(&(template_id.to_string(), build_id.to_string(), disk_mb))
            .map_or(0, Vec::len)
    }

    /// Address of a sandbox's envd, for tools and tests on this host.
    pub fn envd_addr(&self, id: &SandboxId) -> Option<std::net::SocketAddr> {
        let inst = lock(&self.inner.sandboxes).get(id).cloned()?;
        Some(std::net::SocketAddr::from((
            inst.network()?.1,
            envd::ENVD_PORT,
        )))
    }

    /// Kills every sandbox and removes the network slots (for tests and an
    /// explicit `arca down`; a normal shutdown leaves sandboxes running).
    pub async fn shutdown_all(self) -> Result<(), StartError> {
        self.set_warm_pool(0);
        let ids: Vec<SandboxId> = lock(&self.inner.sandboxes).keys().cloned().collect();
        for id in ids {
            self.end(&id, EndReason::Killed).await;
        }
        if let Some(e) = self.inner.egress.get() {
            e.shutdown().await;
        }
        self.inner.slots.destroy().await.map_err(StartError::Net)
    }
}

impl arca_proto::build::BuildService for Node {
    fn build(
        &self,
        spec: arca_proto::build::BuildSpec,
        logs: arca_proto::build::BuildLogSink,
    ) -> BoxFuture<'_, Result<arca_proto::build::BuildResult, arca_proto::build::BuildFailure>>
    {
        Box::pin(self.run_build(spec, logs))
    }

    fn delete_build<'a>(
        &'a self,
        template_id: &'a str,
        build_id: &'a str,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            // Warm sandboxes of the build go first; running ones keep their
            // layers mounted (overlayfs holds them open) until they end.
            let warm: Vec<Booted> = {
                let mut warm = lock(&self.inner.warm);
                let keys: Vec<WarmKey> = warm
                    .keys()
                    .filter(|k| k.0 == template_id && k.1 == build_id)
                    .cloned()
                    .collect();
                lock(&self.inner.hot).retain(|k| !(k.0 == template_id && k.1 == build_id));
                keys.iter()
                    .filter_map(|k| warm.remove(k))
                    .flatten()
                    .collect()
            };
            for b in warm {
                b.shutdown().await;
            }
            // Sandboxes of the build keep running on its layers: the build
            // is retired (no new sandbox starts from it) and its layers go
            // with a later clean-up once none of them runs.
            let mut running: std::collections::HashSet<(String, String)> =
                lock(&self.inner.sandboxes)
                    .values()
                    .map(|i| (i.spec.template_id.clone(), i.spec.build_id.clone()))
                    .collect();
            running.extend(lock(&self.inner.booting).iter().cloned());
            let (t, b) = (template_id.to_string(), build_id.to_string());
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || {
                inner.templates.retire(&t, &b)?;
                inner.templates.purge_deleted(&running);
                // Its VM images too, unless a VM of it (running or paused)
                // still has one as the backing file of its disk.
                if !running.contains(&(t.clone(), b.clone())) {
                    vmboot::remove_images(&inner.config.home, &t, &b);
                }
                // Builds pin a layer before they look for it: holding the
                // pins while deciding means none can vanish under them. The
                // removal itself (seconds for big layers) runs unlocked.
                let detached = {
                    let pinned = lock(&inner.pinned);
                    inner.templates.detach_unused(&pinned)?
                };
                let freed = inner.templates.remove_detached(&detached);
                tracing::info!(
                    layers = detached.len(),
                    bytes = freed,
                    "unused layers removed"
                );
                Ok::<(), templates::StoreError>(())
            })
            .await
            .map_err(|e| NodeError::Internal(e.to_string()))?
            .map_err(|e| NodeError::Internal(e.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn short_of_memory_compares_available_with_the_threshold() {
        let info = "MemTotal:       1000000 kB\nMemFree:  1 kB\nMemAvailable:    95000 kB\n";
        assert!(super::short_of_memory(info, 10));
        assert!(!super::short_of_memory(info, 5));
        assert!(super::short_of_memory(info, 100));
        assert!(!super::short_of_memory("garbage", 100));
        assert_eq!(super::meminfo_field(info, "MemAvailable:"), Some(95000));
        assert_eq!(super::meminfo_field(info, "MemTotal:"), Some(1_000_000));
        assert_eq!(super::meminfo_field(info, "SwapTotal:"), None);
        // This host has the fields the node and `arca node` read.
        assert!(super::meminfo_kib("MemTotal:").is_some_and(|k| k > 0));
    }
}
