//! The `gvisor` backend: the sandbox runs on gVisor's user-space kernel
//! (`runsc`), which answers its system calls itself, so untrusted code
//! meets a small, memory-safe surface instead of the host kernel's.
//!
//! Arca prepares everything as for `ns` (cgroup, network slot, disk and
//! overlay root, envd) and hands the root to `runsc` as an OCI bundle.
//! `arca __gvisor` (a re-exec of the `arca` binary, like `__init`) joins the
//! sandbox's cgroups and its slot's network namespace, mounts the root in a
//! private mount namespace (the layers through idmapped mounts, because the
//! template store keeps files shifted by [`InitConfig::id_map`] and gVisor's
//! file server reads them as host root), writes `config.json` and runs
//! `runsc create` and `runsc start`. runsc's processes (sandbox and gofer)
//! inherit the cgroups, the network and the mount namespace, which ends
//! with them: nothing stays mounted on the host. It prints
//! `{"pid": <runsc sandbox pid>}`.
//!
//! runsc runs with `--network=host` inside the slot's own namespace:
//! Debian 12's runsc (2022) refuses its own network stack on kernels newer
//! than it knows (it takes every namespace for the host's), and the host
//! stack of a namespace with only the slot's interface, behind the node's
//! nftables rules, is what the `ns` backend has too (ADR 0007).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sched::{CloneFlags, setns};
use serde::{Deserialize, Serialize};

use crate::RuntimeError;
use crate::config::{ENVD_PATH, InitConfig};

/// What `arca __gvisor` reads on its stdin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GvisorConfig {
    /// The sandbox as `ns` would boot it: its root (`disk`, `lower_dirs`,
    /// `upper_dir`, `work_dir`, `root_dir`), cgroups, envd, environment,
    /// host name and id map are used; `files` and `own_netns` are not
    /// (the node writes the files through envd).
    pub init: InitConfig,
    /// The network namespace to run in (the slot's, configured).
    pub netns: PathBuf,
    /// The `runsc` binary.
    pub runsc: PathBuf,
    /// runsc's platform (`ptrace`, `systrap`, `kvm`).
    pub platform: String,
    /// runsc's state directory (`--root`); the sandbox's own.
    pub state_dir: PathBuf,
    /// Where the OCI bundle (`config.json`) is written.
    pub bundle_dir: PathBuf,
    /// Container id (the sandbox's instance name).
    pub container_id: String,
    /// runsc's debug logs go to this directory (`--debug-log`), for
    /// operators chasing a problem (`ARCA_RUNSC_DEBUG_LOG`).
    #[serde(default)]
    pub debug_log: Option<PathBuf>,
}

impl GvisorConfig {
    /// runsc's arguments before its subcommand.
    pub fn global_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--root={}", self.state_dir.display()),
            format!("--platform={}", self.platform),
            "--network=host".into(),
            "--ignore-cgroups".into(),
            // Writes go to the sandbox's own disk (its overlay upper), not
            // to an overlay runsc would keep inside its own memory file:
            // pauses to disk, forks and snapshots copy that disk.
            "--overlay2=none".into(),
        ];
        if let Some(dir) = &self.debug_log {
            args.push("--debug".into());
            args.push(format!("--debug-log={}/", dir.display()));
        }
        args
    }
}

/// Starts a sandbox under gVisor by re-executing `exe __gvisor`. Blocking.
/// Returns the pid of runsc's sandbox process.
pub fn launch(exe: &Path, config: &GvisorConfig) -> Result<i32, RuntimeError> {
    crate::launch::run_helper(exe, "__gvisor", config)
}

/// Entry point of `arca __gvisor`: prints `{"pid": N}` or `{"error": ...}`
/// and returns the exit status.
pub fn gvisor_main() -> i32 {
    crate::launch::helper_main(boot)
}

