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

mod disk;
mod envd;
mod state;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arca_net::{NetConfig, Slot, SlotPool};
use arca_proto::node::{
    BoxFuture, EndReason, LogEntry, MetricSample, NodeError, NodeService, Route, RouteSource,
    SandboxEvent, SandboxId, SandboxSpec, SandboxState, SandboxStatus, TimeoutAction,
};
use arca_runtime::cgroup::{Cgroup, Layout, Limits};
use arca_runtime::{DEFAULT_ID_MAP, InitConfig};
use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use crate::envd::EnvdClient;
use crate::state::{Phase, StateFile};

/// Version of the envd protocol the node's envd speaks.
pub const ENVD_VERSION: &str = "0.6.13";
/// Most processes and threads one sandbox may have.
pub const DEFAULT_PIDS_LIMIT: u64 = 2048;
/// Samples of metrics kept per sandbox (about 10 minutes at 5 s).
const METRICS_KEPT: usize = 120;
/// Log lines kept per sandbox.
const LOGS_KEPT: usize = 1000;
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
}

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
}

/// One running sandbox.
struct Instance {
    spec: SandboxSpec,
    started_at: DateTime<Utc>,
    end_at: Mutex<DateTime<Utc>>,
    pid: i32,
    pid_start: u64,
    slot: Mutex<Option<Slot>>,
    sandbox_ip: std::net::Ipv4Addr,
    netns: PathBuf,
    cgroup: Cgroup,
    dir: PathBuf,
    logs: Mutex<VecDeque<LogEntry>>,
    metrics: Mutex<VecDeque<MetricSample>>,
    last_cpu: Mutex<Option<(Instant, u64)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Instance {
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
            state: SandboxState::Running,
            started_at: self.started_at,
            end_at: *lock(&self.end_at),
            cpu_count: self.spec.cpu_count,
            memory_mb: self.spec.memory_mb,
            disk_size_mb: self.spec.disk_size_mb,
            envd_version: ENVD_VERSION.to_string(),
        }
    }

    fn save_state(&self) {
        let st = StateFile {
            phase: Phase::Running,
            spec: self.spec.clone(),
            started_at: self.started_at,
            end_at: *lock(&self.end_at),
            pid: Some(self.pid),
            pid_start: Some(self.pid_start),
            slot_index: lock(&self.slot).as_ref().map(|s| s.index),
        };
        if let Err(e) = st.save(&self.dir) {
            tracing::error!(sandbox_id = %self.spec.sandbox_id, error = %e, "cannot save state");
        }
    }
}

struct Inner {
    config: NodeConfig,
    layout: Layout,
    slots: SlotPool,
    sandboxes: Mutex<HashMap<SandboxId, Arc<Instance>>>,
    creating: Mutex<std::collections::HashSet<SandboxId>>,
    events: broadcast::Sender<SandboxEvent>,
    ended: broadcast::Sender<SandboxId>,
    envd: EnvdClient,
    disks: Arc<disk::DiskTemplates>,
}

/// The node agent. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

fn sandboxes_dir(home: &Path) -> PathBuf {
    home.join("sandboxes")
}

