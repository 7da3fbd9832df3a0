//! The TLS listener: real ClientHellos (rustls), an echo server standing in
//! for the destination, and resets for everything refused.

use std::io::ErrorKind;
use std::time::Duration;

use arca_proto::network::Verdict;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::*;
use crate::dns::wire::rtype;
use crate::dns::wire::tests::{a, query};
use crate::sni::tests::{client_hello, ech_hello};

/// A harness whose sandbox resolved `allowed.test` and `a.wild.test` to
/// [`REMOTE`], which is really an echo server.
async fn resolved() -> Harness {
    let h = Harness::start(deny_all(&["allowed.test", "*.wild.test"])).await;
    for name in ["allowed.test", "a.wild.test"] {
        h.upstream
            .set(name, rtype::A, vec![a(name, 300, [198, 18, 0, 2])]);
        assert_eq!(h.ask(&query(1, name, rtype::A)).await.answers.len(), 1);
    }
    h.route(SocketAddrV4::new(REMOTE, 443), echo_server().await);
    h
}

/// Sends `first` and reads back as many bytes (the echo), or the error.
async fn exchange(h: &Harness, first: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(h.tls_addr()).await?;
    s.write_all(first).await?;
    let mut back = vec![0; first.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .expect("no answer within 5 s")?;
    Ok(back)
}

fn assert_reset(r: std::io::Result<Vec<u8>>) {
    match r {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(_) => panic!("connection was let through"),
    }
}

#[tokio::test]
async fn allowed_sni_on_an_admitted_address_passes_through() {
    let h = resolved().await;
    let mut first = client_hello("allowed.test");
    first.extend_from_slice(b"more bytes after the hello");
    assert_eq!(exchange(&h, &first).await.unwrap(), first);
    let hello = client_hello("a.wild.test");
    assert_eq!(exchange(&h, &hello).await.unwrap(), hello);
    let allowed = h.enforcer.entries("tls");
    assert_eq!(allowed.len(), 2);
    assert!(allowed.iter().all(|e| e.verdict == Verdict::Allowed));
    assert_eq!(allowed[0].name.as_deref(), Some("allowed.test"));
    assert_eq!(allowed[0].destination, "198.18.0.2");
    assert_eq!(allowed[0].port, Some(443));
}

#[tokio::test]
async fn hello_split_over_writes_passes_through() {
    let h = resolved().await;
    let hello = client_hello("allowed.test");
    let mut s = TcpStream::connect(h.tls_addr()).await.unwrap();
    s.set_nodelay(true).unwrap();
    for chunk in hello.chunks(40) {
        s.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut back = vec![0; hello.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, hello);
}

#[tokio::test]
async fn refused_hellos_are_reset_and_logged() {
    let h = resolved().await;
    // Not in the allow list.
    assert_reset(exchange(&h, &client_hello("denied.test")).await);
    // Allowed by policy, but the address was never an answer for it.
    assert_reset(exchange(&h, &client_hello("b.c.wild.test")).await);
    // No SNI (an IP address).
    assert_reset(exchange(&h, &client_hello("198.18.0.2")).await);
    // Not TLS at all.
    assert_reset(exchange(&h, b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n").await);
    let denied: Vec<(Option<String>, String)> = h
        .enforcer
        .entries("tls")
        .into_iter()
        .filter(|e| e.verdict == Verdict::Denied)
        .map(|e| (e.name, e.rule))
        .collect();
    assert_eq!(denied.len(), 4, "{denied:?}");
    assert_eq!(
        denied[0],
        (Some("denied.test".into()), "not in allowOut".into())
    );
    assert_eq!(
        denied[1],
        (
            Some("b.c.wild.test".into()),
            "address not resolved for this name".into()
        )
    );
    assert_eq!(denied[2], (None, "no SNI".into()));
    assert_eq!(denied[3].0, None);
}

#[tokio::test]
async fn an_address_admitted_for_another_name_does_not_count() {
    let h = Harness::start(deny_all(&["allowed.test", "*.wild.test"])).await;
    h.upstream.set(
        "allowed.test",
        rtype::A,
        vec![a("allowed.test", 300, [198, 18, 0, 2])],
    );
    h.upstream.set(
        "a.wild.test",
        rtype::A,
        vec![a("a.wild.test", 300, [198, 18, 0, 3])],
    );
    for name in ["allowed.test", "a.wild.test"] {
        h.ask(&query(1, name, rtype::A)).await;
    }
    // The sandbox connects to a.wild.test's address but names allowed.test.
    h.route(
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 3), 443),
        echo_server().await,
    );
    assert_reset(exchange(&h, &client_hello("allowed.test")).await);
    let hello = client_hello("a.wild.test");
    assert_eq!(exchange(&h, &hello).await.unwrap(), hello);
}

#[tokio::test]
async fn unknown_sources_are_reset() {
    let h = resolved().await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind((Ipv4Addr::new(127, 0, 0, 9), 0).into()).unwrap();
    let mut s = sock.connect(h.tls_addr()).await.unwrap();
    let _ = s.write_all(&client_hello("allowed.test")).await;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)));
    assert!(h.enforcer.entries("tls").is_empty());
}

