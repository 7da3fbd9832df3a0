//! The slot pool: prepared slots handed out to sandboxes and recycled off
//! the hot path.
//!
//! Every index `0..slots` of the cidr is in exactly one state:
//!
//! ```text
//!  free --reserve--> preparing --ok--> warm --acquire--> in use --release--> recycling
//!   ^                    |                                                    |    |
//!   +------- failed -----+                           warm queue not full: -----+    |
//!   +---------------------------- deleted, warm queue full ---------------------------+
//! ```
//!
//! `taken` holds every index that is not free, so an index is never handed
//! out twice and never reused before its old objects are gone. A slot whose
//! deletion fails stays taken ("quarantined", logged) until the next start.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch};

use crate::cmd::{Cmd, SystemRunner};
use crate::config::{ConfigError, NetConfig};
use crate::error::{NetError, chain};
use crate::layout::Layout;
use crate::nft::SlotEgress;
use crate::{nft, ops, setelem};
use arca_proto::network::EgressPolicy;

/// The sysctl turned on by [`SlotPool::new`].
const IP_FORWARD: &str = "net.ipv4.ip_forward";

/// A prepared network slot: a named netns whose `eth0` is one end of a veth
/// pair, the other end (`host_ifname`) in the root netns.
///
/// Inside the netns: `lo` up, `eth0` up with `sandbox_ip/prefix_len`, a
/// default route via `host_ip`. The host reaches the sandbox at
/// `sandbox_ip` (the node dials envd there); the sandbox reaches the world
/// through the host's routes, masqueraded, and nothing on the host itself.
///
/// Not `Clone`: the value is the claim on the slot, given back once with
/// [`SlotPool::release`].
#[derive(Debug, PartialEq, Eq)]
pub struct Slot {
    /// Position in the cidr: the slot owns its `index`-th /30.
    pub index: u32,
    /// Name of the netns (`{prefix}-{index}`), for `ip netns exec`.
    pub netns_name: String,
    /// Its bind mount, `/run/netns/{netns_name}`: open it to `setns` into
    /// the slot or hand it to the runtime as the sandbox's netns.
    pub netns_path: PathBuf,
    /// Host end of the veth pair (`{prefix}{index}h`).
    pub host_ifname: String,
    /// Host address on the slot's /30 (`.1`): the sandbox's gateway.
    pub host_ip: Ipv4Addr,
    /// The sandbox's address on `eth0` (`.2`).
    pub sandbox_ip: Ipv4Addr,
    /// Prefix length of both addresses: always 30.
    pub prefix_len: u8,
}

/// Counts of the pool's slots, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Prepared and free.
    pub warm: usize,
    /// Handed out or adopted, not yet released.
    pub in_use: usize,
    /// Being created or deleted, or quarantined: neither free nor usable.
    pub busy: usize,
}

/// A pool of network slots for sandboxes.
///
/// Dropping the pool leaves every netns, veth and the nft table in place:
/// that is what a crashed node leaves, and [`SlotPool::new`] with the
/// running sandboxes' indexes picks it up. [`SlotPool::destroy`] removes it
/// all. Background work (re-preparing released slots, refilling the warm
/// queue) runs on the Tokio runtime `new` was called on; dropping the pool
/// lets it finish.
#[derive(Debug)]
pub struct SlotPool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    layout: Layout,
    warm_target: usize,
    /// Set by [`SlotPool::close`]: no more slots are prepared.
    closing: std::sync::atomic::AtomicBool,
    runner: Arc<dyn Cmd>,
    handle: Handle,
    state: Mutex<State>,
    /// Number of background tasks running; [`SlotPool::idle`] waits for 0.
    tasks: watch::Sender<usize>,
    /// Admit addresses over netlink rather than with the runner's `nft`
    /// (only with the real runner: a test runner must see every change).
    netlink: bool,
    /// The netlink path failed once and that was logged.
    netlink_warned: std::sync::atomic::AtomicBool,
    /// How a netlink admission refreshes a timeout on this kernel.
    refresh: setelem::Refresh,
}

