//! The HTTP listener: checks the name of **every** request, since a
//! kept-alive connection could switch its Host after the first one (ADR
//! 0005 section 3).
//!
//! Each client connection gets at most one upstream HTTP/1.1 connection at
//! a time, opened on the first allowed request (and again if the server
//! closed it). A refused request gets a 403 with `Connection: close`, so
//! the connection ends with it; CONNECT is always refused (it would make
//! the listener a general-purpose proxy). The only upgrade let through is
//! a websocket one (`Upgrade: websocket`, nothing else in the header): it
//! is checked like any request and then becomes a raw tunnel between the
//! two upgraded connections. Any other upgrade is refused, `h2c` above all:
//! after it, HTTP/2 streams could carry any `:authority` through the
//! tunnel, which no one checks. `HTTP2-Settings` headers are dropped.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd as _, OwnedFd};
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use arca_proto::network::Verdict;
use arca_proto::node::SandboxId;
use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, HeaderMap, UPGRADE};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::Shared;
use crate::check::{RULE_OFF_LIMITS, entry, judge};
use crate::conns::{ConnGuard, Grant};
use crate::reset;

/// Bodies of the responses this listener returns.
type Body = BoxBody<Bytes, hyper::Error>;

/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Log reason: an `Upgrade` header other than a lone `websocket`.
const RULE_UPGRADE: &str = "upgrade other than websocket";

/// The h2c upgrade's settings header (RFC 7540 section 3.2.1), dropped
/// from every request.
const HTTP2_SETTINGS: &str = "http2-settings";

/// One client connection.
struct Client {
    shared: Arc<Shared>,
    sandbox: SandboxId,
    source: Ipv4Addr,
    dst: SocketAddrV4,
    guard: Arc<ConnGuard>,
    /// The upstream connection, once opened.
    upstream: tokio::sync::Mutex<Option<SendRequest<Incoming>>>,
}

