//! The api's database: teams, API keys, sandboxes, idempotency keys and
//! (in [`templates`]) the template registry.
//!
//! Queries are plain runtime SQL (no compile-time checked macros, so no
//! database is needed to build) in the portable subset described in
//! `migrations/0001_initial.sql`; the backend-specific parts are in
//! [`dialect`]. Times are stored as Unix microseconds (UTC), booleans as 0/1.

mod dialect;
pub(crate) mod nodes;
pub(crate) mod snapshots;
pub(crate) mod templates;

use std::borrow::Cow;
use std::collections::BTreeMap;

use arca_proto::node::SandboxId;
use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{AnyPool, Row as _};

use crate::error::ApiError;
use crate::keys::KeyInfo;
use crate::network::NetworkConfig;

/// The schema migrations, embedded so the binary needs no files at run time.
/// Append only: an applied migration must never change (sqlx checks sums).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../migrations/0001_initial.sql"),
    ),
    (
        2,
        "templates",
        include_str!("../../migrations/0002_templates.sql"),
    ),
    (
        3,
        "snapshots",
        include_str!("../../migrations/0003_snapshots.sql"),
    ),
    (
        4,
        "network",
        include_str!("../../migrations/0004_network.sql"),
    ),
    (
        5,
        "cluster",
        include_str!("../../migrations/0005_cluster.sql"),
    ),
];

#[derive(Debug)]
struct Embedded;

impl MigrationSource<'static> for Embedded {
    fn resolve(
        self,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Vec<Migration>, sqlx::error::BoxDynError>>
                + Send,
        >,
    > {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|&(version, desc, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(desc),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// Lifecycle state of a sandbox record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordState {
    /// Inserted, `NodeService::create` in flight; invisible to the API.
    Creating,
    /// Running on its node.
    Running,
    /// Paused (issue 5).
    Paused,
}

impl From<arca_proto::node::SandboxState> for RecordState {
    fn from(s: arca_proto::node::SandboxState) -> RecordState {
        match s {
            arca_proto::node::SandboxState::Paused => RecordState::Paused,
            arca_proto::node::SandboxState::Running => RecordState::Running,
        }
    }
}

impl RecordState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RecordState::Creating => "creating",
            RecordState::Running => "running",
            RecordState::Paused => "paused",
        }
    }

    fn parse(s: &str) -> Result<RecordState, sqlx::Error> {
        match s {
            "creating" => Ok(RecordState::Creating),
            "running" => Ok(RecordState::Running),
            "paused" => Ok(RecordState::Paused),
            other => Err(decode_error(format!("unknown sandbox state '{other}'"))),
        }
    }
}

/// One sandbox as the api remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SandboxRecord {
    pub(crate) id: SandboxId,
    pub(crate) team_id: String,
    pub(crate) template_id: String,
    /// Alias of the template it was made from, if it has one.
    pub(crate) alias: Option<String>,
    pub(crate) state: RecordState,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) envd_access_token: String,
    pub(crate) envd_version: String,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) end_at: DateTime<Utc>,
    pub(crate) cpu_count: u32,
    pub(crate) memory_mb: u32,
    pub(crate) disk_size_mb: u32,
    /// The create flag as given (`None` = not given).
    pub(crate) allow_internet_access: Option<bool>,
    pub(crate) auto_pause: bool,
    pub(crate) auto_pause_memory: bool,
    pub(crate) auto_resume: bool,
    /// The template build it started from (`None`: started before the api
    /// recorded it).
    pub(crate) build_id: Option<String>,
    /// Network settings as given (`None`: none, no restriction).
    pub(crate) network: Option<NetworkConfig>,
    /// Token user ports require (`allowPublicTraffic: false`).
    pub(crate) traffic_access_token: Option<String>,
    /// The node it runs on ([`crate::cluster::LOCAL_NODE`] under `arca up`).
    pub(crate) node_id: String,
}

/// Sort direction of a listing, by `startedAt` then id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    Asc,
    Desc,
}

/// Where a page of a listing starts: just after this `(started_at, id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub(crate) started_at_micros: i64,
    pub(crate) id: String,
}

