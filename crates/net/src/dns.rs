//! The host's name servers, which the node's DNS forwarder asks for
//! sandboxes that name none of their own (ADR 0005). Sandboxes themselves
//! resolve through the forwarder at their gateway, so loopback stubs
//! (systemd-resolved's 127.0.0.53, dnsmasq on 127.0.0.1) work for them too.

use std::net::Ipv4Addr;

/// Where the host's resolver configuration is read from.
const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";

/// The IPv4 `nameserver`s of the host's `/etc/resolv.conf` (see
/// [`nameservers_from`]); none when it cannot be read (logged).
pub fn host_nameservers() -> Vec<Ipv4Addr> {
    match std::fs::read_to_string(HOST_RESOLV_CONF) {
        Ok(text) => nameservers_from(&text),
        Err(e) => {
            tracing::warn!(path = HOST_RESOLV_CONF, error = %e, "cannot read the host's resolver configuration");
            Vec::new()
        }
    }
}

/// The `nameserver` addresses of `text` (a `resolv.conf`), in order.
///
/// Loopback stubs are kept (the forwarder runs on the host). Dropped:
/// IPv6 addresses (the forwarder asks over IPv4), `0.0.0.0`, lines that do
/// not parse, and everything that is not a `nameserver` line.
pub fn nameservers_from(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|a| a.parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_unspecified())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_ipv4_name_servers_loopback_stubs_included() {
        let host = "# generated\nsearch example.org\nnameserver 10.255.255.53\n\
                    nameserver 127.0.0.53\nnameserver ::1\nnameserver 2001:db8::1\n\
                    nameserver   1.1.1.1   # trailing\nnameserver not-an-ip\n\
                    nameserver 0.0.0.0\n#nameserver 9.9.9.9\noptions edns0\n";
        let got: Vec<String> = nameservers_from(host)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(got, ["10.255.255.53", "127.0.0.53", "1.1.1.1"]);
        assert!(nameservers_from("").is_empty());
    }
}
