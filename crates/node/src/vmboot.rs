//! Booting a sandbox of the `vm` backend: the template as a read-only ext4
//! image (one per build and disk size, made on first use), a qcow2 layer of
//! the sandbox's own over it, the guest wired into the slot's namespace by
//! a tap, and QEMU started in the sandbox's cgroups (which hold the whole
//! guest: its memory, CPUs and processes).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arca_proto::node::NodeError;
use arca_runtime::vm::{VmConfig, VmLaunch};

use crate::state::StateFile;
use crate::templates::TemplateBuild;
use crate::{BootPlan, Booted, Node, Upper, lock, state};

/// The sandbox's disk: a qcow2 layer over the template's image.
pub(crate) const VM_DISK: &str = "disk.qcow2";
/// The guest's tap in the slot's namespace.
const TAP: &str = "tap0";
/// QEMU's QMP socket, in the sandbox's directory.
const QMP_SOCKET: &str = "qmp.sock";
/// A saved VM, in the sandbox's checkpoint directory.
const VM_STATE: &str = "vm.state";
/// How long saving or loading a VM may take.
const SAVE_WITHIN: Duration = Duration::from_secs(300);
/// What QEMU itself takes beyond the guest's memory (TCG's translation
/// cache is capped at 128 MiB), added to the sandbox's memory limit.
pub(crate) const VM_OVERHEAD_MIB: u64 = 256;
/// A guest boots in about 4 s under TCG; a busy host takes longer.
const VM_READY_WITHIN: Duration = Duration::from_secs(90);

