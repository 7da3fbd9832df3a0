//! Fork and snapshot: both start from a copy of a sandbox's disk taken at
//! one moment. The source is frozen for the copy (so no process writes
//! half-way through it), its file system is synced through its root, the
//! disk image is copied sparsely, and the source goes on as it was.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arca_proto::node::{NodeError, SandboxId, SandboxSpec, SandboxStatus};
use chrono::Utc;

use crate::templates::{TemplateBuild, layer_id};
use crate::{Booting, Instance, Node, Upper, disk, lock, sandboxes_dir};

impl Node {
    /// Copies the disk of `inst` into `dest` as it is at one moment: a
    /// running sandbox is frozen for the copy and thawed after, a paused
    /// one stays as it is. Holds the sandbox's transition lock.
    async fn copy_disk(&self, inst: &Arc<Instance>, dest: PathBuf) -> Result<(), NodeError> {
        let _t = inst.transition.lock().await;
        let id = inst.spec.sandbox_id.clone();
        if !lock(&self.inner.sandboxes).contains_key(&id) {
            return Err(NodeError::SandboxNotFound(id));
        }
        let freeze = !inst.is_paused();
        let (cgroup, pid) = (inst.cgroup(), inst.init_pid().map(|p| p.0));
        let image = inst.dir.join("disk.img");
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let frozen = match (&cgroup, freeze) {
                (Some(cg), true) => {
                    cg.set_frozen(true)
                        .map_err(|e| format!("freezing the sandbox: {e}"))?;
                    Some(cg)
                }
                _ => None,
            };
            let copied = sync_root(pid).and_then(|()| {
                disk::sparse_copy(&image, &dest).map_err(|e| format!("copying its disk: {e}"))
            });
            if let Some(cg) = frozen {
                if let Err(e) = cg.set_frozen(false) {
                    // Left frozen it would hang every client: say so loudly.
                    tracing::error!(error = %e, "cannot thaw a sandbox after copying its disk");
                    return Err(format!("thawing the sandbox: {e}"));
                }
            }
            if copied.is_err() {
                let _ = std::fs::remove_file(&dest);
            }
            copied
        })
        .await
        .map_err(|e| NodeError::Internal(e.to_string()))?
        .map_err(|e| NodeError::Internal(format!("sandbox {id}: {e}")))
    }

    /// Starts one sandbox per spec from a copy of `source`'s files.
    pub(crate) async fn fork_sandbox(
        &self,
        source: &SandboxId,
        specs: Vec<SandboxSpec>,
    ) -> Result<Vec<Result<SandboxStatus, NodeError>>, NodeError> {
        let inst = self.instance(source)?;
        let build = self.build_of(&inst)?;
        // Every fork runs what its source runs, with its settings.
        let specs: Vec<SandboxSpec> = specs
            .into_iter()
            .map(|mut s| {
                s.template_id.clone_from(&inst.spec.template_id);
                s.build_id.clone_from(&inst.spec.build_id);
                s.env_vars.clone_from(&inst.spec.env_vars);
                s.cpu_count = inst.spec.cpu_count;
                s.memory_mb = inst.spec.memory_mb;
                s.disk_size_mb = inst.spec.disk_size_mb;
                s
            })
            .collect();
        let _booting = Booting::new(&self.inner, &inst.spec.template_id, &inst.spec.build_id);
        // Claim the ids before touching any directory.
        let mut claimed: Vec<Option<SandboxId>> = Vec::with_capacity(specs.len());
        for s in &specs {
            let id = s.sandbox_id.clone();
            let free = !lock(&self.inner.sandboxes).contains_key(&id)
                && lock(&self.inner.creating).insert(id.clone());
            claimed.push(free.then_some(id));
        }
        let result = self.fork_claimed(&inst, &build, specs, &claimed).await;
        for id in claimed.into_iter().flatten() {
            lock(&self.inner.creating).remove(&id);
        }
        result
    }

    async fn fork_claimed(
        &self,
        inst: &Arc<Instance>,
        build: &Arc<TemplateBuild>,
        specs: Vec<SandboxSpec>,
        claimed: &[Option<SandboxId>],
    ) -> Result<Vec<Result<SandboxStatus, NodeError>>, NodeError> {
        let home = sandboxes_dir(&self.inner.config.home);
        let mut images: Vec<Result<PathBuf, NodeError>> = Vec::with_capacity(specs.len());
        let mut first: Option<PathBuf> = None;
        for (s, claim) in specs.iter().zip(claimed) {
            if claim.is_none() {
                images.push(Err(NodeError::Conflict(format!(
                    "sandbox {} already exists",
                    s.sandbox_id
                ))));
                continue;
            }
            let dir = home.join(s.sandbox_id.as_str());
            let image = dir.join("disk.img");
            let made = match std::fs::create_dir_all(&dir) {
                Err(e) => Err(NodeError::Internal(format!(
                    "creating {}: {e}",
                    dir.display()
                ))),
                Ok(()) => match &first {
                    // One copy of the source; the others copy that copy.
                    None => self.copy_disk(inst, image.clone()).await,
                    Some(from) => {
                        let (from, to) = (from.clone(), image.clone());
                        tokio::task::spawn_blocking(move || disk::sparse_copy(&from, &to))
                            .await
                            .map_err(|e| NodeError::Internal(e.to_string()))?
                            .map_err(|e| NodeError::Internal(format!("copying a disk: {e}")))
                    }
                },
            };
            match made {
                Ok(()) => {
                    first.get_or_insert_with(|| image.clone());
                    images.push(Ok(image));
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    // The source itself is gone: nothing can be forked.
                    if first.is_none() && matches!(e, NodeError::SandboxNotFound(_)) {
                        for done in images.iter().flatten() {
                            if let Some(d) = done.parent() {
                                let _ = std::fs::remove_dir_all(d);
                            }
                        }
                        return Err(e);
                    }
                    images.push(Err(e));
                }
            }
        }
        let boots = specs
            .into_iter()
            .zip(images)
            .map(|(spec, image)| async move {
                let image = image?;
                let mut plan = self.sandbox_plan(build.clone(), spec.disk_size_mb)?;
                plan.upper = Upper::Existing {
                    mb: spec.disk_size_mb,
                    image,
                };
                let booted = self.boot(spec.sandbox_id.to_string(), plan).await?;
                self.activate(booted, spec).await
            });
        let results = futures_util::future::join_all(boots).await;
        // A fork that failed before booting leaves its directory behind.
        for (r, claim) in results.iter().zip(claimed) {
            if let (Err(_), Some(id)) = (r, claim) {
                if !lock(&self.inner.sandboxes).contains_key(id) {
                    let _ = std::fs::remove_dir_all(home.join(id.as_str()));
                }
            }
        }
        Ok(results)
    }

    /// Registers build `build_id` of template `template_id`: the source's
    /// build plus a layer holding the source's files as they are now.
    pub(crate) async fn snapshot_sandbox(
        &self,
        source: &SandboxId,
        template_id: &str,
        build_id: &str,
    ) -> Result<(), NodeError> {
        let inst = self.instance(source)?;
        let parent = self.build_of(&inst)?;
        // The parent build's layers stay while the copy is made, even if
        // the source ends and its template is deleted meanwhile.
        let _booting = Booting::new(&self.inner, &parent.template_id, &parent.build_id);
        // Layer ids are lowercase letters, digits and dashes.
        let key: String = format!("snapshot-{template_id}-{build_id}")
            .chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_lowercase() || c.is_ascii_digit() {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let id = layer_id(&key).map_err(|e| NodeError::InvalidInput(e.to_string()))?;
        let internal = |e: &dyn std::fmt::Display| NodeError::Internal(e.to_string());
        let store = self.inner.templates.layers();
        if store.contains(&id) || self.inner.templates.get(template_id, build_id).is_some() {
            return Err(NodeError::Conflict(format!(
                "template {template_id} already has build {build_id}"
            )));
        }
        let writer = store.begin().map_err(|e| internal(&e))?;
        let image = writer.scratch_path("disk.img");
        self.copy_disk(&inst, image.clone()).await?;
        // The new layer is unreferenced until its record is saved: keep it
        // from a concurrent clean-up.
        let _pin = Pin::new(self, &key);
        let (mnt, dest) = (writer.scratch_path("mnt"), writer.dir().to_path_buf());
        tokio::task::spawn_blocking(move || {
            disk::copy_upper_out(&image, &mnt, &dest)?;
            let _ = std::fs::remove_file(&image);
            crate::build::drop_runtime_files(&dest);
            Ok::<(), std::io::Error>(())
        })
        .await
        .map_err(|e| internal(&e))?
        .map_err(|e| NodeError::Internal(format!("taking the files off the copy: {e}")))?;
        let empty = std::fs::read_dir(writer.dir())
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        let mut layers = parent.layers.clone();
        if empty {
            drop(writer);
        } else {
            writer.commit(&id).map_err(|e| internal(&e))?;
            layers.push(key.clone());
        }
        // The sandbox's own environment becomes the snapshot's defaults.
        let mut env = parent.env.clone();
        for (k, v) in &inst.spec.env_vars {
            env.retain(|(name, _)| name != k);
            env.push((k.clone(), v.clone()));
        }
        let build = TemplateBuild {
            template_id: template_id.to_string(),
            build_id: build_id.to_string(),
            layers,
            env,
            workdir: parent.workdir.clone(),
            user: parent.user.clone(),
            start_cmd: parent.start_cmd.clone(),
            ready_cmd: parent.ready_cmd.clone(),
            created_at: Utc::now(),
        };
        self.inner
            .templates
            .save(&build)
            .map_err(|e| internal(&e))?;
        inst.log("info", format!("snapshot taken as {template_id}"));
        Ok(())
    }

    /// The template build a sandbox runs (also one deleted since).
    fn build_of(&self, inst: &Instance) -> Result<Arc<TemplateBuild>, NodeError> {
        let spec = &inst.spec;
        self.inner
            .templates
            .get_in_use(&spec.template_id, &spec.build_id)
            .map(Arc::new)
            .ok_or_else(|| {
                NodeError::TemplateNotFound(format!(
                    "{} (build {}), which sandbox {} was made from",
                    spec.template_id, spec.build_id, spec.sandbox_id
                ))
            })
    }
}

