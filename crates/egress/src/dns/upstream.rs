//! Asking the upstream resolvers.
//!
//! Each exchange uses a fresh UDP socket connected to one server (a random
//! source port the kernel filters on) and a random transaction id, so an
//! off-path attacker would have to guess both to slip in an answer. A
//! truncated answer is asked again over TCP on the same server. The list
//! is tried twice over, each exchange bounded by a timeout.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

use super::wire::{Header, flag, set_id};

/// Rounds over the server list.
const ROUNDS: usize = 2;
/// All tries together take at most this many per-try timeouts, so a long
/// list of dead servers cannot hold a query (and its quota) for minutes;
/// clients give up after about 5 s anyway.
const BUDGET_TRIES: u32 = 3;

/// Why no answer came back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// There is no server to ask.
    #[error("no upstream resolver configured")]
    NoServers,
    /// The last server tried did not answer in time.
    #[error("upstream resolver {0} timed out")]
    Timeout(SocketAddr),
    /// Sending to or receiving from the last server tried failed.
    #[error("exchange with upstream resolver {server} failed")]
    Io {
        /// The server.
        server: SocketAddr,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
}

/// Sends `query` (whose id is replaced) to the servers in turn until one
/// answers; returns the answer with the id of `query` put back.
pub(crate) async fn exchange(
    query: &[u8],
    servers: &[SocketAddr],
    per_try: Duration,
) -> Result<Vec<u8>, UpstreamError> {
    let client_id = Header::peek(query).map_or(0, |h| h.id);
    let mut last = UpstreamError::NoServers;
    let deadline = Instant::now() + per_try * BUDGET_TRIES;
    for _ in 0..ROUNDS {
        for server in servers {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(last);
            }
            let id: u16 = rand::random();
            let mut q = query.to_vec();
            set_id(&mut q, id);
            match ask(&q, id, *server, per_try.min(left)).await {
                Ok(mut answer) => {
                    set_id(&mut answer, client_id);
                    return Ok(answer);
                }
                Err(e) => {
                    tracing::debug!(%server, err = %e, "upstream resolver failed");
                    last = e;
                }
            }
        }
    }
    Err(last)
}

/// One server: UDP, then TCP when the answer is truncated.
async fn ask(
    query: &[u8],
    id: u16,
    server: SocketAddr,
    per_try: Duration,
) -> Result<Vec<u8>, UpstreamError> {
    let io_err = |source| UpstreamError::Io { server, source };
    let answer = match timeout(per_try, udp(query, id, server)).await {
        Ok(r) => r.map_err(io_err)?,
        Err(_) => return Err(UpstreamError::Timeout(server)),
    };
    let truncated = Header::peek(&answer).is_some_and(|h| h.flags & flag::TC != 0);
    if !truncated {
        return Ok(answer);
    }
    match timeout(per_try, tcp(query, id, server)).await {
        Ok(r) => r.map_err(io_err),
        Err(_) => Err(UpstreamError::Timeout(server)),
    }
}

/// Whether `msg` answers the query with id `id`.
fn answers(msg: &[u8], id: u16) -> bool {
    Header::peek(msg).is_some_and(|h| h.id == id && h.flags & flag::QR != 0)
}

async fn udp(query: &[u8], id: u16, server: SocketAddr) -> io::Result<Vec<u8>> {
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0; usize::from(u16::MAX)];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Stray datagrams (late answers to earlier ids) are skipped.
        if answers(&buf[..n], id) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// DNS over TCP: each message preceded by its length (RFC 1035 4.2.2).
async fn tcp(query: &[u8], id: u16, server: SocketAddr) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(server).await?;
    write_framed(&mut stream, query).await?;
    let answer = read_framed(&mut stream).await?;
    if answers(&answer, id) {
        Ok(answer)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "TCP answer does not match the query",
        ))
    }
}

/// Writes one length-prefixed message.
pub(crate) async fn write_framed<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    msg: &[u8],
) -> io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "DNS message over 65535 bytes"))?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    w.write_all(&framed).await?;
    w.flush().await
}

/// Reads one length-prefixed message.
pub(crate) async fn read_framed<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
    let len = r.read_u16().await?;
    let mut msg = vec![0; usize::from(len)];
    r.read_exact(&mut msg).await?;
    Ok(msg)
}
