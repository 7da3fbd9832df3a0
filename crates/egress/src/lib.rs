//! `arca-egress`: what makes domain entries in a sandbox's `allowOut` work
//! (ADR 0005 sections 2 and 3).
//!
//! The firewall only knows addresses, but users allow names. This crate
//! closes the gap with three listeners in the node process:
//!
//! - **A DNS forwarder** (UDP and TCP). Every sandbox's resolver is the
//!   node, and in deny-all mode all of its port-53 traffic is redirected
//!   here anyway. Names outside the allow list get NXDOMAIN without any
//!   query leaving the node, so DNS cannot smuggle data out. For allowed
//!   names the A answers (following CNAMEs from the queried name) are
//!   *admitted*: the node puts them into the sandbox's timeout set for as
//!   long as the answer's TTL (clamped to 60 s .. 1 h), and only then does
//!   the reply go back, so the first connection does not race the commit.
//!   Answers pointing into loopback, link-local, the sandbox pool or the
//!   host are dropped (DNS rebinding); "the host" is checked per answer
//!   (can a UDP socket bind the address right now?), so addresses a new
//!   bridge or NIC got after start count too.
//! - **A TLS listener** and **an HTTP listener**. In deny-all mode the
//!   firewall redirects connections to admitted addresses on ports 443 and
//!   80 here. A connection goes on only if the name it uses (SNI, or the
//!   Host of every HTTP request) is allowed **and** its destination was
//!   admitted for that very name, so a shared CDN address admitted for
//!   `allowed.test` does not carry `denied.test`. Right before dialling,
//!   the destination is checked again against the forbidden networks and
//!   this host's current addresses (refused: reset or 403, logged as
//!   "destination is this host or forbidden"), whatever was admitted.
//!   HTTP upgrades other than a lone `Upgrade: websocket` (`h2c` above
//!   all, whose HTTP/2 streams could carry any `:authority`) get a 403.
//!
//! The listeners are reached only through nft `redirect` from sandbox
//! veths (the node's input rules drop anything else), find the sandbox by
//! the source address, which the reverse-path check makes unforgeable,
//! and learn a redirected connection's real destination from
//! `SO_ORIGINAL_DST`. Everything they decide goes to the sandbox's egress
//! log. The node provides sandbox lookup, the firewall commit and the log
//! through [`Enforcer`].
//!
//! What this does not do, by design: it never terminates TLS; it admits
//! nothing for AAAA, SVCB or HTTPS records, nor for names found any other
//! way (`/etc/hosts`, DNS-over-HTTPS), since only this forwarder's A
//! answers reach the firewall set; and domain entries open ports 80 and
//! 443 only, which are the only ports the firewall redirects here.
//!
//! # What a name check cannot see: ECH and domain fronting
//!
//! Because TLS is not terminated, the TLS check sees only the ClientHello's
//! SNI, and what it guarantees is "this connection goes to an address
//! admitted for an allowed name, and names that name in clear". It does
//! **not** guarantee which site the client talks to inside TLS:
//!
//! - **Domain fronting.** A client may put an allowed name in the SNI and
//!   another one in the HTTP `Host` header inside the encrypted stream. A
//!   server that hosts both (a CDN or shared front end serving the allowed
//!   name from the same address) may well serve the other one. So allowing
//!   a name served by a shared CDN can open every site fronted by the same
//!   CDN addresses, as far as that CDN lets fronting happen. An `allowOut`
//!   CIDR rule covering CDN addresses is no different: it lets through
//!   anything those addresses serve.
//! - **ECH** (Encrypted Client Hello). With ECH the real server name is
//!   encrypted and the SNI holds only the outer, public name (often the
//!   CDN's). The listener checks that outer name; if it is allowed and was
//!   resolved to the destination, the connection passes, whatever the inner
//!   name. The forwarder returns empty HTTPS/SVCB answers, so clients get
//!   no ECH keys through it, but a client can have them from elsewhere.
//!   [`EgressConfig::refuse_ech`] refuses every ClientHello carrying the
//!   ECH extension; it is off by default because browsers built on
//!   BoringSSL send a look-alike "GREASE" ECH extension on every
//!   connection, which would be refused too.
//!
//! Plain HTTP has no such gap: the `Host` of every request is checked.
//!
//! Limits: 256 proxied connections per sandbox and 8000 per node (over
//! that, resets); 64 DNS queries in flight per sandbox and 1024 per node
//! (over that, dropped: the client retries). Admissions last the answer's
//! smallest TTL, clamped to 60 s .. 1 h. A sandbox holds at most
//! [`MAX_ADMITTED_ADDRS_PER_SANDBOX`] admitted addresses and
//! [`MAX_ADMITTED_NAMES_PER_SANDBOX`] (name, address) bindings (a wildcard
//! entry over a zone the sandbox controls could otherwise grow them
//! without bound): A records over that are left out of the answer, which
//! is SERVFAIL when none is left, logged as "too many admitted addresses"
//! (or "names"). Nothing admitted is evicted to make room, since the
//! firewall keeps an element until its timeout anyway; expired admissions
//! are dropped every 30 s and whenever the sandbox's next answer comes.
//!
//! ```no_run
//! use std::sync::Arc;
//! use arca_egress::{Egress, EgressConfig, Enforcer};
//!
//! async fn run(enforcer: Arc<dyn Enforcer>) -> std::io::Result<()> {
//!     let config = EgressConfig {
//!         host_resolvers: vec!["127.0.0.53:53".parse().unwrap()],
//!         ..EgressConfig::default()
//!     };
//!     let egress = Egress::start(config, enforcer).await?;
//!     let (dns, tls, http) = egress.local_ports();
//!     println!("dns {dns}, tls {tls}, http {http}");
//!     egress.shutdown().await;
//!     Ok(())
//! }
//! ```
#![forbid(unsafe_code)]

