//! Template builds on this node: which layers each build stacks, and the
//! configuration its sandboxes start with.
//!
//! A build's record is `$ARCA_HOME/templates/<template>/<build>.json`; its
//! layers live in the layer store (`$ARCA_HOME/layers`), shared between
//! builds, so a record is all a build adds. Records are written atomically
//! after every layer they name is in the store, so a crash never leaves a
//! record pointing at a missing layer.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arca_image::store::{LayerId, LayerStore};
use arca_proto::build::{BASE_BUILD_ID, BASE_TEMPLATE_ID};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Layer id of the Debian bootstrap the `base` template is made of.
pub const BASE_LAYER: &str = "debian-bookworm-base-v1";

/// A finished, runnable build of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateBuild {
    /// Template.
    pub template_id: String,
    /// Build.
    pub build_id: String,
    /// Layer ids, bottom first.
    pub layers: Vec<String>,
    /// Environment of every process (ENV).
    pub env: Vec<(String, String)>,
    /// Default working directory (WORKDIR).
    pub workdir: Option<String>,
    /// Default user (USER).
    pub user: Option<String>,
    /// Started in every sandbox (shell command).
    pub start_cmd: Option<String>,
    /// Polled until it exits 0 before a sandbox counts as started.
    pub ready_cmd: Option<String>,
    /// When it was finished.
    pub created_at: DateTime<Utc>,
    /// Isolation backend its sandboxes run under unless a create asks for
    /// another (`LABEL arca.runtime=...`).
    #[serde(default)]
    pub runtime: Option<arca_proto::node::Runtime>,
}

/// Builds and layers on this node. Clones are handles to the same store
/// (and share the bookkeeping of pulls in progress).
#[derive(Clone)]
pub struct TemplateStore {
    dir: PathBuf,
    layers: LayerStore,
    /// Pulls from other nodes in progress: their pins and turns.
    pub(crate) pulls: Arc<crate::transfer::Pulls>,
}

/// A store could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("template store: {0}")]
pub struct StoreError(pub String);

/// Whether `s` may be a template or build id (a path component of a record).
pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !s.starts_with('.')
}

impl TemplateStore {
    /// Opens `$home/templates` and `$home/layers`; moves a `base` root file
    /// system made by an earlier version (`templates/base/rootfs`) into the
    /// layer store.
    pub fn open(home: &Path) -> Result<TemplateStore, StoreError> {
        let dir = home.join("templates");
        std::fs::create_dir_all(&dir).map_err(|e| StoreError(format!("{}: {e}", dir.display())))?;
        // A crash in the middle of a build step can leave its disk image
        // mounted in the store's temp area; the store's clean-up must not
        // walk into it.
        unmount_under(&home.join("layers").join("tmp"));
        let layers =
            LayerStore::open(&home.join("layers")).map_err(|e| StoreError(e.to_string()))?;
        let store = TemplateStore {
            dir,
            layers,
            pulls: Arc::default(),
        };
        let legacy = store.dir.join(BASE_TEMPLATE_ID).join("rootfs");
        if legacy.is_dir() && store.get(BASE_TEMPLATE_ID, BASE_BUILD_ID).is_none() {
            store.install_base_from(&legacy)?;
        }
        Ok(store)
    }

    /// The layer store.
    pub fn layers(&self) -> &LayerStore {
        &self.layers
    }

    /// Whether the `base` template is ready.
    pub fn has_base(&self) -> bool {
        self.get(BASE_TEMPLATE_ID, BASE_BUILD_ID).is_some()
    }

