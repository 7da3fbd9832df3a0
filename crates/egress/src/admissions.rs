//! Which addresses DNS admitted for which names ([`AdmissionTable`]), and
//! the task that turns concurrent admissions into few nft commits
//! ([`Admitter`]).
//!
//! The table mirrors the firewall: per sandbox, per address, when the
//! element in `x<i>` times out, plus the names the address was an answer
//! for and until when. The TLS and HTTP checks need the names ("this
//! address was resolved for this exact name"); the element timeout lets
//! the forwarder skip a commit for an address that stays admitted long
//! enough anyway (ADR 0005 section 2), and caps the TTLs told to clients.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arca_proto::node::SandboxId;
use tokio::sync::{mpsc, oneshot};

use crate::enforcer::{Admission, AdmittedAddr, Enforcer};

/// One admitted address of one sandbox.
#[derive(Debug, Default)]
struct Entry {
    /// When the firewall element times out (never earlier than this: the
    /// commit happens after the instant recorded).
    element_expires: Option<Instant>,
    /// Lowercased names -> end of their binding.
    names: HashMap<String, Instant>,
}

impl Entry {
    /// Until when `name` counts as admitted here.
    fn valid_until(&self, name: &str) -> Option<Instant> {
        let n = self.names.get(name)?;
        Some((*n).min(self.element_expires?))
    }
}

/// What to do for the addresses of one answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Addresses to commit with the new timeout.
    pub(crate) commit: Vec<Ipv4Addr>,
    /// Longest TTL the client may be told: the new timeout, or less when an
    /// address stays admitted for less than that (it was skipped).
    pub(crate) cap: Duration,
}

/// Per sandbox, per address: element timeout and bound names.
#[derive(Debug, Default)]
pub(crate) struct AdmissionTable {
    inner: Mutex<HashMap<SandboxId, HashMap<Ipv4Addr, Entry>>>,
}

/// Lowercase, no trailing dot: the form names are stored and compared in.
pub(crate) fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl AdmissionTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<SandboxId, HashMap<Ipv4Addr, Entry>>> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides which of `addrs` need a commit for a new timeout `ttl`: those
    /// not admitted, or admitted for at most half of `ttl` more.
    pub(crate) fn plan(
        &self,
        sandbox: &SandboxId,
        addrs: &[Ipv4Addr],
        ttl: Duration,
        now: Instant,
    ) -> Plan {
        let table = self.lock();
        let entries = table.get(sandbox);
        let mut plan = Plan {
            commit: Vec::new(),
            cap: ttl,
        };
        for addr in addrs {
            let remaining = entries
                .and_then(|e| e.get(addr))
                .and_then(|e| e.element_expires)
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or_default();
            if remaining > ttl / 2 {
                // Whole seconds, rounded down: the client never caches
                // longer than the element lives.
                plan.cap = plan.cap.min(Duration::from_secs(remaining.as_secs()));
            } else {
                plan.commit.push(*addr);
            }
        }
        plan
    }

    /// Records that `name` resolved to `addrs` for `ttl` from `at`, of
    /// which `committed` were just committed with timeout `ttl`.
    pub(crate) fn bind(
        &self,
        sandbox: &SandboxId,
        name: &str,
        addrs: &[Ipv4Addr],
        committed: &[Ipv4Addr],
        ttl: Duration,
        at: Instant,
    ) {
        let name = normalize(name);
        let until = at + ttl;
        let mut table = self.lock();
        let entries = table.entry(sandbox.clone()).or_default();
        prune(entries, at);
        for addr in addrs {
            let entry = entries.entry(*addr).or_default();
            if committed.contains(addr) {
                entry.element_expires = Some(entry.element_expires.map_or(until, |t| t.max(until)));
            }
            let n = entry.names.entry(name.clone()).or_insert(until);
            *n = (*n).max(until);
        }
    }

    /// Whether `addr` is admitted for exactly `name` (any case, trailing
    /// dot allowed) right now.
    pub(crate) fn is_admitted(&self, sandbox: &SandboxId, addr: Ipv4Addr, name: &str) -> bool {
        let now = Instant::now();
        let name = normalize(name);
        self.lock()
            .get(sandbox)
            .and_then(|e| e.get(&addr))
            .and_then(|e| e.valid_until(&name))
            .is_some_and(|t| t > now)
    }

    /// The live admissions of a sandbox, sorted by name and address.
    pub(crate) fn list(&self, sandbox: &SandboxId) -> Vec<AdmittedAddr> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let table = self.lock();
        let mut out: Vec<AdmittedAddr> = table
            .get(sandbox)
            .into_iter()
            .flatten()
            .flat_map(|(addr, entry)| {
                entry.names.keys().filter_map(move |name| {
                    let until = entry.valid_until(name)?;
                    (until > now).then(|| AdmittedAddr {
                        name: name.clone(),
                        addr: *addr,
                        expires: wall + (until - now),
                    })
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.name, a.addr).cmp(&(&b.name, b.addr)));
        out
    }

    /// Takes back saved admissions: the node has put the elements back into
    /// the firewall with their remaining timeout. Past ones are ignored.
    pub(crate) fn restore(&self, sandbox: &SandboxId, entries: Vec<AdmittedAddr>) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut table = self.lock();
        let map = table.entry(sandbox.clone()).or_default();
        for e in entries {
            let Ok(left) = e.expires.duration_since(wall) else {
                continue;
            };
            if left.is_zero() {
                continue;
            }
            let until = now + left;
            let entry = map.entry(e.addr).or_default();
            entry.element_expires = Some(entry.element_expires.map_or(until, |t| t.max(until)));
            let n = entry.names.entry(normalize(&e.name)).or_insert(until);
            *n = (*n).max(until);
        }
        if map.is_empty() {
            table.remove(sandbox);
        }
    }

    /// Drops the bindings of names `keep` rejects; addresses left without
    /// names are dropped too. Returns how many bindings went.
    pub(crate) fn retain_names(&self, sandbox: &SandboxId, keep: impl Fn(&str) -> bool) -> usize {
        let mut table = self.lock();
        let Some(entries) = table.get_mut(sandbox) else {
            return 0;
        };
        let mut dropped = 0;
        entries.retain(|_, e| {
            let before = e.names.len();
            e.names.retain(|n, _| keep(n));
            dropped += before - e.names.len();
            !e.names.is_empty()
        });
        if entries.is_empty() {
            table.remove(sandbox);
        }
        dropped
    }

    /// Forgets a sandbox.
    pub(crate) fn forget(&self, sandbox: &SandboxId) {
        self.lock().remove(sandbox);
    }

    /// Drops everything expired, in all sandboxes.
    pub(crate) fn sweep(&self, now: Instant) {
        let mut table = self.lock();
        table.retain(|_, entries| {
            prune(entries, now);
            !entries.is_empty()
        });
    }
}

