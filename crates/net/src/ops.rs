//! A slot's kernel objects: the commands that make, find and remove them.
//!
//! Creating slot `i` (two processes, about 20 ms in all):
//!
//! 1. in the root netns, `ip -batch -`:
//!    `netns add {ns}`; `link add {h} type veth peer name eth0 netns {ns}`
//!    (the peer is born inside the netns, already named `eth0`, so no
//!    temporary name can collide); `addr add {host_ip}/30 dev {h}`;
//!    `link set {h} up`;
//! 2. in the slot's netns, `ip -n {ns} -batch -`:
//!    `addr add {sandbox_ip}/30 dev eth0`; `link set eth0 up`;
//!    `link set lo up`; `route add default via {host_ip}`.
//!
//! Deleting it: `ip link del {h}` first (removes both ends at once; the
//! kernel tears a netns down asynchronously, so deleting only the netns
//! could leave `{h}` around for a moment and make re-creation fail), then
//! `ip netns del {ns}`. Both tolerate the object being gone already.

use std::collections::BTreeSet;

use crate::cmd::{Cmd, CmdError, Invocation, Program};
use crate::error::NetError;
use crate::layout::{Layout, SANDBOX_IFNAME, SLOT_PREFIX_LEN};
use crate::pool::Slot;

/// The two batches that make slot `index`, `None` past the cidr's end.
pub(crate) fn create_invocations(layout: &Layout, index: u32) -> Option<[Invocation; 2]> {
    let (host_ip, sandbox_ip) = layout.addresses(index)?;
    let ns = layout.netns_name(index);
    let h = layout.host_ifname(index);
    let root = format!(
        "netns add {ns}\n\
         link add {h} type veth peer name {SANDBOX_IFNAME} netns {ns}\n\
         addr add {host_ip}/{SLOT_PREFIX_LEN} dev {h}\n\
         link set {h} up\n"
    );
    let inside = format!(
        "addr add {sandbox_ip}/{SLOT_PREFIX_LEN} dev {SANDBOX_IFNAME}\n\
         link set {SANDBOX_IFNAME} up\n\
         link set lo up\n\
         route add default via {host_ip}\n"
    );
    Some([
        Invocation::new(Program::Ip, &["-batch", "-"]).with_stdin(root),
        Invocation::new(Program::Ip, &["-n", &ns, "-batch", "-"]).with_stdin(inside),
    ])
}

/// The commands that give slot `index`'s `eth0` to the network namespace of
/// process `pid` (a sandbox's init, whose user namespace owns it) and make
/// the slot's netns name refer to that namespace:
///
/// 1. `ip -n {ns} link set eth0 netns {pid}`: out of the slot's own netns
///    (moving drops its addresses and takes it down);
/// 2. `ip netns del {ns}`: the now empty slot netns goes;
/// 3. `ip netns attach {ns} {pid}`: the name is the sandbox's netns now,
///    so `/run/netns/{ns}` keeps working for the proxy and the node;
/// 4. `ip -n {ns} -batch -`: address, `eth0` up, default route.
pub(crate) fn attach_invocations(
    layout: &Layout,
    index: u32,
    pid: &str,
) -> Option<[Invocation; 4]> {
    let (host_ip, sandbox_ip) = layout.addresses(index)?;
    let ns = layout.netns_name(index);
    let inside = format!(
        "addr add {sandbox_ip}/{SLOT_PREFIX_LEN} dev {SANDBOX_IFNAME}\n\
         link set {SANDBOX_IFNAME} up\n\
         link set lo up\n\
         route add default via {host_ip}\n"
    );
    Some([
        Invocation::new(
            Program::Ip,
            &["-n", &ns, "link", "set", SANDBOX_IFNAME, "netns", pid],
        ),
        Invocation::new(Program::Ip, &["netns", "del", &ns]),
        Invocation::new(Program::Ip, &["netns", "attach", &ns, pid]),
        Invocation::new(Program::Ip, &["-n", &ns, "-batch", "-"]).with_stdin(inside),
    ])
}