    /// Makes this store's `base` the one of `other` (another `$ARCA_HOME`)
    /// through a symlink to its layer: for tests and benchmarks that run
    /// nodes in throw-away homes without building Debian again.
    pub fn share_base_from(&self, other: &TemplateStore) -> Result<(), StoreError> {
        let id = layer_id(BASE_LAYER)?;
        if !other.layers.contains(&id) {
            return Err(StoreError(format!(
                "{} has no base template; start `arca up` with it once",
                other.dir.display()
            )));
        }
        if !self.layers.contains(&id) {
            let (from, to) = (other.layers.path(&id), self.layers.path(&id));
            let (Some(from), Some(to)) = (from.parent(), to.parent()) else {
                return Err(StoreError("layer paths have no parent".into()));
            };
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir).map_err(|e| StoreError(e.to_string()))?;
            }
            std::os::unix::fs::symlink(from, to)
                .map_err(|e| StoreError(format!("linking {}: {e}", to.display())))?;
        }
        let build = other
            .get(BASE_TEMPLATE_ID, BASE_BUILD_ID)
            .ok_or_else(|| StoreError("the other home has no base build".into()))?;
        self.save(&build)
    }

    /// Registers `rootfs` (a Debian root file system, ownership already
    /// shifted) as the `base` template's only layer, moving it.
    pub fn install_base_from(&self, rootfs: &Path) -> Result<(), StoreError> {
        let id = layer_id(BASE_LAYER)?;
        if !self.layers.contains(&id) {
            let writer = self.layers.begin().map_err(|e| StoreError(e.to_string()))?;
            let target = writer.dir().to_path_buf();
            std::fs::remove_dir(&target)
                .and_then(|()| std::fs::rename(rootfs, &target))
                .map_err(|e| {
                    StoreError(format!("moving {} into the store: {e}", rootfs.display()))
                })?;
            writer.commit(&id).map_err(|e| StoreError(e.to_string()))?;
        }
        self.save(&TemplateBuild {
            template_id: BASE_TEMPLATE_ID.into(),
            build_id: BASE_BUILD_ID.into(),
            layers: vec![BASE_LAYER.into()],
            env: Vec::new(),
            workdir: None,
            user: None,
            start_cmd: None,
            ready_cmd: None,
            created_at: Utc::now(),
            runtime: None,
        })?;
        let old = self.dir.join(BASE_TEMPLATE_ID).join("rootfs");
        if old.exists() {
            let _ = std::fs::remove_dir_all(&old);
        }
        Ok(())
    }

    fn record_path(&self, template_id: &str, build_id: &str) -> Option<PathBuf> {
        (valid_name(template_id) && valid_name(build_id))
            .then(|| self.dir.join(template_id).join(format!("{build_id}.json")))
    }

    /// A build, if this node has it and every layer of it.
    pub fn get(&self, template_id: &str, build_id: &str) -> Option<TemplateBuild> {
        let path = self.record_path(template_id, build_id)?;
        let text = std::fs::read(path).ok()?;
        let build: TemplateBuild = serde_json::from_slice(&text).ok()?;
        build
            .layers
            .iter()
            .all(|l| layer_id(l).is_ok_and(|id| self.layers.contains(&id)))
            .then_some(build)
    }

    /// A build a sandbox runs on: also one deleted since (its record and
    /// layers stay while a sandbox of it lives).
    pub fn get_in_use(&self, template_id: &str, build_id: &str) -> Option<TemplateBuild> {
        self.get(template_id, build_id).or_else(|| {
            let path = self
                .record_path(template_id, build_id)?
                .with_extension("deleted");
            let build: TemplateBuild = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
            build
                .layers
                .iter()
                .all(|l| layer_id(l).is_ok_and(|id| self.layers.contains(&id)))
                .then_some(build)
        })
    }

    /// The overlay lower dirs of a build, upper-most first.
    pub fn lower_dirs(&self, build: &TemplateBuild) -> Result<Vec<PathBuf>, StoreError> {
        self.layer_dirs(&build.layers)
    }

    /// The directories of `layers` (bottom first) as overlay lower dirs,
    /// upper-most first.
    pub fn layer_dirs(&self, layers: &[String]) -> Result<Vec<PathBuf>, StoreError> {
        layers
            .iter()
            .rev()
            .map(|l| layer_id(l).map(|id| self.layers.path(&id)))
            .collect()
    }

    /// Writes a build's record (atomically).
    pub fn save(&self, build: &TemplateBuild) -> Result<(), StoreError> {
        let path = self
            .record_path(&build.template_id, &build.build_id)
            .ok_or_else(|| StoreError(format!("invalid template or build id {build:?}")))?;
        let parent = path.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent).map_err(|e| StoreError(e.to_string()))?;
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(build).unwrap_or_default())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| StoreError(format!("{}: {e}", path.display())))
    }

    /// Every build record on this node.
    pub fn all(&self) -> Vec<TemplateBuild> {
        self.records(&["json"])
    }

    /// Records with one of these extensions (`json`: live, `deleted`:
    /// deleted while sandboxes of it ran).
    fn records(&self, extensions: &[&str]) -> Vec<TemplateBuild> {
        let mut out = Vec::new();
        for t in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            for b in std::fs::read_dir(t.path()).into_iter().flatten().flatten() {
                let p = b.path();
                if p.extension()
                    .is_some_and(|e| extensions.iter().any(|x| e == *x))
                {
                    if let Some(build) = std::fs::read(&p)
                        .ok()
                        .and_then(|t| serde_json::from_slice::<TemplateBuild>(&t).ok())
                    {
                        out.push(build);
                    }
                }
            }
        }
        out
    }

    /// Makes a build unusable for new sandboxes but keeps its layers until
    /// [`TemplateStore::purge_deleted`] finds no sandbox of it running.
    pub fn retire(&self, template_id: &str, build_id: &str) -> Result<(), StoreError> {
        if let Some(path) = self.record_path(template_id, build_id) {
            match std::fs::rename(&path, path.with_extension("deleted")) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError(format!("{}: {e}", path.display()))),
            }
        }
        Ok(())
    }

    /// Removes the retired builds `running` does not name; returns whether
    /// any went.
    pub fn purge_deleted(&self, running: &HashSet<(String, String)>) -> bool {
        let mut any = false;
        for b in self.records(&["deleted"]) {
            if !running.contains(&(b.template_id.clone(), b.build_id.clone())) {
                any |= self.forget(&b.template_id, &b.build_id).is_ok();
            }
        }
        any
    }

    /// Removes a build's record only.
    pub fn forget(&self, template_id: &str, build_id: &str) -> Result<(), StoreError> {
        if let Some(path) = self.record_path(template_id, build_id) {
            let _ = std::fs::remove_file(path.with_extension("deleted"));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError(format!("{}: {e}", path.display()))),
            }
            if let Some(dir) = path.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
        Ok(())
    }

    /// Moves the layers no build record (retired ones included), no entry
    /// of `pinned` and no pull in progress names out of the store; remove
    /// them with [`TemplateStore::remove_detached`] (outside any lock).
    pub fn detach_unused(&self, pinned: &[String]) -> Result<Vec<PathBuf>, StoreError> {
        // Held until the layers are out: a pull pins before it looks.
        let pulling = self.pulls.pinned();
        let keep: HashSet<LayerId> = self
            .records(&["json", "deleted"])
            .iter()
            .flat_map(|b| b.layers.iter())
            .chain(pinned)
            .chain(pulling.iter())
            .filter_map(|l| layer_id(l).ok())
            .collect();
        self.layers
            .detach_unreferenced(&keep)
            .map_err(|e| StoreError(e.to_string()))
    }

    /// Removes layers [`TemplateStore::detach_unused`] moved out.
    pub fn remove_detached(&self, detached: &[PathBuf]) -> u64 {
        self.layers.remove_detached(detached)
    }
}

