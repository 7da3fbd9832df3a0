//! The built-in Debian bootstrap: Arca's `base` template root file system,
//! made by `debootstrap` from Debian's mirror, so a first `arca up` needs no
//! container registry (ARCHITECTURE.md section 4).
//!
//! # What [`bootstrap`] does, in order
//!
//! 1. Checks: root, `debootstrap` installed, `dest` absent, its parent present.
//! 2. `debootstrap --variant=minbase --include=<packages> <suite> <dest>.tmp-<random> <mirror>`,
//!    reporting [`Progress`] parsed from its `I:` lines. The mirror is the
//!    host's apt mirror unless given ([`host_mirrors`]).
//! 3. Inside the new root (`chroot`, no extra mounts needed): group and user
//!    `user` (1000:1000, home `/home/user`, shell `/bin/bash`, member of
//!    `sudo`), `/etc/sudoers.d/user` with `NOPASSWD` (0440, checked by
//!    `visudo -c`), `/etc/hostname`, `/etc/hosts`, an empty
//!    `/etc/resolv.conf` (the runtime writes the sandbox's own), apt sources
//!    with the security suite, and no apt caches or package lists.
//! 4. `syncfs`, then an atomic `rename` to `dest` (refusing to replace
//!    anything there), then `fsync` of the parent: after a crash there is
//!    either a complete `dest` or none.
//!
//! On failure or cancellation (the future dropped) the debootstrap process
//! group is killed, anything left mounted under the temporary directory is
//! lazily unmounted, and the directory is removed; this cleanup runs
//! synchronously in `Drop`.
//!
//! The result is **not** uid-shifted: ids are as Debian made them. Shift it
//! with [`crate::shift::shift_ownership`] before sandboxes use it.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::fd::AsFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

use crate::ImageError;
use crate::walk;

/// Debian suite of the `base` template.
pub const DEFAULT_SUITE: &str = "bookworm";
/// Mirror used when the host's apt sources name none.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Security mirror written into the rootfs' apt sources when the host names none.
pub const DEFAULT_SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
/// Hostname written to `/etc/hostname` by default.
pub const DEFAULT_HOSTNAME: &str = "arca";

/// Packages added to minbase for the `base` template (CONTRACT.md 4.5: bash,
/// sudo, python3 and python, curl, git with `git daemon`, tput, coreutils and
/// procps, plus Node). `npm` is left out: in bookworm it pulls in about 450
/// `node-*` packages.
pub const BASE_PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "procps",
    "python3",
    "python-is-python3",
    "nodejs",
    "git",
    "curl",
    "ca-certificates",
    "sudo",
    "ncurses-bin",
    "less",
    "findutils",
    "iproute2",
    "attr",
];

/// Uid and gid of the sandbox user `user`.
pub const USER_ID: u32 = 1000;

/// Packages a bookworm minbase with [`BASE_PACKAGES`] installs, measured; the
/// progress bar's denominator until debootstrap has named them all.
const ESTIMATED_PACKAGES: usize = 155;

/// Where the `base` root file system goes and what goes into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapOptions {
    /// Directory to create; must not exist yet, its parent must.
    pub dest: PathBuf,
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    /// Mirror URL; `None` takes the host's apt mirror, else [`DEFAULT_MIRROR`].
    pub mirror: Option<String>,
    /// Packages added to minbase.
    pub packages: Vec<String>,
    /// Content of `/etc/hostname` (the 127.0.1.1 line of `/etc/hosts` too).
    pub hostname: String,
    /// Absolute directory where debootstrap keeps downloaded `.deb`s across
    /// builds (`--cache-dir`); `None` downloads every time.
    pub cache_dir: Option<PathBuf>,
}

impl BootstrapOptions {
    /// The `base` template into `dest`: bookworm, host mirror, [`BASE_PACKAGES`].
    pub fn base(dest: impl Into<PathBuf>) -> Self {
        Self {
            dest: dest.into(),
            suite: DEFAULT_SUITE.to_owned(),
            mirror: None,
            packages: BASE_PACKAGES.iter().map(|p| (*p).to_owned()).collect(),
            hostname: DEFAULT_HOSTNAME.to_owned(),
            cache_dir: None,
        }
    }
}

