//! The DNS forwarder end to end: fake sandbox, fake resolver, real sockets.

use std::sync::atomic::Ordering;
use std::time::Duration;

use arca_proto::network::{EgressPolicy, Verdict};
use tokio::net::TcpStream;

use super::*;
use crate::dns::wire::tests::{a, cname, query};
use crate::dns::wire::{Name, Question, opt_record, rtype};

fn addrs(m: &Message) -> Vec<Ipv4Addr> {
    m.answers.iter().filter_map(Record::a_addr).collect()
}

#[tokio::test]
async fn denied_names_get_nxdomain_without_reaching_the_upstream() {
    let h = Harness::start(deny_all(&["allowed.test", "*.wild.test"])).await;
    h.upstream.set(
        "denied.test",
        rtype::A,
        vec![a("denied.test", 30, [198, 18, 0, 2])],
    );
    for name in [
        "denied.test",
        "wild.test",
        "xwild.test",
        "allowed.test.evil.example",
    ] {
        for qtype in [rtype::A, rtype::AAAA, rtype::HTTPS, 16] {
            let r = h.ask(&query(7, name, qtype)).await;
            assert_eq!(r.rcode(), rcode::NXDOMAIN, "{name} {qtype}");
            assert_eq!(r.id, 7);
            assert!(r.answers.is_empty());
        }
    }
    assert_eq!(
        h.upstream.queries(),
        0,
        "a denied name reached the upstream"
    );
    assert!(h.enforcer.admit_calls().is_empty());
    let denied = h.enforcer.entries("dns");
    assert!(
        denied
            .iter()
            .all(|e| e.verdict == Verdict::Denied && e.rule == "not in allowOut")
    );
    assert_eq!(denied[0].name.as_deref(), Some("denied.test"));
    assert_eq!(denied[0].port, Some(53));
    // The destination is where the query arrived (IP_ORIGDSTADDR).
    assert_eq!(denied[0].destination, "127.0.0.1");
}

#[tokio::test]
async fn allowed_names_are_admitted_before_the_reply_with_clamped_ttls() {
    let h = Harness::start(deny_all(&["allowed.test"])).await;
    h.upstream.set(
        "allowed.test",
        rtype::A,
        vec![
            a("allowed.test", 30, [198, 18, 0, 2]),
            a("allowed.test", 30, [198, 18, 0, 3]),
        ],
    );
    let r = h.ask(&query(1, "Allowed.Test", rtype::A)).await;
    assert_eq!(r.rcode(), rcode::NOERROR);
    assert_eq!(addrs(&r), vec![REMOTE, Ipv4Addr::new(198, 18, 0, 3)]);
    assert!(r.answers.iter().all(|x| x.ttl == 30), "short TTLs are kept");
    let calls = h.enforcer.admit_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].len(), 2);
    assert!(
        calls[0]
            .iter()
            .all(|x| x.ttl == Duration::from_secs(60) && x.sandbox == sandbox_id())
    );
    let admitted = h.egress.admissions(&sandbox_id());
    assert_eq!(admitted.len(), 2);
    assert_eq!(admitted[0].name, "allowed.test");
    assert!(h.enforcer.logged("dns", Verdict::Allowed, "allowOut"));

    // Asked again at once: still admitted for over half of 60 s, so no
    // commit; the reply's TTLs never exceed what is left.
    let r = h.ask(&query(2, "allowed.test", rtype::A)).await;
    assert_eq!(addrs(&r).len(), 2);
    assert_eq!(h.enforcer.admit_calls().len(), 1);

    // Long TTLs are capped at one hour, in the admission and the reply.
    h.upstream.set(
        "allowed.test",
        rtype::A,
        vec![a("allowed.test", 86400, [198, 18, 0, 4])],
    );
    let r = h.ask(&query(3, "allowed.test", rtype::A)).await;
    assert_eq!(r.answers[0].ttl, 3600);
    let calls = h.enforcer.admit_calls();
    assert_eq!(calls[1][0].ttl, Duration::from_secs(3600));
}