/// Handles one redirected connection.
pub(crate) async fn handle(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let SocketAddr::V4(peer) = peer else {
        return reset(stream);
    };
    let dst = match (shared.tuning.original_dst)(&stream) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%peer, err = %e, "HTTP connection without an original destination");
            return reset(stream);
        }
    };
    let Some(view) = shared.sandbox(*peer.ip()) else {
        return reset(stream);
    };
    let Some(guard) = shared.conns.register(&view.id, *dst.ip(), &shared.shutdown) else {
        shared.record(
            &view.id,
            entry(
                "http",
                *dst.ip(),
                dst.port(),
                None,
                Verdict::Denied,
                "too many connections",
            ),
        );
        return reset(stream);
    };
    let token = guard.conn.token.clone();
    // A second descriptor of the socket, to make its close a reset when a
    // policy change ends the connection (hyper owns the stream).
    let resetter: Option<OwnedFd> = stream.as_fd().try_clone_to_owned().ok();
    let client = Arc::new(Client {
        shared,
        sandbox: view.id,
        source: *peer.ip(),
        dst,
        guard: Arc::new(guard),
        upstream: tokio::sync::Mutex::new(None),
    });
    let service = {
        let client = client.clone();
        service_fn(move |req| {
            let client = client.clone();
            async move { Ok::<_, Infallible>(client.request(req).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::select! {
        r = conn => {
            if let Err(e) = r {
                tracing::debug!(sandbox_id = %client.sandbox, err = %e, "HTTP connection ended");
            }
        }
        () = token.cancelled() => {
            tracing::debug!(sandbox_id = %client.sandbox, "HTTP connection closed by policy");
            if let Some(fd) = &resetter {
                set_zero_linger(fd);
            }
        }
    }
}

/// Makes the socket's last close send a reset.
fn set_zero_linger(fd: &OwnedFd) {
    use nix::sys::socket::{setsockopt, sockopt};
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = setsockopt(fd, sockopt::Linger, &linger);
}

/// The name a request is for: its absolute-form target's host, else its
/// Host header, port stripped, lowercase; both must agree when both are
/// there. `Err` for requests whose name is ambiguous.
fn request_host<B>(req: &Request<B>) -> Result<Option<String>, &'static str> {
    let mut headers = req.headers().get_all(HOST).iter();
    let header = headers.next();
    if headers.next().is_some() {
        return Err("several Host headers");
    }
    let from_header = match header {
        None => None,
        Some(v) => {
            let text = v.to_str().map_err(|_| "malformed Host header")?;
            if text.contains('@') {
                return Err("malformed Host header");
            }
            let authority = Authority::from_str(text).map_err(|_| "malformed Host header")?;
            Some(normalize(authority.host()))
        }
    };
    let from_target = req.uri().host().map(normalize);
    match (from_target, from_header) {
        (Some(t), Some(h)) if t != h => Err("Host differs from the request target"),
        (Some(t), _) => Ok(Some(t).filter(|t| !t.is_empty())),
        (None, h) => Ok(h.filter(|h| !h.is_empty())),
    }
}

fn normalize(host: &str) -> String {
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

/// Whether `headers` name exactly one protocol in `Upgrade`, `websocket`
/// (any case), and no `Upgrade` header is unreadable. `None` when there
/// is no `Upgrade` header at all.
fn upgrade_is_websocket(headers: &HeaderMap) -> Option<bool> {
    let values = headers.get_all(UPGRADE);
    let mut values = values.iter().peekable();
    values.peek()?;
    let mut tokens = Vec::new();
    for v in values {
        let Ok(text) = v.to_str() else {
            return Some(false);
        };
        tokens.extend(text.split(',').map(str::trim).filter(|t| !t.is_empty()));
    }
    Some(matches!(tokens.as_slice(), [t] if t.eq_ignore_ascii_case("websocket")))
}

/// Whether a request asks to switch protocols.
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(UPGRADE)
        && req
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONNECTION, http::HeaderValue::from_static("close"));
    h.insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn forbidden(rule: &str) -> Response<Body> {
    text(
        StatusCode::FORBIDDEN,
        &format!("arca: refused by the sandbox's network policy ({rule})\n"),
    )
}

fn bad_gateway() -> Response<Body> {
    text(
        StatusCode::BAD_GATEWAY,
        "arca: the destination did not answer\n",
    )
}

impl Client {
    fn log(&self, name: Option<&str>, verdict: Verdict, rule: &str) {
        self.shared.record(
            &self.sandbox,
            entry("http", *self.dst.ip(), self.dst.port(), name, verdict, rule),
        );
    }

    /// Checks one request and forwards it when allowed.
    async fn request(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let shared = &self.shared;
        let dst = *self.dst.ip();
        // The current policy, which may have changed since the connection
        // opened; a source now owned by another sandbox gets nothing.
        let Some(view) = shared.sandbox(self.source).filter(|v| v.id == self.sandbox) else {
            return forbidden("sandbox gone");
        };
        let host = match request_host(&req) {
            Ok(h) => h,
            Err(why) => {
                self.log(None, Verdict::Denied, why);
                return forbidden(why);
            }
        };
        if req.method() == Method::CONNECT {
            self.log(host.as_deref(), Verdict::Denied, "CONNECT");
            return forbidden("CONNECT");
        }
        // Whether or not `Connection` says "upgrade": a server might switch
        // anyway.
        if upgrade_is_websocket(req.headers()) == Some(false) {
            self.log(host.as_deref(), Verdict::Denied, RULE_UPGRADE);
            return forbidden(RULE_UPGRADE);
        }
        req.headers_mut().remove(HTTP2_SETTINGS);
        // Whatever DNS admitted, never dial this host or a forbidden
        // network: the address may have become the host's since it was
        // admitted. Checked on every request, before it may open (or use)
        // the upstream connection.
        if shared.off_limits(dst) {
            self.log(host.as_deref(), Verdict::Denied, RULE_OFF_LIMITS);
            return forbidden(RULE_OFF_LIMITS);
        }
        let judgement = judge(&view.policy, dst, host.as_deref(), "no Host", |n| {
            shared.admissions.is_admitted(&self.sandbox, dst, n)
        });
        self.log(host.as_deref(), judgement.verdict(), judgement.rule);
        let Some(basis) = judgement.basis else {
            return forbidden(judgement.rule);
        };
        self.guard.conn.set_grant(Grant { name: host, basis });

        let client_upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let mut slot = self.upstream.lock().await;
        if slot.as_ref().is_none_or(SendRequest::is_closed) {
            match self.connect().await {
                Some(s) => *slot = Some(s),
                None => return bad_gateway(),
            }
        }
        let Some(sender) = slot.as_mut() else {
            return bad_gateway();
        };
        if sender.ready().await.is_err() {
            *slot = None;
            return bad_gateway();
        }
        let mut resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(sandbox_id = %self.sandbox, err = %e, "HTTP upstream request failed");
                *slot = None;
                return bad_gateway();
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // Only a websocket the client asked for becomes a tunnel.
            let websocket = upgrade_is_websocket(resp.headers()) == Some(true);
            let Some(client_upgrade) = client_upgrade.filter(|_| websocket) else {
                *slot = None;
                return bad_gateway();
            };
            // That upstream connection is now the tunnel's.
            *slot = None;
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let guard = self.guard.clone();
            let sandbox = self.sandbox.clone();
            tokio::spawn(async move {
                let token = guard.conn.token.clone();
                let (c, u) = tokio::join!(client_upgrade, upstream_upgrade);
                let (Ok(c), Ok(u)) = (c, u) else {
                    return;
                };
                let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut c, &mut u) => {}
                    () = token.cancelled() => {
                        tracing::debug!(sandbox_id = %sandbox, "HTTP tunnel closed by policy");
                    }
                }
                drop(guard);
            });
        }
        resp.map(|b| b.boxed())
    }

    /// Opens the upstream connection to the original destination.
    async fn connect(&self) -> Option<SendRequest<Incoming>> {
        let connect = timeout(
            self.shared.tuning.connect_timeout,
            TcpStream::connect((self.shared.tuning.dial)(self.dst)),
        );
        let stream = match connect.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(sandbox_id = %self.sandbox, dst = %self.dst, err = %e, "HTTP upstream connect failed");
                return None;
            }
            Err(_) => {
                tracing::debug!(sandbox_id = %self.sandbox, dst = %self.dst, "HTTP upstream connect timed out");
                return None;
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        let token = self.guard.conn.token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn.with_upgrades() => {}
                () = token.cancelled() => {}
            }
        });
        Some(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn finds_the_request_name() {
        assert_eq!(
            request_host(&req("/", &["Allowed.Test:8080"])),
            Ok(Some("allowed.test".into()))
        );
        assert_eq!(
            request_host(&req("/", &["allowed.test."])),
            Ok(Some("allowed.test".into()))
        );
        assert_eq!(
            request_host(&req("http://a.test/x", &["a.test:80"])),
            Ok(Some("a.test".into()))
        );
        assert_eq!(
            request_host(&req("http://a.test/x", &[])),
            Ok(Some("a.test".into()))
        );
        assert_eq!(request_host(&req("/", &[])), Ok(None));
        assert!(request_host(&req("http://a.test/x", &["b.test"])).is_err());
        assert!(request_host(&req("/", &["a.test", "b.test"])).is_err());
        assert!(request_host(&req("/", &["user@a.test"])).is_err());
        assert!(request_host(&req("/", &["a test"])).is_err());
    }

    #[test]
    fn lets_only_websocket_upgrades_through() {
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(UPGRADE, http::HeaderValue::from_str(v).unwrap());
            }
            upgrade_is_websocket(&h)
        };
        assert_eq!(with(&[]), None);
        for ok in [&["websocket"][..], &["WebSocket"], &[" websocket , "]] {
            assert_eq!(with(ok), Some(true), "{ok:?}");
        }
        for bad in [
            &["h2c"][..],
            &["websocket, h2c"],
            &["h2c, websocket"],
            &["websocket", "h2c"],
            &["websocket", "websocket"],
            &["websocket/13"],
            &["TLS/1.2"],
            &[""],
        ] {
            assert_eq!(with(bad), Some(false), "{bad:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            UPGRADE,
            http::HeaderValue::from_bytes(b"websocket\xff").unwrap(),
        );
        assert_eq!(upgrade_is_websocket(&h), Some(false));
    }

    #[test]
    fn recognises_upgrades() {
        let r = Request::builder()
            .header(CONNECTION, "keep-alive, Upgrade")
            .header(UPGRADE, "websocket")
            .body(())
            .unwrap();
        assert!(wants_upgrade(&r));
        assert!(!wants_upgrade(&req("/", &["a.test"])));
    }
}
