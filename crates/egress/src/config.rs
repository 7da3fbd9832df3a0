//! What the node chooses ([`EgressConfig`]) and the knobs tests turn
//! ([`Tuning`]).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use arca_proto::network::Ipv4Net;
use tokio::net::TcpStream;

/// Default port of the DNS forwarder (UDP and TCP).
pub const DEFAULT_DNS_PORT: u16 = 15353;
/// Default port of the TLS listener.
pub const DEFAULT_TLS_PORT: u16 = 15443;
/// Default port of the HTTP listener.
pub const DEFAULT_HTTP_PORT: u16 = 15080;

/// Most proxied TLS/HTTP connections of one sandbox (ADR 0005 section 3).
pub const MAX_CONNS_PER_SANDBOX: usize = 256;
/// Most proxied TLS/HTTP connections of the node (ADR 0005 section 3; the
/// node's nofile hard limit is 20000 and each takes two descriptors).
pub const MAX_CONNS: usize = 8000;
/// Most DNS queries of one sandbox being answered at once; more are dropped
/// (the client retries).
pub const MAX_QUERIES_PER_SANDBOX: usize = 64;
/// Most DNS queries being answered at once on the node.
pub const MAX_QUERIES: usize = 1024;
/// Most open DNS-over-TCP connections of one sandbox.
pub const MAX_DNS_CONNS_PER_SANDBOX: usize = 16;
/// Most open DNS-over-TCP connections on the node.
pub const MAX_DNS_CONNS: usize = 512;

/// Shortest admission: a name whose records say less is admitted this long
/// (and the client is told the shorter TTL).
pub const MIN_ADMISSION_SECS: u64 = 60;
/// Longest admission; longer TTLs in answers are cut to this.
pub const MAX_ADMISSION_SECS: u64 = 3600;
/// Most CNAME links followed from the queried name.
pub const MAX_CNAME_LINKS: usize = 8;

/// Most addresses admitted for one sandbox at a time (the entries of its
/// `x<i>` set and of the forwarder's table). A wildcard entry whose zone
/// the sandbox controls could otherwise add a new address with every
/// query, each for up to an hour. At the limit, answers bringing further
/// addresses are refused rather than older admissions evicted: the
/// firewall keeps an evicted element until its timeout anyway, so evicting
/// would not bound the kernel set, and it would break connections to
/// addresses the client was told about. Space frees up as admissions
/// expire.
pub const MAX_ADMITTED_ADDRS_PER_SANDBOX: usize = 1024;
/// Most (name, address) bindings of one sandbox at a time: the same attack
/// with many names pointing at one address grows the table, not the set.
/// Handled like [`MAX_ADMITTED_ADDRS_PER_SANDBOX`].
pub const MAX_ADMITTED_NAMES_PER_SANDBOX: usize = 4096;

/// Where the listeners bind and where DNS goes when a sandbox names no
/// resolver. The defaults match ADR 0005; the node adds the resolvers and
/// the forbidden networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressConfig {
    /// DNS forwarder port, UDP and TCP (0: any free port; UDP and TCP then
    /// share the number).
    pub dns_port: u16,
    /// TLS listener port (0: any free port).
    pub tls_port: u16,
    /// HTTP listener port (0: any free port).
    pub http_port: u16,
    /// Address all listeners bind to. `0.0.0.0` relies on the firewall's
    /// input guard (only redirected flows from sandbox veths get in).
    pub bind: Ipv4Addr,
    /// Upstream resolvers for sandboxes without `dnsServers`: the host's
    /// `/etc/resolv.conf` nameservers (loopback stubs included) on port 53.
    pub host_resolvers: Vec<SocketAddr>,
    /// Networks no DNS answer may admit, on top of the always-forbidden
    /// 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16 and 224.0.0.0/3: the node
    /// passes its `node_deny` set, the sandbox pool and the host's own
    /// addresses (DNS rebinding, ADR 0005 section 2).
    pub forbidden: Vec<Ipv4Net>,
    /// Refuse TLS ClientHellos that carry the `encrypted_client_hello`
    /// extension (0xfe0d). With ECH the listener sees and checks only the
    /// outer (public) name, never the name the client really asks for.
    /// Off by default: browsers built on BoringSSL (Chrome and others)
    /// send a "GREASE" ECH extension on every connection when they know
    /// no ECH key, which cannot be told apart from real ECH, so turning
    /// this on refuses those clients everywhere.
    pub refuse_ech: bool,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            dns_port: DEFAULT_DNS_PORT,
            tls_port: DEFAULT_TLS_PORT,
            http_port: DEFAULT_HTTP_PORT,
            bind: Ipv4Addr::UNSPECIFIED,
            host_resolvers: Vec::new(),
            forbidden: Vec::new(),
            refuse_ech: false,
        }
    }
}