#[derive(Debug, Default)]
struct State {
    /// Prepared and free, oldest first.
    warm: VecDeque<Slot>,
    /// Every index not free: warm, in use, preparing, recycling, quarantined.
    taken: BTreeSet<u32>,
    /// Handed out (or adopted) and not released.
    in_use: BTreeSet<u32>,
    /// Adopted indexes whose `Slot` has not been claimed with `take_adopted`.
    adopted: BTreeSet<u32>,
    /// Slots being created for the warm queue.
    preparing: usize,
    /// Egress rules loaded per slot (sandbox id, policy): what the kernel
    /// enforces, set before a load commits and dropped only once a
    /// release removed them.
    egress: std::collections::HashMap<u32, (String, Arc<EgressPolicy>)>,
}

impl State {
    /// Takes the lowest free index, if any is left.
    fn reserve(&mut self, slots: u32) -> Option<u32> {
        let mut candidate = 0;
        for &i in &self.taken {
            if i != candidate {
                break;
            }
            candidate += 1;
        }
        (candidate < slots).then(|| {
            self.taken.insert(candidate);
            candidate
        })
    }
}

impl SlotPool {
    /// Sets up the host and a pool of slots, with the real `ip` and `nft`.
    ///
    /// In order: sets `net.ipv4.ip_forward=1` (logged: forwarding is what
    /// lets sandboxes out; it is left on by `destroy`); installs the nft
    /// table (replacing any old one in the same transaction); deletes every
    /// netns and veth with the pool's names except the `in_use` indexes,
    /// which are adopted as they are (sandboxes still running after a node
    /// restart; claim their [`Slot`]s with [`take_adopted`](Self::take_adopted));
    /// then prepares `warm_slots` slots, about 20 ms each.
    ///
    /// Must be called inside a Tokio runtime with the `process` driver
    /// (any runtime built with `enable_all`).
    pub async fn new(config: NetConfig, in_use: &[u32]) -> Result<Self, NetError> {
        Self::build(config, in_use, &[], Arc::new(SystemRunner::new()), true).await
    }

    /// [`new`](Self::new) for a node restart: the adopted slots listed in
    /// `egress` get their rules back in the same transaction that replaces
    /// the table, so no running sandbox is ever unrestricted.
    pub async fn new_with_egress(
        config: NetConfig,
        in_use: &[u32],
        egress: &[(u32, SlotEgress)],
    ) -> Result<Self, NetError> {
        Self::build(config, in_use, egress, Arc::new(SystemRunner::new()), true).await
    }

    /// [`new`](Self::new) with another way of running `ip` and `nft`
    /// (tests pass `testing::RecordingRunner`, feature `test-util`).
    pub async fn with_runner(
        config: NetConfig,
        in_use: &[u32],
        egress: &[(u32, SlotEgress)],
        runner: Arc<dyn Cmd>,
    ) -> Result<Self, NetError> {
        Self::build(config, in_use, egress, runner, false).await
    }

