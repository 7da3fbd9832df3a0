//! The proxy on real sockets, with sandboxes played by network namespaces
//! this test makes (root only; skipped otherwise unless
//! `ARCA_TEST_PRIVILEGED=1`).
#![allow(
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    missing_docs,
    unreachable_pub,
    dead_code
)]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

const NOT_FOUND: &str = r#"{"sandboxId":"alpha","message":"The sandbox was not found","code":502}"#;

#[tokio::test]
async fn header_and_host_routing_reach_loopback_servers() {
    if !privileged() {
        return;
    }
    let a = Sandbox::start("alpha");
    let proxy = Proxy::start(&[(&a, None)]).await;

    let mut c = proxy.h1().await;
    let resp = c
        .send_request(get(proxy.addr, "alpha", 49983, "/x?y=1"))
        .await
        .unwrap();
    // The routing headers reach the sandbox (envd ignores them).
    assert_eq!(resp.headers()["x-seen-sandbox-id"], "alpha");
    assert_eq!(text(resp).await.2, "alpha:49983 GET /x?y=1");

    for host in [
        "8080-alpha.e2b.test:3001",
        "8080-alpha-legacyclient.e2b.test",
    ] {
        let req = Request::builder()
            .uri("/by-host")
            .header("host", host)
            .body(full(""))
            .unwrap();
        let (status, _, body) = fetch(&proxy, req).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "alpha:8080 GET /by-host"),
            "{host}"
        );
    }
}

