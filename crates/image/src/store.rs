//! A content-addressed store of unpacked layers, each a directory in
//! overlayfs format usable as an overlay `lowerdir`.
//!
//! # Layout
//!
//! ```text
//! <root>/                 0700  (enforced by every open)
//!   layers/               0700
//!     <id>/               0755  one committed layer
//!       diff/                   its files: LayerStore::path(id)
//!       meta.json               LayerMeta
//!   tmp/                  0700
//!     <random>/           0755  one LayerWriter (flock-ed while alive)
//!       diff/                   LayerWriter::dir()
//!       work/                   LayerWriter::work_dir()
//! ```
//!
//! Only host root may traverse the store: layers hold setuid binaries owned
//! by shifted ids (a setuid-root file of an image is owned by host uid
//! 100000), and a host user able to run one would become a uid of the
//! sandboxes' range; build layers may also hold secrets. So overlays are
//! mounted by host root (whose lowerdir checks use the mounter's
//! credentials), not from inside a user namespace.
//!
//! # Atomicity and crashes
//!
//! A layer is written in `tmp/<random>` and appears under `layers/` by one
//! `rename` (after `syncfs`, unless [`LayerStore::set_sync`] turned that off),
//! so a layer under `layers/` is always complete. GC first renames a doomed
//! layer into `tmp/` and removes it there. Each writer holds an `flock` on its
//! directory; [`LayerStore::open`] and [`LayerStore::gc`] remove every
//! directory in `tmp/` whose lock they can take, i.e. leftovers of a writer
//! that crashed or of an interrupted GC, never a live writer's (also not one
//! of another `LayerStore` on the same root).
//!
//! # Concurrency
//!
//! Writers, `contains`, `path`, `list` and `meta` may be used from many
//! threads and processes at once. [`LayerStore::gc`] removes every committed
//! layer not in its `keep` set, including one committed a moment ago by a
//! concurrent pull or build, and layers still mounted as a lowerdir: the
//! caller serialises GC with its pulls and builds and keeps what is in use.
//!
//! Pulled layers are unpacked with the id offset of the pull
//! ([`crate::registry::PullOptions::id_offset`]); one store is meant for one
//! offset, which [`LayerMeta::id_offset`] records and a pull checks.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::{self as rfs, FlockOperation};
use serde::{Deserialize, Serialize};

use crate::{ImageError, fsx, walk};

/// Longest layer id accepted.
pub const MAX_ID_LEN: usize = 100;

/// Name of the directory holding a layer's files inside its layer directory.
const DIFF: &str = "diff";
/// Name of the overlay work directory inside a writer's directory.
const WORK: &str = "work";
/// Name of a layer's metadata file.
const META: &str = "meta.json";

/// The id of a layer in a [`LayerStore`]: 1 to [`MAX_ID_LEN`] characters of
/// `[a-z0-9-]`, starting with a letter or digit.
///
/// Pulled layers are `sha256-<hex>` of their compressed blob
/// ([`LayerId::from_digest`]); other producers (the build driver) choose
/// their own, e.g. a hex cache key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LayerId(String);

impl LayerId {
    /// Validates `id`.
    pub fn new(id: impl Into<String>) -> Result<Self, ImageError> {
        let id = id.into();
        let valid = !id.is_empty()
            && id.len() <= MAX_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !id.starts_with('-');
        if valid {
            Ok(Self(id))
        } else {
            Err(ImageError::InvalidLayerId { id })
        }
    }

