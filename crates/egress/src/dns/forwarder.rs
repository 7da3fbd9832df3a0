//! What the forwarder answers to one query (ADR 0005 section 2).
//!
//! - Policy without deny-all: the query goes to the upstreams as it came
//!   and the answer comes back unchanged; nothing is admitted.
//! - Deny-all, name not allowed: NXDOMAIN from here; nothing leaves the
//!   node, so DNS cannot carry data out.
//! - Deny-all, allowed name: the query is rebuilt (question and our own
//!   EDNS record only, so nothing else the sandbox put in it travels) and
//!   forwarded. For A (and CNAME) queries the answer is cut down to the
//!   CNAME chain from the queried name and the A records at its end, minus
//!   forbidden addresses and addresses of this host at that moment (DNS
//!   rebinding), and minus addresses over the sandbox's admission limits
//!   (SERVFAIL when none is left); those addresses are admitted for
//!   the queried name before the reply leaves, and every TTL in the reply
//!   is capped to how long the admission lasts. AAAA, SVCB and HTTPS get
//!   an empty NOERROR from here (slots have no IPv6, and SVCB/HTTPS could
//!   carry address hints that nothing admits). Other types are forwarded
//!   and relayed without the upstream's additional records; they admit
//!   nothing.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use arca_proto::network::Verdict;

use super::upstream::exchange;
use super::wire::{
    CLASS_IN, EDNS_PAYLOAD, Header, Message, Name, Question, Record, fit, flag, opt_record, rcode,
    rtype, udp_limit,
};
use crate::Shared;
use crate::check::{RULE_ALLOW_OUT, RULE_NOT_ALLOWED, entry};
use crate::config::{MAX_ADMISSION_SECS, MAX_CNAME_LINKS, MIN_ADMISSION_SECS};
use crate::enforcer::{Admission, SandboxView};

/// How the query came, which bounds the reply's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// A datagram: the client's EDNS size, else 512 bytes.
    Udp,
    /// A TCP stream: 65535 bytes.
    Tcp,
}

/// Port logged for DNS entries: what the sandbox asked, before redirection.
const DNS_PORT: u16 = 53;

/// A reply not yet sized for the transport.
enum Reply {
    /// Built here.
    Built(Message),
    /// The upstream's answer, relayed as it came (id restored).
    Raw(Vec<u8>),
}

/// Answers one query from a known sandbox; `None` means send nothing (the
/// datagram was not a query). `resolver` is the address the query reached,
/// for the log.
pub(crate) async fn answer(
    shared: &Shared,
    view: &SandboxView,
    resolver: Ipv4Addr,
    query: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let header = Header::peek(query)?;
    if header.flags & flag::QR != 0 {
        return None;
    }
    let q = match Message::parse(query) {
        Ok(q) => q,
        Err(e) => {
            tracing::debug!(sandbox_id = %view.id, err = %e, "unparsable DNS query");
            let mut m = Message {
                id: header.id,
                flags: flag::QR | flag::RA | (header.flags & flag::OPCODE_MASK),
                ..Message::default()
            };
            m.set_rcode(rcode::FORMERR);
            return m.encode().ok();
        }
    };
    let limit = match transport {
        Transport::Udp => udp_limit(&q),
        Transport::Tcp => usize::from(u16::MAX),
    };
    let reply = respond(shared, view, resolver, &q, query).await;
    let sized = match reply {
        Reply::Built(m) => m.encode().and_then(|bytes| fit(&m, bytes, limit)),
        Reply::Raw(bytes) if bytes.len() <= limit => Ok(bytes),
        // An answer the upstream gave over TCP, too big for this client's
        // datagrams: truncate so it asks again over TCP.
        Reply::Raw(bytes) => Message::parse(&bytes).and_then(|m| fit(&m, bytes, limit)),
    };
    match sized {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            tracing::debug!(sandbox_id = %view.id, err = %e, "cannot encode DNS reply");
            Message::response_to(&q, rcode::SERVFAIL).encode().ok()
        }
    }
}

