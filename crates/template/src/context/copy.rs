//! COPY sources resolved against a build context into a list of entries.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::glob::{BadPattern, Glob, has_meta, unescape};
use super::ignore::DockerIgnore;
use crate::plan::{CopyFrom, CopySpec, Source};

/// Mode of a file made from a heredoc (`COPY <<EOF`), as Docker gives it.
pub const INLINE_FILE_MODE: u32 = 0o644;

/// Symlinks followed while resolving one source path before giving up (as
/// Linux's `MAXSYMLINKS`).
const MAX_SYMLINK_HOPS: usize = 40;

/// What a COPY would write, in order: parents before children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyPlan {
    /// The entries, sorted by destination path component by component, so
    /// a directory comes before everything in it. Each destination occurs
    /// once (a later source replaces an earlier one, as in Docker).
    /// Parents of an entry that are not themselves entries (the `/app` of
    /// `COPY a.txt /app/`) are the executor's to create: Docker makes them
    /// `0755`, owned as `--chown` says.
    pub entries: Vec<CopyEntry>,
    /// Hex SHA-256 over every entry's destination, kind, mode, symlink
    /// target and file content (never times, owners or host paths): the
    /// `inputs_hash` of [`crate::cache::step_key`].
    pub content_hash: String,
}

/// One path a COPY writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyEntry {
    /// Host path of the source inside the context: the file to read for
    /// [`EntryKind::File`], the directory or link it comes from otherwise;
    /// empty for [`EntryKind::Inline`], which has no source file.
    pub src: PathBuf,
    /// Absolute, normalized path inside the image (`/` for the root).
    pub dest: String,
    /// What to put there.
    pub kind: EntryKind,
    /// Permission bits (`0o7777` at most) after `--chmod`; `0o777` for
    /// symlinks, whose mode Linux ignores.
    pub mode: u32,
}

/// The kind of a [`CopyEntry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file whose content is read from [`CopyEntry::src`].
    File,
    /// A file made from a heredoc (`COPY <<EOF`): its content.
    Inline(Vec<u8>),
    /// A directory (created if missing; its mode set either way, as Docker
    /// copies a source directory's metadata onto the destination).
    Dir,
    /// A symlink, copied as the link itself: its target, as stored.
    Symlink(PathBuf),
}

/// A COPY that cannot be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CopyError {
    /// Every source was a wildcard and none matched.
    #[error("COPY failed: no source files were specified; check the paths and .dockerignore")]
    NoSourceFiles,
    /// A source without wildcards does not exist in the context (or is
    /// excluded by `.dockerignore`).
    #[error(
        "COPY failed: file not found in build context or excluded by .dockerignore: `{source_path}`"
    )]
    SourceNotFound {
        /// The source as written.
        source_path: String,
    },
    /// Several sources (or a wildcard matching several) with a destination
    /// that does not end in `/`.
    #[error(
        "When using COPY with more than one source file, the destination must be a directory and end with a /"
    )]
    DestNotDirectory,
    /// A source reached through a symlink that leads out of the context.
    #[error(
        "COPY failed: source `{source_path}` goes through a symlink that leads outside the build context"
    )]
    SourceEscapes {
        /// The source as written.
        source_path: String,
    },
    /// A malformed wildcard.
    #[error("COPY failed: bad wildcard in source `{source_path}` (unclosed `[` or trailing `\\`)")]
    BadPattern {
        /// The source as written.
        source_path: String,
    },
    /// `--chmod` (or an E2B mode) that is not an octal mode.
    #[error("bad --chmod value `{value}`; give an octal mode such as 0755")]
    BadChmod {
        /// The value as written.
        value: String,
    },
    /// `--chown` that is not `user`, `user:group`, `uid` or `uid:gid`.
    #[error("bad --chown value `{value}`; give user, user:group, uid or uid:gid")]
    BadChown {
        /// The value as written.
        value: String,
    },
    /// A path in the context whose name is not UTF-8 (image paths are
    /// strings here).
    #[error("COPY failed: `{}` has a name that is not UTF-8; rename it", path.display())]
    NonUtf8Path {
        /// The host path.
        path: PathBuf,
    },
    /// `COPY --from=<stage or image>`: those sources are not in a context
    /// directory; the builder copies them out of the other file system.
    #[error("COPY --from a stage or image is not resolved against a build context")]
    NotFromContext,
    /// Reading the context failed.
    #[error("cannot read {} in the build context", path.display())]
    Io {
        /// What was being read.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl CopyError {
    /// Whether the COPY (or the context) is at fault rather than the node:
    /// everything but [`CopyError::Io`].
    pub fn is_invalid_input(&self) -> bool {
        !matches!(self, Self::Io { .. })
    }
}

/// Reads a `--chmod` value (or an E2B COPY mode): octal digits only, at most
/// `07777` (`755`, `0644`, `4755`). Symbolic modes (`u+x`) are refused.
///
/// # Errors
///
/// [`CopyError::BadChmod`] for anything else.
pub fn parse_chmod(value: &str) -> Result<u32, CopyError> {
    let bad = || CopyError::BadChmod {
        value: value.to_owned(),
    };
    if value.is_empty() || !value.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(bad());
    }
    let digits = value.trim_start_matches('0');
    if digits.len() > 4 {
        return Err(bad());
    }
    let mode =
        u32::from_str_radix(if digits.is_empty() { "0" } else { digits }, 8).map_err(|_| bad())?;
    if mode > 0o7777 {
        return Err(bad());
    }
    Ok(mode)
}