impl Node {
    /// [`Node::boot`]'s steps for a VM once its slot and cgroup exist.
    pub(crate) async fn boot_vm_into(
        &self,
        b: &mut Booted,
        mut st: StateFile,
        plan: BootPlan,
        t0: Instant,
    ) -> Result<(), NodeError> {
        let inner = &self.inner;
        let internal =
            |what: &str, e: &dyn std::fmt::Display| NodeError::Internal(format!("{what}: {e}"));
        let vm = inner.backends.vm.clone().ok_or_else(|| {
            NodeError::InvalidInput("runtime 'vm' is not available on this node".into())
        })?;
        let build = plan
            .template
            .clone()
            .ok_or_else(|| NodeError::Internal("a vm boot without its template".into()))?;
        let (disk_mb, fresh) = match &plan.upper {
            Upper::Disk(mb) => (*mb, true),
            Upper::Existing { mb, .. } => (*mb, false),
            Upper::DiskAt { .. } | Upper::Dir { .. } => {
                return Err(NodeError::Internal(
                    "template builds run under ns, not vm".into(),
                ));
            }
        };
        let dir = b.dir.clone();
        let disk = dir.join(VM_DISK);
        if fresh || !disk.exists() {
            if !fresh {
                return Err(NodeError::Internal(format!(
                    "{} is gone: the sandbox's files cannot come back",
                    disk.display()
                )));
            }
            let base = self.vm_image(&build, disk_mb).await?;
            let d = disk.clone();
            tokio::task::spawn_blocking(move || arca_runtime::vm::make_overlay(&base, &d))
                .await
                .map_err(|e| internal("disk task", &e))?
                .map_err(|e| internal("making the sandbox's disk", &e))?;
        }
        let slot = b
            .slot
            .as_ref()
            .ok_or_else(|| NodeError::Internal("a vm boot without a slot".into()))?;
        let (netns_name, ip) = (slot.netns_name.clone(), slot.sandbox_ip);
        tokio::task::spawn_blocking(move || arca_runtime::vm::setup_tap(&netns_name, "eth0", TAP))
            .await
            .map_err(|e| internal("tap task", &e))?
            .map_err(|e| internal("wiring the guest into its network slot", &e))?;
        let (memory_mb, vcpus) = plan
            .egress
            .as_ref()
            .map_or((512, 1), |s| (s.memory_mb, s.cpu_count));
        self.launch_vm(b, &vm, (memory_mb, vcpus), None).await?;
        st.pid = Some(b.pid);
        st.pid_start = Some(b.pid_start);
        st.save(&dir)
            .map_err(|e| internal("writing the state file", &e))?;
        if let Err(e) = inner.envd.wait_ready(ip, VM_READY_WITHIN).await {
            let console = qmp(&dir, |q| q.console_tail(4096))
                .await
                .unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(5).collect();
            return Err(NodeError::Internal(format!(
                "waiting for envd in the VM: {e}; its console ended with: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            )));
        }
        if let Some(build) = &plan.template {
            self.start_template_process(ip, build, None)
                .await
                .map_err(NodeError::Internal)?;
        }
        tracing::debug!(
            instance = %b.instance_id,
            total_ms = t0.elapsed().as_secs_f64() * 1e3,
            "VM booted"
        );
        Ok(())
    }

    /// Starts QEMU for `b` (slot wired, cgroup made, disk in place) with
    /// (memory MiB, vCPUs); `incoming`: a saved VM to load, left stopped.
    async fn launch_vm(
        &self,
        b: &mut Booted,
        vm: &crate::backends::Vm,
        (memory_mb, vcpus): (u32, u32),
        incoming: Option<PathBuf>,
    ) -> Result<(), NodeError> {
        let internal =
            |what: &str, e: &dyn std::fmt::Display| NodeError::Internal(format!("{what}: {e}"));
        let slot = b
            .slot
            .as_ref()
            .ok_or_else(|| NodeError::Internal("a vm boot without a slot".into()))?;
        let dir = b.dir.clone();
        // A stale socket from an earlier QEMU would be taken for this one's.
        let _ = std::fs::remove_file(dir.join(QMP_SOCKET));
        let cfg = VmConfig {
            memory_mb: memory_mb.max(128),
            vcpus: vcpus.max(1),
            kernel: vm.assets.kernel.clone(),
            initramfs: vm.initramfs.clone(),
            disk: dir.join(VM_DISK),
            tap: TAP.into(),
            mac: arca_runtime::vm::mac_for(slot.sandbox_ip),
            ip: slot.sandbox_ip,
            prefix: 30,
            gateway: slot.host_ip,
            hostname: b.instance_id.clone(),
            qmp_socket: dir.join(QMP_SOCKET),
            console_log: None,
            incoming,
            kvm: vm.kvm,
        };
        let launch = VmLaunch {
            cgroup_dirs: b
                .cgroup
                .as_ref()
                .map(|c| c.dirs().to_vec())
                .unwrap_or_default(),
            netns: slot.netns_path.clone(),
            qemu: vm.assets.qemu.clone(),
            args: arca_runtime::vm::qemu_args(&cfg),
            log: dir.join("qemu.log"),
        };
        let exe = self.inner.config.init_exe.clone();
        let pid = tokio::task::spawn_blocking(move || arca_runtime::vm::launch(&exe, &launch))
            .await
            .map_err(|e| internal("qemu task", &e))?
            .map_err(|e| internal("starting the sandbox's VM", &e))?;
        b.pid = pid;
        b.pid_start = state::process_start(pid)
            .ok_or_else(|| NodeError::Internal("QEMU exited at once".into()))?;
        Ok(())
    }

    /// Saves a paused VM (vCPUs stopped at the pause, QEMU frozen) to
    /// `checkpoint/vm.state`: QEMU is thawed to answer, its guest stays
    /// stopped. The caller then ends QEMU.
    pub(crate) async fn save_vm(&self, inst: &crate::Instance) -> Result<(), String> {
        let images = inst.dir.join(crate::CHECKPOINT_DIR);
        std::fs::create_dir_all(&images)
            .map_err(|e| format!("creating {}: {e}", images.display()))?;
        if let Some(cg) = inst.cgroup() {
            tokio::task::spawn_blocking(move || cg.set_frozen(false))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("thawing QEMU: {e}"))?;
        }
        let t0 = Instant::now();
        let state = images.join(VM_STATE);
        qmp(&inst.dir, move |q| q.migrate_to_file(&state, SAVE_WITHIN)).await?;
        tracing::debug!(sandbox_id = %inst.spec.sandbox_id, ms = t0.elapsed().as_secs_f64() * 1e3, "VM saved");
        Ok(())
    }

    /// Brings a VM saved by [`Node::save_vm`] back in its kept slot: a new
    /// cgroup, QEMU loading the saved machine, `cont`, envd answering.
    pub(crate) async fn restore_vm(&self, inst: &Arc<crate::Instance>) -> Result<(), NodeError> {
        let vm = self.inner.backends.vm.clone().ok_or_else(|| {
            NodeError::InvalidInput("runtime 'vm' is not available on this node".into())
        })?;
        let build = self.build_of(inst)?;
        let name = crate::dir_name(&inst.dir)?;
        let spec = inst.current_spec();
        let slot = lock(&inst.kept_slot).take().ok_or_else(|| {
            NodeError::Internal("no network slot was kept for the saved VM".into())
        })?;
        let ip = slot.sandbox_ip;
        let mut b = Booted::empty(self, name.clone(), inst.dir.clone(), Some(build));
        b.keep_dir = true;
        b.runtime = arca_proto::node::Runtime::Vm;
        b.disk_size_mb = spec.disk_size_mb;
        b.slot = Some(slot);
        let state = inst.dir.join(crate::CHECKPOINT_DIR).join(VM_STATE);
        let result = async {
            let cg = self
                .inner
                .layout
                .create(&name, self.limits_of(&spec))
                .map_err(|e| NodeError::Internal(format!("creating the cgroup: {e}")))?;
            b.cgroup = Some(cg);
            if let Some(s) = &b.slot {
                // Still wired unless the namespace was made anew.
                let netns = s.netns_name.clone();
                tokio::task::spawn_blocking(move || {
                    if arca_runtime::vm::tap_exists(&netns, TAP) {
                        Ok(())
                    } else {
                        arca_runtime::vm::setup_tap(&netns, "eth0", TAP)
                    }
                })
                .await
                .map_err(|e| NodeError::Internal(e.to_string()))?
                .map_err(|e| NodeError::Internal(format!("wiring the guest: {e}")))?;
            }
            self.launch_vm(&mut b, &vm, (spec.memory_mb, spec.cpu_count), Some(state))
                .await?;
            qmp(&inst.dir, |q| {
                q.wait_incoming(SAVE_WITHIN)?;
                q.cont()
            })
            .await
            .map_err(|e| NodeError::Internal(format!("loading the saved VM: {e}")))?;
            self.inner
                .envd
                .wait_ready(ip, VM_READY_WITHIN)
                .await
                .map_err(|e| NodeError::Internal(format!("envd after the restore: {e}")))
        }
        .await;
        if let Err(e) = result {
            b.shutdown().await;
            return Err(e);
        }
        b.hand_over(inst).await
    }

    /// The read-only ext4 image of `build` with room for `disk_mb` MiB of
    /// the sandbox's own writes, made once (owners moved back out of the
    /// store's shifted range) and kept in `$ARCA_HOME/vm-images`.
    async fn vm_image(
        &self,
        build: &Arc<TemplateBuild>,
        disk_mb: u32,
    ) -> Result<PathBuf, NodeError> {
        let dir = images_dir(&self.inner.config.home);
        let name = image_name(&build.template_id, &build.build_id, disk_mb);
        let image = dir.join(&name);
        // One maker per image; the others wait for it.
        let gate = {
            let mut gates = lock(&self.inner.vm_images);
            gates
                .entry(name)
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
                .clone()
        };
        let _made = gate.lock().await;
        if image.is_file() {
            return Ok(image);
        }
        let layers = self
            .inner
            .templates
            .lower_dirs(build)
            .map_err(|e| NodeError::Internal(e.to_string()))?;
        let out = image.clone();
        tokio::task::spawn_blocking(move || make_image(&layers, &out, disk_mb))
            .await
            .map_err(|e| NodeError::Internal(e.to_string()))?
            .map_err(|e| NodeError::Internal(format!("making the template's VM image: {e}")))?;
        Ok(image)
    }
}

/// Where the VM images of template builds are kept.
fn images_dir(home: &Path) -> PathBuf {
    home.join("vm-images")
}

/// The file name of `build`'s VM image for disks of `disk_mb` MiB.
fn image_name(template_id: &str, build_id: &str, disk_mb: u32) -> String {
    format!("{template_id}-{build_id}-{disk_mb}.ext4")
}

/// Removes the VM images of one build (every disk size). Blocking.
pub(crate) fn remove_images(home: &Path, template_id: &str, build_id: &str) {
    let prefix = format!("{template_id}-{build_id}-");
    let Ok(dir) = std::fs::read_dir(images_dir(home)) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let size = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".ext4"));
        if size.is_some_and(|s| s.parse::<u32>().is_ok()) {
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!(image = %e.path().display(), error = %err, "cannot remove a VM image");
            }
        }
    }
}