    async fn build(
        config: NetConfig,
        in_use: &[u32],
        egress: &[(u32, SlotEgress)],
        runner: Arc<dyn Cmd>,
        netlink: bool,
    ) -> Result<Self, NetError> {
        let started = Instant::now();
        let layout = Layout::new(&config)?;
        if let Some(&index) = in_use
            .iter()
            .chain(egress.iter().map(|(i, _)| i))
            .find(|&&i| i >= layout.slots())
        {
            return Err(ConfigError::AdoptOutOfRange {
                index,
                slots: layout.slots(),
            }
            .into());
        }
        tracing::info!(
            sysctl = IP_FORWARD,
            "enabling IPv4 forwarding so sandboxes reach the network through the host (masqueraded)"
        );
        runner
            .set_sysctl(IP_FORWARD, "1")
            .await
            .map_err(NetError::EnableForwarding)?;
        runner
            .run(&nft::install(&layout, egress))
            .await
            .map_err(|source| NetError::InstallTable {
                table: layout.table().to_owned(),
                source,
            })?;

        // One add renews a timeout on newer kernels (microseconds); older
        // ones need add, delete, add, whose commit waits about 15 ms.
        let mut refresh = setelem::Refresh::AddDeleteAdd;
        if netlink {
            let table = layout.table().to_owned();
            match tokio::task::spawn_blocking(move || setelem::add_updates_timeout(&table)).await {
                Ok(Ok(true)) => refresh = setelem::Refresh::Add,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::debug!(error = ?e, "probing set element timeout updates"),
                Err(e) => tracing::debug!(error = %e, "probing set element timeout updates"),
            }
            tracing::info!(
                ?refresh,
                "DNS admissions renew timeouts this way on this kernel"
            );
        }
        let adopt: BTreeSet<u32> = in_use.iter().copied().collect();
        let found = ops::list_ours(&*runner, &layout)
            .await
            .map_err(NetError::List)?;
        for &index in &adopt {
            if !found.netns.contains(&index) || !found.links.contains(&index) {
                tracing::warn!(
                    index,
                    netns = layout.netns_name(index),
                    "adopted network slot is missing its netns or veth; it stays in use until released"
                );
            }
        }
        let mut taken = adopt.clone();
        for index in found.all().difference(&adopt).copied() {
            if let Err(e) = ops::delete_slot(&*runner, &layout, index).await {
                tracing::error!(index, error = %chain(&e), "stale network slot could not be deleted; its index is not used");
                taken.insert(index);
            } else {
                tracing::debug!(index, "deleted stale network slot");
            }
        }

        let loaded = egress
            .iter()
            .map(|(i, e)| (*i, (e.sandbox_id.clone(), Arc::new(e.policy.clone()))))
            .collect();
        let inner = Arc::new(Inner {
            warm_target: config.warm_slots,
            closing: std::sync::atomic::AtomicBool::new(false),
            runner,
            handle: Handle::current(),
            state: Mutex::new(State {
                taken,
                in_use: adopt.clone(),
                adopted: adopt,
                egress: loaded,
                ..State::default()
            }),
            tasks: watch::Sender::new(0),
            netlink,
            netlink_warned: std::sync::atomic::AtomicBool::new(false),
            refresh,
            layout,
        });
        for _ in 0..inner.warm_target {
            let Some(index) = inner.state().reserve(inner.layout.slots()) else {
                break;
            };
            match ops::create_slot(&*inner.runner, &inner.layout, index).await {
                Ok(slot) => inner.state().warm.push_back(slot),
                Err(e) => {
                    inner.state().taken.remove(&index);
                    return Err(e);
                }
            }
        }
        tracing::info!(
            cidr = inner.layout.cidr(),
            prefix = inner.layout.prefix(),
            table = inner.layout.table(),
            warm = inner.warm_target,
            adopted = in_use.len(),
            elapsed_ms = started.elapsed().as_millis(),
            "network slot pool ready"
        );
        Ok(Self { inner })
    }

    /// A prepared slot, from the warm queue, or made now (about 20 ms) when
    /// the queue is empty. Never a slot in use. The queue is topped up in
    /// the background. Cancel-safe: a slot made for a dropped call goes to
    /// the warm queue.
    pub async fn acquire(&self) -> Result<Slot, NetError> {
        let index = {
            let mut st = self.inner.state();
            if let Some(slot) = st.warm.pop_front() {
                st.in_use.insert(slot.index);
                drop(st);
                self.inner.refill();
                return Ok(slot);
            }
            st.reserve(self.inner.layout.slots())
                .ok_or_else(|| NetError::Exhausted {
                    cidr: self.inner.layout.cidr().to_owned(),
                    slots: self.inner.layout.slots(),
                })?
        };
        // Made in a task so a cancelled `acquire` cannot strand the index.
        let (tx, rx) = oneshot::channel();
        let inner = Arc::clone(&self.inner);
        self.inner.spawn(async move {
            let started = Instant::now();
            match ops::create_slot(&*inner.runner, &inner.layout, index).await {
                Ok(slot) => {
                    tracing::debug!(
                        index,
                        elapsed_ms = started.elapsed().as_millis(),
                        "network slot made on demand"
                    );
                    inner.state().in_use.insert(index);
                    if let Err(Ok(slot)) = tx.send(Ok(slot)) {
                        let mut st = inner.state();
                        st.in_use.remove(&index);
                        st.warm.push_back(slot);
                    }
                }
                Err(e) => {
                    inner.state().taken.remove(&index);
                    let _ = tx.send(Err(e));
                }
            }
            // Only now: refilling earlier would compete with this slot.
            inner.refill();
        });
        rx.await.unwrap_or(Err(NetError::Abandoned { index }))
    }

