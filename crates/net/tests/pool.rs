//! End-to-end tests of `SlotPool` on the real kernel: netns, veth pairs,
//! routes and the nft table, checked with real TCP connections.
//!
//! They need root. Without it they print why and pass, unless
//! `ARCA_TEST_PRIVILEGED=1` asks for them, then they fail.
//!
//! Each test has its own name prefix (`arcat` + 4 random letters), nft
//! table and `10.99.x.0/24` cidr, so tests run in parallel, and an [`Env`]
//! guard that deletes everything with its prefix even when the test fails.
//! Traffic only ever goes to addresses inside namespaces the test made.
//!
//! "Inside a slot" means a socket made by a thread that entered the slot's
//! netns with `setns` (the effect of `ip netns exec`, without depending on
//! any program inside); the thread ends right after, so the test's own
//! threads never change netns.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module,
    missing_docs
)]

use std::io::{self, Read as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use arca_net::{NetConfig, NetError, SlotEgress, SlotPool};
use arca_proto::network::{EgressPolicy, NetworkSpec};
use nix::sched::CloneFlags;
use rand::Rng as _;

/// How long a connection attempt may take before it counts as dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const ENVD_PORT: u16 = 49983;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            assert!(
                std::env::var("ARCA_TEST_PRIVILEGED").as_deref() != Ok("1"),
                "ARCA_TEST_PRIVILEGED=1 but not running as root"
            );
            eprintln!("skipped: arca-net end-to-end tests need root (netns, veth, nft)");
            return;
        }
    };
}

/// One test's names and addresses, and the cleanup of all of them.
struct Env {
    prefix: String,
    table: String,
    /// Third octet of the test's cidr `10.99.{octet}.0/24`.
    octet: u8,
    /// Host veth of the "remote" netns, if made.
    remote_link: Option<String>,
}

impl Env {
    fn new(octet: u8) -> Self {
        let mut rng = rand::rng();
        let tag: String = (0..4)
            .map(|_| char::from(rng.random_range(b'a'..=b'z')))
            .collect();
        let env = Self {
            prefix: format!("arcat{tag}"),
            table: format!("arcat_{tag}"),
            octet,
            remote_link: None,
        };
        // Leftovers of an earlier interrupted run can only collide by
        // address (names are random): the cidr routes would clash.
        assert!(
            !ip(&["-o", "addr", "show"]).contains(&format!("10.99.{octet}.")),
            "10.99.{octet}.0/24 is already in use on this host (left over from an interrupted run?)"
        );
        env
    }

    fn config(&self, warm_slots: usize) -> NetConfig {
        self.config_cidr(&format!("10.99.{}.0/24", self.octet), warm_slots)
    }

    fn config_cidr(&self, cidr: &str, warm_slots: usize) -> NetConfig {
        NetConfig {
            cidr: cidr.to_owned(),
            name_prefix: self.prefix.clone(),
            warm_slots,
            nft_table: self.table.clone(),
            egress: Default::default(),
        }
    }

