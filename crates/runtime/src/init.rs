//! `arca __init`: builds a sandbox around envd. Runs in a fresh, single
//! threaded re-exec of the `arca` binary (never a fork of the multi-threaded
//! daemon), as host root. The ordered steps are in `docs/sandbox-init.md`.
//!
//! Stage 1 (this process, host mount namespace): join the cgroup and the
//! slot's network namespace, unshare pid, uts, ipc and cgroup namespaces,
//! fork the sandbox's PID 1. Stage 2 (PID 1): own mount namespace, overlay
//! root, `/proc`, `/dev`, `/sys`, `/run`, pivot_root; then a new user
//! namespace whose id maps stage 1 writes from outside; seccomp, capability
//! bounding set, exec envd. Stage 1 prints `{"pid": <host pid>}` and exits.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::unistd::{Gid, Pid, Uid};

use crate::config::{ENVD_PATH, InitConfig};
use crate::{seccomp, sys};

/// Capabilities sandbox root keeps (Docker's default set).
const KEPT_CAPS: [u32; 14] = [
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    13, // NET_RAW
    18, // SYS_CHROOT
    27, // MKNOD
    29, // AUDIT_WRITE
    31, // SETFCAP
];
/// Highest capability number known to current kernels.
const LAST_CAP: u32 = 40;

/// Files under `/proc` hidden behind `/dev/null`.
const MASKED: [&str; 4] = ["kcore", "keys", "timer_list", "sysrq-trigger"];

type Res<T> = Result<T, String>;

fn ctx<T, E: std::fmt::Display>(r: Result<T, E>, what: impl FnOnce() -> String) -> Res<T> {
    r.map_err(|e| format!("{}: {e}", what()))
}

/// Entry point of `arca __init`. Reads the [`InitConfig`] on stdin, writes
/// one JSON line on stdout, returns the exit code.
pub fn init_main() -> i32 {
    let mut input = String::new();
    let result = std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("reading the init config: {e}"))
        .and_then(|_| {
            serde_json::from_str::<InitConfig>(&input).map_err(|e| format!("bad init config: {e}"))
        })
        .and_then(|cfg| stage1(&cfg));
    let (line, code) = match result {
        Ok(pid) => (serde_json::json!({ "pid": pid }), 0),
        Err(e) => (serde_json::json!({ "error": e }), 1),
    };
    println!("{line}");
    code
}

fn pipe() -> Res<(OwnedFd, OwnedFd)> {
    ctx(nix::unistd::pipe2(OFlag::O_CLOEXEC), || "pipe".into())
}