/// Directory of a template's root file system on this node.
pub fn template_rootfs(home: &Path, template_id: &str) -> PathBuf {
    home.join("templates").join(template_id).join("rootfs")
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
        let in_use: Vec<u32> = survivors.iter().filter_map(|(_, s)| s.slot_index).collect();
        let slots = SlotPool::new(config.net.clone(), &in_use).await?;
        let disks_dir = config.home.join("disks");
        let (events, _) = broadcast::channel(1024);
        let (ended, _) = broadcast::channel(1024);
        let node = Node {
            inner: Arc::new(Inner {
                config,
                layout,
                slots,
                sandboxes: Mutex::new(HashMap::new()),
                creating: Mutex::new(std::collections::HashSet::new()),
                events,
                ended,
                envd: EnvdClient::new(),
                disks: Arc::new(disk::DiskTemplates::new(disks_dir, DEFAULT_ID_MAP.outside)),
            }),
        };
        for (path, st) in dead {
            node.reap_leftover(&path, st.as_ref());
        }
        for (path, st) in survivors {
            node.reattach(path, st);
        }
        // cgroups of sandboxes that have no state directory at all.
        let known: Vec<String> = lock(&node.inner.sandboxes)
            .keys()
            .map(|k| k.to_string())
            .collect();
        for name in node.inner.layout.sandbox_names() {
            if !known.contains(&name)
                && !sandboxes_dir(&node.inner.config.home).join(&name).exists()
            {
                if let Ok(cg) = node.inner.layout.open(&name) {
                    let _ = cg.kill_all();
                    let _ = cg.remove();
                    tracing::info!(cgroup = %name, "removed a leftover cgroup");
                }
            }
        }
        node.spawn_loops();
        Ok(node)
    }

    fn reattach(&self, dir: PathBuf, st: StateFile) {
        let id = st.spec.sandbox_id.clone();
        let Some(slot) = st.slot_index.and_then(|i| self.inner.slots.take_adopted(i)) else {
            tracing::warn!(sandbox_id = %id, "running sandbox without its network slot; reaping it");
            self.reap_leftover(&dir, Some(&st));
            return;
        };
        let Ok(cgroup) = self.inner.layout.open(id.as_str()) else {
            self.inner.slots.release(slot);
            self.reap_leftover(&dir, Some(&st));
            return;
        };
        let inst = Arc::new(Instance {
            started_at: st.started_at,
            end_at: Mutex::new(st.end_at),
            pid: st.pid.unwrap_or(0),
            pid_start: st.pid_start.unwrap_or(0),
            sandbox_ip: slot.sandbox_ip,
            netns: slot.netns_path.clone(),
            slot: Mutex::new(Some(slot)),
            cgroup,
            dir,
            logs: Mutex::new(VecDeque::new()),
            metrics: Mutex::new(VecDeque::new()),
            last_cpu: Mutex::new(None),
            spec: st.spec,
        });
        inst.log("info", "reattached after a node restart");
        tracing::info!(sandbox_id = %id, "reattached a running sandbox");
        lock(&self.inner.sandboxes).insert(id, inst);
    }

    /// Removes whatever a sandbox that is not running left behind.
    fn reap_leftover(&self, dir: &Path, st: Option<&StateFile>) {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Ok(cg) = self.inner.layout.open(&name) {
            let _ = cg.kill_all();
            let _ = cg.remove();
        }
        if let Some(slot) = st
            .and_then(|s| s.slot_index)
            .and_then(|i| self.inner.slots.take_adopted(i))
        {
            self.inner.slots.release(slot);
        }
        let _ = std::fs::remove_dir_all(dir);
        if let Ok(id) = SandboxId::parse(&name) {
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
                let now = Utc::now();
                let all: Vec<Arc<Instance>> =
                    lock(&node.inner.sandboxes).values().cloned().collect();
                for inst in all {
                    let id = inst.spec.sandbox_id.clone();
                    if *lock(&inst.end_at) <= now {
                        // Pause-on-timeout arrives with issue 5; until then it ends too.
                        if inst.spec.on_timeout == TimeoutAction::Pause {
                            inst.log("warn", "pause on timeout is not supported yet; killing");
                        }
                        node.end(&id, EndReason::Expired).await;
                    } else if !state::same_process(inst.pid, inst.pid_start) {
                        node.end(&id, EndReason::Exited).await;
                    }
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
                drop(inner);
                for inst in all {
                    sample(&inst);
                }
            }
        });
    }

    /// Ends a sandbox: kills every process, removes its cgroup, files and
    /// slot, and tells subscribers. Idempotent.
    async fn end(&self, id: &SandboxId, reason: EndReason) -> bool {
        let Some(inst) = lock(&self.inner.sandboxes).remove(id) else {
            return false;
        };
        // Abort proxied connections first: the SDK must see a reset.
        let _ = self.inner.ended.send(id.clone());
        let inner = self.inner.clone();
        let inst2 = inst.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = inst2.cgroup.kill_all() {
                tracing::warn!(error = %e, "killing a sandbox's processes");
            }
            // The node is the sandbox init's parent (child subreaper): reap it
            // now, or its zombie keeps the cgroup busy. After a restart the
            // init belongs to the host's init and this returns at once.
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(inst2.pid), None);
            if let Err(e) = inst2.cgroup.remove() {
                tracing::warn!(error = ?e, "removing a sandbox's cgroup");
            }
            if let Err(e) = std::fs::remove_dir_all(&inst2.dir) {
                tracing::warn!(error = %e, dir = %inst2.dir.display(), "removing a sandbox's files");
            }
            if let Some(slot) = lock(&inst2.slot).take() {
                inner.slots.release(slot);
            }
        })
        .await;
        tracing::info!(sandbox_id = %id, ?reason, "sandbox ended");
        let _ = self.inner.events.send(SandboxEvent::Ended {
            sandbox_id: id.clone(),
            reason,
        });
        true
    }

    fn instance(&self, id: &SandboxId) -> Result<Arc<Instance>, NodeError> {
        lock(&self.inner.sandboxes)
            .get(id)
            .cloned()
            .ok_or_else(|| NodeError::SandboxNotFound(id.clone()))
    }

    async fn create_sandbox(&self, spec: SandboxSpec) -> Result<SandboxStatus, NodeError> {
        let id = spec.sandbox_id.clone();
        let rootfs = template_rootfs(&self.inner.config.home, &spec.template_id);
        if !rootfs.is_dir() {
            return Err(NodeError::TemplateNotFound(spec.template_id.clone()));
        }
        if lock(&self.inner.sandboxes).contains_key(&id)
            || !lock(&self.inner.creating).insert(id.clone())
        {
            return Err(NodeError::Conflict(format!("sandbox {id} already exists")));
        }
        let result = self.build(spec, rootfs).await;
        lock(&self.inner.creating).remove(&id);
        result
    }

    async fn build(&self, spec: SandboxSpec, rootfs: PathBuf) -> Result<SandboxStatus, NodeError> {
        let inner = &self.inner;
        let id = spec.sandbox_id.clone();
        let dir = sandboxes_dir(&inner.config.home).join(id.as_str());
        let internal =
            |what: &str, e: &dyn std::fmt::Display| NodeError::Internal(format!("{what}: {e}"));
        std::fs::create_dir_all(&dir)
            .map_err(|e| internal("creating the sandbox directory", &e))?;
        let started_at = Utc::now();
        let mut st = StateFile {
            phase: Phase::Creating,
            spec: spec.clone(),
            started_at,
            end_at: spec.end_at,
            pid: None,
            pid_start: None,
            slot_index: None,
        };
        st.save(&dir)
            .map_err(|e| internal("writing the state file", &e))?;

        let mut made = Partial {
            node: self.clone(),
            dir: dir.clone(),
            slot: None,
            cgroup: None,
        };
        let slot = inner
            .slots
            .acquire()
            .await
            .map_err(|e| NodeError::Capacity(format!("no network slot: {e}")))?;
        let (sandbox_ip, netns) = (slot.sandbox_ip, slot.netns_path.clone());
        st.slot_index = Some(slot.index);
        made.slot = Some(slot);
        st.save(&dir)
            .map_err(|e| internal("writing the state file", &e))?;

        let limits = Limits {
            cpus: spec.cpu_count,
            memory_mib: u64::from(spec.memory_mb),
            pids: inner.config.pids_limit,
        };
        let cgroup = inner
            .layout
            .create(id.as_str(), limits)
            .map_err(|e| internal("creating the cgroup", &e))?;
        made.cgroup = Some(cgroup.clone());

        // The writable layer lives on the sandbox's own ext4 image so that
        // writes stop at diskSizeMB; it is mounted inside the sandbox only.
        let (disk_dir, root) = (dir.join("disk"), dir.join("root"));
        for d in [&disk_dir, &root] {
            std::fs::create_dir_all(d)
                .map_err(|e| internal("creating the sandbox directories", &e))?;
        }
        let image = dir.join("disk.img");
        let disks = inner.disks.clone();
        let (size, img) = (spec.disk_size_mb, image.clone());
        tokio::task::spawn_blocking(move || {
            disks
                .template(size)
                .and_then(|t| disk::sparse_copy(&t, &img))
        })
        .await
        .map_err(|e| internal("disk task", &e))?
        .map_err(|e| internal("making the sandbox's disk", &e))?;
        let etc_files = vec![
            // Name resolution inside: the host's non-loopback resolvers.
            ("/etc/resolv.conf".to_string(), arca_net::resolv_conf()),
            ("/etc/hostname".to_string(), format!("{id}\n")),
            (
                "/etc/hosts".to_string(),
                format!(
                    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{id}\n"
                ),
            ),
        ];

        let cfg = InitConfig {
            sandbox_id: id.to_string(),
            hostname: id.to_string(),
            lower_dirs: vec![rootfs],
            upper_dir: disk_dir.join("upper"),
            work_dir: disk_dir.join("work"),
            root_dir: root,
            disk: Some(arca_runtime::DiskSpec {
                image,
                mount_point: disk_dir,
            }),
            files: etc_files,
            envd_binary: inner.config.envd_binary.clone(),
            envd_args: vec![],
            env: vec![
                (
                    "PATH".into(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ),
                ("E2B_SANDBOX_ID".into(), id.to_string()),
                ("E2B_TEMPLATE_ID".into(), spec.template_id.clone()),
            ],
            netns: Some(netns.clone()),
            cgroup_dirs: cgroup.dirs().to_vec(),
            id_map: DEFAULT_ID_MAP,
            boot_id: arca_runtime::new_boot_id(),
            no_new_privs: false,
        };
        let exe = inner.config.init_exe.clone();
        let pid = tokio::task::spawn_blocking(move || arca_runtime::launch(&exe, &cfg))
            .await
            .map_err(|e| internal("init task", &e))?
            .map_err(|e| internal("starting the sandbox", &e))?;
        let pid_start = state::process_start(pid)
            .ok_or_else(|| NodeError::Internal("sandbox init exited at once".into()))?;
        st.phase = Phase::Running;
        st.pid = Some(pid);
        st.pid_start = Some(pid_start);
        st.save(&dir)
            .map_err(|e| internal("writing the state file", &e))?;

        inner
            .envd
            .wait_ready(sandbox_ip, ENVD_READY_WITHIN)
            .await
            .map_err(|e| internal("waiting for envd", &e))?;
        let init = serde_json::json!({
            "envVars": spec.env_vars,
            "accessToken": spec.envd_access_token,
            "defaultUser": "user",
            "defaultWorkdir": "/home/user",
            "timestamp": Utc::now().to_rfc3339(),
        });
        inner
            .envd
            .init(sandbox_ip, None, &init)
            .await
            .map_err(|e| internal("configuring envd", &e))?;

        let inst = Arc::new(Instance {
            started_at,
            end_at: Mutex::new(spec.end_at),
            pid,
            pid_start,
            slot: Mutex::new(made.slot.take()),
            sandbox_ip,
            netns,
            cgroup,
            dir,
            logs: Mutex::new(VecDeque::new()),
            metrics: Mutex::new(VecDeque::new()),
            last_cpu: Mutex::new(None),
            spec,
        });
        made.disarm();
        inst.log("info", "sandbox started");
        let status = inst.status();
        sample(&inst);
        lock(&inner.sandboxes).insert(id, inst);
        Ok(status)
    }
}

