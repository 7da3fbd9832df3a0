//! Ingress settings at the edge (ADR 0005 section 5): the traffic access
//! token of private sandboxes' user ports, checked before a paused sandbox
//! is woken, and `maskRequestHost`. Real sockets and network namespaces
//! (root only; skipped otherwise unless `ARCA_TEST_PRIVILEGED=1`).
#![allow(
    clippy::unwrap_used,
    clippy::tests_outside_test_module,
    missing_docs,
    unreachable_pub,
    dead_code
)]

mod common;

use arca_proto::network::IngressSpec;
use common::*;
use http::Request;
use http_body_util::BodyExt as _;

const TOKEN: &str = "6f1c0ffee6f1c0ffee6f1c0ffee6f1c0ffee";
const FORBIDDEN: &str = r#"{"sandboxId":"alpha","message":"The sandbox's ports are private: send its traffic access token in the e2b-traffic-access-token header","code":403}"#;

fn private() -> IngressSpec {
    IngressSpec {
        traffic_access_token: Some(TOKEN.into()),
        mask_request_host: None,
    }
}

/// A GET routed by headers, with an optional traffic token.
fn get_with(proxy: &Proxy, port: u16, token: Option<&str>) -> Request<TestBody> {
    let mut req = get(proxy.addr, "alpha", port, "/p");
    if let Some(t) = token {
        req.headers_mut()
            .insert("e2b-traffic-access-token", t.parse().unwrap());
    }
    req
}