/// What `GET /v2/sandboxes` asks for.
#[derive(Debug, Clone)]
pub(crate) struct ListFilter {
    pub(crate) team_id: String,
    /// Non-empty; never contains `Creating`.
    pub(crate) states: Vec<RecordState>,
    /// Every pair must match.
    pub(crate) metadata: Vec<(String, String)>,
    /// Template id or alias.
    pub(crate) template: Option<String>,
    /// Inclusive lower bound of `started_at`.
    pub(crate) started_after: Option<DateTime<Utc>>,
    pub(crate) order: Order,
    pub(crate) cursor: Option<Cursor>,
    /// `None` = everything.
    pub(crate) limit: Option<u32>,
}

/// Outcome of claiming an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The key is new; this request owns it.
    Claimed,
    /// An earlier request holds it.
    Existing {
        request_hash: String,
        /// `None` while that request is still creating.
        sandbox_id: Option<String>,
    },
}

/// A bound value of a dynamically built query.
enum Arg {
    Text(String),
    Int(i64),
}

const SANDBOX_COLUMNS: &str = "s.id, s.team_id, s.template_id, s.alias, s.state, s.metadata, \
     s.envd_access_token, s.envd_version, s.started_at, s.end_at, s.cpu_count, s.memory_mb, \
     s.disk_size_mb, s.allow_internet_access, s.auto_pause, s.auto_pause_memory, s.auto_resume, \
     s.build_id, s.network, s.traffic_access_token, s.node_id";

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Db {
    pool: AnyPool,
}

impl Db {
    /// Connects and brings the schema up to date.
    pub(crate) async fn open(url: &str) -> Result<Db, ApiError> {
        let (pool, _backend) = dialect::connect(url).await?;
        Migrator::new(Embedded).await?.run(&pool).await?;
        Ok(Db { pool })
    }

    // ---- teams and keys -------------------------------------------------

