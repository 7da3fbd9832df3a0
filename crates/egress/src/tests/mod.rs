//! Listener tests on loopback: a fake node ([`FakeEnforcer`]), a fake
//! upstream resolver ([`FakeUpstream`]) and the listeners started with
//! test seams (original destination and dialling are injected, since
//! `SO_ORIGINAL_DST` needs an nft redirect). Nothing leaves 127.0.0.0/8.

mod dns;
mod http;
mod tls;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arca_proto::network::{EgressLogEntry, EgressPolicy, NetworkSpec, Verdict};
use arca_proto::node::{BoxFuture, SandboxId};
use tokio::net::{TcpListener, UdpSocket};

use crate::config::Tuning;
use crate::dns::upstream::{read_framed, write_framed};
use crate::dns::wire::{Message, Record, flag, rcode};
use crate::{Admission, Egress, EgressConfig, Enforcer, SandboxView};

/// The address tests' sandboxes pretend their names resolve to (a
/// benchmark range, routed nowhere; the dial seam maps it to loopback).
pub(crate) const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The test sandbox's source address.
pub(crate) const SANDBOX_IP: Ipv4Addr = Ipv4Addr::LOCALHOST;

pub(crate) fn sandbox_id() -> SandboxId {
    SandboxId::parse("sbx1").unwrap()
}

/// A deny-all policy allowing `domains`.
pub(crate) fn deny_all(domains: &[&str]) -> EgressPolicy {
    EgressPolicy::compile(
        &NetworkSpec {
            allow_out: domains.iter().map(|s| s.to_string()).collect(),
            deny_out: vec!["0.0.0.0/0".into()],
            dns_servers: vec![],
        },
        true,
    )
    .unwrap()
}

/// The node, as tests see it: sandboxes by address, a record of admit
/// calls and log entries.
#[derive(Default)]
pub(crate) struct FakeEnforcer {
    sandboxes: Mutex<HashMap<Ipv4Addr, SandboxView>>,
    pub(crate) admits: Mutex<Vec<Vec<Admission>>>,
    pub(crate) fail_admit: AtomicBool,
    pub(crate) admit_delay: Mutex<Duration>,
    pub(crate) log: Mutex<Vec<(SandboxId, EgressLogEntry)>>,
}

impl FakeEnforcer {
    pub(crate) fn set(&self, source: Ipv4Addr, id: &SandboxId, policy: EgressPolicy) {
        self.sandboxes.lock().unwrap().insert(
            source,
            SandboxView {
                id: id.clone(),
                policy: Arc::new(policy),
            },
        );
    }

    /// Log entries of `protocol`.
    pub(crate) fn entries(&self, protocol: &str) -> Vec<EgressLogEntry> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| e.protocol == protocol)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Whether a log entry of `protocol` with `verdict` and `rule` exists.
    pub(crate) fn logged(&self, protocol: &str, verdict: Verdict, rule: &str) -> bool {
        self.entries(protocol)
            .iter()
            .any(|e| e.verdict == verdict && e.rule == rule)
    }

    pub(crate) fn admit_calls(&self) -> Vec<Vec<Admission>> {
        self.admits.lock().unwrap().clone()
    }
}

impl Enforcer for FakeEnforcer {
    fn sandbox(&self, source: Ipv4Addr) -> Option<SandboxView> {
        self.sandboxes.lock().unwrap().get(&source).cloned()
    }

    fn admit(&self, batch: Vec<Admission>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let delay = *self.admit_delay.lock().unwrap();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            self.admits.lock().unwrap().push(batch);
            if self.fail_admit.load(Ordering::SeqCst) {
                Err("nft: No such file or directory".into())
            } else {
                Ok(())
            }
        })
    }

    fn record(&self, sandbox: &SandboxId, entry: EgressLogEntry) {
        self.log.lock().unwrap().push((sandbox.clone(), entry));
    }
}