/// What a failed create made so far; cleaned up on drop.
struct Partial {
    node: Node,
    dir: PathBuf,
    slot: Option<Slot>,
    cgroup: Option<Cgroup>,
}

impl Partial {
    fn disarm(mut self) {
        self.dir = PathBuf::new();
        self.cgroup = None;
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.dir.as_os_str().is_empty() {
            return;
        }
        if let Some(cg) = self.cgroup.take() {
            let _ = cg.kill_all();
            let _ = cg.remove();
        }
        if let Some(slot) = self.slot.take() {
            self.node.inner.slots.release(slot);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Takes one metrics sample of a sandbox from its cgroup.
fn sample(inst: &Instance) {
    let used_us = inst.cgroup.cpu_usage_us();
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
        mem_used: inst.cgroup.memory_used(),
        mem_total: u64::from(inst.spec.memory_mb) << 20,
        mem_cache: inst.cgroup.memory_cache(),
        // The merged root of the sandbox reports its upper file system: the
        // sandbox's own disk.
        disk_used: disk::usage(Path::new(&format!("/proc/{}/root", inst.pid)))
            .map_or(0, |(_, used)| used),
        disk_total,
    };
    let mut m = lock(&inst.metrics);
    if m.len() >= METRICS_KEPT {
        m.pop_front();
    }
    m.push_back(s);
}

impl NodeService for Node {
    fn create(&self, spec: SandboxSpec) -> BoxFuture<'_, Result<SandboxStatus, NodeError>> {
        Box::pin(self.create_sandbox(spec))
    }

    fn kill<'a>(&'a self, id: &'a SandboxId) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            if self.end(id, EndReason::Killed).await {
                Ok(())
            } else {
                Err(NodeError::SandboxNotFound(id.clone()))
            }
        })
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

    fn events(&self) -> broadcast::Receiver<SandboxEvent> {
        self.inner.events.subscribe()
    }
}

