//! Template builds: a Dockerfile or E2B's build steps become a stack of
//! cached layers and a build record ([`crate::templates`]).
//!
//! Each step that changes files runs in a build sandbox whose writable
//! layer is a fresh directory in the layer store: RUN through envd, COPY
//! and WORKDIR through `arca __apply` inside the sandbox's namespaces. When
//! the step succeeds the directory becomes the layer, keyed by the hash of
//! (parent, step, effective configuration, input contents); an unchanged
//! step finds its layer and is skipped. Steps that only change
//! configuration (ENV, USER, CMD...) make no layer; the configuration is
//! part of every later step's key.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arca_proto::build::{
    BuildBase, BuildFailure, BuildLog, BuildLogLevel, BuildLogSink, BuildResult, BuildSource,
    BuildSpec, E2bStep,
};
use arca_proto::node::{RUNTIME_METADATA_KEY, Runtime};
use arca_runtime::ApplyOptions;
use arca_runtime::cgroup::Limits;
use arca_template::{Base, Command, CopyFrom, CopySpec, Instruction, Stage, StageConfig, Step};
use chrono::Utc;
use sha2::{Digest as _, Sha256};

use crate::envd::{RunCommand, Stream};
use crate::templates::{DEFAULT_PATH, TemplateBuild, layer_id};
use crate::{BootPlan, Booted, Node, Upper, random_suffix};

/// Longest a single RUN step may take.
const RUN_STEP_LIMIT: Duration = Duration::from_secs(3600);
/// Image names that mean the `base` template (E2B's default base image).
const BASE_IMAGE_ALIASES: [&str; 3] = ["e2bdev/base", "docker.io/e2bdev/base", "base"];
/// Files the sandbox init writes into every root (in `/etc`); they are the
/// sandbox's, not the step's, and are dropped from layers.
const RUNTIME_FILES: [&str; 3] = ["hosts", "hostname", "resolv.conf"];

/// Where a build's log lines go, tagged with the current step.
struct Log {
    sink: BuildLogSink,
}

impl Log {
    fn line(&self, level: BuildLogLevel, step: Option<&str>, message: impl Into<String>) {
        let _ = self.sink.send(BuildLog {
            timestamp: Utc::now(),
            level,
            step: step.map(str::to_string),
            message: message.into(),
        });
    }
    fn info(&self, step: Option<&str>, message: impl Into<String>) {
        self.line(BuildLogLevel::Info, step, message);
    }
}

fn fail(step: Option<&str>, message: impl Into<String>) -> BuildFailure {
    BuildFailure {
        message: message.into(),
        step: step.map(str::to_string),
    }
}

/// The file system and configuration at some point of a build.
#[derive(Clone)]
struct State {
    /// Cache key of everything so far.
    key: String,
    /// Layer ids, bottom first (layers that hold nothing are left out).
    layers: Vec<String>,
    /// Configuration in effect.
    config: StageConfig,
}

impl State {
    fn effective_user(&self) -> String {
        self.config
            .user
            .clone()
            .unwrap_or_else(|| "root".to_string())
    }
}

fn sha(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    format!("{:x}", h.finalize())
}

/// Turns the api's E2B steps into the template crate's.
fn e2b_steps(steps: &[E2bStep]) -> Vec<arca_template::e2b::E2bStep> {
    steps
        .iter()
        .map(|s| arca_template::e2b::E2bStep {
            kind: s.kind.clone(),
            args: s.args.clone(),
            files_hash: s.files_hash.clone(),
            force: s.force,
        })
        .collect()
}

struct Builder<'a> {
    node: &'a Node,
    spec: &'a BuildSpec,
    log: Log,
    /// Unpacked upload archives by hash, and the temp dir holding them.
    contexts: HashMap<String, PathBuf>,
    scratch: tempfile::TempDir,
    /// Set once a step was forced: later steps are rebuilt too.
    forcing: bool,
    /// Image bases by reference, pulled once per build.
    pulled: HashMap<String, State>,
    /// Layers this build pinned.
    pins: Vec<String>,
    cached: u32,
    built: u32,
}

impl Node {
    /// Runs one build to the end (the [`arca_proto::build::BuildService`]
    /// implementation).
    pub(crate) async fn run_build(
        &self,
        spec: BuildSpec,
        sink: BuildLogSink,
    ) -> Result<BuildResult, BuildFailure> {
        let scratch = tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(self.inner.config.home.join("tmp"))
            .or_else(|_| {
                std::fs::create_dir_all(self.inner.config.home.join("tmp"))?;
                tempfile::Builder::new()
                    .prefix("build-")
                    .tempdir_in(self.inner.config.home.join("tmp"))
            })
            .map_err(|e| fail(None, format!("cannot make a scratch directory: {e}")))?;
        let mut b = Builder {
            node: self,
            spec: &spec,
            log: Log { sink },
            contexts: HashMap::new(),
            scratch,
            forcing: spec.force,
            pulled: HashMap::new(),
            pins: Vec::new(),
            cached: 0,
            built: 0,
        };
        let result = b.run().await;
        match result {
            Ok(r) => Ok(r),
            Err(e) => {
                b.log
                    .line(BuildLogLevel::Error, e.step.as_deref(), e.message.clone());
                Err(e)
            }
        }
    }
}

impl Drop for Builder<'_> {
    /// Unpins this build's layers however it ends (finished, failed, or
    /// dropped by a caller that stopped waiting).
    fn drop(&mut self) {
        let mut pinned = crate::lock(&self.node.inner.pinned);
        for p in &self.pins {
            if let Some(i) = pinned.iter().position(|x| x == p) {
                pinned.swap_remove(i);
            }
        }
    }
}

