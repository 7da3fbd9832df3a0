//! `arca __apply`: writes files into a running sandbox's root file system
//! the way a process inside it would, for build steps such as COPY and
//! WORKDIR and for adding the `user` account to a template.
//!
//! A fresh single-threaded re-exec of the `arca` binary joins the sandbox's
//! network, mount and user namespaces (in that order: the first two belong
//! to the host's user namespace) and becomes the sandbox's root. Every path
//! is then resolved by the kernel inside the sandbox's root: a symlink in
//! the image can point only at other places in the sandbox, never at the
//! host. Ownership is written in the sandbox's own ids and lands shifted on
//! disk through the id map, and the overlay records the changes in the
//! sandbox's writable layer (whiteouts included) like any other write.
//!
//! The process stays in the host's pid namespace, out of the sandbox's view
//! (its processes cannot name it), and marks itself non-dumpable so nothing
//! can attach to it.
//!
//! Input: a tar stream on stdin whose entry names are absolute paths inside
//! the sandbox (directories, regular files, symlinks). Output: one JSON line,
//! `{"ok": true}` or `{"error": "..."}`.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sched::{CloneFlags, setns};
use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};

use crate::RuntimeError;

/// What `arca __apply` does besides unpacking its tar stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyOptions {
    /// Host pid of a process of the sandbox (its PID 1).
    pub pid: i32,
    /// `--chown`: `user[:group]` (names or numbers, resolved in the
    /// sandbox's `/etc/passwd` and `/etc/group`) for every entry of the
    /// stream; otherwise the entries' own numeric ids are used.
    pub chown: Option<String>,
    /// `--chmod`: mode for every entry (files and directories).
    pub chmod: Option<u32>,
    /// Adds the account `user` (uid and gid 1000, home `/home/user`) when the
    /// image has none, so every template has the user E2B's SDKs run as.
    pub ensure_user: bool,
    /// Instead of writing: archives these paths (inside the sandbox, not
    /// following symlinks) as a tar into the host file
    /// [`ApplyOptions::extract_to`], opened before the namespaces change.
    /// Missing paths are skipped. For `COPY --from=<stage>`.
    #[serde(default)]
    pub extract: Vec<String>,
    /// Host file the extract archive is written to (created).
    #[serde(default)]
    pub extract_to: Option<std::path::PathBuf>,
}