impl RouteSource for Node {
    fn route(&self, sandbox_id: &str) -> Option<Route> {
        let id = SandboxId::parse(sandbox_id).ok()?;
        let inst = lock(&self.inner.sandboxes).get(&id).cloned()?;
        Some(Route {
            sandbox_id: id,
            netns: inst.netns.clone(),
            envd_access_token: Some(inst.spec.envd_access_token.clone()),
        })
    }

    fn routes(&self) -> Vec<Route> {
        lock(&self.inner.sandboxes)
            .values()
            .map(|inst| Route {
                sandbox_id: inst.spec.sandbox_id.clone(),
                netns: inst.netns.clone(),
                envd_access_token: Some(inst.spec.envd_access_token.clone()),
            })
            .collect()
    }

    fn ended(&self) -> broadcast::Receiver<SandboxId> {
        self.inner.ended.subscribe()
    }
}

impl Node {
    /// Address of a sandbox's envd, for tools and tests on this host.
    pub fn envd_addr(&self, id: &SandboxId) -> Option<std::net::SocketAddr> {
        let inst = lock(&self.inner.sandboxes).get(id).cloned()?;
        Some(std::net::SocketAddr::from((
            inst.sandbox_ip,
            envd::ENVD_PORT,
        )))
    }

    /// Kills every sandbox and removes the network slots (for tests and an
    /// explicit `arca down`; a normal shutdown leaves sandboxes running).
    pub async fn shutdown_all(self) -> Result<(), StartError> {
        let ids: Vec<SandboxId> = lock(&self.inner.sandboxes).keys().cloned().collect();
        for id in ids {
            self.end(&id, EndReason::Killed).await;
        }
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner.slots.destroy().await.map_err(StartError::Net),
            Err(_) => Ok(()),
        }
    }
}