fn boot(cfg: &GvisorConfig) -> Result<i32, String> {
    crate::launch::join_cgroups(&cfg.init.cgroup_dirs)?;
    let netns =
        fs::File::open(&cfg.netns).map_err(|e| format!("opening {}: {e}", cfg.netns.display()))?;
    setns(&netns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("joining {}: {e}", cfg.netns.display()))?;
    // runsc opens the sandbox's sockets in this namespace (host network
    // mode): let them bind low ports and be ping sockets, as `ns` does.
    for (knob, value) in [
        ("ip_unprivileged_port_start", "0"),
        ("ping_group_range", "0 65535"),
    ] {
        fs::write(Path::new("/proc/sys/net/ipv4").join(knob), value)
            .map_err(|e| format!("setting {knob} in the sandbox's network: {e}"))?;
    }
    crate::launch::private_mounts()?;
    {
        use std::os::fd::AsFd;
        let userns = crate::sys::mapping_userns(cfg.init.id_map.outside, 0, cfg.init.id_map.count)
            .map_err(|e| format!("making the id-mapping user namespace: {e}"))?;
        crate::init::mount_root_idmapped(&cfg.init, Some(userns.as_fd()))?;
    }
    // A sandbox booted again on its files (a resume from disk) reuses its
    // directory: the ended runsc's state would refuse the same container.
    for d in [&cfg.bundle_dir, &cfg.state_dir] {
        match fs::remove_dir_all(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("clearing {}: {e}", d.display())),
        }
    }
    fs::create_dir_all(&cfg.bundle_dir)
        .and_then(|()| fs::create_dir_all(&cfg.state_dir))
        .map_err(|e| format!("creating the bundle: {e}"))?;
    let spec = oci_spec(cfg);
    fs::write(
        cfg.bundle_dir.join("config.json"),
        serde_json::to_vec_pretty(&spec).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("writing config.json: {e}"))?;
    let pid_file = cfg.bundle_dir.join("pid");
    run_runsc(
        cfg,
        &[
            "create",
            "--bundle",
            &cfg.bundle_dir.display().to_string(),
            "--pid-file",
            &pid_file.display().to_string(),
            &cfg.container_id,
        ],
    )?;
    run_runsc(cfg, &["start", &cfg.container_id])?;
    let pid = fs::read_to_string(&pid_file)
        .map_err(|e| format!("reading runsc's pid file: {e}"))?
        .trim()
        .parse::<i32>()
        .map_err(|e| format!("runsc's pid file: {e}"))?;
    Ok(pid)
}

/// Runs one runsc command. Its stdio is /dev/null: the processes `runsc
/// create` leaves running (sandbox, gofer) inherit it as the container's
/// stdio, which must neither hold the node's pipe open nor be a file the
/// sandbox could fill. runsc's own messages go to `--log`, a file per
/// command that only that command writes.
fn run_runsc(cfg: &GvisorConfig, args: &[&str]) -> Result<(), String> {
    let log_path = cfg.bundle_dir.join(format!("runsc-{}.log", args[0]));
    let mut child = Command::new(&cfg.runsc)
        .args(cfg.global_args())
        .arg(format!("--log={}", log_path.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("running {}: {e}", cfg.runsc.display()))?;
    // A runsc that hangs (a platform the host cannot run: nested KVM) must
    // not hold the create for ever; what it started dies with the cgroup.
    let deadline = std::time::Instant::now() + RUNSC_WITHIN;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "runsc {} did not finish within {} s (is platform {} usable here?)",
                    args[0],
                    RUNSC_WITHIN.as_secs(),
                    cfg.platform
                ));
            }
            Err(e) => return Err(format!("waiting for runsc: {e}")),
        }
    };
    if !status.success() {
        let err = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        return Err(format!(
            "runsc {} failed ({status}): {}",
            args[0],
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    Ok(())
}

/// How long `runsc create` or `runsc start` may take.
const RUNSC_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// Capabilities of the sandbox's root inside gVisor: the `ns` backend's
/// set (Docker's default without NET_RAW).
const CAPS: [&str; 13] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_MKNOD",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
];

/// The OCI runtime spec of the sandbox: envd as its init, the root as
/// mounted, gVisor's own `/proc`, `/dev`, `/sys`, and no network
/// namespace of its own (runsc stays in the slot's).
pub(crate) fn oci_spec(cfg: &GvisorConfig) -> serde_json::Value {
    let init = &cfg.init;
    let mut args = vec![ENVD_PATH.to_string()];
    args.extend(init.envd_args.iter().cloned());
    let env: Vec<String> = init.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": env,
            "cwd": "/",
            "capabilities": {
                "bounding": CAPS, "effective": CAPS, "permitted": CAPS,
            },
            "noNewPrivileges": init.no_new_privs,
        },
        "root": { "path": init.root_dir, "readonly": false },
        "hostname": init.hostname,
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
              "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] },
            { "destination": "/run", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "nodev", "mode=755"] },
            { "destination": ENVD_PATH, "type": "bind", "source": init.envd_binary,
              "options": ["bind", "ro"] },
        ],
        "linux": {
            "namespaces": [
                { "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" },
            ],
        },
    })
}