/// Phase of a bootstrap, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Phase {
    /// Fetching and checking the Release and Packages files, resolving dependencies.
    Resolving,
    /// Downloading and validating `.deb`s.
    Retrieving,
    /// Extracting the essential packages by hand.
    Extracting,
    /// dpkg unpacking packages.
    Unpacking,
    /// dpkg configuring packages.
    Configuring,
    /// Adding the user, sudoers, host files; removing caches.
    Customizing,
    /// Flushed and renamed into place.
    Done,
}

/// One progress report.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Current phase.
    pub phase: Phase,
    /// Overall completion in `0.0..=1.0`; never decreases within one build.
    pub fraction: f32,
    /// Human-readable detail, e.g. `Retrieving libc6 2.36-9+deb12u10`.
    pub message: String,
}

/// Where each phase starts on the progress bar; retrieval dominates on a
/// slow link, dpkg on a fast one.
const RETRIEVE_START: f32 = 0.05;
const EXTRACT_START: f32 = 0.40;
const INSTALL_START: f32 = 0.50;
const CUSTOMIZE_START: f32 = 0.92;

/// Turns debootstrap's output lines into [`Progress`].
///
/// Packages are counted by name from `Retrieving`/`Validating <name> <version>`
/// lines (cached `.deb`s only show `Validating`); until retrieval ends the
/// total is [`ESTIMATED_PACKAGES`]. Unpacking and configuring alternate
/// (required set, then base set), so they share one span of the bar.
#[derive(Debug)]
pub(crate) struct ProgressParser {
    phase: Phase,
    fraction: f32,
    packages: HashSet<String>,
    extracted: usize,
    installed: usize,
}

impl ProgressParser {
    pub(crate) fn new() -> Self {
        Self {
            phase: Phase::Resolving,
            fraction: 0.0,
            packages: HashSet::new(),
            extracted: 0,
            installed: 0,
        }
    }

    fn total(&self) -> usize {
        if self.phase <= Phase::Retrieving {
            self.packages.len().max(ESTIMATED_PACKAGES)
        } else {
            self.packages.len().max(1)
        }
    }

    /// Feeds one line; returns a report when the line says something.
    pub(crate) fn line(&mut self, line: &str) -> Option<Progress> {
        let msg = line.strip_prefix("I: ")?.trim();
        let mut words = msg.split_whitespace();
        let verb = words.next()?;
        let args: Vec<&str> = words.collect();
        let (phase, fraction) = match (verb, args.as_slice()) {
            ("Retrieving" | "Validating", [name, _version]) => {
                self.packages.insert((*name).to_owned());
                let done = self.packages.len() as f32 / self.total() as f32;
                (
                    Phase::Retrieving,
                    span(RETRIEVE_START, EXTRACT_START, done.min(0.99)),
                )
            }
            ("Extracting", [_]) => {
                self.extracted += 1;
                let done = self.extracted as f32 / self.total() as f32;
                (Phase::Extracting, span(EXTRACT_START, INSTALL_START, done))
            }
            ("Unpacking" | "Configuring", [pkg]) if pkg.ends_with("...") => {
                self.installed += 1;
                let done = self.installed as f32 / (2 * self.total()) as f32;
                let phase = if verb == "Unpacking" {
                    Phase::Unpacking
                } else {
                    Phase::Configuring
                };
                (phase, span(INSTALL_START, CUSTOMIZE_START, done))
            }
            ("Installing", _) | ("Unpacking", _) => (Phase::Unpacking, INSTALL_START),
            ("Configuring", _) => (Phase::Configuring, self.fraction),
            ("Base", _) => (Phase::Configuring, CUSTOMIZE_START),
            _ => (self.phase, self.fraction),
        };
        self.phase = self.phase.max(phase);
        self.fraction = self.fraction.max(fraction);
        Some(Progress {
            phase: self.phase,
            fraction: self.fraction,
            message: msg.trim_end_matches("...").to_owned(),
        })
    }

    /// Packages named so far.
    pub(crate) fn package_count(&self) -> usize {
        self.packages.len()
    }
}