#[tokio::test]
async fn cname_chains_are_followed_and_rebinding_answers_dropped() {
    let h = Harness::start(deny_all(&["*.wild.test"])).await;
    h.upstream.set(
        "alias.wild.test",
        rtype::A,
        vec![
            cname("alias.wild.test", 300, "edge.cdn.test"),
            a("edge.cdn.test", 600, [198, 18, 0, 2]),
            a("edge.cdn.test", 600, [127, 0, 0, 1]),
            a("edge.cdn.test", 600, [169, 254, 169, 254]),
            a("edge.cdn.test", 600, [10, 99, 0, 7]),
            a("edge.cdn.test", 600, [224, 0, 0, 1]),
            a("unrelated.test", 600, [198, 18, 0, 9]),
        ],
    );
    let r = h.ask(&query(1, "alias.wild.test", rtype::A)).await;
    assert_eq!(r.answers.len(), 2, "{r:?}");
    assert_eq!(
        r.answers[0].cname_target(),
        Some(Name::from_dotted("edge.cdn.test").unwrap())
    );
    assert_eq!(addrs(&r), vec![REMOTE]);
    assert!(
        r.answers.iter().all(|x| x.ttl <= 300),
        "TTLs capped to the chain's minimum"
    );
    let calls = h.enforcer.admit_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].len(), 1);
    assert_eq!(
        (calls[0][0].addr, calls[0][0].ttl),
        (REMOTE, Duration::from_secs(300))
    );
    // Bound to the queried name, not the chain's end.
    let admitted = h.egress.admissions(&sandbox_id());
    assert_eq!(admitted.len(), 1);
    assert_eq!(admitted[0].name, "alias.wild.test");
    let refused: Vec<_> = h
        .enforcer
        .entries("dns")
        .into_iter()
        .filter(|e| e.verdict == Verdict::Denied)
        .collect();
    assert_eq!(refused.len(), 4, "{refused:?}");
    assert!(refused.iter().any(|e| e.rule.contains("169.254.169.254")));
}

#[tokio::test]
async fn aaaa_svcb_and_https_get_empty_answers() {
    let h = Harness::start(deny_all(&["allowed.test"])).await;
    for qtype in [rtype::AAAA, rtype::SVCB, rtype::HTTPS] {
        let mut q = query(5, "allowed.test", qtype);
        q.additional.push(opt_record(4096));
        let r = h.ask(&q).await;
        assert_eq!(r.rcode(), rcode::NOERROR);
        assert!(r.answers.is_empty() && r.authority.is_empty());
        assert!(r.opt().is_some(), "EDNS queries get an OPT back");
    }
    assert_eq!(h.upstream.queries(), 0);
}

#[tokio::test]
async fn other_types_are_forwarded_and_admit_nothing() {
    let h = Harness::start(deny_all(&["allowed.test"])).await;
    let txt = Record {
        name: Name::from_dotted("allowed.test").unwrap(),
        rtype: 16,
        class: 1,
        ttl: 86400,
        rdata: b"\x05hello".to_vec(),
    };
    h.upstream.set("allowed.test", 16, vec![txt.clone()]);
    let r = h.ask(&query(5, "allowed.test", 16)).await;
    assert_eq!(r.answers.len(), 1);
    assert_eq!(r.answers[0].rdata, txt.rdata);
    assert_eq!(r.answers[0].ttl, 3600);
    assert!(h.enforcer.admit_calls().is_empty());
}

#[tokio::test]
async fn only_the_question_travels_upstream() {
    let h = Harness::start(deny_all(&["allowed.test"])).await;
    h.upstream.set(
        "allowed.test",
        rtype::A,
        vec![a("allowed.test", 60, [198, 18, 0, 2])],
    );
    let mut q = query(5, "allowed.test", rtype::A);
    // A sandbox trying to carry data in the additional section.
    q.additional.push(Record {
        name: Name::from_dotted("secret-data.example").unwrap(),
        rtype: 16,
        class: 1,
        ttl: 0,
        rdata: b"\x06secret".to_vec(),
    });
    let r = h.ask(&q).await;
    assert_eq!(addrs(&r), vec![REMOTE]);
    let seen = h.upstream.received.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].additional, vec![opt_record(1232)]);
    assert!(seen[0].answers.is_empty() && seen[0].authority.is_empty());
}

