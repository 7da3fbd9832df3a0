//! The pool's settings, as the node passes them in, and what makes them invalid.

/// Default address range the slots are cut from: 16384 slots of a /30 each.
pub const DEFAULT_CIDR: &str = "10.88.0.0/16";
/// Default prefix of the names of every kernel object the pool makes.
pub const DEFAULT_NAME_PREFIX: &str = "arca";
/// Default number of slots kept prepared ahead of `acquire`.
pub const DEFAULT_WARM_SLOTS: usize = 8;
/// Default name of the host nftables table (family `inet`).
pub const DEFAULT_NFT_TABLE: &str = "arca";

/// Settings of a [`SlotPool`](crate::SlotPool).
///
/// Names: slot `i` lives in the netns `{name_prefix}-{i}` (mounted at
/// `/run/netns/{name_prefix}-{i}`) and is reached through the host-side veth
/// `{name_prefix}{i}h`. Everything in the root netns whose name has the
/// pattern is treated as the pool's own: at start-up whatever is not adopted
/// is deleted. The host firewall matches the pool's veths with the nft
/// wildcard `"{name_prefix}*"` (nft only allows a trailing `*`), so the
/// prefix must not be the start of any other interface name on the host,
/// including another pool's prefix (`arca` and `arcax` must not run side by
/// side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// IPv4 range the slots are cut from, network address first
    /// (`10.88.0.0/16`); slot `i` gets the `i`-th /30. Prefix length 1..=30.
    pub cidr: String,
    /// Lower-case ASCII letters and digits, starting and ending with a
    /// letter (so `{prefix}{index}h` parses back unambiguously), short enough
    /// that the longest veth name fits the kernel's 15 bytes.
    pub name_prefix: String,
    /// Slots prepared ahead so `acquire` does not wait for the kernel (about
    /// 20 ms per slot). 0 makes every `acquire` create its slot.
    pub warm_slots: usize,
    /// Name of the `inet` table holding the pool's rules: ASCII letters,
    /// digits and `_`, starting with a letter, at most 64 bytes.
    pub nft_table: String,
    /// Where the node's egress services listen and the firewall logs.
    pub egress: EgressHooks,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            cidr: DEFAULT_CIDR.to_owned(),
            name_prefix: DEFAULT_NAME_PREFIX.to_owned(),
            warm_slots: DEFAULT_WARM_SLOTS,
            nft_table: DEFAULT_NFT_TABLE.to_owned(),
            egress: EgressHooks::default(),
        }
    }
}

/// The node's egress services as the firewall sees them (ADR 0005): DNS
/// from sandboxes is redirected to `dns_port`; in domain mode, TCP 443 and
/// 80 to addresses admitted by DNS go to `tls_port` and `http_port`, where
/// the name is checked. All three listen on every host address, so the
/// input chain lets sandboxes reach them only through these redirects and
/// other interfaces (except `lo`) not at all. Verdicts are logged to
/// nflog group `nflog_group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressHooks {
    /// DNS forwarder, UDP and TCP.
    pub dns_port: u16,
    /// TLS name check.
    pub tls_port: u16,
    /// HTTP name check.
    pub http_port: u16,
    /// nflog group of the verdict log.
    pub nflog_group: u16,
    /// Networks no sandbox reaches whatever its rules (operator setting;
    /// default the link-local range, where most clouds' metadata services
    /// are, and Alibaba Cloud's metadata address).
    pub node_deny: Vec<String>,
}

impl Default for EgressHooks {
    fn default() -> Self {
        Self {
            dns_port: 15353,
            tls_port: 15443,
            http_port: 15080,
            nflog_group: 8710,
            node_deny: vec!["169.254.0.0/16".to_owned(), "100.100.100.200".to_owned()],
        }
    }
}

/// A [`NetConfig`] that cannot be used; nothing was touched on the host.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `cidr` is not `a.b.c.d/len` with `len` in 1..=30 and no host bits set.
    #[error("cidr {cidr:?} is not an IPv4 network a.b.c.d/len with len 1..=30 and no host bits")]
    Cidr {
        /// The rejected value.
        cidr: String,
    },
    /// `name_prefix` has characters other than `[a-z0-9]`, or does not start
    /// and end with a letter.
    #[error(
        "name prefix {prefix:?} must be lower-case ASCII letters and digits, starting and ending with a letter"
    )]
    NamePrefix {
        /// The rejected value.
        prefix: String,
    },
    /// The veth name of the last slot would be longer than the kernel allows.
    #[error(
        "name prefix {prefix:?} is too long for {slots} slots: veth name {longest:?} exceeds 15 bytes"
    )]
    NameTooLong {
        /// The rejected prefix.
        prefix: String,
        /// Number of slots in the cidr.
        slots: u32,
        /// The name that does not fit.
        longest: String,
    },
    /// `nft_table` is not a plain identifier.
    #[error(
        "nft table name {table:?} must be ASCII letters, digits or '_', starting with a letter, at most 64 bytes"
    )]
    NftTable {
        /// The rejected value.
        table: String,
    },
    /// An entry of `egress.node_deny` is not an IPv4 address or network.
    #[error(
        "node deny entry {entry:?} is not an IPv4 address or a.b.c.d/len network without host bits"
    )]
    NodeDeny {
        /// The rejected entry.
        entry: String,
    },
    /// An index given to adopt does not belong to the cidr.
    #[error("cannot adopt slot {index}: the cidr only has {slots} slots")]
    AdoptOutOfRange {
        /// The rejected index.
        index: u32,
        /// Number of slots in the cidr.
        slots: u32,
    },
}
