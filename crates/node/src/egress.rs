//! Egress rules of this node's sandboxes (ADR 0005): what the firewall,
//! the DNS forwarder and the name checks of `arca-egress` learn from the
//! node, and the verdict log.
//!
//! - Each sandbox's [`EgressPolicy`] is compiled from its network settings
//!   and loaded into its slot's nft objects ([`Node::apply_egress`]) when
//!   it gets a slot: at create, resume and fork, before `/init` (and for a
//!   CRIU restore before the restored processes run). A warm sandbox is
//!   unrestricted until it is handed out, like a template build.
//! - `arca-egress` finds sandboxes by source address through
//!   [`NodeEnforcer`]; sources of the pool without a sandbox (warm
//!   sandboxes, template builds) get DNS without restriction.
//! - Addresses DNS admitted are kept in `dns.json` in the sandbox's
//!   directory, so a node restart puts them back with the rules.
//! - Verdicts the kernel logs (nflog) and those of the forwarder and the
//!   name checks go to the sandbox's bounded egress log.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use arca_egress::{Admission, AdmittedAddr, Enforcer, SandboxView};
use arca_net::SlotEgress;
use arca_proto::network::{EgressLogEntry, EgressPolicy, Ipv4Net, NetworkSpec};
use arca_proto::node::{BoxFuture, NodeError, SandboxId, SandboxSpec};
use serde::{Deserialize, Serialize};

use crate::{Inner, Instance, Node, lock};

/// Where a sandbox's DNS admissions are kept, in its directory.
const ADMISSIONS_FILE: &str = "dns.json";

/// The id under which sources of the pool without a sandbox are seen.
const UNASSIGNED: &str = "unassigned";

/// What the egress listeners ask of the node.
pub(crate) struct NodeEnforcer {
    pub(crate) inner: Arc<OnceLock<Weak<Inner>>>,
    pub(crate) pool: Ipv4Net,
}

impl NodeEnforcer {
    fn inner(&self) -> Option<Arc<Inner>> {
        self.inner.get().and_then(Weak::upgrade)
    }
}

impl Enforcer for NodeEnforcer {
    fn sandbox(&self, source: Ipv4Addr) -> Option<SandboxView> {
        let inner = self.inner()?;
        // What the kernel enforces for that address: known from before the
        // rules are loaded until after they are removed, so a sandbox being
        // created, restored or ended is never seen without its rules.
        match inner.slots.egress_of(source) {
            Some((id, policy)) => Some(SandboxView {
                id: SandboxId::parse(&id).ok()?,
                policy,
            }),
            // A warm sandbox or a template build: DNS like the host's.
            None if self.pool.contains(source) => Some(SandboxView {
                id: SandboxId::parse(UNASSIGNED).ok()?,
                policy: Arc::new(EgressPolicy::default()),
            }),
            None => None,
        }
    }

    fn admit(&self, batch: Vec<Admission>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let inner = self.inner().ok_or("the node is stopping")?;
            let mut items = Vec::with_capacity(batch.len());
            let mut ids: Vec<SandboxId> = Vec::new();
            for a in &batch {
                // The slot whose rules the forwarder judged by: known from
                // the load on, also while the sandbox is still booting.
                let Some(index) = inner.slots.egress_slot(a.sandbox.as_str()) else {
                    return Err(format!("sandbox {} has no egress rules loaded", a.sandbox));
                };
                items.push((index, a.addr, a.ttl));
                if !ids.contains(&a.sandbox) {
                    ids.push(a.sandbox.clone());
                }
            }
            inner
                .slots
                .admit(&items)
                .await
                .map_err(|e| crate::error_chain(&e))?;
            // Kept for a restart, once the forwarder has bound them to
            // their names (right after this returns); best effort: the
            // kernel has them now.
            let weak = Arc::downgrade(&inner);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Some(inner) = weak.upgrade() else { return };
                let Some(egress) = inner.egress.get() else {
                    return;
                };
                for id in ids {
                    let inst = lock(&inner.sandboxes).get(&id).cloned();
                    if let Some(inst) = inst {
                        save_admissions(&inst, &egress.admissions(&id));
                    }
                }
            });
            Ok(())
        })
    }

    fn record(&self, sandbox: &SandboxId, entry: EgressLogEntry) {
        let Some(inner) = self.inner() else { return };
        let inst = lock(&inner.sandboxes).get(sandbox).cloned();
        if let Some(inst) = inst {
            inst.egress_log.record(entry);
        }
    }
}

/// One admission as `dns.json` holds it.
#[derive(Serialize, Deserialize)]
struct SavedAdmission {
    name: String,
    addr: Ipv4Addr,
    /// Unix seconds.
    expires: u64,
}