/// Flushes a sandbox's writes to its disk through its root (overlayfs
/// syncs its upper file system): the image file then holds them all.
fn sync_root(pid: Option<i32>) -> Result<(), String> {
    let Some(pid) = pid else {
        // Paused to disk: the disk was unmounted, nothing is pending.
        return Ok(());
    };
    let root = std::fs::File::open(Path::new(&format!("/proc/{pid}/root")))
        .map_err(|e| format!("opening the sandbox's root: {e}"))?;
    nix::unistd::syncfs(&root).map_err(|e| format!("syncing the sandbox's files: {e}"))
}

/// A layer kept from garbage collection while it lives.
struct Pin<'a> {
    node: &'a Node,
    key: String,
}

impl<'a> Pin<'a> {
    fn new(node: &'a Node, key: &str) -> Pin<'a> {
        lock(&node.inner.pinned).push(key.to_string());
        Pin {
            node,
            key: key.to_string(),
        }
    }
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        let mut pinned = lock(&self.node.inner.pinned);
        if let Some(i) = pinned.iter().position(|p| *p == self.key) {
            pinned.swap_remove(i);
        }
    }
}

impl Node {
    /// Brings a checkpointed sandbox back with CRIU (see `criu.rs`): a new
    /// slot and cgroup, its root mounted again, its processes and memory
    /// restored. The state file records the pid and slot as they are made,
    /// so a crash half-way leaves the sandbox paused. The images go once
    /// it runs.
    pub(crate) async fn restore_checkpoint(&self, inst: &Arc<Instance>) -> Result<(), NodeError> {
        let internal = |what: &str, e: &dyn std::fmt::Display| {
            NodeError::Internal(format!(
                "restoring sandbox {}: {what}: {e}",
                inst.spec.sandbox_id
            ))
        };
        let criu = self
            .inner
            .criu
            .clone()
            .ok_or_else(|| internal("CRIU", &"no usable criu on this node any more"))?;
        let build = self.build_of(inst)?;
        let name = inst
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| internal("sandbox directory", &"no name"))?;
        let image = inst.dir.join("disk.img");
        let img = image.clone();
        let released = tokio::task::spawn_blocking(move || {
            disk::wait_released(&img, crate::DISK_RELEASED_WITHIN)
        })
        .await
        .map_err(|e| internal("disk task", &e))?;
        if !released {
            return Err(internal("disk", &"still held by its last run; try again"));
        }
        let lowers = self
            .inner
            .templates
            .lower_dirs(&build)
            .map_err(|e| internal("template layers", &e))?;
        let mut st = crate::state::StateFile::load(&inst.dir).map_err(|e| internal("state", &e))?;
        let slot = self
            .inner
            .slots
            .acquire()
            .await
            .map_err(|e| NodeError::Capacity(format!("no network slot: {e}")))?;
        st.slot_index = Some(slot.index);
        let _ = st.save(&inst.dir);
        let limits = arca_runtime::cgroup::Limits {
            cpus: inst.spec.cpu_count,
            memory_mib: u64::from(inst.spec.memory_mb),
            pids: self.inner.config.pids_limit,
        };
        let cgroup = match self.inner.layout.create(&name, limits) {
            Ok(c) => c,
            Err(e) => {
                self.inner.slots.release(slot);
                return Err(internal("cgroup", &e));
            }
        };
        let images = inst.dir.join(crate::CHECKPOINT_DIR);
        let (hook, pidfile) = (images.join("net-hook.sh"), images.join("restored.pid"));
        let prepared = (|| -> std::io::Result<()> {
            use std::os::unix::fs::PermissionsExt as _;
            let script = self
                .inner
                .slots
                .attach_script(&slot)
                .ok_or_else(|| std::io::Error::other("the slot has no addresses"))?;
            std::fs::write(&hook, script)?;
            std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o700))?;
            let _ = std::fs::remove_file(&pidfile);
            Ok(())
        })();
        let (root, disk_dir) = (inst.dir.join("root"), inst.dir.join("disk"));
        let cfg = arca_runtime::RestoreConfig {
            init: arca_runtime::InitConfig {
                sandbox_id: inst.spec.sandbox_id.to_string(),
                hostname: inst.spec.sandbox_id.to_string(),
                lower_dirs: lowers,
                upper_dir: disk_dir.join("upper"),
                work_dir: disk_dir.join("work"),
                root_dir: root.clone(),
                envd_binary: self.inner.config.envd_binary.clone(),
                envd_args: vec![],
                env: vec![],
                own_netns: true,
                cgroup_dirs: cgroup.dirs().to_vec(),
                id_map: arca_runtime::DEFAULT_ID_MAP,
                boot_id: String::new(),
                no_new_privs: false,
                disk: Some(arca_runtime::DiskSpec {
                    image: image.clone(),
                    mount_point: disk_dir,
                }),
                files: vec![],
            },
            criu: criu.bin().to_path_buf(),
            args: crate::criu::Criu::restore_args(
                &images,
                &root,
                &hook,
                &pidfile,
                &self.inner.layout.criu_cgroup_roots(&name),
            ),
        };
        let exe = self.inner.config.init_exe.clone();
        let restored = match prepared {
            Err(e) => Err(format!("writing the network hook: {e}")),
            Ok(()) => tokio::task::spawn_blocking({
                let images = images.clone();
                let pidfile = pidfile.clone();
                move || run_restore(&exe, &cfg, &images, &pidfile)
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string())),
        };
        let pid = match restored {
            Ok(pid) => pid,
            Err(e) => {
                let (inner, cg) = (self.inner.clone(), cgroup.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    crate::stop_runtime(Some(&cg), 0, Some(slot), &inner.slots);
                    disk::wait_released(&image, crate::DISK_RELEASED_WITHIN);
                })
                .await;
                return Err(internal("criu restore", &e));
            }
        };
        let pid_start = crate::state::process_start(pid).unwrap_or(0);
        st.pid = Some(pid);
        st.pid_start = Some(pid_start);
        let _ = st.save(&inst.dir);
        let sandbox_ip = slot.sandbox_ip;
        let run = crate::Running {
            pid,
            pid_start,
            sandbox_ip,
            netns: slot.netns_path.clone(),
            slot: Some(slot),
            cgroup,
        };
        if let Err(e) = self
            .inner
            .envd
            .wait_ready(sandbox_ip, crate::ENVD_READY_WITHIN)
            .await
        {
            let inner = self.inner.clone();
            let _ = tokio::task::spawn_blocking(move || {
                crate::stop_runtime(Some(&run.cgroup), run.pid, run.slot, &inner.slots);
                disk::wait_released(&image, crate::DISK_RELEASED_WITHIN);
            })
            .await;
            return Err(internal("envd after the restore", &e));
        }
        *lock(&inst.run) = Some(run);
        let _ = std::fs::remove_dir_all(&images);
        Ok(())
    }
}

/// Runs `arca __restore` and returns the restored init's host pid.
/// Blocking.
fn run_restore(
    exe: &Path,
    cfg: &arca_runtime::RestoreConfig,
    images: &Path,
    pidfile: &Path,
) -> Result<i32, String> {
    use std::io::Write as _;
    let json = serde_json::to_vec(cfg).map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(exe)
        .arg("__restore")
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {} __restore: {e}", exe.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&json).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        let log = std::fs::read_to_string(images.join("restore.log")).unwrap_or_default();
        return Err(format!(
            "{} {}",
            String::from_utf8_lossy(&out.stderr).trim(),
            crate::criu::last_lines(&log, 4)
        ));
    }
    std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| "criu restore wrote no pid".to_string())
}
