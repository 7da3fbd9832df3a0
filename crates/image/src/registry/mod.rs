//! Pulling images from OCI / Docker registries (distribution API v2) into a
//! [`LayerStore`].
//!
//! # What [`pull`] does, in order
//!
//! 1. Parses the reference ([`Reference`]) and picks the endpoint: the
//!    registry's API host over HTTPS, plain HTTP for loopback hosts and those
//!    in [`PullOptions::insecure`]; for Docker Hub references the
//!    [`PullOptions::mirror`] if one is set (no fallback to Docker Hub: a
//!    mirror is usually set because Docker Hub is unreachable or rate-limited,
//!    and its errors are the useful ones).
//! 2. Fetches the manifest by tag or digest. Docker v2 schema 2 and OCI
//!    manifests are accepted; for a manifest list / OCI index the entry for
//!    [`PullOptions::platform`] is chosen and fetched by digest. Manifests
//!    fetched by digest must hash to it; by tag, to `Docker-Content-Digest`
//!    when the registry sends one.
//! 3. Fetches the config blob (digest-checked) into an [`ImageConfig`].
//! 4. For each layer not already in the store (id `sha256-<hex>` of its
//!    compressed blob), up to [`CONCURRENT_LAYERS`] at a time: streams the
//!    blob into a scratch file of a new [`LayerWriter`](crate::store::LayerWriter)
//!    checking size and digest, unpacks it ([`crate::unpack`]) checking the
//!    uncompressed stream against the config's `diff_id`, and commits it.
//!
//! Authentication answers `401`s: `Basic` with [`PullOptions::auth`], or
//! `Bearer` by fetching a token from the challenge's realm (with the
//! credentials as basic auth if given, anonymously otherwise), then retrying
//! once. Credentials are never sent over plain HTTP to a host that is not
//! insecure-listed, nor to another host a blob redirect leads to.
//!
//! Nothing of a failed layer stays in the store; layers that completed stay
//! (a retry does not download them again).

mod auth;
mod client;
mod manifest;
mod reference;

use std::collections::HashSet;
use std::fmt;
use std::io;

use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt as _;

pub use manifest::{ImageConfig, Platform};
pub use reference::{DEFAULT_TAG, DOCKER_HUB, DOCKER_HUB_API, Reference};

use crate::ImageError;
use crate::store::{LayerId, LayerMeta, LayerStore};
use crate::unpack::{UnpackOptions, unpack_layer_file};
use manifest::{
    Descriptor, MANIFEST_ACCEPT, Manifest, check_image_manifest, layer_type_supported,
    parse_config, parse_manifest, platforms, select_platform,
};

/// Layers downloaded and unpacked at the same time.
pub const CONCURRENT_LAYERS: usize = 3;

/// A username and password (or token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl Credentials {
    /// Credentials from a user name and password.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Credentials for the registry (and its token server).
    pub auth: Option<Credentials>,
    /// Registry mirror for Docker Hub references: `http(s)://host[:port][/path]`
    /// or `host[:port]` (HTTPS unless insecure).
    pub mirror: Option<String>,
    /// Platform to pick from multi-platform images; default: this host's.
    pub platform: Platform,
    /// Registries spoken to over plain HTTP, as `host:port` or `host` (any
    /// port). Loopback hosts (`localhost`, `127.0.0.0/8`, `[::1]`) always are.
    pub insecure: Vec<String>,
    /// Added to every uid and gid while unpacking (100000 in Arca).
    pub id_offset: u32,
}

/// A pulled image: its layers are in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PulledImage {
    /// The reference, normalised (`docker.io/library/busybox:latest`).
    pub reference: String,
    /// Digest of the image manifest used (the platform's, for an index).
    pub manifest_digest: String,
    /// Digest of the index the manifest was chosen from, if there was one.
    pub index_digest: Option<String>,
    /// The layers, bottom first (overlay `lowerdir` lists them top first).
    pub layers: Vec<LayerId>,
    /// How the image wants to be run.
    pub config: ImageConfig,
}

/// Progress of a [`pull`], for a progress bar.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PullProgress {
    /// The manifest is known.
    Resolved {
        /// The reference, normalised.
        reference: String,
        /// Digest of the image manifest.
        manifest_digest: String,
        /// Number of layers.
        layers: usize,
        /// Sum of the layers' compressed sizes in bytes.
        total_bytes: u64,
    },
    /// A layer was already in the store.
    LayerCached {
        /// Its blob digest.
        digest: String,
    },
    /// Bytes of a layer downloaded so far (at most once per MiB, and at the end).
    Downloading {
        /// Its blob digest.
        digest: String,
        /// Bytes so far.
        downloaded: u64,
        /// Compressed size.
        total: u64,
    },
    /// A layer is being unpacked.
    Unpacking {
        /// Its blob digest.
        digest: String,
    },
    /// A layer is in the store.
    LayerDone {
        /// Its blob digest.
        digest: String,
        /// Bytes of file content unpacked.
        bytes: u64,
    },
}