    /// Gives a slot back. Its veth and netns are deleted in the background,
    /// then the index is re-prepared for the warm queue if the queue is
    /// short, or freed otherwise; it is not handed out again before that.
    /// A slot this pool does not have in use is ignored (logged).
    pub fn release(&self, slot: Slot) {
        let index = slot.index;
        if slot.netns_name != self.inner.layout.netns_name(index) {
            tracing::warn!(
                index,
                netns = slot.netns_name,
                "released a slot of another pool; ignored"
            );
            return;
        }
        {
            let mut st = self.inner.state();
            if !st.in_use.remove(&index) {
                tracing::warn!(index, "released a network slot that is not in use; ignored");
                return;
            }
            st.adopted.remove(&index);
        }
        let inner = Arc::clone(&self.inner);
        self.inner.spawn(async move { inner.recycle(index).await });
    }

    /// Moves `slot`'s `eth0` into the network namespace of process `pid`
    /// (the init of a sandbox with a network namespace of its own, which
    /// has only `lo`) and configures it there: the sandbox's address and a
    /// default route via the host end. From then on the slot's
    /// [`netns_path`](Slot::netns_path) is that namespace, and it ends with
    /// the sandbox's processes once the slot is released. About 10 ms.
    pub async fn attach(&self, slot: &Slot, pid: i32) -> Result<(), NetError> {
        let layout = &self.inner.layout;
        let Some(steps) = ops::attach_invocations(layout, slot.index, &pid.to_string()) else {
            return Err(NetError::Exhausted {
                cidr: layout.cidr().to_owned(),
                slots: layout.slots(),
            });
        };
        for step in &steps {
            self.inner
                .runner
                .run(step)
                .await
                .map_err(|source| NetError::Attach {
                    index: slot.index,
                    pid,
                    source,
                })?;
        }
        Ok(())
    }

    /// What [`attach`](Self::attach) does, as a CRIU action script for a
    /// restore: the restored sandbox's network namespace is made by CRIU,
    /// and the script joins it to `slot` when CRIU says so.
    pub fn attach_script(&self, slot: &Slot) -> Option<String> {
        let host = format!("/proc/{}/ns/mnt", std::process::id());
        ops::attach_script(&self.inner.layout, slot.index, &host)
    }

    /// Replaces the egress rules of slot `index` (in use) in one
    /// transaction: its sets, chains and switch. About 20 ms (one `nft`).
    pub async fn set_egress(&self, index: u32, egress: &SlotEgress) -> Result<(), NetError> {
        let layout = &self.inner.layout;
        if index >= layout.slots() {
            return Err(ConfigError::AdoptOutOfRange {
                index,
                slots: layout.slots(),
            }
            .into());
        }
        // Known before the kernel has it: whoever asks by address (the
        // node's DNS forwarder) never sees fewer restrictions than apply.
        let view = (egress.sandbox_id.clone(), Arc::new(egress.policy.clone()));
        let before = self.inner.state().egress.insert(index, view);
        let result = self
            .inner
            .runner
            .run(&nft::script(nft::slot_script(layout, index, egress)))
            .await;
        if let Err(source) = result {
            let mut st = self.inner.state();
            match before {
                Some(old) => st.egress.insert(index, old),
                None => st.egress.remove(&index),
            };
            return Err(NetError::Egress {
                action: "install",
                index,
                source,
            });
        }
        Ok(())
    }

    /// The slot holding the egress rules of `sandbox_id`, from the moment
    /// they are loaded (a boot may load them long before the sandbox is
    /// handed out) until they are removed.
    pub fn egress_slot(&self, sandbox_id: &str) -> Option<u32> {
        self.inner
            .state()
            .egress
            .iter()
            .find(|(_, (id, _))| id == sandbox_id)
            .map(|(index, _)| *index)
    }

    /// The sandbox whose slot has address `ip` and the egress rules loaded
    /// for it; `None` for an address with no rules loaded (a warm slot, a
    /// template build, or none of the pool's).
    pub fn egress_of(&self, ip: Ipv4Addr) -> Option<(String, Arc<EgressPolicy>)> {
        let index = self.inner.layout.index_of_sandbox_ip(ip)?;
        self.inner.state().egress.get(&index).cloned()
    }

