//! The HTTP listener: a hyper backend echoing the Host it got, a hyper
//! client speaking for the sandbox.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ::http::header::{CONNECTION, HOST, UPGRADE};
use ::http::{Method, Request, Response, StatusCode};
use arca_proto::network::Verdict;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::*;
use crate::dns::wire::rtype;
use crate::dns::wire::tests::{a, query};

async fn backend_handler(mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if let Some(protocol) = req.headers().get(UPGRADE).cloned() {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, protocol)
            .body(Full::default())
            .unwrap();
        return Ok(resp);
    }
    let host = req
        .headers()
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    // Tells whether the h2c settings header got through.
    let settings = if req.headers().contains_key("http2-settings") {
        " http2-settings"
    } else {
        ""
    };
    Ok(Response::new(Full::new(Bytes::from(format!(
        "host={host}{settings}"
    )))))
}

/// An HTTP server on 127.0.0.1 answering `host=<Host>`; counts connections.
async fn backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), service_fn(backend_handler))
                    .with_upgrades(),
            );
        }
    });
    (addr, count)
}

/// A harness whose sandbox resolved `allowed.test` and `a.wild.test` to
/// [`REMOTE`], port 80 of which is the backend.
async fn resolved() -> (Harness, Arc<AtomicUsize>) {
    let h = Harness::start(deny_all(&["allowed.test", "*.wild.test"])).await;
    for name in ["allowed.test", "a.wild.test"] {
        h.upstream
            .set(name, rtype::A, vec![a(name, 300, [198, 18, 0, 2])]);
        assert_eq!(h.ask(&query(1, name, rtype::A)).await.answers.len(), 1);
    }
    let (addr, count) = backend().await;
    h.route(SocketAddrV4::new(REMOTE, 80), addr);
    (h, count)
}

async fn client(h: &Harness) -> SendRequest<Full<Bytes>> {
    let s = TcpStream::connect(h.http_addr()).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

fn get(host: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri("/")
        .header(HOST, host)
        .body(Full::default())
        .unwrap()
}

async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (StatusCode, ::http::HeaderMap, String) {
    sender.ready().await.unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn every_request_on_a_connection_is_checked() {
    let (h, upstream_conns) = resolved().await;
    let mut c = client(&h).await;
    let (status, _, body) = send(&mut c, get("allowed.test")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "host=allowed.test")
    );
    let (status, _, body) = send(&mut c, get("A.Wild.Test:80")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "host=A.Wild.Test:80")
    );
    // Same client connection, one upstream connection.
    assert_eq!(upstream_conns.load(Ordering::SeqCst), 1);
    // A kept-alive connection switching to another Host is refused and
    // closed.
    let (status, headers, body) = send(&mut c, get("denied.test")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers[CONNECTION], "close");
    assert!(body.contains("not in allowOut"), "{body}");
    assert!(
        c.ready().await.is_err(),
        "connection still open after a 403"
    );
    let entries = h.enforcer.entries("http");
    let verdicts: Vec<(Verdict, Option<String>)> = entries
        .iter()
        .map(|e| (e.verdict, e.name.clone()))
        .collect();
    assert_eq!(
        verdicts,
        vec![
            (Verdict::Allowed, Some("allowed.test".into())),
            (Verdict::Allowed, Some("a.wild.test".into())),
            (Verdict::Denied, Some("denied.test".into())),
        ]
    );
    assert_eq!(entries[0].port, Some(80));
}