/// Splits a `--chown` value (or an E2B COPY user) into user and group:
/// `app` is `("app", None)`, `app:staff` is `("app", Some("staff"))`, ids
/// likewise. Names are resolved to ids inside the sandbox, against its
/// `/etc/passwd` and `/etc/group`; with no group, Docker uses the user's id
/// as the group id and E2B a group named like the user.
///
/// # Errors
///
/// [`CopyError::BadChown`] for an empty user or group, more than one `:`,
/// or whitespace.
pub fn parse_chown(value: &str) -> Result<(String, Option<String>), CopyError> {
    let bad = || CopyError::BadChown {
        value: value.to_owned(),
    };
    let ok = |s: &str| !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c == ':');
    match value.split_once(':') {
        None if ok(value) => Ok((value.to_owned(), None)),
        Some((user, group)) if ok(user) && ok(group) => {
            Ok((user.to_owned(), Some(group.to_owned())))
        }
        _ => Err(bad()),
    }
}

/// Resolves a COPY against a build context directory, following Docker:
///
/// - each source is a path relative to `context` (a leading `/` and `..`
///   are clamped to the context root, as Docker does) or a wildcard with
///   `*`, `?`, `[...]` per path component (`**` is a plain `*`, as in
///   Docker's COPY); `.dockerignore`d paths do not exist for COPY;
/// - a file source is copied to `dest`, or into it when `dest` ends in `/`;
/// - a directory source copies its contents (not the directory itself)
///   into `dest`; a wildcard matching a directory does the same;
/// - several sources, or a wildcard matching several paths, need a `dest`
///   ending in `/`;
/// - a relative `dest` is relative to `workdir`;
/// - symlinks inside copied directories are copied as links; a source that
///   is itself a symlink is followed when it leads to a path inside the
///   context (as Docker does) and copied as the link when it leads outside,
///   so nothing outside `context` is ever read;
/// - a heredoc source becomes an [`EntryKind::Inline`] file named after its
///   delimiter when `dest` is a directory, mode `0644`;
/// - `--chmod` sets the mode of every file and directory.
///
/// For [`CopyFrom::Files`] (an E2B COPY, `context` being its unpacked
/// upload) a wildcard source keeps the matched paths relative to the
/// wildcard's directory, `**` spans directories, `dest` is always a
/// directory for it, and a source that is a symlink is copied as the link,
/// as E2B does; everything else is as above.
///
/// Devices, FIFOs and sockets in the context are skipped.
///
/// # Errors
///
/// [`CopyError::SourceNotFound`] naming a missing (or excluded) literal
/// source, [`CopyError::NoSourceFiles`] when only wildcards were given and
/// none matched, [`CopyError::DestNotDirectory`], [`CopyError::BadChmod`],
/// [`CopyError::SourceEscapes`], [`CopyError::BadPattern`],
/// [`CopyError::NotFromContext`] for `--from` a stage or image, and
/// [`CopyError::Io`] when the context cannot be read.
pub fn resolve_copy(
    context: &Path,
    spec: &CopySpec,
    workdir: &str,
    ignore: &DockerIgnore,
) -> Result<CopyPlan, CopyError> {
    let e2b = match &spec.from {
        None => false,
        Some(CopyFrom::Files(_)) => true,
        Some(CopyFrom::Stage(_) | CopyFrom::Image(_)) => return Err(CopyError::NotFromContext),
    };
    let chmod = spec.chmod.as_deref().map(parse_chmod).transpose()?;
    let (dest, mut dest_is_dir) = dest_path(&spec.dest, workdir);
    let mut r = Resolver {
        context,
        ignore,
        chmod,
        entries: BTreeMap::new(),
    };

    // Resolve every source to what it matched first: the destination rule
    // depends on how many paths there are.
    let mut items: Vec<Item> = Vec::new();
    for source in &spec.sources {
        match source {
            Source::Inline { name, content } => items.push(Item::Inline { name, content }),
            Source::Path(path) => {
                let comps = clamp(path);
                let split = comps.iter().position(|c| has_meta(c));
                match split {
                    None => {
                        let literal: Vec<String> = comps.iter().map(|c| unescape(c)).collect();
                        match r.resolve(&literal, !e2b, path)? {
                            Some(found) => items.push(Item::Found {
                                name: literal.last().cloned(),
                                found,
                                rel: Vec::new(),
                            }),
                            None => {
                                return Err(CopyError::SourceNotFound {
                                    source_path: path.clone(),
                                });
                            }
                        }
                    }
                    Some(at) => {
                        if e2b {
                            dest_is_dir = true;
                        }
                        let base: Vec<String> = comps[..at].iter().map(|c| unescape(c)).collect();
                        let pattern = comps[at..].join("/");
                        let glob = Glob::new(&pattern, e2b).map_err(|BadPattern| {
                            CopyError::BadPattern {
                                source_path: path.clone(),
                            }
                        })?;
                        for (rel, real) in r.glob(&base, &glob, path)? {
                            let found = r.resolve(&real, !e2b, path)?.ok_or_else(|| {
                                CopyError::SourceNotFound {
                                    source_path: path.clone(),
                                }
                            })?;
                            items.push(Item::Found {
                                name: rel.last().cloned(),
                                found,
                                rel: if e2b { rel } else { Vec::new() },
                            });
                        }
                    }
                }
            }
        }
    }
    // Literal sources either matched or failed above, so only wildcards
    // can leave nothing.
    if items.is_empty() {
        return Err(CopyError::NoSourceFiles);
    }
    let several = spec.sources.len() > 1 || items.len() > 1;
    if several && !dest_is_dir {
        return Err(CopyError::DestNotDirectory);
    }

    for item in items {
        match item {
            Item::Inline { name, content } => {
                let at = if dest_is_dir {
                    child(&dest, name)
                } else {
                    dest.clone()
                };
                let mode = chmod.unwrap_or(INLINE_FILE_MODE);
                r.insert(
                    at,
                    PathBuf::new(),
                    EntryKind::Inline(content.as_bytes().to_vec()),
                    mode,
                );
            }
            Item::Found { name, found, rel } => {
                // Where the item lands: E2B globs keep their relative path;
                // otherwise into dest by name, or dest itself.
                let at = if !rel.is_empty() {
                    rel.iter().fold(dest.clone(), |d, c| child(&d, c))
                } else {
                    match (&found, dest_is_dir, name) {
                        (Found::Dir { .. }, _, _) => dest.clone(),
                        (_, true, Some(name)) => child(&dest, &name),
                        _ => dest.clone(),
                    }
                };
                match found {
                    Found::Dir { real, mode } => {
                        r.insert(at.clone(), r.host(&real), EntryKind::Dir, mode);
                        r.tree(&real, &at)?;
                    }
                    Found::File { real, mode } => {
                        r.insert(at, r.host(&real), EntryKind::File, mode);
                    }
                    Found::Link { real, target } => {
                        r.insert(at, r.host(&real), EntryKind::Symlink(target), 0o777);
                    }
                }
            }
        }
    }

    let entries: Vec<CopyEntry> = r.entries.into_values().collect();
    let content_hash = content_hash(&entries)?;
    Ok(CopyPlan {
        entries,
        content_hash,
    })
}

