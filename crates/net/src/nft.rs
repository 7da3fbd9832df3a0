//! The host firewall as `nft -f -` transactions.
//!
//! One table, `inet <nft_table>`, holds the base chains:
//!
//! - `input`: a sandbox reaches nothing on the host itself (any host
//!   address, any port, IPv4 or IPv6), except replies to connections the
//!   host opened (the node dialing envd) and the node's egress services
//!   (DNS forwarder, TLS and HTTP name checks) reached through this table's
//!   own redirects. Those services listen on every address, so other
//!   interfaces than `lo` cannot reach their ports at all.
//! - `antispoof` (filter, before everything else at `prerouting`): nothing
//!   with a spoofed source (a reverse-path check: the route back to the
//!   source must be the veth it came in on, so a sandbox can use neither
//!   another slot's address nor one outside the cidr, which would leave
//!   unmasqueraded). The node's DNS forwarder and name checks tell
//!   sandboxes apart by source address, so this comes before any of them.
//! - `prerouting` (nat): DNS to an address of the cidr (every sandbox's
//!   resolver is its gateway, and a sandbox restored on another slot keeps
//!   its old one) goes to the node's forwarder; then the sandbox's own
//!   nat chain, if it has rules (`egress_nat` map).
//! - `forward`: no traffic between two sandboxes; no IPv6
//!   (slots have none); nothing into the operator's `node_deny` networks;
//!   then the sandbox's own egress chain (`egress` map); into a sandbox only
//!   replies (nothing from outside may open a connection to it; the node's
//!   proxy dials from the host, which is `output`, not `forward`).
//! - `postrouting` (nat): traffic from the cidr leaving through anything but
//!   a sandbox veth is masqueraded, so sandboxes reach the world through the
//!   host's default route with the host's address.
//!
//! The chains keep policy `accept`: a base chain's drop is final for the
//! whole host, so a drop policy here would break unrelated forwarding.
//!
//! Per-sandbox egress rules (ADR 0005) live in objects named by the slot
//! index `i`: interval sets `a<i>` (allowed) and `d<i>` (denied), the
//! timeout set `x<i>` (addresses DNS admitted for allowed domains), the
//! chains `e<i>` (filter) and `n<i>` (nat). The map elements
//! `"<veth>" : jump e<i>` / `jump n<i>` switch them on, keyed by the host
//! veth, which a sandbox cannot change. [`slot_script`] replaces them in one
//! transaction; [`clear_slot_script`] removes them.
//!
//! Sandbox veths are matched by the wildcard `"{prefix}*"`: nft only allows
//! a trailing `*`, so `"{prefix}*h"` cannot be expressed (see
//! [`NetConfig`](crate::NetConfig) for what this asks of the prefix).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use arca_proto::network::{EgressPolicy, Ipv4Net};

use crate::cmd::{Invocation, Program};
use crate::layout::Layout;

/// Shortest timeout of a DNS admission in the firewall (nft refuses 0).
pub(crate) const MIN_ADMIT_SECS: u64 = 1;

/// Kernel verdict log: at most this many entries per second per rule.
const LOG_LIMIT: &str = "limit rate 20/second burst 40 packets";

/// The egress rules of one sandbox, as a slot gets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotEgress {
    /// The sandbox (in the verdict log's prefix, so a late log message is
    /// never taken for the slot's next owner).
    pub sandbox_id: String,
    /// What it may reach.
    pub policy: EgressPolicy,
    /// Addresses DNS admitted for allowed domains, with the time they have
    /// left (kept across a rule replace and a node restart).
    pub admitted: Vec<(Ipv4Addr, Duration)>,
}

/// `{ a, b/n, ... }` of a list of networks.
fn elements(nets: &[Ipv4Net]) -> String {
    let parts: Vec<String> = nets.iter().map(Ipv4Net::to_string).collect();
    format!("{{ {} }}", parts.join(", "))
}