#[tokio::test]
async fn silent_clients_are_reset_after_the_hello_timeout() {
    let h = Harness::start_with(deny_all(&["allowed.test"]), |_, t, _| {
        t.hello_timeout = Duration::from_millis(200);
    })
    .await;
    let mut s = TcpStream::connect(h.tls_addr()).await.unwrap();
    s.write_all(&client_hello("allowed.test")[..20])
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap();
    assert!(r.is_err() || matches!(r, Ok(0)));
    assert!(
        h.enforcer
            .logged("tls", Verdict::Denied, "no ClientHello in time")
    );
}

#[tokio::test]
async fn policy_change_closes_connections_it_no_longer_allows() {
    let h = resolved().await;
    let mut keep = TcpStream::connect(h.tls_addr()).await.unwrap();
    let mut cut = TcpStream::connect(h.tls_addr()).await.unwrap();
    for (s, name) in [(&mut keep, "a.wild.test"), (&mut cut, "allowed.test")] {
        let hello = client_hello(name);
        s.write_all(&hello).await.unwrap();
        let mut back = vec![0; hello.len()];
        s.read_exact(&mut back).await.unwrap();
    }
    // allowed.test leaves the allow list.
    h.enforcer
        .set(SANDBOX_IP, &sandbox_id(), deny_all(&["*.wild.test"]));
    h.egress.policy_changed(&sandbox_id());
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(1), cut.read(&mut buf))
        .await
        .expect("connection not closed within 1 s");
    assert!(matches!(r, Ok(0) | Err(_)));
    // The other one still works.
    keep.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    keep.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    // Its admission went with the name.
    let names: Vec<String> = h
        .egress
        .admissions(&sandbox_id())
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec!["a.wild.test"]);
    // And a sandbox's end closes the rest.
    h.egress.forget(&sandbox_id());
    let r = tokio::time::timeout(Duration::from_secs(1), keep.read(&mut buf))
        .await
        .expect("connection not closed within 1 s");
    assert!(matches!(r, Ok(0) | Err(_)));
    assert!(h.egress.admissions(&sandbox_id()).is_empty());
}

