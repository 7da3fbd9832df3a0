//! A sandbox's network settings (CONTRACT 2.6, ADR 0005): what the api
//! accepts, what the node enforces, and the egress log's entries.
//!
//! [`NetworkSpec`] is the wire form (the keys the api stores and sends to
//! the node). [`EgressPolicy::compile`] checks it and turns it into what
//! the firewall and the DNS forwarder use: address ranges and domain
//! patterns. Checks are shared by the api (which answers 400) and the node
//! (which refuses a spec it could not enforce).
//!
//! ```
//! use arca_proto::network::{EgressPolicy, NetworkSpec};
//!
//! let spec = NetworkSpec {
//!     allow_out: vec!["10.1.2.0/24".into(), "*.example.com".into()],
//!     deny_out: vec!["0.0.0.0/0".into()],
//!     ..NetworkSpec::default()
//! };
//! let policy = EgressPolicy::compile(&spec, true).unwrap();
//! assert!(policy.deny_all);
//! assert!(policy.allows_name("api.example.com"));
//! assert!(!policy.allows_name("example.com"));
//! ```

use std::fmt;
use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Most entries in `allowOut` or `denyOut`.
pub const MAX_RULES: usize = 512;
/// Most entries in `dnsServers`.
pub const MAX_DNS_SERVERS: usize = 10;

/// Egress settings of a sandbox, as the api stores them and the node gets
/// them. Ingress settings ride separately ([`IngressSpec`]): `PUT
/// /sandboxes/{id}/network` replaces egress only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// Allowed destinations: IPv4 addresses, CIDRs, domains, `*.domain`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    /// Denied destinations: IPv4 addresses and CIDRs (`0.0.0.0/0`: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
    /// Upstream resolvers of the node's DNS forwarder for this sandbox
    /// (empty: the host's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<String>,
}

impl NetworkSpec {
    /// Whether nothing is restricted.
    pub fn is_empty(&self) -> bool {
        self.allow_out.is_empty() && self.deny_out.is_empty() && self.dns_servers.is_empty()
    }
}

/// Ingress settings, fixed at create.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressSpec {
    /// When set, requests to user ports (not envd's) must carry
    /// `e2b-traffic-access-token: <this>` (`allowPublicTraffic: false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_access_token: Option<String>,
    /// Host header for requests forwarded to user ports; `${PORT}` is
    /// replaced by the port (`maskRequestHost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_request_host: Option<String>,
}

/// An IPv4 network: address with the host bits cleared, prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Net {
    /// First address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

impl Ipv4Net {
    /// `0.0.0.0/0`.
    pub const ALL: Ipv4Net = Ipv4Net {
        addr: Ipv4Addr::UNSPECIFIED,
        prefix: 0,
    };

    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        }
    }

    /// Whether `ip` lies inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == u32::from(self.addr)
    }

    /// Last address.
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !Self::mask(self.prefix))
    }

    /// Parses `a.b.c.d` (a /32) or `a.b.c.d/n`; host bits must be clear.
    pub fn parse(s: &str) -> Result<Ipv4Net, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => {
                let prefix: u8 = p
                    .parse()
                    .ok()
                    .filter(|p| *p <= 32)
                    .ok_or_else(|| format!("'{s}': the prefix length must be 0 to 32"))?;
                (a, prefix)
            }
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("'{s}' is not an IPv4 address or CIDR"))?;
        let net = Ipv4Net { addr, prefix };
        if u32::from(addr) & !Self::mask(prefix) != 0 {
            let fixed = Ipv4Addr::from(u32::from(addr) & Self::mask(prefix));
            return Err(format!(
                "'{s}' has host bits set; write {fixed}/{prefix} or the single address {addr}"
            ));
        }
        Ok(net)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix == 32 {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

/// A domain entry of `allowOut`, lowercased, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DomainPattern {
    /// This name only.
    Exact(String),
    /// `*.<this>`: any name below it, not itself.
    Below(String),
}

impl DomainPattern {
    /// Whether `name` (any case, trailing dot allowed) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        match self {
            DomainPattern::Exact(d) => name == *d,
            DomainPattern::Below(d) => name
                .strip_suffix(d.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Exact(d) => f.write_str(d),
            DomainPattern::Below(d) => write!(f, "*.{d}"),
        }
    }
}