/// The table, defined from scratch, with the egress objects of the given
/// slots. `table` then `delete table` first makes the transaction succeed
/// whether or not the table exists (nft 1.0.6 has no `destroy`), so a
/// restart replaces old rules atomically, and sandboxes still running keep
/// their rules without an unprotected moment.
pub(crate) fn install_script(layout: &Layout, slots: &[(u32, SlotEgress)]) -> String {
    let table = layout.table();
    let veths = format!("\"{}*\"", layout.prefix());
    let cidr = layout.cidr();
    let h = layout.egress();
    let tcp_ports = format!("{{ {}, {}, {} }}", h.dns_port, h.tls_port, h.http_port);
    let dns = h.dns_port;
    let node_deny = if layout.node_deny().is_empty() {
        String::new()
    } else {
        format!("\t\telements = {}\n", elements(layout.node_deny()))
    };
    let mut script = format!(
        "\
table inet {table}
delete table inet {table}
table inet {table} {{
\tset node_deny {{
\t\ttype ipv4_addr; flags interval; auto-merge;
{node_deny}\t}}
\tmap egress {{
\t\ttype ifname : verdict;
\t}}
\tmap egress_nat {{
\t\ttype ifname : verdict;
\t}}
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname {veths} ct state established,related accept
\t\tiifname {veths} ct status dnat udp dport {dns} accept
\t\tiifname {veths} ct status dnat tcp dport {tcp_ports} accept
\t\tiifname {veths} drop
\t\tiifname != \"lo\" udp dport {dns} drop
\t\tiifname != \"lo\" tcp dport {tcp_ports} drop
\t}}
\tchain antispoof {{
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tiifname {veths} fib saddr . iif oif missing drop
\t}}
\tchain prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname {veths} iifname vmap @egress_nat
\t\tiifname {veths} ip daddr {cidr} udp dport 53 redirect to :{dns}
\t\tiifname {veths} ip daddr {cidr} tcp dport 53 redirect to :{dns}
\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname {veths} oifname {veths} drop
\t\tiifname {veths} meta nfproto ipv6 drop
\t\tiifname {veths} ip daddr @node_deny reject with icmpx admin-prohibited
\t\tiifname {veths} iifname vmap @egress
\t\toifname {veths} ct state established,related accept
\t\toifname {veths} drop
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr {cidr} oifname != {veths} masquerade
\t}}
}}
"
    );
    for (index, egress) in slots {
        script.push_str(&slot_body(layout, *index, egress));
    }
    script
}

pub(crate) fn install(layout: &Layout, slots: &[(u32, SlotEgress)]) -> Invocation {
    Invocation::new(Program::Nft, &["-f", "-"]).with_stdin(install_script(layout, slots))
}

/// Deletes the table if it exists, in one transaction.
pub(crate) fn delete(layout: &Layout) -> Invocation {
    let table = layout.table();
    Invocation::new(Program::Nft, &["-f", "-"])
        .with_stdin(format!("table inet {table}\ndelete table inet {table}\n"))
}

/// Makes sure slot `index`'s five objects exist (`add` is idempotent).
fn ensure_objects(out: &mut String, table: &str, i: u32) {
    let _ = write!(
        out,
        "\
add set inet {table} a{i} {{ type ipv4_addr; flags interval; auto-merge; }}
add set inet {table} d{i} {{ type ipv4_addr; flags interval; auto-merge; }}
add set inet {table} x{i} {{ type ipv4_addr; flags timeout; }}
add chain inet {table} e{i}
add chain inet {table} n{i}
"
    );
}