/// Lazily unmounts every mount point under `dir` (from this process's
/// mount table).
fn unmount_under(dir: &Path) {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    // Deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        match nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => tracing::info!(mount = %p.display(), "unmounted a leftover build disk"),
            Err(e) => tracing::warn!(mount = %p.display(), error = %e, "cannot unmount a leftover"),
        }
    }
}

/// A layer id from its text.
pub(crate) fn layer_id(s: &str) -> Result<LayerId, StoreError> {
    LayerId::new(s).map_err(|e| StoreError(e.to_string()))
}

/// `PATH` of processes whose template does not set one (Docker's default).
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl TemplateBuild {
    /// The environment its processes get: the template's ENV over a
    /// default `PATH`.
    pub(crate) fn process_env(&self) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        env
    }

    /// `cmd` as E2B runs a template's shell commands (`bash -l -c`).
    pub(crate) fn shell_argv(cmd: &str) -> Vec<String> {
        let mut argv: Vec<String> = arca_template::e2b::E2B_SHELL
            .iter()
            .map(|s| (*s).to_string())
            .collect();
        argv.push(cmd.to_string());
        argv
    }

    /// The user its processes run as by default.
    pub(crate) fn default_user(&self) -> &str {
        self.user
            .as_deref()
            .map_or("user", |u| u.split(':').next().unwrap_or(u))
    }
}
