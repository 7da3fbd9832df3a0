//! Checkpoints with CRIU (>= 4.2, `scripts/build-criu.sh` builds it): a
//! frozen sandbox moved to disk keeps its processes and memory in
//! `<sandbox dir>/checkpoint/`, and a resume restores them (same pids
//! inside, same boot id) on a fresh network slot and cgroup.
//!
//! Dump: `criu dump` of the sandbox's PID 1 with the sandbox's own freezer
//! (it is frozen already), external bind mounts (envd, `/dev` nodes) by host
//! path, the network namespace left out (`--empty-ns net`: the node plumbs a
//! new one at restore), established TCP connections saved. CRIU kills the
//! tree once the images are written; the node then releases the cgroup and
//! slot as for any pause to disk.
//!
//! Restore: `arca __restore` mounts the sandbox's root (disk and overlay)
//! in a private mount namespace and becomes `criu restore` there; CRIU
//! recreates every other mount, runs the slot's attach script when the new
//! network namespace exists, places the tree in the sandbox's cgroup and
//! detaches it (the node, a child subreaper, becomes its parent).
//! Connections that were open are closed (`--tcp-close`): the sandbox may
//! get another address, and pausing cut proxied ones already.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A usable `criu`.
#[derive(Debug, Clone)]
pub(crate) struct Criu {
    bin: PathBuf,
    version: String,
}

/// Oldest CRIU that works on current kernels (vDSO layout, TCP repair).
const MIN_VERSION: (u32, u32) = (4, 2);

impl Criu {
    /// The `criu` to use: `explicit`, else `/usr/local/sbin/criu` (where
    /// `scripts/build-criu.sh` puts it), else one on `PATH`; it must be
    /// new enough and `criu check` must pass. Blocking (about 0.1 s).
    pub(crate) fn detect(explicit: Option<&Path>) -> Result<Criu, String> {
        let bin = match explicit {
            Some(p) => p.to_path_buf(),
            None if Path::new("/usr/local/sbin/criu").is_file() => {
                PathBuf::from("/usr/local/sbin/criu")
            }
            None => PathBuf::from("criu"),
        };
        let out = Command::new(&bin).arg("--version").output().map_err(|e| {
            format!(
                "{} not found ({e}); scripts/build-criu.sh builds it",
                bin.display()
            )
        })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .lines()
            .find_map(|l| l.strip_prefix("Version:"))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| format!("{} printed no version", bin.display()))?;
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) < MIN_VERSION {
            return Err(format!(
                "{} is CRIU {version}; Arca needs {}.{} or later (scripts/build-criu.sh builds it)",
                bin.display(),
                MIN_VERSION.0,
                MIN_VERSION.1
            ));
        }
        let check = Command::new(&bin)
            .arg("check")
            .output()
            .map_err(|e| format!("running {} check: {e}", bin.display()))?;
        if !check.status.success() {
            return Err(format!(
                "`{} check` fails on this host: {}",
                bin.display(),
                last_lines(&String::from_utf8_lossy(&check.stderr), 3)
            ));
        }
        Ok(Criu { bin, version })
    }

    /// Its version, for logs.
    pub(crate) fn version(&self) -> &str {
        &self.version
    }

    /// The binary.
    pub(crate) fn bin(&self) -> &Path {
        &self.bin
    }

    /// Saves the tree of `pid` (frozen through `freezer`) into `images`
    /// and kills it, or with `leave_running` leaves it as it was (a fork's
    /// source). Blocking.
    pub(crate) fn dump(
        &self,
        pid: i32,
        freezer: &Path,
        images: &Path,
        leave_running: bool,
    ) -> Result<(), String> {
        let _ = std::fs::remove_dir_all(images);
        std::fs::create_dir_all(images).map_err(|e| format!("{}: {e}", images.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("dump")
            .arg("-t")
            .arg(pid.to_string())
            .arg("-D")
            .arg(images)
            .args(["-o", "dump.log", "-v2"])
            .arg("--freeze-cgroup")
            .arg(freezer)
            .args(dump_flags());
        if leave_running {
            cmd.arg("--leave-running");
        }
        run(&mut cmd, &images.join("dump.log"), "criu dump")
    }

    /// The arguments of `criu restore` for `arca __restore`.
    pub(crate) fn restore_args(
        images: &Path,
        root: &Path,
        hook: &Path,
        pidfile: &Path,
        cgroup_roots: &[String],
    ) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "restore".into(),
            "-D".into(),
            images.display().to_string(),
            "-o".into(),
            "restore.log".into(),
            "-v2".into(),
            "--root".into(),
            root.display().to_string(),
            "--external".into(),
            "mnt[]".into(),
            "--empty-ns".into(),
            "net".into(),
            "--action-script".into(),
            hook.display().to_string(),
            "--tcp-close".into(),
            "--file-locks".into(),
            "-d".into(),
            "--pidfile".into(),
            pidfile.display().to_string(),
        ];
        for r in cgroup_roots {
            args.push("--cgroup-root".into());
            args.push(r.clone());
        }
        args
    }
}

/// `criu dump` flags besides the tree, images and freezer.
fn dump_flags() -> [&'static str; 9] {
    [
        // envd and the /dev nodes are binds of host files: saved by path.
        "--external",
        "mnt[]",
        // The network namespace is plumbed anew at restore.
        "--empty-ns",
        "net",
        // This machine kind has nftables, not iptables.
        "--network-lock",
        "nftables",
        "--tcp-established",
        "--file-locks",
        // Deleted files still open (up to this size) go into the images.
        "--ghost-limit=64M",
    ]
}

/// Runs a CRIU command; on failure the error names its log's last lines.
fn run(cmd: &mut Command, log: &Path, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {what}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    Err(format!(
        "{what} failed ({}): {}",
        out.status,
        last_lines(&text, 4)
    ))
}

/// The last `n` lines that say `Error`, or else the last `n` lines.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("Error")).collect();
    let pick: Vec<&str> = if errors.is_empty() {
        text.lines().collect()
    } else {
        errors
    };
    pick[pick.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_args_name_the_root_hook_and_each_cgroup() {
        let a = Criu::restore_args(
            Path::new("/s/checkpoint"),
            Path::new("/s/root"),
            Path::new("/s/checkpoint/hook.sh"),
            Path::new("/s/checkpoint/pid"),
            &["memory:/arca/x".into(), ":/arca/x".into()],
        );
        let joined = a.join(" ");
        assert!(joined.starts_with("restore -D /s/checkpoint "), "{joined}");
        assert!(joined.contains("--root /s/root"));
        assert!(joined.contains("--action-script /s/checkpoint/hook.sh"));
        assert!(joined.contains("--cgroup-root memory:/arca/x --cgroup-root :/arca/x"));
        assert!(joined.contains("--tcp-close") && joined.contains("--empty-ns net"));
    }

    #[test]
    fn last_lines_prefer_errors() {
        let log = "a\nError (x): one\nb\nError (y): two\nc\n";
        assert_eq!(last_lines(log, 1), "Error (y): two");
        assert_eq!(last_lines("a\nb\nc", 2), "b | c");
    }
}