    /// The id of a pulled layer with blob digest `sha256:<hex>`: `sha256-<hex>`.
    pub fn from_digest(digest: &str) -> Result<Self, ImageError> {
        Self::new(digest.replacen(':', "-", 1))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for LayerId {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for LayerId {
    type Error = ImageError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<LayerId> for String {
    fn from(id: LayerId) -> Self {
        id.0
    }
}

/// What the store knows about a layer besides its files (`meta.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct LayerMeta {
    /// When it was committed, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Disk usage of its files in bytes, measured at commit.
    pub size_bytes: u64,
    /// What made it, for people: e.g. `pull docker.io/library/busybox@sha256:…`
    /// or a build step.
    pub source: String,
    /// The uid/gid offset its owners were shifted by, when known.
    pub id_offset: Option<u32>,
    /// `sha256:<hex>` of the uncompressed tar, for pulled layers.
    pub diff_id: Option<String>,
    /// Free-form labels of the producer.
    pub labels: BTreeMap<String, String>,
}

impl LayerMeta {
    /// Metadata naming what made the layer.
    pub fn with_source(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            ..Self::default()
        }
    }
}

/// What [`LayerStore::gc`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcStats {
    /// Committed layers removed.
    pub layers_removed: u64,
    /// Leftovers of interrupted writes removed from `tmp/`.
    pub leftovers_removed: u64,
    /// Bytes of disk freed (allocated blocks, as `du`).
    pub bytes_freed: u64,
}

/// A content-addressed store of unpacked layers; see the module docs.
#[derive(Debug, Clone)]
pub struct LayerStore {
    root: PathBuf,
    layers: PathBuf,
    tmp: PathBuf,
    sync: bool,
}

impl LayerStore {
    /// Opens (creating it if needed) the store at `root`, and removes
    /// leftovers of interrupted writes.
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        let store = Self {
            root: root.to_path_buf(),
            layers: root.join("layers"),
            tmp: root.join("tmp"),
            sync: true,
        };
        for dir in [&store.root, &store.layers, &store.tmp] {
            match fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(ImageError::io("create", dir, e)),
            }
            let meta = fs::symlink_metadata(dir).map_err(|e| ImageError::io("stat", dir, e))?;
            if !meta.is_dir() {
                return Err(ImageError::io(
                    "open the layer store at",
                    dir,
                    io::Error::from(io::ErrorKind::NotADirectory),
                ));
            }
            if meta.permissions().mode() & 0o7777 != 0o700 {
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                    .map_err(|e| ImageError::io("chmod", dir, e))?;
            }
        }
        let removed = store.sweep_tmp()?;
        if removed > 0 {
            tracing::info!(root = %root.display(), removed, "removed leftovers of interrupted layer writes");
        }
        Ok(store)
    }

    /// Whether commits `syncfs` before they rename (default true). Tests and
    /// throw-away stores may turn it off: a crash can then leave committed
    /// layers with lost data.
    pub fn set_sync(&mut self, sync: bool) {
        self.sync = sync;
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory holding layer `id`'s files, in overlayfs format (whether
    /// or not the layer exists).
    pub fn path(&self, id: &LayerId) -> PathBuf {
        self.layer_dir(id).join(DIFF)
    }

    fn layer_dir(&self, id: &LayerId) -> PathBuf {
        self.layers.join(id.as_str())
    }

    /// Whether layer `id` is committed.
    pub fn contains(&self, id: &LayerId) -> bool {
        fs::symlink_metadata(self.path(id)).is_ok_and(|m| m.is_dir())
    }

    /// Committed layers, sorted.
    pub fn list(&self) -> Result<Vec<LayerId>, ImageError> {
        let mut ids = Vec::new();
        for entry in
            fs::read_dir(&self.layers).map_err(|e| ImageError::io("list", &self.layers, e))?
        {
            let entry = entry.map_err(|e| ImageError::io("list", &self.layers, e))?;
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|s| LayerId::new(s).ok())
            {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Layer `id`'s metadata; `None` if the layer or its `meta.json` is missing.
    pub fn meta(&self, id: &LayerId) -> Result<Option<LayerMeta>, ImageError> {
        let path = self.layer_dir(id).join(META);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                ImageError::io(
                    "parse",
                    &path,
                    io::Error::new(io::ErrorKind::InvalidData, e),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io("read", &path, e)),
        }
    }

    /// Replaces layer `id`'s metadata (atomically).
    pub fn set_meta(&self, id: &LayerId, meta: &LayerMeta) -> Result<(), ImageError> {
        let dir = self.layer_dir(id);
        if !self.contains(id) {
            return Err(ImageError::LayerMissing { id: id.clone() });
        }
        write_meta(&dir, meta)
    }

    /// Starts writing a new layer: a fresh directory inside the store (same
    /// file system, so commit is a rename) with an empty `diff` dir for the
    /// files and an empty `work` dir usable as the overlay workdir.
    pub fn begin(&self) -> Result<LayerWriter, ImageError> {
        for _ in 0..8 {
            let suffix: u64 = rand::random();
            let dir = self.tmp.join(format!("{suffix:016x}"));
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ImageError::io("create", &dir, e)),
            }
            let lock = fsx::open_dir(&dir).map_err(|e| ImageError::io("open", &dir, e))?;
            // A concurrent sweep may have taken the lock (and removed the
            // dir) between our mkdir and our flock: then try another name.
            if rfs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err()
                || rfs::fstat(&lock).map(|st| st.st_nlink).unwrap_or(0) == 0
            {
                continue;
            }
            let writer = LayerWriter {
                files: dir.join(DIFF),
                work: dir.join(WORK),
                tmp_dir: dir,
                _lock: lock,
                layers: self.layers.clone(),
                sync: self.sync,
                done: false,
            };
            fs::set_permissions(&writer.tmp_dir, fs::Permissions::from_mode(0o755))
                .map_err(|e| ImageError::io("chmod", &writer.tmp_dir, e))?;
            for sub in [&writer.files, &writer.work] {
                fs::create_dir(sub).map_err(|e| ImageError::io("create", sub, e))?;
                fs::set_permissions(sub, fs::Permissions::from_mode(0o755))
                    .map_err(|e| ImageError::io("chmod", sub, e))?;
            }
            return Ok(writer);
        }
        Err(ImageError::io(
            "create a layer directory in",
            &self.tmp,
            io::Error::other("no free temporary name after 8 tries"),
        ))
    }

    /// Removes layer `id` if present; returns the bytes freed.
    pub fn remove(&self, id: &LayerId) -> Result<Option<u64>, ImageError> {
        let dir = self.layer_dir(id);
        if fs::symlink_metadata(&dir).is_err() {
            return Ok(None);
        }
        let bytes = walk::disk_usage(&dir).unwrap_or(0);
        // Out of layers/ first, so that it is never seen half-removed.
        let doomed = self.tmp.join(format!("gc-{:016x}", rand::random::<u64>()));
        fs::rename(&dir, &doomed).map_err(|e| ImageError::io("move out of the store", &dir, e))?;
        fsx::remove_tree(&doomed).map_err(|e| ImageError::io("remove", &doomed, e))?;
        Ok(Some(bytes))
    }

    /// The first half of [`gc`](Self::gc): moves every layer not in `keep`
    /// out of the store (quick renames) and returns where they went, for
    /// [`remove_detached`](Self::remove_detached). A caller that must keep
    /// other work out while the set is decided holds its lock only for this.
    pub fn detach_unreferenced(&self, keep: &HashSet<LayerId>) -> Result<Vec<PathBuf>, ImageError> {
        let mut out = Vec::new();
        for entry in
            fs::read_dir(&self.layers).map_err(|e| ImageError::io("list", &self.layers, e))?
        {
            let entry = entry.map_err(|e| ImageError::io("list", &self.layers, e))?;
            let id = entry
                .file_name()
                .to_str()
                .and_then(|s| LayerId::new(s).ok());
            if id.as_ref().is_some_and(|id| keep.contains(id)) {
                continue;
            }
            let path = entry.path();
            let doomed = self.tmp.join(format!("gc-{:016x}", rand::random::<u64>()));
            fs::rename(&path, &doomed)
                .map_err(|e| ImageError::io("move out of the store", &path, e))?;
            out.push(doomed);
        }
        Ok(out)
    }

    /// The second half of [`gc`](Self::gc): removes what
    /// [`detach_unreferenced`](Self::detach_unreferenced) moved out; returns
    /// the bytes freed.
    pub fn remove_detached(&self, detached: &[PathBuf]) -> u64 {
        let mut freed = 0;
        for d in detached {
            let bytes = walk::disk_usage(d).unwrap_or(0);
            match fsx::remove_tree(d) {
                Ok(()) => freed += bytes,
                Err(e) => {
                    tracing::warn!(path = %d.display(), error = %e, "removing a collected layer")
                }
            }
        }
        freed
    }

    /// Removes every committed layer not in `keep` (see the module docs on
    /// concurrency) and leftovers of interrupted writes.
    pub fn gc(&self, keep: &HashSet<LayerId>) -> Result<GcStats, ImageError> {
        let mut stats = GcStats {
            leftovers_removed: self.sweep_tmp()?,
            ..GcStats::default()
        };
        for entry in
            fs::read_dir(&self.layers).map_err(|e| ImageError::io("list", &self.layers, e))?
        {
            let entry = entry.map_err(|e| ImageError::io("list", &self.layers, e))?;
            let name = entry.file_name();
            let id = name.to_str().and_then(|s| LayerId::new(s).ok());
            if id.as_ref().is_some_and(|id| keep.contains(id)) {
                continue;
            }
            let path = entry.path();
            let bytes = walk::disk_usage(&path).unwrap_or(0);
            let doomed = self.tmp.join(format!("gc-{:016x}", rand::random::<u64>()));
            fs::rename(&path, &doomed)
                .map_err(|e| ImageError::io("move out of the store", &path, e))?;
            fsx::remove_tree(&doomed).map_err(|e| ImageError::io("remove", &doomed, e))?;
            stats.layers_removed += 1;
            stats.bytes_freed += bytes;
            tracing::debug!(layer = %name.to_string_lossy(), bytes, "removed an unreferenced layer");
        }
        Ok(stats)
    }

    /// Removes every entry of `tmp/` that no live writer holds.
    fn sweep_tmp(&self) -> Result<u64, ImageError> {
        let tmp = fsx::open_dir(&self.tmp).map_err(|e| ImageError::io("open", &self.tmp, e))?;
        let mut removed = 0;
        for name in fsx::list(tmp.as_fd()).map_err(|e| ImageError::io("list", &self.tmp, e))? {
            let path = self.tmp.join(&name);
            match fsx::open_child_dir(tmp.as_fd(), &name) {
                Ok(fd) => {
                    if rfs::flock(&fd, FlockOperation::NonBlockingLockExclusive).is_err() {
                        continue; // a live writer
                    }
                    fsx::remove_at(tmp.as_fd(), &name)
                        .map_err(|e| ImageError::io("remove", &path, e))?;
                }
                Err(_) => {
                    fsx::remove_at(tmp.as_fd(), &name)
                        .map_err(|e| ImageError::io("remove", &path, e))?;
                }
            }
            removed += 1;
        }
        Ok(removed)
    }
}