/// A POSIX shell script that does what [`attach_invocations`] does for the
/// process whose pid is in `$CRTOOLS_INIT_PID` when CRIU runs it with
/// `CRTOOLS_SCRIPT_ACTION=setup-namespaces` (CRIU's restore makes the
/// sandbox's network namespace anew, empty), and also sets the namespace's
/// sysctls the sandbox init sets at boot. Other actions do nothing. CRIU
/// runs it in the restorer's private mount namespace: it re-runs itself in
/// `host_mnt_ns` (the node's), where `/run/netns` names must be made.
pub(crate) fn attach_script(layout: &Layout, index: u32, host_mnt_ns: &str) -> Option<String> {
    const PID: &str = "@PID@";
    let steps = attach_invocations(layout, index, PID)?;
    let ns = layout.netns_name(index);
    let mut s = format!(
        "#!/bin/sh\n\
         # Written by Arca: joins a restored sandbox to its network slot.\n\
         [ \"$CRTOOLS_SCRIPT_ACTION\" = setup-namespaces ] || exit 0\n\
         set -e\n\
         if [ -z \"$ARCA_HOST_MNT\" ]; then\n\
         \x20 ARCA_HOST_MNT=1 exec nsenter --mount={host_mnt_ns} -- \"$0\"\n\
         fi\n\
         pid=\"$CRTOOLS_INIT_PID\"\n"
    );
    for step in &steps {
        s.push_str(step.program.name());
        for a in &step.args {
            s.push(' ');
            if a == PID {
                s.push_str("\"$pid\"");
            } else {
                s.push_str(a);
            }
        }
        if let Some(stdin) = &step.stdin {
            s.push_str(" <<'ARCA_EOF'\n");
            s.push_str(stdin);
            s.push_str("ARCA_EOF");
        }
        s.push('\n');
    }
    s.push_str(&format!(
        "ip netns exec {ns} sh -c 'echo 0 > /proc/sys/net/ipv4/ip_unprivileged_port_start; \
         echo \"0 2147483647\" > /proc/sys/net/ipv4/ping_group_range'\n"
    ));
    Some(s)
}

fn delete_link(layout: &Layout, index: u32) -> Invocation {
    Invocation::new(Program::Ip, &["link", "del", &layout.host_ifname(index)])
}

fn delete_netns(layout: &Layout, index: u32) -> Invocation {
    Invocation::new(Program::Ip, &["netns", "del", &layout.netns_name(index)])
}

/// Makes slot `index`. On failure removes what was made (best effort) and
/// reports the failed step.
pub(crate) async fn create_slot(
    runner: &dyn Cmd,
    layout: &Layout,
    index: u32,
) -> Result<Slot, NetError> {
    let (Some(slot), Some(steps)) = (layout.slot(index), create_invocations(layout, index)) else {
        return Err(NetError::Exhausted {
            cidr: layout.cidr().to_owned(),
            slots: layout.slots(),
        });
    };
    for step in &steps {
        if let Err(source) = runner.run(step).await {
            if let Err(e) = delete_slot(runner, layout, index).await {
                tracing::warn!(index, error = %crate::error::chain(&e), "cleanup of a half-made slot failed");
            }
            return Err(NetError::CreateSlot {
                index,
                netns: slot.netns_name,
                host_ifname: slot.host_ifname,
                source,
            });
        }
    }
    Ok(slot)
}

/// Removes slot `index`'s veth pair and netns; absent objects are fine.
pub(crate) async fn delete_slot(
    runner: &dyn Cmd,
    layout: &Layout,
    index: u32,
) -> Result<(), NetError> {
    let fail = |source| NetError::DeleteSlot {
        index,
        netns: layout.netns_name(index),
        host_ifname: layout.host_ifname(index),
        source,
    };
    match runner.run(&delete_link(layout, index)).await {
        Ok(_) => {}
        Err(e) if e.stderr().contains("Cannot find device") => {}
        Err(e) => return Err(fail(e)),
    }
    match runner.run(&delete_netns(layout, index)).await {
        Ok(_) => Ok(()),
        Err(e) if e.stderr().contains("No such file or directory") => Ok(()),
        Err(e) => Err(fail(e)),
    }
}

/// Indexes of our netns and our host veths currently in the kernel.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Found {
    pub(crate) netns: BTreeSet<u32>,
    pub(crate) links: BTreeSet<u32>,
}

impl Found {
    pub(crate) fn all(&self) -> BTreeSet<u32> {
        self.netns.union(&self.links).copied().collect()
    }
}