/// Slot `index`'s objects emptied and filled with `egress`, switched on.
fn slot_body(layout: &Layout, i: u32, egress: &SlotEgress) -> String {
    let table = layout.table();
    let veth = layout.host_ifname(i);
    let h = layout.egress();
    let policy = &egress.policy;
    let log = |letter: char| {
        format!(
            "ct state new {LOG_LIMIT} log prefix \"{} {letter} \" group {} snaplen 64",
            egress.sandbox_id, h.nflog_group
        )
    };
    let mut s = String::new();
    ensure_objects(&mut s, table, i);
    let _ = write!(
        s,
        "\
flush chain inet {table} e{i}
flush chain inet {table} n{i}
flush set inet {table} a{i}
flush set inet {table} d{i}
flush set inet {table} x{i}
"
    );
    if !policy.allow.is_empty() {
        let _ = writeln!(
            s,
            "add element inet {table} a{i} {}",
            elements(&policy.allow)
        );
    }
    if !policy.deny.is_empty() {
        let _ = writeln!(
            s,
            "add element inet {table} d{i} {}",
            elements(&policy.deny)
        );
    }
    if !egress.admitted.is_empty() {
        let parts: Vec<String> = egress
            .admitted
            .iter()
            .map(|(ip, left)| format!("{ip} timeout {}s", left.as_secs().max(MIN_ADMIT_SECS)))
            .collect();
        let _ = writeln!(
            s,
            "add element inet {table} x{i} {{ {} }}",
            parts.join(", ")
        );
    }
    // Filter: allow wins over deny; a refusal is immediate (reset or ICMP).
    let e = format!("add rule inet {table} e{i}");
    let _ = write!(
        s,
        "\
{e} ip daddr @a{i} {}
{e} ip daddr @a{i} accept
{e} ip daddr @d{i} {}
{e} ip daddr @d{i} meta l4proto tcp reject with tcp reset
{e} ip daddr @d{i} reject with icmpx admin-prohibited
{e} {}
{e} accept
",
        log('A'),
        log('D'),
        log('P'),
    );
    // Nat, first packet of a flow: CIDR-allowed destinations go straight
    // out; in deny-all mode all DNS goes to the forwarder, and web traffic
    // to addresses admitted by DNS to the name checks.
    let n = format!("add rule inet {table} n{i}");
    let _ = writeln!(s, "{n} ip daddr @a{i} return");
    if policy.deny_all {
        let _ = write!(
            s,
            "\
{n} udp dport 53 redirect to :{dns}
{n} tcp dport 53 redirect to :{dns}
{n} ip daddr @x{i} tcp dport 443 redirect to :{tls}
{n} ip daddr @x{i} tcp dport 80 redirect to :{http}
",
            dns = h.dns_port,
            tls = h.tls_port,
            http = h.http_port,
        );
    }
    let _ = write!(
        s,
        "\
add element inet {table} egress {{ \"{veth}\" : jump e{i} }}
add element inet {table} egress_nat {{ \"{veth}\" : jump n{i} }}
"
    );
    s
}

/// One transaction replacing slot `index`'s egress rules: flows to
/// destinations still allowed go on, the others are cut on their next
/// packet.
pub(crate) fn slot_script(layout: &Layout, index: u32, egress: &SlotEgress) -> String {
    slot_body(layout, index, egress)
}

/// One transaction removing slot `index`'s egress objects, whether or not
/// they exist (they are made first, so every delete has something to
/// delete).
pub(crate) fn clear_slot_script(layout: &Layout, i: u32) -> String {
    let table = layout.table();
    let veth = layout.host_ifname(i);
    let mut s = String::new();
    ensure_objects(&mut s, table, i);
    let _ = write!(
        s,
        "\
add element inet {table} egress {{ \"{veth}\" : jump e{i} }}
add element inet {table} egress_nat {{ \"{veth}\" : jump n{i} }}
delete element inet {table} egress {{ \"{veth}\" }}
delete element inet {table} egress_nat {{ \"{veth}\" }}
flush chain inet {table} e{i}
flush chain inet {table} n{i}
delete chain inet {table} e{i}
delete chain inet {table} n{i}
delete set inet {table} a{i}
delete set inet {table} d{i}
delete set inet {table} x{i}
"
    );
    s
}

/// One transaction putting addresses into slots' DNS admission sets for
/// the given time. nft 1.0.6 cannot change an element's timeout, so each
/// is added, deleted and added again: the result is the new timeout
/// whether or not it was there.
pub(crate) fn admit_script(layout: &Layout, items: &[(u32, Ipv4Addr, Duration)]) -> String {
    let table = layout.table();
    let mut s = String::new();
    for (i, ip, ttl) in items {
        let t = ttl.as_secs().max(MIN_ADMIT_SECS);
        let _ = write!(
            s,
            "\
add element inet {table} x{i} {{ {ip} timeout {t}s }}
delete element inet {table} x{i} {{ {ip} }}
add element inet {table} x{i} {{ {ip} timeout {t}s }}
"
        );
    }
    s
}

pub(crate) fn script(stdin: String) -> Invocation {
    Invocation::new(Program::Nft, &["-f", "-"]).with_stdin(stdin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NetConfig;
    use arca_proto::network::NetworkSpec;

    fn layout() -> Layout {
        Layout::new(&NetConfig {
            cidr: "10.99.7.0/24".into(),
            name_prefix: "arcatx".into(),
            warm_slots: 0,
            nft_table: "arcat_x".into(),
            egress: Default::default(),
        })
        .unwrap()
    }

    fn egress(allow: &[&str], deny: &[&str], open: bool) -> SlotEgress {
        let spec = NetworkSpec {
            allow_out: allow.iter().map(|s| s.to_string()).collect(),
            deny_out: deny.iter().map(|s| s.to_string()).collect(),
            dns_servers: vec![],
        };
        SlotEgress {
            sandbox_id: "sbx1".into(),
            policy: EgressPolicy::compile(&spec, open).unwrap(),
            admitted: vec![],
        }
    }

    #[test]
    fn install_script_is_exactly_this() {
        let layout = layout();
        let expected = r#"table inet arcat_x
delete table inet arcat_x
table inet arcat_x {
	set node_deny {
		type ipv4_addr; flags interval; auto-merge;
		elements = { 100.100.100.200, 169.254.0.0/16 }
	}
	map egress {
		type ifname : verdict;
	}
	map egress_nat {
		type ifname : verdict;
	}
	chain input {
		type filter hook input priority filter; policy accept;
		iifname "arcatx*" ct state established,related accept
		iifname "arcatx*" ct status dnat udp dport 15353 accept
		iifname "arcatx*" ct status dnat tcp dport { 15353, 15443, 15080 } accept
		iifname "arcatx*" drop
		iifname != "lo" udp dport 15353 drop
		iifname != "lo" tcp dport { 15353, 15443, 15080 } drop
	}
	chain antispoof {
		type filter hook prerouting priority raw; policy accept;
		iifname "arcatx*" fib saddr . iif oif missing drop
	}
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		iifname "arcatx*" iifname vmap @egress_nat
		iifname "arcatx*" ip daddr 10.99.7.0/24 udp dport 53 redirect to :15353
		iifname "arcatx*" ip daddr 10.99.7.0/24 tcp dport 53 redirect to :15353
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "arcatx*" oifname "arcatx*" drop
		iifname "arcatx*" meta nfproto ipv6 drop
		iifname "arcatx*" ip daddr @node_deny reject with icmpx admin-prohibited
		iifname "arcatx*" iifname vmap @egress
		oifname "arcatx*" ct state established,related accept
		oifname "arcatx*" drop
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 10.99.7.0/24 oifname != "arcatx*" masquerade
	}
}
"#;
        assert_eq!(install_script(&layout, &[]), expected);
        let inv = install(&layout, &[]);
        assert_eq!(inv.command_line(), "nft -f -");
        assert_eq!(inv.stdin.as_deref(), Some(expected));
        assert_eq!(
            delete(&layout).stdin.as_deref(),
            Some("table inet arcat_x\ndelete table inet arcat_x\n")
        );
        // Adopted slots get their objects in the same transaction.
        let with = install_script(&layout, &[(3, egress(&[], &["10.0.0.0/8"], true))]);
        assert!(with.starts_with(expected));
        assert_eq!(
            &with[expected.len()..],
            slot_script(&layout, 3, &egress(&[], &["10.0.0.0/8"], true))
        );
    }

    const OBJECTS: &str = "\
add set inet arcat_x a5 { type ipv4_addr; flags interval; auto-merge; }
add set inet arcat_x d5 { type ipv4_addr; flags interval; auto-merge; }
add set inet arcat_x x5 { type ipv4_addr; flags timeout; }
add chain inet arcat_x e5
add chain inet arcat_x n5
";

    fn filter_rules() -> String {
        let log = |l: char| {
            format!(
                "ct state new limit rate 20/second burst 40 packets log prefix \"sbx1 {l} \" group 8710 snaplen 64"
            )
        };
        format!(
            "\
add rule inet arcat_x e5 ip daddr @a5 {}
add rule inet arcat_x e5 ip daddr @a5 accept
add rule inet arcat_x e5 ip daddr @d5 {}
add rule inet arcat_x e5 ip daddr @d5 meta l4proto tcp reject with tcp reset
add rule inet arcat_x e5 ip daddr @d5 reject with icmpx admin-prohibited
add rule inet arcat_x e5 {}
add rule inet arcat_x e5 accept
",
            log('A'),
            log('D'),
            log('P')
        )
    }

    const FLUSH: &str = "\
flush chain inet arcat_x e5
flush chain inet arcat_x n5
flush set inet arcat_x a5
flush set inet arcat_x d5
flush set inet arcat_x x5
";

    const SWITCH: &str = "\
add element inet arcat_x egress { \"arcatx5h\" : jump e5 }
add element inet arcat_x egress_nat { \"arcatx5h\" : jump n5 }
";

    #[test]
    fn an_open_sandbox_only_logs() {
        let got = slot_script(&layout(), 5, &egress(&[], &[], true));
        let want = format!(
            "{OBJECTS}{FLUSH}{}add rule inet arcat_x n5 ip daddr @a5 return\n{SWITCH}",
            filter_rules()
        );
        assert_eq!(got, want);
    }

    #[test]
    fn cidr_rules_fill_the_sets_and_allow_wins() {
        let got = slot_script(
            &layout(),
            5,
            &egress(
                &["198.18.3.3", "198.18.3.3/32"],
                &["198.18.3.0/24", "198.18.3.128/25"],
                true,
            ),
        );
        let want = format!(
            "{OBJECTS}{FLUSH}\
add element inet arcat_x a5 {{ 198.18.3.3 }}
add element inet arcat_x d5 {{ 198.18.3.0/24 }}
{}add rule inet arcat_x n5 ip daddr @a5 return\n{SWITCH}",
            filter_rules()
        );
        assert_eq!(got, want);
    }

    #[test]
    fn deny_all_sends_dns_and_admitted_web_traffic_to_the_node() {
        let mut e = egress(&["allowed.test", "10.1.0.0/16"], &[], false);
        e.admitted = vec![
            ("198.18.3.2".parse().unwrap(), Duration::from_secs(42)),
            ("198.18.3.9".parse().unwrap(), Duration::from_millis(10)),
        ];
        let got = slot_script(&layout(), 5, &e);
        let want = format!(
            "{OBJECTS}{FLUSH}\
add element inet arcat_x a5 {{ 10.1.0.0/16 }}
add element inet arcat_x d5 {{ 0.0.0.0/0 }}
add element inet arcat_x x5 {{ 198.18.3.2 timeout 42s, 198.18.3.9 timeout 1s }}
{}add rule inet arcat_x n5 ip daddr @a5 return
add rule inet arcat_x n5 udp dport 53 redirect to :15353
add rule inet arcat_x n5 tcp dport 53 redirect to :15353
add rule inet arcat_x n5 ip daddr @x5 tcp dport 443 redirect to :15443
add rule inet arcat_x n5 ip daddr @x5 tcp dport 80 redirect to :15080
{SWITCH}",
            filter_rules()
        );
        assert_eq!(got, want);
    }

    #[test]
    fn clearing_and_admitting_are_single_transactions() {
        let got = clear_slot_script(&layout(), 5);
        let want = format!(
            "{OBJECTS}{SWITCH}\
delete element inet arcat_x egress {{ \"arcatx5h\" }}
delete element inet arcat_x egress_nat {{ \"arcatx5h\" }}
flush chain inet arcat_x e5
flush chain inet arcat_x n5
delete chain inet arcat_x e5
delete chain inet arcat_x n5
delete set inet arcat_x a5
delete set inet arcat_x d5
delete set inet arcat_x x5
"
        );
        assert_eq!(got, want);
        let got = admit_script(
            &layout(),
            &[(5, "1.2.3.4".parse().unwrap(), Duration::from_secs(60))],
        );
        assert_eq!(
            got,
            "add element inet arcat_x x5 { 1.2.3.4 timeout 60s }\n\
             delete element inet arcat_x x5 { 1.2.3.4 }\n\
             add element inet arcat_x x5 { 1.2.3.4 timeout 60s }\n"
        );
    }
}
