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
//!
//! Each sandbox holds at most [`MAX_ADMITTED_ADDRS_PER_SANDBOX`] addresses
//! and [`MAX_ADMITTED_NAMES_PER_SANDBOX`] (name, address) bindings,
//! counting those of answers still being committed. An answer that would
//! go over is refused (see [`AdmissionTable::plan`]); nothing admitted is
//! evicted early, since the firewall would keep the element until its
//! timeout anyway. Expired entries go on every plan and every sweep.
//!
//! [`MAX_ADMITTED_ADDRS_PER_SANDBOX`]: crate::MAX_ADMITTED_ADDRS_PER_SANDBOX
//! [`MAX_ADMITTED_NAMES_PER_SANDBOX`]: crate::MAX_ADMITTED_NAMES_PER_SANDBOX

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arca_proto::node::SandboxId;
use tokio::sync::{mpsc, oneshot};

use crate::config::{MAX_ADMITTED_ADDRS_PER_SANDBOX, MAX_ADMITTED_NAMES_PER_SANDBOX};
use crate::enforcer::{Admission, AdmittedAddr, Enforcer};

/// Log reason: the sandbox has [`MAX_ADMITTED_ADDRS_PER_SANDBOX`]
/// addresses admitted.
pub(crate) const RULE_TOO_MANY_ADDRS: &str = "too many admitted addresses";
/// Log reason: the sandbox has [`MAX_ADMITTED_NAMES_PER_SANDBOX`]
/// (name, address) bindings.
pub(crate) const RULE_TOO_MANY_NAMES: &str = "too many admitted names";

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

    /// Takes `until` as the element's timeout if it is later.
    fn extend_element(&mut self, until: Instant) {
        self.element_expires = Some(self.element_expires.map_or(until, |t| t.max(until)));
    }

    /// Binds `name` until `until` (or later, if it already is).
    fn bind(&mut self, name: &str, until: Instant) {
        match self.names.get_mut(name) {
            Some(t) => *t = (*t).max(until),
            None => {
                self.names.insert(name.to_string(), until);
            }
        }
    }
}

/// The admissions of one sandbox.
#[derive(Debug, Default)]
struct Admitted {
    addrs: HashMap<Ipv4Addr, Entry>,
    /// New addresses of answers being committed ([`Plan`]s alive).
    pending_addrs: usize,
    /// New bindings of answers being committed.
    pending_names: usize,
}

impl Admitted {
    /// How many (name, address) bindings there are.
    fn bindings(&self) -> usize {
        self.addrs.values().map(|e| e.names.len()).sum()
    }

    /// Nothing admitted and nothing on its way.
    fn is_idle(&self) -> bool {
        self.addrs.is_empty() && self.pending_addrs == 0 && self.pending_names == 0
    }
}

/// What to do for the addresses of one answer. Holds their share of the
/// sandbox's limits until [`AdmissionTable::bind`] takes it or it is
/// dropped (the commit failed).
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    /// The addresses that fit the limits, in the answer's order.
    pub(crate) admit: Vec<Ipv4Addr>,
    /// The addresses that do not, with the log reason.
    pub(crate) refused: Vec<(Ipv4Addr, &'static str)>,
    /// Addresses (of `admit`) to commit with the new timeout.
    pub(crate) commit: Vec<Ipv4Addr>,
    /// Longest TTL the client may be told: the new timeout, or less when an
    /// address stays admitted for less than that (it was skipped).
    pub(crate) cap: Duration,
    reservation: Reservation<'a>,
}

/// New addresses and bindings counted against a sandbox's limits before
/// they are in the table.
#[derive(Debug)]
struct Reservation<'a> {
    table: &'a AdmissionTable,
    sandbox: SandboxId,
    addrs: usize,
    names: usize,
}

impl Reservation<'_> {
    /// Gives the reservation back (idempotent).
    fn release(&mut self, table: &mut HashMap<SandboxId, Admitted>) {
        if let Some(a) = table.get_mut(&self.sandbox) {
            a.pending_addrs = a.pending_addrs.saturating_sub(self.addrs);
            a.pending_names = a.pending_names.saturating_sub(self.names);
            if a.is_idle() {
                table.remove(&self.sandbox);
            }
        }
        self.addrs = 0;
        self.names = 0;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.addrs > 0 || self.names > 0 {
            let table = self.table;
            self.release(&mut table.lock());
        }
    }
}