async fn respond(
    shared: &Shared,
    view: &SandboxView,
    resolver: Ipv4Addr,
    q: &Message,
    raw: &[u8],
) -> Reply {
    if q.opcode() != 0 {
        return Reply::Built(Message::response_to(q, rcode::NOTIMP));
    }
    let [question] = q.questions.as_slice() else {
        return Reply::Built(Message::response_to(q, rcode::FORMERR));
    };
    let shown = question.name.to_display();
    let log = |verdict: Verdict, rule: &str| {
        shared.record(
            &view.id,
            entry("dns", resolver, DNS_PORT, Some(&shown), verdict, rule),
        );
    };
    let policy = &view.policy;
    let servers = shared.upstreams(policy);
    let per_try = shared.tuning.upstream_timeout;

    if !policy.deny_all {
        log(Verdict::Allowed, "default");
        return match exchange(raw, &servers, per_try).await {
            Ok(answer) => Reply::Raw(answer),
            Err(e) => {
                tracing::debug!(sandbox_id = %view.id, err = %e, "no upstream answer");
                Reply::Built(Message::response_to(q, rcode::SERVFAIL))
            }
        };
    }

    let name = question
        .name
        .to_hostname()
        .filter(|h| !h.is_empty() && policy.allows_name(h));
    let Some(name) = name else {
        log(Verdict::Denied, RULE_NOT_ALLOWED);
        return Reply::Built(Message::response_to(q, rcode::NXDOMAIN));
    };
    if question.qclass != CLASS_IN {
        log(Verdict::Denied, "query class is not IN");
        return Reply::Built(Message::response_to(q, rcode::REFUSED));
    }
    if matches!(question.qtype, rtype::AAAA | rtype::SVCB | rtype::HTTPS) {
        log(Verdict::Allowed, RULE_ALLOW_OUT);
        return Reply::Built(Message::response_to(q, rcode::NOERROR));
    }

    // Only the question and our EDNS record go out.
    let outgoing = Message {
        id: q.id,
        flags: flag::RD,
        questions: vec![question.clone()],
        additional: vec![opt_record(EDNS_PAYLOAD)],
        ..Message::default()
    };
    let upstream = match outgoing.encode() {
        Ok(bytes) => exchange(&bytes, &servers, per_try).await,
        Err(_) => return Reply::Built(Message::response_to(q, rcode::FORMERR)),
    };
    let resp = match upstream.map(|bytes| Message::parse(&bytes)) {
        Ok(Ok(resp)) if same_question(&resp, question) => resp,
        Ok(Ok(_)) | Ok(Err(_)) => {
            tracing::debug!(sandbox_id = %view.id, "malformed upstream answer");
            log(Verdict::Allowed, RULE_ALLOW_OUT);
            return Reply::Built(Message::response_to(q, rcode::SERVFAIL));
        }
        Err(e) => {
            tracing::debug!(sandbox_id = %view.id, err = %e, "no upstream answer");
            log(Verdict::Allowed, RULE_ALLOW_OUT);
            return Reply::Built(Message::response_to(q, rcode::SERVFAIL));
        }
    };

    let mut reply = Message::response_to(q, resp.rcode());
    if !matches!(question.qtype, rtype::A | rtype::CNAME) {
        log(Verdict::Allowed, RULE_ALLOW_OUT);
        reply.answers = capped(resp.answers, MAX_ADMISSION_SECS);
        reply.authority = capped(resp.authority, MAX_ADMISSION_SECS);
        return Reply::Built(reply);
    }
    if resp.rcode() != rcode::NOERROR {
        log(Verdict::Allowed, RULE_ALLOW_OUT);
        reply.authority = capped(soa_only(resp.authority), MAX_ADMISSION_SECS);
        return Reply::Built(reply);
    }

    let (links, end) = follow_chain(question, &resp.answers);
    let mut addrs: Vec<Ipv4Addr> = Vec::new();
    let mut a_records: Vec<Record> = Vec::new();
    let mut refused: Vec<Ipv4Addr> = Vec::new();
    for r in &resp.answers {
        let Some(ip) = r.a_addr().filter(|_| r.name.eq_ignore_case(&end)) else {
            continue;
        };
        // Checked per answer: an address may have become the host's since
        // start (a new bridge or NIC).
        if shared.off_limits(ip) {
            refused.push(ip);
            continue;
        }
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
        a_records.push(r.clone());
    }
    let ttl = admission_ttl(links.iter().chain(&a_records));
    let mut cap = ttl;
    let mut over_limit: Vec<&'static str> = Vec::new();
    if !addrs.is_empty() {
        let at = Instant::now();
        let plan = shared.admissions.plan(&view.id, &name, &addrs, ttl, at);
        if !plan.refused.is_empty() {
            // Refused rather than admitted by evicting others (see
            // MAX_ADMITTED_ADDRS_PER_SANDBOX): the client does not get
            // these addresses at all.
            for (_, rule) in &plan.refused {
                if !over_limit.contains(rule) {
                    over_limit.push(rule);
                }
            }
            let fits: HashSet<Ipv4Addr> = plan.admit.iter().copied().collect();
            a_records.retain(|r| r.a_addr().is_some_and(|ip| fits.contains(&ip)));
            if shared.may_warn() {
                tracing::warn!(sandbox_id = %view.id, name = %name, refused = plan.refused.len(), "sandbox reached its admission limit; refusing DNS answers");
            } else {
                tracing::debug!(sandbox_id = %view.id, name = %name, refused = plan.refused.len(), "sandbox reached its admission limit; refusing DNS answers");
            }
        }
        if plan.admit.is_empty() {
            for rule in over_limit {
                log(Verdict::Denied, rule);
            }
            return Reply::Built(Message::response_to(q, rcode::SERVFAIL));
        }
        if !plan.commit.is_empty() {
            let batch = plan
                .commit
                .iter()
                .map(|addr| Admission {
                    sandbox: view.id.clone(),
                    addr: *addr,
                    ttl,
                })
                .collect();
            if let Err(e) = shared.admitter.admit(batch).await {
                if shared.may_warn() {
                    tracing::warn!(sandbox_id = %view.id, name = %name, err = %e, "admitting DNS answers failed");
                } else {
                    tracing::debug!(sandbox_id = %view.id, name = %name, err = %e, "admitting DNS answers failed");
                }
                log(Verdict::Denied, "admission failed");
                return Reply::Built(Message::response_to(q, rcode::SERVFAIL));
            }
        }
        cap = plan.cap;
        shared.admissions.bind(&view.id, &name, plan, ttl, at);
    }
    log(Verdict::Allowed, RULE_ALLOW_OUT);
    for rule in over_limit {
        log(Verdict::Denied, rule);
    }
    for ip in refused {
        log(
            Verdict::Denied,
            &format!("answer {ip} is a forbidden address"),
        );
    }
    let cap_secs = cap.as_secs();
    reply.answers = capped(links.into_iter().chain(a_records).collect(), cap_secs);
    if reply.answers.is_empty() {
        // No data: keep the SOA so the client caches the absence briefly.
        reply.authority = capped(soa_only(resp.authority), cap_secs);
    }
    Reply::Built(reply)
}