/// Runs `init_exe __apply` against a sandbox with `tar` (a tar stream as
/// described in the module docs) on its stdin. Blocking.
pub fn apply(
    init_exe: &Path,
    options: &ApplyOptions,
    tar: impl Into<Stdio>,
) -> Result<(), RuntimeError> {
    let json = serde_json::to_string(options).map_err(|e| RuntimeError::Init(e.to_string()))?;
    let out = Command::new(init_exe)
        .arg("__apply")
        .arg(json)
        .stdin(tar)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env_clear()
        .output()
        .map_err(|source| RuntimeError::Spawn {
            exe: init_exe.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line: serde_json::Value = serde_json::from_str(text.trim()).map_err(|_| {
        RuntimeError::Init(format!(
            "apply exited with {} and printed no result: {text:?}",
            out.status
        ))
    })?;
    if line.get("ok").and_then(serde_json::Value::as_bool) == Some(true) {
        return Ok(());
    }
    Err(RuntimeError::Init(
        line.get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("apply failed without a message")
            .to_string(),
    ))
}

type Res<T> = Result<T, String>;

/// Entry point of `arca __apply <options json>`; returns the exit code.
pub fn apply_main() -> i32 {
    let result = std::env::args()
        .nth(2)
        .ok_or_else(|| "usage: arca __apply <options json>".to_string())
        .and_then(|a| serde_json::from_str::<ApplyOptions>(&a).map_err(|e| e.to_string()))
        .and_then(|opts| run(&opts, std::io::stdin().lock()));
    let (line, code) = match result {
        Ok(()) => (serde_json::json!({"ok": true}), 0),
        Err(e) => (serde_json::json!({ "error": e }), 1),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    code
}

fn run(opts: &ApplyOptions, input: impl Read) -> Res<()> {
    if let Some(out) = &opts.extract_to {
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(out)
            .map_err(|e| format!("{}: {e}", out.display()))?;
        enter(opts.pid)?;
        return extract(&opts.extract, file);
    }
    enter(opts.pid)?;
    let ids = Ids::load();
    let owner = match &opts.chown {
        Some(spec) => Some(ids.resolve_chown(spec)?),
        None => None,
    };
    let mut archive = tar::Archive::new(input);
    for entry in archive
        .entries()
        .map_err(|e| format!("reading the archive: {e}"))?
    {
        let mut entry = entry.map_err(|e| format!("reading the archive: {e}"))?;
        write_entry(&mut entry, owner, opts.chmod)?;
    }
    if opts.ensure_user {
        ensure_user(&ids)?;
    }
    Ok(())
}

/// Writes a tar of `paths` (absolute inside the sandbox) to `out`.
fn extract(paths: &[String], out: fs::File) -> Res<()> {
    let mut tar = tar::Builder::new(std::io::BufWriter::new(out));
    tar.follow_symlinks(false);
    for raw in paths {
        let wanted = clean_path(Path::new(raw))?;
        // Symlinks on the way resolve inside the sandbox (`/lib ->
        // usr/lib`), as Docker resolves them in the source stage; the
        // result is archived under the name asked for.
        let Ok(real) = fs::canonicalize(&wanted) else {
            continue;
        };
        let Ok(meta) = fs::symlink_metadata(&real) else {
            continue;
        };
        let name = wanted.strip_prefix("/").unwrap_or(&wanted).to_path_buf();
        if meta.is_dir() {
            append_tree(&mut tar, &real, &name, meta.dev())?;
        } else {
            tar.append_path_with_name(&real, &name)
                .map_err(|e| format!("archiving {}: {e}", real.display()))?;
        }
    }
    let mut w = tar
        .into_inner()
        .map_err(|e| format!("writing the archive: {e}"))?;
    w.flush().map_err(|e| format!("writing the archive: {e}"))
}

/// Archives the tree at `dir` as `name`, without following symlinks and
/// without entering other file systems (`/proc`, `/sys`, `/dev`, `/run`).
fn append_tree<W: Write>(tar: &mut tar::Builder<W>, dir: &Path, name: &Path, dev: u64) -> Res<()> {
    let err = |p: &Path, e: std::io::Error| format!("archiving {}: {e}", p.display());
    if !name.as_os_str().is_empty() {
        tar.append_path_with_name(dir, name)
            .map_err(|e| err(dir, e))?;
    }
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| err(dir, e))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    entries.sort();
    for entry in entries {
        let path = dir.join(&entry);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        let sub = name.join(&entry);
        if meta.is_dir() {
            append_tree(tar, &path, &sub, dev)?;
        } else {
            tar.append_path_with_name(&path, &sub)
                .map_err(|e| err(&path, e))?;
        }
    }
    Ok(())
}

/// Joins the sandbox's namespaces and becomes its root.
fn enter(pid: i32) -> Res<()> {
    // Open every namespace first: /proc is the sandbox's once the mount
    // namespace changes.
    let open = |ns: &str| {
        fs::File::open(format!("/proc/{pid}/ns/{ns}"))
            .map_err(|e| format!("sandbox process {pid}: {ns} namespace: {e}"))
    };
    let (net, mnt, user) = (open("net")?, open("mnt")?, open("user")?);
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("prctl: {e}"))?;
    setns(&net, CloneFlags::CLONE_NEWNET).map_err(|e| format!("joining the network: {e}"))?;
    setns(&mnt, CloneFlags::CLONE_NEWNS).map_err(|e| format!("joining the mounts: {e}"))?;
    setns(&user, CloneFlags::CLONE_NEWUSER).map_err(|e| format!("joining the users: {e}"))?;
    // setgroups may be denied in the namespace; the supplementary groups
    // of host root do not mean anything inside anyway.
    let _ = nix::unistd::setgroups(&[]);
    nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
        .map_err(|e| format!("becoming sandbox root: {e}"))?;
    nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
        .map_err(|e| format!("becoming sandbox root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    Ok(())
}

/// A path inside the sandbox made of normal components only.
fn clean_path(raw: &Path) -> Res<PathBuf> {
    let mut out = PathBuf::from("/");
    for c in raw.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("refusing path {}: '..' in it", raw.display()));
            }
        }
    }
    Ok(out)
}