fn save_admissions(inst: &Instance, kept: &[AdmittedAddr]) {
    let saved: Vec<SavedAdmission> = kept
        .iter()
        .map(|a| SavedAdmission {
            name: a.name.clone(),
            addr: a.addr,
            expires: a
                .expires
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
        .collect();
    let path = inst.dir.join(ADMISSIONS_FILE);
    let tmp = inst
        .dir
        .join(format!("{ADMISSIONS_FILE}.{}", crate::random_suffix()));
    let write = serde_json::to_vec(&saved)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = write {
        tracing::warn!(sandbox_id = %inst.spec.sandbox_id, error = %e, "cannot save DNS admissions");
    }
}

/// The unexpired admissions kept in a sandbox's directory.
pub(crate) fn load_admissions(dir: &std::path::Path) -> Vec<AdmittedAddr> {
    let Ok(bytes) = std::fs::read(dir.join(ADMISSIONS_FILE)) else {
        return Vec::new();
    };
    let saved: Vec<SavedAdmission> = serde_json::from_slice(&bytes).unwrap_or_default();
    let now = SystemTime::now();
    saved
        .into_iter()
        .map(|s| AdmittedAddr {
            name: s.name,
            addr: s.addr,
            expires: SystemTime::UNIX_EPOCH + Duration::from_secs(s.expires),
        })
        .filter(|a| a.expires > now)
        .collect()
}

/// `admitted` as the firewall takes it: addresses whose name the policy
/// still allows, with the time they have left.
fn firewall_admissions(
    policy: &EgressPolicy,
    admitted: &[AdmittedAddr],
) -> Vec<(Ipv4Addr, Duration)> {
    let now = SystemTime::now();
    let mut out: Vec<(Ipv4Addr, Duration)> = Vec::new();
    for a in admitted {
        if !policy.deny_all || (!a.name.is_empty() && !policy.allows_name(&a.name)) {
            continue;
        }
        let Ok(left) = a.expires.duration_since(now) else {
            continue;
        };
        match out.iter_mut().find(|(ip, _)| *ip == a.addr) {
            Some((_, l)) => *l = (*l).max(left),
            None => out.push((a.addr, left)),
        }
    }
    out
}

/// The compiled policy of a sandbox's settings; a stored setting that no
/// longer compiles (a newer check) denies everything rather than nothing.
pub(crate) fn compile(id: &SandboxId, network: &NetworkSpec, allow_internet: bool) -> EgressPolicy {
    EgressPolicy::compile(network, allow_internet).unwrap_or_else(|e| {
        tracing::error!(sandbox_id = %id, error = %e, "stored network settings do not compile; denying all egress");
        EgressPolicy::compile(&NetworkSpec::default(), false).unwrap_or_default()
    })
}

/// The host's resolvers, port 53: the node's forwarder asks them for
/// sandboxes without `dnsServers`.
pub(crate) fn host_resolvers() -> Vec<SocketAddr> {
    arca_net::host_nameservers()
        .into_iter()
        .map(|a| SocketAddr::from((a, 53)))
        .collect()
}

impl Node {
    /// Loads `network` as the egress rules of slot `index` for sandbox
    /// `id`, keeping DNS admissions of names still allowed. Returns the
    /// compiled policy.
    pub(crate) async fn apply_egress(
        &self,
        index: u32,
        id: &SandboxId,
        network: &NetworkSpec,
        allow_internet: bool,
        admitted: &[AdmittedAddr],
    ) -> Result<Arc<EgressPolicy>, NodeError> {
        let policy = EgressPolicy::compile(network, allow_internet)
            .map_err(|e| NodeError::InvalidInput(e.0))?;
        // The forwarder asks these from the host: none may be the host's
        // own sandboxes or a network the operator keeps sandboxes from.
        let net = &self.inner.config.net;
        let pool = Ipv4Net::parse(&net.cidr).ok();
        for server in &policy.dns_servers {
            let denied = pool.iter().any(|p| p.contains(*server))
                || net
                    .egress
                    .node_deny
                    .iter()
                    .filter_map(|d| Ipv4Net::parse(d).ok())
                    .any(|d| d.contains(*server));
            if denied {
                return Err(NodeError::InvalidInput(format!(
                    "network.dnsServers: {server} is a sandbox address or a network this node keeps sandboxes from"
                )));
            }
        }
        let egress = SlotEgress {
            sandbox_id: id.to_string(),
            admitted: firewall_admissions(&policy, admitted),
            policy,
        };
        self.inner
            .slots
            .set_egress(index, &egress)
            .await
            .map_err(|e| {
                NodeError::Internal(format!(
                    "loading the egress rules of sandbox {id}: {}",
                    crate::error_chain(&e)
                ))
            })?;
        Ok(Arc::new(egress.policy))
    }

    /// Loads the egress rules of `spec` (with the DNS admissions its
    /// sandbox still has) into slot `index`.
    pub(crate) async fn load_egress(
        &self,
        index: u32,
        spec: &SandboxSpec,
    ) -> Result<(), NodeError> {
        let admitted = self
            .inner
            .egress
            .get()
            .map(|e| e.admissions(&spec.sandbox_id))
            .unwrap_or_default();
        self.apply_egress(
            index,
            &spec.sandbox_id,
            &spec.network,
            spec.allow_internet_access,
            &admitted,
        )
        .await
        .map(drop)
    }

    /// [`NodeService::update_network`](arca_proto::node::NodeService::update_network).
    pub(crate) async fn update_network_of(
        &self,
        id: &SandboxId,
        network: NetworkSpec,
        allow_internet: bool,
    ) -> Result<(), NodeError> {
        let inst = self.instance(id)?;
        let _t = inst.transition.lock().await;
        if !lock(&self.inner.sandboxes).contains_key(id) {
            return Err(NodeError::SandboxNotFound(id.clone()));
        }
        if inst.is_paused() {
            return Err(NodeError::Conflict(format!(
                "sandbox {id} is paused; resume it before changing its network rules"
            )));
        }
        let index = inst
            .slot_index()
            .ok_or_else(|| NodeError::Conflict(format!("sandbox {id} has no network slot")))?;
        let admitted = self
            .inner
            .egress
            .get()
            .map(|e| e.admissions(id))
            .unwrap_or_default();
        let policy = self
            .apply_egress(index, id, &network, allow_internet, &admitted)
            .await?;
        // Addresses DNS admitted while the new rules were loading went
        // with the old set: put them back if their names stay allowed.
        if let Some(e) = self.inner.egress.get() {
            let late: Vec<AdmittedAddr> = e
                .admissions(id)
                .into_iter()
                .filter(|a| !admitted.iter().any(|b| b.addr == a.addr))
                .collect();
            let items: Vec<(u32, Ipv4Addr, Duration)> = firewall_admissions(&policy, &late)
                .into_iter()
                .map(|(ip, left)| (index, ip, left))
                .collect();
            if let Err(err) = self.inner.slots.admit(&items).await {
                tracing::warn!(sandbox_id = %id, error = %crate::error_chain(&err), "re-admitting addresses after a rule change");
            }
        }
        let (old_network, old_allow) = lock(&inst.network).clone();
        inst.set_network(network, allow_internet);
        if !inst.save_state() {
            // A restart would load the old rules: keep the old ones now.
            inst.set_network(old_network.clone(), old_allow);
            let _ = self
                .apply_egress(index, id, &old_network, old_allow, &admitted)
                .await;
            return Err(NodeError::Internal(format!(
                "sandbox {id}: cannot save its new network rules; the old ones stay"
            )));
        }
        if let Some(e) = self.inner.egress.get() {
            e.policy_changed(id);
        }
        inst.log("info", "network rules replaced");
        Ok(())
    }

    /// The slot egress of every adopted sandbox, for the pool's restart.
    pub(crate) fn adopted_egress<'a>(
        states: impl Iterator<Item = &'a (std::path::PathBuf, crate::state::StateFile)>,
    ) -> Vec<(u32, SlotEgress)> {
        states
            .filter_map(|(dir, st)| {
                let spec = st.spec.as_ref()?;
                let index = st.slot_index?;
                let policy = compile(&spec.sandbox_id, &spec.network, spec.allow_internet_access);
                let admitted = firewall_admissions(&policy, &load_admissions(dir));
                Some((
                    index,
                    SlotEgress {
                        sandbox_id: spec.sandbox_id.to_string(),
                        policy,
                        admitted,
                    },
                ))
            })
            .collect()
    }

    /// Reads the kernel's verdict log into the sandboxes' egress logs
    /// until the node goes away.
    pub(crate) fn spawn_nflog(&self, group: u16) {
        let mut reader = match arca_net::NflogReader::open(group) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(group, error = %e, "cannot read the firewall's verdict log; egress logs will hold DNS and name-check entries only");
                return;
            }
        };
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let packets = match reader.next().await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the firewall's verdict log");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let Some(inner) = weak.upgrade() else { return };
                for p in packets {
                    let mut words = p.prefix.split_whitespace();
                    let (Some(id), Some(letter)) = (words.next(), words.next()) else {
                        continue;
                    };
                    let Ok(id) = SandboxId::parse(id) else {
                        continue;
                    };
                    let Some(summary) = arca_net::parse_ipv4(&p.payload) else {
                        continue;
                    };
                    let when = p
                        .timestamp
                        .map_or_else(chrono::Utc::now, chrono::DateTime::<chrono::Utc>::from);
                    let Some(entry) = crate::egress_log::entry_from_nflog(letter, &summary, when)
                    else {
                        continue;
                    };
                    let inst = lock(&inner.sandboxes).get(&id).cloned();
                    if let Some(inst) = inst {
                        inst.egress_log.record(entry);
                    }
                }
            }
        });
    }
}