/// Writes `meta.json` in `dir` atomically.
fn write_meta(dir: &Path, meta: &LayerMeta) -> Result<(), ImageError> {
    let path = dir.join(META);
    let tmp = dir.join(format!("{META}.tmp-{:08x}", rand::random::<u32>()));
    let bytes = serde_json::to_vec_pretty(meta)
        .map_err(|e| ImageError::io("encode", &path, io::Error::other(e)))?;
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| ImageError::io("write", &path, e))
}

/// A layer being written; see [`LayerStore::begin`].
///
/// Dropping it without [`commit`](Self::commit) removes everything in it,
/// however its files are owned or moded (whiteouts, read-only dirs, shifted
/// owners included).
#[derive(Debug)]
pub struct LayerWriter {
    /// `tmp/<random>`.
    tmp_dir: PathBuf,
    /// `tmp/<random>/diff`.
    files: PathBuf,
    work: PathBuf,
    /// The flock that tells sweeps this writer is alive.
    _lock: OwnedFd,
    layers: PathBuf,
    sync: bool,
    done: bool,
}

impl LayerWriter {
    /// Where the layer's files go (the overlay upper dir).
    pub fn dir(&self) -> &Path {
        &self.files
    }

    /// An empty directory on the same file system, for the overlay workdir.
    pub fn work_dir(&self) -> &Path {
        &self.work
    }