#[tokio::test]
async fn concurrent_admissions_are_batched() {
    let h = Harness::start(deny_all(&["*.wild.test"])).await;
    *h.enforcer.admit_delay.lock().unwrap() = Duration::from_millis(300);
    for i in 0..10u8 {
        let name = format!("n{i}.wild.test");
        h.upstream
            .set(&name, rtype::A, vec![a(&name, 120, [198, 18, 1, i])]);
    }
    let h = Arc::new(h);
    let mut tasks = Vec::new();
    for i in 0..10u8 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            // The first goes alone; the others arrive while it commits.
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            h.ask(&query(u16::from(i), &format!("n{i}.wild.test"), rtype::A))
                .await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(addrs(&r).len(), 1);
    }
    let calls = h.enforcer.admit_calls();
    let total: usize = calls.iter().map(Vec::len).sum();
    assert_eq!(total, 10);
    assert!(
        calls.len() <= 3,
        "{} admit calls for 10 concurrent answers",
        calls.len()
    );
    assert_eq!(h.egress.admissions(&sandbox_id()).len(), 10);
}

#[tokio::test]
async fn failed_admission_gives_servfail() {
    let h = Harness::start(deny_all(&["allowed.test"])).await;
    h.enforcer.fail_admit.store(true, Ordering::SeqCst);
    h.upstream.set(
        "allowed.test",
        rtype::A,
        vec![a("allowed.test", 60, [198, 18, 0, 2])],
    );
    let r = h.ask(&query(1, "allowed.test", rtype::A)).await;
    assert_eq!(r.rcode(), rcode::SERVFAIL);
    assert!(r.answers.is_empty());
    assert!(h.egress.admissions(&sandbox_id()).is_empty());
    assert!(
        h.enforcer
            .logged("dns", Verdict::Denied, "admission failed")
    );
}

