//! `arca-api`: Arca's control plane, the E2B-compatible REST API
//! (CONTRACT.md section 2) that the official E2B SDKs talk to.
//!
//! It authenticates API keys to teams, keeps every sandbox in a database
//! (SQLite by default, PostgreSQL for a cluster's replicas), runs the
//! template registry (names, builds, tags, build logs, uploaded COPY
//! archives; CONTRACT 2.4) and reaches nodes only through [`NodeService`]
//! and [`BuildService`]. The node is the authority on which sandboxes
//! exist: the api follows its [`SandboxEvent`]s and reconciles with its list
//! at start, so a record never outlives its sandbox for long and no sandbox
//! runs without a record.
//!
//! ```no_run
//! # async fn run(
//! #     node: std::sync::Arc<dyn arca_proto::node::NodeService>,
//! #     builder: std::sync::Arc<dyn arca_proto::build::BuildService>,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! use arca_api::{Api, ApiConfig};
//!
//! let config = ApiConfig {
//!     uploads_dir: "/var/lib/arca/uploads".into(),
//!     public_url: "http://127.0.0.1:3000".into(),
//!     ..ApiConfig::default()
//! };
//! let api = Api::open("sqlite:/var/lib/arca/arca.db", config, node, builder).await?;
//! if let Some(key) = api.ensure_bootstrap().await? {
//!     println!("E2B_API_KEY={key}");
//! }
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! api.serve(listener).await?;
//! # Ok(())
//! # }
//! ```
//!
//! [`SandboxEvent`]: arca_proto::node::SandboxEvent
#![forbid(unsafe_code)]

mod cluster;
mod config;
mod db;
mod error;
mod http;
mod ids;
mod keys;
mod models;
mod network;
mod sandboxes;
mod snapshots;
mod sync;
mod templates;

use std::sync::Arc;

use arca_proto::build::BuildService;
use arca_proto::node::NodeService;
use tokio::sync::Semaphore;

pub use crate::cluster::{
    ClusterConfig, DEFAULT_HEARTBEAT, DEFAULT_LOST_AFTER, DEFAULT_PLACEMENT_CHOICES, NodeClient,
};
pub use crate::config::{
    ApiConfig, DEFAULT_CPU_COUNT, DEFAULT_DISK_MB, DEFAULT_MAX_CONCURRENT_BUILDS,
    DEFAULT_MAX_CPU_COUNT, DEFAULT_MAX_DISK_MB, DEFAULT_MAX_MEMORY_MB, DEFAULT_MAX_TIMEOUT_SECS,
    DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_MEMORY_MB, DEFAULT_PUBLIC_URL,
};
pub use crate::error::ApiError;
pub use crate::keys::KeyInfo;
pub use axum::Router;

/// The control-plane server. Cheap to clone: clones share the database pool,
/// the node and builder handles, the build slots and the configuration.
#[derive(Clone)]
pub struct Api {
    inner: Arc<Inner>,
}

struct Inner {
    db: db::Db,
    config: ApiConfig,
    nodes: cluster::Nodes,
    /// One permit per template build that may run at once.
    build_slots: Arc<Semaphore>,
    /// Serializes network updates of one sandbox.
    sandbox_locks: sync::SandboxLocks,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Api {
    /// Opens (creating if missing) the database at `database_url`
    /// (`sqlite:<path>`, whose parent directory is created, or
    /// `postgres://...`), applies the
    /// migrations, creates `config.uploads_dir`, ends template builds a
    /// previous process left unfinished, reconciles the records with
    /// `node`'s sandboxes and starts following the node's events. Template
    /// builds run on `builder` (under `arca up`, the node itself).
    ///
    /// Reconciling removes records of sandboxes the node does not have and
    /// kills sandboxes the node has but the database does not know (they
    /// would otherwise run unbilled and unlisted until their deadline).
    /// Builds cannot be picked up again: they end as `error` with the
    /// reason "interrupted by a restart of the api; start the build again".
    pub async fn open(
        database_url: &str,
        config: ApiConfig,
        node: Arc<dyn NodeService>,
        builder: Arc<dyn BuildService>,
    ) -> Result<Api, ApiError> {
        let db = db::Db::open(database_url).await?;
        // Subscribe before reconciling so that no end is missed in between.
        let events = node.events();
        let api = Api::assemble(
            db,
            config,
            cluster::Nodes::Local {
                node: Arc::clone(&node),
                builder,
            },
        )?;
        templates::interrupt_unfinished(&api).await?;
        sync::reconcile_at_start(&api).await;
        sync::spawn_event_loop(
            Arc::downgrade(&api.inner),
            events,
            cluster::LOCAL_NODE.to_string(),
            node,
        );
        Ok(api)
    }

    /// Cluster mode (`arca api`, ADR 0006): the database (normally
    /// PostgreSQL, shared by every api replica) holds the registered nodes,
    /// which sandboxes run where, and everything [`Api::open`] keeps.
    /// Nodes register and heartbeat through the `/cluster/v1` routes with
    /// the cluster token; this replica follows each node's events and
    /// reconciles a node's records whenever its event stream connects.
    ///
    /// Template builds left unfinished are not interrupted here, since
    /// another replica may be running them.
    pub async fn open_cluster(
        database_url: &str,
        config: ApiConfig,
        cluster: ClusterConfig,
    ) -> Result<Api, ApiError> {
        let db = db::Db::open(database_url).await?;
        let registry = Arc::new(cluster::Registry::new(db.clone(), cluster));
        registry.refresh().await?;
        let api = Api::assemble(db, config, cluster::Nodes::Cluster(registry))?;
        cluster::spawn_maintenance(Arc::downgrade(&api.inner));
        Ok(api)
    }

    fn assemble(db: db::Db, config: ApiConfig, nodes: cluster::Nodes) -> Result<Api, ApiError> {
        std::fs::create_dir_all(&config.uploads_dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt as _;
                // Tenants' files: root only.
                std::fs::set_permissions(
                    &config.uploads_dir,
                    std::fs::Permissions::from_mode(0o700),
                )
            })
            .map_err(|source| ApiError::CreateDir {
                path: config.uploads_dir.clone(),
                source,
            })?;
        let build_slots = Arc::new(Semaphore::new(config.max_concurrent_builds.max(1)));
        Ok(Api {
            inner: Arc::new(Inner {
                db,
                config,
                nodes,
                build_slots,
                sandbox_locks: sync::SandboxLocks::default(),
            }),
        })
    }