#[tokio::test]
async fn one_connection_reaches_two_sandboxes_and_reuses_upstreams() {
    if !privileged() {
        return;
    }
    let (a, b) = (Sandbox::start("alpha"), Sandbox::start("bravo"));
    let proxy = Proxy::start(&[(&a, None), (&b, None)]).await;
    let mut c = proxy.h1().await;
    for (id, port) in [
        ("alpha", 49983),
        ("bravo", 49983),
        ("alpha", 8080),
        ("alpha", 49983),
        ("bravo", 49983),
    ] {
        let resp = c
            .send_request(get(proxy.addr, id, port, "/"))
            .await
            .unwrap();
        assert_eq!(text(resp).await.2, format!("{id}:{port} GET /"));
    }
    // alpha:49983 and alpha:8080 once each, bravo:49983 once: pooled.
    assert_eq!(a.ctl.conns.load(Ordering::SeqCst), 2);
    assert_eq!(b.ctl.conns.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bad_routing_headers_get_400() {
    if !privileged() {
        return;
    }
    let a = Sandbox::start("alpha");
    let proxy = Proxy::start(&[(&a, None)]).await;
    let cases: &[&[(&str, &str)]] = &[
        &[("e2b-sandbox-id", "alpha")],
        &[("e2b-sandbox-port", "49983")],
        &[("e2b-sandbox-id", "Alpha"), ("e2b-sandbox-port", "49983")],
        &[("e2b-sandbox-id", "alpha"), ("e2b-sandbox-port", "http")],
    ];
    for headers in cases {
        let mut req = Request::builder().uri("/").header("host", "127.0.0.1");
        for (k, v) in *headers {
            req = req.header(*k, *v);
        }
        let (status, ct, body) = fetch(&proxy, req.body(full("")).unwrap()).await;
        assert_eq!(status, 400, "{headers:?}");
        assert_eq!(ct, "application/json");
        assert!(body.starts_with(r#"{"code":400,"message":""#), "{body}");
    }
}

#[tokio::test]
async fn unknown_sandboxes_and_closed_ports_get_e2b_502s() {
    if !privileged() {
        return;
    }
    let a = Sandbox::start("alpha");
    let proxy = Proxy::start(&[(&a, None)]).await;
    let (status, ct, body) = fetch(&proxy, get(proxy.addr, "nosuch", 49983, "/health")).await;
    assert_eq!((status, ct.as_str()), (502, "application/json"));
    assert_eq!(
        body,
        r#"{"sandboxId":"nosuch","message":"The sandbox was not found","code":502}"#
    );

    let (status, _, body) = fetch(&proxy, get(proxy.addr, "alpha", 4000, "/")).await;
    assert_eq!(status, 502);
    assert_eq!(
        body,
        r#"{"sandboxId":"alpha","message":"The sandbox is running but port is not open","port":4000,"code":502}"#
    );
}

#[tokio::test]
async fn responses_stream_chunk_by_chunk() {
    if !privileged() {
        return;
    }
    let a = Sandbox::start("alpha");
    let proxy = Proxy::start(&[(&a, None)]).await;
    let mut c = proxy.h1().await;
    let resp = c
        .send_request(get(proxy.addr, "alpha", 49983, "/stream"))
        .await
        .unwrap();
    let mut body = resp.into_body();
    // The server holds "two" back until told: "one" must arrive alone.
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("first chunk held back");
    assert_eq!(first.unwrap().unwrap().into_data().unwrap(), "one");
    a.ctl.next_chunk.notify_one();
    let second = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
    assert_eq!(second.unwrap().unwrap().into_data().unwrap(), "two");
    assert!(
        tokio::time::timeout(WAIT, body.frame())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn chunked_request_bodies_stream_through() {
    if !privileged() {
        return;
    }
    let a = Sandbox::start("alpha");
    let mut uploads = a.uploads();
    let proxy = Proxy::start(&[(&a, None)]).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nhost: 127.0.0.1\r\ne2b-sandbox-id: alpha\r\n\
          e2b-sandbox-port: 49983\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n",
    )
    .await
    .unwrap();
    // The server sees the first chunk while the client still holds the rest.
    let got = tokio::time::timeout(WAIT, uploads.recv())
        .await
        .expect("first chunk held back");
    assert_eq!(got.unwrap(), "first");
    s.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await.unwrap();
    let resp = read_until(&mut s, b"firstsecond").await;
    assert!(
        resp.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
}

async fn open_tunnel(proxy: &Proxy) -> TcpStream {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: 127.0.0.1\r\ne2b-sandbox-id: alpha\r\ne2b-sandbox-port: 8080\r\n\
          connection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\
          sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_until(&mut s, b"\r\n\r\n").await;
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s
}

#[tokio::test]
async fn upgrades_tunnel_raw_bytes() {
    if !privileged() {
        return;
    }
    let a = Sandbox::start("alpha");
    let proxy = Proxy::start(&[(&a, None)]).await;
    let mut s = open_tunnel(&proxy).await;
    for msg in [&b"ping"[..], b"\x81\x05hello raw"] {
        s.write_all(msg).await.unwrap();
        assert_eq!(read_until(&mut s, msg).await, msg);
    }
}

fn sign(path: &str, op: &str, user: &str, token: &str, exp: Option<i64>) -> String {
    let mut raw = format!("{path}:{op}:{user}:{token}");
    if let Some(exp) = exp {
        raw.push_str(&format!(":{exp}"));
    }
    let sig = base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(raw));
    format!("v1_{sig}").replace('+', "%2B").replace('/', "%2F")
}

fn header_less(method: &str, uri: &str) -> Request<TestBody> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "127.0.0.1:3001")
        .body(full(""))
        .unwrap()
}

#[tokio::test]
async fn signed_file_urls_find_their_sandbox() {
    if !privileged() {
        return;
    }
    let (a, b) = (Sandbox::start("alpha"), Sandbox::start("bravo"));
    let proxy = Proxy::start(&[(&a, Some("token-a")), (&b, Some("token-b"))]).await;

    let sig = sign(
        "/home/user/a b.txt",
        "read",
        "user",
        "token-b",
        Some(1_900_000_000),
    );
    let uri = format!(
        "/files?path=%2Fhome%2Fuser%2Fa%20b.txt&username=user&signature={sig}&signature_expiration=1900000000"
    );
    let (status, _, body) = fetch(&proxy, header_less("GET", &uri)).await;
    assert_eq!((status, body), (200, format!("bravo:49983 GET {uri}")));

    let sig = sign("notes.txt", "write", "", "token-a", None);
    let uri = format!("/files?path=notes.txt&signature={sig}");
    let (status, _, body) = fetch(&proxy, header_less("POST", &uri)).await;
    assert_eq!((status, body), (200, format!("alpha:49983 POST {uri}")));

    // A read signature does not route a write; nobody signed it.
    let sig = sign("notes.txt", "read", "", "token-a", None);
    let (status, _, body) = fetch(
        &proxy,
        header_less("POST", &format!("/files?path=notes.txt&signature={sig}")),
    )
    .await;
    assert_eq!(status, 502);
    assert!(body.contains("was not found"), "{body}");

    // Unsigned and header-less: ambiguous with two sandboxes.
    let (status, _, _) = fetch(&proxy, header_less("GET", "/files?path=x")).await;
    assert_eq!(status, 400);
    // With one, it goes there.
    proxy.routes.end("bravo");
    let (status, _, body) = fetch(&proxy, header_less("GET", "/files?path=x")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "alpha:49983 GET /files?path=x")
    );
}

#[tokio::test]
async fn init_is_refused() {
    if !privileged() {
        return;
    }
    let a = Sandbox::start("alpha");
    let proxy = Proxy::start(&[(&a, None)]).await;
    for path in ["/init", "/init/", "/%69nit"] {
        let mut req = get(proxy.addr, "alpha", 49983, path);
        *req.method_mut() = http::Method::POST;
        let (status, ct, body) = fetch(&proxy, req).await;
        assert_eq!((status, ct.as_str()), (403, "application/json"), "{path}");
        assert!(body.contains(r#""code":403"#), "{body}");
        let host = Request::builder()
            .method("POST")
            .uri(path)
            .header("host", "49983-alpha.e2b.test")
            .body(full("{}"))
            .unwrap();
        assert_eq!(fetch(&proxy, host).await.0, 403);
    }
    assert_eq!(
        a.ctl.conns.load(Ordering::SeqCst),
        0,
        "the sandbox was reached"
    );
}

#[tokio::test]
async fn sandbox_end_resets_http1_streams() {
    if !privileged() {
        return;
    }
    let (a, b) = (Sandbox::start("alpha"), Sandbox::start("bravo"));
    let proxy = Proxy::start(&[(&a, None), (&b, None)]).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /forever HTTP/1.1\r\nhost: 127.0.0.1\r\ne2b-sandbox-id: alpha\r\ne2b-sandbox-port: 49983\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, b"one").await;
    // Another client's stream to another sandbox is not touched.
    let mut other = proxy.h1().await;
    let resp = other
        .send_request(get(proxy.addr, "bravo", 49983, "/forever"))
        .await
        .unwrap();
    let mut other_body = resp.into_body();
    assert_eq!(
        other_body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap(),
        "one"
    );

    proxy.routes.end("alpha");
    expect_reset(&mut s).await;

    let (status, _, body) = fetch(&proxy, get(proxy.addr, "alpha", 49983, "/health")).await;
    assert_eq!((status, body.as_str()), (502, NOT_FOUND));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), other_body.frame())
            .await
            .is_err(),
        "bravo's stream was disturbed"
    );
}

