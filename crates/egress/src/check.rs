//! The rule the TLS and HTTP listeners apply to every connection or
//! request, and the log entries all listeners write.

use std::net::Ipv4Addr;

use arca_proto::network::{EgressLogEntry, EgressPolicy, Verdict};

/// Log reason: a domain entry (or an allowed CIDR) let it through, or no
/// domain entry matched the name.
pub(crate) const RULE_ALLOW_OUT: &str = "allowOut";
/// Log reason: the name is not in the allow list.
pub(crate) const RULE_NOT_ALLOWED: &str = "not in allowOut";
/// Log reason: the destination was never an answer for that name.
pub(crate) const RULE_NOT_RESOLVED: &str = "address not resolved for this name";

/// Log reason: the destination is forbidden (`EgressConfig::is_forbidden`)
/// or an address of this host when the proxy was about to dial it.
pub(crate) const RULE_OFF_LIMITS: &str = "destination is this host or forbidden";

/// Why a connection or request was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Basis {
    /// The destination is in an allowed CIDR.
    Cidr,
    /// The policy is not deny-all and no deny rule covers the destination.
    Open,
    /// The name is allowed and the destination was admitted for it.
    Name,
}

/// The outcome of [`judge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Judgement {
    /// What let it through; `None`: refused.
    pub(crate) basis: Option<Basis>,
    /// Short reason for the log.
    pub(crate) rule: &'static str,
}

impl Judgement {
    /// Allowed or denied.
    pub(crate) fn verdict(&self) -> Verdict {
        if self.basis.is_some() {
            Verdict::Allowed
        } else {
            Verdict::Denied
        }
    }
}

/// Whether a sandbox may reach `dst` using `name` (SNI or Host).
///
/// An allowed CIDR wins; without deny-all the address rules decide alone
/// (the firewall does not redirect such flows, but a policy replace can
/// race a connection). In deny-all mode the name must match a domain entry
/// **and** `dst` must have been an answer for that very name
/// (`admitted`): admitting `a.test` never lets `b.test` ride on its
/// address. `missing` is the reason given when there is no name.
pub(crate) fn judge(
    policy: &EgressPolicy,
    dst: Ipv4Addr,
    name: Option<&str>,
    missing: &'static str,
    admitted: impl Fn(&str) -> bool,
) -> Judgement {
    let yes = |basis, rule| Judgement {
        basis: Some(basis),
        rule,
    };
    let no = |rule| Judgement { basis: None, rule };
    if policy.allow.iter().any(|n| n.contains(dst)) {
        return yes(Basis::Cidr, RULE_ALLOW_OUT);
    }
    if !policy.deny_all {
        return if policy.allows_addr(dst) {
            yes(Basis::Open, "default")
        } else {
            no("denyOut")
        };
    }
    let Some(name) = name else {
        return no(missing);
    };
    if !policy.allows_name(name) {
        return no(RULE_NOT_ALLOWED);
    }
    if !admitted(name) {
        return no(RULE_NOT_RESOLVED);
    }
    yes(Basis::Name, RULE_ALLOW_OUT)
}

/// A log entry stamped now, seen once.
pub(crate) fn entry(
    protocol: &str,
    destination: Ipv4Addr,
    port: u16,
    name: Option<&str>,
    verdict: Verdict,
    rule: &str,
) -> EgressLogEntry {
    EgressLogEntry {
        timestamp: chrono::Utc::now(),
        protocol: protocol.to_string(),
        destination: destination.to_string(),
        port: Some(port),
        name: name.map(str::to_string),
        verdict,
        rule: rule.to_string(),
        count: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_proto::network::NetworkSpec;

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        EgressPolicy::compile(
            &NetworkSpec {
                allow_out: allow.iter().map(|s| s.to_string()).collect(),
                deny_out: deny.iter().map(|s| s.to_string()).collect(),
                dns_servers: vec![],
            },
            true,
        )
        .unwrap()
    }

    #[test]
    fn needs_an_allowed_name_resolved_to_the_destination() {
        let p = policy(
            &["allowed.test", "*.wild.test", "198.18.0.3"],
            &["0.0.0.0/0"],
        );
        let dst: Ipv4Addr = "198.18.0.2".parse().unwrap();
        let only = |want: &'static str| move |n: &str| n == want;
        let j = |name, admitted: &dyn Fn(&str) -> bool| judge(&p, dst, name, "no SNI", admitted);
        assert_eq!(
            j(Some("allowed.test"), &only("allowed.test")).basis,
            Some(Basis::Name)
        );
        assert_eq!(
            j(Some("a.wild.test"), &only("a.wild.test")).verdict(),
            Verdict::Allowed
        );
        assert_eq!(
            j(Some("allowed.test"), &only("a.wild.test")).rule,
            RULE_NOT_RESOLVED
        );
        assert_eq!(
            j(Some("denied.test"), &only("denied.test")).rule,
            RULE_NOT_ALLOWED
        );
        assert_eq!(j(Some("wild.test"), &|_| true).rule, RULE_NOT_ALLOWED);
        assert_eq!(j(None, &|_| true).rule, "no SNI");
        // An allowed CIDR needs no name.
        let j3 = judge(&p, "198.18.0.3".parse().unwrap(), None, "no SNI", |_| false);
        assert_eq!(j3.basis, Some(Basis::Cidr));
    }

    #[test]
    fn without_deny_all_the_address_rules_decide() {
        let p = policy(&[], &["10.0.0.0/8"]);
        let j = judge(
            &p,
            "10.1.1.1".parse().unwrap(),
            Some("x.test"),
            "no SNI",
            |_| true,
        );
        assert_eq!((j.basis, j.rule), (None, "denyOut"));
        let j = judge(&p, "192.0.2.1".parse().unwrap(), None, "no SNI", |_| false);
        assert_eq!(j.basis, Some(Basis::Open));
    }

    #[test]
    fn entries_carry_what_was_seen() {
        let e = entry(
            "tls",
            "192.0.2.1".parse().unwrap(),
            443,
            Some("a.test"),
            Verdict::Denied,
            "no SNI",
        );
        assert_eq!(e.destination, "192.0.2.1");
        assert_eq!(e.port, Some(443));
        assert_eq!(e.count, 1);
        assert_eq!(e.name.as_deref(), Some("a.test"));
    }
}