impl Builder<'_> {
    async fn run(&mut self) -> Result<BuildResult, BuildFailure> {
        let spec = self.spec;
        let (dockerfile, context) = match &spec.source {
            BuildSource::Steps { base, steps } => {
                let base = match base {
                    BuildBase::Image { reference, .. } => Base::Image(reference.clone()),
                    BuildBase::Template {
                        template_id,
                        build_id,
                    } => Base::Template(format!("{template_id}/{build_id}")),
                };
                let plan = arca_template::e2b::plan(base, &e2b_steps(steps))
                    .map_err(|e| fail(None, e.to_string()))?;
                (plan, None)
            }
            BuildSource::Dockerfile {
                dockerfile,
                context_hash,
                build_args,
            } => {
                let first = arca_template::parse(dockerfile, build_args)
                    .map_err(|e| fail(Some(&e.line.to_string()), e.to_string()))?;
                // Sandboxes run on this host's CPU: another platform's image
                // would not run, so it is refused rather than pulled.
                let host = arca_image::registry::Platform::host();
                for stage in &first.stages {
                    if let Some(p) = &stage.platform {
                        let line = stage.line.to_string();
                        let wanted = arca_image::registry::Platform::parse(p)
                            .map_err(|e| fail(Some(&line), format!("FROM --platform: {e}")))?;
                        if wanted.os != host.os || wanted.architecture != host.architecture {
                            return Err(fail(
                                Some(&line),
                                format!(
                                    "FROM --platform={p}: this node runs {}/{} only; \
                                     drop --platform or use {}/{}",
                                    host.os, host.architecture, host.os, host.architecture
                                ),
                            ));
                        }
                    }
                }
                // Pull every image base first, so that the stages' ENV and
                // WORKDIR expand against the images' own values.
                for stage in &first.stages {
                    if let Base::Image(r) = &stage.base {
                        self.image_state(r).await?;
                    }
                }
                let pulled = &self.pulled;
                let images = |name: &str| pulled.get(name).map(|s| s.config.clone());
                let plan = arca_template::parse_with_images(dockerfile, build_args, &images)
                    .map_err(|e| fail(Some(&e.line.to_string()), e.to_string()))?;
                for w in &plan.warnings {
                    self.log.line(
                        BuildLogLevel::Warn,
                        Some(&w.line.to_string()),
                        w.message.clone(),
                    );
                }
                let ctx = match context_hash {
                    Some(h) => Some(self.context(h, None)?),
                    None => None,
                };
                (plan, ctx)
            }
        };
        let mut stages: Vec<State> = Vec::new();
        for stage in &dockerfile.stages {
            let state = self.stage(stage, &stages, context.as_deref()).await?;
            stages.push(state);
        }
        let Some(mut last) = stages.pop() else {
            return Err(fail(None, "the build has no stage"));
        };
        // Every template gets the account E2B's SDKs run as.
        self.add_user(&mut last, "finalize", "finalize-user-v1")
            .await?;
        let start_cmd = spec
            .start_cmd
            .clone()
            .or_else(|| dockerfile.start_command().map(|argv| shell_join(&argv)));
        let runtime = match last.config.labels.get(RUNTIME_METADATA_KEY) {
            Some(name) => Some(
                Runtime::parse(name).map_err(|e| fail(Some("finalize"), format!("LABEL {e}")))?,
            ),
            None => None,
        };
        let build = TemplateBuild {
            template_id: spec.template_id.clone(),
            build_id: spec.build_id.clone(),
            layers: last.layers.clone(),
            env: last.config.env.clone(),
            workdir: last.config.workdir.clone(),
            user: last.config.user.clone(),
            start_cmd,
            ready_cmd: spec.ready_cmd.clone(),
            created_at: Utc::now(),
            runtime,
        };
        if build.start_cmd.is_some() || build.ready_cmd.is_some() {
            self.check_start(&build).await?;
        }
        let store = &self.node.inner.templates;
        store
            .save(&build)
            .map_err(|e| fail(Some("finalize"), e.to_string()))?;
        let lowers = store
            .lower_dirs(&build)
            .map_err(|e| fail(Some("finalize"), e.to_string()))?;
        let bytes: u64 = lowers
            .iter()
            .filter_map(|l| arca_image::disk_usage(l).ok())
            .sum();
        self.log.info(
            Some("finalize"),
            format!(
                "template {} built: {} layers, {} steps cached, {} run",
                spec.template_id,
                build.layers.len(),
                self.cached,
                self.built
            ),
        );
        Ok(BuildResult {
            envd_version: crate::ENVD_VERSION.to_string(),
            rootfs_size_mb: bytes.div_ceil(1 << 20),
            cached_steps: self.cached,
            built_steps: self.built,
        })
    }

    /// The base of a stage.
    async fn base(&mut self, stage: &Stage, earlier: &[State]) -> Result<State, BuildFailure> {
        let step = Some("base");
        let store = &self.node.inner.templates;
        let from_build = |b: TemplateBuild| State {
            key: build_key(&b),
            layers: b.layers,
            config: StageConfig {
                env: b.env,
                workdir: b.workdir,
                user: b.user,
                ..StageConfig::default()
            },
        };
        match &stage.base {
            Base::Scratch => Ok(State {
                key: sha(&["scratch"]),
                layers: Vec::new(),
                config: StageConfig::default(),
            }),
            Base::Stage(i) => {
                let mut s = earlier
                    .get(*i)
                    .cloned()
                    .ok_or_else(|| fail(step, format!("stage {i} does not exist")))?;
                // A stage inherits the configuration of the one it starts from,
                // not its start command.
                s.config.cmd = None;
                s.config.entrypoint = None;
                Ok(s)
            }
            Base::Template(reference) => {
                let (t, b) = reference
                    .split_once('/')
                    .ok_or_else(|| fail(step, format!("bad template reference {reference}")))?;
                let build = store.get(t, b).ok_or_else(|| {
                    fail(
                        step,
                        format!("template {t} (build {b}) is not on this node; build it first"),
                    )
                })?;
                self.pin(&build.layers);
                self.log
                    .info(step, format!("starting from template {t} (build {b})"));
                Ok(from_build(build))
            }
            Base::Image(reference) => self.image_state(reference).await,
        }
    }

    /// An image base: the built-in base for E2B's default image, else a
    /// pull (once per build).
    async fn image_state(&mut self, reference: &str) -> Result<State, BuildFailure> {
        let step = Some("base");
        if let Some(s) = self.pulled.get(reference) {
            return Ok(s.clone());
        }
        let plain = reference.trim_end_matches(":latest");
        let state = if BASE_IMAGE_ALIASES.contains(&plain) {
            let build = self
                .node
                .inner
                .templates
                .get(
                    arca_proto::build::BASE_TEMPLATE_ID,
                    arca_proto::build::BASE_BUILD_ID,
                )
                .ok_or_else(|| fail(step, "the base template is not built yet"))?;
            self.pin(&build.layers);
            self.log.info(
                step,
                format!("{reference} is Arca's built-in base template (Debian bookworm)"),
            );
            State {
                key: build_key(&build),
                layers: build.layers,
                config: StageConfig {
                    env: build.env,
                    workdir: build.workdir,
                    user: build.user,
                    ..StageConfig::default()
                },
            }
        } else {
            self.pull(reference).await?
        };
        self.pulled.insert(reference.to_string(), state.clone());
        Ok(state)
    }

    async fn pull(&mut self, reference: &str) -> Result<State, BuildFailure> {
        let step = Some("base");
        let cfg = &self.node.inner.config;
        let auth = match &self.spec.source {
            BuildSource::Steps {
                base: BuildBase::Image { auth: Some(a), .. },
                ..
            } => Some(registry_credentials(a).map_err(|m| fail(step, m))?),
            _ => None,
        };
        let opts = arca_image::registry::PullOptions {
            auth,
            mirror: cfg.registry_mirror.clone(),
            insecure: cfg.insecure_registries.clone(),
            id_offset: arca_runtime::DEFAULT_ID_MAP.outside,
            ..arca_image::registry::PullOptions::default()
        };
        let parsed = arca_image::registry::Reference::parse(reference)
            .map_err(|e| fail(step, format!("{reference}: {e}")))?;
        let allowed = parsed.is_docker_hub()
            || cfg.insecure_registries.iter().any(|a| {
                *a == parsed.registry
                    || parsed
                        .registry
                        .rsplit_once(':')
                        .is_some_and(|(h, _)| h == a)
            });
        let internal = || {
            fail(
                step,
                format!(
                    "{reference}: registry {} is (or resolves to) an address of this host or its \
                     private network; an operator allows it with `arca up --insecure-registry {}`",
                    parsed.registry, parsed.registry
                ),
            )
        };
        if !allowed && is_host_internal(&parsed.registry) {
            return Err(internal());
        }
        if !allowed {
            // A name is checked by what it resolves to now (a later
            // re-resolution or a redirect is not covered).
            let target = if parsed.registry.contains(':') {
                parsed.registry.clone()
            } else {
                format!("{}:443", parsed.registry)
            };
            if let Ok(addrs) = tokio::net::lookup_host(target).await {
                if any_internal(addrs.map(|a| a.ip())) {
                    return Err(internal());
                }
            }
        }
        self.log.info(step, format!("pulling {reference}"));
        let sink = self.log.sink.clone();
        let inner = &self.node.inner;
        let arrived = std::sync::Mutex::new(Vec::new());
        let progress = |p: arca_image::registry::PullProgress| {
            // Pinned the moment they are in the store, before the pull even
            // returns: a collection meanwhile must not take them.
            if let arca_image::registry::PullProgress::LayerCached { digest }
            | arca_image::registry::PullProgress::LayerDone { digest, .. } = &p
            {
                if let Ok(id) = arca_image::store::LayerId::from_digest(digest) {
                    crate::lock(&inner.pinned).push(id.as_str().to_string());
                    crate::lock(&arrived).push(id.as_str().to_string());
                }
            }
            let _ = sink.send(BuildLog {
                timestamp: Utc::now(),
                level: BuildLogLevel::Debug,
                step: Some("base".into()),
                message: describe_pull(&p),
            });
        };
        let image = arca_image::registry::pull(
            reference,
            &opts,
            self.node.inner.templates.layers(),
            &progress,
        )
        .await;
        self.pins
            .extend(std::mem::take(&mut *crate::lock(&arrived)));
        let image = image.map_err(|e| fail(step, format!("pulling {reference}: {e}")))?;
        self.log.info(
            step,
            format!(
                "pulled {} ({}, {} layers)",
                image.reference,
                image.manifest_digest,
                image.layers.len()
            ),
        );
        let layers: Vec<String> = image
            .layers
            .iter()
            .map(|l| l.as_str().to_string())
            .collect();
        self.pin(&layers);
        let c = image.config;
        Ok(State {
            key: sha(&["image", &image.manifest_digest]),
            layers,
            config: StageConfig {
                env: c.env,
                workdir: c.workdir.filter(|w| !w.is_empty()),
                user: c.user.filter(|u| !u.is_empty()),
                labels: c.labels,
                exposed: c.exposed_ports,
                ..StageConfig::default()
            },
        })
    }

    /// Keeps layers from garbage collection until the build ends.
    fn pin(&mut self, layers: &[String]) {
        crate::lock(&self.node.inner.pinned).extend(layers.iter().cloned());
        self.pins.extend(layers.iter().cloned());
    }

    async fn stage(
        &mut self,
        stage: &Stage,
        earlier: &[State],
        context: Option<&Path>,
    ) -> Result<State, BuildFailure> {
        let mut state = self.base(stage, earlier).await?;
        if state.config.shell.is_empty() {
            state.config.shell = arca_template::DEFAULT_SHELL
                .iter()
                .map(|s| (*s).to_string())
                .collect();
        }
        let is_e2b = matches!(self.spec.source, BuildSource::Steps { .. });
        if is_e2b {
            // E2B's builder runs steps as `user` (with sudo) from the start,
            // in its home, whatever the base image is.
            self.add_user(&mut state, "base", "e2b-user-v1").await?;
            if state.config.user.is_none() {
                state.config.user = Some("user".into());
            }
            if state.config.workdir.is_none() {
                state.config.workdir = Some("/home/user".into());
            }
        }
        // ARG values in effect are the environment of RUN, not of the image.
        let mut args: Vec<(String, String)> = Vec::new();
        for step in &stage.steps {
            let n = step.line.to_string();
            let label = Some(n.as_str());
            if step.force {
                self.forcing = true;
            }
            let makes_layer = matches!(
                step.instruction,
                Instruction::Run { .. }
                    | Instruction::Copy(_)
                    | Instruction::Add(_)
                    | Instruction::Workdir(_)
            );
            if !makes_layer {
                // Configuration steps make no layer but are part of every
                // later step's key (ARG values reach RUN this way).
                state.key = arca_template::cache::step_key(&state.key, step, &state.config, None);
            }
            match &step.instruction {
                Instruction::Arg { name, value } => {
                    args.retain(|(k, _)| k != name);
                    if let Some(v) = value {
                        args.push((name.clone(), v.clone()));
                    }
                }
                Instruction::Env(pairs) => {
                    for (k, v) in pairs {
                        // E2B sends values raw (`$PATH:/opt/bin`); a
                        // Dockerfile's are expanded by the parser already.
                        let v = &if is_e2b {
                            expand_vars(v, &state.config.env)
                        } else {
                            v.clone()
                        };
                        match state.config.env.iter_mut().find(|(ek, _)| ek == k) {
                            Some(e) => e.1 = v.clone(),
                            None => state.config.env.push((k.clone(), v.clone())),
                        }
                    }
                    self.log
                        .info(label, format!("ENV {}", describe_pairs(pairs)));
                }
                Instruction::Label(pairs) => {
                    state.config.labels.extend(pairs.iter().cloned());
                }
                Instruction::Expose(ports) => {
                    for p in ports {
                        if !state.config.exposed.contains(p) {
                            state.config.exposed.push(p.clone());
                        }
                    }
                }
                Instruction::Shell(shell) => state.config.shell = shell.clone(),
                Instruction::Cmd(c) => state.config.cmd = Some(c.clone()),
                Instruction::Entrypoint(c) => state.config.entrypoint = Some(c.clone()),
                Instruction::User(u) => {
                    state.config.user = Some(u.clone());
                    self.log.info(label, format!("USER {u}"));
                }
                Instruction::Workdir(dir) => {
                    state.config.workdir = Some(dir.clone());
                    self.workdir(&mut state, &n, dir).await?;
                }
                Instruction::Run { command, user } => {
                    self.run_step(&mut state, &n, step, command, user.as_deref(), &args)
                        .await?;
                }
                Instruction::Copy(copy) | Instruction::Add(copy) => {
                    let is_add = matches!(step.instruction, Instruction::Add(_));
                    let fut: SendFuture<'_> = Box::pin(
                        self.copy_step(&mut state, &n, step, copy, earlier, context, is_add),
                    );
                    fut.await?;
                }
            }
        }
        Ok(state)
    }

    /// A layer adding the account `user` where the image has none.
    async fn add_user(
        &mut self,
        state: &mut State,
        step: &str,
        salt: &str,
    ) -> Result<(), BuildFailure> {
        let key = sha(&[&state.key, salt]);
        let work = Work::Apply {
            chown: None,
            chmod: None,
            ensure_user: true,
            items: Vec::new(),
        };
        self.layer_step(state, step, key, work).await
    }

    /// Makes (or finds in the cache) the layer of one step. `make` does the
    /// step's work in a booted build sandbox whose writes go to the layer.
    async fn layer_step(
        &mut self,
        state: &mut State,
        step: &str,
        key: String,
        work: Work,
    ) -> Result<(), BuildFailure> {
        let label = Some(step);
        let store = self.node.inner.templates.layers();
        // A forced step gets a layer of its own (the cached one may be in
        // use by running sandboxes), and so does everything after it.
        let key = if self.forcing {
            sha(&[&key, "forced", &self.spec.build_id])
        } else {
            key
        };
        let id = layer_id(&key).map_err(|e| fail(label, e.to_string()))?;
        self.pin(std::slice::from_ref(&key));
        if !self.forcing && store.contains(&id) {
            self.cached += 1;
            self.log.info(label, "CACHED");
        } else {
            let writer = store.begin().map_err(|e| fail(label, e.to_string()))?;
            let lowers = self.lowers(&state.layers)?;
            let limits = Limits {
                cpus: self.spec.cpu_count.max(1),
                memory_mib: u64::from(self.spec.memory_mb.max(128)),
                pids: self.node.inner.config.pids_limit,
            };
            // The step writes to a disk image of its own, so that a RUN
            // cannot fill the host's disk; its writes are copied into the
            // layer afterwards.
            let image = writer.scratch_path("disk.img");
            let plan = BootPlan {
                runtime: Runtime::Ns,
                egress: None,
                resume: None,
                lowers,
                upper: Upper::DiskAt {
                    mb: self.node.inner.config.build_disk_mb,
                    image: image.clone(),
                },
                limits: Some(limits),
                template: None,
            };
            let booted = self
                .node
                .boot(format!("b{}", random_suffix()), plan)
                .await
                .map_err(|e| fail(label, format!("starting a build sandbox: {e}")))?;
            let result = self.work(step, &booted, work).await;
            booted.shutdown().await;
            result?;
            let (mnt, dest) = (writer.scratch_path("mnt"), writer.dir().to_path_buf());
            tokio::task::spawn_blocking(move || crate::disk::copy_upper_out(&image, &mnt, &dest))
                .await
                .map_err(|e| fail(label, e.to_string()))?
                .map_err(|e| fail(label, format!("taking the step's files off its disk: {e}")))?;
            drop_runtime_files(writer.dir());
            writer.commit(&id).map_err(|e| fail(label, e.to_string()))?;
            self.built += 1;
        }
        let empty = std::fs::read_dir(store.path(&id))
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            state.layers.push(key.clone());
        }
        state.key = key;
        Ok(())
    }

    fn lowers(&self, layers: &[String]) -> Result<Vec<PathBuf>, BuildFailure> {
        if layers.is_empty() {
            // overlayfs needs a lower dir: an empty one for FROM scratch.
            let empty = self.scratch.path().join("empty");
            std::fs::create_dir_all(&empty).map_err(|e| fail(None, e.to_string()))?;
            return Ok(vec![empty]);
        }
        self.node
            .inner
            .templates
            .layer_dirs(layers)
            .map_err(|e| fail(None, e.to_string()))
    }

    async fn run_step(
        &mut self,
        state: &mut State,
        n: &str,
        step: &Step,
        command: &Command,
        user: Option<&str>,
        args: &[(String, String)],
    ) -> Result<(), BuildFailure> {
        // A shell-form command carries the SHELL in effect where it was
        // written (E2B steps: bash -l -c).
        let argv = command.argv();
        let user = user.map_or_else(|| state.effective_user(), str::to_string);
        let shown = shell_join(&argv);
        self.log.info(Some(n), format!("RUN {shown}"));
        let mut cfg = state.config.clone();
        cfg.user = Some(user.clone());
        let key = arca_template::cache::step_key(&state.key, step, &cfg, None);
        let mut env = state.config.env.clone();
        for (k, v) in args {
            if !env.iter().any(|(ek, _)| ek == k) {
                env.push((k.clone(), v.clone()));
            }
        }
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        let work = Work::Run {
            user: user.split(':').next().unwrap_or(&user).to_string(),
            argv,
            env,
            cwd: state.config.workdir.clone(),
            shown,
        };
        self.layer_step(state, n, key, work).await
    }

    /// Does a step's work in its build sandbox.
    async fn work(&self, step: &str, booted: &Booted, work: Work) -> Result<(), BuildFailure> {
        let label = Some(step);
        match work {
            Work::Run {
                user,
                argv,
                env,
                cwd,
                shown,
            } => {
                let ip = booted
                    .sandbox_ip()
                    .ok_or_else(|| fail(label, "the build sandbox has no address"))?;
                let sink = &self.log.sink;
                let code = self
                    .node
                    .inner
                    .envd
                    .run(
                        ip,
                        None,
                        &RunCommand {
                            user: &user,
                            argv: &argv,
                            env: &env,
                            cwd: cwd.as_deref(),
                            timeout: RUN_STEP_LIMIT,
                        },
                        |_: Stream, line: &str| {
                            let _ = sink.send(BuildLog {
                                timestamp: Utc::now(),
                                level: BuildLogLevel::Info,
                                step: Some(step.to_string()),
                                message: line.to_string(),
                            });
                        },
                    )
                    .await
                    .map_err(|e| fail(label, format!("RUN {shown}: {e}")))?;
                if code == 0 {
                    Ok(())
                } else {
                    Err(fail(
                        label,
                        format!("step {step} failed: RUN {shown} exited with code {code}"),
                    ))
                }
            }
            Work::Apply {
                chown,
                chmod,
                ensure_user,
                items,
            } => {
                let opts = ApplyOptions {
                    pid: booted.pid,
                    chown,
                    chmod,
                    ensure_user,
                    ..ApplyOptions::default()
                };
                let tar = tar_of(&items).map_err(|e| fail(label, e.message))?;
                let exe = self.node.inner.config.init_exe.clone();
                tokio::task::spawn_blocking(move || arca_runtime::apply(&exe, &opts, tar))
                    .await
                    .map_err(|e| fail(label, e.to_string()))?
                    .map_err(|e| fail(label, e.to_string()))
            }
        }
    }

    async fn workdir(&mut self, state: &mut State, n: &str, dir: &str) -> Result<(), BuildFailure> {
        self.log.info(Some(n), format!("WORKDIR {dir}"));
        let owner = state
            .config
            .user
            .clone()
            .filter(|u| u != "root" && u != "0");
        let key = sha(&[
            &state.key,
            "workdir-v1",
            dir,
            owner.as_deref().unwrap_or(""),
        ]);
        let work = Work::Apply {
            chown: owner,
            chmod: None,
            ensure_user: false,
            items: vec![TarItem::Dir {
                path: dir.to_string(),
                mode: 0o755,
            }],
        };
        self.layer_step(state, n, key, work).await
    }

    /// Unpacks an uploaded archive (once per build).
    fn context(&mut self, hash: &str, step: Option<&str>) -> Result<PathBuf, BuildFailure> {
        if let Some(p) = self.contexts.get(hash) {
            return Ok(p.clone());
        }
        // Each team's uploads are its own (the api keeps them apart).
        let archive = arca_proto::build::upload_path(
            &self.node.inner.config.uploads_dir,
            &self.spec.team_id,
            hash,
        )
        .ok_or_else(|| {
            fail(
                step,
                format!(
                    "invalid files hash '{hash}' (or team id '{}')",
                    self.spec.team_id
                ),
            )
        })?;
        if !archive.is_file() {
            return Err(fail(
                step,
                format!(
                    "the files of hash {hash} were never uploaded; upload them and build again"
                ),
            ));
        }
        let dest = self.scratch.path().join(format!("ctx-{hash}"));
        std::fs::create_dir_all(&dest).map_err(|e| fail(step, e.to_string()))?;
        arca_template::context::unpack_upload(&archive, &dest)
            .map_err(|e| fail(step, format!("unpacking the uploaded files: {e}")))?;
        self.contexts.insert(hash.to_string(), dest.clone());
        Ok(dest)
    }

    #[allow(clippy::too_many_arguments)]
    async fn copy_step(
        &mut self,
        state: &mut State,
        n: &str,
        step: &Step,
        copy: &CopySpec,
        earlier: &[State],
        context: Option<&Path>,
        is_add: bool,
    ) -> Result<(), BuildFailure> {
        let label = Some(n);
        let verb = if is_add { "ADD" } else { "COPY" };
        if let Some(CopyFrom::Stage(i)) = &copy.from {
            let Some(source) = earlier.get(*i).cloned() else {
                return Err(fail(label, format!("{verb} --from: no stage {i}")));
            };
            let fut: SendFuture<'_> =
                Box::pin(self.copy_from_stage(state, n, step, copy, &source, verb));
            return fut.await;
        }
        let (ctx, owner_default) = match &copy.from {
            None => (
                context.map(Path::to_path_buf).ok_or_else(|| {
                    fail(
                        label,
                        format!(
                            "{verb} needs a build context and this build has none; \
                             build with `arca template build PATH` or use RUN"
                        ),
                    )
                })?,
                None,
            ),
            Some(CopyFrom::Files(hash)) => (self.context(hash, label)?, state.config.user.clone()),
            Some(CopyFrom::Stage(_)) => unreachable_stage()?,
            Some(CopyFrom::Image(image)) => {
                return Err(fail(
                    label,
                    format!(
                        "{verb} --from={image}: copying from an image is not supported yet; \
                         add a stage `FROM {image} AS src` and use --from=src"
                    ),
                ));
            }
        };
        if is_add {
            for s in &copy.sources {
                if let arca_template::Source::Path(p) = s {
                    if p.contains("://") {
                        return Err(fail(
                            label,
                            format!("ADD of a URL ({p}) is not supported; use RUN curl -o ..."),
                        ));
                    }
                    if is_archive_name(p) {
                        return Err(fail(
                            label,
                            format!(
                                "ADD of an archive ({p}) is not supported yet; \
                                 COPY it and RUN tar -x"
                            ),
                        ));
                    }
                }
            }
        }
        let ignore = match std::fs::read_to_string(ctx.join(".dockerignore")) {
            Ok(text) if copy.from.is_none() => {
                arca_template::context::DockerIgnore::parse(&text)
                    .map_err(|e| fail(label, format!(".dockerignore: {e}")))?
            }
            _ => arca_template::context::DockerIgnore::default(),
        };
        let workdir = state.config.workdir.clone().unwrap_or_else(|| "/".into());
        let plan = arca_template::context::resolve_copy(&ctx, copy, &workdir, &ignore)
            .map_err(|e| fail(label, format!("{verb}: {e}")))?;
        let chmod = match &copy.chmod {
            Some(m) => Some(
                arca_template::context::parse_chmod(m)
                    .map_err(|e| fail(label, format!("{verb} --chmod: {e}")))?,
            ),
            None => None,
        };
        let chown = copy.chown.clone().or(owner_default);
        self.log.info(
            label,
            format!("{verb} {} entries to {}", plan.entries.len(), copy.dest),
        );
        let mut cfg = state.config.clone();
        cfg.user = chown.clone();
        let key = arca_template::cache::step_key(&state.key, step, &cfg, Some(&plan.content_hash));
        let work = Work::Apply {
            chown,
            chmod,
            ensure_user: false,
            items: copy_items(&plan),
        };
        self.layer_step(state, n, key, work).await
    }

    /// `COPY --from=<stage>`: the sources are taken out of a sandbox of
    /// that stage (only on a cache miss: the stage's key stands for its
    /// content) and copied as from a context.
    async fn copy_from_stage(
        &mut self,
        state: &mut State,
        n: &str,
        step: &Step,
        copy: &CopySpec,
        source: &State,
        verb: &str,
    ) -> Result<(), BuildFailure> {
        let label = Some(n);
        let chmod = match &copy.chmod {
            Some(m) => Some(
                arca_template::context::parse_chmod(m)
                    .map_err(|e| fail(label, format!("{verb} --chmod: {e}")))?,
            ),
            None => None,
        };
        let mut cfg = state.config.clone();
        cfg.user.clone_from(&copy.chown);
        let inputs = sha(&["stage", &source.key]);
        let key = arca_template::cache::step_key(&state.key, step, &cfg, Some(&inputs));
        self.pin(std::slice::from_ref(&key));
        let store = self.node.inner.templates.layers();
        let cached = !self.forcing && layer_id(&key).is_ok_and(|id| store.contains(&id));
        let items = if cached {
            Vec::new()
        } else {
            let ctx = self.extract_from(source, copy, n).await?;
            let mut local = copy.clone();
            local.from = None;
            let workdir = state.config.workdir.clone().unwrap_or_else(|| "/".into());
            let plan = arca_template::context::resolve_copy(
                &ctx,
                &local,
                &workdir,
                &arca_template::context::DockerIgnore::default(),
            )
            .map_err(|e| fail(label, format!("{verb} --from: {e}")))?;
            self.log.info(
                label,
                format!(
                    "{verb} {} entries from a stage to {}",
                    plan.entries.len(),
                    copy.dest
                ),
            );
            copy_items(&plan)
        };
        let work = Work::Apply {
            chown: copy.chown.clone(),
            chmod,
            ensure_user: false,
            items,
        };
        self.layer_step(state, n, key, work).await
    }

    /// Archives the directories holding `copy`'s sources out of a sandbox
    /// of `source` and unpacks them into a scratch context.
    async fn extract_from(
        &mut self,
        source: &State,
        copy: &CopySpec,
        n: &str,
    ) -> Result<PathBuf, BuildFailure> {
        let label = Some(n);
        // The part of each source before its first wildcard.
        let mut roots = Vec::new();
        for s in &copy.sources {
            if let arca_template::Source::Path(p) = s {
                let mut root = String::from("/");
                for part in p.split('/').filter(|c| !c.is_empty()) {
                    if part.contains(['*', '?', '[']) {
                        break;
                    }
                    if !root.ends_with('/') {
                        root.push('/');
                    }
                    root.push_str(part);
                }
                roots.push(root);
            }
        }
        let dir = self
            .scratch
            .path()
            .join(format!("from-{}", random_suffix()));
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(|e| fail(label, e.to_string()))?;
        }
        let plan = BootPlan {
            runtime: Runtime::Ns,
            egress: None,
            resume: None,
            lowers: self.lowers(&source.layers)?,
            upper: Upper::Dir { upper, work },
            limits: None,
            template: None,
        };
        let booted = self
            .node
            .boot(format!("b{}", random_suffix()), plan)
            .await
            .map_err(|e| {
                fail(
                    label,
                    format!("starting a sandbox of the source stage: {e}"),
                )
            })?;
        let archive = dir.join("files.tar");
        let opts = ApplyOptions {
            pid: booted.pid,
            extract: roots,
            extract_to: Some(archive.clone()),
            ..ApplyOptions::default()
        };
        let exe = self.node.inner.config.init_exe.clone();
        let result = tokio::task::spawn_blocking(move || {
            arca_runtime::apply(&exe, &opts, std::process::Stdio::null())
        })
        .await;
        booted.shutdown().await;
        result
            .map_err(|e| fail(label, e.to_string()))?
            .map_err(|e| fail(label, format!("reading the source stage: {e}")))?;
        let ctx = dir.join("ctx");
        arca_template::context::unpack_upload(&archive, &ctx)
            .map_err(|e| fail(label, format!("unpacking the source stage's files: {e}")))?;
        Ok(ctx)
    }

    /// Starts a sandbox of the finished build and runs its start and ready
    /// commands, so a template whose start fails is never registered.
    async fn check_start(&mut self, build: &TemplateBuild) -> Result<(), BuildFailure> {
        let step = Some("finalize");
        let store = &self.node.inner.templates;
        let lowers = store
            .lower_dirs(build)
            .map_err(|e| fail(step, e.to_string()))?;
        self.pin(&build.layers);
        let plan = BootPlan {
            runtime: Runtime::Ns,
            egress: None,
            resume: None,
            lowers,
            upper: Upper::Disk(self.spec.disk_size_mb.max(512)),
            limits: None,
            template: None,
        };
        let booted = self
            .node
            .boot(format!("b{}", random_suffix()), plan)
            .await
            .map_err(|e| fail(step, format!("starting a sandbox of the template: {e}")))?;
        let Some(ip) = booted.sandbox_ip() else {
            booted.shutdown().await;
            return Err(fail(step, "the sandbox has no address"));
        };
        let sink = self.log.sink.clone();
        let log = move |line: &str| {
            let _ = sink.send(BuildLog {
                timestamp: Utc::now(),
                level: BuildLogLevel::Info,
                step: Some("finalize".into()),
                message: line.to_string(),
            });
        };
        let result = self.node.check_template_start(ip, build, &log).await;
        booted.shutdown().await;
        result.map_err(|e| fail(step, e))
    }
}