fn stage1(cfg: &InitConfig) -> Res<i32> {
    let me = std::process::id().to_string();
    for dir in &cfg.cgroup_dirs {
        let procs = dir.join("cgroup.procs");
        ctx(fs::write(&procs, &me), || {
            format!("joining cgroup {}", dir.display())
        })?;
    }
    if let Some(netns) = &cfg.netns {
        let f = ctx(fs::File::open(netns), || {
            format!("opening {}", netns.display())
        })?;
        ctx(setns(f.as_fd(), CloneFlags::CLONE_NEWNET), || {
            format!("entering {}", netns.display())
        })?;
        // The netns belongs to the host's user namespace, so sandbox root is
        // not privileged there: let it bind low ports and use ping sockets.
        let _ = fs::write("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0");
        let _ = fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647");
    }
    ctx(
        unshare(
            CloneFlags::CLONE_NEWPID
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWCGROUP,
        ),
        || "unshare pid/uts/ipc/cgroup namespaces".into(),
    )?;
    ctx(nix::unistd::sethostname(&cfg.hostname), || {
        "sethostname".into()
    })?;

    let (ready_r, ready_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    // `arca __init` starts no runtime or thread, so it may fork.
    let forked = ctx(sys::fork(), || "fork".into())?;
    let Some(child) = forked else {
        drop((ready_r, go_w, err_r));
        let err = stage2(cfg, ready_w, go_r);
        // Only reached on failure: exec replaced the process otherwise.
        let mut f = fs::File::from(err_w);
        let _ = f.write_all(err.as_bytes());
        // The forked child must not return into stage 1's code.
        #[allow(clippy::exit)]
        std::process::exit(1);
    };
    drop((ready_w, go_r, err_w));
    let mut ready = [0u8; 1];
    let got = fs::File::from(ready_r).read(&mut ready).unwrap_or(0);
    if got == 1 {
        if let Err(e) = write_id_maps(child, cfg) {
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(child, None);
            return Err(e);
        }
        let _ = fs::File::from(go_w).write_all(b"g");
    } else {
        drop(go_w);
    }
    let mut err = String::new();
    let _ = fs::File::from(err_r).read_to_string(&mut err);
    if !err.is_empty() || got != 1 {
        let _ = nix::sys::wait::waitpid(child, None);
        return Err(if err.is_empty() {
            "sandbox init exited before creating its user namespace".into()
        } else {
            err
        });
    }
    Ok(child.as_raw())
}

fn write_id_maps(child: Pid, cfg: &InitConfig) -> Res<()> {
    let m = cfg.id_map;
    let line = format!("{} {} {}\n", m.inside, m.outside, m.count);
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{}/{file}", child.as_raw());
        ctx(fs::write(&path, &line), || format!("writing {path}"))?;
    }
    Ok(())
}

