//! The DNS forwarder's sockets: one UDP socket and one TCP listener on the
//! same port.
//!
//! Queries arrive through nft `redirect`, so the reply goes back from the
//! same socket to the query's source and conntrack gives it the source
//! address the sandbox asked. The sandbox is found by the source address;
//! unknown sources get REFUSED. Each query runs in its own task under a
//! per-sandbox and a node-wide limit; queries over the limit are dropped
//! and the client retries.

pub(crate) mod forwarder;
pub(crate) mod upstream;
pub(crate) mod wire;

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt, sockopt};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::Shared;
use forwarder::{Transport, answer};
use upstream::{read_framed, write_framed};
use wire::{Header, Message, flag, rcode};

/// Largest query datagram read; anything longer is not a query we answer.
const MAX_QUERY: usize = 4096;

/// Serves DNS over UDP until shutdown.
pub(crate) async fn serve_udp(socket: UdpSocket, shared: Arc<Shared>) {
    // Ask the kernel for each datagram's destination address: it is what
    // the sandbox reached (after redirection, the host side of its veth),
    // and goes into the log.
    if let Err(e) = setsockopt(&socket, sockopt::Ipv4OrigDstAddr, &true) {
        tracing::warn!(err = %e, "IP_RECVORIGDSTADDR unavailable; DNS log entries show the bind address");
    }
    let socket = Arc::new(socket);
    let fallback = match socket.local_addr() {
        Ok(SocketAddr::V4(a)) => *a.ip(),
        _ => Ipv4Addr::UNSPECIFIED,
    };
    let mut buf = vec![0u8; MAX_QUERY];
    loop {
        let received = tokio::select! {
            r = recv(&socket, &mut buf) => r,
            () = shared.shutdown.cancelled() => return,
        };
        let (len, source, local) = match received {
            Ok(Some(r)) => r,
            // Oversized datagram: dropped.
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(err = %e, "DNS recvmsg failed");
                // Do not spin on a persistent error.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        // Nothing in this loop waits per datagram before the quota check:
        // the lookup is synchronous (`Enforcer::sandbox` must not block) and
        // a refusal is sent without waiting (dropped if the socket's buffer
        // is full), so a flood from one source cannot stall the others.
        let query = &buf[..len];
        let Some(view) = shared.sandbox(*source.ip()) else {
            if let Some(refused) = refusal(query) {
                let _ = socket.try_send_to(&refused, SocketAddr::V4(source));
            }
            continue;
        };
        let Some(permit) = shared.queries.try_acquire(&view.id) else {
            tracing::debug!(sandbox_id = %view.id, "DNS query limit reached; dropping a query");
            continue;
        };
        let query = query.to_vec();
        let resolver = local.unwrap_or(fallback);
        let socket = socket.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(reply) = answer(&shared, &view, resolver, &query, Transport::Udp).await {
                if let Err(e) = socket.send_to(&reply, SocketAddr::V4(source)).await {
                    tracing::debug!(sandbox_id = %view.id, err = %e, "DNS reply not sent");
                }
            }
        });
    }
}

/// Receives one datagram with its source and destination addresses;
/// `None` when it did not fit the buffer.
async fn recv(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<Option<(usize, SocketAddrV4, Option<Ipv4Addr>)>> {
    socket
        .async_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(&mut *buf)];
            let mut cmsg = nix::cmsg_space!(nix::libc::sockaddr_in);
            let msg = recvmsg::<SockaddrIn>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )?;
            if msg.flags.contains(MsgFlags::MSG_TRUNC) {
                return Ok(None);
            }
            let Some(source) = msg.address else {
                return Ok(None);
            };
            let mut local = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::Ipv4OrigDstAddr(sa) = c {
                        local = Some(*SocketAddrV4::from(SockaddrIn::from(sa)).ip());
                    }
                }
            }
            Ok(Some((msg.bytes, SocketAddrV4::from(source), local)))
        })
        .await
}

/// REFUSED for a query from an unknown source (nothing for non-queries).
fn refusal(query: &[u8]) -> Option<Vec<u8>> {
    let header = Header::peek(query)?;
    if header.flags & flag::QR != 0 {
        return None;
    }
    let mut m = match Message::parse(query) {
        Ok(q) => Message::response_to(&q, rcode::REFUSED),
        Err(_) => Message {
            id: header.id,
            flags: flag::QR,
            ..Message::default()
        },
    };
    m.set_rcode(rcode::REFUSED);
    m.encode().ok()
}

/// Serves DNS over TCP until shutdown.
pub(crate) async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shared.shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(err = %e, "DNS TCP accept failed");
                // Out of descriptors and the like: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move { tcp_connection(stream, peer, shared).await });
    }
}

/// Several queries per connection, one after the other, until the client
/// closes, idles too long, or the node shuts down.
async fn tcp_connection(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let SocketAddr::V4(peer) = peer else {
        return;
    };
    let Some(view) = shared.sandbox(*peer.ip()) else {
        return;
    };
    let Some(_conn) = shared.dns_conns.try_acquire(&view.id) else {
        tracing::debug!(sandbox_id = %view.id, "DNS TCP connection limit reached");
        return;
    };
    let resolver = match stream.local_addr() {
        Ok(SocketAddr::V4(a)) => *a.ip(),
        _ => Ipv4Addr::UNSPECIFIED,
    };
    let idle = shared.tuning.dns_tcp_idle;
    loop {
        let query = tokio::select! {
            r = tokio::time::timeout(idle, read_framed(&mut stream)) => match r {
                Ok(Ok(q)) => q,
                _ => return,
            },
            () = shared.shutdown.cancelled() => return,
        };
        // The policy may have changed since the connection opened.
        let Some(view) = shared.sandbox(*peer.ip()).filter(|v| v.id == view.id) else {
            return;
        };
        let Some(_permit) = shared.queries.try_acquire(&view.id) else {
            return;
        };
        let Some(reply) = answer(&shared, &view, resolver, &query, Transport::Tcp).await else {
            return;
        };
        if write_framed(&mut stream, &reply).await.is_err() {
            return;
        }
    }
}
