//! Keeping the records in step with the nodes, which are the authority on
//! which sandboxes exist.
//!
//! - Under `arca up`, at start, records of sandboxes the node does not have
//!   (ended while the api was down) and records left `creating` by a crash
//!   are removed; sandboxes the node has but the database does not know are
//!   killed. In cluster mode the same happens per node whenever its event
//!   stream (re)connects, leaving other replicas' creates in flight alone.
//! - While running, each `SandboxEvent::Ended` removes its record. If the
//!   event channel lagged (events were dropped), the node's records are
//!   compared with its list again.
//!
//! [`SandboxLocks`] serializes api-side changes of one sandbox whose
//! records must end in the order the node applied them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use arca_proto::node::{NodeError, NodeService, SandboxEvent, SandboxId};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::cluster::{LOCAL_NODE, Nodes};
use crate::db::RecordState;
use crate::error::{ApiError, chain};
use crate::{Api, Inner};

/// Reconciles once at start under `arca up`; a node that cannot be asked
/// is logged, not fatal (the api still serves, and events still prune
/// records). Cluster mode reconciles each node when its event stream
/// connects instead ([`crate::cluster`]).
pub(crate) async fn reconcile_at_start(api: &Api) {
    let node = match api.nodes() {
        Nodes::Local { node, .. } => Arc::clone(node),
        Nodes::Cluster(_) => return,
    };
    if let Err(e) = reconcile_node(api, LOCAL_NODE, node.as_ref(), true).await {
        tracing::warn!(error = %chain(&e), "could not reconcile sandbox records with the node");
    }
}

/// Brings the records placed on `node_id` in line with what `node` runs.
///
/// `exclusive`: this api is the only one (`arca up` at start), so records
/// left `creating` belong to a create that died with the previous process.
/// Otherwise a `creating` record may be another replica's create in
/// flight and is only removed once it is [`crate::cluster::STALE_CREATING`]
/// old and the node does not have the sandbox.
///
/// The node is listed before the records are read, so a sandbox being
/// created is always known by its record; each removal and kill is checked
/// once more against the node or the database, since creates and ends go
/// on meanwhile.
pub(crate) async fn reconcile_node(
    api: &Api,
    node_id: &str,
    node: &dyn NodeService,
    exclusive: bool,
) -> Result<(), ApiError> {
    let live = node.list().await.map_err(ApiError::from_node)?;
    let live_ids: HashSet<&str> = live.iter().map(|s| s.sandbox_id.as_str()).collect();
    let records = api.db().sandboxes_on(node_id).await?;
    let known: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let now = chrono::Utc::now();
    for rec in &records {
        let id = &rec.id;
        let on_node = live_ids.contains(id.as_str());
        let creating = rec.state == RecordState::Creating;
        let stale = if exclusive {
            creating || !on_node
        } else if creating {
            !on_node
                && (now - rec.started_at).to_std().unwrap_or_default()
                    > crate::cluster::STALE_CREATING
        } else {
            !on_node
        };
        if !stale {
            // The node is the authority on paused vs running (it pauses
            // by itself at deadlines, events can be missed across restarts).
            // So is it on the deadline (a resume on traffic moves it).
            if let Some(s) = live.iter().find(|s| s.sandbox_id.as_str() == id) {
                let node_state = RecordState::from(s.state);
                let moved = s.end_at.timestamp_micros() != rec.end_at.timestamp_micros();
                if !creating && (node_state != rec.state || moved) {
                    api.db().set_state(&s.sandbox_id, node_state).await?;
                    api.db().set_end_at(&s.sandbox_id, s.end_at).await?;
                    tracing::info!(sandbox_id = %id, state = node_state.as_str(), end_at = %s.end_at, "record follows the node's state");
                }
            }
            continue;
        }
        let Ok(sid) = SandboxId::parse(id) else {
            continue;
        };
        if on_node {
            tracing::warn!(sandbox_id = %id, "killing a sandbox whose create never finished");
            if let Err(e) = node.kill(&sid).await {
                tracing::warn!(sandbox_id = %id, error = %e, "kill failed");
            }
        } else if !exclusive {
            // Made after the list was taken? Ask once more.
            match node.get(&sid).await {
                Err(NodeError::SandboxNotFound(_)) => {}
                Ok(_) => continue,
                Err(e) => return Err(ApiError::from_node(e)),
            }
        }
        api.db().delete_sandbox(id).await?;
        tracing::info!(sandbox_id = %id, %node_id, "removed the record of a sandbox the node no longer has");
    }
    for s in live
        .iter()
        .filter(|s| !known.contains(s.sandbox_id.as_str()))
    {
        // Its record may have been written after the records were read.
        // One naming another node is left alone too: killing is only for
        // sandboxes no record claims.
        if !exclusive && api.db().node_of(s.sandbox_id.as_str()).await?.is_some() {
            continue;
        }
        tracing::warn!(
            sandbox_id = %s.sandbox_id,
            team_id = %s.team_id,
            %node_id,
            "killing a sandbox the database does not know"
        );
        if let Err(e) = node.kill(&s.sandbox_id).await {
            tracing::warn!(sandbox_id = %s.sandbox_id, error = %e, "kill failed");
        }
    }
    Ok(())
}

