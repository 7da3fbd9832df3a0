//! DNS admissions without `nft`: the transaction of
//! [`admit_script`](crate::nft::admit_script) sent straight to nf_tables
//! over a `NETLINK_NETFILTER` socket.
//!
//! An `nft` process costs ~20 ms (it fetches the whole ruleset as its
//! cache); this is one datagram out and a few acks back.
//!
//! The datagram is one nfnetlink batch (`linux/netfilter/nfnetlink.h`,
//! `linux/netfilter/nf_tables.h`): `NFNL_MSG_BATCH_BEGIN` for
//! `NFNL_SUBSYS_NFTABLES`, then per item `NFT_MSG_NEWSETELEM`,
//! `NFT_MSG_DELSETELEM`, `NFT_MSG_NEWSETELEM` (family `inet`; table, set
//! `x<i>`, one element: key = the address, timeout in milliseconds), then
//! `NFNL_MSG_BATCH_END`. The kernel applies the whole batch or nothing.
//! Every message asks for an acknowledgement; the answers to the element
//! messages come after the commit (or abort), so once all of them are in,
//! the outcome is known. An error on the batch itself (no nf_tables, no
//! privilege, a failed commit) is answered on `BATCH_BEGIN`'s sequence
//! number.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto,
    setsockopt, sockopt,
};

