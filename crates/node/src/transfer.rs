//! Template transfer between nodes (cluster mode, ADR 0006): a node asked
//! for a sandbox of a build it does not have pulls the build from a node
//! that has it (the api names one in [`SandboxSpec::template_source`]) and
//! keeps it like one of its own builds.
//!
//! # Serving: [`router`]
//!
//! Two routes, relative to where the router is nested (the node RPC nests
//! it under [`rpc::TRANSFER`], behind the cluster token; this module does
//! no authentication of its own):
//!
//! | route | answer |
//! |---|---|
//! | `GET /builds/{template_id}/{build_id}` | the build record ([`TemplateBuild`], JSON), if this node has the build and all its layers |
//! | `GET /layers/{layer_id}` | the layer as a [`layer_tar`] archive ([`layer_tar::MEDIA_TYPE`]), streamed while a blocking task writes it; its [`LayerMeta`] as base64 JSON in [`LAYER_META_HEADER`] |
//!
//! An invalid id is answered 400, a missing build or layer 404, both with
//! an [`RpcRejection`] body. A layer that fails while it is written ends the
//! stream with an error, so the body is cut short and the reader refuses it.
//!
//! # Pulling: [`pull_build`]
//!
//! 1. A build this node has already is returned as it is: nothing is fetched.
//! 2. Pulls of one build take turns on this node; the ones that waited find
//!    the build there and return it (one transfer however many ask at once).
//! 3. The record is fetched and checked (ids as asked, valid layer ids).
//! 4. Its layers are pinned: [`TemplateStore::detach_unused`] keeps them
//!    while the pull runs (before any is looked for, so none can vanish
//!    between the look and the use).
//! 5. Each layer the store lacks is fetched (one fetch per layer at a time,
//!    also across builds sharing it) into a [`LayerWriter`], read with the
//!    owners floor of the sandboxes' id range, checked, and committed with
//!    the source's metadata.
//! 6. The record is saved last, so a crash never leaves a record naming a
//!    missing layer; a crash or failure before leaves at most complete,
//!    unreferenced layers (a later pull uses them, GC removes them) and
//!    partial ones in the layer store's `tmp/`, which a dropped writer or
//!    the next store open removes.
//!
//! Layer ids are not content hashes here: an image layer is named after
//! the digest of its compressed blob, which its unpacked directory cannot
//! be checked against, and a build layer after a cache key. So a layer is
//! checked by its archive's trailer (SHA-256 of everything before it and
//! the member count): a cut or corrupted transfer is refused. The source
//! holds the cluster token and is trusted with the content; the reader still
//! refuses anything that would land outside the new layer.
//!
//! [`LayerWriter`]: arca_image::store::LayerWriter
//! [`SandboxSpec::template_source`]: arca_proto::node::SandboxSpec::template_source

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arca_image::ImageError;
use arca_image::layer_tar::{self, ReadOptions};
use arca_image::store::{LayerId, LayerMeta};
use arca_proto::cluster::bearer;
use arca_proto::node::{NodeError, SandboxSpec};
use arca_proto::rpc::{self, RpcRejection};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use bytes::Bytes;
use http::{StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::templates::{StoreError, TemplateBuild, TemplateStore, valid_name};

/// Response header carrying a layer's [`LayerMeta`]: base64 (standard
/// alphabet) of its JSON.
pub const LAYER_META_HEADER: &str = "arca-layer-meta";

/// How long a source may stay silent (no answer, no body bytes) before a
/// pull gives up on it.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long connecting to a source may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest build record accepted, in bytes.
const MAX_RECORD_BYTES: usize = 1 << 20;

/// Chunks of a layer archive in flight between the HTTP side and the
/// blocking side (each up to the archive writer's buffer, 256 KiB).
const CHUNKS_IN_FLIGHT: usize = 8;

// ---------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------

/// The transfer routes over `store` (a [`TemplateStore`], or a
/// [`Node`](crate::Node), whose store it then serves), meant to be nested
/// under [`rpc::TRANSFER`] behind the cluster token; see the module docs.
pub fn router(store: impl Into<TemplateStore>) -> Router {
    Router::new()
        .route("/builds/{template_id}/{build_id}", get(serve_build))
        .route("/layers/{layer_id}", get(serve_layer))
        .with_state(Arc::new(store.into()))
}

impl From<crate::Node> for TemplateStore {
    /// The node's own store (a handle to it).
    fn from(node: crate::Node) -> TemplateStore {
        node.inner.templates.clone()
    }
}

fn rejection(status: StatusCode, error: String) -> Response {
    (status, axum::Json(RpcRejection { error })).into_response()
}

async fn serve_build(
    State(store): State<Arc<TemplateStore>>,
    Path((template_id, build_id)): Path<(String, String)>,
) -> Response {
    if !valid_name(&template_id) || !valid_name(&build_id) {
        return rejection(
            StatusCode::BAD_REQUEST,
            "invalid template or build id".to_owned(),
        );
    }
    let (t, b) = (template_id.clone(), build_id.clone());
    match tokio::task::spawn_blocking(move || store.get(&t, &b)).await {
        Ok(Some(build)) => axum::Json(build).into_response(),
        Ok(None) => rejection(
            StatusCode::NOT_FOUND,
            format!("this node has no build {build_id} of template {template_id}"),
        ),
        Err(e) => rejection(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn serve_layer(
    State(store): State<Arc<TemplateStore>>,
    Path(layer_id): Path<String>,
) -> Response {
    let Ok(id) = LayerId::new(layer_id) else {
        return rejection(StatusCode::BAD_REQUEST, "invalid layer id".to_owned());
    };
    let layers = store.layers().clone();
    let (found, lookup_id) = (layers.clone(), id.clone());
    let meta = match tokio::task::spawn_blocking(move || {
        found
            .contains(&lookup_id)
            .then(|| found.meta(&lookup_id))
            .transpose()
    })
    .await
    {
        Ok(Ok(Some(meta))) => meta.unwrap_or_default(),
        Ok(Ok(None)) => {
            return rejection(
                StatusCode::NOT_FOUND,
                format!("this node has no layer {id}"),
            );
        }
        Ok(Err(e)) => {
            tracing::warn!(layer = %id, error = %arca_proto::error_chain(&e), "cannot read a layer's metadata");
            return rejection(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot read the layer's metadata".to_owned(),
            );
        }
        Err(e) => return rejection(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let meta = match serde_json::to_vec(&meta) {
        Ok(json) => base64::engine::general_purpose::STANDARD.encode(json),
        Err(e) => return rejection(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHUNKS_IN_FLIGHT);
    let dir = layers.path(&id);
    tokio::task::spawn_blocking(move || {
        let mut out = ChannelWriter { tx };
        match layer_tar::write_layer(&dir, &mut out) {
            Ok(stats) => {
                tracing::debug!(layer = %id, entries = stats.entries, bytes = stats.bytes, "layer sent");
            }
            Err(_) if out.tx.is_closed() => {
                tracing::debug!(layer = %id, "the peer left during a layer transfer");
            }
            Err(e) => {
                tracing::warn!(layer = %id, error = %arca_proto::error_chain(&e), "cannot send a layer");
                // Ends the body with an error: the peer sees it cut short.
                let _ = out
                    .tx
                    .blocking_send(Err(io::Error::other("the layer could not be written")));
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, layer_tar::MEDIA_TYPE)
        .header(LAYER_META_HEADER, meta)
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| rejection(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// The blocking archive writer's end of the response body.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
}

impl io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Pulling
// ---------------------------------------------------------------------------

/// Why a pull failed. Nothing of the build is registered then.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PullError {
    /// The ids asked for cannot name a build.
    #[error("invalid template or build id `{template_id}` / `{build_id}`")]
    InvalidId {
        /// Template id as given.
        template_id: String,
        /// Build id as given.
        build_id: String,
    },
    /// The source's URL cannot be used.
    #[error("invalid source node URL `{url}`: expected http://host:port")]
    InvalidSource {
        /// The URL as given.
        url: String,
    },
    /// The source could not be reached or the connection broke.
    #[error("cannot reach the source node at {url}")]
    Unreachable {
        /// What was requested.
        url: String,
        /// The network error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The source refused the cluster token.
    #[error(
        "the source node at {url} refused the cluster token: give every node and the api the \
         same token"
    )]
    Unauthorized {
        /// What was requested.
        url: String,
    },
    /// The source does not have the build (or not all of its layers).
    #[error("the source node at {source_url} has no build {build_id} of template {template_id}")]
    BuildNotFound {
        /// The source's RPC URL.
        source_url: String,
        /// Template.
        template_id: String,
        /// Build.
        build_id: String,
    },
    /// The source answered an unexpected status.
    #[error("the source node answered {status} for {url}: {detail}")]
    Status {
        /// What was requested.
        url: String,
        /// HTTP status.
        status: u16,
        /// Its error message, if any.
        detail: String,
    },
    /// The source sent something that breaks the protocol.
    #[error("the source node sent an invalid answer for {url}: {detail}")]
    Protocol {
        /// What was requested.
        url: String,
        /// What was wrong.
        detail: String,
    },
    /// The body broke off (the source failed while it wrote the layer, or
    /// the connection was lost); the source's log has the cause.
    #[error("the transfer of {url} broke off")]
    Interrupted {
        /// What was requested.
        url: String,
        /// The network error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The source went silent.
    #[error("the source node sent nothing for {} s on {url}", STALL_TIMEOUT.as_secs())]
    Stalled {
        /// What was requested.
        url: String,
    },
    /// A layer could not be copied (refused, cut short, or not stored).
    #[error("cannot copy layer {layer} from the source node")]
    Layer {
        /// The layer.
        layer: LayerId,
        /// Why.
        #[source]
        source: ImageError,
    },
    /// The record could not be saved.
    #[error("cannot register the pulled build")]
    Store(#[from] StoreError),
    /// A layer was gone right after the record was saved (only something
    /// outside this node's own clean-up could do that).
    #[error("the pulled build {template_id}/{build_id} misses layers after its pull")]
    Incomplete {
        /// Template.
        template_id: String,
        /// Build.
        build_id: String,
    },
    /// A blocking task panicked or was cancelled.
    #[error("a pull task failed")]
    Task(#[from] tokio::task::JoinError),
}

impl From<PullError> for NodeError {
    fn from(e: PullError) -> NodeError {
        match e {
            PullError::BuildNotFound { .. } => {
                NodeError::TemplateNotFound(arca_proto::error_chain(&e))
            }
            PullError::InvalidId { .. } | PullError::InvalidSource { .. } => {
                NodeError::InvalidInput(arca_proto::error_chain(&e))
            }
            _ => NodeError::Internal(arca_proto::error_chain(&e)),
        }
    }
}

/// What pulls in progress on one store share (through [`TemplateStore`]
/// clones): the layers they pinned and their turns.
#[derive(Default)]
pub(crate) struct Pulls {
    /// Layers pulls need kept (a multiset: one entry per pin).
    pins: Mutex<Vec<String>>,
    /// One lock per build or layer being fetched; entries die with their
    /// last user.
    turns: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl Pulls {
    /// The pins, locked: [`TemplateStore::detach_unused`] holds them while
    /// it decides.
    pub(crate) fn pinned(&self) -> MutexGuard<'_, Vec<String>> {
        self.pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pin(self: &Arc<Self>, layers: &[String]) -> Pins {
        self.pinned().extend(layers.iter().cloned());
        Pins {
            pulls: self.clone(),
            layers: layers.to_vec(),
        }
    }

    /// The turn lock of `key`, shared with every pull of the same key.
    fn turn(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        let mut turns = self
            .turns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        turns.retain(|_, w| w.strong_count() > 0);
        if let Some(t) = turns.get(&key).and_then(Weak::upgrade) {
            return t;
        }
        let t = Arc::new(tokio::sync::Mutex::new(()));
        turns.insert(key, Arc::downgrade(&t));
        t
    }
}

/// Pins of one pull, released when dropped.
struct Pins {
    pulls: Arc<Pulls>,
    layers: Vec<String>,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut pins = self.pulls.pinned();
        for l in &self.layers {
            if let Some(i) = pins.iter().position(|p| p == l) {
                pins.swap_remove(i);
            }
        }
    }
}

/// Makes build `template_id`/`build_id` available in `store`, pulling it
/// from the node whose RPC base URL is `source_rpc_url` (`http://host:port`)
/// with the cluster `token` if `store` does not have it; returns its record.
/// See the module docs for the steps and what a failure leaves.
pub async fn pull_build(
    store: &TemplateStore,
    source_rpc_url: &str,
    token: &str,
    template_id: &str,
    build_id: &str,
) -> Result<TemplateBuild, PullError> {
    if !valid_name(template_id) || !valid_name(build_id) {
        return Err(PullError::InvalidId {
            template_id: template_id.to_owned(),
            build_id: build_id.to_owned(),
        });
    }
    if let Some(build) = local_build(store, template_id, build_id).await? {
        return Ok(build);
    }
    let turn = store.pulls.turn(format!("build/{template_id}/{build_id}"));
    let _turn = turn.lock().await;
    if let Some(build) = local_build(store, template_id, build_id).await? {
        return Ok(build);
    }
    let source = Source::new(source_rpc_url, token)?;
    let started = std::time::Instant::now();
    let build = source.build(template_id, build_id).await?;
    let _pins = store.pulls.pin(&build.layers);
    let mut fetched = 0;
    for layer in &build.layers {
        let id = LayerId::new(layer.as_str()).map_err(|e| PullError::Protocol {
            url: source.build_url(template_id, build_id),
            detail: e.to_string(),
        })?;
        if pull_layer(store, &source, &id).await? {
            fetched += 1;
        }
    }
    let (saving, record) = (store.clone(), build.clone());
    tokio::task::spawn_blocking(move || saving.save(&record)).await??;
    let build = local_build(store, template_id, build_id)
        .await?
        .ok_or_else(|| PullError::Incomplete {
            template_id: template_id.to_owned(),
            build_id: build_id.to_owned(),
        })?;
    tracing::info!(
        template_id,
        build_id,
        source = source.base,
        layers = build.layers.len(),
        fetched,
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "pulled a template build"
    );
    Ok(build)
}

/// For [`NodeService::create`](arca_proto::node::NodeService::create): the
/// build of `spec` pulled from its `template_source` (`None` without one).
pub(crate) async fn pull_for(
    store: &TemplateStore,
    spec: &SandboxSpec,
    token: Option<&str>,
) -> Result<Option<TemplateBuild>, NodeError> {
    let Some(source) = spec.template_source.as_deref() else {
        return Ok(None);
    };
    let Some(token) = token else {
        return Err(NodeError::Internal(format!(
            "template {} (build {}) is on another node ({source}), but this node has no cluster \
             token to pull it with",
            spec.template_id, spec.build_id
        )));
    };
    let build = pull_build(store, source, token, &spec.template_id, &spec.build_id)
        .await
        .inspect_err(|e| {
            tracing::warn!(
                template_id = %spec.template_id,
                build_id = %spec.build_id,
                source,
                error = %arca_proto::error_chain(e),
                "cannot pull a template build"
            );
        })?;
    Ok(Some(build))
}

/// The build if `store` has it (record and layers).
async fn local_build(
    store: &TemplateStore,
    template_id: &str,
    build_id: &str,
) -> Result<Option<TemplateBuild>, PullError> {
    let (store, t, b) = (store.clone(), template_id.to_owned(), build_id.to_owned());
    Ok(tokio::task::spawn_blocking(move || store.get(&t, &b)).await?)
}

/// Fetches layer `id` into `store` unless it is there; returns whether it
/// fetched.
async fn pull_layer(
    store: &TemplateStore,
    source: &Source,
    id: &LayerId,
) -> Result<bool, PullError> {
    let layers = store.layers().clone();
    if has_layer(&layers, id).await? {
        return Ok(false);
    }
    let turn = store.pulls.turn(format!("layer/{id}"));
    let _turn = turn.lock().await;
    if has_layer(&layers, id).await? {
        return Ok(false);
    }
    let url = format!("{}{}/layers/{id}", source.base, rpc::TRANSFER);
    let response = source.get(&url).await?;
    let status = response.status();
    if status == StatusCode::NOT_FOUND {
        return Err(PullError::Status {
            url,
            status: status.as_u16(),
            detail: "the source node does not have this layer any more".to_owned(),
        });
    }
    let response = source.check(&url, response).await?;
    let mut meta = match response.headers().get(LAYER_META_HEADER) {
        Some(v) => base64::engine::general_purpose::STANDARD
            .decode(v.as_bytes())
            .ok()
            .and_then(|json| serde_json::from_slice::<LayerMeta>(&json).ok())
            .ok_or_else(|| PullError::Protocol {
                url: url.clone(),
                detail: format!("its {LAYER_META_HEADER} header is not base64 JSON"),
            })?,
        None => LayerMeta::default(),
    };
    // Measured and dated here, where the copy lives.
    meta.size_bytes = 0;
    meta.created_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    meta.labels
        .insert("arca.pulled-from".to_owned(), source.base.clone());

    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHUNKS_IN_FLIGHT);
    let layer = id.clone();
    let copy = tokio::task::spawn_blocking(move || {
        let writer = layers.begin()?;
        let stats = layer_tar::read_layer(
            ChannelReader {
                rx,
                chunk: Bytes::new(),
            },
            writer.dir(),
            &ReadOptions::with_min_id(arca_runtime::DEFAULT_ID_MAP.outside),
        )?;
        // Dropping the writer on an error above removes the partial layer.
        writer.commit_with(&layer, meta)?;
        Ok::<_, ImageError>(stats)
    });
    // Feeds the body to the blocking reader. A network error goes down the
    // channel, so that the reader fails on it; a reader that failed first
    // closes the channel, which ends this loop.
    let mut body = response.into_body();
    let mut pump_error = None;
    loop {
        let frame = match tokio::time::timeout(STALL_TIMEOUT, body.frame()).await {
            Err(_) => {
                pump_error = Some(PullError::Stalled { url: url.clone() });
                let _ = tx
                    .send(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "source stalled",
                    )))
                    .await;
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                pump_error = Some(PullError::Interrupted {
                    url: url.clone(),
                    source: Box::new(e),
                });
                break;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if tx.send(Ok(data)).await.is_err() {
                break;
            }
        }
    }
    drop(tx);
    match copy.await? {
        Ok(stats) => {
            tracing::debug!(layer = %id, entries = stats.entries, bytes = stats.bytes, "layer pulled");
            Ok(true)
        }
        // The network's own error says more than the archive being cut short.
        Err(source) => Err(pump_error.unwrap_or_else(|| PullError::Layer {
            layer: id.clone(),
            source,
        })),
    }
}

async fn has_layer(
    layers: &arca_image::store::LayerStore,
    id: &LayerId,
) -> Result<bool, PullError> {
    let (layers, id) = (layers.clone(), id.clone());
    Ok(tokio::task::spawn_blocking(move || layers.contains(&id)).await?)
}

/// The blocking archive reader's end of the response body.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// A source node as one pull talks to it.
struct Source {
    /// RPC base URL, without a trailing `/`.
    base: String,
    /// `Authorization` value.
    auth: String,
    http: Client<HttpConnector, Empty<Bytes>>,
}

impl Source {
    fn new(url: &str, token: &str) -> Result<Source, PullError> {
        let base = url.trim_end_matches('/').to_owned();
        let valid = base
            .strip_prefix("http://")
            .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
        if !valid {
            return Err(PullError::InvalidSource {
                url: url.to_owned(),
            });
        }
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(CONNECT_TIMEOUT));
        Ok(Source {
            base,
            auth: bearer(token),
            http: Client::builder(TokioExecutor::new()).build(conn),
        })
    }

    fn build_url(&self, template_id: &str, build_id: &str) -> String {
        format!(
            "{}{}/builds/{template_id}/{build_id}",
            self.base,
            rpc::TRANSFER
        )
    }

    /// `GET url` with the token, up to the response head.
    async fn get(&self, url: &str) -> Result<http::Response<hyper::body::Incoming>, PullError> {
        let req = http::Request::get(url)
            .header(header::AUTHORIZATION, &self.auth)
            .body(Empty::new())
            .map_err(|e| PullError::Protocol {
                url: url.to_owned(),
                detail: e.to_string(),
            })?;
        match tokio::time::timeout(STALL_TIMEOUT, self.http.request(req)).await {
            Err(_) => Err(PullError::Stalled {
                url: url.to_owned(),
            }),
            Ok(Err(e)) => Err(PullError::Unreachable {
                url: url.to_owned(),
                source: Box::new(e),
            }),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// The response if it is a 200; the right error otherwise.
    async fn check(
        &self,
        url: &str,
        response: http::Response<hyper::body::Incoming>,
    ) -> Result<http::Response<hyper::body::Incoming>, PullError> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(PullError::Unauthorized {
                url: url.to_owned(),
            });
        }
        let body = self.small_body(url, response).await.unwrap_or_default();
        let detail = serde_json::from_slice::<RpcRejection>(&body)
            .map(|r| r.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_owned());
        Err(PullError::Status {
            url: url.to_owned(),
            status: status.as_u16(),
            detail,
        })
    }

    /// A body of at most [`MAX_RECORD_BYTES`].
    async fn small_body(
        &self,
        url: &str,
        response: http::Response<hyper::body::Incoming>,
    ) -> Result<Bytes, PullError> {
        let limited = http_body_util::Limited::new(response.into_body(), MAX_RECORD_BYTES);
        match tokio::time::timeout(STALL_TIMEOUT, limited.collect()).await {
            Err(_) => Err(PullError::Stalled {
                url: url.to_owned(),
            }),
            Ok(Err(e)) => Err(PullError::Protocol {
                url: url.to_owned(),
                detail: e.to_string(),
            }),
            Ok(Ok(c)) => Ok(c.to_bytes()),
        }
    }

    /// The build record, checked against what was asked.
    async fn build(&self, template_id: &str, build_id: &str) -> Result<TemplateBuild, PullError> {
        let url = self.build_url(template_id, build_id);
        let response = self.get(&url).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(PullError::BuildNotFound {
                source_url: self.base.clone(),
                template_id: template_id.to_owned(),
                build_id: build_id.to_owned(),
            });
        }
        let response = self.check(&url, response).await?;
        let body = self.small_body(&url, response).await?;
        let build: TemplateBuild =
            serde_json::from_slice(&body).map_err(|e| PullError::Protocol {
                url: url.clone(),
                detail: format!("the build record does not parse: {e}"),
            })?;
        if build.template_id != template_id || build.build_id != build_id {
            return Err(PullError::Protocol {
                url,
                detail: format!(
                    "it sent build {}/{} instead",
                    build.template_id, build.build_id
                ),
            });
        }
        if let Some(bad) = build
            .layers
            .iter()
            .find(|l| LayerId::new(l.as_str()).is_err())
        {
            return Err(PullError::Protocol {
                url,
                detail: format!("the record names an invalid layer id `{bad}`"),
            });
        }
        Ok(build)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use arca_image::testing::{fill_sample_layer, snapshot};
    use axum::extract::Request;
    use axum::middleware::{self, Next};
    use chrono::Utc;

    use super::*;

    const TOKEN: &str = "cluster-s3cret";

    /// Whether a test that needs root can run: skips when not root, fails
    /// when privileged tests were asked for.
    fn privileged(what: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert!(
            std::env::var("ARCA_TEST_PRIVILEGED").as_deref() != Ok("1"),
            "ARCA_TEST_PRIVILEGED=1 but not running as root"
        );
        eprintln!("skipped: {what} needs root");
        false
    }

    /// A node home with its template store.
    struct Home {
        _dir: tempfile::TempDir,
        store: TemplateStore,
    }

    fn home() -> Home {
        let dir = tempfile::tempdir().unwrap();
        let store = TemplateStore::open(dir.path()).unwrap();
        Home { _dir: dir, store }
    }

    fn id(s: &str) -> LayerId {
        LayerId::new(s).unwrap()
    }

    /// Commits a layer filled by `fill` as `layer`.
    fn add_layer(store: &TemplateStore, layer: &str, fill: impl FnOnce(&Path)) {
        let w = store.layers().begin().unwrap();
        fill(w.dir());
        let mut meta = LayerMeta::with_source(format!("test layer {layer}"));
        meta.id_offset = Some(100_000);
        w.commit_with(&id(layer), meta).unwrap();
    }

    fn record(template_id: &str, build_id: &str, layers: &[&str]) -> TemplateBuild {
        TemplateBuild {
            template_id: template_id.into(),
            build_id: build_id.into(),
            layers: layers.iter().map(|l| (*l).to_owned()).collect(),
            env: vec![("A".into(), "1".into())],
            workdir: Some("/home/user".into()),
            user: Some("user".into()),
            start_cmd: Some("sleep infinity".into()),
            ready_cmd: None,
            created_at: Utc::now(),
            runtime: None,
        }
    }

    /// A source with build `tpl`/`b1` of three sample layers (whiteouts,
    /// opaque dirs, hard links, setuid files, xattrs in each).
    fn source() -> (Home, TemplateBuild) {
        let src = home();
        for (layer, variant) in [("l-base", "base"), ("l-two", "two"), ("l-three", "three")] {
            add_layer(&src.store, layer, |d| {
                fill_sample_layer(d, variant).unwrap()
            });
        }
        let build = record("tpl", "b1", &["l-base", "l-two", "l-three"]);
        src.store.save(&build).unwrap();
        (src, build)
    }

    /// Requests the test server let through, by kind.
    #[derive(Clone, Default)]
    struct Counts {
        builds: Arc<AtomicUsize>,
        layers: Arc<AtomicUsize>,
    }

    impl Counts {
        fn get(&self) -> (usize, usize) {
            (
                self.builds.load(Ordering::SeqCst),
                self.layers.load(Ordering::SeqCst),
            )
        }
    }

    /// Serves `store` on 127.0.0.1 the way a node does: the transfer
    /// routes nested under the RPC prefix, behind a token check (the real
    /// one is the RPC router's). Returns the RPC base URL.
    async fn serve(store: TemplateStore) -> (String, Counts) {
        async fn gate(State(counts): State<Counts>, req: Request, next: Next) -> Response {
            let auth = req.headers().get(header::AUTHORIZATION);
            if auth.and_then(|v| v.to_str().ok()) != Some(bearer(TOKEN).as_str()) {
                return StatusCode::UNAUTHORIZED.into_response();
            }
            let path = req.uri().path();
            if path.contains("/layers/") {
                counts.layers.fetch_add(1, Ordering::SeqCst);
            } else if path.contains("/builds/") {
                counts.builds.fetch_add(1, Ordering::SeqCst);
            }
            next.run(req).await
        }
        let counts = Counts::default();
        let app = Router::new()
            .nest(rpc::TRANSFER, router(store))
            .layer(middleware::from_fn_with_state(counts.clone(), gate));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), counts)
    }

    /// Nothing of a pull is left in `store`'s layer temp dir.
    fn assert_no_leftovers(store: &TemplateStore) {
        let tmp = store.layers().root().join("tmp");
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    fn assert_same_layer(a: &TemplateStore, b: &TemplateStore, layer: &str) {
        let (pa, pb) = (a.layers().path(&id(layer)), b.layers().path(&id(layer)));
        let (sa, sb) = (snapshot(&pa).unwrap(), snapshot(&pb).unwrap());
        assert_eq!(sa.len(), sb.len(), "{layer}");
        for (x, y) in sa.iter().zip(&sb) {
            assert_eq!(x, y, "{layer}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pull_copies_the_build_exactly_and_a_second_transfers_nothing() {
        if !privileged("pulling layers") {
            return;
        }
        let (src, build) = source();
        let dst = home();
        let (url, counts) = serve(src.store.clone()).await;

        let pulled = pull_build(&dst.store, &url, TOKEN, "tpl", "b1")
            .await
            .unwrap();
        assert_eq!(pulled, build);
        assert_eq!(dst.store.get("tpl", "b1"), Some(build.clone()));
        for layer in &build.layers {
            assert_same_layer(&src.store, &dst.store, layer);
            let (m1, m2) = (
                src.store.layers().meta(&id(layer)).unwrap().unwrap(),
                dst.store.layers().meta(&id(layer)).unwrap().unwrap(),
            );
            assert_eq!(m2.source, m1.source);
            assert_eq!(m2.id_offset, Some(100_000));
            assert_eq!(m2.labels.get("arca.pulled-from"), Some(&url));
        }
        assert_eq!(counts.get(), (1, 3));
        assert_no_leftovers(&dst.store);

        let again = pull_build(&dst.store, &url, TOKEN, "tpl", "b1")
            .await
            .unwrap();
        assert_eq!(again, build);
        assert_eq!(counts.get(), (1, 3), "the second pull asked the source");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_layers_the_store_lacks_are_fetched() {
        if !privileged("pulling layers") {
            return;
        }
        let (src, build) = source();
        let dst = home();
        // Another build here has the base layer already.
        add_layer(&dst.store, "l-base", |d| {
            fill_sample_layer(d, "base").unwrap();
        });
        dst.store.save(&record("other", "b0", &["l-base"])).unwrap();
        let (url, counts) = serve(src.store.clone()).await;
        pull_build(&dst.store, &url, TOKEN, "tpl", "b1")
            .await
            .unwrap();
        assert_eq!(counts.get(), (1, 2));
        assert_eq!(dst.store.get("tpl", "b1"), Some(build));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_pulls_of_one_build_transfer_it_once() {
        if !privileged("pulling layers") {
            return;
        }
        let (src, build) = source();
        let dst = home();
        let (url, counts) = serve(src.store.clone()).await;
        let pulls: Vec<_> = (0..4)
            .map(|_| {
                let (store, url) = (dst.store.clone(), url.clone());
                tokio::spawn(async move { pull_build(&store, &url, TOKEN, "tpl", "b1").await })
            })
            .collect();
        for p in pulls {
            assert_eq!(p.await.unwrap().unwrap(), build);
        }
        assert_eq!(counts.get(), (1, 3));
        assert!(dst.store.pulls.pinned().is_empty(), "pins released");
        assert_no_leftovers(&dst.store);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_pulls_register_nothing() {
        if !privileged("pulling layers") {
            return;
        }
        let (src, _) = source();
        // A build whose second layer the reader refuses (a file owned by
        // host root, below the sandboxes' id range).
        add_layer(&src.store, "l-bad", |d| {
            std::fs::write(d.join("ok"), b"x").unwrap();
            std::fs::write(d.join("null"), b"host root's").unwrap();
            for p in [d.to_path_buf(), d.join("ok")] {
                std::os::unix::fs::lchown(&p, Some(100_000), Some(100_000)).unwrap();
            }
            std::os::unix::fs::lchown(d.join("null"), Some(0), Some(0)).unwrap();
        });
        src.store
            .save(&record("tpl", "bad", &["l-base", "l-bad"]))
            .unwrap();
        let dst = home();
        let (url, counts) = serve(src.store.clone()).await;
        let registered = |dst: &Home| {
            assert!(dst.store.all().is_empty(), "{:?}", dst.store.all());
            assert_no_leftovers(&dst.store);
            assert!(dst.store.pulls.pinned().is_empty());
        };

        let err = pull_build(&dst.store, &url, "wrong", "tpl", "b1")
            .await
            .unwrap_err();
        assert!(matches!(err, PullError::Unauthorized { .. }), "{err:?}");
        assert!(err.to_string().contains("same token"), "{err}");
        registered(&dst);
        assert!(dst.store.layers().list().unwrap().is_empty());

        let err = pull_build(&dst.store, &url, TOKEN, "tpl", "nope")
            .await
            .unwrap_err();
        assert!(matches!(err, PullError::BuildNotFound { .. }), "{err:?}");
        assert!(matches!(
            NodeError::from(err),
            NodeError::TemplateNotFound(_)
        ));
        registered(&dst);

        let err = pull_build(&dst.store, &url, TOKEN, "tpl", "bad")
            .await
            .unwrap_err();
        let PullError::Layer { layer, source } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(layer.as_str(), "l-bad");
        assert!(
            matches!(source, ImageError::UnsafeEntry { entry, .. } if entry == "null"),
            "{source:?}"
        );
        registered(&dst);
        assert!(!dst.store.layers().contains(&id("l-bad")));

        let before = counts.get();
        for (t, b) in [("../x", "b1"), ("tpl", ""), ("tpl", "a/b")] {
            let err = pull_build(&dst.store, &url, TOKEN, t, b).await.unwrap_err();
            assert!(matches!(err, PullError::InvalidId { .. }), "{err:?}");
        }
        for bad_url in ["https://10.0.0.1:3100", "10.0.0.1:3100", "http://h:1/x"] {
            let err = pull_build(&dst.store, bad_url, TOKEN, "tpl", "b1")
                .await
                .unwrap_err();
            assert!(matches!(err, PullError::InvalidSource { .. }), "{err:?}");
        }
        assert_eq!(counts.get(), before, "invalid input reached the source");

        // Nobody listens there (a port just freed).
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = format!("http://{}", free.local_addr().unwrap());
        drop(free);
        let err = pull_build(&dst.store, &gone, TOKEN, "tpl", "b1")
            .await
            .unwrap_err();
        assert!(matches!(err, PullError::Unreachable { .. }), "{err:?}");
        registered(&dst);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_layer_cut_short_in_transit_is_refused() {
        if !privileged("pulling layers") {
            return;
        }
        // A source whose layer answer ends half-way (the connection closes
        // cleanly, as if the source had stopped).
        let layer = tempfile::tempdir().unwrap();
        fill_sample_layer(layer.path(), "cut").unwrap();
        let mut archive = Vec::new();
        layer_tar::write_layer(layer.path(), &mut archive).unwrap();
        archive.truncate(archive.len() / 2);
        let build = record("tpl", "cut", &["l-cut"]);
        let app = Router::new()
            .route(
                &format!("{}/builds/tpl/cut", rpc::TRANSFER),
                get({
                    let build = build.clone();
                    move || async move { axum::Json(build) }
                }),
            )
            .route(
                &format!("{}/layers/l-cut", rpc::TRANSFER),
                get(move || async move { archive }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });

        let dst = home();
        let err = pull_build(&dst.store, &url, TOKEN, "tpl", "cut")
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                PullError::Layer {
                    source: ImageError::LayerArchive { .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(dst.store.all().is_empty());
        assert!(dst.store.layers().list().unwrap().is_empty());
        assert_no_leftovers(&dst.store);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_routes_validate_ids_and_answer_404_for_what_is_missing() {
        if !privileged("serving layers") {
            return;
        }
        let (src, _) = source();
        let (url, _) = serve(src.store.clone()).await;
        let source = Source::new(&url, TOKEN).unwrap();
        for (path, status) in [
            ("/builds/tpl/b1", 200),
            ("/builds/tpl/nope", 404),
            ("/builds/.hidden/b1", 400),
            ("/builds/t%2F..%2Fx/b1", 400),
            ("/layers/l-base", 200),
            ("/layers/l-none", 404),
            ("/layers/UPPER", 400),
            ("/layers/..", 400),
        ] {
            let response = source
                .get(&format!("{url}{}{path}", rpc::TRANSFER))
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), status, "{path}");
            if status == 200 && path.starts_with("/layers/") {
                assert_eq!(
                    response.headers()[header::CONTENT_TYPE],
                    layer_tar::MEDIA_TYPE
                );
                assert!(response.headers().contains_key(LAYER_META_HEADER));
            }
        }
    }

    #[test]
    fn gc_keeps_the_layers_a_pull_pinned() {
        if !privileged("layer stores") {
            return;
        }
        let h = home();
        for l in ["pinned", "loose"] {
            add_layer(&h.store, l, |d| std::fs::write(d.join("f"), l).unwrap());
        }
        let pins = h
            .store
            .pulls
            .pin(&["pinned".to_owned(), "pinned".to_owned()]);
        let detached = h.store.detach_unused(&[]).unwrap();
        h.store.remove_detached(&detached);
        assert!(h.store.layers().contains(&id("pinned")));
        assert!(!h.store.layers().contains(&id("loose")));
        drop(pins);
        assert!(h.store.pulls.pinned().is_empty());
        let detached = h.store.detach_unused(&[]).unwrap();
        h.store.remove_detached(&detached);
        assert!(!h.store.layers().contains(&id("pinned")));
    }

    #[test]
    fn turns_are_shared_per_key_and_forgotten_when_unused() {
        let pulls = Pulls::default();
        let a = pulls.turn("build/t/b".into());
        let b = pulls.turn("build/t/b".into());
        assert!(Arc::ptr_eq(&a, &b));
        let other = pulls.turn("layer/x".into());
        assert!(!Arc::ptr_eq(&a, &other));
        drop((a, b, other));
        let _c = pulls.turn("build/t/c".into());
        assert_eq!(pulls.turns.lock().unwrap().len(), 1);
    }
}