/// Checks a DNS name: LDH labels of 1..=63 bytes, at most 253 bytes, at
/// least two labels; returns it lowercased without a trailing dot.
fn parse_domain(s: &str) -> Option<String> {
    let d = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    if d.is_empty() || d.len() > 253 || !d.contains('.') {
        return None;
    }
    let ok = d.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    // An all-numeric last label would be an address, not a name.
    let tld_numeric = d
        .rsplit('.')
        .next()
        .is_some_and(|t| t.bytes().all(|b| b.is_ascii_digit()));
    (ok && !tld_numeric).then_some(d)
}

/// A [`NetworkSpec`] that cannot be enforced; the message names the entry
/// and says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NetworkSpecError(pub String);

/// What the node enforces for a sandbox's egress.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressPolicy {
    /// Allowed networks (win over `deny`), merged and sorted.
    pub allow: Vec<Ipv4Net>,
    /// Denied networks, merged and sorted.
    pub deny: Vec<Ipv4Net>,
    /// Allowed domains (only with `deny_all`).
    pub domains: Vec<DomainPattern>,
    /// `0.0.0.0/0` is denied: DNS goes only to the forwarder and only for
    /// allowed names.
    pub deny_all: bool,
    /// Upstream resolvers chosen by the user (empty: the host's).
    pub dns_servers: Vec<Ipv4Addr>,
}

impl EgressPolicy {
    /// Checks `spec` and compiles it; `allow_internet_access: false` adds
    /// `0.0.0.0/0` to the denied networks.
    pub fn compile(
        spec: &NetworkSpec,
        allow_internet_access: bool,
    ) -> Result<EgressPolicy, NetworkSpecError> {
        let err = |m: String| Err(NetworkSpecError(m));
        for (key, list) in [("allowOut", &spec.allow_out), ("denyOut", &spec.deny_out)] {
            if list.len() > MAX_RULES {
                return err(format!(
                    "network.{key} has {} entries; at most {MAX_RULES} are allowed",
                    list.len()
                ));
            }
        }
        let mut policy = EgressPolicy::default();
        for entry in &spec.allow_out {
            let e = entry.trim();
            if e.contains(':') {
                return err(format!(
                    "network.allowOut: '{entry}' is IPv6 (or has a port); sandboxes have IPv4 only, and entries are addresses, CIDRs or domains without ports"
                ));
            }
            if e.starts_with(|c: char| c.is_ascii_digit())
                && (e.contains('/') || e.parse::<Ipv4Addr>().is_ok())
            {
                policy.allow.push(
                    Ipv4Net::parse(e)
                        .map_err(|m| NetworkSpecError(format!("network.allowOut: {m}")))?,
                );
                continue;
            }
            let (wild, rest) = match e.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, e),
            };
            let Some(d) = parse_domain(rest) else {
                return err(format!(
                    "network.allowOut: '{entry}' is not an IPv4 address, CIDR, domain or *.domain"
                ));
            };
            policy.domains.push(if wild {
                DomainPattern::Below(d)
            } else {
                DomainPattern::Exact(d)
            });
        }
        for entry in &spec.deny_out {
            let e = entry.trim();
            if e.contains(':') {
                return err(format!(
                    "network.denyOut: '{entry}' is IPv6; sandboxes have no IPv6, so there is nothing to deny"
                ));
            }
            match Ipv4Net::parse(e) {
                Ok(net) => policy.deny.push(net),
                Err(m) if e.parse::<Ipv4Addr>().is_ok() || e.contains('/') => {
                    return err(format!("network.denyOut: {m}"));
                }
                Err(_) => {
                    return err(format!(
                        "network.denyOut: '{entry}' is not an IPv4 address or CIDR (denyOut takes no domains; deny all with 0.0.0.0/0 and allow domains in allowOut)"
                    ));
                }
            }
        }
        if !allow_internet_access {
            policy.deny.push(Ipv4Net::ALL);
        }
        policy.allow = merge(policy.allow);
        policy.deny = merge(policy.deny);
        policy.deny_all = policy.deny.first() == Some(&Ipv4Net::ALL);
        if !policy.domains.is_empty() && !policy.deny_all {
            return err(
                "network.allowOut names domains, which needs all other traffic denied: add \"0.0.0.0/0\" to network.denyOut (or set allow_internet_access to false)".into(),
            );
        }
        if spec.dns_servers.len() > MAX_DNS_SERVERS {
            return err(format!(
                "network.dnsServers has {} entries; at most {MAX_DNS_SERVERS} are allowed",
                spec.dns_servers.len()
            ));
        }
        for s in &spec.dns_servers {
            let ip: Ipv4Addr = s.trim().parse().map_err(|_| {
                NetworkSpecError(format!("network.dnsServers: '{s}' is not an IPv4 address"))
            })?;
            // The node asks these from the host itself.
            if ip.is_loopback()
                || ip.octets()[0] == 0
                || ip.is_link_local()
                || ip.is_multicast()
                || ip.is_broadcast()
            {
                return err(format!(
                    "network.dnsServers: {ip} is a loopback, link-local, multicast or reserved address; name a DNS server on the network"
                ));
            }
            policy.dns_servers.push(ip);
        }
        policy.domains.dedup();
        Ok(policy)
    }

    /// Whether the policy restricts anything.
    pub fn is_open(&self) -> bool {
        self.deny.is_empty()
    }

    /// Whether DNS may resolve `name` for this sandbox: always when not in
    /// deny-all mode, else when a domain entry matches.
    pub fn allows_name(&self, name: &str) -> bool {
        !self.deny_all || self.domains.iter().any(|d| d.matches(name))
    }

    /// Whether a connection to `ip` passes the address rules alone (allow
    /// wins over deny).
    pub fn allows_addr(&self, ip: Ipv4Addr) -> bool {
        self.allow.iter().any(|n| n.contains(ip)) || !self.deny.iter().any(|n| n.contains(ip))
    }
}