#[tokio::test]
async fn sandbox_end_resets_requests_waiting_for_an_answer() {
    if !privileged() {
        return;
    }
    let a = Sandbox::start("alpha");
    let proxy = Proxy::start(&[(&a, None)]).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /no-answer HTTP/1.1\r\nhost: 127.0.0.1\r\ne2b-sandbox-id: alpha\r\ne2b-sandbox-port: 49983\r\n\r\n")
        .await
        .unwrap();
    // Wait until the request reached the sandbox.
    let t0 = Instant::now();
    while a.ctl.conns.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < WAIT, "request never reached the sandbox");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.routes.end("alpha");
    expect_reset(&mut s).await;
}

#[tokio::test]
async fn sandbox_end_resets_tunnels() {
    if !privileged() {
        return;
    }
    let a = Sandbox::start("alpha");
    let proxy = Proxy::start(&[(&a, None)]).await;
    let mut s = open_tunnel(&proxy).await;
    s.write_all(b"ping").await.unwrap();
    read_until(&mut s, b"ping").await;
    proxy.routes.end("alpha");
    expect_reset(&mut s).await;
}

#[tokio::test]
async fn sandbox_end_resets_h2_streams_only() {
    if !privileged() {
        return;
    }
    let (a, b) = (Sandbox::start("alpha"), Sandbox::start("bravo"));
    let proxy = Proxy::start(&[(&a, None), (&b, None)]).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = |id: &str, path: &str| {
        Request::builder()
            .uri(format!("http://{}{path}", proxy.addr))
            .header("e2b-sandbox-id", id)
            .header("e2b-sandbox-port", "49983")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let resp = h2.send_request(req("alpha", "/forever")).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let mut body = resp.into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "one"
    );

    proxy.routes.end("alpha");
    let end = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
    let err = end
        .expect("clean end of stream instead of a reset")
        .unwrap_err();
    assert!(format!("{err:?}").contains("INTERNAL_ERROR"), "{err:?}");

    // The connection itself lives on.
    let resp = h2.send_request(req("bravo", "/")).await.unwrap();
    assert_eq!(text(resp).await.2, "bravo:49983 GET /");
    let resp = h2.send_request(req("alpha", "/health")).await.unwrap();
    assert_eq!(
        text(resp).await,
        (502, "application/json".into(), NOT_FOUND.into())
    );
}

/// Not a gate: prints the cost of the proxy per request on a kept-alive
/// connection (`cargo nextest run -p arca-proxy --no-capture latency`).
#[tokio::test]
async fn latency_overhead() {
    if !privileged() {
        return;
    }
    let a = Sandbox::start("alpha");
    let proxy = Proxy::start(&[(&a, None)]).await;
    const N: u32 = 500;

    let (mut direct, conn) =
        hyper::client::conn::http1::handshake::<_, TestBody>(TokioIo::new(a.ns.connect(8080)))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut proxied = proxy.h1().await;
    // Warm both (the first proxied request dials).
    for _ in 0..20 {
        text(
            direct
                .send_request(get(proxy.addr, "alpha", 8080, "/"))
                .await
                .unwrap(),
        )
        .await;
        text(
            proxied
                .send_request(get(proxy.addr, "alpha", 8080, "/"))
                .await
                .unwrap(),
        )
        .await;
    }
    let start = Instant::now();
    for _ in 0..N {
        text(
            direct
                .send_request(get(proxy.addr, "alpha", 8080, "/"))
                .await
                .unwrap(),
        )
        .await;
    }
    let direct_us = start.elapsed().as_micros() / u128::from(N);
    let start = Instant::now();
    for _ in 0..N {
        text(
            proxied
                .send_request(get(proxy.addr, "alpha", 8080, "/"))
                .await
                .unwrap(),
        )
        .await;
    }
    let proxied_us = start.elapsed().as_micros() / u128::from(N);
    eprintln!("per request: direct {direct_us} us, proxied {proxied_us} us");
    assert_eq!(
        a.ctl.conns.load(Ordering::SeqCst),
        2,
        "proxied requests were not pooled"
    );
}
