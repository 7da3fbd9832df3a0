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
