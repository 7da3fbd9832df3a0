//! The TLS listener: lets a connection through when its SNI is an allowed
//! name that the destination was resolved for (ADR 0005 section 3).
//!
//! TLS is not terminated: the listener reads the ClientHello (at most
//! 16 KiB, within 5 s), decides, and on success replays the bytes to a new
//! connection from the host to the original destination and copies both
//! ways. Refusals are resets, so clients fail at once instead of waiting.
//!
//! Only the ClientHello's SNI is checked. With ECH that is the outer
//! (public) name, and the real one is encrypted; and nothing stops a
//! client from naming an allowed host in the SNI and another one in the
//! HTTP Host header inside TLS (domain fronting), which a server shared by
//! both names (a CDN) will serve. See the crate docs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arca_proto::network::Verdict;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};

use crate::Shared;
use crate::check::{RULE_OFF_LIMITS, entry, judge};
use crate::conns::Grant;
use crate::reset;
use crate::sni::{self, Hello, MAX_HELLO};

/// Log reason: the hello has the ECH extension and the node refuses ECH.
const RULE_ECH: &str = "encrypted ClientHello";

/// What reading the first flight gave.
#[derive(Debug, PartialEq, Eq)]
enum FirstFlight {
    /// A whole ClientHello: the bytes read, its name, whether it has the
    /// ECH extension.
    Hello(Vec<u8>, Option<String>, bool),
    /// Something to refuse, with the reason for the log.
    Refused(&'static str),
    /// The client closed without sending anything.
    Closed,
}

/// Reads until a whole ClientHello is buffered.
async fn read_hello(stream: &mut TcpStream, limit: Duration) -> FirstFlight {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let room = (MAX_HELLO - buf.len()).min(chunk.len());
        let n = match timeout_at(deadline, stream.read(&mut chunk[..room])).await {
            Err(_) => return FirstFlight::Refused("no ClientHello in time"),
            Ok(Err(_)) => return FirstFlight::Closed,
            Ok(Ok(0)) if buf.is_empty() => return FirstFlight::Closed,
            Ok(Ok(0)) => return FirstFlight::Refused("incomplete ClientHello"),
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        match sni::parse(&buf) {
            Hello::Complete { name, ech } => return FirstFlight::Hello(buf, name, ech),
            Hello::Invalid(why) => return FirstFlight::Refused(why),
            Hello::Incomplete if buf.len() >= MAX_HELLO => {
                return FirstFlight::Refused("ClientHello over 16 KiB");
            }
            Hello::Incomplete => {}
        }
    }
}

/// Handles one redirected connection.
pub(crate) async fn handle(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let SocketAddr::V4(peer) = peer else {
        return reset(stream);
    };
    let dst = match (shared.tuning.original_dst)(&stream) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%peer, err = %e, "TLS connection without an original destination");
            return reset(stream);
        }
    };
    let Some(view) = shared.sandbox(*peer.ip()) else {
        return reset(stream);
    };
    let log = |name: Option<&str>, verdict, rule: &str| {
        shared.record(
            &view.id,
            entry("tls", *dst.ip(), dst.port(), name, verdict, rule),
        );
    };
    let Some(guard) = shared.conns.register(&view.id, *dst.ip(), &shared.shutdown) else {
        log(None, Verdict::Denied, "too many connections");
        return reset(stream);
    };
    let token = guard.conn.token.clone();
    let first = tokio::select! {
        f = read_hello(&mut stream, shared.tuning.hello_timeout) => f,
        () = token.cancelled() => return reset(stream),
    };
    let (hello, name, ech) = match first {
        FirstFlight::Hello(bytes, name, ech) => (bytes, name, ech),
        FirstFlight::Refused(why) => {
            log(None, Verdict::Denied, why);
            return reset(stream);
        }
        FirstFlight::Closed => return,
    };
    // The policy may have changed while the hello was on its way.
    let Some(view) = shared.sandbox(*peer.ip()).filter(|v| v.id == view.id) else {
        return reset(stream);
    };
    if ech && shared.config.refuse_ech {
        log(name.as_deref(), Verdict::Denied, RULE_ECH);
        return reset(stream);
    }
    // Whatever DNS admitted, never dial this host or a forbidden network:
    // the address may have become the host's since it was admitted.
    if shared.off_limits(*dst.ip()) {
        log(name.as_deref(), Verdict::Denied, RULE_OFF_LIMITS);
        return reset(stream);
    }
    let judgement = judge(&view.policy, *dst.ip(), name.as_deref(), "no SNI", |n| {
        shared.admissions.is_admitted(&view.id, *dst.ip(), n)
    });
    log(name.as_deref(), judgement.verdict(), judgement.rule);
    let Some(basis) = judgement.basis else {
        return reset(stream);
    };
    guard.conn.set_grant(Grant { name, basis });

    let connect = timeout(
        shared.tuning.connect_timeout,
        TcpStream::connect((shared.tuning.dial)(dst)),
    );
    let mut upstream = tokio::select! {
        c = connect => match c {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(sandbox_id = %view.id, %dst, err = %e, "TLS upstream connect failed");
                return reset(stream);
            }
            Err(_) => {
                tracing::debug!(sandbox_id = %view.id, %dst, "TLS upstream connect timed out");
                return reset(stream);
            }
        },
        () = token.cancelled() => return reset(stream),
    };
    let _ = upstream.set_nodelay(true);
    let _ = stream.set_nodelay(true);
    if upstream.write_all(&hello).await.is_err() {
        return reset(stream);
    }
    let cancelled = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream) => false,
        () = token.cancelled() => true,
    };
    if cancelled {
        tracing::debug!(sandbox_id = %view.id, %dst, "TLS connection closed by policy");
        reset(upstream);
        reset(stream);
    }
    drop(guard);
}