/// Networks that no DNS answer may admit, whatever the node configures:
/// "this network", loopback, link-local (cloud metadata lives there), and
/// multicast plus the reserved class E range.
const ALWAYS_FORBIDDEN: [Ipv4Net; 4] = [
    Ipv4Net {
        addr: Ipv4Addr::new(0, 0, 0, 0),
        prefix: 8,
    },
    Ipv4Net {
        addr: Ipv4Addr::new(127, 0, 0, 0),
        prefix: 8,
    },
    Ipv4Net {
        addr: Ipv4Addr::new(169, 254, 0, 0),
        prefix: 16,
    },
    Ipv4Net {
        addr: Ipv4Addr::new(224, 0, 0, 0),
        prefix: 3,
    },
];

impl EgressConfig {
    /// Whether DNS answers may never admit `addr`.
    pub fn is_forbidden(&self, addr: Ipv4Addr) -> bool {
        ALWAYS_FORBIDDEN
            .iter()
            .chain(&self.forbidden)
            .any(|n| n.contains(addr))
    }
}

/// Whether `addr` is an address of this host right now: binding a UDP
/// socket to it succeeds only for local (and broadcast) addresses, which
/// covers addresses added after start (a new bridge or NIC) and `local`
/// routes. Errors other than "not available" (out of descriptors, say)
/// count as local, so the caller refuses.
///
/// With `net.ipv4.ip_nonlocal_bind` on, any bind succeeds; then (read once
/// per start) the interfaces' addresses and broadcast addresses decide.
pub(crate) fn host_addr_check() -> Arc<dyn Fn(Ipv4Addr) -> bool + Send + Sync> {
    let nonlocal_bind = std::fs::read_to_string("/proc/sys/net/ipv4/ip_nonlocal_bind")
        .is_ok_and(|s| s.trim() != "0");
    if nonlocal_bind {
        Arc::new(is_interface_addr)
    } else {
        Arc::new(is_bindable)
    }
}

/// See [`host_addr_check`].
pub(crate) fn is_bindable(addr: Ipv4Addr) -> bool {
    match std::net::UdpSocket::bind(SocketAddrV4::new(addr, 0)) {
        Ok(_) => true,
        Err(e) => e.kind() != io::ErrorKind::AddrNotAvailable,
    }
}

/// Whether `addr` is an address or broadcast address of an interface;
/// `true` when the interfaces cannot be listed.
fn is_interface_addr(addr: Ipv4Addr) -> bool {
    let Ok(ifaces) = nix::ifaddrs::getifaddrs() else {
        return true;
    };
    let v4 = |a: Option<nix::sys::socket::SockaddrStorage>| a?.as_sockaddr_in().map(|s| s.ip());
    ifaces
        .into_iter()
        .any(|i| v4(i.address) == Some(addr) || v4(i.broadcast) == Some(addr))
}

/// Finds where a redirected connection was going.
pub(crate) type OriginalDst = Arc<dyn Fn(&TcpStream) -> io::Result<SocketAddrV4> + Send + Sync>;

/// Maps an original destination to the address actually dialled
/// (identity outside tests, which route fake destinations to loopback).
pub(crate) type Dial = Arc<dyn Fn(SocketAddrV4) -> SocketAddrV4 + Send + Sync>;

/// Reads `SO_ORIGINAL_DST`, which the kernel's NAT sets on connections that
/// nft `redirect` sent to a listener.
pub(crate) fn so_original_dst(stream: &TcpStream) -> io::Result<SocketAddrV4> {
    use nix::sys::socket::{SockaddrIn, getsockopt, sockopt};
    let raw = getsockopt(stream, sockopt::OriginalDst)?;
    Ok(SocketAddrV4::from(SockaddrIn::from(raw)))
}