/// Pulls `reference` into `store`; see the module docs.
///
/// `progress` is called from the tasks running this future (never after it
/// returns, except that a layer already being unpacked when the future is
/// dropped finishes in the background and is committed or removed).
pub async fn pull(
    reference: &str,
    opts: &PullOptions,
    store: &LayerStore,
    progress: &(dyn Fn(PullProgress) + Send + Sync),
) -> Result<PulledImage, ImageError> {
    let r = Reference::parse(reference)?;
    let shown = r.to_string();
    let (base, registry) = match (&opts.mirror, r.is_docker_hub()) {
        (Some(m), true) => {
            let base = client::mirror_url(m, &opts.insecure)?;
            let name = format!("{base} (mirror of docker.io)");
            (base, name)
        }
        _ => (
            client::base_url(r.api_host(), &opts.insecure),
            r.registry.clone(),
        ),
    };
    let http = client::Http::new();
    let session = client::Session::new(
        &http,
        base,
        registry,
        &r.repository,
        shown.clone(),
        opts.auth.as_ref(),
        &opts.insecure,
    );
    let invalid = |detail: String| ImageError::InvalidImage {
        reference: shown.clone(),
        detail,
    };

    let (body, content_type, digest) = session.manifest(r.manifest_ref(), MANIFEST_ACCEPT).await?;
    let (manifest, manifest_digest, index_digest) =
        match parse_manifest(&body, content_type.as_deref()).map_err(invalid)? {
            Manifest::Image(m) => (m, digest, None),
            Manifest::Index(index) => {
                let entry = select_platform(&index, &opts.platform).ok_or_else(|| {
                    ImageError::NoMatchingPlatform {
                        reference: shown.clone(),
                        wanted: opts.platform.to_string(),
                        available: platforms(&index),
                    }
                })?;
                reference::check_digest(&entry.digest)
                    .map_err(|e| invalid(format!("index entry digest: {e}")))?;
                let (body, content_type, entry_digest) =
                    session.manifest(&entry.digest, MANIFEST_ACCEPT).await?;
                match parse_manifest(&body, content_type.as_deref()).map_err(invalid)? {
                    Manifest::Image(m) => (m, entry_digest, Some(digest)),
                    Manifest::Index(_) => {
                        return Err(invalid("an index entry points at another index".to_owned()));
                    }
                }
            }
        };
    check_image_manifest(&manifest).map_err(invalid)?;
    for layer in &manifest.layers {
        if !layer_type_supported(&layer.media_type) {
            return Err(ImageError::UnsupportedLayer {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            });
        }
    }
    let config_bytes = session
        .blob_bytes(&manifest.config.digest, client::MAX_CONFIG_BYTES)
        .await?;
    let (config, diff_ids) = parse_config(&config_bytes).map_err(invalid)?;
    if !diff_ids.is_empty() && diff_ids.len() != manifest.layers.len() {
        return Err(invalid(format!(
            "its config lists {} diff_ids for {} layers",
            diff_ids.len(),
            manifest.layers.len()
        )));
    }
    if !config.architecture.is_empty() && config.architecture != opts.platform.architecture {
        tracing::warn!(reference = %shown, image = %config.architecture, wanted = %opts.platform, "the image is for another architecture");
    }
    progress(PullProgress::Resolved {
        reference: shown.clone(),
        manifest_digest: manifest_digest.clone(),
        layers: manifest.layers.len(),
        total_bytes: manifest.layers.iter().map(|l| l.size).sum(),
    });

    let layers = manifest
        .layers
        .iter()
        .map(|l| LayerId::from_digest(&l.digest))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = HashSet::new();
    let source = format!("pull {}/{}@{manifest_digest}", r.registry, r.repository);
    // After one layer fails, layers not started are skipped and downloads in
    // flight stop; unpacks in flight finish. pull returns only then, so that
    // nothing keeps writing into the store after it returned.
    let failed = AtomicBool::new(false);
    // Futures collected first (no closures live across the await below:
    // that keeps the pull future provably Send).
    let mut jobs = Vec::new();
    for (i, layer) in manifest.layers.iter().enumerate() {
        if seen.insert(layer.digest.clone()) {
            jobs.push(layer_job(
                &session,
                store,
                layer,
                diff_ids.get(i).cloned(),
                opts.id_offset,
                &source,
                progress,
                &failed,
            ));
        }
    }
    let results: Vec<Result<(), ImageError>> = futures_util::stream::iter(jobs)
        .buffer_unordered(CONCURRENT_LAYERS)
        .collect()
        .await;
    // Completion order: the first error is the one that stopped the others.
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    tracing::info!(reference = %shown, manifest = %manifest_digest, layers = layers.len(), "pulled");
    Ok(PulledImage {
        reference: shown,
        manifest_digest,
        index_digest,
        layers,
        config,
    })
}