/// A matched source before it is placed.
enum Item<'a> {
    Inline {
        name: &'a str,
        content: &'a str,
    },
    Found {
        /// The source's own name (the link's name when a link was
        /// followed): the file name inside a directory `dest`.
        name: Option<String>,
        found: Found,
        /// E2B wildcard: path relative to the wildcard's directory.
        rel: Vec<String>,
    },
}

/// What a source path is, after following in-context symlinks.
#[derive(Debug)]
enum Found {
    Dir {
        real: Vec<String>,
        mode: u32,
    },
    File {
        real: Vec<String>,
        mode: u32,
    },
    /// A symlink kept as a link (its target is outside the context).
    Link {
        real: Vec<String>,
        target: PathBuf,
    },
}

/// A wildcard match: (path relative to the wildcard's directory, path
/// relative to the context).
type Match = (Vec<String>, Vec<String>);

struct Resolver<'a> {
    context: &'a Path,
    ignore: &'a DockerIgnore,
    chmod: Option<u32>,
    /// Keyed by destination components: sorted parents first, one per path.
    entries: BTreeMap<Vec<String>, CopyEntry>,
}

impl Resolver<'_> {
    fn host(&self, rel: &[String]) -> PathBuf {
        let mut p = self.context.to_owned();
        p.extend(rel);
        p
    }

    fn io(&self, rel: &[String], source: io::Error) -> CopyError {
        CopyError::Io {
            path: self.host(rel),
            source,
        }
    }

    fn excluded(&self, rel: &[String]) -> bool {
        let comps: Vec<&str> = rel.iter().map(String::as_str).collect();
        self.ignore.is_excluded_comps(&comps)
    }

    /// Finds `comps` in the context, following symlinks along the way only
    /// while they stay inside it. `None`: it does not exist for COPY
    /// (missing or excluded). A last-component symlink leading outside is
    /// returned as [`Found::Link`]; one in the middle is an error. With
    /// `follow_last` false, a last-component symlink is always kept as a
    /// link.
    fn resolve(
        &self,
        comps: &[String],
        follow_last: bool,
        source: &str,
    ) -> Result<Option<Found>, CopyError> {
        let mut done: Vec<String> = Vec::new();
        let mut todo: Vec<String> = comps.iter().rev().cloned().collect();
        let mut hops = 0;
        while let Some(comp) = todo.pop() {
            let mut here = done.clone();
            here.push(comp);
            let meta = match fs::symlink_metadata(self.host(&here)) {
                Ok(m) => m,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(self.io(&here, e)),
            };
            // An excluded directory still exists for what `!` rules bring
            // back inside it.
            if self.excluded(&here) && !(meta.is_dir() && self.ignore.has_exceptions()) {
                return Ok(None);
            }
            let last = todo.is_empty();
            if meta.file_type().is_symlink() && (follow_last || !last) {
                let target = fs::read_link(self.host(&here)).map_err(|e| self.io(&here, e))?;
                hops += 1;
                let next = match target.to_str() {
                    Some(t) if hops <= MAX_SYMLINK_HOPS => splice(&done, t),
                    _ => None,
                };
                match next {
                    Some(next) => {
                        done.clear();
                        todo.extend(next.into_iter().rev());
                    }
                    None if last => {
                        return Ok(Some(Found::Link { real: here, target }));
                    }
                    None => {
                        return Err(CopyError::SourceEscapes {
                            source_path: source.to_owned(),
                        });
                    }
                }
                continue;
            }
            if !last && !meta.is_dir() {
                return Ok(None);
            }
            done = here;
        }
        if done.is_empty() {
            // The context root.
            let meta = fs::metadata(self.context).map_err(|e| self.io(&[], e))?;
            return Ok(Some(Found::Dir {
                real: done,
                mode: self.mode(meta.permissions().mode()),
            }));
        }
        let meta = fs::symlink_metadata(self.host(&done)).map_err(|e| self.io(&done, e))?;
        let mode = self.mode(meta.permissions().mode());
        Ok(if meta.is_dir() {
            Some(Found::Dir { real: done, mode })
        } else if meta.is_file() {
            Some(Found::File { real: done, mode })
        } else if meta.file_type().is_symlink() {
            let target = fs::read_link(self.host(&done)).map_err(|e| self.io(&done, e))?;
            Some(Found::Link { real: done, target })
        } else {
            None
        })
    }

    fn mode(&self, raw: u32) -> u32 {
        self.chmod.unwrap_or(raw & 0o7777)
    }

    /// Paths under `base` (resolved in the context) matching `glob`, as
    /// (path relative to base, path relative to the context). Matched
    /// directories are not searched further.
    fn glob(&self, base: &[String], glob: &Glob, source: &str) -> Result<Vec<Match>, CopyError> {
        let real_base = match self.resolve(base, true, source)? {
            Some(Found::Dir { real, .. }) => real,
            _ => return Ok(Vec::new()),
        };
        let mut out = Vec::new();
        let mut stack: Vec<Vec<String>> = vec![Vec::new()];
        while let Some(rel) = stack.pop() {
            let mut dir = real_base.clone();
            dir.extend(rel.iter().cloned());
            for (name, meta) in self.read_dir(&dir)? {
                let mut child_rel = rel.clone();
                child_rel.push(name.clone());
                let mut child_real = dir.clone();
                child_real.push(name);
                let is_dir = meta.is_dir();
                if self.excluded(&child_real) {
                    if is_dir && self.ignore.has_exceptions() {
                        stack.push(child_rel);
                    }
                    continue;
                }
                let comps: Vec<&str> = child_rel.iter().map(String::as_str).collect();
                if glob.matches(&comps) {
                    out.push((child_rel, child_real));
                } else if is_dir && (glob.is_recursive() || child_rel.len() < glob.depth()) {
                    stack.push(child_rel);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Entries of a context directory, sorted by name, without following
    /// symlinks.
    fn read_dir(&self, rel: &[String]) -> Result<Vec<(String, fs::Metadata)>, CopyError> {
        let host = self.host(rel);
        let mut out = Vec::new();
        for entry in fs::read_dir(&host).map_err(|e| self.io(rel, e))? {
            let entry = entry.map_err(|e| self.io(rel, e))?;
            let meta = entry.metadata().map_err(|e| self.io(rel, e))?;
            let name = entry
                .file_name()
                .into_string()
                .map_err(|_| CopyError::NonUtf8Path { path: entry.path() })?;
            out.push((name, meta));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Adds everything under the context directory `real` below `dest`.
    /// Returns whether anything was added (an excluded directory is only
    /// kept for what `!` rules bring back in it).
    fn tree(&mut self, real: &[String], dest: &[String]) -> Result<bool, CopyError> {
        let mut added = false;
        for (name, meta) in self.read_dir(real)? {
            let mut child_real = real.to_vec();
            child_real.push(name.clone());
            let child_dest = child(dest, &name);
            let kind = meta.file_type();
            let excluded = self.excluded(&child_real);
            if kind.is_dir() {
                if excluded && !self.ignore.has_exceptions() {
                    continue;
                }
                let mode = self.mode(meta.permissions().mode());
                let src = self.host(&child_real);
                if excluded {
                    // Kept only for what `!` rules bring back inside it.
                    if self.tree(&child_real, &child_dest)? {
                        self.insert(child_dest, src, EntryKind::Dir, mode);
                        added = true;
                    }
                } else {
                    self.insert(child_dest.clone(), src, EntryKind::Dir, mode);
                    self.tree(&child_real, &child_dest)?;
                    added = true;
                }
                continue;
            }
            if excluded {
                continue;
            }
            let src = self.host(&child_real);
            if kind.is_symlink() {
                let target = fs::read_link(&src).map_err(|e| self.io(&child_real, e))?;
                self.insert(child_dest, src, EntryKind::Symlink(target), 0o777);
                added = true;
            } else if kind.is_file() {
                let mode = self.mode(meta.permissions().mode());
                self.insert(child_dest, src, EntryKind::File, mode);
                added = true;
            }
        }
        Ok(added)
    }

    /// Records an entry; a later one at the same path wins, and a
    /// non-directory drops what an earlier directory there had under it.
    fn insert(&mut self, dest: Vec<String>, src: PathBuf, kind: EntryKind, mode: u32) {
        if kind != EntryKind::Dir {
            let under: Vec<Vec<String>> = self
                .entries
                .range(dest.clone()..)
                .map(|(k, _)| k)
                .take_while(|k| k.starts_with(&dest))
                .filter(|k| k.len() > dest.len())
                .cloned()
                .collect();
            for k in under {
                self.entries.remove(&k);
            }
        }
        let path = format!("/{}", dest.join("/"));
        self.entries.insert(
            dest,
            CopyEntry {
                src,
                dest: path,
                kind,
                mode,
            },
        );
    }
}

fn child(dir: &[String], name: &str) -> Vec<String> {
    let mut out = dir.to_vec();
    out.push(name.to_owned());
    out
}

/// A source path as Docker cleans it: relative to the context root, with
/// `.` dropped and `..` stopping at the root.
fn clamp(path: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c.to_owned()),
        }
    }
    out
}

/// The path a symlink at `dir/<link>` leads to, relative to the context
/// root; `None` when it is absolute or climbs above the root.
fn splice(dir: &[String], target: &str) -> Option<Vec<String>> {
    if target.starts_with('/') {
        return None;
    }
    let mut out = dir.to_vec();
    for comp in target.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c.to_owned()),
        }
    }
    Some(out)
}