fn mnt(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Res<()> {
    ctx(mount(src, target, fstype, flags, data), || {
        format!(
            "mounting {} on {}",
            src.or(fstype).unwrap_or("?"),
            target.display()
        )
    })
}

fn ensure_dir(p: &Path) -> Res<()> {
    if !p.is_dir() {
        ctx(fs::create_dir_all(p), || {
            format!("creating {}", p.display())
        })?;
    }
    Ok(())
}

/// A directory right under the new root to mount on. The root belongs to
/// the template, and this runs as host root before `pivot_root`: a symlink
/// here would make the mount (or mkdir) land on the host, so it is refused.
///
/// A directory it has to make (a template `FROM scratch` has none) belongs
/// to sandbox root (`owner` outside), as if the image had it: made by host
/// root it would be unowned inside the user namespace.
fn mount_point(root: &Path, name: &str, owner: u32) -> Res<std::path::PathBuf> {
    let p = root.join(name);
    match fs::symlink_metadata(&p) {
        Ok(m) if m.is_dir() => Ok(p),
        Ok(_) => Err(format!(
            "the template's /{name} is not a directory (a symbolic link or a file); it must be a directory"
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            ctx(fs::create_dir(&p), || format!("creating /{name}"))?;
            ctx(
                std::os::unix::fs::chown(&p, Some(owner), Some(owner)),
                || format!("chown /{name}"),
            )?;
            Ok(p)
        }
        Err(e) => Err(format!("/{name}: {e}")),
    }
}

fn ensure_file(p: &Path) -> Res<()> {
    if !p.exists() {
        ctx(fs::write(p, b""), || format!("creating {}", p.display()))?;
    }
    Ok(())
}

/// Runs as the sandbox's PID 1 until exec; returns only an error.
fn stage2(cfg: &InitConfig, ready: OwnedFd, go: OwnedFd) -> String {
    match stage2_inner(cfg, ready, go) {
        Ok(never) => match never {},
        Err(e) => format!("sandbox {}: {e}", cfg.sandbox_id),
    }
}

enum Never {}

fn stage2_inner(cfg: &InitConfig, ready: OwnedFd, go: OwnedFd) -> Res<Never> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let root = cfg.root_dir.as_path();
    let owner = format!("uid={0},gid={0}", cfg.id_map.outside);
    ctx(unshare(CloneFlags::CLONE_NEWNS), || {
        "unshare mount namespace".into()
    })?;
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;

    if let Some(disk) = &cfg.disk {
        // The writable layer lives on the sandbox's own disk; the loop device
        // detaches itself when this mount namespace (and so the mount) ends.
        let (dev, path) = ctx(sys::attach_loop(&disk.image), || {
            format!("attaching {}", disk.image.display())
        })?;
        ensure_dir(&disk.mount_point)?;
        mnt(
            Some(&path.display().to_string()),
            &disk.mount_point,
            Some("ext4"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None,
        )?;
        drop(dev);
    }
    for d in [&cfg.upper_dir, &cfg.work_dir] {
        ensure_dir(d)?;
    }
    // The merged root takes the upper dir's owner and mode: sandbox root's,
    // 0755, whether the upper dir is on the disk or a build's layer.
    let root_id = Some(cfg.id_map.outside);
    ctx(
        std::os::unix::fs::chown(&cfg.upper_dir, root_id, root_id),
        || "chown of the upper dir".into(),
    )?;
    ctx(
        fs::set_permissions(&cfg.upper_dir, fs::Permissions::from_mode(0o755)),
        || "chmod of the upper dir".into(),
    )?;
    let lower: Vec<String> = cfg
        .lower_dirs
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        cfg.upper_dir.display(),
        cfg.work_dir.display()
    );
    // The kernel takes mount options up to a page long.
    if opts.len() >= 4096 {
        return Err(format!(
            "the template has too many layers ({}) for one overlay mount; \
             build it with fewer steps (join RUN lines)",
            cfg.lower_dirs.len()
        ));
    }
    // nodev: a device node in an image (or made by a build step) opens
    // nothing; /dev's nodes are bind mounts of their own.
    mnt(
        Some("overlay"),
        root,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(&opts),
    )?;

    // /proc of the new pid namespace.
    let proc_ = mount_point(root, "proc", cfg.id_map.outside)?;
    mnt(Some("proc"), &proc_, Some("proc"), nodev, None)?;

    // A minimal /dev.
    let dev = mount_point(root, "dev", cfg.id_map.outside)?;
    mnt(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(&format!("mode=755,size=1m,{owner}")),
    )?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(node);
        ensure_file(&target)?;
        mnt(
            Some(&format!("/dev/{node}")),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    let pts = dev.join("pts");
    ensure_dir(&pts)?;
    mnt(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(&format!(
            "newinstance,ptmxmode=0666,mode=0620,gid={}",
            cfg.id_map.outside + 5
        )),
    )?;
    let shm = dev.join("shm");
    ensure_dir(&shm)?;
    mnt(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        nodev,
        Some(&format!("mode=1777,size=64m,{owner}")),
    )?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ctx(std::os::unix::fs::symlink(to, dev.join(link)), || {
            format!("linking /dev/{link}")
        })?;
    }

    // /sys, read-only.
    let sysfs = mount_point(root, "sys", cfg.id_map.outside)?;
    mnt(
        Some("sysfs"),
        &sysfs,
        Some("sysfs"),
        nodev | MsFlags::MS_RDONLY,
        None,
    )?;

    // /run with envd, read-only, and the boot id.
    let run = mount_point(root, "run", cfg.id_map.outside)?;
    mnt(
        Some("tmpfs"),
        &run,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(&format!("mode=755,size=16m,{owner}")),
    )?;
    let arca_dir = run.join("arca");
    ensure_dir(&arca_dir)?;
    let envd = root.join(ENVD_PATH.trim_start_matches('/'));
    ensure_file(&envd)?;
    let envd_src = cfg.envd_binary.display().to_string();
    mnt(Some(&envd_src), &envd, None, MsFlags::MS_BIND, None)?;
    mnt(
        None,
        &envd,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None,
    )?;
    let boot_id = arca_dir.join("boot_id");
    ctx(fs::write(&boot_id, format!("{}\n", cfg.boot_id)), || {
        "writing boot_id".into()
    })?;
    let boot_target = proc_.join("sys/kernel/random/boot_id");
    mnt(
        Some(&boot_id.display().to_string()),
        &boot_target,
        None,
        MsFlags::MS_BIND,
        None,
    )?;
    mnt(
        None,
        &boot_target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None,
    )?;
    let devnull = dev.join("null").display().to_string();
    for name in MASKED {
        let p = proc_.join(name);
        if p.exists() {
            mnt(Some(&devnull), &p, None, MsFlags::MS_BIND, None)?;
        }
    }

    mount_point(root, "tmp", cfg.id_map.outside)?;

    // Enter the new root; the old one is detached and gone.
    ctx(nix::unistd::chdir(root), || "chdir to the new root".into())?;
    ctx(nix::unistd::pivot_root(".", "."), || "pivot_root".into())?;
    ctx(umount2(".", MntFlags::MNT_DETACH), || {
        "detaching the old root".into()
    })?;
    ctx(nix::unistd::chdir("/"), || "chdir /".into())?;
    ctx(nix::unistd::setsid(), || "setsid".into())?;

    // Sandbox root is not host root: a user namespace, mapped from outside.
    ctx(unshare(CloneFlags::CLONE_NEWUSER), || {
        "unshare user namespace".into()
    })?;
    ctx(fs::File::from(ready).write_all(b"r"), || {
        "signalling stage 1".into()
    })?;
    let mut buf = [0u8; 1];
    let n = fs::File::from(go).read(&mut buf).unwrap_or(0);
    if n != 1 {
        return Err("stage 1 did not map the user namespace".into());
    }
    ctx(
        nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)),
        || "setresgid".into(),
    )?;
    ctx(
        nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)),
        || "setresuid".into(),
    )?;
    ctx(nix::unistd::setgroups(&[]), || "setgroups".into())?;

    // Only now, as root of the sandbox's user namespace inside its own root,
    // touch the template's files: symlinks in them cannot lead to the host,
    // and host-wide files under /proc/sys refuse this user.
    for (inside, content) in &cfg.files {
        let p = Path::new(inside);
        if let Some(parent) = p.parent() {
            ctx(fs::create_dir_all(parent), || {
                format!("creating {}", parent.display())
            })?;
        }
        ctx(fs::write(p, content), || format!("writing {inside}"))?;
    }
    ctx(
        fs::set_permissions("/tmp", fs::Permissions::from_mode(0o1777)),
        || "chmod /tmp".into(),
    )?;

    // stdio to /dev/null, every other descriptor closed at exec.
    let null = ctx(
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null"),
        || "opening /dev/null".into(),
    )?;
    ctx(nix::unistd::dup2_stdin(&null), || {
        "redirecting stdin".into()
    })?;
    ctx(nix::unistd::dup2_stdout(&null), || {
        "redirecting stdout".into()
    })?;
    ctx(nix::unistd::dup2_stderr(&null), || {
        "redirecting stderr".into()
    })?;
    drop(null);
    ctx(sys::cloexec_from(3), || "close_range".into())?;

    if cfg.no_new_privs {
        ctx(nix::sys::prctl::set_no_new_privs(), || {
            "no_new_privs".into()
        })?;
    }
    ctx(sys::install_seccomp(&seccomp::program()), || {
        "installing the seccomp filter".into()
    })?;
    for cap in 0..=LAST_CAP {
        if !KEPT_CAPS.contains(&cap) {
            ctx(sys::drop_bounding_cap(cap), || {
                format!("dropping capability {cap}")
            })?;
        }
    }

    let path = CString::new(ENVD_PATH).map_err(|e| e.to_string())?;
    let mut argv = vec![path.clone()];
    for a in &cfg.envd_args {
        argv.push(CString::new(a.as_str()).map_err(|e| e.to_string())?);
    }
    let envp: Vec<CString> = cfg
        .env
        .iter()
        .filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok())
        .collect();
    let err = nix::unistd::execve(&path, &argv, &envp).err();
    Err(format!(
        "exec {ENVD_PATH}: {}",
        err.map_or_else(String::new, |e| e.to_string())
    ))
}
