//! `arca doctor`: what this host has for running sandboxes and what is
//! missing, each with the fix. Exit code 0 when everything required is
//! there, 2 otherwise. Lines are `OK`, `MISSING` (required) or `INFO`
//! (optional); with `--json`, one record per check: `check`, `status`
//! (`ok`, `missing`, `info`), `detail`, `fix` (for missing ones).

use std::path::Path;
use std::process::ExitCode;

use arca_runtime::cgroup::Layout;

use super::{Ctx, EXIT_ERROR, out, out_json};

/// Options of `arca doctor`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Missing,
    Info,
}

#[derive(Debug)]
struct Check {
    name: &'static str,
    status: Status,
    detail: String,
    fix: Option<String>,
}

fn ok(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        status: Status::Ok,
        detail: detail.into(),
        fix: None,
    }
}

fn missing(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name,
        status: Status::Missing,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

fn info(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        status: Status::Info,
        detail: detail.into(),
        fix: None,
    }
}

pub(crate) fn run(_args: &Args, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    super::quiet_pipe(report(&checks(), ctx))
}

fn report(checks: &[Check], ctx: &Ctx) -> anyhow::Result<ExitCode> {
    for c in checks {
        let status = match c.status {
            Status::Ok => "ok",
            Status::Missing => "missing",
            Status::Info => "info",
        };
        if ctx.json {
            let mut v = serde_json::json!({"check": c.name, "status": status, "detail": c.detail});
            if let Some(f) = &c.fix {
                v["fix"] = f.as_str().into();
            }
            out_json(&v)?;
        } else {
            let mut line = format!("{:<8}{:<14}{}", status.to_uppercase(), c.name, c.detail);
            if let Some(f) = &c.fix {
                line.push_str("\n        fix: ");
                line.push_str(f);
            }
            out(line)?;
        }
    }
    let bad = checks
        .iter()
        .filter(|c| c.status == Status::Missing)
        .count();
    if bad > 0 {
        if !ctx.json {
            eprintln!(
                "arca: {bad} requirement(s) missing; apply the fixes above (scripts/setup.sh installs the packages) and run `arca doctor` again"
            );
        }
        return Ok(ExitCode::from(EXIT_ERROR));
    }
    Ok(ExitCode::SUCCESS)
}

fn checks() -> Vec<Check> {
    vec![
        kernel(),
        root(),
        user_namespaces(),
        cgroups(),
        overlayfs(),
        tool(
            "nftables",
            "nft",
            &["--version"],
            "apt-get install nftables",
        ),
        tool("iproute2", "ip", &["-V"], "apt-get install iproute2"),
        ip_forward(),
        tool(
            "debootstrap",
            "debootstrap",
            &["--version"],
            "apt-get install debootstrap (builds the base template on the first `arca up`)",
        ),
        kvm(),
        criu(),
    ]
    .into_iter()
    .chain(runtimes())
    .collect()
}

/// The isolation backends beyond `ns` (optional): where `arca up` and
/// `arca node` would find runsc and the VM assets (`ARCA_RUNSC`,
/// `ARCA_VM_ASSETS`, else `$ARCA_HOME/vm`).
fn runtimes() -> Vec<Check> {
    let runsc = std::env::var_os("ARCA_RUNSC").map(std::path::PathBuf::from);
    let vm_assets = std::env::var_os("ARCA_VM_ASSETS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("ARCA_HOME")
                .map_or_else(
                    || Path::new(super::up::DEFAULT_HOME).to_path_buf(),
                    Into::into,
                )
                .join("vm")
        });
    arca_node::runtime_support(runsc, &vm_assets)
        .into_iter()
        .map(|s| {
            let name = match s.runtime {
                arca_proto::node::Runtime::Gvisor => "gvisor",
                arca_proto::node::Runtime::Vm => "vm",
                arca_proto::node::Runtime::Ns => "ns",
            };
            let state = if s.available {
                "runtime available"
            } else {
                "runtime unavailable"
            };
            info(name, format!("{state}: {}", s.detail))
        })
        .collect()
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn kernel() -> Check {
    let release = read("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let version = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    // Overlayfs in user namespaces, cgroup.kill, pidfd: 5.14 and later.
    if version >= (5, 14) {
        ok("kernel", format!("Linux {release}"))
    } else {
        missing(
            "kernel",
            format!("Linux {release}"),
            "Linux 5.14 or later is needed (a current distribution kernel)",
        )
    }
}

fn root() -> Check {
    let euid = read("/proc/self/status").and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
    });
    match euid.as_deref() {
        Some("0") => ok("root", "running as root"),
        other => missing(
            "root",
            format!("running as uid {}", other.unwrap_or("?")),
            "run `arca up` (and this check) as root, e.g. with sudo",
        ),
    }
}