/// Drops expired names, and addresses without a live element or names.
fn prune(entries: &mut HashMap<Ipv4Addr, Entry>, now: Instant) {
    entries.retain(|_, e| {
        if e.element_expires.is_some_and(|t| t <= now) {
            return false;
        }
        e.names.retain(|_, t| *t > now);
        !e.names.is_empty() || e.element_expires.is_some()
    });
}

/// A batch waiting for the admitter, and where its result goes.
struct Job {
    batch: Vec<Admission>,
    done: oneshot::Sender<Result<(), String>>,
}

/// Hands admissions to the batching task.
#[derive(Clone)]
pub(crate) struct Admitter {
    tx: mpsc::Sender<Job>,
}

/// Jobs that may wait for the admitter; bounded by the query limits anyway.
const QUEUE: usize = 4096;

impl Admitter {
    /// Starts the batching task; it ends when every `Admitter` is dropped.
    pub(crate) fn spawn(enforcer: Arc<dyn Enforcer>) -> (Admitter, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(rx, enforcer));
        (Admitter { tx }, task)
    }

    /// Admits `batch` together with whatever else is waiting; returns once
    /// the node committed it.
    pub(crate) async fn admit(&self, batch: Vec<Admission>) -> Result<(), String> {
        let (done, result) = oneshot::channel();
        self.tx
            .send(Job { batch, done })
            .await
            .map_err(|_| "the admission task has stopped".to_string())?;
        result
            .await
            .map_err(|_| "the admission task has stopped".to_string())?
    }
}

/// While one commit is in flight, jobs pile up in the channel; the next
/// round takes all of them at once.
async fn run(mut rx: mpsc::Receiver<Job>, enforcer: Arc<dyn Enforcer>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while let Ok(job) = rx.try_recv() {
            jobs.push(job);
        }
        let merged = merge(jobs.iter().flat_map(|j| j.batch.iter().cloned()));
        let result = enforcer.admit(merged.clone()).await;
        let mut sandboxes: Vec<&SandboxId> = merged.iter().map(|a| &a.sandbox).collect();
        sandboxes.sort();
        sandboxes.dedup();
        if result.is_ok() || sandboxes.len() < 2 {
            for job in jobs {
                let _ = job.done.send(result.clone());
            }
            continue;
        }
        // One sandbox's set may be gone (it is being torn down): retry each
        // sandbox alone so the others are not failed with it.
        let mut results: HashMap<SandboxId, Result<(), String>> = HashMap::new();
        for id in sandboxes {
            let part: Vec<Admission> = merged
                .iter()
                .filter(|a| &a.sandbox == id)
                .cloned()
                .collect();
            results.insert(id.clone(), enforcer.admit(part).await);
        }
        for job in jobs {
            let r = job
                .batch
                .iter()
                .map(|a| results.get(&a.sandbox).cloned().unwrap_or(Ok(())))
                .find(Result::is_err)
                .unwrap_or(Ok(()));
            let _ = job.done.send(r);
        }
    }
}