#[tokio::test]
async fn tcp_carries_several_queries_and_truncation_falls_back_to_tcp() {
    let h = Harness::start(deny_all(&["allowed.test", "denied-not.test"])).await;
    h.upstream.set(
        "allowed.test",
        rtype::A,
        vec![a("allowed.test", 60, [198, 18, 0, 2])],
    );
    h.upstream.truncate_udp.store(true, Ordering::SeqCst);
    let mut s = TcpStream::connect(h.dns_addr()).await.unwrap();
    for (id, name, want) in [
        (1, "allowed.test", rcode::NOERROR),
        (2, "nope.test", rcode::NXDOMAIN),
        (3, "allowed.test", rcode::NOERROR),
    ] {
        write_framed(&mut s, &query(id, name, rtype::A).encode().unwrap())
            .await
            .unwrap();
        let r = Message::parse(&read_framed(&mut s).await.unwrap()).unwrap();
        assert_eq!((r.id, r.rcode()), (id, want));
        if want == rcode::NOERROR {
            assert_eq!(addrs(&r), vec![REMOTE]);
        }
    }
    // Each allowed query: a truncated UDP answer, then TCP.
    assert_eq!(h.upstream.udp_queries.load(Ordering::SeqCst), 2);
    assert_eq!(h.upstream.tcp_queries.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn open_policies_relay_answers_unchanged_and_admit_nothing() {
    let h = Harness::start(EgressPolicy::default()).await;
    h.upstream.set(
        "anything.example",
        rtype::A,
        vec![a("anything.example", 86400, [10, 99, 0, 1])],
    );
    let r = h.ask(&query(0x4242, "anything.example", rtype::A)).await;
    assert_eq!(r.id, 0x4242);
    assert_eq!(
        r.answers,
        vec![a("anything.example", 86400, [10, 99, 0, 1])]
    );
    let r = h.ask(&query(9, "missing.example", rtype::AAAA)).await;
    assert_eq!(r.rcode(), rcode::NXDOMAIN);
    assert!(h.enforcer.admit_calls().is_empty());
    assert!(h.egress.admissions(&sandbox_id()).is_empty());
    assert!(h.enforcer.logged("dns", Verdict::Allowed, "default"));
}

#[tokio::test]
async fn unknown_sources_are_refused() {
    let h = Harness::start(EgressPolicy::default()).await;
    let r = h
        .ask_from(
            Ipv4Addr::new(127, 0, 0, 9),
            &query(3, "anything.example", rtype::A),
        )
        .await;
    assert_eq!(r.rcode(), rcode::REFUSED);
    assert_eq!(h.upstream.queries(), 0);
}

#[tokio::test]
async fn upstream_failure_gives_servfail() {
    // A UDP port nothing listens on: the exchange fails fast.
    let dead = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let h = Harness::start_with(deny_all(&["allowed.test"]), |c, _, _| {
        c.host_resolvers = vec![dead_addr];
    })
    .await;
    let r = h.ask(&query(1, "allowed.test", rtype::A)).await;
    assert_eq!(r.rcode(), rcode::SERVFAIL);
    let r = h.ask(&query(2, "denied.test", rtype::A)).await;
    assert_eq!(r.rcode(), rcode::NXDOMAIN);
}

#[tokio::test]
async fn a_policys_dns_servers_replace_the_hosts() {
    let mut policy = deny_all(&["allowed.test"]);
    policy.dns_servers = vec![Ipv4Addr::LOCALHOST];
    // No host resolvers: only the policy's server (on the fake's port) can
    // answer.
    let h = Harness::start_with(policy, |c, t, upstream| {
        c.host_resolvers = vec![];
        t.upstream_port = upstream.port();
    })
    .await;
    h.upstream.set(
        "allowed.test",
        rtype::A,
        vec![a("allowed.test", 60, [198, 18, 0, 2])],
    );
    let r = h.ask(&query(1, "allowed.test", rtype::A)).await;
    assert_eq!(addrs(&r), vec![REMOTE]);
    assert_eq!(h.upstream.queries(), 1);
    // Without dnsServers and without host resolvers there is nobody to ask.
    let h = Harness::start_with(deny_all(&["allowed.test"]), |c, _, _| {
        c.host_resolvers = vec![]
    })
    .await;
    assert_eq!(
        h.ask(&query(1, "allowed.test", rtype::A)).await.rcode(),
        rcode::SERVFAIL
    );
}

#[tokio::test]
async fn udp_replies_respect_the_clients_size() {
    let h = Harness::start(EgressPolicy::default()).await;
    let many: Vec<Record> = (0..60u8)
        .map(|i| a("big.example", 60, [192, 0, 2, i]))
        .collect();
    h.upstream.set("big.example", rtype::A, many.clone());
    // The fake upstream answers in full over UDP; the client said nothing
    // about its size, so it gets a truncated reply and asks over TCP.
    let r = h.ask(&query(1, "big.example", rtype::A)).await;
    assert!(r.flags & flag::TC != 0);
    assert!(r.answers.is_empty());
    let mut s = TcpStream::connect(h.dns_addr()).await.unwrap();
    write_framed(&mut s, &query(2, "big.example", rtype::A).encode().unwrap())
        .await
        .unwrap();
    let r = Message::parse(&read_framed(&mut s).await.unwrap()).unwrap();
    assert_eq!(r.answers.len(), 60);
}

#[tokio::test]
async fn malformed_queries_get_formerr() {
    let h = Harness::start(deny_all(&["allowed.test"])).await;
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    sock.connect(h.dns_addr()).await.unwrap();
    // Header claims one question, then a pointer loop.
    sock.send(&[
        0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
    ])
    .await
    .unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let r = Message::parse(&buf[..n]).unwrap();
    assert_eq!((r.id, r.rcode()), (0xabcd, rcode::FORMERR));
    // Two questions at once are refused as well.
    let mut q = query(4, "allowed.test", rtype::A);
    q.questions.push(Question {
        name: Name::from_dotted("other.test").unwrap(),
        qtype: rtype::A,
        qclass: 1,
    });
    assert_eq!(h.ask(&q).await.rcode(), rcode::FORMERR);
    assert_eq!(h.upstream.queries(), 0);
}

#[tokio::test]
async fn answers_that_are_the_hosts_addresses_now_are_dropped() {
    let h = Harness::start(deny_all(&["allowed.test"])).await;
    let new_nic = Ipv4Addr::new(198, 18, 0, 5);
    h.upstream.set(
        "allowed.test",
        rtype::A,
        vec![
            a("allowed.test", 300, [198, 18, 0, 2]),
            a("allowed.test", 300, [198, 18, 0, 5]),
        ],
    );
    let r = h.ask(&query(1, "allowed.test", rtype::A)).await;
    assert_eq!(addrs(&r).len(), 2);
    // The host got 198.18.0.5 after start: it is no longer admitted.
    h.make_host_addr(new_nic);
    h.egress.forget(&sandbox_id());
    let r = h.ask(&query(2, "allowed.test", rtype::A)).await;
    assert_eq!(addrs(&r), vec![REMOTE]);
    let admitted: Vec<Ipv4Addr> = h
        .egress
        .admissions(&sandbox_id())
        .into_iter()
        .map(|e| e.addr)
        .collect();
    assert_eq!(admitted, vec![REMOTE]);
    assert!(h.enforcer.logged(
        "dns",
        Verdict::Denied,
        "answer 198.18.0.5 is a forbidden address"
    ));
    // Nor does a restore bring it back.
    h.egress.restore(
        &sandbox_id(),
        vec![crate::AdmittedAddr {
            name: "allowed.test".into(),
            addr: new_nic,
            expires: std::time::SystemTime::now() + Duration::from_secs(60),
        }],
    );
    assert_eq!(h.egress.admissions(&sandbox_id()).len(), 1);
}

#[tokio::test]
async fn answers_over_the_admission_limits_are_refused() {
    let h = Harness::start_with(deny_all(&["*.wild.test"]), |_, t, _| {
        t.max_admitted_addrs = 3;
        t.max_admitted_names = 5;
    })
    .await;
    let set = |name: &str, last: &[u8]| {
        let records = last
            .iter()
            .map(|i| a(name, 300, [198, 18, 2, *i]))
            .collect();
        h.upstream.set(name, rtype::A, records);
    };
    set("n1.wild.test", &[1, 2]);
    set("n2.wild.test", &[3, 4]);
    set("n3.wild.test", &[5]);
    set("n4.wild.test", &[1, 2, 3]);
    set("n5.wild.test", &[1, 2]);
    let ip = |i| Ipv4Addr::new(198, 18, 2, i);

    let r = h.ask(&query(1, "n1.wild.test", rtype::A)).await;
    assert_eq!(addrs(&r), vec![ip(1), ip(2)]);
    // One of the two new addresses fits.
    let r = h.ask(&query(2, "n2.wild.test", rtype::A)).await;
    assert_eq!(r.rcode(), rcode::NOERROR);
    assert_eq!(addrs(&r), vec![ip(3)]);
    assert!(h.enforcer.logged("dns", Verdict::Allowed, "allowOut"));
    assert!(
        h.enforcer
            .logged("dns", Verdict::Denied, "too many admitted addresses")
    );
    // None does: SERVFAIL, nothing committed.
    let commits = h.enforcer.admit_calls().len();
    let r = h.ask(&query(3, "n3.wild.test", rtype::A)).await;
    assert_eq!(r.rcode(), rcode::SERVFAIL);
    assert!(r.answers.is_empty());
    assert_eq!(h.enforcer.admit_calls().len(), commits);
    // Known addresses take new names until the binding limit (3 + 2 = 5).
    let r = h.ask(&query(4, "n4.wild.test", rtype::A)).await;
    assert_eq!(addrs(&r), vec![ip(1), ip(2)]);
    assert!(
        h.enforcer
            .logged("dns", Verdict::Denied, "too many admitted names")
    );
    let r = h.ask(&query(5, "n5.wild.test", rtype::A)).await;
    assert_eq!(r.rcode(), rcode::SERVFAIL);
    assert_eq!(h.egress.admissions(&sandbox_id()).len(), 5);
    // Names already bound are renewed as before.
    let r = h.ask(&query(6, "n1.wild.test", rtype::A)).await;
    assert_eq!(addrs(&r), vec![ip(1), ip(2)]);
    // Expired admissions make room.
    h.egress
        .shared
        .admissions
        .sweep(std::time::Instant::now() + Duration::from_secs(301));
    let r = h.ask(&query(7, "n3.wild.test", rtype::A)).await;
    assert_eq!(addrs(&r), vec![ip(5)]);
}
