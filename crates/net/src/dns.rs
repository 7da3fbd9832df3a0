//! Name servers for sandboxes.

use std::net::IpAddr;

/// Where the host's resolver configuration is read from.
const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";

/// A `resolv.conf` for sandboxes: the `nameserver` lines of the host's
/// `/etc/resolv.conf` that a sandbox can reach (see [`resolv_conf_from`]).
///
/// An empty string means no usable name server: the host resolves through
/// a loopback stub (systemd-resolved's 127.0.0.53, dnsmasq on 127.0.0.1),
/// which a sandbox cannot reach (127.0.0.1 in its netns is its own
/// loopback, and the host's input chain drops sandbox traffic anyway). Such
/// hosts need a DNS forwarder on the node, listening on each slot's host
/// address (a future issue); until then sandboxes there have no DNS. An
/// unreadable `/etc/resolv.conf` also gives an empty string.
pub fn resolv_conf() -> String {
    match std::fs::read_to_string(HOST_RESOLV_CONF) {
        Ok(text) => resolv_conf_from(&text),
        Err(e) => {
            tracing::warn!(path = HOST_RESOLV_CONF, error = %e, "cannot read the host's resolver configuration");
            String::new()
        }
    }
}

/// The `nameserver` lines of `host` (a `resolv.conf` text) that sandboxes
/// can use, each as `nameserver <addr>\n`, in order.
///
/// Dropped: loopback addresses (unreachable from a netns), IPv6 addresses
/// (slots have no IPv6 route, so they would only add resolver timeouts),
/// and lines that do not parse. Everything else (`search`, `options`) is
/// left out too.
pub fn resolv_conf_from(host: &str) -> String {
    let mut out = String::new();
    for line in host.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(Ok(IpAddr::V4(addr))) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        if !addr.is_loopback() && !addr.is_unspecified() {
            out.push_str(&format!("nameserver {addr}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_reachable_ipv4_name_servers_only() {
        let host = "# generated\nsearch example.org\nnameserver 10.255.255.53\n\
                    nameserver 127.0.0.53\nnameserver ::1\nnameserver 2001:db8::1\n\
                    nameserver   1.1.1.1   # trailing\nnameserver not-an-ip\n\
                    nameserver 0.0.0.0\n#nameserver 9.9.9.9\noptions edns0\n";
        assert_eq!(
            resolv_conf_from(host),
            "nameserver 10.255.255.53\nnameserver 1.1.1.1\n"
        );
    }

    #[test]
    fn a_loopback_stub_only_host_gives_nothing() {
        assert_eq!(
            resolv_conf_from("nameserver 127.0.0.53\noptions edns0 trust-ad\n"),
            ""
        );
        assert_eq!(resolv_conf_from(""), "");
    }
}