pub(crate) const LIST_NETNS: [&str; 2] = ["netns", "list"];
pub(crate) const LIST_LINKS: [&str; 3] = ["-o", "link", "show"];

pub(crate) async fn list_ours(runner: &dyn Cmd, layout: &Layout) -> Result<Found, CmdError> {
    let netns = runner
        .run(&Invocation::new(Program::Ip, &LIST_NETNS))
        .await?;
    let links = runner
        .run(&Invocation::new(Program::Ip, &LIST_LINKS))
        .await?;
    Ok(Found {
        // `arca-3 (id: 2)` or just `arca-3`.
        netns: netns
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|name| layout.parse_netns(name))
            .collect(),
        // `7: arca3h@if2: <BROADCAST,...> ...`
        links: links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .filter_map(|name| name.split('@').next())
            .filter_map(|name| layout.parse_host_ifname(name))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NetConfig;
    use crate::testing::RecordingRunner;

    fn layout() -> Layout {
        Layout::new(&NetConfig {
            cidr: "10.99.4.0/24".into(),
            name_prefix: "arcatq".into(),
            warm_slots: 0,
            nft_table: "arcatq".into(),
            egress: Default::default(),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn create_runs_two_batches_with_these_exact_lines() {
        let r = RecordingRunner::new();
        let slot = create_slot(&r, &layout(), 5).await.unwrap();
        assert_eq!(slot.sandbox_ip.to_string(), "10.99.4.22");
        assert_eq!(
            r.lines(),
            [
                "ip -batch - [netns add arcatq-5; \
                 link add arcatq5h type veth peer name eth0 netns arcatq-5; \
                 addr add 10.99.4.21/30 dev arcatq5h; link set arcatq5h up]",
                "ip -n arcatq-5 -batch - [addr add 10.99.4.22/30 dev eth0; \
                 link set eth0 up; link set lo up; route add default via 10.99.4.21]",
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_step_cleans_up_and_names_the_slot() {
        let r = RecordingRunner::new();
        r.fail(
            "ip -n arcatq-1 -batch -",
            "RTNETLINK answers: Invalid argument",
        );
        r.fail("ip link del arcatq1h", "Cannot find device \"arcatq1h\"");
        let err = create_slot(&r, &layout(), 1).await.unwrap_err();
        let NetError::CreateSlot {
            index: 1,
            netns,
            source,
            ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(netns, "arcatq-1");
        assert_eq!(source.stderr(), "RTNETLINK answers: Invalid argument");
        assert_eq!(
            r.lines()[2..],
            ["ip link del arcatq1h", "ip netns del arcatq-1"]
        );
    }

    #[tokio::test]
    async fn delete_tolerates_gone_objects_but_not_other_failures() {
        let r = RecordingRunner::new();
        r.fail("ip link del arcatq2h", "Cannot find device \"arcatq2h\"");
        r.fail(
            "ip netns del arcatq-2",
            "Cannot remove namespace file \"/run/netns/arcatq-2\": No such file or directory",
        );
        delete_slot(&r, &layout(), 2).await.unwrap();
        r.fail(
            "ip netns del arcatq-2",
            "Cannot remove namespace file: Device or resource busy",
        );
        let err = delete_slot(&r, &layout(), 2).await.unwrap_err();
        assert!(
            matches!(err, NetError::DeleteSlot { index: 2, .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn listing_keeps_only_our_names() {
        let r = RecordingRunner::new();
        r.respond(
            "ip netns list",
            "arcatq-3 (id: 1)\narcatq-10\narcatqz-1 (id: 4)\nother\narcatq-x\n",
        );
        r.respond(
            "ip -o link show",
            "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536\\    link/loopback\n\
             4: eth0: <BROADCAST> mtu 1400\n\
             7: arcatq3h@if2: <BROADCAST,MULTICAST,UP> mtu 1500 link-netns arcatq-3\n\
             8: arcatq7h@if2: <BROADCAST> mtu 1500\n\
             9: arcatqz1h@if2: <BROADCAST> mtu 1500\n",
        );
        let found = list_ours(&r, &layout()).await.unwrap();
        assert_eq!(found.netns, BTreeSet::from([3, 10]));
        assert_eq!(found.links, BTreeSet::from([3, 7]));
        assert_eq!(found.all(), BTreeSet::from([3, 7, 10]));
    }
}