/// The destination as absolute components, and whether it names a
/// directory (ends in `/`, or is `.`/`..`-terminated, or is the root).
fn dest_path(dest: &str, workdir: &str) -> (Vec<String>, bool) {
    let joined = if dest.starts_with('/') {
        dest.to_owned()
    } else {
        format!("{workdir}/{dest}")
    };
    let is_dir = dest.is_empty()
        || dest.ends_with('/')
        || dest == "."
        || dest == ".."
        || dest.ends_with("/.")
        || dest.ends_with("/..");
    let comps = clamp(&joined);
    let is_dir = is_dir || comps.is_empty();
    (comps, is_dir)
}

/// Canonical, versioned encoding of the entries, hashed.
fn content_hash(entries: &[CopyEntry]) -> Result<String, CopyError> {
    let mut h = Sha256::new();
    field(&mut h, b"arca-copy-v1");
    for e in entries {
        field(&mut h, e.dest.as_bytes());
        field(&mut h, &e.mode.to_le_bytes());
        match &e.kind {
            EntryKind::File => {
                field(&mut h, b"file");
                field(&mut h, &file_digest(&e.src)?);
            }
            EntryKind::Inline(content) => {
                // Same tag and digest as a file with that content: the
                // image gets the same bytes either way.
                field(&mut h, b"file");
                field(&mut h, &Sha256::digest(content));
            }
            EntryKind::Dir => field(&mut h, b"dir"),
            EntryKind::Symlink(target) => {
                field(&mut h, b"symlink");
                field(&mut h, target.as_os_str().as_bytes());
            }
        }
    }
    Ok(hex(&h.finalize()))
}

