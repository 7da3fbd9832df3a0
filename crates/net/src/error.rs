//! What can go wrong while the pool drives the kernel.

use crate::cmd::CmdError;
use crate::config::ConfigError;

/// A failed step of the pool. Each variant names the step and what it was
/// touching; the command, its exit status and stderr are in the source
/// ([`CmdError`]), which also carries the operator hint when `ip` or `nft`
/// is missing.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The [`NetConfig`](crate::NetConfig) or the adopted indexes are invalid;
    /// nothing was touched.
    #[error("invalid network configuration")]
    Config(#[from] ConfigError),
    /// Writing `net.ipv4.ip_forward=1` failed.
    #[error("could not enable IPv4 forwarding")]
    EnableForwarding(#[source] CmdError),
    /// Loading the host firewall table failed.
    #[error("could not install nft table inet {table}")]
    InstallTable {
        /// Table name.
        table: String,
        /// The failed `nft` run.
        #[source]
        source: CmdError,
    },
    /// Deleting the host firewall table failed.
    #[error("could not delete nft table inet {table}")]
    DeleteTable {
        /// Table name.
        table: String,
        /// The failed `nft` run.
        #[source]
        source: CmdError,
    },
    /// Listing network namespaces or links failed.
    #[error("could not list existing network namespaces and links")]
    List(#[source] CmdError),
    /// Creating a slot's netns, veth pair, addresses or route failed; what
    /// was made of it has been removed again (best effort).
    #[error("could not create network slot {index} (netns {netns}, veth {host_ifname})")]
    CreateSlot {
        /// Slot index.
        index: u32,
        /// Its netns name.
        netns: String,
        /// Its host-side veth.
        host_ifname: String,
        /// The failed `ip` run.
        #[source]
        source: CmdError,
    },
    /// Moving a slot's interface into a sandbox's network namespace, or
    /// configuring it there, failed.
    #[error("could not give network slot {index} to the sandbox with init pid {pid}")]
    Attach {
        /// Slot index.
        index: u32,
        /// The sandbox init.
        pid: i32,
        /// The failed `ip` run.
        #[source]
        source: CmdError,
    },
    /// Deleting a slot's veth or netns failed.
    #[error("could not delete network slot {index} (netns {netns}, veth {host_ifname})")]
    DeleteSlot {
        /// Slot index.
        index: u32,
        /// Its netns name.
        netns: String,
        /// Its host-side veth.
        host_ifname: String,
        /// The failed `ip` run.
        #[source]
        source: CmdError,
    },
    /// Loading, replacing or removing a slot's egress rules, or admitting
    /// addresses into them, failed; the old rules stay (one transaction).
    #[error("could not {action} the egress rules of network slot {index}")]
    Egress {
        /// What was being done.
        action: &'static str,
        /// Slot index (the first one, for a batch).
        index: u32,
        /// The failed `nft` run.
        #[source]
        source: CmdError,
    },
    /// Every index of the cidr is in use, prepared, or being recycled.
    #[error("no free network slot: all {slots} /30 subnets of {cidr} are taken; use a larger cidr")]
    Exhausted {
        /// The configured cidr.
        cidr: String,
        /// How many slots it holds.
        slots: u32,
    },
    /// The background task making a slot for `acquire` ended without a
    /// result (it panicked, or the runtime is shutting down).
    #[error("network slot {index} preparation was abandoned")]
    Abandoned {
        /// Slot index.
        index: u32,
    },
}

pub(crate) use arca_proto::error_chain as chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_name_the_step_then_the_command() {
        let err = NetError::CreateSlot {
            index: 3,
            netns: "arca-3".into(),
            host_ifname: "arca3h".into(),
            source: CmdError::Failed {
                command: "ip -batch - [netns add arca-3]".into(),
                status: "exit status: 1".into(),
                stderr: "File exists".into(),
            },
        };
        assert_eq!(
            chain(&err),
            "could not create network slot 3 (netns arca-3, veth arca3h): \
             `ip -batch - [netns add arca-3]` failed (exit status: 1): File exists"
        );
    }
}
