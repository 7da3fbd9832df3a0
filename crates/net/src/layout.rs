//! Index arithmetic: which names and addresses slot `i` has, and which
//! kernel objects are ours. Pure functions of a validated [`NetConfig`].

use std::net::Ipv4Addr;
use std::path::PathBuf;

use arca_proto::network::Ipv4Net;

use crate::config::{ConfigError, EgressHooks, NetConfig};
use crate::pool::Slot;

/// Prefix length of every slot's subnet: host `.1`, sandbox `.2`.
pub(crate) const SLOT_PREFIX_LEN: u8 = 30;
/// Where `ip netns add` mounts named network namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";
/// Name of the sandbox's interface inside its netns.
pub(crate) const SANDBOX_IFNAME: &str = "eth0";
/// Longest interface name the kernel takes (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;
/// Longest nft table name we accept (the kernel allows 256; ours is short).
const MAX_TABLE_LEN: usize = 64;

/// A validated [`NetConfig`]: where every slot's names and addresses come from.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    cidr: String,
    network: u32,
    slots: u32,
    prefix: String,
    table: String,
    egress: EgressHooks,
    node_deny: Vec<Ipv4Net>,
}

impl Layout {
    pub(crate) fn new(config: &NetConfig) -> Result<Self, ConfigError> {
        let (network, prefix_len) = parse_cidr(&config.cidr).ok_or_else(|| ConfigError::Cidr {
            cidr: config.cidr.clone(),
        })?;
        let slots = 1u32 << (SLOT_PREFIX_LEN - prefix_len);
        let prefix = &config.name_prefix;
        let first_last_letter = prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix.ends_with(|c: char| c.is_ascii_lowercase());
        if !first_last_letter
            || !prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(ConfigError::NamePrefix {
                prefix: prefix.clone(),
            });
        }
        let longest = format!("{prefix}{}h", slots - 1);
        if longest.len() > MAX_IFNAME_LEN {
            return Err(ConfigError::NameTooLong {
                prefix: prefix.clone(),
                slots,
                longest,
            });
        }
        let table = &config.nft_table;
        if table.len() > MAX_TABLE_LEN
            || !table.starts_with(|c: char| c.is_ascii_alphabetic())
            || !table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(ConfigError::NftTable {
                table: table.clone(),
            });
        }
        let mut node_deny = Vec::new();
        for entry in &config.egress.node_deny {
            node_deny.push(Ipv4Net::parse(entry).map_err(|_| ConfigError::NodeDeny {
                entry: entry.clone(),
            })?);
        }
        node_deny.sort();
        Ok(Self {
            egress: config.egress.clone(),
            node_deny,
            cidr: config.cidr.clone(),
            network,
            slots,
            prefix: prefix.clone(),
            table: table.clone(),
        })
    }

    /// The cidr as configured.
    pub(crate) fn cidr(&self) -> &str {
        &self.cidr
    }

    /// How many /30 slots the cidr holds; valid indexes are `0..slots`.
    pub(crate) fn slots(&self) -> u32 {
        self.slots
    }

    pub(crate) fn egress(&self) -> &EgressHooks {
        &self.egress
    }

    /// Networks denied to every sandbox.
    pub(crate) fn node_deny(&self) -> &[Ipv4Net] {
        &self.node_deny
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn table(&self) -> &str {
        &self.table
    }

    pub(crate) fn netns_name(&self, index: u32) -> String {
        format!("{}-{index}", self.prefix)
    }

    pub(crate) fn host_ifname(&self, index: u32) -> String {
        format!("{}{index}h", self.prefix)
    }

    /// The slot whose sandbox address is `ip`, if any.
    pub(crate) fn index_of_sandbox_ip(&self, ip: Ipv4Addr) -> Option<u32> {
        let offset = u32::from(ip).checked_sub(self.network)?;
        (offset % 4 == 2 && offset / 4 < self.slots).then_some(offset / 4)
    }

    /// Host and sandbox address of slot `index`, `None` past the cidr's end.
    pub(crate) fn addresses(&self, index: u32) -> Option<(Ipv4Addr, Ipv4Addr)> {
        if index >= self.slots {
            return None;
        }
        // Cannot overflow: network + 4 * (slots - 1) + 3 is the cidr's last address.
        let base = self.network + index * 4;
        Some((Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2)))
    }

    /// Everything the node needs to know about slot `index`.
    pub(crate) fn slot(&self, index: u32) -> Option<Slot> {
        let (host_ip, sandbox_ip) = self.addresses(index)?;
        let netns_name = self.netns_name(index);
        Some(Slot {
            index,
            netns_path: PathBuf::from(NETNS_DIR).join(&netns_name),
            netns_name,
            host_ifname: self.host_ifname(index),
            host_ip,
            sandbox_ip,
            prefix_len: SLOT_PREFIX_LEN,
        })
    }

    /// The slot index if `name` is one of our netns names (`{prefix}-{i}`).
    pub(crate) fn parse_netns(&self, name: &str) -> Option<u32> {
        parse_index(name.strip_prefix(&self.prefix)?.strip_prefix('-')?)
    }

    /// The slot index if `name` is one of our host veth names (`{prefix}{i}h`).
    pub(crate) fn parse_host_ifname(&self, name: &str) -> Option<u32> {
        parse_index(name.strip_prefix(&self.prefix)?.strip_suffix('h')?)
    }
}