/// Per sandbox, per address: element timeout and bound names.
#[derive(Debug)]
pub(crate) struct AdmissionTable {
    inner: Mutex<HashMap<SandboxId, Admitted>>,
    /// See [`MAX_ADMITTED_ADDRS_PER_SANDBOX`].
    max_addrs: usize,
    /// See [`MAX_ADMITTED_NAMES_PER_SANDBOX`].
    max_names: usize,
}

impl Default for AdmissionTable {
    fn default() -> Self {
        AdmissionTable::new(
            MAX_ADMITTED_ADDRS_PER_SANDBOX,
            MAX_ADMITTED_NAMES_PER_SANDBOX,
        )
    }
}

/// Lowercase, no trailing dot: the form names are stored and compared in.
pub(crate) fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl AdmissionTable {
    /// A table holding at most `max_addrs` addresses and `max_names`
    /// bindings per sandbox.
    pub(crate) fn new(max_addrs: usize, max_names: usize) -> AdmissionTable {
        AdmissionTable {
            inner: Mutex::default(),
            max_addrs,
            max_names,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SandboxId, Admitted>> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides what to do with `addrs`, the answer for `name` with new
    /// timeout `ttl`, after dropping what expired by `now`.
    ///
    /// Addresses that would take the sandbox over its address or binding
    /// limit (counting answers still being committed) are refused; the
    /// others are reserved until [`AdmissionTable::bind`]. Of those, the
    /// ones to commit are those not admitted, or admitted for at most half
    /// of `ttl` more.
    pub(crate) fn plan(
        &self,
        sandbox: &SandboxId,
        name: &str,
        addrs: &[Ipv4Addr],
        ttl: Duration,
        now: Instant,
    ) -> Plan<'_> {
        let name = normalize(name);
        let mut table = self.lock();
        let admitted = table.entry(sandbox.clone()).or_default();
        prune(&mut admitted.addrs, now);
        let mut addrs_used = admitted.addrs.len() + admitted.pending_addrs;
        let mut names_used = admitted.bindings() + admitted.pending_names;
        let mut plan = Plan {
            admit: Vec::new(),
            refused: Vec::new(),
            commit: Vec::new(),
            cap: ttl,
            reservation: Reservation {
                table: self,
                sandbox: sandbox.clone(),
                addrs: 0,
                names: 0,
            },
        };
        let mut seen = HashSet::new();
        for addr in addrs {
            if !seen.insert(*addr) {
                continue;
            }
            let entry = admitted.addrs.get(addr);
            let new_addr = entry.is_none();
            let new_name = entry.is_none_or(|e| !e.names.contains_key(&name));
            if new_addr && addrs_used >= self.max_addrs {
                plan.refused.push((*addr, RULE_TOO_MANY_ADDRS));
                continue;
            }
            if new_name && names_used >= self.max_names {
                plan.refused.push((*addr, RULE_TOO_MANY_NAMES));
                continue;
            }
            if new_addr {
                addrs_used += 1;
                plan.reservation.addrs += 1;
            }
            if new_name {
                names_used += 1;
                plan.reservation.names += 1;
            }
            plan.admit.push(*addr);
            let remaining = entry
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
        admitted.pending_addrs += plan.reservation.addrs;
        admitted.pending_names += plan.reservation.names;
        if admitted.is_idle() {
            table.remove(sandbox);
        }
        plan
    }

    /// Records that `name` resolved to `plan.admit` for `ttl` from `at`,
    /// of which `plan.commit` were just committed with timeout `ttl`, and
    /// gives back the plan's reservation.
    pub(crate) fn bind(
        &self,
        sandbox: &SandboxId,
        name: &str,
        mut plan: Plan<'_>,
        ttl: Duration,
        at: Instant,
    ) {
        let name = normalize(name);
        let until = at + ttl;
        let mut table = self.lock();
        let admitted = table.entry(sandbox.clone()).or_default();
        prune(&mut admitted.addrs, at);
        for addr in &plan.admit {
            let entry = admitted.addrs.entry(*addr).or_default();
            if plan.commit.contains(addr) {
                entry.extend_element(until);
            }
            entry.bind(&name, until);
        }
        plan.reservation.release(&mut table);
        if table.get(sandbox).is_some_and(Admitted::is_idle) {
            table.remove(sandbox);
        }
    }

    /// Whether `addr` is admitted for exactly `name` (any case, trailing
    /// dot allowed) right now.
    pub(crate) fn is_admitted(&self, sandbox: &SandboxId, addr: Ipv4Addr, name: &str) -> bool {
        let now = Instant::now();
        let name = normalize(name);
        self.lock()
            .get(sandbox)
            .and_then(|a| a.addrs.get(&addr))
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
            .flat_map(|a| &a.addrs)
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
    /// the firewall with their remaining timeout. Past ones are ignored;
    /// over the limits, those closest to their end are (they would be the
    /// first to go anyway).
    pub(crate) fn restore(&self, sandbox: &SandboxId, mut entries: Vec<AdmittedAddr>) {
        let now = Instant::now();
        let wall = SystemTime::now();
        entries.sort_by_key(|e| std::cmp::Reverse(e.expires));
        let mut table = self.lock();
        let admitted = table.entry(sandbox.clone()).or_default();
        prune(&mut admitted.addrs, now);
        let mut addrs_used = admitted.addrs.len() + admitted.pending_addrs;
        let mut names_used = admitted.bindings() + admitted.pending_names;
        for e in entries {
            let Ok(left) = e.expires.duration_since(wall) else {
                continue;
            };
            if left.is_zero() {
                continue;
            }
            let name = normalize(&e.name);
            let existing = admitted.addrs.get(&e.addr);
            let new_addr = existing.is_none();
            let new_name = existing.is_none_or(|x| !x.names.contains_key(&name));
            if (new_addr && addrs_used >= self.max_addrs)
                || (new_name && names_used >= self.max_names)
            {
                continue;
            }
            addrs_used += usize::from(new_addr);
            names_used += usize::from(new_name);
            let until = now + left;
            let entry = admitted.addrs.entry(e.addr).or_default();
            entry.extend_element(until);
            entry.bind(&name, until);
        }
        if admitted.is_idle() {
            table.remove(sandbox);
        }
    }

    /// Drops the bindings of names `keep` rejects; addresses left without
    /// names are dropped too. Returns how many bindings went.
    pub(crate) fn retain_names(&self, sandbox: &SandboxId, keep: impl Fn(&str) -> bool) -> usize {
        let mut table = self.lock();
        let Some(admitted) = table.get_mut(sandbox) else {
            return 0;
        };
        let mut dropped = 0;
        admitted.addrs.retain(|_, e| {
            let before = e.names.len();
            e.names.retain(|n, _| keep(n));
            dropped += before - e.names.len();
            !e.names.is_empty()
        });
        if admitted.is_idle() {
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
        table.retain(|_, admitted| {
            prune(&mut admitted.addrs, now);
            !admitted.is_idle()
        });
    }

    /// How many addresses and bindings a sandbox has in the table.
    #[cfg(test)]
    pub(crate) fn counts(&self, sandbox: &SandboxId) -> (usize, usize) {
        self.lock()
            .get(sandbox)
            .map_or((0, 0), |a| (a.addrs.len(), a.bindings()))
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

    /// Plans and binds an answer as the forwarder does, all committed.
    fn admit(
        t: &AdmissionTable,
        s: &SandboxId,
        name: &str,
        addrs: &[Ipv4Addr],
        ttl: Duration,
        at: Instant,
    ) {
        let plan = t.plan(s, name, addrs, ttl, at);
        t.bind(s, name, plan, ttl, at);
    }

    #[test]
    fn binds_names_to_addresses_exactly() {
        let t = AdmissionTable::default();
        let now = Instant::now();
        let a = [ip("192.0.2.1"), ip("192.0.2.2")];
        admit(
            &t,
            &id("s1"),
            "Allowed.Test.",
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
        let p = t.plan(&s, "a.test", &[x], ttl, now);
        assert_eq!(p.commit, vec![x]);
        t.bind(&s, "a.test", p, ttl, now);
        // 400 s later, 200 s remain: not over half of 600, commit again.
        let later = now + Duration::from_secs(400);
        assert_eq!(t.plan(&s, "a.test", &[x], ttl, later).commit, vec![x]);
        // 100 s later, 500 s remain: skip, and tell clients at most 500 s.
        let soon = now + Duration::from_secs(100);
        let p = t.plan(&s, "b.test", &[x], ttl, soon);
        assert!(p.commit.is_empty());
        assert_eq!(p.admit, vec![x]);
        assert_eq!(p.cap, Duration::from_secs(500));
        // A skipped address still binds the new name, up to the element.
        t.bind(&s, "b.test", p, ttl, soon);
        assert!(t.is_admitted(&s, x, "b.test"));
        let b = t.list(&s).into_iter().find(|e| e.name == "b.test").unwrap();
        assert!(b.expires <= SystemTime::now() + Duration::from_secs(600));
    }

    #[test]
    fn refuses_addresses_and_names_over_the_limits() {
        let t = AdmissionTable::new(3, 5);
        let s = id("s1");
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        let ips: Vec<Ipv4Addr> = (1..=5).map(|i| Ipv4Addr::new(192, 0, 2, i)).collect();
        // Two of the five new addresses fit after the first.
        admit(&t, &s, "a.test", &ips[..1], ttl, now);
        let p = t.plan(&s, "b.test", &ips, ttl, now);
        assert_eq!(
            p.admit,
            ips[..3].to_vec(),
            "known address first, then two new"
        );
        assert_eq!(
            p.refused,
            vec![(ips[3], RULE_TOO_MANY_ADDRS), (ips[4], RULE_TOO_MANY_ADDRS)]
        );
        // While that answer is being committed its share is reserved.
        let q = t.plan(&s, "c.test", &ips[3..], ttl, now);
        assert!(q.admit.is_empty());
        drop(q);
        t.bind(&s, "b.test", p, ttl, now);
        assert_eq!(t.counts(&s), (3, 4));
        // Known addresses still take new names, up to the binding limit.
        let p = t.plan(&s, "c.test", &ips[..3], ttl, now);
        assert_eq!(p.admit, vec![ips[0]]);
        assert_eq!(
            p.refused,
            vec![(ips[1], RULE_TOO_MANY_NAMES), (ips[2], RULE_TOO_MANY_NAMES)]
        );
        t.bind(&s, "c.test", p, ttl, now);
        assert_eq!(t.counts(&s), (3, 5));
        // Renewing what is there needs no room.
        let p = t.plan(&s, "b.test", &ips[..3], ttl, now + Duration::from_secs(40));
        assert_eq!((p.admit.len(), p.refused.len()), (3, 0));
        assert_eq!(p.commit.len(), 3);
        drop(p);
        // Other sandboxes have their own limits.
        assert_eq!(t.plan(&id("s2"), "a.test", &ips, ttl, now).admit.len(), 3);
        // A failed commit (plan dropped) gives its reservation back.
        assert_eq!(t.plan(&id("s2"), "a.test", &ips, ttl, now).admit.len(), 3);
        assert_eq!(t.counts(&id("s2")), (0, 0));
        // Expired admissions make room again.
        let later = now + Duration::from_secs(61);
        let p = t.plan(&s, "d.test", &ips[3..], ttl, later);
        assert_eq!(p.admit, ips[3..].to_vec());
        t.bind(&s, "d.test", p, ttl, later);
        assert_eq!(t.counts(&s), (2, 2));
    }

    #[test]
    fn sweeps_expired_admissions() {
        let t = AdmissionTable::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        for i in 0..100u8 {
            admit(
                &t,
                &id("s1"),
                &format!("n{i}.test"),
                &[Ipv4Addr::new(192, 0, 2, i)],
                ttl,
                now,
            );
        }
        admit(&t, &id("s2"), "x.test", &[ip("192.0.2.1")], ttl * 2, now);
        assert_eq!(t.counts(&id("s1")), (100, 100));
        t.sweep(now + Duration::from_secs(30));
        assert_eq!(t.counts(&id("s1")), (100, 100));
        t.sweep(now + ttl);
        assert_eq!(t.counts(&id("s1")), (0, 0));
        assert!(!t.lock().contains_key(&id("s1")), "empty sandboxes go");
        assert_eq!(t.counts(&id("s2")), (1, 1));
    }

    #[test]
    fn restores_the_latest_entries_up_to_the_limits() {
        let t = AdmissionTable::new(2, 3);
        let s = id("s1");
        let at = |secs| SystemTime::now() + Duration::from_secs(secs);
        let e = |name: &str, addr: &str, expires| AdmittedAddr {
            name: name.into(),
            addr: ip(addr),
            expires,
        };
        t.restore(
            &s,
            vec![
                e("a.test", "192.0.2.1", at(100)),
                e("soon.test", "192.0.2.9", at(50)),
                e("b.test", "192.0.2.2", at(300)),
                e("c.test", "192.0.2.2", at(200)),
                e("d.test", "192.0.2.2", at(60)),
            ],
        );
        let names: Vec<String> = t.list(&s).into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec!["a.test", "b.test", "c.test"]);
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
        admit(
            &t,
            &s,
            "c.test",
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
