//! `arca __init`: builds a sandbox around envd. Runs in a fresh, single
//! threaded re-exec of the `arca` binary (never a fork of the multi-threaded
//! daemon), as host root. The ordered steps are in `docs/sandbox-init.md`.
//!
//! Stage 1 (this process, host root): join the cgroup, make a private mount
//! namespace with the sandbox's disk and overlay root mounted, and clone the
//! sandbox's PID 1 into new user, pid, mount, uts, ipc, cgroup and network
//! namespaces at once, so that the user namespace owns the others (ADR
//! 0004); write its id maps from outside. Stage 2 (PID 1, sandbox root):
//! host name, `/proc`, `/dev`, `/sys`, `/run`, `lo` up, pivot_root;
//! seccomp, capability bounding set, exec envd. Stage 1 prints
//! `{"pid": <host pid>}` and exits.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{Gid, Pid, Uid};

use crate::config::{ENVD_PATH, InitConfig};
use crate::{seccomp, sys};

/// Capabilities sandbox root keeps: Docker's default set without NET_RAW.
/// The sandbox's user namespace owns its network namespace (ADR 0004), so
/// NET_RAW there would open raw and packet sockets (hand-made frames to the
/// host's end of the veth); ping works without it (ping sockets).
const KEPT_CAPS: [u32; 13] = [
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
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
    // The root file system is assembled here, as host root (a loop device
    // and an overlay of host directories need it), in a mount namespace of
    // this process that the sandbox's own starts as a copy of.
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
    mount_root(cfg)?;
    stage_envd(cfg)?;
    // The sandbox's PID 1 starts in the root: host paths to it may pass
    // through directories that only host root may enter, and the clone
    // moves the working directory into the new mount namespace's copy.
    ctx(nix::unistd::chdir(&cfg.root_dir), || {
        "chdir to the new root".into()
    })?;

    let (go_r, go_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    // One clone makes every namespace, the user namespace first: it owns
    // the others (CRIU can only checkpoint a tree whose namespaces belong
    // to its user namespace; see docs/adr/0004).
    let mut flags = CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWCGROUP;
    if cfg.own_netns {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    // `arca __init` starts no runtime or thread, so it may clone.
    let cloned = ctx(sys::clone_into(flags), || "clone".into())?;
    let Some(child) = cloned else {
        drop((go_w, err_r));
        let err = stage2(cfg, go_r);
        // Only reached on failure: exec replaced the process otherwise.
        let mut f = fs::File::from(err_w);
        let _ = f.write_all(err.as_bytes());
        // The cloned child must not return into stage 1's code.
        #[allow(clippy::exit)]
        std::process::exit(1);
    };
    drop((go_r, err_w));
    if let Err(e) = write_id_maps(child, cfg) {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(child, None);
        return Err(e);
    }
    let _ = fs::File::from(go_w).write_all(b"g");
    // The error pipe closes at envd's exec (close-on-exec) or with a message.
    let mut err = String::new();
    let _ = fs::File::from(err_r).read_to_string(&mut err);
    if !err.is_empty() {
        let _ = nix::sys::wait::waitpid(child, None);
        return Err(err);
    }
    Ok(child.as_raw())
}

/// Mounts the sandbox's disk (if any) and its overlay root on
/// `cfg.root_dir`. Host root, in stage 1's private mount namespace.
pub(crate) fn mount_root(cfg: &InitConfig) -> Res<()> {
    mount_root_idmapped(cfg, None)
}

/// [`mount_root`], with every layer seen through an idmapped mount of the
/// user namespace `idmap` (held open by the caller) when given, so that
/// files stored shifted by [`InitConfig::id_map`] appear with their
/// sandbox owners to whoever reads the root from outside a user namespace
/// (gVisor's gofer). The idmapped copies are attached under
/// `<root_dir>.layers/` in the caller's mount namespace.
pub(crate) fn mount_root_idmapped(
    cfg: &InitConfig,
    idmap: Option<std::os::fd::BorrowedFd<'_>>,
) -> Res<()> {
    if let Some(disk) = &cfg.disk {
        // The writable layer lives on the sandbox's own disk; the loop device
        // detaches itself when the last mount namespace holding it ends.
        let (dev, path) = ctx(sys::attach_loop(&disk.image), || {
            format!("attaching {}", disk.image.display())
        })?;
        ensure_dir(&disk.mount_point)?;
        // noinit_itable: no kernel thread zeroing inode tables behind the
        // sandbox's back (a fork copies the image while it is mounted).
        mnt(
            Some(&path.display().to_string()),
            &disk.mount_point,
            Some("ext4"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("noinit_itable"),
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
    let (mut lower_dirs, mut upper_dir, mut work_dir) = (
        cfg.lower_dirs.clone(),
        cfg.upper_dir.clone(),
        cfg.work_dir.clone(),
    );
    if let Some(userns) = idmap {
        // Seen through the map, overlayfs's work dir must belong to the
        // mapped root as well.
        ctx(
            std::os::unix::fs::chown(&cfg.work_dir, root_id, root_id),
            || "chown of the work dir".into(),
        )?;
        let Some(disk) = &cfg.disk else {
            return Err("an idmapped root needs the sandbox's own disk".into());
        };
        let base = cfg.root_dir.with_extension("layers");
        let rel = |p: &Path| -> Res<std::path::PathBuf> {
            p.strip_prefix(&disk.mount_point)
                .map(Path::to_path_buf)
                .map_err(|_| format!("{} is not on the sandbox's disk", p.display()))
        };
        let (upper_rel, work_rel) = (rel(&cfg.upper_dir)?, rel(&cfg.work_dir)?);
        let disk_view = idmapped_copy(&disk.mount_point, &base.join("disk"), userns, false)?;
        upper_dir = disk_view.join(upper_rel);
        work_dir = disk_view.join(work_rel);
        lower_dirs = cfg
            .lower_dirs
            .iter()
            .enumerate()
            // The template's layers are shared: read-only even to the mounter.
            .map(|(i, l)| idmapped_copy(l, &base.join(format!("l{i}")), userns, true))
            .collect::<Res<_>>()?;
    }
    let lower: Vec<String> = lower_dirs.iter().map(|p| p.display().to_string()).collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper_dir.display(),
        work_dir.display()
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
        &cfg.root_dir,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(&opts),
    )
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

/// Attaches an idmapped copy of the mount tree at `src` on `at` (made
/// empty if missing) and returns `at`.
fn idmapped_copy(
    src: &Path,
    at: &Path,
    userns: std::os::fd::BorrowedFd<'_>,
    read_only: bool,
) -> Res<std::path::PathBuf> {
    use std::os::fd::AsFd;
    ensure_dir(at)?;
    let dir = ctx(fs::File::open(src), || format!("opening {}", src.display()))?;
    let tree = ctx(sys::clone_tree(dir.as_fd(), false), || {
        format!("copying the mount at {}", src.display())
    })?;
    ctx(sys::idmap_tree(tree.as_fd(), userns, read_only), || {
        format!("idmapping {}", src.display())
    })?;
    let target = ctx(fs::File::open(at), || format!("opening {}", at.display()))?;
    ctx(
        sys::attach_tree(tree.as_fd(), Some(target.as_fd()), c""),
        || {
            format!(
                "attaching the idmapped {} on {}",
                src.display(),
                at.display()
            )
        },
    )?;
    Ok(at.to_path_buf())
}

fn ensure_dir(p: &Path) -> Res<()> {
    if !p.is_dir() {
        ctx(fs::create_dir_all(p), || {
            format!("creating {}", p.display())
        })?;
    }
    Ok(())
}

/// A directory right under the new root to mount on. A symlink there is
/// refused: the mount would land wherever it points. One the template
/// lacks (a template `FROM scratch` has none) is made by sandbox root, so
/// it belongs to it as if the image had it.
fn mount_point(root: &Path, name: &str) -> Res<std::path::PathBuf> {
    let p = root.join(name);
    match fs::symlink_metadata(&p) {
        Ok(m) if m.is_dir() => Ok(p),
        Ok(_) => Err(format!(
            "the template's /{name} is not a directory (a symbolic link or a file); it must be a directory"
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            ctx(fs::create_dir(&p), || format!("creating /{name}"))?;
            Ok(p)
        }
        Err(e) => Err(format!("/{name}: {e}")),
    }
}

/// Makes the bind mount at `target` read-only (plus `extra`), keeping the
/// flags the kernel locks on mounts from a more privileged namespace
/// (nosuid, nodev, noexec, atime): a remount that dropped one would fail.
fn read_only(target: &Path, extra: MsFlags) -> Res<()> {
    use nix::sys::statvfs::FsFlags;
    let st = ctx(nix::sys::statvfs::statvfs(target), || {
        format!("statvfs {}", target.display())
    })?;
    let f = st.flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | extra;
    for (have, keep) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(have) {
            flags |= keep;
        }
    }
    mnt(None, target, None, flags, None)
}

fn ensure_file(p: &Path) -> Res<()> {
    if !p.exists() {
        ctx(fs::write(p, b""), || format!("creating {}", p.display()))?;
    }
    Ok(())
}

/// Where stage 1 puts envd for PID 1: beside the root directory, so that
/// PID 1 reaches it as `../envd` from the root (no host path to walk) and
/// it is gone with the old root after `pivot_root`.
fn envd_stage(cfg: &InitConfig) -> std::path::PathBuf {
    cfg.root_dir
        .parent()
        .unwrap_or(Path::new("/"))
        .join(ENVD_STAGE)
}

/// Name of [`envd_stage`] beside the root.
const ENVD_STAGE: &str = "envd";

/// Binds the envd binary at [`envd_stage`]. Host root, before the clone:
/// envd's host path may pass through directories only host root may enter.
fn stage_envd(cfg: &InitConfig) -> Res<()> {
    let stage = envd_stage(cfg);
    ensure_file(&stage)?;
    let envd_src = cfg.envd_binary.display().to_string();
    mnt(Some(&envd_src), &stage, None, MsFlags::MS_BIND, None)
}

/// Runs as the sandbox's PID 1 until exec; returns only an error.
fn stage2(cfg: &InitConfig, go: OwnedFd) -> String {
    match stage2_inner(cfg, go) {
        Ok(never) => match never {},
        Err(e) => format!("sandbox {}: {e}", cfg.sandbox_id),
    }
}

enum Never {}

fn stage2_inner(cfg: &InitConfig, go: OwnedFd) -> Res<Never> {
    let mut buf = [0u8; 1];
    let n = fs::File::from(go).read(&mut buf).unwrap_or(0);
    if n != 1 {
        return Err("stage 1 did not map the user namespace".into());
    }
    // Sandbox root: uid and gid 0 of the new user namespace, which owns
    // every namespace this process is in.
    ctx(
        nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)),
        || "setresgid".into(),
    )?;
    ctx(
        nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)),
        || "setresuid".into(),
    )?;
    ctx(nix::unistd::setgroups(&[]), || "setgroups".into())?;
    ctx(nix::unistd::sethostname(&cfg.hostname), || {
        "sethostname".into()
    })?;

    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    // Mounts copied from stage 1's namespace are locked to this one; a copy
    // of the root attached over it is a mount of its own, which pivot_root
    // needs. From here on the root is the current directory, and every
    // path below is relative to it.
    {
        use std::os::fd::AsFd;
        let here = ctx(
            nix::fcntl::open(
                ".",
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            ),
            || "opening the root".into(),
        )?;
        let tree = ctx(sys::clone_tree(here.as_fd(), true), || {
            "copying the root mount".into()
        })?;
        ctx(
            sys::attach_tree(tree.as_fd(), Some(here.as_fd()), c""),
            || "attaching the root copy".into(),
        )?;
        ctx(nix::unistd::fchdir(&tree), || {
            "entering the root copy".into()
        })?;
    }
    let root = Path::new(".");
    // Ids inside: sandbox root.
    let owner = "uid=0,gid=0";

    // /proc of the new pid namespace.
    let proc_ = mount_point(root, "proc")?;
    mnt(Some("proc"), &proc_, Some("proc"), nodev, None)?;

    // A minimal /dev.
    let dev = mount_point(root, "dev")?;
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
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
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
    let sysfs = mount_point(root, "sys")?;
    mnt(
        Some("sysfs"),
        &sysfs,
        Some("sysfs"),
        nodev | MsFlags::MS_RDONLY,
        None,
    )?;

    // /run with envd, read-only, and the boot id. Mounted here, in the
    // sandbox's own mount namespace, so that a checkpoint can save and
    // restore it like any tmpfs of the sandbox.
    let run = mount_point(root, "run")?;
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
    {
        use std::os::fd::AsFd;
        let staged = ctx(
            nix::fcntl::open(
                Path::new("..").join(ENVD_STAGE).as_path(),
                OFlag::O_PATH | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            ),
            || "opening the envd stage 1 left beside the root".into(),
        )?;
        let tree = ctx(sys::clone_tree(staged.as_fd(), false), || {
            format!("copying the mount of {}", cfg.envd_binary.display())
        })?;
        let to = CString::new(envd.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        ctx(sys::attach_tree(tree.as_fd(), None, &to), || {
            format!("mounting envd from {}", cfg.envd_binary.display())
        })?;
    }
    read_only(&envd, MsFlags::MS_NOSUID | MsFlags::MS_NODEV)?;
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
    read_only(&boot_target, MsFlags::empty())?;
    let devnull = dev.join("null").display().to_string();
    for name in MASKED {
        let p = proc_.join(name);
        if p.exists() {
            mnt(Some(&devnull), &p, None, MsFlags::MS_BIND, None)?;
        }
    }

    if cfg.own_netns {
        // The sandbox's network namespace is its own: let root inside bind
        // low ports and everyone use ping sockets, and bring `lo` up (the
        // node moves the slot's interface in).
        let sysctl = proc_.join("sys/net/ipv4");
        ctx(
            fs::write(sysctl.join("ip_unprivileged_port_start"), "0"),
            || "setting ip_unprivileged_port_start".into(),
        )?;
        ctx(
            fs::write(sysctl.join("ping_group_range"), "0 65535"),
            || "setting ping_group_range".into(),
        )?;
        ctx(sys::link_up("lo"), || "bringing lo up".into())?;
    }

    mount_point(root, "tmp")?;

    // Enter the new root; the old one is detached and gone.
    ctx(nix::unistd::pivot_root(".", "."), || "pivot_root".into())?;
    ctx(umount2(".", MntFlags::MNT_DETACH), || {
        "detaching the old root".into()
    })?;
    ctx(nix::unistd::chdir("/"), || "chdir /".into())?;
    ctx(nix::unistd::setsid(), || "setsid".into())?;

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