/// One admission per (sandbox, address), with the longest timeout asked.
fn merge(all: impl Iterator<Item = Admission>) -> Vec<Admission> {
    let mut out: Vec<Admission> = Vec::new();
    let mut index: HashMap<(SandboxId, Ipv4Addr), usize> = HashMap::new();
    for a in all {
        match index.get(&(a.sandbox.clone(), a.addr)) {
            Some(&i) => out[i].ttl = out[i].ttl.max(a.ttl),
            None => {
                index.insert((a.sandbox.clone(), a.addr), out.len());
                out.push(a);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SandboxId {
        SandboxId::parse(s).unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn binds_names_to_addresses_exactly() {
        let t = AdmissionTable::default();
        let now = Instant::now();
        let a = [ip("192.0.2.1"), ip("192.0.2.2")];
        t.bind(
            &id("s1"),
            "Allowed.Test.",
            &a,
            &a,
            Duration::from_secs(60),
            now,
        );
        assert!(t.is_admitted(&id("s1"), ip("192.0.2.1"), "allowed.test"));
        assert!(t.is_admitted(&id("s1"), ip("192.0.2.2"), "ALLOWED.TEST."));
        assert!(!t.is_admitted(&id("s1"), ip("192.0.2.1"), "other.test"));
        assert!(!t.is_admitted(&id("s1"), ip("192.0.2.3"), "allowed.test"));
        assert!(!t.is_admitted(&id("s2"), ip("192.0.2.1"), "allowed.test"));
        let list = t.list(&id("s1"));
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].name, "allowed.test");
        let left = list[0].expires.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(58) && left <= Duration::from_secs(60));
    }

    #[test]
    fn skips_commits_for_addresses_admitted_long_enough() {
        let t = AdmissionTable::default();
        let s = id("s1");
        let now = Instant::now();
        let x = ip("198.51.100.7");
        let ttl = Duration::from_secs(600);
        assert_eq!(t.plan(&s, &[x], ttl, now).commit, vec![x]);
        t.bind(&s, "a.test", &[x], &[x], ttl, now);
        // 400 s later, 200 s remain: not over half of 600, commit again.
        let later = now + Duration::from_secs(400);
        assert_eq!(t.plan(&s, &[x], ttl, later).commit, vec![x]);
        // 100 s later, 500 s remain: skip, and tell clients at most 500 s.
        let soon = now + Duration::from_secs(100);
        let p = t.plan(&s, &[x], ttl, soon);
        assert!(p.commit.is_empty());
        assert_eq!(p.cap, Duration::from_secs(500));
        // A skipped address still binds the new name, up to the element.
        t.bind(&s, "b.test", &[x], &[], ttl, soon);
        assert!(t.is_admitted(&s, x, "b.test"));
        let b = t.list(&s).into_iter().find(|e| e.name == "b.test").unwrap();
        assert!(b.expires <= SystemTime::now() + Duration::from_secs(600));
    }

    #[test]
    fn restores_drops_and_forgets() {
        let t = AdmissionTable::default();
        let s = id("s1");
        let in_a_minute = SystemTime::now() + Duration::from_secs(60);
        t.restore(
            &s,
            vec![
                AdmittedAddr {
                    name: "a.test".into(),
                    addr: ip("192.0.2.1"),
                    expires: in_a_minute,
                },
                AdmittedAddr {
                    name: "b.test".into(),
                    addr: ip("192.0.2.1"),
                    expires: in_a_minute,
                },
                AdmittedAddr {
                    name: "old.test".into(),
                    addr: ip("192.0.2.9"),
                    expires: SystemTime::now() - Duration::from_secs(1),
                },
            ],
        );
        assert!(t.is_admitted(&s, ip("192.0.2.1"), "a.test"));
        assert!(!t.is_admitted(&s, ip("192.0.2.9"), "old.test"));
        assert_eq!(t.retain_names(&s, |n| n != "a.test"), 1);
        assert!(!t.is_admitted(&s, ip("192.0.2.1"), "a.test"));
        assert!(t.is_admitted(&s, ip("192.0.2.1"), "b.test"));
        t.sweep(Instant::now() + Duration::from_secs(120));
        assert!(t.list(&s).is_empty());
        t.restore(&s, t.list(&s));
        t.bind(
            &s,
            "c.test",
            &[ip("192.0.2.3")],
            &[ip("192.0.2.3")],
            Duration::from_secs(60),
            Instant::now(),
        );
        t.forget(&s);
        assert!(t.list(&s).is_empty());
    }

    #[test]
    fn merges_duplicate_admissions() {
        let a = |s: &str, i: &str, t: u64| Admission {
            sandbox: id(s),
            addr: ip(i),
            ttl: Duration::from_secs(t),
        };
        let m = merge(
            vec![
                a("s1", "192.0.2.1", 60),
                a("s1", "192.0.2.1", 300),
                a("s2", "192.0.2.1", 60),
            ]
            .into_iter(),
        );
        assert_eq!(m, vec![a("s1", "192.0.2.1", 300), a("s2", "192.0.2.1", 60)]);
    }
}