/// The work of a step that makes a layer.
enum Work {
    /// A command through envd.
    Run {
        user: String,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        /// The command as logs show it.
        shown: String,
    },
    /// Files written by `arca __apply`.
    Apply {
        chown: Option<String>,
        chmod: Option<u32>,
        ensure_user: bool,
        items: Vec<TarItem>,
    },
}

/// A boxed step future, `Send` by declaration: nested async calls with
/// borrowed arguments otherwise defeat the compiler's `Send` proof.
type SendFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BuildFailure>> + Send + 'a>>;

/// `COPY --from=<stage>` is handled before the match it would be in.
fn unreachable_stage() -> Result<(PathBuf, Option<String>), BuildFailure> {
    Err(fail(
        None,
        "internal: COPY --from a stage reached the context path",
    ))
}

/// Removes [`RUNTIME_FILES`] from a finished layer. The layer was written
/// by the sandbox: `etc` may be a symlink to anywhere, so nothing is
/// followed (the sandbox is gone, so nothing changes meanwhile).
pub(crate) fn drop_runtime_files(layer: &Path) {
    let etc = layer.join("etc");
    if !std::fs::symlink_metadata(&etc).is_ok_and(|m| m.file_type().is_dir()) {
        return;
    }
    for f in RUNTIME_FILES {
        let p = etc.join(f);
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_file()) {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Whether a registry `host[:port]` names this host or a private network:
/// builds run on the host's network, so a tenant's FROM must not reach
/// services there unless the operator allowed the registry.
fn is_host_internal(host_port: &str) -> bool {
    let host = match host_port.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host_port.rsplit_once(':').map_or(host_port, |(h, _)| h),
    };
    if host.eq_ignore_ascii_case("localhost") || host.ends_with(".localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| any_internal(std::iter::once(ip)))
}

/// Whether any of `ips` is loopback, private, link-local, shared (CGNAT),
/// unspecified or broadcast (IPv4-mapped IPv6 addresses as IPv4).
fn any_internal(ips: impl IntoIterator<Item = std::net::IpAddr>) -> bool {
    ips.into_iter().any(|ip| {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        };
        match ip {
            std::net::IpAddr::V4(ip) => {
                ip.is_loopback()
                    || ip.is_private()
                    || ip.is_link_local()
                    || ip.is_unspecified()
                    || ip.is_broadcast()
                    || ip.octets()[0] == 100 && (64..128).contains(&ip.octets()[1])
            }
            std::net::IpAddr::V6(ip) => {
                ip.is_loopback()
                    || ip.is_unspecified()
                    || (ip.segments()[0] & 0xfe00) == 0xfc00
                    || (ip.segments()[0] & 0xffc0) == 0xfe80
            }
        }
    })
}

/// The cache key of a template build as a base: its content, not its name.
fn build_key(b: &TemplateBuild) -> String {
    let mut parts: Vec<&str> = vec!["template-v1"];
    parts.extend(b.layers.iter().map(String::as_str));
    let config = serde_json::to_string(&(&b.env, &b.workdir, &b.user)).unwrap_or_default();
    parts.push(&config);
    sha(&parts)
}

/// What goes into an `__apply` tar stream.
enum TarItem {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        src: FileSource,
    },
    Symlink {
        path: String,
        target: String,
    },
}