/// Zone of the fake resolver: (lowercase name, qtype) -> (rcode, answers).
type Zone = HashMap<(String, u16), (u8, Vec<Record>)>;

/// A resolver on 127.0.0.1 (UDP and TCP on one port) answering from a
/// zone, counting what it is asked.
pub(crate) struct FakeUpstream {
    pub(crate) addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    pub(crate) udp_queries: Arc<AtomicUsize>,
    pub(crate) tcp_queries: Arc<AtomicUsize>,
    pub(crate) received: Arc<Mutex<Vec<Message>>>,
    /// Answer every UDP query with an empty truncated reply.
    pub(crate) truncate_udp: Arc<AtomicBool>,
}

impl FakeUpstream {
    pub(crate) async fn start() -> FakeUpstream {
        let (udp, tcp) = crate::bind_dns(Ipv4Addr::LOCALHOST, 0).await.unwrap();
        let up = FakeUpstream {
            addr: udp.local_addr().unwrap(),
            zone: Arc::default(),
            udp_queries: Arc::default(),
            tcp_queries: Arc::default(),
            received: Arc::default(),
            truncate_udp: Arc::default(),
        };
        let (zone, count, received, truncate) = (
            up.zone.clone(),
            up.udp_queries.clone(),
            up.received.clone(),
            up.truncate_udp.clone(),
        );
        tokio::spawn(async move {
            let mut buf = vec![0; 65535];
            loop {
                let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let Ok(q) = Message::parse(&buf[..n]) else {
                    continue;
                };
                received.lock().unwrap().push(q.clone());
                let mut reply = answer_from(&zone, &q);
                if truncate.load(Ordering::SeqCst) {
                    reply.answers.clear();
                    reply.flags |= flag::TC;
                }
                let _ = udp.send_to(&reply.encode().unwrap(), from).await;
            }
        });
        let (zone, count, received) =
            (up.zone.clone(), up.tcp_queries.clone(), up.received.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = tcp.accept().await else {
                    return;
                };
                let (zone, count, received) = (zone.clone(), count.clone(), received.clone());
                tokio::spawn(async move {
                    while let Ok(q) = read_framed(&mut s).await {
                        count.fetch_add(1, Ordering::SeqCst);
                        let Ok(q) = Message::parse(&q) else {
                            return;
                        };
                        received.lock().unwrap().push(q.clone());
                        let reply = answer_from(&zone, &q).encode().unwrap();
                        if write_framed(&mut s, &reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        up
    }

    pub(crate) fn set(&self, name: &str, qtype: u16, records: Vec<Record>) {
        self.zone
            .lock()
            .unwrap()
            .insert((name.to_string(), qtype), (rcode::NOERROR, records));
    }

    pub(crate) fn queries(&self) -> usize {
        self.udp_queries.load(Ordering::SeqCst) + self.tcp_queries.load(Ordering::SeqCst)
    }
}

fn answer_from(zone: &Mutex<Zone>, q: &Message) -> Message {
    let key = (
        q.questions[0].name.to_hostname().unwrap_or_default(),
        q.questions[0].qtype,
    );
    match zone.lock().unwrap().get(&key) {
        Some((rc, records)) => {
            let mut m = Message::response_to(q, *rc);
            m.answers = records.clone();
            m
        }
        None => Message::response_to(q, rcode::NXDOMAIN),
    }
}

/// The listeners with a fake node and resolver.
pub(crate) struct Harness {
    pub(crate) egress: Egress,
    pub(crate) enforcer: Arc<FakeEnforcer>,
    pub(crate) upstream: FakeUpstream,
    /// What the listeners take as the original destination.
    pub(crate) original: Arc<Mutex<SocketAddrV4>>,
    /// Where dialling an original destination really goes.
    pub(crate) routes: Arc<Mutex<HashMap<SocketAddrV4, SocketAddrV4>>>,
    /// Addresses taken as this host's on top of the real ones (as if a
    /// NIC got them after start).
    pub(crate) host_addrs: Arc<Mutex<HashSet<Ipv4Addr>>>,
}

impl Harness {
    /// Starts everything; the sandbox `sbx1` at 127.0.0.1 has `policy`.
    pub(crate) async fn start(policy: EgressPolicy) -> Harness {
        Harness::start_with(policy, |_, _, _| {}).await
    }

    pub(crate) async fn start_with(
        policy: EgressPolicy,
        tweak: impl FnOnce(&mut EgressConfig, &mut Tuning, SocketAddr),
    ) -> Harness {
        let upstream = FakeUpstream::start().await;
        let enforcer = Arc::new(FakeEnforcer::default());
        enforcer.set(SANDBOX_IP, &sandbox_id(), policy);
        let original = Arc::new(Mutex::new(SocketAddrV4::new(REMOTE, 443)));
        let routes: Arc<Mutex<HashMap<SocketAddrV4, SocketAddrV4>>> = Arc::default();
        let mut config = EgressConfig {
            dns_port: 0,
            tls_port: 0,
            http_port: 0,
            bind: Ipv4Addr::LOCALHOST,
            host_resolvers: vec![upstream.addr],
            forbidden: vec![arca_proto::network::Ipv4Net::parse("10.99.0.0/16").unwrap()],
            refuse_ech: false,
        };
        let host_addrs: Arc<Mutex<HashSet<Ipv4Addr>>> = Arc::default();
        let mut tuning = Tuning {
            original_dst: {
                let original = original.clone();
                Arc::new(move |_| Ok(*original.lock().unwrap()))
            },
            dial: {
                let routes = routes.clone();
                Arc::new(move |dst| routes.lock().unwrap().get(&dst).copied().unwrap_or(dst))
            },
            is_host_addr: {
                let host_addrs = host_addrs.clone();
                let real = crate::config::host_addr_check();
                Arc::new(move |addr| host_addrs.lock().unwrap().contains(&addr) || real(addr))
            },
            upstream_timeout: Duration::from_millis(500),
            ..Tuning::default()
        };
        tweak(&mut config, &mut tuning, upstream.addr);
        let egress = Egress::start_with(config, enforcer.clone(), tuning)
            .await
            .unwrap();
        Harness {
            egress,
            enforcer,
            upstream,
            original,
            routes,
            host_addrs,
        }
    }

    pub(crate) fn dns_addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.egress.local_ports().0).into()
    }

    pub(crate) fn tls_addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.egress.local_ports().1).into()
    }

    pub(crate) fn http_addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.egress.local_ports().2).into()
    }

    /// Pretends redirected connections were going to `dst`, which is
    /// really served at `backend`.
    pub(crate) fn route(&self, dst: SocketAddrV4, backend: SocketAddr) {
        *self.original.lock().unwrap() = dst;
        let SocketAddr::V4(backend) = backend else {
            panic!("IPv4 backend expected");
        };
        self.routes.lock().unwrap().insert(dst, backend);
    }

    /// Asks the forwarder over UDP from `from`.
    pub(crate) async fn ask_from(&self, from: Ipv4Addr, q: &Message) -> Message {
        let sock = UdpSocket::bind((from, 0)).await.unwrap();
        sock.connect(self.dns_addr()).await.unwrap();
        sock.send(&q.encode().unwrap()).await.unwrap();
        let mut buf = vec![0; 65535];
        let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
            .await
            .expect("no DNS reply within 5 s")
            .unwrap();
        Message::parse(&buf[..n]).unwrap()
    }

    /// Pretends `addr` became an address of this host.
    pub(crate) fn make_host_addr(&self, addr: Ipv4Addr) {
        self.host_addrs.lock().unwrap().insert(addr);
    }

    /// Asks the forwarder over UDP as the sandbox.
    pub(crate) async fn ask(&self, q: &Message) -> Message {
        self.ask_from(SANDBOX_IP, q).await
    }
}

/// A TCP server echoing whatever it reads, on 127.0.0.1.
pub(crate) async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}