/// Sorts networks and drops those inside another, so no two overlap.
fn merge(mut nets: Vec<Ipv4Net>) -> Vec<Ipv4Net> {
    nets.sort_by_key(|n| (n.addr, n.prefix));
    let mut out: Vec<Ipv4Net> = Vec::with_capacity(nets.len());
    for n in nets {
        if let Some(last) = out.last() {
            if last.contains(n.addr) {
                continue;
            }
        }
        out.push(n);
    }
    out
}

/// How a connection attempt was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// It went out.
    Allowed,
    /// It was refused.
    Denied,
}

/// One line of a sandbox's egress log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressLogEntry {
    /// When it was seen (the first of merged repeats).
    pub timestamp: DateTime<Utc>,
    /// `tcp`, `udp`, `icmp`, `dns`, `tls` or `http`.
    pub protocol: String,
    /// Destination address (for `dns`: the resolver asked).
    pub destination: String,
    /// Destination port, when the protocol has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Name asked for or used (DNS query, TLS SNI, HTTP Host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The verdict.
    pub verdict: Verdict,
    /// Which rule decided: `allowOut`, `denyOut`, `default`, or a short
    /// reason from the DNS forwarder or the name checks.
    pub rule: String,
    /// Identical attempts merged into this entry (within one second).
    pub count: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(allow: &[&str], deny: &[&str]) -> NetworkSpec {
        NetworkSpec {
            allow_out: allow.iter().map(|s| s.to_string()).collect(),
            deny_out: deny.iter().map(|s| s.to_string()).collect(),
            dns_servers: vec![],
        }
    }

    #[test]
    fn compiles_addresses_cidrs_and_domains() {
        let p = EgressPolicy::compile(
            &spec(
                &[
                    "10.0.0.0/8",
                    "10.1.0.0/16",
                    "1.2.3.4",
                    "Allowed.Test.",
                    "*.wild.test",
                ],
                &["0.0.0.0/0", "192.168.0.0/16"],
            ),
            true,
        )
        .unwrap();
        assert_eq!(
            p.allow.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            ["1.2.3.4", "10.0.0.0/8"]
        );
        assert_eq!(p.deny, vec![Ipv4Net::ALL]);
        assert!(p.deny_all);
        assert!(p.allows_name("ALLOWED.test."));
        assert!(p.allows_name("a.wild.test"));
        assert!(p.allows_name("b.c.wild.test"));
        assert!(!p.allows_name("wild.test"));
        assert!(!p.allows_name("xwild.test"));
        assert!(!p.allows_name("denied.test"));
        assert!(p.allows_addr("10.9.9.9".parse().unwrap()));
        assert!(!p.allows_addr("11.0.0.1".parse().unwrap()));
    }

    #[test]
    fn allow_internet_access_false_denies_everything() {
        let p = EgressPolicy::compile(&NetworkSpec::default(), false).unwrap();
        assert!(p.deny_all);
        assert!(!p.is_open());
        let p = EgressPolicy::compile(&NetworkSpec::default(), true).unwrap();
        assert!(p.is_open());
        assert!(p.allows_name("anything.example"));
    }

    #[test]
    fn refuses_what_cannot_be_enforced() {
        let bad = |allow: &[&str], deny: &[&str], needle: &str| {
            let e = EgressPolicy::compile(&spec(allow, deny), true).unwrap_err();
            assert!(e.0.contains(needle), "{e} lacks {needle}");
        };
        bad(&["example.com"], &[], "0.0.0.0/0");
        bad(&["example.com"], &["10.0.0.0/8"], "0.0.0.0/0");
        bad(&[], &["example.com"], "no domains");
        bad(&["2001:db8::/32"], &[], "IPv6");
        bad(&[], &["::/0"], "IPv6");
        bad(&["10.1.2.3/24"], &[], "10.1.2.0/24");
        bad(&["10.0.0.0/33"], &[], "0 to 32");
        bad(&["exa mple.com"], &["0.0.0.0/0"], "not an IPv4");
        bad(&["*.com."], &["0.0.0.0/0"], "not an IPv4");
        bad(&["1.2.3.999"], &["0.0.0.0/0"], "not an IPv4");
        let many: Vec<String> = (0..=MAX_RULES)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        let e = EgressPolicy::compile(
            &NetworkSpec {
                allow_out: many,
                ..NetworkSpec::default()
            },
            true,
        )
        .unwrap_err();
        assert!(e.0.contains("at most 512"));
        let e = EgressPolicy::compile(
            &NetworkSpec {
                dns_servers: vec!["8.8.8.8".into(), "dns.google".into()],
                ..NetworkSpec::default()
            },
            true,
        )
        .unwrap_err();
        assert!(e.0.contains("dns.google"));
        for host_side in ["127.0.0.53", "169.254.169.254", "0.1.2.3", "224.0.0.251"] {
            let e = EgressPolicy::compile(
                &NetworkSpec {
                    dns_servers: vec![host_side.into()],
                    ..NetworkSpec::default()
                },
                true,
            )
            .unwrap_err();
            assert!(e.0.contains(host_side), "{e}");
        }
    }

    #[test]
    fn networks_parse_print_and_contain() {
        let n = Ipv4Net::parse("198.18.3.0/24").unwrap();
        assert!(n.contains("198.18.3.255".parse().unwrap()));
        assert!(!n.contains("198.18.4.0".parse().unwrap()));
        assert_eq!(n.last(), "198.18.3.255".parse::<Ipv4Addr>().unwrap());
        assert_eq!(Ipv4Net::ALL.last(), Ipv4Addr::BROADCAST);
        assert!(Ipv4Net::ALL.contains("8.8.8.8".parse().unwrap()));
        assert_eq!(Ipv4Net::parse("1.2.3.4").unwrap().to_string(), "1.2.3.4");
    }

    #[test]
    fn spec_round_trips_with_e2b_keys() {
        let s: NetworkSpec = serde_json::from_str(
            r#"{"allowOut":["a.test"],"denyOut":["0.0.0.0/0"],"dnsServers":["1.1.1.1"]}"#,
        )
        .unwrap();
        assert_eq!(s.allow_out, ["a.test"]);
        assert_eq!(
            serde_json::to_string(&NetworkSpec::default()).unwrap(),
            "{}"
        );
    }
}