enum FileSource {
    Host(PathBuf),
    Inline(Vec<u8>),
}

fn copy_items(plan: &arca_template::context::CopyPlan) -> Vec<TarItem> {
    use arca_template::context::EntryKind;
    plan.entries
        .iter()
        .map(|e| match &e.kind {
            EntryKind::Dir => TarItem::Dir {
                path: e.dest.clone(),
                mode: e.mode,
            },
            EntryKind::File => TarItem::File {
                path: e.dest.clone(),
                mode: e.mode,
                src: FileSource::Host(e.src.clone()),
            },
            EntryKind::Inline(content) => TarItem::File {
                path: e.dest.clone(),
                mode: e.mode,
                src: FileSource::Inline(content.clone()),
            },
            EntryKind::Symlink(target) => TarItem::Symlink {
                path: e.dest.clone(),
                target: target.display().to_string(),
            },
        })
        .collect()
}

/// Writes a tar stream for `__apply` into an unlinked temporary file.
fn tar_of(items: &[TarItem]) -> Result<std::fs::File, BuildFailure> {
    let err = |e: std::io::Error| fail(None, format!("preparing files: {e}"));
    let file = tempfile::tempfile().map_err(err)?;
    let mut builder = tar::Builder::new(file);
    builder.mode(tar::HeaderMode::Deterministic);
    for item in items {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        match item {
            // The root always exists; tar cannot name it.
            TarItem::Dir { path, .. } if path.trim_matches('/').is_empty() => {}
            TarItem::Dir { path, mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                builder
                    .append_data(&mut h, path.trim_start_matches('/'), std::io::empty())
                    .map_err(err)?;
            }
            TarItem::Symlink { path, target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                builder
                    .append_link(&mut h, path.trim_start_matches('/'), target)
                    .map_err(err)?;
            }
            TarItem::File { path, mode, src } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                match src {
                    FileSource::Host(p) => {
                        let f = std::fs::File::open(p)
                            .map_err(|e| fail(None, format!("{}: {e}", p.display())))?;
                        let len = f.metadata().map_err(err)?.len();
                        h.set_size(len);
                        builder
                            .append_data(&mut h, path.trim_start_matches('/'), f)
                            .map_err(err)?;
                    }
                    FileSource::Inline(data) => {
                        h.set_size(data.len() as u64);
                        builder
                            .append_data(&mut h, path.trim_start_matches('/'), data.as_slice())
                            .map_err(err)?;
                    }
                }
            }
        }
    }
    let mut file = builder.into_inner().map_err(err)?;
    file.flush().map_err(err)?;
    use std::io::Seek as _;
    file.rewind().map_err(err)?;
    Ok(file)
}