/// `start + done * (end - start)`, `done` clamped to `0..=1`.
fn span(start: f32, end: f32, done: f32) -> f32 {
    start + done.clamp(0.0, 1.0) * (end - start)
}

/// The host's Debian mirrors from apt's sources: `(main, security)`.
///
/// Looks at deb822 `URIs:` lines in `/etc/apt/sources.list.d/*.sources`,
/// then at `deb` lines of `/etc/apt/sources.list`; a URI containing
/// `security` is the security mirror. Only `http(s)://` URIs count.
pub fn host_mirrors() -> (Option<String>, Option<String>) {
    mirrors_from_apt(Path::new("/etc/apt"))
}

fn mirrors_from_apt(etc_apt: &Path) -> (Option<String>, Option<String>) {
    let mut uris = Vec::new();
    let mut sources: Vec<PathBuf> = fs::read_dir(etc_apt.join("sources.list.d"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sources"))
        .collect();
    sources.sort();
    for file in sources {
        let text = fs::read_to_string(file).unwrap_or_default();
        for line in text.lines() {
            if let Some(rest) = line.trim().strip_prefix("URIs:") {
                uris.extend(rest.split_whitespace().map(str::to_owned));
            }
        }
    }
    let list = fs::read_to_string(etc_apt.join("sources.list")).unwrap_or_default();
    for line in list.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        // Skip an options block: `deb [arch=amd64 signed-by=...] uri suite`.
        let mut word = words.next();
        if word.is_some_and(|w| w.starts_with('[')) {
            while let Some(w) = word {
                word = words.next();
                if w.ends_with(']') {
                    break;
                }
            }
        }
        uris.extend(word.map(str::to_owned));
    }
    let usable = |u: &&String| u.starts_with("http://") || u.starts_with("https://");
    let trim = |u: &String| u.trim_end_matches('/').to_owned();
    let main = uris
        .iter()
        .filter(usable)
        .find(|u| !u.contains("security"))
        .map(trim);
    let security = uris
        .iter()
        .filter(usable)
        .find(|u| u.contains("security"))
        .map(trim);
    (main, security)
}

/// Builds the `base` template root file system into `opts.dest`, as the
/// module docs describe. Takes one to a few minutes and about 400 MB.
///
/// `progress` is called from the task running this future, never after it
/// returns. It is `Sync` so the future is `Send` and can be spawned.
pub async fn bootstrap(
    opts: &BootstrapOptions,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<(), ImageError> {
    let started = Instant::now();
    if !nix::unistd::geteuid().is_root() {
        return Err(ImageError::NotRoot {
            action: "debootstrap",
        });
    }
    let debootstrap = find_debootstrap().ok_or(ImageError::DebootstrapMissing)?;
    let dest = &opts.dest;
    if fs::symlink_metadata(dest).is_ok() {
        return Err(ImageError::DestExists { path: dest.clone() });
    }
    let (parent, name) = match (dest.parent(), dest.file_name()) {
        (Some(p), Some(n)) => (
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            },
            n,
        ),
        _ => {
            return Err(ImageError::io(
                "bootstrap into",
                dest,
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            ));
        }
    };
    let (host_main, host_security) = host_mirrors();
    let mirror = opts
        .mirror
        .clone()
        .or(host_main)
        .unwrap_or_else(|| DEFAULT_MIRROR.to_owned());
    let security = host_security.unwrap_or_else(|| DEFAULT_SECURITY_MIRROR.to_owned());

    let suffix: u64 = rand::random();
    let tmp = parent.join(format!("{}.tmp-{suffix:016x}", name.to_string_lossy()));
    fs::create_dir(&tmp).map_err(|e| ImageError::io("create", &tmp, e))?;
    let mut guard = TempRoot {
        path: tmp.clone(),
        armed: true,
    };
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
        .map_err(|e| ImageError::io("chmod", &tmp, e))?;
    tracing::info!(dest = %dest.display(), tmp = %tmp.display(), %mirror, suite = %opts.suite, "debootstrap");

    progress(Progress {
        phase: Phase::Resolving,
        fraction: 0.0,
        message: format!("debootstrap {} from {mirror}", opts.suite),
    });
    let packages = run_debootstrap(&debootstrap, opts, &tmp, &mirror, progress).await?;

    progress(Progress {
        phase: Phase::Customizing,
        fraction: CUSTOMIZE_START,
        message: "adding user `user`, sudoers and host files".to_owned(),
    });
    customize(&tmp, opts, &mirror, &security).await?;

    let dir = fs::File::open(&tmp).map_err(|e| ImageError::io("open", &tmp, e))?;
    nix::unistd::syncfs(dir.as_fd()).map_err(|e| ImageError::io("syncfs", &tmp, e.into()))?;
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &tmp,
        nix::fcntl::AT_FDCWD,
        dest,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(|e| match e {
        nix::errno::Errno::EEXIST => ImageError::DestExists { path: dest.clone() },
        e => ImageError::io("rename into place", dest, e.into()),
    })?;
    guard.armed = false;
    if let Ok(p) = fs::File::open(parent) {
        // Makes the rename durable; failure here loses nothing already done.
        let _ = p.sync_all();
    }
    let bytes = walk::disk_usage(dest).unwrap_or(0);
    let secs = started.elapsed().as_secs();
    tracing::info!(dest = %dest.display(), packages, bytes, secs, "base root file system ready");
    progress(Progress {
        phase: Phase::Done,
        fraction: 1.0,
        message: format!("{packages} packages, {} MB, {secs} s", bytes / 1_000_000),
    });
    Ok(())
}

/// debootstrap's path, looked up in `PATH` and the sbin directories (which a
/// non-login root shell may lack).
fn find_debootstrap() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join("debootstrap"))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// `PATH` for debootstrap and chrooted commands.
const SANE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs debootstrap, reporting progress; returns the number of packages.
async fn run_debootstrap(
    debootstrap: &Path,
    opts: &BootstrapOptions,
    target: &Path,
    mirror: &str,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<usize, ImageError> {
    let mut cmd = Command::new(debootstrap);
    cmd.arg("--variant=minbase").arg("--components=main");
    if !opts.packages.is_empty() {
        cmd.arg(format!("--include={}", opts.packages.join(",")));
    }
    if let Some(cache) = &opts.cache_dir {
        fs::create_dir_all(cache).map_err(|e| ImageError::io("create", cache, e))?;
        cmd.arg(format!("--cache-dir={}", cache.display()));
    }
    cmd.arg(&opts.suite)
        .arg(target)
        .arg(mirror)
        // Messages are parsed: keep them in English.
        .env("LC_ALL", "C")
        .env("LANGUAGE", "C")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("PATH", SANE_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| ImageError::io("run", debootstrap, e))?;
    // Kills dpkg and friends too if this future is dropped mid-way.
    let killer = child.id().map(|pid| GroupKiller {
        pgid: nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
    });

    let stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let stderr_task = async move {
        let mut text = String::new();
        if let Some(err) = stderr.as_mut() {
            let mut buf = Vec::new();
            let _ = err.read_to_end(&mut buf).await;
            text = String::from_utf8_lossy(&buf).into_owned();
        }
        text
    };
    let stdout_task = async {
        let mut parser = ProgressParser::new();
        let mut problems = String::new();
        if let Some(out) = stdout {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(p) = parser.line(&line) {
                    progress(p);
                } else if line.starts_with("E: ") || line.starts_with("W: ") {
                    tracing::warn!(line = %line, "debootstrap");
                    if problems.len() < 4096 {
                        let _ = writeln!(problems, "{line}");
                    }
                }
            }
        }
        (parser, problems)
    };
    let (stderr_text, (parser, problems)) = tokio::join!(stderr_task, stdout_task);
    let status = child
        .wait()
        .await
        .map_err(|e| ImageError::io("wait for", debootstrap, e))?;
    if let Some(killer) = killer {
        killer.disarm();
    }
    if status.success() {
        return Ok(parser.package_count());
    }

    let mut detail = problems.trim().to_owned();
    if !stderr_text.trim().is_empty() {
        let _ = write!(detail, "\n{}", tail(&stderr_text, 10));
    }
    let log = target.join("debootstrap/debootstrap.log");
    if let Ok(text) = fs::read_to_string(&log) {
        let _ = write!(
            detail,
            "\nlast lines of debootstrap.log:\n{}",
            tail(&text, 15)
        );
    }
    if problems.contains("Failed getting release file")
        || problems.contains("Couldn't download")
        || problems.contains("Failed getting Release")
    {
        return Err(ImageError::MirrorUnreachable {
            mirror: mirror.to_owned(),
            detail,
        });
    }
    Err(ImageError::Debootstrap {
        status: status.to_string(),
        detail,
    })
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Everything after debootstrap, inside the new root.
async fn customize(
    root: &Path,
    opts: &BootstrapOptions,
    mirror: &str,
    security: &str,
) -> Result<(), ImageError> {
    let id = USER_ID.to_string();
    chroot(root, "groupadd", &["groupadd", "--gid", &id, "user"]).await?;
    chroot(
        root,
        "useradd",
        &[
            "useradd",
            "--uid",
            &id,
            "--gid",
            &id,
            "--groups",
            "sudo",
            "--create-home",
            "--home-dir",
            "/home/user",
            "--shell",
            "/bin/bash",
            "user",
        ],
    )
    .await?;
    write_file(
        root,
        "etc/sudoers.d/user",
        "user ALL=(ALL:ALL) NOPASSWD: ALL\n",
        0o440,
    )?;
    chroot(
        root,
        "visudo",
        &["visudo", "--check", "--file", "/etc/sudoers.d/user"],
    )
    .await?;
    write_file(root, "etc/hostname", &format!("{}\n", opts.hostname), 0o644)?;
    write_file(
        root,
        "etc/hosts",
        &format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{}\n::1\t\tlocalhost ip6-localhost ip6-loopback\n\
             ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n",
            opts.hostname
        ),
        0o644,
    )?;
    // The runtime provides the sandbox's resolver; debootstrap copied the host's.
    write_file(root, "etc/resolv.conf", "", 0o644)?;
    let suite = &opts.suite;
    write_file(
        root,
        "etc/apt/sources.list",
        &format!(
            "deb {mirror} {suite} main\ndeb {mirror} {suite}-updates main\n\
             deb {security} {suite}-security main\n"
        ),
        0o644,
    )?;
    for dir in [
        "var/cache/apt/archives",
        "var/cache/apt",
        "var/lib/apt/lists",
    ] {
        remove_files_in(&root.join(dir))?;
    }
    for dir in [
        "var/cache/apt/archives/partial",
        "var/lib/apt/lists/partial",
    ] {
        remove_files_in(&root.join(dir))?;
    }
    Ok(())
}