    /// The HTTP routes, with every middleware, ready to serve.
    pub fn router(&self) -> Router {
        http::router(self.clone())
    }

    /// Serves HTTP/1.1 on `listener` until the listener fails.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    /// On the first start (no team yet), creates the team `default` and one
    /// API key for it and returns that key in plaintext: the only time it is
    /// ever visible. Later starts return `None`.
    pub async fn ensure_bootstrap(&self) -> Result<Option<String>, ApiError> {
        keys::ensure_bootstrap(&self.inner.db).await
    }

    /// Creates a team named `name` and returns its id. Names are unique.
    pub async fn create_team(&self, name: &str) -> Result<String, ApiError> {
        keys::create_team(&self.inner.db, name).await
    }

    /// Creates a new API key for `team` (a team id or name) and returns it in
    /// plaintext; only its hash is stored.
    pub async fn create_key(&self, team: &str) -> Result<String, ApiError> {
        keys::create_key(&self.inner.db, team).await
    }

    /// Every API key, revoked ones included, oldest first.
    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>, ApiError> {
        keys::list_keys(&self.inner.db).await
    }

    /// Revokes a key by its id (see [`KeyInfo::id`]); requests with it get
    /// 401 from now on. Revoking a revoked key is a no-op.
    pub async fn revoke_key(&self, id: &str) -> Result<(), ApiError> {
        keys::revoke_key(&self.inner.db, id).await
    }

    pub(crate) fn db(&self) -> &db::Db {
        &self.inner.db
    }

    pub(crate) fn config(&self) -> &ApiConfig {
        &self.inner.config
    }

    pub(crate) fn nodes(&self) -> &cluster::Nodes {
        &self.inner.nodes
    }

    /// The node of a sandbox record.
    pub(crate) fn node_of(
        &self,
        rec: &db::SandboxRecord,
    ) -> Result<Arc<dyn NodeService>, ApiError> {
        self.inner.nodes.node(&rec.node_id)
    }

    pub(crate) fn build_slots(&self) -> Arc<Semaphore> {
        Arc::clone(&self.inner.build_slots)
    }

    pub(crate) fn sandbox_locks(&self) -> &sync::SandboxLocks {
        &self.inner.sandbox_locks
    }
}

/// Teams and API keys on the database alone, for operator tools such as
/// `arca keys`. Unlike [`Api::open`] it needs no node and never reconciles
/// sandboxes, so it is safe to use beside a running `arca up`.
#[derive(Debug, Clone)]
pub struct KeyStore {
    db: db::Db,
}

impl KeyStore {
    /// Opens (creating if missing) the database at `database_url` and
    /// applies the migrations; see [`Api::open`] for the URL forms.
    pub async fn open(database_url: &str) -> Result<KeyStore, ApiError> {
        Ok(KeyStore {
            db: db::Db::open(database_url).await?,
        })
    }

    /// As [`Api::ensure_bootstrap`].
    pub async fn ensure_bootstrap(&self) -> Result<Option<String>, ApiError> {
        keys::ensure_bootstrap(&self.db).await
    }

    /// As [`Api::create_team`].
    pub async fn create_team(&self, name: &str) -> Result<String, ApiError> {
        keys::create_team(&self.db, name).await
    }

    /// As [`Api::create_key`].
    pub async fn create_key(&self, team: &str) -> Result<String, ApiError> {
        keys::create_key(&self.db, team).await
    }

    /// As [`Api::list_keys`].
    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>, ApiError> {
        keys::list_keys(&self.db).await
    }

    /// As [`Api::revoke_key`].
    pub async fn revoke_key(&self, id: &str) -> Result<(), ApiError> {
        keys::revoke_key(&self.db, id).await
    }
}

/// Opens the database for key management only: [`KeyStore::open`].
pub async fn keys_only(database_url: &str) -> Result<KeyStore, ApiError> {
    KeyStore::open(database_url).await
}