    /// A scratch path next to `dir()` (removed with the writer, never part
    /// of the layer), e.g. for a downloaded blob.
    pub fn scratch_path(&self, name: &str) -> PathBuf {
        self.tmp_dir.join(format!("scratch-{name}"))
    }

    /// Commits the layer as `id` with default metadata; see [`commit_with`](Self::commit_with).
    pub fn commit(self, id: &LayerId) -> Result<PathBuf, ImageError> {
        self.commit_with(id, LayerMeta::default())
    }

    /// Moves the layer into place as `id` (atomically) and returns its files'
    /// directory ([`LayerStore::path`]). `meta.created_unix` and
    /// `meta.size_bytes` are filled in when zero.
    ///
    /// If layer `id` already exists, the existing one is kept, this one is
    /// discarded, and the existing path is returned. The overlay must be
    /// unmounted before commit.
    pub fn commit_with(mut self, id: &LayerId, mut meta: LayerMeta) -> Result<PathBuf, ImageError> {
        let target = self.layers.join(id.as_str());
        let files = target.join(DIFF);
        if fs::symlink_metadata(&target).is_ok() {
            return Ok(files);
        }
        // Only diff/ and meta.json go into the store.
        let dir_fd =
            fsx::open_dir(&self.tmp_dir).map_err(|e| ImageError::io("open", &self.tmp_dir, e))?;
        for name in
            fsx::list(dir_fd.as_fd()).map_err(|e| ImageError::io("list", &self.tmp_dir, e))?
        {
            if name != OsStr::new(DIFF) {
                fsx::remove_at(dir_fd.as_fd(), &name)
                    .map_err(|e| ImageError::io("remove", &self.tmp_dir.join(&name), e))?;
            }
        }
        if meta.created_unix == 0 {
            meta.created_unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
        }
        if meta.size_bytes == 0 {
            // A figure for people: an unreadable directory (not root) leaves it 0.
            meta.size_bytes = walk::disk_usage(&self.files).unwrap_or_else(|e| {
                tracing::debug!(error = %e, "cannot measure a layer being committed");
                0
            });
        }
        write_meta(&self.tmp_dir, &meta)?;
        if self.sync {
            rfs::syncfs(&dir_fd).map_err(|e| ImageError::io("syncfs", &self.tmp_dir, e.into()))?;
        }
        match rfs::renameat_with(
            rfs::CWD,
            &self.tmp_dir,
            rfs::CWD,
            &target,
            rfs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {
                self.done = true;
                if self.sync {
                    if let Ok(d) = fs::File::open(&self.layers) {
                        // Makes the rename durable; failing here loses nothing done.
                        let _ = d.sync_all();
                    }
                }
                tracing::debug!(layer = %id, bytes = meta.size_bytes, "committed a layer");
                Ok(files)
            }
            // Someone committed the same id meanwhile: theirs stays.
            Err(rustix::io::Errno::EXIST | rustix::io::Errno::NOTEMPTY) => Ok(files),
            Err(e) => Err(ImageError::io("rename into place", &target, e.into())),
        }
    }
}