mod admissions;
mod check;
mod config;
mod conns;
mod dns;
mod enforcer;
mod http;
mod sni;
mod tls;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arca_proto::network::{EgressLogEntry, EgressPolicy};
use arca_proto::node::SandboxId;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use arca_proto::network::Ipv4Net;
pub use config::{
    DEFAULT_DNS_PORT, DEFAULT_HTTP_PORT, DEFAULT_TLS_PORT, EgressConfig, MAX_ADMISSION_SECS,
    MAX_ADMITTED_ADDRS_PER_SANDBOX, MAX_ADMITTED_NAMES_PER_SANDBOX, MAX_CNAME_LINKS, MAX_CONNS,
    MAX_CONNS_PER_SANDBOX, MAX_DNS_CONNS, MAX_DNS_CONNS_PER_SANDBOX, MAX_QUERIES,
    MAX_QUERIES_PER_SANDBOX, MIN_ADMISSION_SECS,
};
pub use enforcer::{Admission, AdmittedAddr, Enforcer, SandboxView};

use admissions::{AdmissionTable, Admitter};
use config::Tuning;
use conns::{ConnTracker, Quota};

/// How often expired admissions are dropped from memory.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// At most one warning per this many seconds; sandboxes can trigger the
/// conditions warned about at will (STYLE 8: rate-limit what untrusted
/// code can trigger). The others go to debug.
const WARN_EVERY_SECS: u64 = 10;

/// State every listener task shares.
pub(crate) struct Shared {
    pub(crate) config: EgressConfig,
    pub(crate) tuning: Tuning,
    pub(crate) enforcer: Arc<dyn Enforcer>,
    pub(crate) admissions: AdmissionTable,
    pub(crate) admitter: Admitter,
    pub(crate) conns: ConnTracker,
    pub(crate) queries: Quota,
    pub(crate) dns_conns: Quota,
    /// The last source address each sandbox was seen at, so
    /// [`Egress::policy_changed`] can ask the node for the new policy.
    sources: Mutex<HashMap<SandboxId, Ipv4Addr>>,
    /// Cancelled by [`Egress::shutdown`]; every connection's token is a
    /// child.
    pub(crate) shutdown: CancellationToken,
    /// When the listeners started, the clock of `last_warn`.
    started: Instant,
    /// Seconds after `started` (plus one) of the last warning; 0: none yet.
    last_warn: AtomicU64,
}

impl Shared {
    /// The sandbox at `source`, remembering where it was seen.
    pub(crate) fn sandbox(&self, source: Ipv4Addr) -> Option<SandboxView> {
        let view = self.enforcer.sandbox(source)?;
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if sources.get(&view.id) != Some(&source) {
            sources.insert(view.id.clone(), source);
        }
        Some(view)
    }