/// Runs `argv` in `root` with a clean environment; `step` names it in errors.
async fn chroot(root: &Path, step: &'static str, argv: &[&str]) -> Result<(), ImageError> {
    let out = Command::new("chroot")
        .arg(root)
        .args(argv)
        .env_clear()
        .env("PATH", SANE_PATH)
        .env("LC_ALL", "C")
        .env("HOME", "/root")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| ImageError::io("run chroot for", root, e))?;
    if out.status.success() {
        return Ok(());
    }
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Err(ImageError::Chroot {
        step,
        status: out.status.to_string(),
        output: output.trim().to_owned(),
    })
}

/// Replaces `root/rel` with a new root-owned file. Whatever was there (a
/// symlink included) is removed first and the new file is created with
/// `O_EXCL`, so nothing outside the root can be written through it.
fn write_file(root: &Path, rel: &str, content: &str, mode: u32) -> Result<(), ImageError> {
    let path = root.join(rel);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ImageError::io("replace", &path, e));
        }
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(|e| ImageError::io("create", &path, e))?;
    f.write_all(content.as_bytes())
        .map_err(|e| ImageError::io("write", &path, e))?;
    // The umask may have masked bits of `mode`.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| ImageError::io("chmod", &path, e))
}

/// Removes the files (not directories) directly in `dir`, if it exists.
fn remove_files_in(dir: &Path) -> Result<(), ImageError> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir {
            let path = entry.path();
            fs::remove_file(&path).map_err(|e| ImageError::io("remove", &path, e))?;
        }
    }
    Ok(())
}