#[tokio::test]
async fn connections_over_the_limit_are_reset() {
    let h = Harness::start_with(deny_all(&["allowed.test"]), |_, t, _| {
        t.max_conns_per_sandbox = 2;
    })
    .await;
    // Two connections that have not sent their hello yet hold the quota.
    let _a = TcpStream::connect(h.tls_addr()).await.unwrap();
    let _b = TcpStream::connect(h.tls_addr()).await.unwrap();
    // Let the listener register them.
    for _ in 0..100 {
        if h.egress.shared.conns.count(&sandbox_id()) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_reset(exchange(&h, &client_hello("allowed.test")).await);
    assert!(
        h.enforcer
            .logged("tls", Verdict::Denied, "too many connections")
    );
}

#[tokio::test]
async fn restored_admissions_let_connections_through() {
    let h = Harness::start(deny_all(&["allowed.test"])).await;
    h.route(SocketAddrV4::new(REMOTE, 443), echo_server().await);
    let hello = client_hello("allowed.test");
    assert_reset(exchange(&h, &hello).await);
    h.egress.restore(
        &sandbox_id(),
        vec![crate::AdmittedAddr {
            name: "allowed.test".into(),
            addr: REMOTE,
            expires: std::time::SystemTime::now() + Duration::from_secs(120),
        }],
    );
    assert_eq!(exchange(&h, &hello).await.unwrap(), hello);
}

#[tokio::test]
async fn shutdown_stops_listeners_and_closes_connections() {
    let h = resolved().await;
    let mut live = TcpStream::connect(h.tls_addr()).await.unwrap();
    let hello = client_hello("allowed.test");
    live.write_all(&hello).await.unwrap();
    let mut back = vec![0; hello.len()];
    live.read_exact(&mut back).await.unwrap();
    h.egress.shutdown().await;
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(1), live.read(&mut buf))
        .await
        .expect("connection not closed within 1 s");
    assert!(matches!(r, Ok(0) | Err(_)));
    assert!(TcpStream::connect(h.tls_addr()).await.is_err());
    assert!(TcpStream::connect(h.dns_addr()).await.is_err());
}

#[tokio::test]
async fn destinations_that_became_the_hosts_are_reset_at_dial_time() {
    let h = resolved().await;
    let hello = client_hello("allowed.test");
    assert_eq!(exchange(&h, &hello).await.unwrap(), hello);
    // The admitted address is now one of this host's (a new NIC, say).
    h.make_host_addr(REMOTE);
    assert_reset(exchange(&h, &hello).await);
    assert!(h.enforcer.logged(
        "tls",
        Verdict::Denied,
        "destination is this host or forbidden"
    ));

    // Loopback, even if something put it into the admissions: the echo
    // server would answer if it were dialled.
    let h = resolved().await;
    let SocketAddr::V4(echo) = echo_server().await else {
        unreachable!()
    };
    let ttl = Duration::from_secs(60);
    let now = std::time::Instant::now();
    let admissions = &h.egress.shared.admissions;
    let plan = admissions.plan(&sandbox_id(), "allowed.test", &[*echo.ip()], ttl, now);
    assert_eq!(plan.admit, vec![*echo.ip()]);
    admissions.bind(&sandbox_id(), "allowed.test", plan, ttl, now);
    *h.original.lock().unwrap() = echo;
    assert_reset(exchange(&h, &hello).await);
    let denied = h
        .enforcer
        .entries("tls")
        .into_iter()
        .find(|e| e.verdict == Verdict::Denied)
        .unwrap();
    assert_eq!(denied.rule, "destination is this host or forbidden");
    assert_eq!(denied.destination, "127.0.0.1");
}

#[tokio::test]
async fn ech_hellos_pass_unless_refused() {
    let h = resolved().await;
    let hello = ech_hello("allowed.test");
    assert_eq!(exchange(&h, &hello).await.unwrap(), hello);

    let h = Harness::start_with(deny_all(&["allowed.test"]), |c, _, _| {
        c.refuse_ech = true;
    })
    .await;
    h.upstream.set(
        "allowed.test",
        rtype::A,
        vec![a("allowed.test", 300, [198, 18, 0, 2])],
    );
    h.ask(&query(1, "allowed.test", rtype::A)).await;
    h.route(SocketAddrV4::new(REMOTE, 443), echo_server().await);
    assert_reset(exchange(&h, &hello).await);
    assert!(
        h.enforcer
            .logged("tls", Verdict::Denied, "encrypted ClientHello")
    );
    let plain = client_hello("allowed.test");
    assert_eq!(exchange(&h, &plain).await.unwrap(), plain);
}