/// Canonical decimal only ("07" is not ours: we never write it).
fn parse_index(digits: &str) -> Option<u32> {
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

/// `a.b.c.d/len` -> (network as u32, len), requiring len 1..=30 and no host bits.
fn parse_cidr(cidr: &str) -> Option<(u32, u8)> {
    let (addr, len) = cidr.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    if !(1..=SLOT_PREFIX_LEN).contains(&len) {
        return None;
    }
    let network = u32::from(addr);
    let host_mask = u32::MAX >> len;
    (network & host_mask == 0).then_some((network, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(cidr: &str, prefix: &str) -> Result<Layout, ConfigError> {
        Layout::new(&NetConfig {
            cidr: cidr.into(),
            name_prefix: prefix.into(),
            ..NetConfig::default()
        })
    }

    #[test]
    fn slot_i_is_the_ith_slash_30_with_host_dot_1_and_sandbox_dot_2() {
        let l = layout("10.88.0.0/16", "arca").unwrap();
        assert_eq!(l.slots(), 16384);
        let s = l.slot(0).unwrap();
        assert_eq!(s.host_ip, Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(s.sandbox_ip, Ipv4Addr::new(10, 88, 0, 2));
        assert_eq!(s.prefix_len, 30);
        assert_eq!(s.netns_name, "arca-0");
        assert_eq!(s.netns_path, PathBuf::from("/run/netns/arca-0"));
        assert_eq!(s.host_ifname, "arca0h");
        let s = l.slot(1).unwrap();
        assert_eq!(
            (s.host_ip, s.sandbox_ip),
            ("10.88.0.5".parse().unwrap(), "10.88.0.6".parse().unwrap())
        );
        let s = l.slot(64).unwrap();
        assert_eq!(
            (s.host_ip, s.sandbox_ip),
            ("10.88.1.1".parse().unwrap(), "10.88.1.2".parse().unwrap())
        );
        let last = l.slot(16383).unwrap();
        assert_eq!(last.host_ip, Ipv4Addr::new(10, 88, 255, 253));
        assert_eq!(last.sandbox_ip, Ipv4Addr::new(10, 88, 255, 254));
        assert_eq!(last.host_ifname, "arca16383h");
        assert!(l.slot(16384).is_none());
    }

    #[test]
    fn small_cidrs_bound_the_index() {
        let l = layout("10.99.3.0/24", "arcat").unwrap();
        assert_eq!(l.slots(), 64);
        assert_eq!(
            l.slot(63).unwrap().sandbox_ip,
            Ipv4Addr::new(10, 99, 3, 254)
        );
        assert!(l.slot(64).is_none());
        let one = layout("192.168.7.4/30", "arca").unwrap();
        assert_eq!(one.slots(), 1);
        assert_eq!(one.slot(0).unwrap().host_ip, Ipv4Addr::new(192, 168, 7, 5));
        assert!(one.slot(1).is_none());
    }

    #[test]
    fn bad_cidrs_are_rejected() {
        for bad in [
            "10.88.0.1/16",
            "10.88.0.0/31",
            "10.88.0.0/32",
            "10.88.0.0/0",
            "10.88.0.0",
            "10.88.0/16",
            "10.88.0.0/+16",
            "10.88.0.0/",
            "fd00::/64",
            "",
        ] {
            assert_eq!(
                layout(bad, "arca").unwrap_err(),
                ConfigError::Cidr { cidr: bad.into() },
                "{bad}"
            );
        }
    }

    #[test]
    fn prefixes_must_parse_back_and_fit_ifnamsiz() {
        for bad in ["", "Arca", "arca1", "1arca", "ar-ca", "arca_", "ärca"] {
            assert!(
                matches!(
                    layout("10.88.0.0/16", bad),
                    Err(ConfigError::NamePrefix { .. })
                ),
                "{bad}"
            );
        }
        assert!(layout("10.88.0.0/16", "a1b").is_ok());
        // 9 letters + "16383h" = 15 bytes: fits; 10 letters does not.
        assert!(layout("10.88.0.0/16", "abcdefghi").is_ok());
        assert_eq!(
            layout("10.88.0.0/16", "abcdefghij").unwrap_err(),
            ConfigError::NameTooLong {
                prefix: "abcdefghij".into(),
                slots: 16384,
                longest: "abcdefghij16383h".into()
            }
        );
        assert!(layout("10.88.0.0/24", "abcdefghijkl").is_ok());
    }

    #[test]
    fn table_names_are_plain_identifiers() {
        let mk = |t: &str| {
            Layout::new(&NetConfig {
                nft_table: t.into(),
                egress: Default::default(),
                ..NetConfig::default()
            })
        };
        assert!(mk("arca_test1").is_ok());
        for bad in ["", "1arca", "arca table", "arca;", "a\"b", &"a".repeat(65)] {
            assert!(
                matches!(mk(bad), Err(ConfigError::NftTable { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_our_exact_names_parse_back() {
        let l = layout("10.88.0.0/16", "arca").unwrap();
        assert_eq!(l.parse_netns("arca-0"), Some(0));
        assert_eq!(l.parse_netns("arca-123"), Some(123));
        assert_eq!(l.parse_host_ifname("arca123h"), Some(123));
        for other in [
            "arca-", "arca-01", "arca-1x", "arcat-1", "arca1", "arca-1h", "xarca-1",
        ] {
            assert_eq!(l.parse_netns(other), None, "{other}");
        }
        for other in [
            "arcah",
            "arca01h",
            "arcatest1h",
            "arca1",
            "arca-1h",
            "eth0",
            "arca1hh",
        ] {
            assert_eq!(l.parse_host_ifname(other), None, "{other}");
        }
    }
}