/// SIGKILLs a process group when dropped, unless disarmed.
struct GroupKiller {
    pgid: nix::unistd::Pid,
}

impl GroupKiller {
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(self.pgid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// The half-made root: removed on drop unless disarmed.
struct TempRoot {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        if self.armed {
            remove_half_made(&self.path);
        }
    }
}

/// Unmounts whatever is left mounted below `path` (debootstrap mounts
/// `/proc` and `/sys` in the target and a killed one leaves them), then
/// removes the tree. Never removes through a mount: if one stays, the tree
/// stays too and a warning says so.
fn remove_half_made(path: &Path) {
    let Ok(canonical) = fs::canonicalize(path) else {
        return;
    };
    let mut mounts: Vec<PathBuf> = walk::mount_points_below(&canonical).into_iter().collect();
    // Deepest first.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in &mounts {
        if let Err(err) = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(mount = %m.display(), ?err, "cannot unmount in a failed bootstrap");
        }
    }
    if !walk::mount_points_below(&canonical).is_empty() {
        tracing::warn!(path = %path.display(), "leaving a failed bootstrap in place: still has mounts");
        return;
    }
    if let Err(err) = fs::remove_dir_all(path) {
        tracing::warn!(path = %path.display(), ?err, "cannot remove a failed bootstrap");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(parser: &mut ProgressParser, lines: &[&str]) -> Vec<Progress> {
        lines.iter().filter_map(|l| parser.line(l)).collect()
    }

    #[test]
    fn progress_follows_debootstrap_phases_and_never_goes_back() {
        let mut parser = ProgressParser::new();
        let mut lines = vec![
            "I: Retrieving InRelease ".to_owned(),
            "I: Checking Release signature".to_owned(),
            "I: Valid Release signature (key id 4D64FEC119C2029067D6E791F8D2585B8783D481)"
                .to_owned(),
            "I: Retrieving Packages ".to_owned(),
            "I: Validating Packages ".to_owned(),
            "I: Resolving dependencies of required packages...".to_owned(),
            "I: Resolving dependencies of base packages...".to_owned(),
            "I: Checking component main on http://deb.debian.org/debian...".to_owned(),
        ];
        let pkgs: Vec<String> = (0..200).map(|i| format!("pkg{i}")).collect();
        for p in &pkgs {
            lines.push(format!("I: Retrieving {p} 1.0-1"));
            lines.push(format!("I: Validating {p} 1.0-1"));
        }
        lines.push("I: Chosen extractor for .deb packages: dpkg-deb".to_owned());
        for p in &pkgs[..80] {
            lines.push(format!("I: Extracting {p}..."));
        }
        lines.push("I: Installing core packages...".to_owned());
        lines.push("I: Unpacking required packages...".to_owned());
        for p in &pkgs[..80] {
            lines.push(format!("I: Unpacking {p}:amd64..."));
        }
        lines.push("I: Configuring required packages...".to_owned());
        for p in &pkgs[..80] {
            lines.push(format!("I: Configuring {p}:amd64..."));
        }
        lines.push("I: Unpacking the base system...".to_owned());
        for p in &pkgs[80..] {
            lines.push(format!("I: Unpacking {p}:amd64..."));
        }
        lines.push("I: Configuring the base system...".to_owned());
        for p in &pkgs[80..] {
            lines.push(format!("I: Configuring {p}:amd64..."));
        }
        lines.push("I: Base system installed successfully.".to_owned());
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let reports = feed(&mut parser, &refs);

        assert_eq!(reports.len(), lines.len());
        assert_eq!(parser.package_count(), 200);
        for pair in reports.windows(2) {
            assert!(pair[1].fraction >= pair[0].fraction, "{pair:?}");
            assert!(pair[1].phase >= pair[0].phase, "{pair:?}");
        }
        assert_eq!(reports[0].phase, Phase::Resolving);
        assert!(reports[0].fraction.abs() < f32::EPSILON);
        let first_pkg = &reports[8];
        assert_eq!(first_pkg.phase, Phase::Retrieving);
        assert_eq!(first_pkg.message, "Retrieving pkg0 1.0-1");
        let last_retrieve = &reports[8 + 399];
        assert!(last_retrieve.fraction < EXTRACT_START, "{last_retrieve:?}");
        assert!(last_retrieve.fraction > 0.35, "{last_retrieve:?}");
        let extracting = reports
            .iter()
            .find(|r| r.phase == Phase::Extracting)
            .unwrap();
        assert_eq!(extracting.message, "Extracting pkg0");
        assert!(
            reports
                .iter()
                .any(|r| r.phase == Phase::Configuring && r.message == "Configuring pkg5:amd64")
        );
        let last = reports.last().unwrap();
        assert!((last.fraction - CUSTOMIZE_START).abs() < 1e-4, "{last:?}");
        assert!(last.fraction <= 1.0);
    }

    #[test]
    fn cached_debs_count_through_validating_only() {
        let mut parser = ProgressParser::new();
        feed(
            &mut parser,
            &[
                "I: Validating libc6 2.36-9",
                "I: Validating bash 5.2.15-2",
                "I: Retrieving bash 5.2.15-2",
                "I: Validating bash 5.2.15-2",
            ],
        );
        assert_eq!(parser.package_count(), 2);
    }

    #[test]
    fn other_lines_are_not_progress() {
        let mut parser = ProgressParser::new();
        assert!(parser.line("W: Failure trying to run: chroot x").is_none());
        assert!(parser.line("E: Couldn't download packages").is_none());
        assert!(parser.line("random dpkg noise").is_none());
    }

    #[test]
    fn mirrors_come_from_deb822_or_one_line_sources() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path();
        assert_eq!(mirrors_from_apt(etc), (None, None));

        fs::write(
            etc.join("sources.list"),
            "# deb http://old/debian bookworm main\n\
             deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian/ bookworm main\n\
             deb http://one.example/debian-security bookworm-security main\n",
        )
        .unwrap();
        assert_eq!(
            mirrors_from_apt(etc),
            (
                Some("http://one.example/debian".to_owned()),
                Some("http://one.example/debian-security".to_owned())
            )
        );

        fs::create_dir(etc.join("sources.list.d")).unwrap();
        fs::write(
            etc.join("sources.list.d/debian.sources"),
            "Types: deb\n# http://snapshot.debian.org/archive/debian/x\n\
             URIs: http://deb.example/debian\nSuites: bookworm\n\n\
             Types: deb\nURIs: http://deb.example/debian-security\nSuites: bookworm-security\n",
        )
        .unwrap();
        fs::write(
            etc.join("sources.list.d/cdrom.sources"),
            "URIs: cdrom:/media\n",
        )
        .unwrap();
        assert_eq!(
            mirrors_from_apt(etc),
            (
                Some("http://deb.example/debian".to_owned()),
                Some("http://deb.example/debian-security".to_owned())
            )
        );
    }

    #[test]
    fn write_file_replaces_a_symlink_instead_of_following_it() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::write(&outside, b"keep").unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("etc/resolv.conf")).unwrap();
        write_file(&root, "etc/resolv.conf", "", 0o644).unwrap();
        assert_eq!(fs::read(&outside).unwrap(), b"keep");
        let meta = fs::symlink_metadata(root.join("etc/resolv.conf")).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        write_file(&root, "etc/sudoers.d-user", "x\n", 0o440).unwrap();
        let meta = fs::metadata(root.join("etc/sudoers.d-user")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o440);
    }

    #[test]
    fn remove_half_made_removes_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("x.tmp-1");
        fs::create_dir_all(t.join("a/b")).unwrap();
        fs::write(t.join("a/b/c"), b"x").unwrap();
        remove_half_made(&t);
        assert!(!t.exists());
    }

    #[test]
    fn bootstrap_future_is_send_so_the_node_can_spawn_it() {
        fn is_send<T: Send>(_: &T) {}
        let opts = BootstrapOptions::base("/nonexistent/rootfs");
        let fut = bootstrap(&opts, &|_| {});
        is_send(&fut);
    }

    #[tokio::test]
    async fn bootstrap_refuses_an_existing_destination() {
        if !nix::unistd::geteuid().is_root() || find_debootstrap().is_none() {
            eprintln!("skipped: needs root and debootstrap to get past the first checks");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let err = bootstrap(&BootstrapOptions::base(dir.path()), &|_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, ImageError::DestExists { .. }), "{err}");
    }
}