fn make_image(layers: &[PathBuf], out: &Path, disk_mb: u32) -> Result<(), String> {
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    let used: u64 = layers
        .iter()
        .filter_map(|l| arca_image::disk_usage(l).ok())
        .sum();
    // The template, the sandbox's disk, and ext4's own overhead.
    let size_mb = used / (1024 * 1024) + used / (1024 * 1024) / 8 + u64::from(disk_mb) + 64;
    let mut opts = arca_image::Ext4Options::new(size_mb);
    opts.unshift = arca_runtime::DEFAULT_ID_MAP.outside;
    arca_image::export_ext4_with(layers, out, &opts).map_err(|e| e.to_string())
}

/// Runs `f` on a QMP connection to the QEMU of the sandbox in `dir`, on a
/// blocking thread.
pub(crate) async fn qmp<T: Send + 'static>(
    dir: &Path,
    f: impl FnOnce(&mut arca_runtime::vm::Qmp) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let socket = dir.join(QMP_SOCKET);
    tokio::task::spawn_blocking(move || {
        let mut q = arca_runtime::vm::Qmp::connect(&socket, Duration::from_secs(10))?;
        f(&mut q)
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_a_builds_images_keeps_other_builds() {
        let home = tempfile::tempdir().unwrap();
        let dir = images_dir(home.path());
        std::fs::create_dir_all(&dir).unwrap();
        let names = [
            image_name("t", "b1", 1024),
            image_name("t", "b1", 2048),
            image_name("t", "b10", 1024),
            image_name("t-b1", "x", 1024),
            "t-b1-notes.txt".to_string(),
        ];
        for n in &names {
            std::fs::write(dir.join(n), b"x").unwrap();
        }
        remove_images(home.path(), "t", "b1");
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["t-b1-notes.txt", "t-b1-x-1024.ext4", "t-b10-1024.ext4"]
        );
    }
}