impl Drop for LayerWriter {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = fsx::remove_tree(&self.tmp_dir) {
                tracing::warn!(dir = %self.tmp_dir.display(), error = %e, "cannot remove an abandoned layer; the next LayerStore::open or gc will retry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, symlink};

    use super::*;

    fn store() -> (tempfile::TempDir, LayerStore) {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = LayerStore::open(&tmp.path().join("store")).unwrap();
        store.set_sync(false);
        (tmp, store)
    }

    fn id(s: &str) -> LayerId {
        LayerId::new(s).unwrap()
    }

    #[test]
    fn layer_ids_are_validated() {
        for ok in ["sha256-0123abcd", "a", "0-1", &"a".repeat(100)] {
            assert!(LayerId::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "A",
            "a/b",
            "..",
            "a..b",
            "-a",
            "a_b",
            "a b",
            &"a".repeat(101),
            "sha256:ab",
        ] {
            assert!(LayerId::new(bad).is_err(), "{bad}");
        }
        assert_eq!(
            LayerId::from_digest("sha256:00ff").unwrap().as_str(),
            "sha256-00ff"
        );
        let json = serde_json::to_string(&id("abc")).unwrap();
        assert_eq!(json, "\"abc\"");
        assert!(serde_json::from_str::<LayerId>("\"../x\"").is_err());
    }

    #[test]
    fn the_store_is_private_to_its_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let store = LayerStore::open(&root).unwrap();
        for d in [&store.root, &store.layers, &store.tmp] {
            assert_eq!(
                fs::metadata(d).unwrap().mode() & 0o7777,
                0o700,
                "{}",
                d.display()
            );
        }
        fs::write(tmp.path().join("file"), b"x").unwrap();
        assert!(LayerStore::open(&tmp.path().join("file")).is_err());
    }

    #[test]
    fn commit_is_atomic_and_first_commit_wins() {
        let (_tmp, store) = store();
        let w = store.begin().unwrap();
        assert!(w.work_dir().is_dir());
        fs::write(w.dir().join("f"), b"one").unwrap();
        let path = w.commit(&id("l1")).unwrap();
        assert_eq!(path, store.path(&id("l1")));
        assert_eq!(fs::read(path.join("f")).unwrap(), b"one");
        assert!(store.contains(&id("l1")));
        // No work dir or scratch in the committed layer.
        assert_eq!(
            fs::read_dir(store.layers.join("l1")).unwrap().count(),
            2,
            "diff and meta.json only"
        );
        let meta = store.meta(&id("l1")).unwrap().unwrap();
        assert!(meta.created_unix > 0);

        let w = store.begin().unwrap();
        fs::write(w.dir().join("f"), b"two").unwrap();
        let tmp_dir = w.tmp_dir.clone();
        let path = w.commit(&id("l1")).unwrap();
        assert_eq!(fs::read(path.join("f")).unwrap(), b"one");
        assert!(!tmp_dir.exists(), "the loser is discarded");
        assert_eq!(store.list().unwrap(), vec![id("l1")]);
        assert_eq!(fs::read_dir(&store.tmp).unwrap().count(), 0);

        let mut m = LayerMeta::with_source("test");
        m.labels.insert("k".into(), "v".into());
        store.set_meta(&id("l1"), &m).unwrap();
        assert_eq!(store.meta(&id("l1")).unwrap().unwrap(), m);
        assert!(store.set_meta(&id("nope"), &m).is_err());
    }

    /// Fills a writer dir with things that are hard to remove.
    fn awkward_tree(dir: &Path, privileged: bool) {
        fs::create_dir_all(dir.join("ro/sub")).unwrap();
        fs::write(dir.join("ro/sub/f"), b"x").unwrap();
        symlink("/etc", dir.join("ro/etc")).unwrap();
        fs::set_permissions(dir.join("ro/sub"), fs::Permissions::from_mode(0o000)).unwrap();
        fs::set_permissions(dir.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::write(dir.join("setuid"), b"x").unwrap();
        fs::set_permissions(dir.join("setuid"), fs::Permissions::from_mode(0o4000)).unwrap();
        if privileged {
            rfs::mknodat(
                rfs::CWD,
                dir.join("whiteout"),
                rfs::FileType::CharacterDevice,
                rfs::Mode::empty(),
                0,
            )
            .unwrap();
            std::os::unix::fs::lchown(dir.join("ro"), Some(100_000), Some(100_000)).unwrap();
            std::os::unix::fs::lchown(dir.join("setuid"), Some(101_000), Some(101_000)).unwrap();
        }
    }

    #[test]
    fn dropping_a_writer_removes_awkward_trees() {
        let (_tmp, store) = store();
        let w = store.begin().unwrap();
        let root = nix::unistd::geteuid().is_root();
        awkward_tree(w.dir(), root);
        awkward_tree(w.work_dir(), root);
        drop(w);
        assert_eq!(fs::read_dir(&store.tmp).unwrap().count(), 0);
        assert!(Path::new("/etc/passwd").exists());
    }

    #[test]
    fn open_sweeps_leftovers_but_not_live_writers() {
        let (_tmp, store) = store();
        let live = store.begin().unwrap();
        fs::write(live.dir().join("f"), b"x").unwrap();
        // A crashed writer: a directory nobody holds a lock on.
        let dead = store.tmp.join("0123");
        fs::create_dir_all(dead.join("diff/d")).unwrap();
        fs::set_permissions(dead.join("diff/d"), fs::Permissions::from_mode(0o500)).unwrap();
        fs::write(store.tmp.join("stray-file"), b"x").unwrap();

        let again = LayerStore::open(&store.root).unwrap();
        assert!(!dead.exists());
        assert!(!again.tmp.join("stray-file").exists());
        assert!(
            live.dir().join("f").exists(),
            "a live writer survives a sweep"
        );
        live.commit(&id("live")).unwrap();
        assert!(again.contains(&id("live")));
    }

    #[test]
    fn gc_removes_everything_not_kept() {
        let (_tmp, store) = store();
        let root = nix::unistd::geteuid().is_root();
        for name in ["keep", "drop1", "drop2"] {
            let w = store.begin().unwrap();
            fs::write(w.dir().join("data"), vec![1u8; 64 * 1024]).unwrap();
            awkward_tree(w.dir(), root);
            w.commit(&id(name)).unwrap();
        }
        // Junk that is not a valid id also goes.
        fs::create_dir(store.layers.join("Not_An_Id")).unwrap();
        let keep: HashSet<LayerId> = [id("keep")].into();
        let stats = store.gc(&keep).unwrap();
        assert_eq!(stats.layers_removed, 3, "{stats:?}");
        if root {
            // (Not root, the 0o000 directories cannot be measured.)
            assert!(stats.bytes_freed >= 2 * 64 * 1024, "{stats:?}");
        }
        assert_eq!(store.list().unwrap(), vec![id("keep")]);
        assert!(store.path(&id("keep")).join("data").exists());
        assert_eq!(fs::read_dir(&store.tmp).unwrap().count(), 0);
        if root {
            let m = fs::symlink_metadata(store.path(&id("keep")).join("setuid")).unwrap();
            assert_eq!(m.uid(), 101_000);
        }
        let freed = store.remove(&id("keep")).unwrap().unwrap();
        assert!(!root || freed > 0);
        assert_eq!(store.remove(&id("keep")).unwrap(), None);
        assert!(store.list().unwrap().is_empty());
    }
}