fn registry_credentials(
    auth: &arca_proto::build::RegistryAuth,
) -> Result<arca_image::registry::Credentials, String> {
    use arca_proto::build::RegistryAuth;
    match auth {
        RegistryAuth::Registry { username, password } => Ok(arca_image::registry::Credentials {
            username: username.clone(),
            password: password.clone(),
        }),
        RegistryAuth::Gcp {
            service_account_json,
        } => Ok(arca_image::registry::Credentials {
            username: "_json_key".into(),
            password: service_account_json.clone(),
        }),
        RegistryAuth::Aws { .. } => Err("AWS ECR credentials are not supported by Arca; \
             get a token with `aws ecr get-login-password` and pass it as a registry password"
            .into()),
    }
}

/// Expands `$NAME` and `${NAME}` from `env` (unknown names expand to
/// nothing, as in a shell); `\$` keeps a literal `$`.
fn expand_vars(value: &str, env: &[(String, String)]) -> String {
    let lookup = |name: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| (name == "PATH").then(|| DEFAULT_PATH.to_string()))
            .unwrap_or_default()
    };
    let mut out = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'$') => {
                out.push('$');
                chars.next();
            }
            '$' if chars.peek() == Some(&'{') => {
                chars.next();
                let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                out.push_str(&lookup(&name));
            }
            '$' if chars
                .peek()
                .is_some_and(|c| c.is_ascii_alphabetic() || *c == '_') =>
            {
                let mut name = String::new();
                while let Some(c) = chars.peek().copied() {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        name.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push_str(&lookup(&name));
            }
            c => out.push(c),
        }
    }
    out
}