/// Timeouts, limits and seams; fixed values in production, shortened or
/// replaced in tests.
#[derive(Clone)]
pub(crate) struct Tuning {
    /// How the TLS and HTTP listeners learn the original destination.
    pub(crate) original_dst: OriginalDst,
    /// Where the host-side connection for an original destination goes.
    pub(crate) dial: Dial,
    /// Whether an address belongs to this host now ([`host_addr_check`]).
    pub(crate) is_host_addr: Arc<dyn Fn(Ipv4Addr) -> bool + Send + Sync>,
    /// Port of the servers in a policy's `dnsServers`.
    pub(crate) upstream_port: u16,
    /// Wait for one upstream UDP or TCP exchange.
    pub(crate) upstream_timeout: Duration,
    /// Wait for a whole ClientHello.
    pub(crate) hello_timeout: Duration,
    /// Wait for the host-side connection to the original destination.
    pub(crate) connect_timeout: Duration,
    /// Idle time after which a DNS-over-TCP connection is closed.
    pub(crate) dns_tcp_idle: Duration,
    /// See [`MAX_CONNS_PER_SANDBOX`].
    pub(crate) max_conns_per_sandbox: usize,
    /// See [`MAX_CONNS`].
    pub(crate) max_conns: usize,
    /// See [`MAX_QUERIES_PER_SANDBOX`].
    pub(crate) max_queries_per_sandbox: usize,
    /// See [`MAX_QUERIES`].
    pub(crate) max_queries: usize,
    /// See [`MAX_DNS_CONNS_PER_SANDBOX`].
    pub(crate) max_dns_conns_per_sandbox: usize,
    /// See [`MAX_DNS_CONNS`].
    pub(crate) max_dns_conns: usize,
    /// See [`MAX_ADMITTED_ADDRS_PER_SANDBOX`].
    pub(crate) max_admitted_addrs: usize,
    /// See [`MAX_ADMITTED_NAMES_PER_SANDBOX`].
    pub(crate) max_admitted_names: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            original_dst: Arc::new(so_original_dst),
            dial: Arc::new(|dst| dst),
            is_host_addr: host_addr_check(),
            upstream_port: 53,
            upstream_timeout: Duration::from_secs(2),
            hello_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            dns_tcp_idle: Duration::from_secs(10),
            max_conns_per_sandbox: MAX_CONNS_PER_SANDBOX,
            max_conns: MAX_CONNS,
            max_queries_per_sandbox: MAX_QUERIES_PER_SANDBOX,
            max_queries: MAX_QUERIES,
            max_dns_conns_per_sandbox: MAX_DNS_CONNS_PER_SANDBOX,
            max_dns_conns: MAX_DNS_CONNS,
            max_admitted_addrs: MAX_ADMITTED_ADDRS_PER_SANDBOX,
            max_admitted_names: MAX_ADMITTED_NAMES_PER_SANDBOX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbids_special_ranges_and_configured_networks() {
        let mut c = EgressConfig::default();
        for ip in [
            "0.1.2.3",
            "127.0.0.53",
            "169.254.169.254",
            "224.0.0.251",
            "239.1.1.1",
            "255.255.255.255",
            "240.0.0.1",
        ] {
            assert!(c.is_forbidden(ip.parse().unwrap()), "{ip}");
        }
        assert!(!c.is_forbidden("10.11.0.5".parse().unwrap()));
        assert!(!c.is_forbidden("223.255.255.255".parse().unwrap()));
        c.forbidden.push(Ipv4Net::parse("10.11.0.0/16").unwrap());
        assert!(c.is_forbidden("10.11.0.5".parse().unwrap()));
    }

    #[test]
    fn knows_this_hosts_addresses() {
        let chosen = host_addr_check();
        let checks: [&dyn Fn(Ipv4Addr) -> bool; 3] = [&is_bindable, &is_interface_addr, &*chosen];
        for check in checks {
            assert!(check(Ipv4Addr::LOCALHOST));
            // TEST-NET-3 (RFC 5737): documentation only, on no host.
            assert!(!check(Ipv4Addr::new(203, 0, 113, 77)));
        }
        // Whatever address this host would use to reach the outside (if it
        // has a route at all: connecting a UDP socket sends nothing).
        let probe = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let local = probe
            .connect((Ipv4Addr::new(198, 51, 100, 1), 9))
            .and_then(|()| probe.local_addr());
        if let Ok(std::net::SocketAddr::V4(local)) = local {
            assert!(is_bindable(*local.ip()), "{local}");
            assert!(is_interface_addr(*local.ip()), "{local}");
        }
    }
}