/// [`fetch_layer`] unless another layer failed already; records a failure.
#[allow(clippy::too_many_arguments)] // private; one call site
async fn layer_job(
    session: &client::Session<'_>,
    store: &LayerStore,
    desc: &Descriptor,
    diff_id: Option<String>,
    id_offset: u32,
    source: &str,
    progress: &(dyn Fn(PullProgress) + Send + Sync),
    failed: &AtomicBool,
) -> Result<(), ImageError> {
    if failed.load(Ordering::Relaxed) {
        return Ok(());
    }
    let result = fetch_layer(
        session, store, desc, diff_id, id_offset, source, progress, failed,
    )
    .await;
    if result.is_err() {
        failed.store(true, Ordering::Relaxed);
    }
    result
}

/// Makes sure one layer is in the store (returns early, doing nothing, when
/// `cancel` is set during the download).
#[allow(clippy::too_many_arguments)] // private; one call site
async fn fetch_layer(
    session: &client::Session<'_>,
    store: &LayerStore,
    desc: &Descriptor,
    diff_id: Option<String>,
    id_offset: u32,
    source: &str,
    progress: &(dyn Fn(PullProgress) + Send + Sync),
    cancel: &AtomicBool,
) -> Result<(), ImageError> {
    let digest = desc.digest.clone();
    let wrap = |e: ImageError| ImageError::Layer {
        digest: digest.clone(),
        source: Box::new(e),
    };
    let id = LayerId::from_digest(&desc.digest)?;
    if store.contains(&id) {
        if let Some(stored) = store.meta(&id)?.and_then(|m| m.id_offset) {
            if stored != id_offset {
                return Err(ImageError::LayerOffsetMismatch {
                    id,
                    stored,
                    wanted: id_offset,
                });
            }
        }
        // A layer first pulled from another repository is only reused once
        // this one shows it holds the blob (and lets us read it): knowing a
        // digest must not be enough to get a private image's layer.
        let repo = source.split_once('@').map_or(source, |(r, _)| r);
        let same_repo = store
            .meta(&id)?
            .is_some_and(|m| m.source.split_once('@').is_some_and(|(r, _)| r == repo));
        if !same_repo {
            drop(session.blob_response(&desc.digest).await.map_err(wrap)?);
        }
        progress(PullProgress::LayerCached { digest });
        return Ok(());
    }
    let writer = store.begin()?;
    let blob = writer.scratch_path("blob");
    let total = desc.size;
    progress(PullProgress::Downloading {
        digest: digest.clone(),
        downloaded: 0,
        total,
    });
    let report = |downloaded| {
        progress(PullProgress::Downloading {
            digest: digest.clone(),
            downloaded,
            total,
        });
    };
    let complete = session
        .blob_to_file(&desc.digest, desc.size, &blob, &report, cancel)
        .await
        .map_err(wrap)?;
    if !complete {
        return Ok(());
    }
    progress(PullProgress::Unpacking {
        digest: digest.clone(),
    });
    let meta_source = source.to_owned();
    let task_digest = digest.clone();
    let unpacked = tokio::task::spawn_blocking(move || -> Result<u64, ImageError> {
        let stats = unpack_layer_file(&blob, writer.dir(), &UnpackOptions::new(id_offset))?;
        let _ = std::fs::remove_file(&blob);
        if let Some(expected) = diff_id {
            if expected != stats.diff_id {
                return Err(ImageError::DigestMismatch {
                    what: format!("uncompressed layer {task_digest} (its diff_id)"),
                    expected,
                    actual: stats.diff_id,
                });
            }
        }
        let mut meta = LayerMeta::with_source(meta_source);
        meta.id_offset = Some(id_offset);
        meta.diff_id = Some(stats.diff_id);
        writer.commit_with(&id, meta)?;
        Ok(stats.bytes)
    })
    .await;
    let bytes = match unpacked {
        Ok(result) => result.map_err(wrap)?,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => {
            return Err(wrap(ImageError::LayerArchive {
                source: io::Error::other("the unpack task was cancelled"),
            }));
        }
    };
    progress(PullProgress::LayerDone { digest, bytes });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn pull_future_is_send_so_the_node_can_spawn_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LayerStore::open(tmp.path()).unwrap();
        let opts = PullOptions::default();
        let fut = pull("busybox", &opts, &store, &|_| {});
        assert_send(&fut);
    }

    #[test]
    fn credentials_do_not_leak_into_debug_output() {
        let c = Credentials::new("alice", "hunter2");
        let shown = format!(
            "{:?}",
            PullOptions {
                auth: Some(c),
                ..PullOptions::default()
            }
        );
        assert!(
            shown.contains("alice") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