#[tokio::test]
async fn names_not_resolved_to_the_destination_and_missing_hosts_are_refused() {
    let (h, upstream_conns) = resolved().await;
    for (req, rule) in [
        (get("b.c.wild.test"), "address not resolved for this name"),
        (
            Request::builder().uri("/").body(Full::default()).unwrap(),
            "no Host",
        ),
        (
            Request::builder()
                .uri("http://denied.test/")
                .header(HOST, "allowed.test")
                .body(Full::default())
                .unwrap(),
            "Host differs from the request target",
        ),
        (
            Request::builder()
                .uri("http://denied.test/")
                .body(Full::default())
                .unwrap(),
            "not in allowOut",
        ),
    ] {
        let mut c = client(&h).await;
        let (status, _, body) = send(&mut c, req).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{rule}");
        assert!(body.contains(rule), "{body}");
        assert!(h.enforcer.logged("http", Verdict::Denied, rule));
    }
    assert_eq!(upstream_conns.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn connect_is_refused() {
    let (h, upstream_conns) = resolved().await;
    let mut c = client(&h).await;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("allowed.test:443")
        .header(HOST, "allowed.test:443")
        .body(Full::default())
        .unwrap();
    let (status, _, _) = send(&mut c, req).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(h.enforcer.logged("http", Verdict::Denied, "CONNECT"));
    assert_eq!(upstream_conns.load(Ordering::SeqCst), 0);
}

fn upgrade(host: &str) -> Request<Full<Bytes>> {
    upgrade_to(host, "websocket")
}

fn upgrade_to(host: &str, protocol: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri("/ws")
        .header(HOST, host)
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, protocol)
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn upgrades_become_tunnels_after_the_check() {
    let (h, _) = resolved().await;
    let mut c = client(&h).await;
    c.ready().await.unwrap();
    let resp = c.send_request(upgrade("allowed.test")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let up = hyper::upgrade::on(resp).await.unwrap();
    let mut io = TokioIo::new(up);
    io.write_all(b"through the tunnel").await.unwrap();
    let mut back = [0u8; 18];
    io.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"through the tunnel");

    // The tunnel counts as a live connection: forgetting the sandbox ends it.
    h.egress.forget(&sandbox_id());
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(1), io.read(&mut buf))
        .await
        .expect("tunnel not closed within 1 s");
    assert!(matches!(r, Ok(0) | Err(_)));

    let (h, _) = resolved().await;
    let mut c = client(&h).await;
    let (status, _, _) = send(&mut c, upgrade("denied.test")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn policy_change_closes_a_kept_alive_connection() {
    let (h, _) = resolved().await;
    let mut c = client(&h).await;
    let (status, _, _) = send(&mut c, get("allowed.test")).await;
    assert_eq!(status, StatusCode::OK);
    let mut other = client(&h).await;
    let (status, _, _) = send(&mut other, get("a.wild.test")).await;
    assert_eq!(status, StatusCode::OK);

    h.enforcer
        .set(SANDBOX_IP, &sandbox_id(), deny_all(&["*.wild.test"]));
    h.egress.policy_changed(&sandbox_id());
    let closed = async {
        while !c.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(1), closed)
        .await
        .expect("connection not closed within 1 s");
    let (status, _, _) = send(&mut other, get("a.wild.test")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_sources_are_reset() {
    let (h, _) = resolved().await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind((Ipv4Addr::new(127, 0, 0, 9), 0).into()).unwrap();
    let mut s = sock.connect(h.http_addr()).await.unwrap();
    let _ = s
        .write_all(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)));
}

#[tokio::test]
async fn upgrades_other_than_websocket_are_refused() {
    let (h, upstream_conns) = resolved().await;
    let h2c = || {
        Request::builder()
            .uri("/")
            .header(HOST, "allowed.test")
            .header(CONNECTION, "Upgrade, HTTP2-Settings")
            .header(UPGRADE, "h2c")
            .header("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")
    };
    let without_connection = Request::builder()
        .uri("/")
        .header(HOST, "allowed.test")
        .header(UPGRADE, "h2c")
        .body(Full::default())
        .unwrap();
    for req in [
        h2c().body(Full::default()).unwrap(),
        upgrade_to("allowed.test", "websocket, h2c"),
        upgrade_to("allowed.test", "H2C"),
        upgrade_to("allowed.test", "echo"),
        without_connection,
    ] {
        let mut c = client(&h).await;
        let (status, headers, body) = send(&mut c, req).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(headers[CONNECTION], "close");
        assert!(body.contains("upgrade other than websocket"), "{body}");
        assert!(
            c.ready().await.is_err(),
            "connection still open after a 403"
        );
    }
    assert_eq!(upstream_conns.load(Ordering::SeqCst), 0);
    let denied = h.enforcer.entries("http");
    assert_eq!(denied.len(), 5);
    assert!(denied.iter().all(|e| e.verdict == Verdict::Denied
        && e.rule == "upgrade other than websocket"
        && e.name.as_deref() == Some("allowed.test")));

    // A plain request's HTTP2-Settings header does not reach the server.
    let mut c = client(&h).await;
    let req = Request::builder()
        .uri("/")
        .header(HOST, "allowed.test")
        .header("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")
        .body(Full::default())
        .unwrap();
    let (status, _, body) = send(&mut c, req).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "host=allowed.test")
    );
}

#[tokio::test]
async fn destinations_that_became_the_hosts_are_refused_at_dial_time() {
    let (h, upstream_conns) = resolved().await;
    let mut c = client(&h).await;
    let (status, _, _) = send(&mut c, get("allowed.test")).await;
    assert_eq!(status, StatusCode::OK);
    // The admitted address is now one of this host's (a new NIC, say):
    // even the kept-alive connection's next request is refused.
    h.make_host_addr(REMOTE);
    let (status, headers, body) = send(&mut c, get("allowed.test")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers[CONNECTION], "close");
    assert!(
        body.contains("destination is this host or forbidden"),
        "{body}"
    );
    let mut c = client(&h).await;
    let (status, _, _) = send(&mut c, get("allowed.test")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(upstream_conns.load(Ordering::SeqCst), 1);
    assert!(h.enforcer.logged(
        "http",
        Verdict::Denied,
        "destination is this host or forbidden"
    ));

    // Loopback, even if something put it into the admissions.
    let (h, _) = resolved().await;
    let (backend_addr, direct_conns) = backend().await;
    let SocketAddr::V4(backend_addr) = backend_addr else {
        unreachable!()
    };
    let ttl = Duration::from_secs(60);
    let now = std::time::Instant::now();
    let admissions = &h.egress.shared.admissions;
    let plan = admissions.plan(
        &sandbox_id(),
        "allowed.test",
        &[*backend_addr.ip()],
        ttl,
        now,
    );
    admissions.bind(&sandbox_id(), "allowed.test", plan, ttl, now);
    *h.original.lock().unwrap() = backend_addr;
    let mut c = client(&h).await;
    let (status, _, body) = send(&mut c, get("allowed.test")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body.contains("destination is this host or forbidden"),
        "{body}"
    );
    assert_eq!(direct_conns.load(Ordering::SeqCst), 0);
}
