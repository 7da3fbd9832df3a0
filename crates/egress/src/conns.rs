//! Counting and tracking what sandboxes have open: [`Quota`] bounds DNS
//! work per sandbox and per node, [`ConnTracker`] bounds proxied TLS/HTTP
//! connections and keeps a handle on each, so a policy change can close
//! those it no longer allows and a sandbox's end closes all of them.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use arca_proto::network::EgressPolicy;
use arca_proto::node::SandboxId;
use tokio_util::sync::CancellationToken;

use crate::check::{Basis, judge};

/// Counts of one kind of work, per sandbox and in total.
#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_sandbox: HashMap<SandboxId, usize>,
}

/// A per-sandbox and a node-wide limit on one kind of work.
#[derive(Debug, Clone)]
pub(crate) struct Quota {
    per_sandbox: usize,
    total: usize,
    counts: Arc<Mutex<Counts>>,
}

/// One unit of a [`Quota`], given back on drop.
#[derive(Debug)]
pub(crate) struct QuotaGuard {
    counts: Arc<Mutex<Counts>>,
    sandbox: SandboxId,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data stays consistent across a panic elsewhere; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Quota {
    /// A quota of `per_sandbox` for each sandbox and `total` overall.
    pub(crate) fn new(per_sandbox: usize, total: usize) -> Quota {
        Quota {
            per_sandbox,
            total,
            counts: Arc::default(),
        }
    }

    /// Takes one unit, or `None` when a limit is reached.
    pub(crate) fn try_acquire(&self, sandbox: &SandboxId) -> Option<QuotaGuard> {
        let mut c = lock(&self.counts);
        let mine = c.by_sandbox.get(sandbox).copied().unwrap_or(0);
        if c.total >= self.total || mine >= self.per_sandbox {
            return None;
        }
        c.total += 1;
        c.by_sandbox.insert(sandbox.clone(), mine + 1);
        Some(QuotaGuard {
            counts: self.counts.clone(),
            sandbox: sandbox.clone(),
        })
    }
}

impl Drop for QuotaGuard {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_sandbox.get_mut(&self.sandbox) {
            *n -= 1;
            if *n == 0 {
                c.by_sandbox.remove(&self.sandbox);
            }
        }
    }
}

/// On what grounds a proxied connection was let through, for re-checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    /// The name checked (SNI or Host), if any.
    pub(crate) name: Option<String>,
    /// Which rule let it through.
    pub(crate) basis: Basis,
}

/// A live proxied connection.
#[derive(Debug)]
pub(crate) struct Conn {
    /// Where the sandbox was connecting.
    pub(crate) dst: Ipv4Addr,
    /// Cancelled to close the connection (both sides).
    pub(crate) token: CancellationToken,
    /// What let it through; `None` until its first check passed (an HTTP
    /// connection is re-checked on every request).
    grant: Mutex<Option<Grant>>,
}

impl Conn {
    /// Records the latest passed check.
    pub(crate) fn set_grant(&self, grant: Grant) {
        *lock(&self.grant) = Some(grant);
    }

    /// The latest passed check.
    pub(crate) fn grant(&self) -> Option<Grant> {
        lock(&self.grant).clone()
    }
}

#[derive(Debug, Default)]
struct Registry {
    next: u64,
    total: usize,
    by_sandbox: HashMap<SandboxId, HashMap<u64, Arc<Conn>>>,
}

/// Live proxied connections, bounded per sandbox and per node.
#[derive(Debug, Clone)]
pub(crate) struct ConnTracker {
    per_sandbox: usize,
    total: usize,
    inner: Arc<Mutex<Registry>>,
}

/// Keeps a connection registered; dropping it unregisters.
#[derive(Debug)]
pub(crate) struct ConnGuard {
    inner: Arc<Mutex<Registry>>,
    sandbox: SandboxId,
    key: u64,
    /// The connection.
    pub(crate) conn: Arc<Conn>,
}

impl ConnTracker {
    /// A tracker allowing `per_sandbox` connections per sandbox and `total`
    /// overall.
    pub(crate) fn new(per_sandbox: usize, total: usize) -> ConnTracker {
        ConnTracker {
            per_sandbox,
            total,
            inner: Arc::default(),
        }
    }