/// Whether the answer's question is the one asked (the case may differ).
fn same_question(resp: &Message, q: &Question) -> bool {
    matches!(resp.questions.as_slice(), [r] if r.qtype == q.qtype && r.qclass == q.qclass && r.name.eq_ignore_case(&q.name))
}

/// The CNAME records from the queried name on, at most
/// [`MAX_CNAME_LINKS`], and the name the chain ends at.
fn follow_chain(q: &Question, answers: &[Record]) -> (Vec<Record>, Name) {
    let mut current = q.name.clone();
    let mut links = Vec::new();
    for _ in 0..MAX_CNAME_LINKS {
        let next = answers
            .iter()
            .find(|r| r.rtype == rtype::CNAME && r.name.eq_ignore_case(&current))
            .and_then(|r| Some((r, r.cname_target()?)));
        let Some((record, target)) = next else {
            break;
        };
        links.push(record.clone());
        current = target;
    }
    (links, current)
}

/// The smallest TTL of `records` clamped to the admission bounds (the
/// shortest bound when there are none).
fn admission_ttl<'a>(records: impl Iterator<Item = &'a Record>) -> Duration {
    let min = records.map(|r| u64::from(r.ttl)).min().unwrap_or(0);
    Duration::from_secs(min.clamp(MIN_ADMISSION_SECS, MAX_ADMISSION_SECS))
}