    /// Netns names and link names starting with our prefix, and whether our table exists.
    fn leftovers(&self) -> (Vec<String>, Vec<String>, bool) {
        let netns = ip(&["netns", "list"])
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&self.prefix))
            .map(str::to_owned)
            .collect();
        let links = ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .filter_map(|n| n.split('@').next())
            .filter(|n| n.starts_with(&self.prefix))
            .map(str::to_owned)
            .collect();
        let tables = run("nft", &["list", "tables"]);
        let table = tables
            .lines()
            .any(|l| l.trim() == format!("table inet {}", self.table));
        (netns, links, table)
    }

    /// A netns standing for "the outside world": `{prefix}-remote`, with
    /// `10.99.{octet+100}.2/30` on its `eth0`, the host end `xr{tag}` at
    /// `.1` in the root netns (a name outside the pool's wildcard, like a
    /// real uplink), and a route back to the pool's cidr so it could open
    /// connections to sandboxes if the firewall let it.
    fn make_remote(&mut self) -> (String, Ipv4Addr, Ipv4Addr) {
        let ns = format!("{}-remote", self.prefix);
        let link = format!("xr{}", &self.prefix[5..]);
        let net = self.octet + 100;
        let (host, remote) = (Ipv4Addr::new(10, 99, net, 1), Ipv4Addr::new(10, 99, net, 2));
        self.remote_link = Some(link.clone());
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{host}/30"), "dev", &link]);
        ip(&["link", "set", &link, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{remote}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let cidr = format!("10.99.{}.0/24", self.octet);
        ip(&["-n", &ns, "route", "add", &cidr, "via", &host.to_string()]);
        (ns, host, remote)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(link) = &self.remote_link {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
        let (netns, links, table) = self.leftovers();
        for link in links {
            let _ = Command::new("ip").args(["link", "del", &link]).output();
        }
        for ns in netns {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        if table {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", &self.table])
                .output();
        }
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// Runs `f` on a fresh thread that has entered the netns at `netns`.
fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(netns).unwrap();
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

fn listen_in(netns: &Path, addr: SocketAddr) -> TcpListener {
    in_netns(netns, || TcpListener::bind(addr).unwrap())
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
}

fn connect_from(netns: &Path, addr: SocketAddr) -> io::Result<TcpStream> {
    in_netns(netns, || connect(addr))
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn ifindex(name: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_cannot_reach_each_other_but_the_host_reaches_both() {
    require_root!();
    let env = Env::new(21);
    let pool = SlotPool::new(env.config(2), &[]).await.unwrap();
    let a = pool.acquire().await.unwrap();
    let b = pool.acquire().await.unwrap();
    assert_ne!(a.index, b.index);
    let _la = listen_in(&a.netns_path, sock(a.sandbox_ip, ENVD_PORT));
    let _lb = listen_in(&b.netns_path, sock(b.sandbox_ip, ENVD_PORT));

    // Host -> sandbox: how the node reaches envd.
    connect(sock(a.sandbox_ip, ENVD_PORT)).expect("host reaches slot A");
    connect(sock(b.sandbox_ip, ENVD_PORT)).expect("host reaches slot B");
    // A slot reaches its own listener (the netns itself works).
    connect_from(&a.netns_path, sock(a.sandbox_ip, ENVD_PORT)).expect("A reaches itself");

    // Sandbox -> sandbox: dropped by the forward chain, so it times out.
    let started = Instant::now();
    let err = connect_from(&a.netns_path, sock(b.sandbox_ip, ENVD_PORT)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "A -> B: {err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let err = connect_from(&b.netns_path, sock(a.sandbox_ip, ENVD_PORT)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "B -> A: {err}");

    pool.release(a);
    pool.release(b);
    pool.destroy().await.unwrap();
    assert_eq!(env.leftovers(), (vec![], vec![], false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_loopback_and_host_addresses_are_unreachable_from_a_slot() {
    require_root!();
    let env = Env::new(22);
    let pool = SlotPool::new(env.config(2), &[]).await.unwrap();
    let a = pool.acquire().await.unwrap();
    let b = pool.acquire().await.unwrap();

    let on_loopback = TcpListener::bind("127.0.0.1:0").unwrap();
    let on_own_gateway = TcpListener::bind(sock(a.host_ip, 0)).unwrap();
    let on_other_gateway = TcpListener::bind(sock(b.host_ip, 0)).unwrap();
    let targets = [
        on_loopback.local_addr().unwrap(),
        on_own_gateway.local_addr().unwrap(),
        on_other_gateway.local_addr().unwrap(),
    ];
    // The services work for the host itself...
    for t in targets {
        connect(t).unwrap_or_else(|e| panic!("host -> {t}: {e}"));
    }
    // ...but not from the slot. 127.0.0.1 there is the netns's own
    // loopback, where nothing listens: refused at once.
    let err = connect_from(&a.netns_path, targets[0]).unwrap_err();
    assert_eq!(
        err.kind(),
        io::ErrorKind::ConnectionRefused,
        "{}: {err}",
        targets[0]
    );
    // The host's addresses are dropped by the input chain: no answer at all.
    for t in &targets[1..] {
        let err = connect_from(&a.netns_path, *t).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{t}: {err}");
    }

    pool.release(a);
    pool.release(b);
    pool.destroy().await.unwrap();
    assert_eq!(env.leftovers(), (vec![], vec![], false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_is_masqueraded_unspoofable_and_the_outside_cannot_dial_in() {
    require_root!();
    let mut env = Env::new(23);
    let (remote_ns, uplink_ip, remote_ip) = env.make_remote();
    let remote_path = Path::new("/run/netns").join(&remote_ns);
    let pool = SlotPool::new(env.config(1), &[]).await.unwrap();
    let a = pool.acquire().await.unwrap();

    let listing = run("nft", &["list", "table", "inet", &env.table]);
    let masquerade = format!(
        "ip saddr 10.99.23.0/24 oifname != \"{}*\" masquerade",
        env.prefix
    );
    assert!(listing.contains(&masquerade), "{listing}");

    // Sandbox -> outside, routed by the host, source rewritten to the host's
    // address on the way out.
    let remote = listen_in(&remote_path, sock(remote_ip, 8080));
    let mut conn = connect_from(&a.netns_path, sock(remote_ip, 8080)).expect("slot reaches remote");
    let (mut accepted, peer) = remote.accept().unwrap();
    assert_eq!(
        peer.ip(),
        IpAddr::V4(uplink_ip),
        "source seen by the remote"
    );
    accepted.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
    std::io::Write::write_all(&mut conn, b"ping").unwrap();
    let mut buf = [0; 4];
    accepted.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    // Outside -> sandbox: the remote has a route to the cidr, but the
    // forward chain only lets replies into sandboxes.
    let _la = listen_in(&a.netns_path, sock(a.sandbox_ip, ENVD_PORT));
    let err = connect_from(&remote_path, sock(a.sandbox_ip, ENVD_PORT)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "remote -> slot: {err}");

    // Spoofed sources are dropped: another slot's address (slot 1, warm)
    // and one outside the cidr, which masquerade would not rewrite.
    let other_slot = Ipv4Addr::new(10, 99, 23, 6);
    let outside = Ipv4Addr::new(10, 99, 199, 9);
    for spoof in [other_slot, outside] {
        ip(&[
            "-n",
            &a.netns_name,
            "addr",
            "add",
            &format!("{spoof}/32"),
            "dev",
            "eth0",
        ]);
    }
    let inbox = in_netns(&remote_path, || {
        UdpSocket::bind(sock(remote_ip, 9090)).unwrap()
    });
    inbox.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
    in_netns(&a.netns_path, || {
        for (from, payload) in [
            (other_slot, "spoof-slot"),
            (outside, "spoof-out"),
            (Ipv4Addr::UNSPECIFIED, "real"),
        ] {
            let s = UdpSocket::bind(sock(from, 0)).unwrap();
            s.send_to(payload.as_bytes(), sock(remote_ip, 9090))
                .unwrap();
        }
    });
    let mut received = Vec::new();
    let mut buf = [0; 64];
    while let Ok((n, from)) = inbox.recv_from(&mut buf) {
        received.push((String::from_utf8_lossy(&buf[..n]).into_owned(), from.ip()));
    }
    assert_eq!(received, [("real".to_owned(), IpAddr::V4(uplink_ip))]);

    pool.release(a);
    pool.destroy().await.unwrap();
    let (netns, links, table) = env.leftovers();
    assert_eq!(netns, [remote_ns], "only the test's remote is left");
    assert!(links.is_empty() && !table, "{links:?} {table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_slots_are_recreated_before_reuse_and_destroy_leaves_nothing() {
    require_root!();
    let env = Env::new(24);
    // Two slots in all, both kept warm.
    let pool = SlotPool::new(env.config_cidr("10.99.24.0/29", 2), &[])
        .await
        .unwrap();
    let a = pool.acquire().await.unwrap();
    assert_eq!(a.index, 0);
    let old_ifindex = ifindex(&a.host_ifname);
    pool.release(a);
    pool.idle().await;
    // The queue was short, so slot 0 was deleted and made again.
    let new_ifindex = ifindex(&format!("{}0h", env.prefix));
    assert_ne!(old_ifindex, new_ifindex, "slot 0 was recreated");
    let b = pool.acquire().await.unwrap();
    let c = pool.acquire().await.unwrap();
    assert_eq!(
        (b.index, c.index),
        (1, 0),
        "warm queue order: 1 first, then recycled 0"
    );
    assert!(matches!(
        pool.acquire().await,
        Err(NetError::Exhausted { slots: 2, .. })
    ));
    // The recreated slot works.
    let _lc = listen_in(&c.netns_path, sock(c.sandbox_ip, ENVD_PORT));
    connect(sock(c.sandbox_ip, ENVD_PORT)).expect("host reaches the recycled slot");

    // With nothing warm, released slots are made again and wait in the queue.
    pool.release(c);
    pool.idle().await;
    pool.release(b);
    pool.idle().await;
    let (netns, _, _) = env.leftovers();
    assert_eq!(netns.len(), 2, "{netns:?}");

    pool.destroy().await.unwrap();
    let (netns, links, table) = env.leftovers();
    assert!(netns.is_empty(), "{netns:?}");
    assert!(links.is_empty(), "{links:?}");
    assert!(!table, "nft table {} left", env.table);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_pool_adopts_running_slots_and_removes_stale_ones() {
    require_root!();
    let env = Env::new(25);
    let first = SlotPool::new(env.config(2), &[]).await.unwrap();
    let a = first.acquire().await.unwrap();
    first.idle().await;
    let (index, sandbox_ip, host_ifname) = (a.index, a.sandbox_ip, a.host_ifname.clone());
    let listener = listen_in(&a.netns_path, sock(sandbox_ip, ENVD_PORT));
    let kept_ifindex = ifindex(&host_ifname);
    let (netns, _, _) = env.leftovers();
    assert_eq!(netns.len(), 3, "one in use, two warm: {netns:?}");
    // The node crashes: no destroy, no release.
    drop(a);
    drop(first);

    let second = SlotPool::new(env.config(0), &[index]).await.unwrap();
    let (netns, links, table) = env.leftovers();
    assert_eq!(
        netns,
        [format!("{}-{index}", env.prefix)],
        "stale warm slots removed"
    );
    assert_eq!(links, [host_ifname.as_str()]);
    assert!(table);
    assert_eq!(
        ifindex(&host_ifname),
        kept_ifindex,
        "adopted veth untouched"
    );
    let stream = connect(sock(sandbox_ip, ENVD_PORT)).expect("host still reaches the adopted slot");
    drop(stream);
    drop(listener.accept().unwrap());
    // A new slot does not take the adopted index.
    let fresh = second.acquire().await.unwrap();
    assert_ne!(fresh.index, index);

    let adopted = second.take_adopted(index).expect("adopted slot");
    assert_eq!(adopted.sandbox_ip, sandbox_ip);
    second.release(adopted);
    second.release(fresh);
    second.idle().await;
    assert_eq!(env.leftovers(), (vec![], vec![], true));
    second.destroy().await.unwrap();
    assert_eq!(env.leftovers(), (vec![], vec![], false));
}

/// Prints what creating and deleting slots costs on this machine
/// (`cargo nextest run -p arca-net --no-capture timings`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timings() {
    require_root!();
    let env = Env::new(26);
    const N: u32 = 10;
    let started = Instant::now();
    let pool = SlotPool::new(env.config(8), &[]).await.unwrap();
    let warm_up = started.elapsed();
    let started = Instant::now();
    let mut slots = Vec::new();
    for _ in 0..8 {
        slots.push(pool.acquire().await.unwrap());
    }
    let warm_acquire = started.elapsed() / 8;
    pool.idle().await;
    for s in slots.drain(..) {
        pool.release(s);
    }
    pool.idle().await;
    let started = Instant::now();
    pool.destroy().await.unwrap();
    let destroy = started.elapsed();

    let cold = SlotPool::new(env.config(0), &[]).await.unwrap();
    let started = Instant::now();
    for _ in 0..N {
        slots.push(cold.acquire().await.unwrap());
    }
    let cold_acquire = started.elapsed() / N;
    let started = Instant::now();
    for s in slots.drain(..) {
        cold.release(s);
    }
    cold.idle().await;
    let delete = started.elapsed() / N;
    cold.destroy().await.unwrap();
    eprintln!(
        "new() with 8 warm slots: {warm_up:?}; acquire from warm: {warm_acquire:?}; \
         destroy with 8 warm slots: {destroy:?}; acquire made on demand: {cold_acquire:?}; \
         delete per released slot (background, sequential): {delete:?}"
    );
    assert_eq!(env.leftovers(), (vec![], vec![], false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_keeps_slots_in_use_and_removes_the_rest() {
    require_root!();
    let env = Env::new(27);
    let pool = SlotPool::new(env.config_cidr("10.99.27.0/28", 3), &[])
        .await
        .unwrap();
    pool.idle().await;
    let used = pool.acquire().await.unwrap();
    pool.idle().await;
    pool.close().await.unwrap();
    // The slot in use still works and keeps the host rules; the unused ones are gone.
    let (netns, _, table) = env.leftovers();
    assert_eq!(netns, vec![used.netns_name.clone()]);
    assert!(table, "the nft table guarding the running slot was removed");
    let _l = listen_in(&used.netns_path, sock(used.sandbox_ip, ENVD_PORT));
    connect(sock(used.sandbox_ip, ENVD_PORT)).expect("host reaches the slot still in use");
    drop(pool);

    // A pool with nothing in use removes everything when it closes.
    let pool = SlotPool::new(env.config_cidr("10.99.27.0/28", 2), &[])
        .await
        .unwrap();
    pool.idle().await;
    pool.close().await.unwrap();
    let (netns, links, table) = env.leftovers();
    assert!(
        netns.is_empty() && links.is_empty() && !table,
        "{netns:?} {links:?} {table}"
    );
}

/// Egress rules of one slot, compiled from E2B-style lists.
fn egress(id: &str, allow: &[String], deny: &[&str]) -> SlotEgress {
    let spec = NetworkSpec {
        allow_out: allow.to_vec(),
        deny_out: deny.iter().map(|s| s.to_string()).collect(),
        dns_servers: vec![],
    };
    SlotEgress {
        sandbox_id: id.to_owned(),
        policy: EgressPolicy::compile(&spec, true).unwrap(),
        admitted: vec![],
    }
}

/// Whether a TCP connection from `netns` to `to` is refused at once (a
/// reset from the firewall), rather than made or timed out.
fn refused_from(netns: &Path, to: SocketAddr) -> bool {
    match connect_from(netns, to) {
        Err(e) => {
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{to}: {e}");
            true
        }
        Ok(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_rules_allow_deny_replace_redirect_and_leave_with_the_slot() {
    require_root!();
    let mut env = Env::new(28);
    let (remote_ns, _, remote_ip) = env.make_remote();
    let remote_path = Path::new("/run/netns").join(&remote_ns);
    let mut config = env.config(1);
    // Ports of the node's egress services, free on this host.
    let dns = UdpSocket::bind("0.0.0.0:0").unwrap();
    let tls = TcpListener::bind("0.0.0.0:0").unwrap();
    config.egress.dns_port = dns.local_addr().unwrap().port();
    config.egress.tls_port = tls.local_addr().unwrap().port();
    config.egress.http_port = config.egress.tls_port; // only 443 is tried here
    config.egress.node_deny = vec![format!("10.99.{}.0/30", env.octet + 100)];
    let pool = SlotPool::new(config.clone(), &[]).await.unwrap();
    let a = pool.acquire().await.unwrap();
    let web = listen_in(&remote_path, sock(remote_ip, 8080));
    let web_addr = sock(remote_ip, 8080);

    // No rules: node_deny (the remote's /30 here) is refused for everyone.
    let err = connect_from(&a.netns_path, web_addr).unwrap_err();
    assert_ne!(
        err.kind(),
        io::ErrorKind::TimedOut,
        "node_deny refuses fast: {err}"
    );
    drop(pool);
    config.egress.node_deny = vec![];
    let pool = SlotPool::new_with_egress(config.clone(), &[a.index], &[])
        .await
        .unwrap();
    connect_from(&a.netns_path, web_addr).expect("no rules: the remote is reachable");
    drop(web.accept().unwrap());

    // Deny all: TCP refused at once; UDP gets an ICMP error.
    assert_eq!(pool.egress_of(a.sandbox_ip), None);
    pool.set_egress(a.index, &egress("sbx1", &[], &["0.0.0.0/0"]))
        .await
        .unwrap();
    let (id, policy) = pool
        .egress_of(a.sandbox_ip)
        .expect("rules known by address");
    assert!(id == "sbx1" && policy.deny_all);
    assert_eq!(pool.egress_slot("sbx1"), Some(a.index));
    assert_eq!(pool.egress_slot("other"), None);
    assert_eq!(pool.egress_of(a.host_ip), None, "only the sandbox address");
    assert!(refused_from(&a.netns_path, web_addr));
    let udp_err = in_netns(&a.netns_path, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(sock(remote_ip, 9)).unwrap();
        s.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
        s.send(b"x").unwrap();
        s.recv(&mut [0; 8]).unwrap_err()
    });
    assert_ne!(
        udp_err.kind(),
        io::ErrorKind::WouldBlock,
        "ICMP error, not silence: {udp_err}"
    );

    // Allow the remote (allow wins), and a connection made now survives a
    // replace that keeps it allowed, then dies when it is denied.
    let allow_remote = vec![remote_ip.to_string()];
    pool.set_egress(a.index, &egress("sbx1", &allow_remote, &["0.0.0.0/0"]))
        .await
        .unwrap();
    let mut conn = connect_from(&a.netns_path, web_addr).expect("allowed by address");
    let (mut accepted, _) = web.accept().unwrap();
    accepted.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
    pool.set_egress(
        a.index,
        &egress(
            "sbx1",
            &[remote_ip.to_string(), "10.1.0.0/16".into()],
            &["0.0.0.0/0"],
        ),
    )
    .await
    .unwrap();
    std::io::Write::write_all(&mut conn, b"one").unwrap();
    let mut buf = [0; 3];
    accepted.read_exact(&mut buf).unwrap();
    assert_eq!(
        &buf, b"one",
        "a connection still allowed survives the replace"
    );
    pool.set_egress(a.index, &egress("sbx1", &[], &["0.0.0.0/0"]))
        .await
        .unwrap();
    conn.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
    let _ = std::io::Write::write_all(&mut conn, b"two");
    let cut = conn.read(&mut buf);
    assert!(
        matches!(&cut, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "a denied flow is reset on its next packet: {cut:?}"
    );
    let mut got = [0; 3];
    assert!(
        !matches!(accepted.read(&mut got), Ok(3)),
        "nothing of it reached the remote"
    );

    // Domain mode: 443 to an address admitted by DNS goes to the node's
    // TLS check (here: the test's listener); DNS to the gateway and to any
    // other address goes to the node's forwarder.
    let domains = egress("sbx1", &["allowed.test".into()], &["0.0.0.0/0"]);
    pool.set_egress(a.index, &domains).await.unwrap();
    assert!(
        refused_from(&a.netns_path, sock(remote_ip, 443)),
        "not admitted yet"
    );
    pool.admit(&[(a.index, remote_ip, Duration::from_secs(60))])
        .await
        .unwrap();
    let _redirected = connect_from(&a.netns_path, sock(remote_ip, 443)).expect("redirected");
    tls.set_nonblocking(false).unwrap();
    let (_, peer) = tls.accept().unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(a.sandbox_ip));
    assert!(
        refused_from(&a.netns_path, sock(remote_ip, 8080)),
        "other ports stay denied"
    );
    for to in [a.host_ip, remote_ip] {
        in_netns(&a.netns_path, || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(b"query", sock(to, 53)).unwrap();
        });
        dns.set_read_timeout(Some(CONNECT_TIMEOUT)).unwrap();
        let (n, from) = dns.recv_from(&mut [0; 16]).unwrap();
        assert_eq!((n, from.ip()), (5, IpAddr::V4(a.sandbox_ip)), "DNS to {to}");
    }
    // A query from a forged source (another slot's address) never reaches
    // the forwarder, which tells sandboxes apart by source address.
    let forged = Ipv4Addr::new(10, 99, env.octet, 6);
    ip(&[
        "-n",
        &a.netns_name,
        "addr",
        "add",
        &format!("{forged}/32"),
        "dev",
        "eth0",
    ]);
    in_netns(&a.netns_path, || {
        let s = UdpSocket::bind(sock(forged, 0)).unwrap();
        s.send_to(b"forged", sock(a.host_ip, 53)).unwrap();
    });
    let got = dns.recv_from(&mut [0; 16]);
    assert!(got.is_err(), "a forged query got through: {got:?}");
    ip(&[
        "-n",
        &a.netns_name,
        "addr",
        "del",
        &format!("{forged}/32"),
        "dev",
        "eth0",
    ]);
    // The services' ports are not reachable directly.
    let err = connect_from(&a.netns_path, sock(a.host_ip, config.egress.tls_port)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "direct: {err}");

    // A node restart keeps the rules in the same transaction.
    drop(pool);
    let kept = SlotEgress {
        admitted: vec![(remote_ip, Duration::from_secs(30))],
        ..domains.clone()
    };
    let pool = SlotPool::new_with_egress(config.clone(), &[a.index], &[(a.index, kept)])
        .await
        .unwrap();
    let listing = run("nft", &["list", "table", "inet", &env.table]);
    assert!(
        listing.contains(&format!("chain e{}", a.index)),
        "{listing}"
    );
    assert!(
        pool.egress_of(a.sandbox_ip).is_some(),
        "adopted rules known by address"
    );
    assert!(
        refused_from(&a.netns_path, web_addr),
        "still denied after restart"
    );
    let _again = connect_from(&a.netns_path, sock(remote_ip, 443)).expect("admission kept");

    // Released: the slot's objects go, and the index starts with none.
    let slot = pool.take_adopted(a.index).unwrap();
    let veth = a.host_ifname.clone();
    drop(a);
    pool.release(slot);
    pool.idle().await;
    let listing = run("nft", &["list", "table", "inet", &env.table]);
    for name in ["chain e", "chain n", "set a", "set d", "set x"] {
        assert!(!listing.contains(name), "{name} left: {listing}");
    }
    assert!(
        !listing.contains(&format!("\"{veth}\"")),
        "map element left: {listing}"
    );
    let b = pool.acquire().await.unwrap();
    assert_eq!(pool.egress_of(b.sandbox_ip), None);
    connect_from(&b.netns_path, web_addr).expect("the next owner is unrestricted");
    pool.release(b);
    pool.destroy().await.unwrap();
}