    /// Registers a connection of `sandbox` to `dst` whose token is a child
    /// of `parent`; `None` when a limit is reached.
    pub(crate) fn register(
        &self,
        sandbox: &SandboxId,
        dst: Ipv4Addr,
        parent: &CancellationToken,
    ) -> Option<ConnGuard> {
        let mut r = lock(&self.inner);
        let mine = r.by_sandbox.get(sandbox).map_or(0, HashMap::len);
        if r.total >= self.total || mine >= self.per_sandbox {
            return None;
        }
        r.next += 1;
        let key = r.next;
        r.total += 1;
        let conn = Arc::new(Conn {
            dst,
            token: parent.child_token(),
            grant: Mutex::new(None),
        });
        r.by_sandbox
            .entry(sandbox.clone())
            .or_default()
            .insert(key, conn.clone());
        Some(ConnGuard {
            inner: self.inner.clone(),
            sandbox: sandbox.clone(),
            key,
            conn,
        })
    }

    /// Closes the connections of `sandbox` that `policy` no longer allows
    /// (`admitted` tells whether an address is admitted for a name now);
    /// returns how many.
    pub(crate) fn recheck(
        &self,
        sandbox: &SandboxId,
        policy: &EgressPolicy,
        admitted: impl Fn(Ipv4Addr, &str) -> bool,
    ) -> usize {
        let conns: Vec<Arc<Conn>> = lock(&self.inner)
            .by_sandbox
            .get(sandbox)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        let mut closed = 0;
        for conn in conns {
            let Some(grant) = conn.grant() else {
                continue;
            };
            // A connection let through by name stays admitted for that name
            // (its DNS answer may have expired since, which is fine: the
            // flow was checked when it started); the name must still be
            // allowed.
            let verdict = judge(policy, conn.dst, grant.name.as_deref(), "", |n| {
                grant.basis == Basis::Name || admitted(conn.dst, n)
            });
            if verdict.basis.is_none() {
                conn.token.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// Closes every connection of `sandbox`.
    pub(crate) fn close_all(&self, sandbox: &SandboxId) {
        if let Some(m) = lock(&self.inner).by_sandbox.get(sandbox) {
            for conn in m.values() {
                conn.token.cancel();
            }
        }
    }

    /// How many connections `sandbox` has open.
    #[cfg(test)]
    pub(crate) fn count(&self, sandbox: &SandboxId) -> usize {
        lock(&self.inner)
            .by_sandbox
            .get(sandbox)
            .map_or(0, HashMap::len)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut r = lock(&self.inner);
        let removed = r
            .by_sandbox
            .get_mut(&self.sandbox)
            .and_then(|m| m.remove(&self.key))
            .is_some();
        if removed {
            r.total -= 1;
        }
        if r.by_sandbox
            .get(&self.sandbox)
            .is_some_and(HashMap::is_empty)
        {
            r.by_sandbox.remove(&self.sandbox);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_proto::network::{DomainPattern, Ipv4Net};

    fn id(s: &str) -> SandboxId {
        SandboxId::parse(s).unwrap()
    }

    #[test]
    fn quota_limits_per_sandbox_and_total() {
        let q = Quota::new(2, 3);
        let a1 = q.try_acquire(&id("a")).unwrap();
        let _a2 = q.try_acquire(&id("a")).unwrap();
        assert!(q.try_acquire(&id("a")).is_none());
        let _b1 = q.try_acquire(&id("b")).unwrap();
        assert!(q.try_acquire(&id("b")).is_none(), "total reached");
        drop(a1);
        assert!(q.try_acquire(&id("b")).is_some());
    }

    #[test]
    fn tracker_limits_and_rechecks() {
        let t = ConnTracker::new(2, 10);
        let root = CancellationToken::new();
        let dst: Ipv4Addr = "192.0.2.1".parse().unwrap();
        let g1 = t.register(&id("a"), dst, &root).unwrap();
        let g2 = t.register(&id("a"), dst, &root).unwrap();
        assert!(t.register(&id("a"), dst, &root).is_none());
        g1.conn.set_grant(Grant {
            name: Some("keep.test".into()),
            basis: Basis::Name,
        });
        g2.conn.set_grant(Grant {
            name: Some("drop.test".into()),
            basis: Basis::Name,
        });
        let policy = EgressPolicy {
            deny: vec![Ipv4Net::ALL],
            deny_all: true,
            domains: vec![DomainPattern::Exact("keep.test".into())],
            ..EgressPolicy::default()
        };
        assert_eq!(t.recheck(&id("a"), &policy, |_, _| false), 1);
        assert!(!g1.conn.token.is_cancelled());
        assert!(g2.conn.token.is_cancelled());
        drop(g2);
        assert_eq!(t.count(&id("a")), 1);
        t.close_all(&id("a"));
        assert!(g1.conn.token.is_cancelled());
        drop(g1);
        assert_eq!(t.count(&id("a")), 0);
        let g = t.register(&id("a"), dst, &root).unwrap();
        root.cancel();
        assert!(
            g.conn.token.is_cancelled(),
            "shutdown reaches every connection"
        );
    }
}
