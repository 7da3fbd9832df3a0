//! Cluster mode (issue 7): a front proxy over `ClusterRoutes`, asking a fake
//! api on 127.0.0.1 where sandboxes are, relays to a real edge proxy whose
//! sandboxes are network namespaces with servers inside (root only; skipped
//! otherwise unless `ARCA_TEST_PRIVILEGED=1`).
#![allow(
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    missing_docs,
    unreachable_pub,
    dead_code
)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arca_proto::cluster::NodeStatus;
use arca_proto::network::IngressSpec;
use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};

const NOT_FOUND: &str = r#"{"sandboxId":"alpha","message":"The sandbox was not found","code":502}"#;
const TOKEN: &str = "6f1c0ffee6f1c0ffee6f1c0ffee6f1c0ffee";
const FORBIDDEN: &str = r#"{"sandboxId":"alpha","message":"The sandbox's ports are private: send its traffic access token in the e2b-traffic-access-token header","code":403}"#;
/// Cached routes outlive every test that does not wait for them.
const LONG: Duration = Duration::from_secs(3600);

/// A sandbox `alpha` behind a real edge, a fake api placing it on that
/// edge's node, and a front proxy.
struct Cluster {
    sandbox: Sandbox,
    edge: Proxy,
    api: Arc<FakeApi>,
    front: Front,
}

impl Cluster {
    async fn start() -> Cluster {
        Cluster::with_ttl(LONG).await
    }

    async fn with_ttl(ttl: Duration) -> Cluster {
        let sandbox = Sandbox::start("alpha");
        let edge = Proxy::start(&[(&sandbox, None)]).await;
        let api = FakeApi::start().await;
        api.set("alpha", edge.addr, NodeStatus::Ready);
        let front = Front::start(&api, ttl, ttl).await;
        Cluster {
            sandbox,
            edge,
            api,
            front,
        }
    }

    /// A GET for alpha routed by the E2B headers, as the front gets it.
    fn get(&self, port: u16, path: &str) -> Request<TestBody> {
        get(self.front.addr, "alpha", port, path)
    }

