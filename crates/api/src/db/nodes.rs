//! Cluster mode's tables (migration 0005): registered nodes, the builds
//! each holds, and which node each sandbox record is on.

use arca_proto::cluster::{CachedBuild, NodeCapacity, NodeLoad, NodeRegistration};
use chrono::{DateTime, Utc};
use sqlx::Row as _;

use super::{Db, RecordState, decode_error, from_micros, micros};
use crate::error::ApiError;

/// A node's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeRow {
    pub(crate) id: String,
    pub(crate) rpc_url: String,
    pub(crate) edge_addr: String,
    /// `ready` or `draining` as last set; lost-ness comes from `last_seen`.
    pub(crate) status: String,
    pub(crate) capacity: NodeCapacity,
    pub(crate) load: NodeLoad,
    pub(crate) last_seen: DateTime<Utc>,
    /// Isolation backends it runs (`ns`, `gvisor`, `vm`).
    pub(crate) runtimes: Vec<String>,
}

/// A sandbox record as reconciling a node needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeSandbox {
    pub(crate) id: String,
    pub(crate) state: RecordState,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) end_at: DateTime<Utc>,
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, ApiError> {
    serde_json::to_string(v).map_err(|e| ApiError::Internal(format!("encoding: {e}")))
}

impl Db {
    /// Inserts or refreshes a node's row and replaces its builds, in one
    /// transaction. A new node is `ready`; a known one keeps its status (a
    /// drained node restarted for maintenance stays drained).
    pub(crate) async fn register_node(
        &self,
        reg: &NodeRegistration,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        let mut tx = self.pool.begin().await?;
        // One statement, so two registrations of a new node at once cannot
        // both try to insert it.
        sqlx::query(
            "INSERT INTO nodes (id, rpc_url, edge_addr, status, capacity, load, runtimes, \
             version, registered_at, last_seen) \
             VALUES ($1, $2, $3, 'ready', $4, $5, $6, $7, $8, $8) \
             ON CONFLICT (id) DO UPDATE SET rpc_url = excluded.rpc_url, \
             edge_addr = excluded.edge_addr, capacity = excluded.capacity, \
             load = excluded.load, runtimes = excluded.runtimes, version = excluded.version, \
             last_seen = excluded.last_seen",
        )
        .bind(reg.node_id.as_str())
        .bind(reg.rpc_url.as_str())
        .bind(reg.edge_addr.as_str())
        .bind(json(&reg.capacity)?)
        .bind(json(&reg.load)?)
        .bind(json(&reg.runtimes)?)
        .bind(reg.version.as_str())
        .bind(micros(now))
        .execute(&mut *tx)
        .await?;
        replace_builds(&mut tx, &reg.node_id, &reg.builds).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a heartbeat; `false` when the node has no row (it must
    /// register again).
    pub(crate) async fn node_heartbeat(
        &self,
        node_id: &str,
        load: &NodeLoad,
        builds: Option<&[CachedBuild]>,
        now: DateTime<Utc>,
    ) -> Result<bool, ApiError> {
        let mut tx = self.pool.begin().await?;
        let r = sqlx::query("UPDATE nodes SET load = $2, last_seen = $3 WHERE id = $1")
            .bind(node_id)
            .bind(json(load)?)
            .bind(micros(now))
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        if let Some(builds) = builds {
            replace_builds(&mut tx, node_id, builds).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Sets a node's status (`ready` or `draining`); `false` if unknown.
    pub(crate) async fn set_node_status(
        &self,
        node_id: &str,
        status: &str,
    ) -> Result<bool, ApiError> {
        let r = sqlx::query("UPDATE nodes SET status = $2 WHERE id = $1")
            .bind(node_id)
            .bind(status)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Removes a node, the builds it held and the records of its
    /// sandboxes; the number of records removed.
    pub(crate) async fn forget_node(&self, node_id: &str) -> Result<u64, ApiError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM sandbox_metadata WHERE sandbox_id IN \
             (SELECT id FROM sandboxes WHERE node_id = $1)",
        )
        .bind(node_id)
        .execute(&mut *tx)
        .await?;
        let records = sqlx::query("DELETE FROM sandboxes WHERE node_id = $1")
            .bind(node_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM node_builds WHERE node_id = $1")
            .bind(node_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM nodes WHERE id = $1")
            .bind(node_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(records)
    }

    /// Every node, by id.
    pub(crate) async fn nodes(&self) -> Result<Vec<NodeRow>, ApiError> {
        let rows = sqlx::query(
            "SELECT id, rpc_url, edge_addr, status, capacity, load, last_seen, runtimes FROM nodes \
             ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: String = r.try_get(0)?;
            let capacity: String = r.try_get(4)?;
            let load: String = r.try_get(5)?;
            let runtimes: String = r.try_get(7)?;
            out.push(NodeRow {
                runtimes: serde_json::from_str(&runtimes)
                    .map_err(|e| decode_error(format!("node {id} runtimes: {e}")))?,
                capacity: serde_json::from_str(&capacity)
                    .map_err(|e| decode_error(format!("node {id} capacity: {e}")))?,
                load: serde_json::from_str(&load)
                    .map_err(|e| decode_error(format!("node {id} load: {e}")))?,
                rpc_url: r.try_get(1)?,
                edge_addr: r.try_get(2)?,
                status: r.try_get(3)?,
                last_seen: from_micros(r.try_get(6)?)?,
                id,
            });
        }
        Ok(out)
    }

    /// Nodes holding a build.
    pub(crate) async fn nodes_with_build(
        &self,
        template_id: &str,
        build_id: &str,
    ) -> Result<Vec<String>, ApiError> {
        let rows =
            sqlx::query("SELECT node_id FROM node_builds WHERE template_id = $1 AND build_id = $2")
                .bind(template_id)
                .bind(build_id)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?)
    }

    /// Notes that `node_id` holds a build (it made it, or pulled it).
    pub(crate) async fn add_node_build(
        &self,
        node_id: &str,
        template_id: &str,
        build_id: &str,
    ) -> Result<(), ApiError> {
        let r = sqlx::query(
            "INSERT INTO node_builds (node_id, template_id, build_id) VALUES ($1, $2, $3)",
        )
        .bind(node_id)
        .bind(template_id)
        .bind(build_id)
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if super::dialect::is_unique_violation(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Sandbox records placed on each node: `(node, count)`.
    pub(crate) async fn sandboxes_per_node(&self) -> Result<Vec<(String, i64)>, ApiError> {
        let rows = sqlx::query(
            "SELECT node_id, COUNT(*) FROM sandboxes GROUP BY node_id ORDER BY node_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push((r.try_get(0)?, r.try_get(1)?));
        }
        Ok(out)
    }

    /// Every record placed on `node_id`.
    pub(crate) async fn sandboxes_on(&self, node_id: &str) -> Result<Vec<NodeSandbox>, ApiError> {
        let rows =
            sqlx::query("SELECT id, state, started_at, end_at FROM sandboxes WHERE node_id = $1")
                .bind(node_id)
                .fetch_all(&self.pool)
                .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(NodeSandbox {
                id: r.try_get(0)?,
                state: RecordState::parse(&r.try_get::<String, _>(1)?)?,
                started_at: from_micros(r.try_get(2)?)?,
                end_at: from_micros(r.try_get(3)?)?,
            });
        }
        Ok(out)
    }

    /// Deletes the record of sandbox `id` if it is on `node_id`; `false`
    /// if there was none there.
    pub(crate) async fn delete_sandbox_on(
        &self,
        id: &str,
        node_id: &str,
    ) -> Result<bool, ApiError> {
        match self.node_of(id).await? {
            Some(n) if n == node_id => self.delete_sandbox(id).await,
            _ => Ok(false),
        }
    }

    /// The node of sandbox `id` (any team, any state), if the record exists.
    pub(crate) async fn node_of(&self, id: &str) -> Result<Option<String>, ApiError> {
        let row = sqlx::query("SELECT node_id FROM sandboxes WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Moves a `creating` record to another node before the create is
    /// tried there (the first choice was full).
    pub(crate) async fn set_node_of_creating(
        &self,
        id: &str,
        node_id: &str,
    ) -> Result<bool, ApiError> {
        let r =
            sqlx::query("UPDATE sandboxes SET node_id = $2 WHERE id = $1 AND state = 'creating'")
                .bind(id)
                .bind(node_id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Deletes the records of running sandboxes on `node_ids` whose
    /// deadline passed before `now` and that end (not pause) at it: their
    /// node ends them by itself, so they are gone even if the node cannot
    /// say so. Returns the ids.
    pub(crate) async fn delete_expired_on(
        &self,
        node_ids: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, ApiError> {
        let mut gone = Vec::new();
        for node in node_ids {
            let rows = sqlx::query(
                "SELECT id FROM sandboxes WHERE node_id = $1 AND state = 'running' \
                 AND auto_pause = 0 AND end_at < $2",
            )
            .bind(node.as_str())
            .bind(micros(now))
            .fetch_all(&self.pool)
            .await?;
            for r in rows {
                let id: String = r.try_get(0)?;
                if self.delete_sandbox(&id).await? {
                    gone.push(id);
                }
            }
        }
        Ok(gone)
    }
}

async fn replace_builds(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    node_id: &str,
    builds: &[CachedBuild],
) -> Result<(), ApiError> {
    sqlx::query("DELETE FROM node_builds WHERE node_id = $1")
        .bind(node_id)
        .execute(&mut **tx)
        .await?;
    let unique: std::collections::BTreeSet<&CachedBuild> = builds.iter().collect();
    for b in unique {
        sqlx::query("INSERT INTO node_builds (node_id, template_id, build_id) VALUES ($1, $2, $3)")
            .bind(node_id)
            .bind(b.template_id.as_str())
            .bind(b.build_id.as_str())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::dialect::testing::{TestDb, on_both_backends};
    use super::*;
    use arca_proto::cluster::NodeCapacity;

    fn reg(id: &str, builds: &[(&str, &str)]) -> NodeRegistration {
        NodeRegistration {
            node_id: id.into(),
            rpc_url: format!("http://{id}:3100"),
            edge_addr: "10.0.0.1:3101".into(),
            capacity: NodeCapacity {
                max_sandboxes: 10,
                cpu_count: 4,
                memory_mb: 8192,
            },
            runtimes: vec!["ns".into()],
            builds: builds
                .iter()
                .map(|(t, b)| CachedBuild {
                    template_id: (*t).into(),
                    build_id: (*b).into(),
                })
                .collect(),
            load: NodeLoad::default(),
            version: "test".into(),
        }
    }

    async fn nodes_register_heartbeat_and_hold_builds(test_db: TestDb) {
        let db = Db::open(&test_db.url).await.unwrap();
        let t0 = Utc::now();
        // Twice at once: one row.
        let (r1, r2) = (
            reg("n1", &[("base", "b0")]),
            reg("n1", &[("base", "b0"), ("base", "b0")]),
        );
        let (a, b) = tokio::join!(db.register_node(&r1, t0), db.register_node(&r2, t0));
        a.unwrap();
        b.unwrap();
        db.register_node(&reg("n2", &[]), t0).await.unwrap();
        let rows = db.nodes().await.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, "n1");
        assert_eq!(rows[0].capacity.max_sandboxes, 10);
        assert_eq!(rows[0].status, "ready");

        let load = NodeLoad {
            sandboxes: 3,
            running: 2,
            ..NodeLoad::default()
        };
        let t1 = t0 + chrono::TimeDelta::seconds(5);
        let builds = [CachedBuild {
            template_id: "t".into(),
            build_id: "b".into(),
        }];
        assert!(
            db.node_heartbeat("n2", &load, Some(&builds), t1)
                .await
                .unwrap()
        );
        assert!(!db.node_heartbeat("ghost", &load, None, t1).await.unwrap());
        let n2 = db.nodes().await.unwrap().remove(1);
        assert_eq!(n2.load, load);
        assert_eq!(micros(n2.last_seen), micros(t1));
        assert_eq!(db.nodes_with_build("base", "b0").await.unwrap(), ["n1"]);
        assert_eq!(db.nodes_with_build("t", "b").await.unwrap(), ["n2"]);
        assert!(db.nodes_with_build("t", "b0").await.unwrap().is_empty());
        // Recording a build twice is fine.
        db.add_node_build("n2", "t", "b").await.unwrap();
        assert!(db.set_node_status("n1", "draining").await.unwrap());
        assert!(!db.set_node_status("ghost", "draining").await.unwrap());
        // A restart (a new registration) keeps a drained node drained.
        db.register_node(&reg("n1", &[]), t1).await.unwrap();
        assert_eq!(db.nodes().await.unwrap()[0].status, "draining");
        assert!(db.set_node_status("n1", "ready").await.unwrap());
        assert_eq!(db.nodes().await.unwrap()[0].status, "ready");
    }
    on_both_backends!(nodes_register_heartbeat_and_hold_builds);
}
