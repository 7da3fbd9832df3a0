//! `arca-net`: network slots for Arca sandboxes.
//!
//! A slot is a named network namespace with a veth pair: `eth0` inside,
//! with the sandbox's address and a default route to the host end, which
//! sits in the root netns. Slot `i` owns the `i`-th /30 of the configured
//! cidr (host `.1`, sandbox `.2`). A [`SlotPool`] keeps some slots prepared
//! ahead so starting a sandbox does not wait for the kernel, deletes and
//! re-prepares released slots in the background, and owns the host's
//! firewall table for them (see the nft rules below). A sandbox makes a
//! network namespace of its own (its user namespace owns it, ADR 0004);
//! [`SlotPool::attach`] moves the slot's `eth0` into it and gives the slot's
//! name to it, so [`netns_path`](Slot::netns_path) is the sandbox's network
//! from then on. The node dials envd at [`sandbox_ip`](Slot::sandbox_ip).
//!
//! ```no_run
//! # async fn run() -> Result<(), arca_net::NetError> {
//! use arca_net::{NetConfig, SlotPool};
//!
//! // After a restart, pass the slot indexes of sandboxes still running.
//! let pool = SlotPool::new(NetConfig::default(), &[]).await?;
//! let slot = pool.acquire().await?;
//! println!("{} -> {} in {}", slot.host_ip, slot.sandbox_ip, slot.netns_path.display());
//! let _upstreams: Vec<std::net::Ipv4Addr> = arca_net::host_nameservers();
//! pool.release(slot);
//! pool.destroy().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # How it touches the host
//!
//! Only through `ip` (iproute2) and `nft` (nftables), run by a [`Cmd`]
//! (tests swap in `testing::RecordingRunner`, feature `test-util`, to see
//! the exact commands), and
//! one sysctl: [`SlotPool::new`] sets `net.ipv4.ip_forward=1` and says so
//! in the log; nothing turns it off again.
//!
//! # Host firewall
//!
//! One transaction loads table `inet {nft_table}`: sandboxes cannot reach
//! the host itself (any address, any port; replies to connections the host
//! opened pass), cannot reach each other, cannot spoof source addresses,
//! cannot be dialed from outside, and reach the world masqueraded behind
//! the host's address. Not yet
//! covered (the network-policy issue): keeping sandboxes off the host's LAN
//! and other private or link-local ranges that the host routes to, and
//! per-sandbox egress rules.
//!
//! # Requirements
//!
//! Root (CAP_NET_ADMIN and CAP_SYS_ADMIN for the netns mounts), iproute2,
//! nftables, a kernel with nf_tables and nat; Tokio with the process driver.
#![forbid(unsafe_code)]

mod cmd;
mod config;
mod dns;
mod error;
mod layout;
mod netlink;
mod nflog;
mod nft;
mod ops;
mod pool;
mod setelem;
#[cfg(test)]
mod test_kernel;

#[cfg(any(test, feature = "test-util"))]
#[doc(hidden)]
pub mod testing;

pub use cmd::{BoxFuture, Cmd, CmdError, Invocation, Program, SystemRunner};
pub use config::{
    ConfigError, DEFAULT_CIDR, DEFAULT_NAME_PREFIX, DEFAULT_NFT_TABLE, DEFAULT_WARM_SLOTS,
    EgressHooks, NetConfig,
};
pub use dns::{host_nameservers, nameservers_from};
pub use error::NetError;
pub use nflog::{NflogPacket, NflogReader, PacketSummary, parse_ipv4, parse_messages};
pub use nft::SlotEgress;
pub use pool::{PoolStats, Slot, SlotPool};