    /// Puts addresses into slots' DNS admission sets (slot, address, time
    /// to keep it), all in one transaction. The slots must have egress
    /// rules ([`set_egress`](Self::set_egress)).
    ///
    /// A pool with the real runner ([`new`](Self::new)) sends the
    /// transaction to nf_tables over netlink (tens of microseconds where a
    /// plain add renews a timeout, else about 15 ms); if that path is not
    /// available it falls back to `nft -f` (logged once). A
    /// pool with another runner ([`with_runner`](Self::with_runner)) always
    /// goes through the runner.
    pub async fn admit(&self, items: &[(u32, Ipv4Addr, Duration)]) -> Result<(), NetError> {
        let Some(&(first, _, _)) = items.first() else {
            return Ok(());
        };
        if self.inner.netlink {
            match setelem::admit(self.inner.layout.table(), items, self.inner.refresh).await {
                Ok(()) => return Ok(()),
                Err(setelem::AdmitError::Refused { command, source }) => {
                    return Err(NetError::Egress {
                        action: "admit addresses into",
                        index: first,
                        source: crate::cmd::CmdError::Netlink {
                            request: command,
                            source,
                        },
                    });
                }
                Err(setelem::AdmitError::Unavailable(err)) => {
                    if !self
                        .inner
                        .netlink_warned
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::warn!(
                            error = %err,
                            "admitting addresses over netlink failed; using `nft -f` instead (about 20 ms per admission); logged once"
                        );
                    }
                }
            }
        }
        self.inner
            .runner
            .run(&nft::script(nft::admit_script(&self.inner.layout, items)))
            .await
            .map(drop)
            .map_err(|source| NetError::Egress {
                action: "admit addresses into",
                index: first,
                source,
            })
    }

    /// The [`Slot`] of an index adopted by [`new`](Self::new), once; `None`
    /// for any other index or when already taken. Release it like any slot.
    pub fn take_adopted(&self, index: u32) -> Option<Slot> {
        if self.inner.state().adopted.remove(&index) {
            self.inner.layout.slot(index)
        } else {
            None
        }
    }

    /// Current counts.
    pub fn stats(&self) -> PoolStats {
        let st = self.inner.state();
        PoolStats {
            warm: st.warm.len(),
            in_use: st.in_use.len(),
            busy: st
                .taken
                .len()
                .saturating_sub(st.warm.len() + st.in_use.len()),
        }
    }

    /// Waits until no background work (recycling, refilling) is running.
    pub async fn idle(&self) {
        let mut rx = self.inner.tasks.subscribe();
        // Only fails if the sender is gone, and `self` keeps it alive.
        let _ = rx.wait_for(|&n| n == 0).await;
    }

    /// For a node that stops while sandboxes may keep running: prepares no
    /// more slots, deletes the unused prepared ones, and when no slot is in
    /// use any more, removes everything like [`SlotPool::destroy`]. Slots in
    /// use and the nft table that guards them stay for the next start.
    pub async fn close(&self) -> Result<(), NetError> {
        self.inner
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.idle().await;
        let (unused, busy) = {
            let mut st = self.inner.state();
            let unused: Vec<Slot> = st.warm.drain(..).collect();
            for s in &unused {
                st.taken.remove(&s.index);
            }
            (unused, !st.in_use.is_empty())
        };
        if !busy {
            return self.destroy().await;
        }
        let mut first_error = None;
        for slot in unused {
            if let Err(e) =
                ops::delete_slot(&*self.inner.runner, &self.inner.layout, slot.index).await
            {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Removes everything the pool's names cover: every netns `{prefix}-N`
    /// and veth `{prefix}Nh` (in use or not) and the nft table. Waits for
    /// background work first. Keeps going after a failure and returns the
    /// first one. `net.ipv4.ip_forward` is left as it is: something else
    /// on the host may rely on it by now.
    pub async fn destroy(&self) -> Result<(), NetError> {
        self.idle().await;
        let inner = &self.inner;
        let mut first_error = None;
        match ops::list_ours(&*inner.runner, &inner.layout).await {
            Ok(found) => {
                for index in found.all() {
                    if let Err(e) = ops::delete_slot(&*inner.runner, &inner.layout, index).await {
                        tracing::warn!(index, error = %chain(&e), "destroy: slot not deleted");
                        first_error.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                first_error.get_or_insert(NetError::List(e));
            }
        }
        if let Err(source) = inner.runner.run(&nft::delete(&inner.layout)).await {
            first_error.get_or_insert(NetError::DeleteTable {
                table: inner.layout.table().to_owned(),
                source,
            });
        }
        *inner.state() = State::default();
        match first_error {
            None => {
                tracing::info!(
                    prefix = inner.layout.prefix(),
                    "network slot pool destroyed"
                );
                Ok(())
            }
            Some(e) => Err(e),
        }
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `fut` in the background, counted for [`SlotPool::idle`].
    fn spawn(self: &Arc<Self>, fut: impl Future<Output = ()> + Send + 'static) {
        self.tasks.send_modify(|n| *n += 1);
        let guard = TaskGuard(Arc::clone(self));
        self.handle.spawn(async move {
            let _guard = guard;
            fut.await;
        });
    }

    /// Starts preparing slots until warm + preparing reaches the target.
    fn refill(self: &Arc<Self>) {
        loop {
            let index = {
                let mut st = self.state();
                if st.warm.len() + st.preparing >= self.warm_target
                    || self.closing.load(std::sync::atomic::Ordering::SeqCst)
                {
                    return;
                }
                let Some(index) = st.reserve(self.layout.slots()) else {
                    tracing::debug!("warm queue not refilled: no free index");
                    return;
                };
                st.preparing += 1;
                index
            };
            let inner = Arc::clone(self);
            self.spawn(async move { inner.prepare_warm(index).await });
        }
    }

    /// Creates slot `index` (reserved, counted in `preparing`) for the warm queue.
    async fn prepare_warm(&self, index: u32) {
        let started = Instant::now();
        let result = ops::create_slot(&*self.runner, &self.layout, index).await;
        let mut st = self.state();
        st.preparing -= 1;
        match result {
            Ok(slot) => {
                st.warm.push_back(slot);
                drop(st);
                tracing::debug!(
                    index,
                    elapsed_ms = started.elapsed().as_millis(),
                    "network slot prepared"
                );
            }
            Err(e) => {
                st.taken.remove(&index);
                drop(st);
                tracing::warn!(index, error = %chain(&e), "network slot not prepared");
            }
        }
    }

    /// Deletes a released slot, then re-prepares or frees its index.
    async fn recycle(&self, index: u32) {
        let started = Instant::now();
        // Its egress rules go first, so the index's next owner starts with
        // none; the index stays taken if they cannot be removed.
        let clear = nft::script(nft::clear_slot_script(&self.layout, index));
        if let Err(e) = self.runner.run(&clear).await {
            let e = NetError::Egress {
                action: "remove",
                index,
                source: e,
            };
            tracing::error!(index, error = %chain(&e), "egress rules of a released network slot not removed; its index is quarantined until restart");
            return;
        }
        self.state().egress.remove(&index);
        if let Err(e) = ops::delete_slot(&*self.runner, &self.layout, index).await {
            tracing::error!(index, error = %chain(&e), "released network slot not deleted; its index is quarantined until restart");
            return;
        }
        tracing::debug!(
            index,
            elapsed_ms = started.elapsed().as_millis(),
            "network slot deleted"
        );
        let recreate = {
            let mut st = self.state();
            if st.warm.len() + st.preparing < self.warm_target
                && !self.closing.load(std::sync::atomic::Ordering::SeqCst)
            {
                st.preparing += 1;
                true
            } else {
                st.taken.remove(&index);
                false
            }
        };
        if recreate {
            self.prepare_warm(index).await;
        }
    }
}

/// Decrements the task count when a background task ends, even by panic.
struct TaskGuard(Arc<Inner>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.tasks.send_modify(|n| *n -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::RecordingRunner;

    fn config(cidr: &str, warm: usize) -> NetConfig {
        NetConfig {
            cidr: cidr.into(),
            name_prefix: "arcatu".into(),
            warm_slots: warm,
            nft_table: "arcatu".into(),
            egress: Default::default(),
        }
    }

    fn creates(index: u32) -> [String; 2] {
        let h = format!("arcatu{index}h");
        let ns = format!("arcatu-{index}");
        let (host, sandbox) = (4 * index + 1, 4 * index + 2);
        [
            format!(
                "ip -batch - [netns add {ns}; link add {h} type veth peer name eth0 netns {ns}; \
                 addr add 10.99.9.{host}/30 dev {h}; link set {h} up]"
            ),
            format!(
                "ip -n {ns} -batch - [addr add 10.99.9.{sandbox}/30 dev eth0; link set eth0 up; \
                 link set lo up; route add default via 10.99.9.{host}]"
            ),
        ]
    }

    fn deletes(index: u32) -> [String; 2] {
        [
            format!("ip link del arcatu{index}h"),
            format!("ip netns del arcatu-{index}"),
        ]
    }

    /// What a release runs: the slot's egress rules go, then the slot.
    fn releases(index: u32) -> Vec<String> {
        let layout = Layout::new(&config("10.99.9.0/24", 0)).unwrap();
        let mut v = vec![nft::script(nft::clear_slot_script(&layout, index)).to_string()];
        v.extend(deletes(index));
        v
    }

    #[tokio::test]
    async fn new_enables_forwarding_installs_nft_clears_stale_and_warms_up() {
        let r = Arc::new(RecordingRunner::new());
        r.respond("ip netns list", "arcatu-1 (id: 0)\narcatu-2\nother-1\n");
        r.respond(
            "ip -o link show",
            "1: lo: <LOOPBACK>\n9: arcatu1h@if2: <UP>\n10: arcatu5h@if2: <UP>\n",
        );
        let pool = SlotPool::with_runner(config("10.99.9.0/24", 2), &[2], &[], r.clone())
            .await
            .unwrap();
        let lines = r.lines();
        assert_eq!(lines[0], "sysctl net.ipv4.ip_forward=1");
        assert!(
            lines[1].starts_with(
                "nft -f - [table inet arcatu; delete table inet arcatu; table inet arcatu {"
            ),
            "{}",
            lines[1]
        );
        let mut expected = vec!["ip netns list".to_owned(), "ip -o link show".to_owned()];
        // Stale 1 and 5 go, adopted 2 stays; warm slots take the lowest free indexes.
        expected.extend(deletes(1));
        expected.extend(deletes(5));
        expected.extend(creates(0));
        expected.extend(creates(1));
        assert_eq!(lines[2..], expected);
        assert_eq!(
            pool.stats(),
            PoolStats {
                warm: 2,
                in_use: 1,
                busy: 0
            }
        );

        let adopted = pool.take_adopted(2).unwrap();
        assert_eq!(adopted.host_ifname, "arcatu2h");
        assert_eq!(pool.take_adopted(2), None);
        assert_eq!(pool.take_adopted(0), None);
    }

    #[tokio::test]
    async fn acquire_takes_warm_slots_and_refills_in_the_background() {
        let r = Arc::new(RecordingRunner::new());
        let pool = SlotPool::with_runner(config("10.99.9.0/24", 1), &[], &[], r.clone())
            .await
            .unwrap();
        r.clear();
        let a = pool.acquire().await.unwrap();
        assert_eq!(a.index, 0);
        pool.idle().await;
        assert_eq!(r.lines(), creates(1));
        assert_eq!(
            pool.stats(),
            PoolStats {
                warm: 1,
                in_use: 1,
                busy: 0
            }
        );
    }

    #[tokio::test]
    async fn exhaustion_is_an_error_and_recycling_indexes_are_not_reused_early() {
        let r = Arc::new(RecordingRunner::new());
        let pool = SlotPool::with_runner(config("10.99.9.0/29", 0), &[], &[], r.clone())
            .await
            .unwrap();
        let a = pool.acquire().await.unwrap();
        let b = pool.acquire().await.unwrap();
        assert_eq!((a.index, b.index), (0, 1));
        let err = pool.acquire().await.unwrap_err();
        assert!(
            matches!(err, NetError::Exhausted { slots: 2, .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "no free network slot: all 2 /30 subnets of 10.99.9.0/29 are taken; use a larger cidr"
        );
        // Released but not yet deleted: still not available.
        pool.release(a);
        assert!(matches!(
            pool.acquire().await,
            Err(NetError::Exhausted { .. })
        ));
        pool.idle().await;
        r.clear();
        let again = pool.acquire().await.unwrap();
        assert_eq!(again.index, 0);
        assert_eq!(r.lines(), creates(0));
        assert_eq!(
            pool.stats(),
            PoolStats {
                warm: 0,
                in_use: 2,
                busy: 0
            }
        );
    }

    #[tokio::test]
    async fn release_deletes_then_reprepares_only_while_the_queue_is_short() {
        // Queue full (slot 1 is warm): the released index is deleted and freed.
        let r = Arc::new(RecordingRunner::new());
        let pool = SlotPool::with_runner(config("10.99.9.0/28", 1), &[], &[], r.clone())
            .await
            .unwrap();
        let a = pool.acquire().await.unwrap(); // 0; refill makes 1
        pool.idle().await;
        r.clear();
        pool.release(a);
        pool.idle().await;
        assert_eq!(r.lines(), releases(0));
        assert_eq!(
            pool.stats(),
            PoolStats {
                warm: 1,
                in_use: 0,
                busy: 0
            }
        );

        // Queue short (no index free to refill it): the index is re-prepared.
        let r = Arc::new(RecordingRunner::new());
        let pool = SlotPool::with_runner(config("10.99.9.0/29", 2), &[], &[], r.clone())
            .await
            .unwrap();
        let a = pool.acquire().await.unwrap();
        assert_eq!(a.index, 0);
        pool.idle().await;
        assert_eq!(
            pool.stats(),
            PoolStats {
                warm: 1,
                in_use: 1,
                busy: 0
            }
        );
        r.clear();
        pool.release(a);
        assert_eq!(
            pool.stats(),
            PoolStats {
                warm: 1,
                in_use: 0,
                busy: 1
            }
        );
        pool.idle().await;
        let mut expected = releases(0);
        expected.extend(creates(0));
        assert_eq!(r.lines(), expected);
        assert_eq!(
            pool.stats(),
            PoolStats {
                warm: 2,
                in_use: 0,
                busy: 0
            }
        );
    }

    #[tokio::test]
    async fn releasing_twice_or_a_foreign_slot_is_ignored() {
        let r = Arc::new(RecordingRunner::new());
        let pool = SlotPool::with_runner(config("10.99.9.0/24", 0), &[], &[], r.clone())
            .await
            .unwrap();
        let a = pool.acquire().await.unwrap();
        let twin = Layout::new(&config("10.99.9.0/24", 0))
            .unwrap()
            .slot(0)
            .unwrap();
        let mut foreign = Layout::new(&config("10.99.9.0/24", 0))
            .unwrap()
            .slot(0)
            .unwrap();
        foreign.netns_name = "other-0".into();
        pool.release(foreign);
        assert_eq!(pool.stats().in_use, 1);
        pool.release(a);
        pool.idle().await;
        r.clear();
        pool.release(twin);
        pool.idle().await;
        assert!(r.lines().is_empty());
    }

    #[tokio::test]
    async fn bad_adoption_and_config_touch_nothing() {
        let r = Arc::new(RecordingRunner::new());
        let err = SlotPool::with_runner(config("10.99.9.0/30", 0), &[1], &[], r.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                NetError::Config(ConfigError::AdoptOutOfRange { index: 1, slots: 1 })
            ),
            "{err:?}"
        );
        let err = SlotPool::with_runner(config("10.99.9.1/24", 0), &[], &[], r.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(err, NetError::Config(ConfigError::Cidr { .. })),
            "{err:?}"
        );
        assert!(r.lines().is_empty());
    }

    #[tokio::test]
    async fn destroy_deletes_what_is_listed_and_the_table() {
        let r = Arc::new(RecordingRunner::new());
        let pool = SlotPool::with_runner(config("10.99.9.0/24", 0), &[], &[], r.clone())
            .await
            .unwrap();
        r.respond("ip netns list", "arcatu-0\narcatu-3\n");
        r.respond("ip -o link show", "5: arcatu0h@if2: <UP>\n");
        r.clear();
        pool.destroy().await.unwrap();
        let mut expected = vec!["ip netns list".to_owned(), "ip -o link show".to_owned()];
        expected.extend(deletes(0));
        expected.extend(deletes(3));
        expected.push("nft -f - [table inet arcatu; delete table inet arcatu]".into());
        assert_eq!(r.lines(), expected);
    }

    #[tokio::test]
    async fn destroy_keeps_going_after_a_failure() {
        let r = Arc::new(RecordingRunner::new());
        let pool = SlotPool::with_runner(config("10.99.9.0/24", 0), &[], &[], r.clone())
            .await
            .unwrap();
        r.respond("ip netns list", "arcatu-0\narcatu-1\n");
        r.fail("ip netns del arcatu-0", "Device or resource busy");
        r.clear();
        let err = pool.destroy().await.unwrap_err();
        assert!(
            matches!(err, NetError::DeleteSlot { index: 0, .. }),
            "{err:?}"
        );
        assert!(r.lines().contains(&"ip netns del arcatu-1".to_owned()));
        assert!(r.lines().last().unwrap().starts_with("nft -f -"));
    }
}