    /// The current view of a sandbox seen before, by id.
    fn sandbox_by_id(&self, id: &SandboxId) -> Option<SandboxView> {
        let source = *self
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)?;
        self.enforcer.sandbox(source).filter(|v| &v.id == id)
    }

    /// Whether a warning may be logged now (see [`WARN_EVERY_SECS`]).
    pub(crate) fn may_warn(&self) -> bool {
        let now = self.started.elapsed().as_secs() + 1;
        let last = self.last_warn.load(Ordering::Relaxed);
        (last == 0 || now >= last + WARN_EVERY_SECS)
            && self
                .last_warn
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Writes one entry to a sandbox's egress log.
    pub(crate) fn record(&self, sandbox: &SandboxId, entry: EgressLogEntry) {
        self.enforcer.record(sandbox, entry);
    }

    /// Whether `addr` may never be admitted or dialled: a forbidden network
    /// or, right now, an address of this host. Checked again at every dial
    /// and every answer, since addresses admitted earlier (or restored)
    /// may have become the host's since (a new bridge or NIC).
    pub(crate) fn off_limits(&self, addr: Ipv4Addr) -> bool {
        self.config.is_forbidden(addr) || (self.tuning.is_host_addr)(addr)
    }

    /// Where a sandbox's queries go.
    pub(crate) fn upstreams(&self, policy: &EgressPolicy) -> Vec<SocketAddr> {
        dns::forwarder::upstreams_for(
            &policy.dns_servers,
            self.tuning.upstream_port,
            &self.config.host_resolvers,
        )
    }
}