    /// Creates the first team and its key unless a team exists; returns
    /// whether it did.
    pub(crate) async fn bootstrap(
        &self,
        team: (&str, &str),
        key: (&str, &str, &str),
        now: DateTime<Utc>,
    ) -> Result<bool, ApiError> {
        let mut tx = self.pool.begin().await?;
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM teams")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        if n > 0 {
            return Ok(false);
        }
        let inserted = sqlx::query("INSERT INTO teams (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(team.0)
            .bind(team.1)
            .bind(micros(now))
            .execute(&mut *tx)
            .await;
        match inserted {
            // Another api process bootstrapped at the same moment.
            Err(e) if dialect::is_unique_violation(&e) => return Ok(false),
            r => r?,
        };
        insert_key(&mut tx, key, team.0, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Inserts a team; `false` if the name is taken.
    pub(crate) async fn insert_team(
        &self,
        id: &str,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, ApiError> {
        let r = sqlx::query("INSERT INTO teams (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(name)
            .bind(micros(now))
            .execute(&self.pool)
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if dialect::is_unique_violation(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Id of the team whose id or name is `team`.
    pub(crate) async fn find_team(&self, team: &str) -> Result<Option<String>, ApiError> {
        let row = sqlx::query("SELECT id FROM teams WHERE id = $1 OR name = $1")
            .bind(team)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Stores a key (`(id, sha256 hex, mask)`) for `team_id`.
    pub(crate) async fn insert_key(
        &self,
        key: (&str, &str, &str),
        team_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        let mut conn = self.pool.acquire().await?;
        insert_key(&mut conn, key, team_id, now).await
    }

    /// Team of an unrevoked key with this hash.
    pub(crate) async fn team_for_key(&self, key_hash: &str) -> Result<Option<String>, ApiError> {
        let row =
            sqlx::query("SELECT team_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL")
                .bind(key_hash)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Every key, oldest first.
    pub(crate) async fn list_keys(&self) -> Result<Vec<KeyInfo>, ApiError> {
        let rows = sqlx::query(
            "SELECT k.id, k.team_id, t.name, k.key_mask, k.created_at, k.revoked_at \
             FROM api_keys k JOIN teams t ON t.id = k.team_id ORDER BY k.created_at, k.id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut keys = Vec::with_capacity(rows.len());
        for r in rows {
            keys.push(KeyInfo {
                id: r.try_get(0)?,
                team_id: r.try_get(1)?,
                team: r.try_get(2)?,
                mask: r.try_get(3)?,
                created_at: from_micros(r.try_get(4)?)?,
                revoked: r.try_get::<Option<i64>, _>(5)?.is_some(),
            });
        }
        Ok(keys)
    }

    /// Marks a key revoked; `false` when there is no such key.
    pub(crate) async fn revoke_key(&self, id: &str, now: DateTime<Utc>) -> Result<bool, ApiError> {
        let exists = sqlx::query("SELECT 1 FROM api_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .is_some();
        if exists {
            sqlx::query("UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .bind(micros(now))
                .execute(&self.pool)
                .await?;
        }
        Ok(exists)
    }

    // ---- sandboxes ------------------------------------------------------

    /// Inserts a new record and its metadata pairs.
    pub(crate) async fn insert_sandbox(&self, s: &SandboxRecord) -> Result<(), ApiError> {
        let metadata = serde_json::to_string(&s.metadata)
            .map_err(|e| ApiError::Internal(format!("encoding metadata: {e}")))?;
        let network = s.network.as_ref().map(encode_network).transpose()?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO sandboxes (id, team_id, template_id, alias, state, metadata, \
             envd_access_token, envd_version, started_at, end_at, cpu_count, memory_mb, \
             disk_size_mb, allow_internet_access, auto_pause, auto_pause_memory, auto_resume, \
             build_id, network, traffic_access_token, node_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
             $18, $19, $20, $21)",
        )
        .bind(s.id.as_str())
        .bind(s.team_id.as_str())
        .bind(s.template_id.as_str())
        .bind(s.alias.as_deref())
        .bind(s.state.as_str())
        .bind(metadata)
        .bind(s.envd_access_token.as_str())
        .bind(s.envd_version.as_str())
        .bind(micros(s.started_at))
        .bind(micros(s.end_at))
        .bind(i64::from(s.cpu_count))
        .bind(i64::from(s.memory_mb))
        .bind(i64::from(s.disk_size_mb))
        .bind(s.allow_internet_access.map(i64::from))
        .bind(i64::from(s.auto_pause))
        .bind(i64::from(s.auto_pause_memory))
        .bind(i64::from(s.auto_resume))
        .bind(s.build_id.as_deref())
        .bind(network)
        .bind(s.traffic_access_token.as_deref())
        .bind(s.node_id.as_str())
        .execute(&mut *tx)
        .await?;
        for (k, v) in &s.metadata {
            sqlx::query(
                "INSERT INTO sandbox_metadata (sandbox_id, meta_key, meta_value) VALUES ($1, $2, $3)",
            )
            .bind(s.id.as_str())
            .bind(k.as_str())
            .bind(v.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Marks a `creating` record running with what the node reported;
    /// `false` if the record is gone (the sandbox already ended).
    /// `metadata` replaces the record's (the node adds what it decided,
    /// such as the isolation backend).
    pub(crate) async fn mark_running(
        &self,
        id: &SandboxId,
        envd_version: &str,
        end_at: DateTime<Utc>,
        resources: (u32, u32, u32),
        metadata: &BTreeMap<String, String>,
    ) -> Result<bool, ApiError> {
        let encoded = serde_json::to_string(metadata)
            .map_err(|e| ApiError::Internal(format!("encoding metadata: {e}")))?;
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query(
            "UPDATE sandboxes SET state = 'running', envd_version = $2, end_at = $3, \
             cpu_count = $4, memory_mb = $5, disk_size_mb = $6, metadata = $7 WHERE id = $1",
        )
        .bind(id.as_str())
        .bind(envd_version)
        .bind(micros(end_at))
        .bind(i64::from(resources.0))
        .bind(i64::from(resources.1))
        .bind(i64::from(resources.2))
        .bind(encoded)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        for (k, v) in metadata {
            sqlx::query(
                "INSERT INTO sandbox_metadata (sandbox_id, meta_key, meta_value) VALUES ($1, $2, $3) \
                 ON CONFLICT (sandbox_id, meta_key) DO UPDATE SET meta_value = excluded.meta_value",
            )
            .bind(id.as_str())
            .bind(k.as_str())
            .bind(v.as_str())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Sets a record's state (running or paused); `false` if it is gone.
    pub(crate) async fn set_state(
        &self,
        id: &SandboxId,
        state: RecordState,
    ) -> Result<bool, ApiError> {
        // A record still `creating` is left to the create (it writes the
        // state the node reports when it finishes).
        let r =
            sqlx::query("UPDATE sandboxes SET state = $2 WHERE id = $1 AND state <> 'creating'")
                .bind(id.as_str())
                .bind(state.as_str())
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Moves a record's deadline; `false` if it is gone.
    pub(crate) async fn set_end_at(
        &self,
        id: &SandboxId,
        end_at: DateTime<Utc>,
    ) -> Result<bool, ApiError> {
        let r = sqlx::query("UPDATE sandboxes SET end_at = $2 WHERE id = $1")
            .bind(id.as_str())
            .bind(micros(end_at))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Replaces a record's network settings and `allow_internet_access`
    /// flag; `false` if it is gone.
    pub(crate) async fn set_network(
        &self,
        id: &SandboxId,
        network: &NetworkConfig,
        allow_internet_access: Option<bool>,
    ) -> Result<bool, ApiError> {
        let r = sqlx::query(
            "UPDATE sandboxes SET network = $2, allow_internet_access = $3 WHERE id = $1",
        )
        .bind(id.as_str())
        .bind(encode_network(network)?)
        .bind(allow_internet_access.map(i64::from))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Deletes a record and its metadata; `false` if there was none.
    pub(crate) async fn delete_sandbox(&self, id: &str) -> Result<bool, ApiError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM sandbox_metadata WHERE sandbox_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let r = sqlx::query("DELETE FROM sandboxes WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    /// A visible (not `creating`) sandbox of `team_id`.
    pub(crate) async fn get_sandbox(
        &self,
        team_id: &str,
        id: &SandboxId,
    ) -> Result<Option<SandboxRecord>, ApiError> {
        let sql = format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes s \
             WHERE s.id = $1 AND s.team_id = $2 AND s.state <> 'creating'"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(team_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(sandbox_from_row).transpose()?)
    }

    /// One page of a team's sandboxes and whether more follow.
    pub(crate) async fn list_sandboxes(
        &self,
        f: &ListFilter,
    ) -> Result<(Vec<SandboxRecord>, bool), ApiError> {
        let mut args = vec![Arg::Text(f.team_id.clone())];
        let mut sql = format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes s WHERE s.team_id = $1");
        let mut push = |arg: Arg| -> usize {
            args.push(arg);
            args.len()
        };
        let states: Vec<String> = f
            .states
            .iter()
            .map(|s| format!("${}", push(Arg::Text(s.as_str().into()))))
            .collect();
        sql.push_str(&format!(" AND s.state IN ({})", states.join(", ")));
        for (k, v) in &f.metadata {
            let k = push(Arg::Text(k.clone()));
            let v = push(Arg::Text(v.clone()));
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM sandbox_metadata m WHERE m.sandbox_id = s.id \
                 AND m.meta_key = ${k} AND m.meta_value = ${v})"
            ));
        }
        if let Some(t) = &f.template {
            let n = push(Arg::Text(t.clone()));
            sql.push_str(&format!(" AND (s.template_id = ${n} OR s.alias = ${n})"));
        }
        if let Some(after) = f.started_after {
            let n = push(Arg::Int(micros(after)));
            sql.push_str(&format!(" AND s.started_at >= ${n}"));
        }
        let (cmp, dir) = match f.order {
            Order::Asc => (">", "ASC"),
            Order::Desc => ("<", "DESC"),
        };
        if let Some(c) = &f.cursor {
            let t = push(Arg::Int(c.started_at_micros));
            let i = push(Arg::Text(c.id.clone()));
            sql.push_str(&format!(
                " AND (s.started_at {cmp} ${t} OR (s.started_at = ${t} AND s.id {cmp} ${i}))"
            ));
        }
        sql.push_str(&format!(" ORDER BY s.started_at {dir}, s.id {dir}"));
        if let Some(limit) = f.limit {
            // One more than asked tells whether another page exists.
            let n = push(Arg::Int(i64::from(limit) + 1));
            sql.push_str(&format!(" LIMIT ${n}"));
        }
        let mut q = sqlx::query(&sql);
        for a in args {
            q = match a {
                Arg::Text(s) => q.bind(s),
                Arg::Int(i) => q.bind(i),
            };
        }
        let rows = q.fetch_all(&self.pool).await?;
        let mut out = rows
            .iter()
            .map(sandbox_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let more = f
            .limit
            .is_some_and(|l| out.len() > usize::try_from(l).unwrap_or(usize::MAX));
        if more {
            out.pop();
        }
        Ok((out, more))
    }

    // ---- idempotency keys -----------------------------------------------

    /// Claims `key` for a create with body hash `request_hash`.
    pub(crate) async fn claim_idempotency(
        &self,
        team_id: &str,
        key: &str,
        request_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Claim, ApiError> {
        // Two tries: the holder may release the key between our insert and
        // our read.
        for _ in 0..2 {
            let r = sqlx::query(
                "INSERT INTO idempotency_keys (team_id, idem_key, request_hash, sandbox_id, created_at) \
                 VALUES ($1, $2, $3, NULL, $4)",
            )
            .bind(team_id)
            .bind(key)
            .bind(request_hash)
            .bind(micros(now))
            .execute(&self.pool)
            .await;
            match r {
                Ok(_) => return Ok(Claim::Claimed),
                Err(e) if dialect::is_unique_violation(&e) => {}
                Err(e) => return Err(e.into()),
            }
            let row = sqlx::query(
                "SELECT request_hash, sandbox_id FROM idempotency_keys \
                 WHERE team_id = $1 AND idem_key = $2",
            )
            .bind(team_id)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
            if let Some(r) = row {
                return Ok(Claim::Existing {
                    request_hash: r.try_get(0)?,
                    sandbox_id: r.try_get(1)?,
                });
            }
        }
        Err(ApiError::Conflict {
            message: "a request with this Idempotency-Key is in progress".into(),
            error_code: Some("idempotency_in_progress"),
        })
    }

    /// Records the sandbox a claimed key produced.
    pub(crate) async fn finish_idempotency(
        &self,
        team_id: &str,
        key: &str,
        sandbox_id: &SandboxId,
    ) -> Result<(), ApiError> {
        sqlx::query(
            "UPDATE idempotency_keys SET sandbox_id = $3 WHERE team_id = $1 AND idem_key = $2",
        )
        .bind(team_id)
        .bind(key)
        .bind(sandbox_id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets a key (its create failed, or its sandbox is gone).
    pub(crate) async fn release_idempotency(
        &self,
        team_id: &str,
        key: &str,
    ) -> Result<(), ApiError> {
        sqlx::query("DELETE FROM idempotency_keys WHERE team_id = $1 AND idem_key = $2")
            .bind(team_id)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets keys claimed before `before`.
    pub(crate) async fn expire_idempotency(&self, before: DateTime<Utc>) -> Result<(), ApiError> {
        sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(micros(before))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

async fn insert_key(
    conn: &mut sqlx::AnyConnection,
    (id, hash, mask): (&str, &str, &str),
    team_id: &str,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO api_keys (id, team_id, key_hash, key_mask, created_at, revoked_at) \
         VALUES ($1, $2, $3, $4, $5, NULL)",
    )
    .bind(id)
    .bind(team_id)
    .bind(hash)
    .bind(mask)
    .bind(micros(now))
    .execute(conn)
    .await?;
    Ok(())
}

fn sandbox_from_row(r: &AnyRow) -> Result<SandboxRecord, sqlx::Error> {
    let id: String = r.try_get(0)?;
    let metadata: String = r.try_get(5)?;
    Ok(SandboxRecord {
        id: SandboxId::parse(&id).map_err(|e| decode_error(e.to_string()))?,
        team_id: r.try_get(1)?,
        template_id: r.try_get(2)?,
        alias: r.try_get(3)?,
        state: RecordState::parse(&r.try_get::<String, _>(4)?)?,
        metadata: serde_json::from_str(&metadata)
            .map_err(|e| decode_error(format!("sandbox {id} metadata: {e}")))?,
        envd_access_token: r.try_get(6)?,
        envd_version: r.try_get(7)?,
        started_at: from_micros(r.try_get(8)?)?,
        end_at: from_micros(r.try_get(9)?)?,
        cpu_count: to_u32(r.try_get(10)?)?,
        memory_mb: to_u32(r.try_get(11)?)?,
        disk_size_mb: to_u32(r.try_get(12)?)?,
        allow_internet_access: r.try_get::<Option<i64>, _>(13)?.map(|v| v != 0),
        auto_pause: r.try_get::<i64, _>(14)? != 0,
        auto_pause_memory: r.try_get::<i64, _>(15)? != 0,
        auto_resume: r.try_get::<i64, _>(16)? != 0,
        build_id: r.try_get(17)?,
        network: r
            .try_get::<Option<String>, _>(18)?
            .map(|n| {
                serde_json::from_str(&n)
                    .map_err(|e| decode_error(format!("sandbox {id} network: {e}")))
            })
            .transpose()?,
        traffic_access_token: r.try_get(19)?,
        node_id: r.try_get(20)?,
    })
}

fn encode_network(n: &NetworkConfig) -> Result<String, ApiError> {
    serde_json::to_string(n).map_err(|e| ApiError::Internal(format!("encoding network: {e}")))
}

fn decode_error(msg: String) -> sqlx::Error {
    sqlx::Error::Decode(msg.into())
}

fn to_u32(v: i64) -> Result<u32, sqlx::Error> {
    u32::try_from(v).map_err(|_| decode_error(format!("{v} is out of range for a u32 column")))
}

/// `t` as stored: Unix microseconds.
pub(crate) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// A stored time back.
pub(crate) fn from_micros(v: i64) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::from_timestamp_micros(v).ok_or_else(|| decode_error(format!("bad timestamp {v}")))
}

#[cfg(test)]
mod tests {
    use super::dialect::testing::{TestDb, on_both_backends};
    use super::*;

    fn record(id: &str, team: &str, started: i64, meta: &[(&str, &str)]) -> SandboxRecord {
        let t = from_micros(started).unwrap();
        SandboxRecord {
            id: SandboxId::parse(id).unwrap(),
            team_id: team.into(),
            template_id: "base".into(),
            alias: Some("base".into()),
            state: RecordState::Running,
            metadata: meta
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            envd_access_token: "tok".into(),
            envd_version: "0.6.13".into(),
            started_at: t,
            end_at: t,
            cpu_count: 2,
            memory_mb: 512,
            disk_size_mb: 1024,
            allow_internet_access: None,
            auto_pause: false,
            auto_pause_memory: true,
            auto_resume: false,
            build_id: Some("b1".into()),
            network: None,
            traffic_access_token: None,
            node_id: "local".into(),
        }
    }

    async fn migrations_seed_base_and_records_round_trip(test_db: TestDb) {
        let db = Db::open(&test_db.url).await.unwrap();
        // A second open finds the schema current.
        let db2 = Db::open(&test_db.url).await.unwrap();
        assert!(db2.template_by_name("base").await.unwrap().is_some());
        assert!(db.template_by_name("nope").await.unwrap().is_none());

        assert!(
            db.bootstrap(("t", "default"), ("k", "h", "m"), Utc::now())
                .await
                .unwrap()
        );
        assert!(
            !db.bootstrap(("t2", "other"), ("k2", "h2", "m"), Utc::now())
                .await
                .unwrap()
        );
        let rec = record("iaaa", "t", 1_000_000, &[("a", "1"), ("b", "x y")]);
        db.insert_sandbox(&rec).await.unwrap();
        let got = db.get_sandbox("t", &rec.id).await.unwrap().unwrap();
        assert_eq!(got, rec);
        assert!(db.get_sandbox("other", &rec.id).await.unwrap().is_none());

        let mut filter = ListFilter {
            team_id: "t".into(),
            states: vec![RecordState::Running],
            metadata: vec![("b".into(), "x y".into())],
            template: Some("base".into()),
            started_after: None,
            order: Order::Desc,
            cursor: None,
            limit: Some(10),
        };
        let (page, more) = db.list_sandboxes(&filter).await.unwrap();
        assert_eq!(page.len(), 1);
        assert!(!more);
        filter.metadata.push(("a".into(), "2".into()));
        assert!(db.list_sandboxes(&filter).await.unwrap().0.is_empty());

        assert!(db.delete_sandbox("iaaa").await.unwrap());
        assert!(!db.delete_sandbox("iaaa").await.unwrap());
    }
    on_both_backends!(migrations_seed_base_and_records_round_trip);

    async fn records_know_their_node(test_db: TestDb) {
        let db = Db::open(&test_db.url).await.unwrap();
        db.bootstrap(("t", "default"), ("k", "h", "m"), Utc::now())
            .await
            .unwrap();
        let now = Utc::now();
        let mut a = record("ia", "t", micros(now) - 10_000_000, &[]);
        a.node_id = "n1".into();
        let mut b = record("ib", "t", micros(now), &[]);
        b.node_id = "n1".into();
        b.state = RecordState::Creating;
        // Expired too, but it pauses at its deadline: not gone.
        let mut d = record("id", "t", micros(now) - 10_000_000, &[]);
        d.node_id = "n1".into();
        d.auto_pause = true;
        db.insert_sandbox(&d).await.unwrap();
        let mut c = record("ic", "t", micros(now), &[]);
        c.node_id = "n2".into();
        c.end_at = now + chrono::TimeDelta::seconds(60);
        for r in [&a, &b, &c] {
            db.insert_sandbox(r).await.unwrap();
        }
        assert_eq!(
            db.get_sandbox("t", &a.id).await.unwrap().unwrap().node_id,
            "n1"
        );
        let mut on1: Vec<String> = db
            .sandboxes_on("n1")
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        on1.sort();
        assert_eq!(on1, ["ia", "ib", "id"]);
        assert_eq!(db.node_of("ic").await.unwrap().as_deref(), Some("n2"));
        assert_eq!(db.node_of("zz").await.unwrap(), None);
        let mut per: Vec<(String, i64)> = db.sandboxes_per_node().await.unwrap();
        per.sort();
        assert_eq!(per, [("n1".into(), 3), ("n2".into(), 1)]);
        // Only a record still being created moves to another node.
        assert!(db.set_node_of_creating("ib", "n2").await.unwrap());
        assert!(!db.set_node_of_creating("ia", "n2").await.unwrap());
        // Expired running records on the given nodes go; the rest stay.
        let gone = db
            .delete_expired_on(&["n1".into(), "n2".into()], now)
            .await
            .unwrap();
        assert_eq!(gone, ["ia"]);
        assert!(db.node_of("ib").await.unwrap().is_some());
        assert!(db.node_of("ic").await.unwrap().is_some());
        assert!(db.node_of("id").await.unwrap().is_some());
    }
    on_both_backends!(records_know_their_node);

    async fn network_settings_round_trip_and_are_replaced(test_db: TestDb) {
        let db = Db::open(&test_db.url).await.unwrap();
        db.bootstrap(("t", "default"), ("k", "h", "m"), Utc::now())
            .await
            .unwrap();
        let mut rec = record("inet", "t", 1_000_000, &[]);
        rec.allow_internet_access = Some(false);
        rec.network = Some(NetworkConfig {
            egress: arca_proto::network::NetworkSpec {
                allow_out: vec!["a.test".into()],
                deny_out: vec!["0.0.0.0/0".into()],
                dns_servers: vec![],
            },
            allow_public_traffic: Some(false),
            mask_request_host: Some("${PORT}-m.test".into()),
        });
        rec.traffic_access_token = Some("tok".into());
        db.insert_sandbox(&rec).await.unwrap();
        assert_eq!(db.get_sandbox("t", &rec.id).await.unwrap().unwrap(), rec);

        let mut replaced = rec.network.clone().unwrap();
        replaced.egress = arca_proto::network::NetworkSpec::default();
        assert!(db.set_network(&rec.id, &replaced, None).await.unwrap());
        let got = db.get_sandbox("t", &rec.id).await.unwrap().unwrap();
        assert_eq!(got.network, Some(replaced));
        assert_eq!(got.allow_internet_access, None);
        assert_eq!(got.traffic_access_token.as_deref(), Some("tok"));
        let gone = SandboxId::parse("igone").unwrap();
        assert!(
            !db.set_network(&gone, &NetworkConfig::default(), None)
                .await
                .unwrap()
        );
        // Records from before migration 4 read as having no settings.
        let plain = record("iold", "t", 2_000_000, &[]);
        db.insert_sandbox(&plain).await.unwrap();
        let got = db.get_sandbox("t", &plain.id).await.unwrap().unwrap();
        assert_eq!((got.network, got.traffic_access_token), (None, None));
    }
    on_both_backends!(network_settings_round_trip_and_are_replaced);
}