fn user_namespaces() -> Check {
    let max = read("/proc/sys/user/max_user_namespaces").and_then(|s| s.parse::<u64>().ok());
    match max {
        _ if !Path::new("/proc/self/ns/user").exists() => missing(
            "userns",
            "the kernel has no user namespaces",
            "use a kernel built with CONFIG_USER_NS=y",
        ),
        Some(0) => missing(
            "userns",
            "user.max_user_namespaces is 0",
            "sysctl -w user.max_user_namespaces=15000 (and persist it in /etc/sysctl.d)",
        ),
        Some(n) => ok("userns", format!("user namespaces (max {n})")),
        None => ok("userns", "user namespaces"),
    }
}

fn cgroups() -> Check {
    let layout = match Layout::detect() {
        Ok(l) => l,
        Err(e) => {
            return missing(
                "cgroups",
                format!("cannot read the cgroup mounts: {e}"),
                "mount cgroup2 on /sys/fs/cgroup",
            );
        }
    };
    let kind = match (&layout.v2, layout.v1.is_empty()) {
        (Some(_), true) => "v2",
        (Some(_), false) => "hybrid v1+v2",
        (None, false) => "v1",
        (None, true) => "none",
    };
    let mut parts = Vec::new();
    if let Some(v2) = &layout.v2 {
        parts.push(format!(
            "{} [{}]",
            v2.display(),
            layout.v2_controllers.join(" ")
        ));
    }
    for (p, c) in &layout.v1 {
        parts.push(format!("{} [{}]", p.display(), c.join(" ")));
    }
    let detail = format!("cgroups {kind}: {}", parts.join(", "));
    match layout.check() {
        Ok(()) => ok("cgroups", detail),
        Err(e) => missing("cgroups", detail, e.to_string()),
    }
}

fn overlayfs() -> Check {
    let fs = read("/proc/filesystems").unwrap_or_default();
    if fs
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"))
    {
        ok("overlayfs", "overlay in /proc/filesystems")
    } else {
        missing(
            "overlayfs",
            "overlay is not in /proc/filesystems",
            "modprobe overlay (and add `overlay` to /etc/modules-load.d)",
        )
    }
}

/// First line of `prog args` if it runs.
fn version_of(prog: &str, args: &[&str]) -> Option<String> {
    let o = std::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = if o.stdout.is_empty() {
        o.stderr
    } else {
        o.stdout
    };
    let line = String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    Some(if line.is_empty() {
        prog.to_string()
    } else {
        line
    })
}

fn tool(name: &'static str, prog: &str, args: &[&str], fix: &str) -> Check {
    match version_of(prog, args) {
        Some(v) => ok(name, v),
        None => missing(name, format!("`{prog}` not found"), fix),
    }
}

fn ip_forward() -> Check {
    match read("/proc/sys/net/ipv4/ip_forward").as_deref() {
        Some("1") => ok("ip_forward", "net.ipv4.ip_forward = 1"),
        Some(v) => info(
            "ip_forward",
            format!(
                "net.ipv4.ip_forward = {v}; `arca up` turns it on (sandboxes reach the network through NAT)"
            ),
        ),
        None => info("ip_forward", "net.ipv4.ip_forward unreadable"),
    }
}

fn kvm() -> Check {
    let present = Path::new("/dev/kvm").exists();
    info(
        "kvm",
        format!(
            "/dev/kvm {}; not needed: the default ns runtime uses no virtualization",
            if present { "present" } else { "absent" }
        ),
    )
}

fn criu() -> Check {
    match arca_node::criu_status(None) {
        Ok((path, v)) => info(
            "criu",
            format!(
                "{v} at {}; sandboxes moved to disk keep their processes and memory",
                path.display()
            ),
        ),
        Err(why) => info(
            "criu",
            format!(
                "{why}; sandboxes moved to disk keep their files only (scripts/build-criu.sh builds CRIU)"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_requirements_make_exit_code_2() {
        let ctx = Ctx { json: true };
        let all_ok = [ok("a", "x"), info("b", "y")];
        assert_eq!(report(&all_ok, &ctx).unwrap(), ExitCode::SUCCESS);
        let bad = [ok("a", "x"), missing("c", "z", "fix it")];
        assert_eq!(report(&bad, &ctx).unwrap(), ExitCode::from(EXIT_ERROR));
    }
}