/// Closes a connection with a reset (`SO_LINGER` 0), so the client fails
/// at once.
pub(crate) fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// The running listeners. Clones share them; call [`Egress::shutdown`] to
/// stop them (dropping does not).
#[derive(Clone)]
pub struct Egress {
    shared: Arc<Shared>,
    ports: (u16, u16, u16),
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Egress {
    /// Binds the DNS forwarder (UDP and TCP), the TLS and the HTTP listener
    /// on `config.bind` and starts serving. Must be called inside a tokio
    /// runtime.
    pub async fn start(config: EgressConfig, enforcer: Arc<dyn Enforcer>) -> io::Result<Egress> {
        Egress::start_with(config, enforcer, Tuning::default()).await
    }

    pub(crate) async fn start_with(
        config: EgressConfig,
        enforcer: Arc<dyn Enforcer>,
        tuning: Tuning,
    ) -> io::Result<Egress> {
        let (udp, dns_tcp) = bind_dns(config.bind, config.dns_port).await?;
        let tls = TcpListener::bind(SocketAddrV4::new(config.bind, config.tls_port)).await?;
        let http = TcpListener::bind(SocketAddrV4::new(config.bind, config.http_port)).await?;
        let ports = (
            udp.local_addr()?.port(),
            tls.local_addr()?.port(),
            http.local_addr()?.port(),
        );
        let (admitter, admit_task) = Admitter::spawn(enforcer.clone());
        let shared = Arc::new(Shared {
            conns: ConnTracker::new(tuning.max_conns_per_sandbox, tuning.max_conns),
            queries: Quota::new(tuning.max_queries_per_sandbox, tuning.max_queries),
            dns_conns: Quota::new(tuning.max_dns_conns_per_sandbox, tuning.max_dns_conns),
            admissions: AdmissionTable::new(tuning.max_admitted_addrs, tuning.max_admitted_names),
            config,
            tuning,
            enforcer,
            admitter,
            sources: Mutex::default(),
            shutdown: CancellationToken::new(),
            started: Instant::now(),
            last_warn: AtomicU64::new(0),
        });
        let sweeper = {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                loop {
                    tokio::select! {
                        _ = tick.tick() => shared.admissions.sweep(Instant::now()),
                        () = shared.shutdown.cancelled() => return,
                    }
                }
            })
        };
        let tasks = vec![
            tokio::spawn(dns::serve_udp(udp, shared.clone())),
            tokio::spawn(dns::serve_tcp(dns_tcp, shared.clone())),
            tokio::spawn(accept_loop(tls, shared.clone(), tls::handle)),
            tokio::spawn(accept_loop(http, shared.clone(), http::handle)),
            sweeper,
            admit_task,
        ];
        tracing::info!(
            dns = ports.0,
            tls = ports.1,
            http = ports.2,
            "egress listeners started"
        );
        Ok(Egress {
            shared,
            ports,
            tasks: Arc::new(Mutex::new(tasks)),
        })
    }

    /// The DNS, TLS and HTTP ports as bound (useful with port 0).
    pub fn local_ports(&self) -> (u16, u16, u16) {
        self.ports
    }

    /// Names and addresses admitted for a sandbox, with their expiry, sorted
    /// by name then address. The node re-adds them after replacing the
    /// sandbox's rules and saves them across restarts.
    pub fn admissions(&self, sandbox: &SandboxId) -> Vec<AdmittedAddr> {
        self.shared.admissions.list(sandbox)
    }

    /// Takes back admissions saved before a node restart (the node has put
    /// the addresses back into the firewall). Expired entries, addresses
    /// no answer may admit and, over the per-sandbox limits, the entries
    /// closest to their end are ignored.
    pub fn restore(&self, sandbox: &SandboxId, entries: Vec<AdmittedAddr>) {
        let entries = entries
            .into_iter()
            .filter(|e| !self.shared.off_limits(e.addr))
            .collect();
        self.shared.admissions.restore(sandbox, entries);
    }

    /// The sandbox's policy changed: drops admissions whose name is no
    /// longer allowed and closes its proxied TLS/HTTP connections that are
    /// no longer allowed. Call it once [`Enforcer::sandbox`] returns the new
    /// policy.
    ///
    /// The policy is looked up at the address the sandbox was last seen at.
    /// A sandbox not seen since this process started (admissions only
    /// restored) has nothing to close, and its restored admissions stay
    /// until they expire; that is harmless, because every check also asks
    /// the current policy whether the name is allowed.
    pub fn policy_changed(&self, sandbox: &SandboxId) {
        let Some(view) = self.shared.sandbox_by_id(sandbox) else {
            tracing::debug!(sandbox_id = %sandbox, "policy changed for a sandbox not seen yet");
            return;
        };
        let policy = &view.policy;
        let dropped = self
            .shared
            .admissions
            .retain_names(sandbox, |n| policy.allows_name(n));
        let closed = self.shared.conns.recheck(sandbox, policy, |addr, name| {
            self.shared.admissions.is_admitted(sandbox, addr, name)
        });
        tracing::debug!(sandbox_id = %sandbox, dropped, closed, "egress policy re-applied");
    }

    /// The sandbox is gone: forgets its admissions and closes its proxied
    /// connections.
    pub fn forget(&self, sandbox: &SandboxId) {
        self.shared.admissions.forget(sandbox);
        self.shared.conns.close_all(sandbox);
        self.shared
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(sandbox);
    }

    /// Stops the listeners and closes every proxied connection. Queries
    /// being answered may still finish.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            // The admission task ends only when every sender is gone; stop it.
            task.abort();
            let _ = task.await;
        }
    }
}

/// Binds UDP and TCP on the same DNS port; with port 0, retries until a
/// free UDP port is also free for TCP.
async fn bind_dns(bind: Ipv4Addr, port: u16) -> io::Result<(UdpSocket, TcpListener)> {
    if port != 0 {
        let addr = SocketAddrV4::new(bind, port);
        return Ok((UdpSocket::bind(addr).await?, TcpListener::bind(addr).await?));
    }
    let mut last = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(SocketAddrV4::new(bind, 0)).await?;
        let port = udp.local_addr()?.port();
        match TcpListener::bind(SocketAddrV4::new(bind, port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free port for DNS")))
}

/// Accepts connections until shutdown, each handled in its own task.
async fn accept_loop<F, Fut>(listener: TcpListener, shared: Arc<Shared>, handle: F)
where
    F: Fn(TcpStream, SocketAddr, Arc<Shared>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shared.shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(handle(stream, peer, shared.clone()));
            }
            Err(e) => {
                tracing::debug!(err = %e, "accept failed");
                // Out of descriptors and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