/// Follows one node's events until the node closes the channel or every
/// [`Api`] clone is dropped.
pub(crate) fn spawn_event_loop(
    inner: Weak<Inner>,
    events: broadcast::Receiver<SandboxEvent>,
    node_id: String,
    node: Arc<dyn NodeService>,
) {
    spawn_event_loop_until(inner, events, node_id, node, std::future::pending());
}

/// [`spawn_event_loop`] that also ends when `stop` resolves (cluster mode
/// stops following a node at an RPC URL it left).
pub(crate) fn spawn_event_loop_until(
    inner: Weak<Inner>,
    mut events: broadcast::Receiver<SandboxEvent>,
    node_id: String,
    node: Arc<dyn NodeService>,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                () = &mut stop => break,
            };
            let Some(inner) = inner.upgrade() else { break };
            let api = Api { inner };
            match event {
                Ok(SandboxEvent::Paused { sandbox_id }) => {
                    if let Err(e) = api
                        .db()
                        .set_state(&sandbox_id, crate::db::RecordState::Paused)
                        .await
                    {
                        tracing::warn!(
                            sandbox_id = %sandbox_id,
                            error = %chain(&e),
                            "could not record a pause at the deadline"
                        );
                    }
                }
                Ok(SandboxEvent::Resumed { sandbox_id, end_at }) => {
                    let db = api.db();
                    let r = async {
                        db.set_end_at(&sandbox_id, end_at).await?;
                        db.set_state(&sandbox_id, crate::db::RecordState::Running)
                            .await
                    };
                    if let Err(e) = r.await {
                        tracing::warn!(
                            sandbox_id = %sandbox_id,
                            error = %chain(&e),
                            "could not record an automatic resume"
                        );
                    }
                }
                Ok(SandboxEvent::Ended { sandbox_id, reason }) => {
                    // Only this node's record: an id is never on two nodes,
                    // but a stream from a stale address must not end others.
                    match api
                        .db()
                        .delete_sandbox_on(sandbox_id.as_str(), &node_id)
                        .await
                    {
                        Ok(true) => {
                            tracing::info!(sandbox_id = %sandbox_id, %node_id, ?reason, "sandbox ended");
                        }
                        Ok(false) => {}
                        Err(e) => tracing::warn!(
                            sandbox_id = %sandbox_id,
                            error = %chain(&e),
                            "could not delete the record of an ended sandbox"
                        ),
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, %node_id, "missed node events; reconciling");
                    if let Err(e) = reconcile_node(&api, &node_id, node.as_ref(), false).await {
                        tracing::warn!(error = %chain(&e), "reconciling after missed events failed");
                    }
                }
                Err(RecvError::Closed) => break,
            }
        }
    });
}

/// One async lock per sandbox id, made on first use and dropped with its
/// last holder or waiter.
#[derive(Debug, Default)]
pub(crate) struct SandboxLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds a sandbox's lock until dropped.
#[derive(Debug)]
pub(crate) struct SandboxGuard<'a> {
    locks: &'a SandboxLocks,
    id: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl SandboxLocks {
    /// Waits for the lock of sandbox `id`.
    pub(crate) async fn lock(&self, id: &str) -> SandboxGuard<'_> {
        let lock = {
            let mut map = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(map.entry(id.to_string()).or_default())
        };
        let guard = lock.lock_owned().await;
        SandboxGuard {
            locks: self,
            id: id.to_string(),
            guard: Some(guard),
        }
    }

    /// Sandboxes with a lock entry (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for SandboxGuard<'_> {
    fn drop(&mut self) {
        let mut map = self
            .locks
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Released under the map's lock: nobody can clone the entry between
        // the release and the count below.
        self.guard.take();
        if map.get(&self.id).is_some_and(|l| Arc::strong_count(l) == 1) {
            map.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sandbox_locks_exclude_per_id_and_clean_up() {
        let locks = Arc::new(SandboxLocks::default());
        let a = locks.lock("a").await;
        // Another id is not held up.
        drop(locks.lock("b").await);
        let waiter = {
            let locks = Arc::clone(&locks);
            tokio::spawn(async move {
                let _g = locks.lock("a").await;
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(a);
        waiter.await.unwrap();
        assert_eq!(locks.len(), 0);
    }
}
