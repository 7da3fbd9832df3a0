//! Connecting to `127.0.0.1:<port>` inside a sandbox's network namespace.
//!
//! A socket belongs to the network namespace of the thread that created it,
//! and stays there. So the socket is made and connected on a fresh OS thread
//! that first joins the sandbox's netns with `setns(CLONE_NEWNET)`; the
//! connected stream is handed back and the thread ends. Never a tokio worker
//! or blocking-pool thread: those are reused and would stay in the sandbox's
//! namespace. Services bound to loopback inside the sandbox are reachable
//! this way without `route_localnet` tricks (MACHINE.md).
//!
//! A thread per dial costs tens of microseconds, which is why the pool keeps
//! idle upstream connections.
//!
//! In cluster mode a route may name a node's edge proxy instead
//! ([`Route::relay`](arca_proto::node::Route::relay)): that is a plain TCP
//! connection from here, with keep-alive probes so that a node that vanished
//! without closing its connections (power loss, partition) fails them in
//! bounded time instead of leaving clients hanging.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// A failed dial.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    /// The netns file is gone: the sandbox is gone.
    #[error("cannot open network namespace {path}")]
    OpenNetns {
        /// The netns file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Joining the namespace failed (no CAP_SYS_ADMIN, not a netns file).
    #[error("cannot enter network namespace {path}")]
    EnterNetns {
        /// The netns file.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// Connecting failed: nothing listens, or it did not answer in time.
    #[error("cannot connect to 127.0.0.1:{port} in the sandbox")]
    Connect {
        /// Port dialed.
        port: u16,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The dialing thread could not be started or died.
    #[error("cannot start a dialing thread")]
    Thread(#[source] io::Error),
    /// A node's edge proxy did not accept in time, or refused: the node is
    /// gone or unreachable.
    #[error("cannot connect to the edge proxy at {addr}")]
    Relay {
        /// Edge address dialed.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Idle time before the first keep-alive probe on a relay connection, in
/// seconds. With [`RELAY_KEEPALIVE_INTERVAL_SECS`] and
/// [`RELAY_KEEPALIVE_PROBES`] a dead node is noticed within about 30 s.
const RELAY_KEEPALIVE_IDLE_SECS: u32 = 15;
/// Time between keep-alive probes, in seconds.
const RELAY_KEEPALIVE_INTERVAL_SECS: u32 = 5;
/// Unanswered probes after which the connection fails.
const RELAY_KEEPALIVE_PROBES: u32 = 3;

/// Connects to `port` of a VM sandbox at its own address `ip`, from the
/// host (a VM's loopback is the guest's): a refusal is the port not being
/// open, as for [`dial`].
pub(crate) async fn dial_address(
    ip: std::net::Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, DialError> {
    let connect = |source| DialError::Connect { port, source };
    let stream = tokio::time::timeout(timeout, TcpStream::connect((ip, port)))
        .await
        .map_err(|_| connect(io::ErrorKind::TimedOut.into()))?
        .map_err(connect)?;
    stream.set_nodelay(true).map_err(connect)?;
    Ok(stream)
}

/// Connects to a node's edge proxy at `addr`.
pub(crate) async fn dial_relay(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, DialError> {
    let relay = |source| DialError::Relay { addr, source };
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| relay(io::ErrorKind::TimedOut.into()))?
        .map_err(relay)?;
    stream.set_nodelay(true).map_err(relay)?;
    // Best effort: without probes a dead node's connections still end by
    // the kernel's retransmission limits, only later.
    let probes = setsockopt(&stream, sockopt::KeepAlive, &true)
        .and_then(|()| setsockopt(&stream, sockopt::TcpKeepIdle, &RELAY_KEEPALIVE_IDLE_SECS))
        .and_then(|()| {
            setsockopt(
                &stream,
                sockopt::TcpKeepInterval,
                &RELAY_KEEPALIVE_INTERVAL_SECS,
            )
        })
        .and_then(|()| setsockopt(&stream, sockopt::TcpKeepCount, &RELAY_KEEPALIVE_PROBES));
    if let Err(err) = probes {
        tracing::debug!(%addr, ?err, "cannot set keep-alive probes on a relay connection");
    }
    Ok(stream)
}

/// Connects to `127.0.0.1:port` inside the network namespace at `netns`.
pub(crate) async fn dial(
    netns: &Path,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, DialError> {
    let (tx, rx) = oneshot::channel();
    let path = netns.to_path_buf();
    std::thread::Builder::new()
        .name("arca-proxy-dial".into())
        .spawn(move || {
            // The receiver may be gone (request cancelled): nothing to do then.
            let _ = tx.send(dial_blocking(&path, port, timeout));
        })
        .map_err(DialError::Thread)?;
    let stream = rx.await.map_err(|_| {
        DialError::Thread(io::Error::other("dialing thread ended without an answer"))
    })??;
    TcpStream::from_std(stream).map_err(|source| DialError::Connect { port, source })
}

/// Runs on a dedicated thread, which it moves into the netns for good.
fn dial_blocking(netns: &Path, port: u16, timeout: Duration) -> Result<StdTcpStream, DialError> {
    let ns = File::open(netns).map_err(|source| DialError::OpenNetns {
        path: netns.to_path_buf(),
        source,
    })?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|source| DialError::EnterNetns {
        path: netns.to_path_buf(),
        source,
    })?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let connect = |source| DialError::Connect { port, source };
    let stream = StdTcpStream::connect_timeout(&addr, timeout).map_err(connect)?;
    stream.set_nodelay(true).map_err(connect)?;
    stream.set_nonblocking(true).map_err(connect)?;
    Ok(stream)
}
