//! Keeping the records in step with the node, which is the authority on
//! which sandboxes exist.
//!
//! - At start, records of sandboxes the node does not have (ended while the
//!   api was down) and records left `creating` by a crash are removed;
//!   sandboxes the node has but the database does not know are killed.
//! - While running, each `SandboxEvent::Ended` removes its record. If the
//!   event channel lagged (events were dropped), the records are compared
//!   with the node's list again; nothing is killed then, since a create may
//!   be in flight.
//!
//! [`SandboxLocks`] serializes api-side changes of one sandbox whose
//! records must end in the order the node applied them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use arca_proto::node::{SandboxEvent, SandboxId};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::db::RecordState;
use crate::error::{ApiError, chain};
use crate::{Api, Inner};

/// Reconciles once at start; a node that cannot be asked is logged, not
/// fatal (the api still serves, and events still prune records).
pub(crate) async fn reconcile_at_start(api: &Api) {
    if let Err(e) = reconcile(api, true).await {
        tracing::warn!(error = %chain(&e), "could not reconcile sandbox records with the node");
    }
}

async fn reconcile(api: &Api, at_start: bool) -> Result<(), ApiError> {
    let live = api.node().list().await.map_err(ApiError::from_node)?;
    let live_ids: HashSet<&str> = live.iter().map(|s| s.sandbox_id.as_str()).collect();
    let records = api.db().sandbox_states().await?;
    let known: HashSet<&str> = records.iter().map(|(id, _)| id.as_str()).collect();
    for (id, state) in &records {
        let on_node = live_ids.contains(id.as_str());
        let creating = *state == RecordState::Creating;
        let stale = if at_start {
            // A record left `creating` belongs to a create that died with
            // the previous process.
            creating || !on_node
        } else {
            !creating && !on_node
        };
        if !stale {
            // The node is the authority on paused vs running (it pauses
            // by itself at deadlines, events can be missed across restarts).
            if let Some(s) = live.iter().find(|s| s.sandbox_id.as_str() == id) {
                let node_state = RecordState::from(s.state);
                if !creating && node_state != *state {
                    api.db().set_state(&s.sandbox_id, node_state).await?;
                    api.db().set_end_at(&s.sandbox_id, s.end_at).await?;
                    tracing::info!(sandbox_id = %id, state = node_state.as_str(), "record follows the node's state");
                }
            }
            continue;
        }
        if on_node {
            if let Ok(sid) = SandboxId::parse(id) {
                tracing::warn!(sandbox_id = %id, "killing a sandbox whose create never finished");
                if let Err(e) = api.node().kill(&sid).await {
                    tracing::warn!(sandbox_id = %id, error = %e, "kill failed");
                }
            }
        }
        api.db().delete_sandbox(id).await?;
        tracing::info!(sandbox_id = %id, "removed the record of a sandbox the node no longer has");
    }
    if at_start {
        for s in live
            .iter()
            .filter(|s| !known.contains(s.sandbox_id.as_str()))
        {
            tracing::warn!(
                sandbox_id = %s.sandbox_id,
                team_id = %s.team_id,
                "killing a sandbox the database does not know"
            );
            if let Err(e) = api.node().kill(&s.sandbox_id).await {
                tracing::warn!(sandbox_id = %s.sandbox_id, error = %e, "kill failed");
            }
        }
    }
    Ok(())
}

/// Follows the node's events until the node closes the channel or every
/// [`Api`] clone is dropped.
pub(crate) fn spawn_event_loop(inner: Weak<Inner>, mut events: broadcast::Receiver<SandboxEvent>) {
    tokio::spawn(async move {
        loop {
            let event = events.recv().await;
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
                    match api.db().delete_sandbox(sandbox_id.as_str()).await {
                        Ok(true) => {
                            tracing::info!(sandbox_id = %sandbox_id, ?reason, "sandbox ended");
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
                    tracing::warn!(missed = n, "missed node events; reconciling");
                    if let Err(e) = reconcile(&api, false).await {
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
