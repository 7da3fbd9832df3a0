//! The host firewall as one `nft -f -` transaction.
//!
//! One table, `inet <nft_table>`, holds three base chains:
//!
//! - `input`: a sandbox reaches nothing on the host itself (any host
//!   address, any port, IPv4 or IPv6), except replies to connections the
//!   host opened (the node dialing envd). Host loopback services are out of
//!   reach anyway: 127.0.0.1 in a sandbox is its own netns's loopback.
//! - `forward`: no traffic between two sandboxes; nothing with a spoofed
//!   source (a reverse-path check: the route back to the source must be the
//!   veth it came in on, so a sandbox can use neither another slot's address
//!   nor one outside the cidr, which would leave unmasqueraded); no IPv6
//!   (slots have none); into a sandbox only replies (nothing from outside
//!   may open a connection to it; the node's proxy dials from the host,
//!   which is `output`, not `forward`).
//! - `postrouting` (nat): traffic from the cidr leaving through anything but
//!   a sandbox veth is masqueraded, so sandboxes reach the world through the
//!   host's default route with the host's address.
//!
//! The chains keep policy `accept`: a base chain's drop is final for the
//! whole host, so a drop policy here would break unrelated forwarding.
//! Not covered yet (the network-policy issue): keeping sandboxes off the
//! host's LAN and other private or link-local ranges reachable by routing,
//! and per-sandbox egress rules.
//!
//! Sandbox veths are matched by the wildcard `"{prefix}*"`: nft only allows
//! a trailing `*`, so `"{prefix}*h"` cannot be expressed (see
//! [`NetConfig`](crate::NetConfig) for what this asks of the prefix).

use crate::cmd::{Invocation, Program};
use crate::layout::Layout;

/// The table, defined from scratch. `table` then `delete table` first makes
/// the transaction succeed whether or not the table exists (nft 1.0.6 has no
/// `destroy`), so a restart replaces old rules atomically.
pub(crate) fn install_script(layout: &Layout) -> String {
    let table = layout.table();
    let veths = format!("\"{}*\"", layout.prefix());
    let cidr = layout.cidr();
    format!(
        "\
table inet {table}
delete table inet {table}
table inet {table} {{
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname {veths} ct state established,related accept
\t\tiifname {veths} drop
\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname {veths} oifname {veths} drop
\t\tiifname {veths} fib saddr . iif oif missing drop
\t\tiifname {veths} meta nfproto ipv6 drop
\t\toifname {veths} ct state established,related accept
\t\toifname {veths} drop
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr {cidr} oifname != {veths} masquerade
\t}}
}}
"
    )
}

pub(crate) fn install(layout: &Layout) -> Invocation {
    Invocation::new(Program::Nft, &["-f", "-"]).with_stdin(install_script(layout))
}

/// Deletes the table if it exists, in one transaction.
pub(crate) fn delete(layout: &Layout) -> Invocation {
    let table = layout.table();
    Invocation::new(Program::Nft, &["-f", "-"])
        .with_stdin(format!("table inet {table}\ndelete table inet {table}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NetConfig;

    #[test]
    fn install_script_is_exactly_this() {
        let layout = Layout::new(&NetConfig {
            cidr: "10.99.7.0/24".into(),
            name_prefix: "arcatx".into(),
            warm_slots: 0,
            nft_table: "arcat_x".into(),
        })
        .unwrap();
        let expected = r#"table inet arcat_x
delete table inet arcat_x
table inet arcat_x {
	chain input {
		type filter hook input priority filter; policy accept;
		iifname "arcatx*" ct state established,related accept
		iifname "arcatx*" drop
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "arcatx*" oifname "arcatx*" drop
		iifname "arcatx*" fib saddr . iif oif missing drop
		iifname "arcatx*" meta nfproto ipv6 drop
		oifname "arcatx*" ct state established,related accept
		oifname "arcatx*" drop
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 10.99.7.0/24 oifname != "arcatx*" masquerade
	}
}
"#;
        assert_eq!(install_script(&layout), expected);
        let inv = install(&layout);
        assert_eq!(inv.command_line(), "nft -f -");
        assert_eq!(inv.stdin.as_deref(), Some(expected));
        assert_eq!(
            delete(&layout).stdin.as_deref(),
            Some("table inet arcat_x\ndelete table inet arcat_x\n")
        );
    }
}