/// Creates the missing parents of `path` as root-owned 0755 directories.
/// Existing components are followed as the kernel follows them (inside the
/// sandbox's root).
///
/// With `owner`, the directories it creates get that owner (as BuildKit
/// gives `COPY --chown` destinations): a user copying into a new directory
/// can write there afterwards.
fn make_parents(path: &Path, owner: Option<(u32, u32)>) -> Res<()> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    let mut missing = Vec::new();
    let mut p = parent;
    while fs::metadata(p).is_err() {
        missing.push(p.to_path_buf());
        match p.parent() {
            Some(up) => p = up,
            None => break,
        }
    }
    for dir in missing.iter().rev() {
        match fs::DirBuilder::new().mode(0o755).create(dir) {
            Ok(()) => {
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                        .map_err(|e| format!("chown {}: {e}", dir.display()))?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("creating {}: {e}", dir.display())),
        }
    }
    Ok(())
}

/// Removes whatever non-directory is at `path` (a file or symlink is
/// replaced, as Docker's COPY replaces it).
fn clear_non_dir(path: &Path) -> Res<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if !m.is_dir() => {
            fs::remove_file(path).map_err(|e| format!("replacing {}: {e}", path.display()))
        }
        _ => Ok(()),
    }
}

fn write_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    owner: Option<(u32, u32)>,
    chmod: Option<u32>,
) -> Res<()> {
    let raw = entry
        .path()
        .map_err(|e| format!("reading the archive: {e}"))?
        .into_owned();
    let path = clean_path(&raw)?;
    let header = entry.header();
    let kind = header.entry_type();
    let header_mode = header.mode().unwrap_or(0o644) & 0o7777;
    let (uid, gid) = owner.unwrap_or((
        header
            .uid()
            .ok()
            .and_then(|u| u32::try_from(u).ok())
            .unwrap_or(0),
        header
            .gid()
            .ok()
            .and_then(|g| u32::try_from(g).ok())
            .unwrap_or(0),
    ));
    let mtime = header.mtime().unwrap_or(0);
    make_parents(&path, owner)?;
    let shown = path.display();
    let mode = chmod.unwrap_or(header_mode);
    if kind.is_dir() {
        // A directory already there, or a symlink to one (`/bin` on merged
        // /usr systems), is kept as it is.
        if fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
            return Ok(());
        }
        clear_non_dir(&path)?;
        match fs::DirBuilder::new().mode(0o755).create(&path) {
            Ok(()) => {}
            // An existing directory (or a symlink to one) keeps its owner
            // and mode, as with Docker: `WORKDIR /tmp` must not make /tmp
            // 0755.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(format!("creating {shown}: {e}")),
        }
        std::os::unix::fs::chown(&path, Some(uid), Some(gid))
            .map_err(|e| format!("chown {shown}: {e}"))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod {shown}: {e}"))?;
    } else if kind.is_symlink() {
        let target = entry
            .link_name()
            .map_err(|e| format!("reading the archive: {e}"))?
            .ok_or_else(|| format!("symlink {shown} without a target"))?
            .into_owned();
        clear_non_dir(&path)?;
        std::os::unix::fs::symlink(&target, &path).map_err(|e| format!("symlink {shown}: {e}"))?;
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
            .map_err(|e| format!("chown {shown}: {e}"))?;
    } else if kind.is_file() {
        clear_non_dir(&path)?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| format!("creating {shown}: {e}"))?;
        std::io::copy(entry, &mut f).map_err(|e| format!("writing {shown}: {e}"))?;
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
            .map_err(|e| format!("chown {shown}: {e}"))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod {shown}: {e}"))?;
        let t = i64::try_from(mtime).unwrap_or(0);
        let ts = nix::sys::time::TimeSpec::new(t, 0);
        let _ = nix::sys::stat::futimens(&f, &ts, &ts);
    } else {
        return Err(format!("{shown}: unsupported entry type {kind:?}"));
    }
    Ok(())
}

/// Users and groups of the sandbox's `/etc/passwd` and `/etc/group`.
struct Ids {
    users: HashMap<String, (u32, u32, String)>,
    groups: HashMap<String, u32>,
}

impl Ids {
    fn load() -> Ids {
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
        let mut users = HashMap::new();
        for line in read("/etc/passwd").lines() {
            let f: Vec<&str> = line.split(':').collect();
            if let [name, _, uid, gid, _, home, ..] = f[..] {
                if let (Ok(u), Ok(g)) = (uid.parse(), gid.parse()) {
                    users.insert(name.to_string(), (u, g, home.to_string()));
                }
            }
        }
        let mut groups = HashMap::new();
        for line in read("/etc/group").lines() {
            let f: Vec<&str> = line.split(':').collect();
            if let [name, _, gid, ..] = f[..] {
                if let Ok(g) = gid.parse() {
                    groups.insert(name.to_string(), g);
                }
            }
        }
        Ids { users, groups }
    }