/// The records with TTLs of at most `cap` seconds (OPT records, whose TTL
/// field holds flags, are dropped: the reply gets its own).
fn capped(records: Vec<Record>, cap: u64) -> Vec<Record> {
    let cap = u32::try_from(cap).unwrap_or(u32::MAX);
    records
        .into_iter()
        .filter(|r| r.rtype != rtype::OPT)
        .map(|mut r| {
            r.ttl = r.ttl.min(cap);
            r
        })
        .collect()
}

fn soa_only(records: Vec<Record>) -> Vec<Record> {
    records
        .into_iter()
        .filter(|r| r.rtype == rtype::SOA)
        .collect()
}

/// Upstreams for a policy: its `dnsServers` on `port`, else the host's.
pub(crate) fn upstreams_for(
    dns_servers: &[Ipv4Addr],
    port: u16,
    host: &[SocketAddr],
) -> Vec<SocketAddr> {
    if dns_servers.is_empty() {
        host.to_vec()
    } else {
        dns_servers
            .iter()
            .map(|ip| SocketAddr::from((*ip, port)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::wire::tests::{a, cname, name, query};

    #[test]
    fn follows_a_cname_chain_from_the_queried_name() {
        let q = query(1, "alias.wild.test", rtype::A);
        let answers = vec![
            a("unrelated.test", 30, [192, 0, 2, 99]),
            cname("ALIAS.wild.test", 300, "mid.cdn.test"),
            cname("mid.cdn.test", 120, "edge.cdn.test"),
            a("edge.cdn.test", 30, [192, 0, 2, 2]),
        ];
        let (links, end) = follow_chain(&q.questions[0], &answers);
        assert_eq!(links.len(), 2);
        assert!(end.eq_ignore_case(&name("edge.cdn.test")));
        assert_eq!(
            admission_ttl(links.iter().chain(&answers[3..])),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn stops_after_eight_links_and_on_loops() {
        let mut answers = Vec::new();
        for i in 0..12 {
            answers.push(cname(
                &format!("n{i}.test"),
                600,
                &format!("n{}.test", i + 1),
            ));
        }
        let q = query(1, "n0.test", rtype::A);
        let (links, end) = follow_chain(&q.questions[0], &answers);
        assert_eq!(links.len(), MAX_CNAME_LINKS);
        assert!(end.eq_ignore_case(&name("n8.test")));
        let looped = vec![
            cname("a.test", 600, "b.test"),
            cname("b.test", 600, "a.test"),
        ];
        let q = query(1, "a.test", rtype::A);
        assert_eq!(
            follow_chain(&q.questions[0], &looped).0.len(),
            MAX_CNAME_LINKS
        );
    }

    #[test]
    fn clamps_admission_ttls() {
        let recs = [a("x.test", 5, [192, 0, 2, 1])];
        assert_eq!(admission_ttl(recs.iter()), Duration::from_secs(60));
        let recs = [a("x.test", 86400, [192, 0, 2, 1])];
        assert_eq!(admission_ttl(recs.iter()), Duration::from_secs(3600));
        let recs = [
            a("x.test", 300, [192, 0, 2, 1]),
            cname("y.test", 200, "x.test"),
        ];
        assert_eq!(admission_ttl(recs.iter()), Duration::from_secs(200));
        let capped = capped(vec![recs[0].clone(), opt_record(4096)], 120);
        assert_eq!(capped.len(), 1);
        assert_eq!(capped[0].ttl, 120);
    }

    #[test]
    fn picks_upstreams() {
        let host: Vec<SocketAddr> = vec!["127.0.0.53:53".parse().unwrap()];
        assert_eq!(upstreams_for(&[], 53, &host), host);
        let mine = upstreams_for(&["198.18.0.2".parse().unwrap()], 53, &host);
        assert_eq!(mine, vec!["198.18.0.2:53".parse::<SocketAddr>().unwrap()]);
    }
}
