//! Which isolation backends this node can run, and what each one uses.
//! `ns` always works where the node starts at all; `gvisor` needs a
//! `runsc`; `vm` needs QEMU and the kernel assets of
//! `scripts/vm-assets.sh`.

use std::path::{Path, PathBuf};

use arca_proto::node::{Runtime, RuntimeSupport};

use crate::NodeConfig;

/// The `gvisor` backend's settings.
#[derive(Debug, Clone)]
pub(crate) struct Gvisor {
    pub(crate) runsc: PathBuf,
    pub(crate) platform: String,
}

/// The `vm` backend's settings.
#[derive(Debug, Clone)]
pub(crate) struct Vm {
    pub(crate) assets: arca_runtime::vm::VmAssets,
    /// The initramfs (envd as `/init`, the modules), made at start.
    pub(crate) initramfs: PathBuf,
    /// KVM rather than TCG.
    pub(crate) kvm: bool,
}

/// What this node found at start.
#[derive(Debug, Clone)]
pub(crate) struct Backends {
    pub(crate) gvisor: Option<Gvisor>,
    pub(crate) vm: Option<Vm>,
    pub(crate) support: Vec<RuntimeSupport>,
}

impl Backends {
    /// Looks for each backend's parts. Blocking (runs `runsc --version`).
    pub(crate) fn detect(config: &NodeConfig) -> Backends {
        let mut support = vec![RuntimeSupport {
            runtime: Runtime::Ns,
            available: true,
            detail: "namespaces, cgroups, seccomp, Landlock".into(),
        }];
        let gvisor = detect_gvisor(config.runsc.as_ref(), config.gvisor_platform.as_ref());
        support.push(support_of(Runtime::Gvisor, &gvisor, |(g, v)| {
            gvisor_detail(g, v)
        }));
        let vm = detect_vm(config);
        support.push(support_of(Runtime::Vm, &vm, |v| {
            vm_detail(&v.assets, v.kvm)
        }));
        let (gvisor, vm) = (gvisor.ok().map(|g| g.0), vm.ok());
        Backends {
            gvisor,
            vm,
            support,
        }
    }

    /// `Ok` when `runtime` can start sandboxes here, else the message of a
    /// 400 that says what is missing.
    pub(crate) fn check(&self, runtime: Runtime) -> Result<(), String> {
        match self.support.iter().find(|s| s.runtime == runtime) {
            Some(s) if s.available => Ok(()),
            Some(s) => Err(format!(
                "runtime '{runtime}' is not available on this node: {}; available: {}",
                s.detail,
                self.available().join(", ")
            )),
            None => Err(format!("runtime '{runtime}' is unknown to this node")),
        }
    }

    /// Names of the backends that work here.
    pub(crate) fn available(&self) -> Vec<String> {
        self.support
            .iter()
            .filter(|s| s.available)
            .map(|s| s.runtime.as_str().to_string())
            .collect()
    }
}

fn detect_gvisor(
    runsc: Option<&PathBuf>,
    platform: Option<&String>,
) -> Result<(Gvisor, String), String> {
    let runsc = match runsc {
        Some(p) => p.clone(),
        None => arca_runtime::find_in_path("runsc").ok_or_else(|| {
            "no runsc on PATH (install Debian's runsc package, or pass --runsc)".to_string()
        })?,
    };
    let version = arca_runtime::gvisor::runsc_version(&runsc)?;
    if release_date(&version).is_some_and(|d| d < MIN_RUNSC_DATE) {
        return Err(format!(
            "{} is too old ({version}: its statx refuses what coreutils asks, so `ls -l` fails \
             inside); install a 2024 release with scripts/install-runsc.sh",
            runsc.display()
        ));
    }
    let platform = platform
        .cloned()
        .unwrap_or_else(|| default_platform(&version).to_string());
    Ok((Gvisor { runsc, platform }, version))
}

/// The oldest runsc release the backend accepts (Debian's bookworm-backports
/// build; Debian 12's own 2022 one breaks coreutils).
const MIN_RUNSC_DATE: u32 = 20_240_101;

/// The release date in runsc's version line ("runsc version
/// release-20240513.0", "runsc version 0.0~20221219.0").
fn release_date(version_line: &str) -> Option<u32> {
    version_line
        .split(|c: char| !c.is_ascii_digit())
        .find(|w| w.len() == 8)
        .and_then(|d| d.parse::<u32>().ok())
}

fn detect_vm(config: &NodeConfig) -> Result<Vm, String> {
    let dir = config
        .vm_assets
        .clone()
        .unwrap_or_else(|| config.home.join("vm"));
    let assets = arca_runtime::vm::VmAssets::detect(&dir)?;
    // Made anew at every start: it carries this node's envd.
    let initramfs = config.home.join("vm-initramfs.cpio");
    arca_runtime::vm::write_initramfs(&config.envd_binary, &assets.modules_dir, &initramfs)
        .map_err(|e| format!("making {}: {e}", initramfs.display()))?;
    Ok(Vm {
        assets,
        initramfs,
        kvm: arca_runtime::vm::kvm_usable(),
    })
}

/// `systrap` for runsc releases that have it (mid 2023 on), `ptrace` for
/// older ones; `kvm` is never chosen by itself (nested KVM hangs, see
/// MACHINE.md).
pub(crate) fn default_platform(version_line: &str) -> &'static str {
    match release_date(version_line) {
        Some(d) if d >= 20_230_601 => "systrap",
        _ => "ptrace",
    }
}

/// Whether the `gvisor` and `vm` backends could run here, for `arca
/// doctor`: the runsc given or on `PATH`, the VM assets in `vm_assets`.
/// Changes nothing on the host. Blocking.
pub fn runtime_support(runsc: Option<PathBuf>, vm_assets: &Path) -> Vec<RuntimeSupport> {
    let gvisor = detect_gvisor(runsc.as_ref(), None);
    let vm = arca_runtime::vm::VmAssets::detect(vm_assets);
    vec![
        support_of(Runtime::Gvisor, &gvisor, |(g, v)| gvisor_detail(g, v)),
        support_of(Runtime::Vm, &vm, |a| {
            vm_detail(a, arca_runtime::vm::kvm_usable())
        }),
    ]
}

/// A backend's line: what it uses when found, else why not.
fn support_of<T>(
    runtime: Runtime,
    found: &Result<T, String>,
    detail: impl FnOnce(&T) -> String,
) -> RuntimeSupport {
    let (available, detail) = match found {
        Ok(t) => (true, detail(t)),
        Err(why) => (false, why.clone()),
    };
    RuntimeSupport {
        runtime,
        available,
        detail,
    }
}

fn gvisor_detail(g: &Gvisor, version: &str) -> String {
    format!(
        "{} ({version}), platform {}, host network in the sandbox's namespace",
        g.runsc.display(),
        g.platform
    )
}

fn vm_detail(assets: &arca_runtime::vm::VmAssets, kvm: bool) -> String {
    format!(
        "{} with {}, kernel {}",
        assets.qemu.display(),
        if kvm {
            "KVM"
        } else {
            "TCG (software emulation: slow)"
        },
        assets.kernel.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_follows_the_runsc_release() {
        assert_eq!(default_platform("runsc version 0.0~20221219.0"), "ptrace");
        assert_eq!(
            default_platform("runsc version release-20240513.0"),
            "systrap"
        );
        assert_eq!(default_platform("runsc version unknown"), "ptrace");
    }
}
