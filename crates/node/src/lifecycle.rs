//! Fork and snapshot: both start from a copy of a sandbox's disk taken at
//! one moment. The source is frozen for the copy (so no process writes
//! half-way through it), its file system is synced through its root, the
//! disk image is copied sparsely, and the source goes on as it was.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arca_proto::node::{NodeError, SandboxId, SandboxSpec, SandboxStatus};
use chrono::Utc;

use crate::templates::{TemplateBuild, layer_id};
use crate::{Booted, Booting, Instance, Node, Upper, disk, lock, sandboxes_dir};

impl Node {
    /// Copies the disk of `inst` into `dest` as it is at one moment: a
    /// running sandbox is frozen for the copy and thawed after, a paused
    /// one stays as it is. Holds the sandbox's transition lock.
    ///
    /// With `memory` (a directory) and CRIU, the processes and memory of a
    /// sandbox that has them are saved there in the same frozen moment
    /// (`criu dump --leave-running`); the result says whether they were.
    async fn copy_disk(
        &self,
        inst: &Arc<Instance>,
        dest: PathBuf,
        memory: Option<PathBuf>,
    ) -> Result<bool, NodeError> {
        let _t = inst.transition.lock().await;
        let id = inst.spec.sandbox_id.clone();
        if !lock(&self.inner.sandboxes).contains_key(&id) {
            return Err(NodeError::SandboxNotFound(id));
        }
        let freeze = !inst.is_paused();
        if freeze {
            self.flush_guest(inst).await;
        }
        let (cgroup, pid) = (inst.cgroup(), inst.init_pid().map(|p| p.0));
        // A gVisor sandbox's disk is mounted only in its gofer's namespace,
        // not under its init's root: sync every file system instead.
        let sync_all = inst.runtime() == arca_proto::node::Runtime::Gvisor;
        let image = inst.dir.join("disk.img");
        // CRIU saves `ns` sandboxes only (not runsc or QEMU).
        let criu = self
            .inner
            .criu
            .clone()
            .filter(|_| inst.runtime() == arca_proto::node::Runtime::Ns);
        let sid = id.clone();
        tokio::task::spawn_blocking(move || -> Result<bool, String> {
            let frozen = match (&cgroup, freeze) {
                (Some(cg), true) => {
                    cg.set_frozen(true)
                        .map_err(|e| format!("freezing the sandbox: {e}"))?;
                    Some(cg)
                }
                _ => None,
            };
            let synced = if sync_all {
                nix::unistd::sync();
                Ok(())
            } else {
                sync_root(pid)
            };
            let copied = synced.and_then(|()| {
                disk::sparse_copy(&image, &dest).map_err(|e| format!("copying its disk: {e}"))
            });
            let saved = match (&copied, &criu, &cgroup, pid, &memory) {
                (Ok(()), Some(criu), Some(cg), Some(pid), Some(images)) => {
                    let dumped = criu.dump(pid, cg.freezer_dir(), images, true);
                    // CRIU thaws what it froze; a paused source stays paused.
                    if !freeze {
                        let _ = cg.set_frozen(true);
                    }
                    match dumped {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(sandbox_id = %sid, error = %e, "no memory copy for a fork; files only");
                            false
                        }
                    }
                }
                _ => false,
            };
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
            copied.map(|()| saved)
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
        refuse_vm(&inst, "forked")?;
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
                s.runtime = inst.spec.runtime;
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
        // With CRIU the forks get the source's processes and memory too:
        // one set of images, taken in the same frozen moment as the disk,
        // in a directory of its own (a crash leaves it to the reaper: it
        // has no state file).
        let memory_dir = self
            .inner
            .criu
            .as_ref()
            .filter(|_| !inst.restored.load(std::sync::atomic::Ordering::SeqCst))
            .filter(|_| inst.runtime() == arca_proto::node::Runtime::Ns)
            .map(|_| home.join(format!("f{}", crate::random_suffix())));
        let mut memory = false;
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
                    None => self
                        .copy_disk(inst, image.clone(), memory_dir.clone())
                        .await
                        .map(|saved| memory = saved),
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
                        if let Some(m) = &memory_dir {
                            let _ = std::fs::remove_dir_all(m);
                        }
                        return Err(e);
                    }
                    images.push(Err(e));
                }
            }
        }
        // A failed dump may have left part of its images behind.
        if let (Some(m), false) = (&memory_dir, memory) {
            let _ = std::fs::remove_dir_all(m);
        }
        let memory_dir = memory_dir.filter(|_| memory);
        let token = inst.spec.envd_access_token.clone();
        let boots = specs.into_iter().zip(images).map(|(spec, image)| {
            let (memory_dir, token) = (memory_dir.clone(), token.clone());
            async move {
                let image = image?;
                if let Some(images) = memory_dir {
                    return self.fork_restore(spec, build, &images, token).await;
                }
                let mut plan = self.sandbox_plan(build.clone(), spec.disk_size_mb)?;
                plan.upper = Upper::Existing {
                    mb: spec.disk_size_mb,
                    image,
                };
                plan.egress = Some(spec.clone());
                plan.runtime = spec.runtime.unwrap_or_default();
                let booted = self.boot(spec.sandbox_id.to_string(), plan).await?;
                self.activate(booted, spec).await
            }
        });
        let results = futures_util::future::join_all(boots).await;
        if let Some(m) = &memory_dir {
            let _ = std::fs::remove_dir_all(m);
        }
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

    /// One fork restored from the source's CRIU images: its own slot,
    /// cgroup and disk (already copied into its directory), then the
    /// identity of `spec` (host name, `/init` with its token, env and id),
    /// handed to envd with the source's token, which the restored envd
    /// still holds.
    async fn fork_restore(
        &self,
        spec: SandboxSpec,
        build: &Arc<TemplateBuild>,
        images: &Path,
        source_token: String,
    ) -> Result<SandboxStatus, NodeError> {
        let name = spec.sandbox_id.to_string();
        let dir = sandboxes_dir(&self.inner.config.home).join(&name);
        let st = crate::state::StateFile::creating();
        st.save(&dir)
            .map_err(|e| NodeError::Internal(format!("writing the state file: {e}")))?;
        let mut b = Booted::empty(self, name, dir.clone(), Some(build.clone()));
        b.disk_size_mb = spec.disk_size_mb;
        b.envd_token = Some(source_token);
        let limits = self.limits_of(&spec);
        let work = dir.join("criu");
        if let Err(e) = self
            .criu_restore_into(&mut b, st, build, limits, images, &work, &spec)
            .await
        {
            b.shutdown().await;
            return Err(e);
        }
        let _ = std::fs::remove_dir_all(&work);
        self.activate(b, spec).await
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
        refuse_vm(&inst, "snapshotted")?;
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
        self.copy_disk(&inst, image.clone(), None).await?;
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
            // What the sandbox ran under, not only its template's label.
            runtime: Some(inst.runtime()),
        };
        self.inner
            .templates
            .save(&build)
            .map_err(|e| internal(&e))?;
        inst.log("info", format!("snapshot taken as {template_id}"));
        Ok(())
    }

    /// The cgroup limits a sandbox was created with.
    pub(crate) fn limits_of(&self, spec: &SandboxSpec) -> arca_runtime::cgroup::Limits {
        // A VM's limit holds QEMU too, beside the guest's memory.
        let overhead = match spec.runtime {
            Some(arca_proto::node::Runtime::Vm) => crate::vmboot::VM_OVERHEAD_MIB,
            _ => 0,
        };
        arca_runtime::cgroup::Limits {
            cpus: spec.cpu_count,
            memory_mib: u64::from(spec.memory_mb) + overhead,
            pids: self.inner.config.pids_limit,
        }
    }

    /// The template build a sandbox runs (also one deleted since).
    pub(crate) fn build_of(&self, inst: &Instance) -> Result<Arc<TemplateBuild>, NodeError> {
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

/// A VM's disk is a qcow2 layer over its template's image, not the layer
/// directory forks and snapshots copy: they are refused with a 400.
fn refuse_vm(inst: &Instance, what: &str) -> Result<(), NodeError> {
    if inst.runtime() == arca_proto::node::Runtime::Vm {
        return Err(NodeError::InvalidInput(format!(
            "sandbox {} runs under the vm runtime and cannot be {what} yet; \
             use the ns or gvisor runtime for that",
            inst.spec.sandbox_id
        )));
    }
    Ok(())
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
        if inst.runtime() == arca_proto::node::Runtime::Vm {
            return self.restore_vm(inst).await;
        }
        let build = self.build_of(inst)?;
        let name = crate::dir_name(&inst.dir)?;
        let st = crate::state::StateFile::load(&inst.dir).map_err(|e| {
            NodeError::Internal(format!(
                "reading the state of sandbox {}: {e}",
                inst.spec.sandbox_id
            ))
        })?;
        let images = inst.dir.join(crate::CHECKPOINT_DIR);
        let mut b = Booted::empty(self, name, inst.dir.clone(), Some(build.clone()));
        b.keep_dir = true;
        b.disk_size_mb = inst.spec.disk_size_mb;
        let limits = self.limits_of(&inst.spec);
        if let Err(e) = self
            .criu_restore_into(
                &mut b,
                st,
                &build,
                limits,
                &images,
                &images,
                &inst.current_spec(),
            )
            .await
        {
            b.shutdown().await;
            return Err(e);
        }
        b.hand_over(inst).await?;
        inst.restored
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // The images go once the state says it runs (resume_sandbox).
        Ok(())
    }

    /// Restores the CRIU images in `images` into `b` (its directory holds
    /// the disk the images go with): a slot and a cgroup (`limits`) of its
    /// own, the root mounted by `arca __restore`, the network joined by the
    /// slot's hook, envd answering. `st` is the state file to record the
    /// pid and slot in as they are made. `work` is CRIU's directory for
    /// this restore (its log, the pid file), so that several restores can
    /// share one set of images. What it made is in `b` for the caller to
    /// keep or shut down. The slot gets the egress rules of `spec` before
    /// anything restored runs.
    #[allow(clippy::too_many_arguments)]
    async fn criu_restore_into(
        &self,
        b: &mut Booted,
        mut st: crate::state::StateFile,
        build: &TemplateBuild,
        limits: arca_runtime::cgroup::Limits,
        images: &Path,
        work: &Path,
        spec: &SandboxSpec,
    ) -> Result<(), NodeError> {
        let internal = |what: &str, e: &dyn std::fmt::Display| {
            NodeError::Internal(format!("restoring {}: {what}: {e}", b.instance_id))
        };
        let criu = self
            .inner
            .criu
            .clone()
            .ok_or_else(|| NodeError::Internal("no usable CRIU on this node".into()))?;
        let dir = b.dir.clone();
        let image = dir.join("disk.img");
        crate::disk_released(&image, &b.instance_id).await?;
        let lowers = self
            .inner
            .templates
            .lower_dirs(build)
            .map_err(|e| internal("template layers", &e))?;
        let slot = self
            .inner
            .slots
            .acquire()
            .await
            .map_err(|e| NodeError::Capacity(format!("no network slot: {e}")))?;
        st.slot_index = Some(slot.index);
        let sandbox_ip = slot.sandbox_ip;
        let script = self.inner.slots.attach_script(&slot);
        let index = slot.index;
        b.slot = Some(slot);
        st.save(&dir).map_err(|e| internal("state file", &e))?;
        self.load_egress(index, spec).await?;
        b.egress_for = Some(spec.sandbox_id.clone());
        let cgroup = self
            .inner
            .layout
            .create(&b.instance_id, limits)
            .map_err(|e| internal("cgroup", &e))?;
        b.cgroup = Some(cgroup.clone());
        let (hook, pidfile) = (work.join("net-hook.sh"), work.join("restored.pid"));
        (|| -> std::io::Result<()> {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::create_dir_all(work)?;
            let script =
                script.ok_or_else(|| std::io::Error::other("the slot has no addresses"))?;
            std::fs::write(&hook, script)?;
            std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o700))?;
            let _ = std::fs::remove_file(&pidfile);
            Ok(())
        })()
        .map_err(|e| internal("writing the network hook", &e))?;
        let (root, disk_dir) = (dir.join("root"), dir.join("disk"));
        for d in [&root, &disk_dir] {
            std::fs::create_dir_all(d).map_err(|e| internal("sandbox directories", &e))?;
        }
        let mut args = crate::criu::Criu::restore_args(
            images,
            &root,
            &hook,
            &pidfile,
            &self.inner.layout.criu_cgroup_roots(&b.instance_id),
        );
        args.push("-W".into());
        args.push(work.display().to_string());
        let cfg = arca_runtime::RestoreConfig {
            init: arca_runtime::InitConfig {
                sandbox_id: b.instance_id.clone(),
                hostname: b.instance_id.clone(),
                lower_dirs: lowers,
                upper_dir: disk_dir.join("upper"),
                work_dir: disk_dir.join("work"),
                root_dir: root,
                envd_binary: self.inner.config.envd_binary.clone(),
                envd_args: vec![],
                env: vec![],
                own_netns: true,
                cgroup_dirs: cgroup.dirs().to_vec(),
                id_map: arca_runtime::DEFAULT_ID_MAP,
                boot_id: String::new(),
                no_new_privs: false,
                disk: Some(arca_runtime::DiskSpec {
                    image,
                    mount_point: disk_dir,
                }),
                files: vec![],
            },
            criu: criu.bin().to_path_buf(),
            args,
        };
        let exe = self.inner.config.init_exe.clone();
        let work_dir = work.to_path_buf();
        let pid = tokio::task::spawn_blocking(move || run_restore(&exe, &cfg, &work_dir, &pidfile))
            .await
            .map_err(|e| internal("restore task", &e))?
            .map_err(|e| internal("criu restore", &e))?;
        b.pid = pid;
        b.pid_start = crate::state::process_start(pid)
            .ok_or_else(|| internal("restored init", &"exited at once"))?;
        st.pid = Some(pid);
        st.pid_start = Some(b.pid_start);
        st.save(&dir).map_err(|e| internal("state file", &e))?;
        self.inner
            .envd
            .wait_ready(sandbox_ip, crate::ENVD_READY_WITHIN)
            .await
            .map_err(|e| internal("envd after the restore", &e))
    }
}

/// Runs `arca __restore` and returns the restored init's host pid; CRIU
/// logs into `work`. Blocking.
fn run_restore(
    exe: &Path,
    cfg: &arca_runtime::RestoreConfig,
    work: &Path,
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
        let log = std::fs::read_to_string(work.join("restore.log")).unwrap_or_default();
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