use crate::netlink::{
    AF_UNSPEC, NFNETLINK_V0, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NLMSG_ERROR, Writer, context,
    error_code, messages,
};
use crate::nft::MIN_ADMIT_SECS;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NLMSG_MIN_TYPE` and the next one.
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;

// `enum nf_tables_msg_types`.
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFPROTO_INET: u8 = 1;

// `enum nft_set_elem_list_attributes`.
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
// `enum nft_list_attributes`.
const NFTA_LIST_ELEM: u16 = 1;
// `enum nft_set_elem_attributes`.
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
// `enum nft_data_attributes`.
const NFTA_DATA_VALUE: u16 = 1;

/// How long to wait for the kernel's answers (normally microseconds).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
const RECV_BUF: usize = 16 * 1024;
/// Receive buffer asked for: room for every acknowledgement of a large
/// batch (each one is a separate datagram of under 1 KiB).
const MIN_RCVBUF: usize = 256 * 1024;

/// Why [`admit`] did not apply the batch.
#[derive(Debug)]
pub(crate) enum AdmitError {
    /// The kernel refused an element (the set does not exist, it has no
    /// timeout flag, ...): nothing was applied, and `nft` would fail too.
    Refused {
        /// The refused command, as `nft` would write it.
        command: String,
        /// The kernel's errno.
        source: io::Error,
    },
    /// No answer from nf_tables over netlink (no socket, batch rejected,
    /// no acknowledgement): the caller may use `nft` instead. The batch is
    /// idempotent, so trying again is safe whatever happened.
    Unavailable(io::Error),
}

/// How an address already in a set gets its new timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refresh {
    /// Add, delete, add: works on every kernel (nft 1.0.6's way), but the
    /// delete makes the kernel's commit wait (about 15 ms).
    AddDeleteAdd,
    /// One add: newer kernels update the timeout of an element that is
    /// there already (found by [`add_updates_timeout`]).
    Add,
}

impl Refresh {
    fn messages_per_item(self) -> usize {
        match self {
            Refresh::AddDeleteAdd => 3,
            Refresh::Add => 1,
        }
    }
}

/// The `nft` command of message `k` (0, 1, 2) of an item, for errors.
fn command(table: &str, (i, ip, ttl): (u32, Ipv4Addr, Duration), k: usize) -> String {
    let t = ttl.as_secs().max(MIN_ADMIT_SECS);
    if k == 1 {
        format!("delete element inet {table} x{i} {{ {ip} }}")
    } else {
        format!("add element inet {table} x{i} {{ {ip} timeout {t}s }}")
    }
}

/// The batch for `items` (slot index, address, time), sequence numbers
/// `seq` (begin), `seq + 1 + 3k ..= seq + 3 + 3k` (item `k`), and
/// `seq + 1 + 3n` (end).
pub(crate) fn batch(
    table: &str,
    items: &[(u32, Ipv4Addr, Duration)],
    seq: u32,
    refresh: Refresh,
) -> Vec<u8> {
    let flags = NLM_F_REQUEST | NLM_F_ACK;
    let [r0, r1] = NFNL_SUBSYS_NFTABLES.to_be_bytes();
    let batch_genmsg = [AF_UNSPEC, NFNETLINK_V0, r0, r1];
    let mut table_z = table.as_bytes().to_vec();
    table_z.push(0);

    let mut w = Writer::new();
    w.message(NFNL_MSG_BATCH_BEGIN, flags, seq, batch_genmsg, |_| {});
    let mut s = seq;
    for (i, ip, ttl) in items {
        let mut set = format!("x{i}").into_bytes();
        set.push(0);
        let ms = ttl.as_secs().max(MIN_ADMIT_SECS).saturating_mul(1000);
        let steps = [
            (NFT_MSG_NEWSETELEM, NLM_F_CREATE, Some(ms)),
            (NFT_MSG_DELSETELEM, 0, None),
            (NFT_MSG_NEWSETELEM, NLM_F_CREATE, Some(ms)),
        ];
        for (ty, extra, timeout) in &steps[..refresh.messages_per_item()] {
            let (ty, extra, timeout) = (*ty, *extra, *timeout);
            s = s.wrapping_add(1);
            let genmsg = [NFPROTO_INET, NFNETLINK_V0, 0, 0];
            w.message(
                NFNL_SUBSYS_NFTABLES << 8 | ty,
                flags | extra,
                s,
                genmsg,
                |m| {
                    m.attr(NFTA_SET_ELEM_LIST_TABLE, &table_z);
                    m.attr(NFTA_SET_ELEM_LIST_SET, &set);
                    m.nested(NFTA_SET_ELEM_LIST_ELEMENTS, |m| {
                        m.nested(NFTA_LIST_ELEM, |m| {
                            m.nested(NFTA_SET_ELEM_KEY, |m| {
                                m.attr(NFTA_DATA_VALUE, &ip.octets());
                            });
                            if let Some(ms) = timeout {
                                m.attr(NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
                            }
                        });
                    });
                },
            );
        }
    }
    w.message(
        NFNL_MSG_BATCH_END,
        flags,
        s.wrapping_add(1),
        batch_genmsg,
        |_| {},
    );
    w.into_bytes()
}

/// Puts `items` into the `x<i>` sets of inet table `table`, in one
/// transaction, and waits for the kernel's verdict. Blocks (for about a
/// millisecond); run it off the async executor.
pub(crate) fn admit_blocking(
    table: &str,
    items: &[(u32, Ipv4Addr, Duration)],
    refresh: Refresh,
) -> Result<(), AdmitError> {
    let per_item = refresh.messages_per_item();
    if items.is_empty() {
        return Ok(());
    }
    let unavailable = |e: io::Error| AdmitError::Unavailable(e);
    let fd = nix::sys::socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(|e| unavailable(context(e, "could not open a NETLINK_NETFILTER socket")))?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
        .map_err(|e| unavailable(context(e, "could not bind the NETLINK_NETFILTER socket")))?;
    let messages_out = items.len().saturating_mul(per_item).saturating_add(2);
    let rcvbuf = MIN_RCVBUF.max(messages_out.saturating_mul(2048));
    if setsockopt(&fd, sockopt::RcvBufForce, &rcvbuf).is_err() {
        let _ = setsockopt(&fd, sockopt::RcvBuf, &rcvbuf);
    }

    let begin: u32 = 1;
    let msg = batch(table, items, begin, refresh);
    sendto(
        fd.as_raw_fd(),
        &msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(|e| unavailable(context(e, "could not send the nf_tables batch")))?;

    // Answers still expected, per element message; the first refusal.
    let mut pending = vec![true; items.len() * per_item];
    let mut left = pending.len();
    let mut refused: Option<(u32, i32)> = None;
    let mut buf = vec![0u8; RECV_BUF];
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    while left > 0 {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Err(unavailable(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "nf_tables did not answer {left} of {} set element requests",
                    pending.len()
                ),
            )));
        }
        let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(unavailable(context(e, "poll"))),
        }
        let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) => n,
            Err(Errno::EAGAIN | Errno::EINTR) => continue,
            Err(e) => {
                return Err(unavailable(context(
                    e,
                    "reading the answers to the nf_tables batch",
                )));
            }
        };
        for (ty, seq, body) in messages(&buf[..n]) {
            if ty != NLMSG_ERROR {
                continue;
            }
            let Some(errno) = error_code(body) else {
                continue;
            };
            if seq == begin {
                if errno != 0 {
                    return Err(unavailable(context(
                        io::Error::from_raw_os_error(errno),
                        "nf_tables refused the batch",
                    )));
                }
                continue;
            }
            let Some(k) = seq
                .checked_sub(begin + 1)
                .and_then(|k| usize::try_from(k).ok())
            else {
                continue;
            };
            if let Some(p) = pending.get_mut(k).filter(|p| **p) {
                *p = false;
                left -= 1;
                if errno != 0 && refused.is_none_or(|(s, _)| seq < s) {
                    refused = Some((seq, errno));
                }
            }
        }
    }
    match refused {
        None => Ok(()),
        Some((seq, errno)) => {
            let k = usize::try_from(seq - begin - 1).unwrap_or(0);
            Err(AdmitError::Refused {
                command: command(table, items[k / per_item], k % per_item),
                source: io::Error::from_raw_os_error(errno),
            })
        }
    }
}

/// [`admit_blocking`] on Tokio's blocking pool.
pub(crate) async fn admit(
    table: &str,
    items: &[(u32, Ipv4Addr, Duration)],
    refresh: Refresh,
) -> Result<(), AdmitError> {
    let table = table.to_owned();
    let items = items.to_vec();
    tokio::task::spawn_blocking(move || admit_blocking(&table, &items, refresh))
        .await
        .unwrap_or_else(|e| Err(AdmitError::Unavailable(io::Error::other(e))))
}

/// Whether this kernel gives an element that is already in a set the
/// timeout of a new add (newer kernels do; older ones keep the old one,
/// which is why `nft` 1.0.6 needs add, delete, add). Tried on a set made
/// for it in inet table `table`, named for an index no slot has, and
/// removed again. Blocking.
pub(crate) fn add_updates_timeout(table: &str) -> Result<bool, AdmitError> {
    let nft = |script: String| -> io::Result<std::process::Output> {
        use std::io::Write as _;
        let mut child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("no stdin"))?
            .write_all(script.as_bytes())?;
        child.wait_with_output()
    };
    let made = nft(format!(
        "add set inet {table} x4294967295 {{ type ipv4_addr; flags timeout; }}\n"
    ))
    .map_err(AdmitError::Unavailable)?;
    if !made.status.success() {
        return Err(AdmitError::Unavailable(io::Error::other(
            String::from_utf8_lossy(&made.stderr).into_owned(),
        )));
    }
    let item = |secs| {
        (
            u32::MAX,
            Ipv4Addr::new(192, 0, 2, 1),
            Duration::from_secs(secs),
        )
    };
    let result = (|| {
        admit_blocking(table, &[item(60)], Refresh::Add)?;
        admit_blocking(table, &[item(3600)], Refresh::Add)?;
        let out = std::process::Command::new("nft")
            .args(["list", "set", "inet", table, "x4294967295"])
            .output()
            .map_err(AdmitError::Unavailable)?;
        Ok(String::from_utf8_lossy(&out.stdout).contains("timeout 1h"))
    })();
    let _ = nft(format!("delete set inet {table} x4294967295\n"));
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::test_kernel::{TableGuard, nft, skip_reason};

    /// A message header in host order.
    fn header(len: u32, ty: u16, flags: u16, seq: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&len.to_ne_bytes());
        h.extend_from_slice(&ty.to_ne_bytes());
        h.extend_from_slice(&flags.to_ne_bytes());
        h.extend_from_slice(&seq.to_ne_bytes());
        h.extend_from_slice(&0u32.to_ne_bytes());
        h
    }

    /// An attribute header in host order.
    fn nla(len: u16, ty: u16) -> Vec<u8> {
        [len.to_ne_bytes(), ty.to_ne_bytes()].concat()
    }

    #[test]
    fn batch_bytes_are_exactly_these() {
        let got = batch(
            "t",
            &[(5, Ipv4Addr::new(1, 2, 3, 4), Duration::from_secs(60))],
            1,
            Refresh::AddDeleteAdd,
        );
        let mut want = Vec::new();
        // BATCH_BEGIN, res_id NFNL_SUBSYS_NFTABLES (10) in network order.
        want.extend(header(20, 0x10, 0x5, 1));
        want.extend([0, 0, 0, 10]);
        for (seq, ty, flags, timeout) in [
            (2, 0x0a0c, 0x405, true),
            (3, 0x0a0e, 0x005, false),
            (4, 0x0a0c, 0x405, true),
        ] {
            let elements: u16 = if timeout { 32 } else { 20 };
            want.extend(header(16 + 4 + 8 + 8 + u32::from(elements), ty, flags, seq));
            want.extend([1, 0, 0, 0]); // NFPROTO_INET, v0, res_id 0
            want.extend(nla(6, 1));
            want.extend(b"t\0\0\0");
            want.extend(nla(7, 2));
            want.extend(b"x5\0\0");
            want.extend(nla(elements, 0x8003));
            want.extend(nla(elements - 4, 0x8001)); // NFTA_LIST_ELEM
            want.extend(nla(12, 0x8001)); // NFTA_SET_ELEM_KEY
            want.extend(nla(8, 1)); // NFTA_DATA_VALUE
            want.extend([1, 2, 3, 4]);
            if timeout {
                want.extend(nla(12, 4)); // NFTA_SET_ELEM_TIMEOUT, ms big-endian
                want.extend([0, 0, 0, 0, 0, 0, 0xea, 0x60]);
            }
        }
        want.extend(header(20, 0x11, 0x5, 5));
        want.extend([0, 0, 0, 10]);
        assert_eq!(got, want);
    }

    #[test]
    fn sequence_numbers_and_minimum_timeout() {
        let items = [
            (0, Ipv4Addr::new(10, 0, 0, 1), Duration::from_millis(10)),
            (7, Ipv4Addr::new(10, 0, 0, 2), Duration::from_secs(3600)),
        ];
        let b = batch("arca", &items, 100, Refresh::AddDeleteAdd);
        let msgs: Vec<_> = messages(&b).map(|(ty, seq, _)| (ty, seq)).collect();
        assert_eq!(
            msgs,
            vec![
                (0x10, 100),
                (0x0a0c, 101),
                (0x0a0e, 102),
                (0x0a0c, 103),
                (0x0a0c, 104),
                (0x0a0e, 105),
                (0x0a0c, 106),
                (0x11, 107),
            ]
        );
        // A sub-second time is rounded up to the 1 s `nft` gets too.
        let first = messages(&b).nth(1).unwrap().2;
        assert!(first.ends_with(&1000u64.to_be_bytes()));
        let fourth = messages(&b).nth(4).unwrap().2;
        assert!(fourth.ends_with(&3_600_000u64.to_be_bytes()));
        assert_eq!(
            command("arca", items[1], 0),
            "add element inet arca x7 { 10.0.0.2 timeout 3600s }"
        );
        assert_eq!(
            command("arca", items[1], 1),
            "delete element inet arca x7 { 10.0.0.2 }"
        );
    }

    // On the real kernel: root and nft needed, otherwise skipped (unless
    // ARCA_TEST_PRIVILEGED=1).

    fn random_table() -> String {
        use rand::Rng as _;
        let mut rng = rand::rng();
        let tag: String = (0..6)
            .map(|_| char::from(rng.random_range(b'a'..=b'z')))
            .collect();
        format!("arcatest_se_{tag}")
    }

    fn skip() -> bool {
        if let Some(reason) = skip_reason() {
            assert!(
                std::env::var("ARCA_TEST_PRIVILEGED").as_deref() != Ok("1"),
                "ARCA_TEST_PRIVILEGED=1 but the set element test cannot run: {reason}"
            );
            eprintln!("skipped: set element end-to-end test {reason}");
            return true;
        }
        false
    }

    /// A throwaway `inet` table with `set x5 { type ipv4_addr; flags timeout; }`.
    fn make_table(table: &str) -> TableGuard {
        let guard = TableGuard::new("inet", table);
        let out = nft(&format!(
            "table inet {table} {{\n\tset x5 {{ type ipv4_addr; flags timeout; }}\n}}\n"
        ));
        assert!(
            out.status.success(),
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        guard
    }

    fn list_set(table: &str) -> String {
        let out = std::process::Command::new("nft")
            .args(["list", "set", "inet", table, "x5"])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    }

    #[tokio::test]
    async fn admits_updates_and_refuses_on_the_real_kernel() {
        if skip() {
            return;
        }
        let table = random_table();
        let guard = make_table(&table);
        let a = Ipv4Addr::new(192, 0, 2, 10);
        let b = Ipv4Addr::new(192, 0, 2, 11);

        admit(
            &table,
            &[
                (5, a, Duration::from_secs(60)),
                (5, b, Duration::from_secs(120)),
            ],
            Refresh::AddDeleteAdd,
        )
        .await
        .expect("admit two addresses");
        let listed = list_set(&table);
        assert!(
            listed.contains("192.0.2.10 timeout 1m expires")
                && listed.contains("192.0.2.11 timeout 2m expires"),
            "{listed}"
        );

        admit(
            &table,
            &[(5, a, Duration::from_secs(300))],
            Refresh::AddDeleteAdd,
        )
        .await
        .expect("admit again");
        let listed = list_set(&table);
        assert!(
            listed.contains("192.0.2.10 timeout 5m expires")
                && listed.contains("192.0.2.11 timeout 2m expires"),
            "{listed}"
        );
        // The countdown restarted: over 4 minutes left.
        let expires = listed
            .split("192.0.2.10 timeout 5m expires ")
            .nth(1)
            .unwrap();
        assert!(
            expires.starts_with("4m") || expires.starts_with("5m"),
            "{listed}"
        );

        // A set that does not exist: refused, and nothing of the batch applied.
        let err = admit(
            &table,
            &[
                (5, b, Duration::from_secs(900)),
                (6, a, Duration::from_secs(60)),
            ],
            Refresh::AddDeleteAdd,
        )
        .await
        .expect_err("x6 does not exist");
        match err {
            AdmitError::Refused { command, source } => {
                assert_eq!(
                    command,
                    format!("add element inet {table} x6 {{ 192.0.2.10 timeout 60s }}")
                );
                assert_eq!(source.raw_os_error(), Some(Errno::ENOENT as i32));
            }
            AdmitError::Unavailable(e) => panic!("expected a refusal, got {e}"),
        }
        let listed = list_set(&table);
        assert!(listed.contains("192.0.2.11 timeout 2m expires"), "{listed}");

        // No such table: also refused.
        let err = admit(
            &format!("{table}_none"),
            &[(5, a, Duration::from_secs(60))],
            Refresh::AddDeleteAdd,
        )
        .await
        .expect_err("no such table");
        assert!(matches!(err, AdmitError::Refused { .. }), "{err:?}");

        // One add: on a kernel that updates timeouts in place, the new one
        // holds; the probe the pool runs says which kind of kernel this is.
        let updates = add_updates_timeout(&table).expect("probe");
        admit(&table, &[(5, b, Duration::from_secs(600))], Refresh::Add)
            .await
            .expect("add only");
        let listed = list_set(&table);
        let want = if updates {
            "timeout 10m expires"
        } else {
            "timeout 2m expires"
        };
        assert!(
            listed.contains(&format!("192.0.2.11 {want}")),
            "updates {updates}: {listed}"
        );
        eprintln!("this kernel updates set element timeouts in place: {updates}");

        drop(guard);
        let tables = std::process::Command::new("nft")
            .args(["list", "tables"])
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&tables.stdout).contains(&table));
    }

    /// Prints the cost of one admission over netlink and with `nft -f`
    /// (`cargo test -p arca-net timing -- --nocapture`); asserts nothing
    /// about time.
    #[test]
    fn timing_netlink_versus_nft() {
        if skip() {
            return;
        }
        let table = random_table();
        let _guard = make_table(&table);
        let item = (5, Ipv4Addr::new(192, 0, 2, 20), Duration::from_secs(60));
        let script: String = (0..3).map(|k| command(&table, item, k) + "\n").collect();
        const RUNS: u32 = 50;

        let started = Instant::now();
        for _ in 0..RUNS {
            admit_blocking(&table, &[item], Refresh::AddDeleteAdd).unwrap();
        }
        let netlink = started.elapsed() / RUNS;
        let started = Instant::now();
        for _ in 0..RUNS {
            admit_blocking(&table, &[item], Refresh::Add).unwrap();
        }
        let add_only = started.elapsed() / RUNS;

        let started = Instant::now();
        for _ in 0..RUNS {
            let out = nft(&script);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let nft_f = started.elapsed() / RUNS;
        eprintln!(
            "one admission: netlink add/delete/add {netlink:?}, netlink add only {add_only:?}, \
             nft -f {nft_f:?} (mean of {RUNS})"
        );
    }
}