/// Status, body and the headers the sandbox saw (Host, traffic token).
async fn send(proxy: &Proxy, req: Request<TestBody>) -> (u16, String, String, String) {
    let mut c = proxy.h1().await;
    let resp = tokio::time::timeout(WAIT, c.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let seen = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let (host, token) = (seen("x-seen-host"), seen("x-seen-traffic-token"));
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (
        status,
        String::from_utf8(body.to_vec()).unwrap(),
        host,
        token,
    )
}

#[tokio::test]
async fn user_ports_of_private_sandboxes_need_the_token() {
    if !privileged() {
        return;
    }
    let a = Sandbox::start("alpha");
    let proxy = Proxy::start(&[(&a, None)]).await;
    proxy.routes.set_ingress("alpha", private());

    for token in [None, Some("wrong"), Some(&TOKEN[..10]), Some("")] {
        let (status, ct, body) = fetch(&proxy, get_with(&proxy, 8080, token)).await;
        assert_eq!(
            (status, ct.as_str()),
            (403, "application/json"),
            "{token:?}"
        );
        assert_eq!(body, FORBIDDEN, "{token:?}");
    }
    // Host routing is checked alike.
    let req = Request::builder()
        .uri("/p")
        .header("host", "8080-alpha.e2b.test")
        .body(full(""))
        .unwrap();
    assert_eq!(fetch(&proxy, req).await.0, 403);

    // The right token passes and never reaches the sandbox.
    let (status, body, _, seen_token) = send(&proxy, get_with(&proxy, 8080, Some(TOKEN))).await;
    assert_eq!((status, body.as_str()), (200, "alpha:8080 GET /p"));
    assert_eq!(seen_token, "");
    let req = Request::builder()
        .uri("/q")
        .header("host", "8080-alpha.e2b.test")
        .header("e2b-traffic-access-token", TOKEN)
        .body(full(""))
        .unwrap();
    assert_eq!(fetch(&proxy, req).await.2, "alpha:8080 GET /q");

    // envd's port keeps its own rules: no traffic token needed, and one
    // sent anyway is not passed on.
    let (status, body, _, _) = send(&proxy, get_with(&proxy, 49983, None)).await;
    assert_eq!((status, body.as_str()), (200, "alpha:49983 GET /p"));
    let (status, _, _, seen_token) = send(&proxy, get_with(&proxy, 49983, Some(TOKEN))).await;
    assert_eq!((status, seen_token.as_str()), (200, ""));
    // A closed user port still answers 403 first: nothing about the
    // sandbox's ports leaks without the token.
    assert_eq!(fetch(&proxy, get_with(&proxy, 4000, None)).await.0, 403);
}

#[tokio::test]
async fn public_sandboxes_need_no_token_and_never_see_one() {
    if !privileged() {
        return;
    }
    let a = Sandbox::start("alpha");
    let proxy = Proxy::start(&[(&a, None)]).await;
    let (status, _, _, _) = send(&proxy, get_with(&proxy, 8080, None)).await;
    assert_eq!(status, 200);
    let (status, _, _, seen_token) = send(&proxy, get_with(&proxy, 8080, Some("x"))).await;
    assert_eq!((status, seen_token.as_str()), (200, ""));
}

#[tokio::test]
async fn paused_private_sandboxes_are_not_woken_without_the_token() {
    if !privileged() {
        return;
    }
    let a = Sandbox::start("alpha");
    let proxy = Proxy::start(&[(&a, None)]).await;
    proxy.routes.set_ingress("alpha", private());
    proxy.routes.pause("alpha");

    for token in [None, Some("wrong")] {
        let (status, _, body) = fetch(&proxy, get_with(&proxy, 8080, token)).await;
        assert_eq!((status, body.as_str()), (403, FORBIDDEN), "{token:?}");
    }
    assert!(
        proxy.routes.wakes.lock().unwrap().is_empty(),
        "woken without the token"
    );

    // With it, the request wakes the sandbox and goes through.
    let (status, body, _, seen_token) = send(&proxy, get_with(&proxy, 8080, Some(TOKEN))).await;
    assert_eq!(
        (status, body.as_str(), seen_token.as_str()),
        (200, "alpha:8080 GET /p", "")
    );
    assert_eq!(*proxy.routes.wakes.lock().unwrap(), ["alpha"]);
}

#[tokio::test]
async fn masks_set_the_upstream_host_on_user_ports_only() {
    if !privileged() {
        return;
    }
    let a = Sandbox::start("alpha");
    let proxy = Proxy::start(&[(&a, None)]).await;
    proxy.routes.set_ingress(
        "alpha",
        IngressSpec {
            traffic_access_token: None,
            mask_request_host: Some("${PORT}-masked.test".into()),
        },
    );
    let (status, _, host, _) = send(&proxy, get_with(&proxy, 8080, None)).await;
    assert_eq!((status, host.as_str()), (200, "8080-masked.test"));
    // By host too.
    let req = Request::builder()
        .uri("/")
        .header("host", "8080-alpha.e2b.test:3001")
        .body(full(""))
        .unwrap();
    assert_eq!(send(&proxy, req).await.2, "8080-masked.test");
    // envd sees the Host the client sent.
    let (status, _, host, _) = send(&proxy, get_with(&proxy, 49983, None)).await;
    assert_eq!((status, host), (200, proxy.addr.to_string()));

    // Together with a token, and a mask without placeholder.
    proxy.routes.set_ingress(
        "alpha",
        IngressSpec {
            traffic_access_token: Some(TOKEN.into()),
            mask_request_host: Some("fixed.test".into()),
        },
    );
    assert_eq!(fetch(&proxy, get_with(&proxy, 8080, None)).await.0, 403);
    let (status, _, host, _) = send(&proxy, get_with(&proxy, 8080, Some(TOKEN))).await;
    assert_eq!((status, host.as_str()), (200, "fixed.test"));
}

#[tokio::test]
async fn health_probes_never_wake_paused_sandboxes() {
    if !privileged() {
        return;
    }
    let a = Sandbox::start("alpha");
    let proxy = Proxy::start(&[(&a, None)]).await;
    proxy.routes.pause("alpha");
    let (status, _, body) = fetch(&proxy, get(proxy.addr, "alpha", 49983, "/health")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("was not found"), "{body}");
    assert!(
        proxy.routes.wakes.lock().unwrap().is_empty(),
        "a health probe woke a paused sandbox"
    );
    // An id the source does not know is asked for (a cluster front looks
    // routes up that way); here it is not found.
    let (status, _, _) = fetch(&proxy, get(proxy.addr, "nosuch", 49983, "/health")).await;
    assert_eq!(status, 502);
    assert_eq!(*proxy.routes.wakes.lock().unwrap(), ["nosuch"]);
    // Other envd traffic wakes it.
    let (status, _, body) = fetch(&proxy, get(proxy.addr, "alpha", 49983, "/files")).await;
    assert_eq!((status, body.as_str()), (200, "alpha:49983 GET /files"));
}