fn describe_pull(p: &arca_image::registry::PullProgress) -> String {
    use arca_image::registry::PullProgress as P;
    let short = |d: &str| {
        d.trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect::<String>()
    };
    match p {
        P::Resolved {
            reference,
            manifest_digest,
            layers,
            total_bytes,
        } => format!(
            "{reference}: {layers} layers, {} MiB ({})",
            total_bytes.div_ceil(1 << 20),
            short(manifest_digest)
        ),
        P::LayerCached { digest } => format!("layer {} cached", short(digest)),
        P::Downloading {
            digest,
            downloaded,
            total,
        } => format!(
            "layer {}: {} of {} MiB",
            short(digest),
            downloaded >> 20,
            total.div_ceil(1 << 20)
        ),
        P::Unpacking { digest } => format!("layer {}: unpacking", short(digest)),
        P::LayerDone { digest, bytes } => {
            format!("layer {}: {} MiB unpacked", short(digest), bytes >> 20)
        }
        _ => format!("{p:?}"),
    }
}

fn is_archive_name(p: &str) -> bool {
    [".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst"]
        .iter()
        .any(|s| p.ends_with(s))
}

fn describe_pairs(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A command line for logs and for a shell: words with spaces or quotes
/// are single-quoted.
fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_are_quoted_for_a_shell() {
        let argv = ["python3", "-c", "print('hi there')"].map(String::from);
        assert_eq!(shell_join(&argv), r#"python3 -c 'print('\''hi there'\'')'"#);
    }

    #[test]
    fn e2b_env_values_expand_against_the_environment_so_far() {
        let env = vec![("HOME".to_string(), "/home/user".to_string())];
        assert_eq!(
            expand_vars("$HOME/bin:${HOME}/x", &env),
            "/home/user/bin:/home/user/x"
        );
        assert!(expand_vars("$PATH:/opt", &env).ends_with(":/bin:/opt"));
        assert_eq!(expand_vars("\\$HOME $NOPE.", &env), "$HOME .");
        assert_eq!(expand_vars("50$", &env), "50$");
    }

    #[test]
    fn registries_on_this_host_or_private_networks_are_internal() {
        for h in [
            "127.0.0.1:5000",
            "localhost:5000",
            "10.1.2.3",
            "192.168.0.1:443",
            "169.254.169.254",
            "[::1]:5000",
            "100.64.0.1",
        ] {
            assert!(is_host_internal(h), "{h}");
        }
        for h in [
            "ghcr.io",
            "registry-1.docker.io:443",
            "8.8.8.8",
            "quay.io:443",
        ] {
            assert!(!is_host_internal(h), "{h}");
        }
        // What a name resolves to: one internal address is enough.
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(any_internal([ip("8.8.8.8"), ip("10.0.0.5")]));
        assert!(any_internal([ip("::ffff:127.0.0.1")]));
        assert!(!any_internal([ip("8.8.8.8"), ip("2606:4700::1111")]));
    }

    #[test]
    fn keys_depend_on_every_part() {
        assert_ne!(sha(&["a", "bc"]), sha(&["ab", "c"]));
        assert_eq!(sha(&["x"]), sha(&["x"]));
    }
}