fn file_digest(path: &Path) -> Result<Vec<u8>, CopyError> {
    let io_err = |source| CopyError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::File::open(path).map_err(io_err)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_vec())
}

/// Length-prefixed, so no two different sequences of fields hash alike.
pub(crate) fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A context: `root/ctx` (the context) beside `root/outside`.
    struct Ctx {
        root: tempfile::TempDir,
    }

    impl Ctx {
        fn new() -> Self {
            let root = tempfile::tempdir().unwrap();
            fs::create_dir(root.path().join("ctx")).unwrap();
            fs::set_permissions(root.path().join("ctx"), fs::Permissions::from_mode(0o755))
                .unwrap();
            fs::create_dir(root.path().join("outside")).unwrap();
            fs::write(root.path().join("outside/secret"), "secret").unwrap();
            Self { root }
        }
        fn path(&self) -> PathBuf {
            self.root.path().join("ctx")
        }
        fn file(&self, rel: &str, content: &str, mode: u32) -> &Self {
            let p = self.path().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, content).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            self
        }
        fn dir(&self, rel: &str, mode: u32) -> &Self {
            let p = self.path().join(rel);
            fs::create_dir_all(&p).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            self
        }
        fn link(&self, rel: &str, target: &str) -> &Self {
            symlink(target, self.path().join(rel)).unwrap();
            self
        }
        fn copy(&self, sources: &[&str], dest: &str) -> Result<CopyPlan, CopyError> {
            self.copy_with(&spec(sources, dest), "/", &DockerIgnore::default())
        }
        fn copy_with(
            &self,
            spec: &CopySpec,
            workdir: &str,
            ignore: &DockerIgnore,
        ) -> Result<CopyPlan, CopyError> {
            resolve_copy(&self.path(), spec, workdir, ignore)
        }
        /// (dest, short kind, mode); files show their context-relative src.
        fn listing(&self, plan: &CopyPlan) -> Vec<(String, String, u32)> {
            plan.entries
                .iter()
                .map(|e| {
                    let kind = match &e.kind {
                        EntryKind::File => {
                            let src = e.src.strip_prefix(self.path()).unwrap();
                            format!("file:{}", src.display())
                        }
                        EntryKind::Inline(content) => {
                            assert_eq!(e.src, PathBuf::new());
                            format!("inline:{}", String::from_utf8_lossy(content))
                        }
                        EntryKind::Dir => "dir".to_owned(),
                        EntryKind::Symlink(target) => format!("link:{}", target.display()),
                    };
                    if !matches!(e.kind, EntryKind::Inline(_)) {
                        assert!(e.src.starts_with(self.path()), "{}", e.src.display());
                    }
                    (e.dest.clone(), kind, e.mode)
                })
                .collect()
        }
    }

    fn spec(sources: &[&str], dest: &str) -> CopySpec {
        CopySpec {
            sources: sources.iter().map(|s| Source::Path((*s).into())).collect(),
            dest: dest.into(),
            from: None,
            chown: None,
            chmod: None,
        }
    }

    fn e(dest: &str, kind: &str, mode: u32) -> (String, String, u32) {
        (dest.to_owned(), kind.to_owned(), mode)
    }

    fn tree() -> Ctx {
        let c = Ctx::new();
        c.file("a.txt", "a", 0o644)
            .file("b.txt", "b", 0o600)
            .file("run.sh", "#!/bin/sh", 0o755)
            .dir("src", 0o750)
            .file("src/main.py", "print()", 0o644)
            .file("src/pkg/mod.py", "x = 1", 0o644)
            .file("src/pkg/deep/data.txt", "d", 0o644)
            .file("src/notes.txt", "n", 0o644);
        c
    }

    #[test]
    fn file_to_file_and_into_directory() {
        let c = tree();
        let p = c.copy(&["a.txt"], "/etc/x.conf").unwrap();
        assert_eq!(c.listing(&p), vec![e("/etc/x.conf", "file:a.txt", 0o644)]);
        let p = c.copy(&["b.txt"], "/etc/").unwrap();
        assert_eq!(c.listing(&p), vec![e("/etc/b.txt", "file:b.txt", 0o600)]);
        let p = c.copy(&["./src/../a.txt"], "/").unwrap();
        assert_eq!(c.listing(&p), vec![e("/a.txt", "file:a.txt", 0o644)]);
    }

    #[test]
    fn relative_destination_is_under_the_workdir() {
        let c = tree();
        let ig = DockerIgnore::default();
        let p = c
            .copy_with(&spec(&["a.txt"], "conf/"), "/srv/app", &ig)
            .unwrap();
        assert_eq!(
            c.listing(&p),
            vec![e("/srv/app/conf/a.txt", "file:a.txt", 0o644)]
        );
        let p = c
            .copy_with(&spec(&["a.txt"], "."), "/srv/app", &ig)
            .unwrap();
        assert_eq!(
            c.listing(&p),
            vec![e("/srv/app/a.txt", "file:a.txt", 0o644)]
        );
        let p = c
            .copy_with(&spec(&["a.txt"], "../x"), "/srv/app", &ig)
            .unwrap();
        assert_eq!(c.listing(&p), vec![e("/srv/x", "file:a.txt", 0o644)]);
    }

    #[test]
    fn a_directory_copies_its_contents_parents_first() {
        let c = tree();
        let p = c.copy(&["src"], "/app").unwrap();
        assert_eq!(
            c.listing(&p),
            vec![
                e("/app", "dir", 0o750),
                e("/app/main.py", "file:src/main.py", 0o644),
                e("/app/notes.txt", "file:src/notes.txt", 0o644),
                e("/app/pkg", "dir", 0o755),
                e("/app/pkg/deep", "dir", 0o755),
                e(
                    "/app/pkg/deep/data.txt",
                    "file:src/pkg/deep/data.txt",
                    0o644
                ),
                e("/app/pkg/mod.py", "file:src/pkg/mod.py", 0o644),
            ]
        );
        // `.`: the whole context, the root's mode onto the destination.
        let p = c.copy(&["."], "/").unwrap();
        assert_eq!(p.entries[0].dest, "/");
        assert_eq!(p.entries[0].kind, EntryKind::Dir);
        assert_eq!(p.entries[0].mode, 0o755);
        assert_eq!(p.entries.len(), 11);
    }

    #[test]
    fn wildcards_match_within_a_component() {
        let c = tree();
        let p = c.copy(&["*.txt"], "/d/").unwrap();
        assert_eq!(
            c.listing(&p),
            vec![
                e("/d/a.txt", "file:a.txt", 0o644),
                e("/d/b.txt", "file:b.txt", 0o600)
            ]
        );
        let p = c.copy(&["[ab].tx?", "ru?.sh"], "/d/").unwrap();
        assert_eq!(p.entries.len(), 3);
        // One match and a file destination: copied to that name.
        let p = c.copy(&["a.*"], "/etc/a.conf").unwrap();
        assert_eq!(c.listing(&p), vec![e("/etc/a.conf", "file:a.txt", 0o644)]);
        // `**` is one component in Docker's COPY, and matches are flattened.
        let p = c.copy(&["src/**/*.py"], "/d/").unwrap();
        assert_eq!(
            c.listing(&p),
            vec![e("/d/mod.py", "file:src/pkg/mod.py", 0o644)]
        );
        // A matched directory copies its contents into dest.
        let p = c.copy(&["sr*"], "/d/").unwrap();
        assert_eq!(
            p.entries[0],
            CopyEntry {
                src: c.path().join("src"),
                dest: "/d".into(),
                kind: EntryKind::Dir,
                mode: 0o750
            }
        );
        assert!(p.entries.iter().any(|x| x.dest == "/d/pkg/mod.py"));
    }

    #[test]
    fn e2b_files_keep_paths_below_the_wildcard() {
        let c = tree();
        let files = |src: &str, dest: &str| CopySpec {
            from: Some(CopyFrom::Files("h".into())),
            ..spec(&[src], dest)
        };
        let ig = DockerIgnore::default();
        let p = c
            .copy_with(&files("src/**/*.py", "/app"), "/", &ig)
            .unwrap();
        assert_eq!(
            c.listing(&p),
            vec![
                e("/app/main.py", "file:src/main.py", 0o644),
                e("/app/pkg/mod.py", "file:src/pkg/mod.py", 0o644),
            ]
        );
        let p = c.copy_with(&files("**/*.txt", "out"), "/w", &ig).unwrap();
        assert_eq!(
            c.listing(&p),
            vec![
                e("/w/out/a.txt", "file:a.txt", 0o644),
                e("/w/out/b.txt", "file:b.txt", 0o600),
                e("/w/out/src/notes.txt", "file:src/notes.txt", 0o644),
                e(
                    "/w/out/src/pkg/deep/data.txt",
                    "file:src/pkg/deep/data.txt",
                    0o644
                ),
            ]
        );
        // No wildcard: as Docker.
        let p = c.copy_with(&files("a.txt", "/x"), "/", &ig).unwrap();
        assert_eq!(c.listing(&p), vec![e("/x", "file:a.txt", 0o644)]);
        // A symlink source stays a link, even one leading inside.
        c.link("inner", "src/main.py");
        let p = c.copy_with(&files("inner", "/x"), "/", &ig).unwrap();
        assert_eq!(c.listing(&p), vec![e("/x", "link:src/main.py", 0o777)]);
    }

    #[test]
    fn several_sources_need_a_directory_destination() {
        let c = tree();
        let err = c.copy(&["a.txt", "b.txt"], "/d").unwrap_err();
        assert!(matches!(err, CopyError::DestNotDirectory));
        assert_eq!(
            err.to_string(),
            "When using COPY with more than one source file, the destination must be a directory and end with a /"
        );
        assert!(matches!(
            c.copy(&["*.txt"], "/d").unwrap_err(),
            CopyError::DestNotDirectory
        ));
        let p = c.copy(&["a.txt", "src/main.py"], "/d/").unwrap();
        assert_eq!(
            c.listing(&p),
            vec![
                e("/d/a.txt", "file:a.txt", 0o644),
                e("/d/main.py", "file:src/main.py", 0o644)
            ]
        );
    }

    #[test]
    fn missing_sources() {
        let c = tree();
        let err = c.copy(&["a.txt", "nope.txt"], "/d/").unwrap_err();
        assert!(
            matches!(&err, CopyError::SourceNotFound { source_path } if source_path == "nope.txt")
        );
        assert!(err.to_string().contains("`nope.txt`"));
        assert!(err.is_invalid_input());
        assert!(matches!(
            c.copy(&["a.txt/x"], "/d/").unwrap_err(),
            CopyError::SourceNotFound { .. }
        ));
        let err = c.copy(&["*.none"], "/d/").unwrap_err();
        assert!(matches!(err, CopyError::NoSourceFiles));
        assert_eq!(
            err.to_string(),
            "COPY failed: no source files were specified; check the paths and .dockerignore"
        );
        // A wildcard may match nothing when another source exists.
        let p = c.copy(&["a.txt", "*.lock"], "/d/").unwrap();
        assert_eq!(p.entries.len(), 1);
        assert!(matches!(
            c.copy(&["[a"], "/d/").unwrap_err(),
            CopyError::BadPattern { .. }
        ));
    }

    #[test]
    fn dockerignore_excludes_and_exceptions_bring_back() {
        let c = tree();
        c.file("debug.log", "l", 0o644)
            .file("secret/private.key", "k", 0o600)
            .file("secret/public.txt", "p", 0o644)
            .file(
                ".dockerignore",
                "*.log\nsecret\n!secret/public.txt\nsrc/pkg\n",
                0o644,
            );
        let ig = DockerIgnore::parse(&fs::read_to_string(c.path().join(".dockerignore")).unwrap())
            .unwrap();
        let p = c.copy_with(&spec(&["."], "/app/"), "/", &ig).unwrap();
        let dests: Vec<&str> = p.entries.iter().map(|x| x.dest.as_str()).collect();
        assert_eq!(
            dests,
            vec![
                "/app",
                "/app/.dockerignore",
                "/app/a.txt",
                "/app/b.txt",
                "/app/run.sh",
                "/app/secret",
                "/app/secret/public.txt",
                "/app/src",
                "/app/src/main.py",
                "/app/src/notes.txt",
            ]
        );
        assert!(matches!(
            c.copy_with(&spec(&["debug.log"], "/"), "/", &ig)
                .unwrap_err(),
            CopyError::SourceNotFound { .. }
        ));
        assert!(matches!(
            c.copy_with(&spec(&["src/pkg/mod.py"], "/"), "/", &ig)
                .unwrap_err(),
            CopyError::SourceNotFound { .. }
        ));
        let p = c
            .copy_with(&spec(&["secret/public.txt"], "/p"), "/", &ig)
            .unwrap();
        assert_eq!(
            c.listing(&p),
            vec![e("/p", "file:secret/public.txt", 0o644)]
        );
        assert!(matches!(
            c.copy_with(&spec(&["*.log"], "/d/"), "/", &ig).unwrap_err(),
            CopyError::NoSourceFiles
        ));
    }

    #[test]
    fn symlinks_are_never_followed_out_of_the_context() {
        let c = tree();
        let outside = c.root.path().join("outside");
        c.link("abs", outside.to_str().unwrap())
            .link("up", "../outside/secret")
            .link("inner", "src/main.py")
            .link("src/pkg/back", "../../a.txt")
            .link("dirlink", "src/pkg");
        // A link leading outside is copied as the link itself.
        let p = c.copy(&["abs", "up"], "/d/").unwrap();
        assert_eq!(
            c.listing(&p),
            vec![
                e("/d/abs", &format!("link:{}", outside.display()), 0o777),
                e("/d/up", "link:../outside/secret", 0o777),
            ]
        );
        // Through a link that leads outside: refused.
        assert!(matches!(
            c.copy(&["abs/secret"], "/d/").unwrap_err(),
            CopyError::SourceEscapes { .. }
        ));
        // A link inside the context is followed, named after the link.
        let p = c.copy(&["inner"], "/d/").unwrap();
        assert_eq!(
            c.listing(&p),
            vec![e("/d/inner", "file:src/main.py", 0o644)]
        );
        let p = c.copy(&["dirlink/mod.py"], "/m.py").unwrap();
        assert_eq!(
            c.listing(&p),
            vec![e("/m.py", "file:src/pkg/mod.py", 0o644)]
        );
        // Links inside a copied directory stay links.
        let p = c.copy(&["src/pkg"], "/p").unwrap();
        assert!(p.entries.contains(&CopyEntry {
            src: c.path().join("src/pkg/back"),
            dest: "/p/back".into(),
            kind: EntryKind::Symlink("../../a.txt".into()),
            mode: 0o777
        }));
        // Nothing outside is ever a source (`listing` checks every src).
        let all = c.copy(&["."], "/").unwrap();
        assert_eq!(c.listing(&all).len(), all.entries.len());
    }

    #[test]
    fn heredoc_sources_are_inline_files() {
        let c = tree();
        let mut s = CopySpec {
            sources: vec![
                Source::Inline {
                    name: "hello".into(),
                    content: "hi\n".into(),
                },
                Source::Path("a.txt".into()),
            ],
            ..spec(&[], "/etc/")
        };
        let ig = DockerIgnore::default();
        let p = c.copy_with(&s, "/", &ig).unwrap();
        assert_eq!(
            c.listing(&p),
            vec![
                e("/etc/a.txt", "file:a.txt", 0o644),
                e("/etc/hello", "inline:hi\n", INLINE_FILE_MODE)
            ]
        );
        s.sources.truncate(1);
        s.dest = "/etc/motd".into();
        s.chmod = Some("600".into());
        let p = c.copy_with(&s, "/", &ig).unwrap();
        assert_eq!(c.listing(&p), vec![e("/etc/motd", "inline:hi\n", 0o600)]);
    }

    #[test]
    fn chmod_sets_files_and_dirs_but_not_links() {
        let c = tree();
        c.link("src/l", "main.py");
        let s = CopySpec {
            chmod: Some("0700".into()),
            ..spec(&["src"], "/s")
        };
        let p = c.copy_with(&s, "/", &DockerIgnore::default()).unwrap();
        for entry in &p.entries {
            let want = if matches!(entry.kind, EntryKind::Symlink(_)) {
                0o777
            } else {
                0o700
            };
            assert_eq!(entry.mode, want, "{}", entry.dest);
        }
        let bad = CopySpec {
            chmod: Some("u+x".into()),
            ..spec(&["a.txt"], "/")
        };
        assert!(matches!(
            c.copy_with(&bad, "/", &DockerIgnore::default())
                .unwrap_err(),
            CopyError::BadChmod { .. }
        ));
    }

    #[test]
    fn later_sources_replace_earlier_ones() {
        let c = Ctx::new();
        c.file("one/x", "1", 0o644)
            .file("one/d/inner", "i", 0o644)
            .file("two/x", "2", 0o600)
            .file("two/d", "now a file", 0o644);
        let p = c.copy(&["one", "two"], "/t/").unwrap();
        assert_eq!(
            c.listing(&p),
            vec![
                e("/t", "dir", 0o755),
                e("/t/d", "file:two/d", 0o644),
                e("/t/x", "file:two/x", 0o600),
            ]
        );
    }

    #[test]
    fn content_hash_follows_content_not_times() {
        let c = tree();
        let h = |c: &Ctx| c.copy(&["src"], "/app").unwrap().content_hash;
        let first = h(&c);
        assert_eq!(first.len(), 64);
        // Rewriting the same bytes (new mtime) keeps the hash.
        std::thread::sleep(std::time::Duration::from_millis(10));
        c.file("src/main.py", "print()", 0o644);
        assert_eq!(h(&c), first);
        c.file("src/main.py", "print(2)", 0o644);
        let changed = h(&c);
        assert_ne!(changed, first);
        c.file("src/main.py", "print(2)", 0o755);
        assert_ne!(h(&c), changed);
        assert_ne!(c.copy(&["src"], "/other").unwrap().content_hash, changed);
        // Same bytes from a heredoc or a file: same hash.
        let inline = CopySpec {
            sources: vec![Source::Inline {
                name: "a.txt".into(),
                content: "a".into(),
            }],
            ..spec(&[], "/d/")
        };
        let from_inline = c.copy_with(&inline, "/", &DockerIgnore::default()).unwrap();
        assert_eq!(
            from_inline.content_hash,
            c.copy(&["a.txt"], "/d/").unwrap().content_hash
        );
    }

    #[test]
    fn copy_from_a_stage_is_not_a_context_copy() {
        let c = tree();
        let s = CopySpec {
            from: Some(CopyFrom::Stage(0)),
            ..spec(&["a.txt"], "/")
        };
        assert!(matches!(
            c.copy_with(&s, "/", &DockerIgnore::default()).unwrap_err(),
            CopyError::NotFromContext
        ));
    }

    #[test]
    fn chmod_and_chown_parsing() {
        for (s, m) in [
            ("755", 0o755),
            ("0644", 0o644),
            ("4755", 0o4755),
            ("0", 0),
            ("00007777", 0o7777),
        ] {
            assert_eq!(parse_chmod(s).unwrap(), m, "{s}");
        }
        for s in ["", "8", "u+x", "-755", "17777", " 755"] {
            assert!(
                matches!(parse_chmod(s), Err(CopyError::BadChmod { .. })),
                "{s}"
            );
        }
        assert_eq!(parse_chown("app").unwrap(), ("app".into(), None));
        assert_eq!(
            parse_chown("1000:staff").unwrap(),
            ("1000".into(), Some("staff".into()))
        );
        for s in ["", ":g", "u:", "a:b:c", "a b"] {
            assert!(
                matches!(parse_chown(s), Err(CopyError::BadChown { .. })),
                "{s}"
            );
        }
    }
}