    /// Writes a raw HTTP/1.1 request head for alpha to a new front connection.
    async fn raw(&self, method_path: &str, port: u16, extra: &str) -> TcpStream {
        let mut s = TcpStream::connect(self.front.addr).await.unwrap();
        let head = format!(
            "{method_path} HTTP/1.1\r\nhost: 127.0.0.1\r\ne2b-sandbox-id: alpha\r\n\
             e2b-sandbox-port: {port}\r\n{extra}\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s
    }

    /// Opens a websocket-style tunnel to alpha's echo server on 8080.
    async fn tunnel(&self) -> TcpStream {
        let mut s = self
            .raw(
                "GET /ws",
                8080,
                "connection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\
                 sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            )
            .await;
        let head = read_until(&mut s, b"\r\n\r\n").await;
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        s
    }
}

/// A header of a response, or "".
fn header(resp: &http::Response<hyper::body::Incoming>, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn requests_reach_the_sandbox_through_front_and_edge_unchanged() {
    if !privileged() {
        return;
    }
    let c = Cluster::start().await;

    // The first request, with nothing cached, is the SDKs' health probe:
    // the front looks the sandbox up for it too.
    let (status, _, body) = fetch_at(c.front.addr, c.get(49983, "/health")).await;
    assert_eq!((status, body.as_str()), (200, "alpha:49983 GET /health"));

    let mut req = c.get(8080, "/x?y=1");
    req.headers_mut().insert("x-test", "kept".parse().unwrap());
    let mut client = h1_to(c.front.addr).await;
    let resp = tokio::time::timeout(WAIT, client.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-seen-host"), c.front.addr.to_string());
    assert_eq!(header(&resp, "x-seen-sandbox-id"), "alpha");
    assert_eq!(header(&resp, "x-seen-sandbox-port"), "8080");
    assert_eq!(header(&resp, "x-seen-test"), "kept");
    assert_eq!(text(resp).await.2, "alpha:8080 GET /x?y=1");

    // Host routing, and the Host reaches the sandbox as the client sent it.
    let req = Request::builder()
        .uri("/by-host")
        .header("host", "8080-alpha.e2b.test:3001")
        .body(full(""))
        .unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(header(&resp, "x-seen-host"), "8080-alpha.e2b.test:3001");
    assert_eq!(text(resp).await.2, "alpha:8080 GET /by-host");

    // The edge's own answers pass through untouched.
    let (status, ct, body) = fetch_at(c.front.addr, c.get(4000, "/")).await;
    assert_eq!((status, ct.as_str()), (502, "application/json"));
    assert_eq!(
        body,
        r#"{"sandboxId":"alpha","message":"The sandbox is running but port is not open","port":4000,"code":502}"#
    );
    // `/init` is refused (by the front already, and the edge would too).
    let mut init = c.get(49983, "/init");
    *init.method_mut() = http::Method::POST;
    let (status, _, body) = fetch_at(c.front.addr, init).await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn bodies_stream_both_ways_through_the_front() {
    if !privileged() {
        return;
    }
    let c = Cluster::start().await;
    let mut client = h1_to(c.front.addr).await;
    let resp = client.send_request(c.get(49983, "/stream")).await.unwrap();
    let mut body = resp.into_body();
    // The server holds "two" back until told: "one" must arrive alone.
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("first chunk held back");
    assert_eq!(first.unwrap().unwrap().into_data().unwrap(), "one");
    c.sandbox.ctl.next_chunk.notify_one();
    let second = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
    assert_eq!(second.unwrap().unwrap().into_data().unwrap(), "two");
    assert!(
        tokio::time::timeout(WAIT, body.frame())
            .await
            .unwrap()
            .is_none()
    );

    // A chunked upload reaches the sandbox chunk by chunk.
    let mut uploads = c.sandbox.uploads();
    let mut s = c
        .raw("POST /upload", 49983, "transfer-encoding: chunked\r\n")
        .await;
    s.write_all(b"5\r\nfirst\r\n").await.unwrap();
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

#[tokio::test]
async fn upgrades_tunnel_through_the_front() {
    if !privileged() {
        return;
    }
    let c = Cluster::start().await;
    let mut s = c.tunnel().await;
    for msg in [&b"ping"[..], b"\x81\x05hello raw"] {
        s.write_all(msg).await.unwrap();
        assert_eq!(read_until(&mut s, msg).await, msg);
    }
}

#[tokio::test]
async fn traffic_tokens_are_checked_by_the_edge() {
    if !privileged() {
        return;
    }
    let c = Cluster::start().await;
    c.edge.routes.set_ingress(
        "alpha",
        IngressSpec {
            traffic_access_token: Some(TOKEN.into()),
            mask_request_host: Some("${PORT}-masked.test".into()),
        },
    );
    let with_token = |port, token: Option<&str>| {
        let mut req = c.get(port, "/p");
        if let Some(t) = token {
            req.headers_mut()
                .insert("e2b-traffic-access-token", t.parse().unwrap());
        }
        req
    };
    // The edge's 403, body and all.
    for token in [None, Some("wrong")] {
        let (status, ct, body) = fetch_at(c.front.addr, with_token(8080, token)).await;
        assert_eq!(
            (status, ct.as_str(), body.as_str()),
            (403, "application/json", FORBIDDEN),
            "{token:?}"
        );
    }
    // The token reached the edge (which let the request in), the edge kept
    // it from the sandbox and applied the Host mask.
    let mut client = h1_to(c.front.addr).await;
    let resp = client
        .send_request(with_token(8080, Some(TOKEN)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-seen-traffic-token"), "");
    assert_eq!(header(&resp, "x-seen-host"), "8080-masked.test");
    assert_eq!(text(resp).await.2, "alpha:8080 GET /p");
    // envd's port needs none.
    let (status, _, _) = fetch_at(c.front.addr, with_token(49983, None)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn unknown_sandboxes_and_lost_nodes_are_not_found() {
    if !privileged() {
        return;
    }
    let c = Cluster::start().await;
    let (status, ct, body) = fetch_at(c.front.addr, get(c.front.addr, "nosuch", 49983, "/")).await;
    assert_eq!((status, ct.as_str()), (502, "application/json"));
    assert_eq!(
        body,
        r#"{"sandboxId":"nosuch","message":"The sandbox was not found","code":502}"#
    );

    // The edge still has alpha, but the api says its node is lost: the
    // front does not go there.
    c.api.set("alpha", c.edge.addr, NodeStatus::Lost);
    let (status, _, body) = fetch_at(c.front.addr, c.get(49983, "/")).await;
    assert_eq!((status, body.as_str()), (502, NOT_FOUND));
    assert_eq!(c.sandbox.ctl.conns.load(Ordering::SeqCst), 0);

    // A draining node's sandboxes are reachable.
    let api = FakeApi::start().await;
    api.set("alpha", c.edge.addr, NodeStatus::Draining);
    let front = Front::start(&api, LONG, LONG).await;
    let (status, _, body) = fetch_at(front.addr, get(front.addr, "alpha", 49983, "/")).await;
    assert_eq!((status, body.as_str()), (200, "alpha:49983 GET /"));
}

#[tokio::test]
async fn an_unreachable_edge_is_not_found() {
    if !privileged() {
        return;
    }
    // An address nothing listens on any more.
    let closed: SocketAddr = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let api = FakeApi::start().await;
    api.set("alpha", closed, NodeStatus::Ready);
    let front = Front::start(&api, LONG, LONG).await;
    for port in [49983, 8080] {
        let (status, ct, body) = fetch_at(front.addr, get(front.addr, "alpha", port, "/")).await;
        assert_eq!(
            (status, ct.as_str(), body.as_str()),
            (502, "application/json", NOT_FOUND)
        );
    }
}

#[tokio::test]
async fn health_probes_through_the_front_do_not_wake_paused_sandboxes() {
    if !privileged() {
        return;
    }
    let c = Cluster::start().await;
    c.edge.routes.pause("alpha");
    let (status, _, body) = fetch_at(c.front.addr, c.get(49983, "/health")).await;
    assert_eq!((status, body.as_str()), (502, NOT_FOUND));
    assert!(c.edge.routes.wakes.lock().unwrap().is_empty());
    // Other traffic wakes it, at the edge.
    let (status, _, body) = fetch_at(c.front.addr, c.get(49983, "/files")).await;
    assert_eq!((status, body.as_str()), (200, "alpha:49983 GET /files"));
    assert_eq!(*c.edge.routes.wakes.lock().unwrap(), ["alpha"]);
}

#[tokio::test]
async fn sandbox_end_at_the_edge_resets_streams_through_the_front() {
    if !privileged() {
        return;
    }
    let c = Cluster::start().await;
    let mut s = c.raw("GET /forever", 49983, "").await;
    read_until(&mut s, b"one").await;
    c.edge.routes.end("alpha");
    expect_reset(&mut s).await;
    // And the sandbox is gone for the next request.
    let (status, _, body) = fetch_at(c.front.addr, c.get(49983, "/health")).await;
    assert_eq!((status, body.as_str()), (502, NOT_FOUND));
}

#[tokio::test]
async fn sandbox_end_at_the_edge_resets_requests_waiting_for_an_answer() {
    if !privileged() {
        return;
    }
    let c = Cluster::start().await;
    let mut s = c.raw("GET /no-answer", 49983, "").await;
    // Wait until the request reached the sandbox.
    let t0 = Instant::now();
    while c.sandbox.ctl.conns.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < WAIT, "request never reached the sandbox");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.edge.routes.end("alpha");
    expect_reset(&mut s).await;
}

#[tokio::test]
async fn sandbox_end_at_the_edge_resets_tunnels_through_the_front() {
    if !privileged() {
        return;
    }
    let c = Cluster::start().await;
    let mut s = c.tunnel().await;
    s.write_all(b"ping").await.unwrap();
    read_until(&mut s, b"ping").await;
    c.edge.routes.end("alpha");
    expect_reset(&mut s).await;
}

#[tokio::test]
async fn sandbox_end_at_the_edge_resets_h2_streams_only() {
    if !privileged() {
        return;
    }
    let c = Cluster::start().await;
    let stream = TcpStream::connect(c.front.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = |id: &str, path: &str| {
        Request::builder()
            .uri(format!("http://{}{path}", c.front.addr))
            .header("e2b-sandbox-id", id)
            .header("e2b-sandbox-port", "49983")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let resp = h2.send_request(req("alpha", "/forever")).await.unwrap();
    let mut body = resp.into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "one"
    );
    c.edge.routes.end("alpha");
    let end = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
    let err = end
        .expect("clean end of stream instead of a reset")
        .unwrap_err();
    assert!(format!("{err:?}").contains("INTERNAL_ERROR"), "{err:?}");
    // The connection lives on.
    let resp = h2.send_request(req("alpha", "/health")).await.unwrap();
    assert_eq!(
        text(resp).await,
        (502, "application/json".into(), NOT_FOUND.into())
    );
}

#[tokio::test]
async fn a_node_found_lost_has_its_streams_reset_by_the_front() {
    if !privileged() {
        return;
    }
    // Short-lived routes, so that the front asks the api again soon.
    let c = Cluster::with_ttl(Duration::from_millis(100)).await;
    let mut s = c.raw("GET /forever", 49983, "").await;
    read_until(&mut s, b"one").await;

    // The node stops answering the api; its edge never ends the stream.
    c.api.set("alpha", c.edge.addr, NodeStatus::Lost);
    let t0 = Instant::now();
    loop {
        let (status, _, body) = fetch_at(c.front.addr, c.get(49983, "/health")).await;
        if status == 502 {
            assert_eq!(body, NOT_FOUND);
            break;
        }
        assert!(t0.elapsed() < WAIT, "the front never asked the api again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    expect_reset(&mut s).await;
}