    /// `user[:group]` to ids, as Docker resolves `--chown`.
    fn resolve_chown(&self, spec: &str) -> Res<(u32, u32)> {
        let (user, group) = spec
            .split_once(':')
            .map_or((spec, None), |(u, g)| (u, Some(g)));
        let (uid, primary) = match user.parse::<u32>() {
            Ok(uid) => (
                uid,
                self.users
                    .values()
                    .find(|(u, _, _)| *u == uid)
                    .map_or(uid, |(_, g, _)| *g),
            ),
            Err(_) => self
                .users
                .get(user)
                .map(|(u, g, _)| (*u, *g))
                .ok_or_else(|| format!("--chown {spec}: no user '{user}' in /etc/passwd"))?,
        };
        let gid = match group {
            None => primary,
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => *self
                    .groups
                    .get(g)
                    .ok_or_else(|| format!("--chown {spec}: no group '{g}' in /etc/group"))?,
            },
        };
        if uid > 65535 || gid > 65535 {
            return Err(format!(
                "--chown {spec}: ids above 65535 do not exist in a sandbox"
            ));
        }
        Ok((uid, gid))
    }
}

/// Appends `user` (uid/gid 1000) to the account files and makes its home,
/// unless a `user` account exists.
fn ensure_user(ids: &Ids) -> Res<()> {
    if ids.users.contains_key("user") {
        return Ok(());
    }
    // uid 1000 where free (E2B's), else the next free one, as useradd
    // picks (`node` and `ubuntu` images have 1000 taken).
    let taken_uid = |id: u32| ids.users.values().any(|(u, _, _)| *u == id);
    let taken_gid = |id: u32| ids.groups.values().any(|g| *g == id);
    let uid = (1000..60000)
        .find(|id| !taken_uid(*id))
        .ok_or("no free uid for the account 'user'")?;
    let gid = match ids.groups.get("user") {
        Some(g) => *g,
        None => (uid..60000)
            .find(|id| !taken_gid(*id))
            .ok_or("no free gid for the account 'user'")?,
    };
    let shell = if Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let append = |p: &str, line: String| -> Res<()> {
        make_parents(Path::new(p), None)?;
        let mut text = fs::read_to_string(p).unwrap_or_default();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&line);
        // Rewrite rather than append: the file may be a lower layer's, and
        // a fresh write copies it up whole either way.
        let _ = fs::remove_file(p);
        fs::write(p, text).map_err(|e| format!("writing {p}: {e}"))?;
        fs::set_permissions(p, fs::Permissions::from_mode(0o644))
            .map_err(|e| format!("chmod {p}: {e}"))
    };
    append(
        "/etc/passwd",
        format!("user:x:{uid}:{gid}::/home/user:{shell}\n"),
    )?;
    if !ids.groups.contains_key("user") {
        append("/etc/group", format!("user:x:{gid}:\n"))?;
    }
    let home = Path::new("/home/user");
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(home)
    {
        Ok(()) => {}
        Err(e) => return Err(format!("creating /home/user: {e}")),
    }
    std::os::unix::fs::chown(home, Some(uid), Some(gid))
        .map_err(|e| format!("chown /home/user: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_and_parent_components_refused() {
        assert_eq!(clean_path(Path::new("a/./b")).unwrap(), Path::new("/a/b"));
        assert_eq!(clean_path(Path::new("/x/y/")).unwrap(), Path::new("/x/y"));
        assert!(clean_path(Path::new("/a/../../etc")).is_err());
    }

    #[test]
    fn chown_specs_resolve_by_name_and_number() {
        let mut ids = Ids {
            users: HashMap::new(),
            groups: HashMap::new(),
        };
        ids.users
            .insert("user".into(), (1000, 1000, "/home/user".into()));
        ids.groups.insert("staff".into(), 50);
        assert_eq!(ids.resolve_chown("user").unwrap(), (1000, 1000));
        assert_eq!(ids.resolve_chown("user:staff").unwrap(), (1000, 50));
        assert_eq!(ids.resolve_chown("1000:7").unwrap(), (1000, 7));
        assert_eq!(ids.resolve_chown("42").unwrap(), (42, 42));
        assert!(ids.resolve_chown("nobody").unwrap_err().contains("no user"));
        assert!(ids.resolve_chown("user:nogroup").is_err());
        assert!(ids.resolve_chown("70000").is_err());
    }
}