/// runsc's version line, or why it cannot run. Blocking.
pub fn runsc_version(runsc: &Path) -> Result<String, String> {
    let out = Command::new(runsc)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", runsc.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed ({})",
            runsc.display(),
            out.status
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_ID_MAP;

    fn cfg() -> GvisorConfig {
        GvisorConfig {
            init: InitConfig {
                sandbox_id: "i1".into(),
                hostname: "i1".into(),
                lower_dirs: vec!["/l".into()],
                upper_dir: "/d/upper".into(),
                work_dir: "/d/work".into(),
                root_dir: "/s/root".into(),
                envd_binary: "/bin/envd".into(),
                envd_args: vec!["--port".into(), "1".into()],
                env: vec![("PATH".into(), "/bin".into())],
                own_netns: false,
                cgroup_dirs: vec![],
                id_map: DEFAULT_ID_MAP,
                boot_id: "b".into(),
                no_new_privs: false,
                disk: None,
                files: vec![],
            },
            netns: "/run/netns/x".into(),
            runsc: "/usr/bin/runsc".into(),
            platform: "ptrace".into(),
            state_dir: "/s/runsc".into(),
            bundle_dir: "/s/bundle".into(),
            container_id: "i1".into(),
            debug_log: None,
        }
    }

    #[test]
    fn spec_runs_envd_from_its_mount_in_the_callers_network() {
        let s = oci_spec(&cfg());
        assert_eq!(s["process"]["args"][0], ENVD_PATH);
        assert_eq!(s["process"]["args"][2], "1");
        assert_eq!(s["root"]["path"], "/s/root");
        assert_eq!(s["hostname"], "i1");
        let mounts = s["mounts"].as_array().unwrap();
        let envd = mounts
            .iter()
            .find(|m| m["destination"] == ENVD_PATH)
            .unwrap();
        assert_eq!(envd["source"], "/bin/envd");
        assert!(
            envd["options"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("ro"))
        );
        let ns = s["linux"]["namespaces"].as_array().unwrap();
        assert!(
            ns.iter()
                .all(|n| n["type"] != "network" && n["type"] != "user")
        );
        let caps = s["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(!caps.contains(&serde_json::json!("CAP_NET_RAW")));
        assert!(!caps.contains(&serde_json::json!("CAP_SYS_ADMIN")));
    }

    #[test]
    fn runsc_keeps_to_its_own_state_and_the_callers_cgroups() {
        let a = cfg().global_args();
        assert!(a.contains(&"--root=/s/runsc".to_string()));
        assert!(a.contains(&"--platform=ptrace".to_string()));
        assert!(a.contains(&"--ignore-cgroups".to_string()));
        assert!(a.contains(&"--overlay2=none".to_string()));
    }
}
