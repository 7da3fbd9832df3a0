//! Image references, parsed the way Docker normalises them.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::ImageError;

/// Registry name of Docker Hub in references.
pub const DOCKER_HUB: &str = "docker.io";
/// Host actually serving Docker Hub's registry API.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// Tag used when a reference names neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
/// Longest repository name accepted (Docker's limit).
const MAX_REPOSITORY_LEN: usize = 255;

/// A parsed image reference.
///
/// | input | registry | repository | tag | digest |
/// |---|---|---|---|---|
/// | `busybox` | `docker.io` | `library/busybox` | `latest` | |
/// | `user/app:1` | `docker.io` | `user/app` | `1` | |
/// | `localhost:5000/a/b:t` | `localhost:5000` | `a/b` | `t` | |
/// | `ghcr.io/o/r@sha256:…` | `ghcr.io` | `o/r` | | `sha256:…` |
///
/// The first component is a registry when it contains `.` or `:` or is
/// `localhost`, as in Docker. Only `sha256` digests are accepted (it is the
/// only algorithm we verify).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host\[:port\], `docker.io` for Docker Hub.
    pub registry: String,
    /// Repository path, e.g. `library/busybox`.
    pub repository: String,
    /// Tag, if given (or defaulted to `latest` when there is no digest).
    pub tag: Option<String>,
    /// `sha256:<hex>`, if given.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses and normalises `input`.
    pub fn parse(input: &str) -> Result<Self, ImageError> {
        let invalid = |reason: &str| ImageError::InvalidReference {
            reference: input.to_owned(),
            reason: reason.to_owned(),
        };
        if input.is_empty() || input.trim() != input {
            return Err(invalid("it is empty or has surrounding whitespace"));
        }
        let (name_tag, digest) = match input.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (input, None),
        };
        if let Some(d) = digest {
            check_digest(d).map_err(|r| invalid(&r))?;
        }
        let after_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[after_slash..].rfind(':') {
            Some(i) => (
                &name_tag[..after_slash + i],
                Some(&name_tag[after_slash + i + 1..]),
            ),
            None => (name_tag, None),
        };
        if let Some(t) = tag {
            let b = t.as_bytes();
            let valid = !b.is_empty()
                && b.len() <= 128
                && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
            if !valid {
                return Err(invalid(
                    "the tag must be 1 to 128 characters of letters, digits, `_`, `.` and `-`",
                ));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first, rest)
            }
            _ => (DOCKER_HUB, name),
        };
        if registry.is_empty()
            || !registry
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']'))
        {
            return Err(invalid(
                "the registry must be a host name with an optional :port",
            ));
        }
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_owned()
        };
        if repository.len() > MAX_REPOSITORY_LEN {
            return Err(invalid("the repository name is longer than 255 characters"));
        }
        if !repository.split('/').all(valid_component) {
            return Err(invalid(
                "repository path components must be lowercase letters and digits, separated by \
                 `.`, `_`, `__` or dashes",
            ));
        }
        let tag = match (tag, digest) {
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            (t, _) => t.map(str::to_owned),
        };
        Ok(Self {
            registry: registry.to_owned(),
            repository,
            tag,
            digest: digest.map(str::to_owned),
        })
    }

    /// Whether this is a Docker Hub image.
    pub fn is_docker_hub(&self) -> bool {
        self.registry == DOCKER_HUB
    }

    /// Host\[:port\] serving the registry API (`registry-1.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        if self.is_docker_hub() {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The manifest to ask for: the digest if there is one, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or(DEFAULT_TAG)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Checks `sha256:<64 lowercase hex>`.
pub(crate) fn check_digest(d: &str) -> Result<(), String> {
    match d.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64 && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(())
        }
        Some(("sha256", _)) => Err("a sha256 digest has 64 lowercase hex digits".to_owned()),
        Some((algo, _)) => Err(format!(
            "digest algorithm `{algo}` is not supported (only sha256)"
        )),
        None => Err("a digest looks like sha256:<hex>".to_owned()),
    }
}

/// One repository path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Whether `host_port` is spoken to over plain HTTP: loopback (`localhost`,
/// `127.0.0.0/8`, `[::1]`, any port) or listed in `insecure` (as
/// `host:port`, or as `host` for any port).
pub(crate) fn is_insecure(host_port: &str, insecure: &[String]) -> bool {
    let host = host_without_port(host_port);
    host == "localhost"
        || host == "[::1]"
        || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
        || insecure.iter().any(|e| e == host_port || e == host)
}

/// `host` of `host[:port]` (IPv6 literals keep their brackets).
pub(crate) fn host_without_port(host_port: &str) -> &str {
    if host_port.starts_with('[') {
        return host_port.find(']').map_or(host_port, |i| &host_port[..=i]);
    }
    match host_port.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|c| c.is_ascii_digit()) => h,
        _ => host_port,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(s: &str) -> (String, String, Option<String>, Option<String>) {
        let r = Reference::parse(s).unwrap();
        (r.registry, r.repository, r.tag, r.digest)
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_like_docker() {
        let s = |x: &str| x.to_owned();
        assert_eq!(
            parts("busybox"),
            (
                s("docker.io"),
                s("library/busybox"),
                Some(s("latest")),
                None
            )
        );
        assert_eq!(
            parts("user/app:1.2"),
            (s("docker.io"), s("user/app"), Some(s("1.2")), None)
        );
        assert_eq!(
            parts("docker.io/busybox:musl"),
            (s("docker.io"), s("library/busybox"), Some(s("musl")), None)
        );
        assert_eq!(
            parts("index.docker.io/library/debian"),
            (s("docker.io"), s("library/debian"), Some(s("latest")), None)
        );
        assert_eq!(
            parts("localhost:5000/a/b:t"),
            (s("localhost:5000"), s("a/b"), Some(s("t")), None)
        );
        assert_eq!(
            parts("localhost/a"),
            (s("localhost"), s("a"), Some(s("latest")), None)
        );
        assert_eq!(
            parts(&format!("ghcr.io/o/r@{D}")),
            (s("ghcr.io"), s("o/r"), None, Some(s(D)))
        );
        assert_eq!(
            parts(&format!("127.0.0.1:5000/x:v1@{D}")),
            (s("127.0.0.1:5000"), s("x"), Some(s("v1")), Some(s(D)))
        );
        // A first component without '.' or ':' is a Hub namespace.
        assert_eq!(parts("myhost/x").0, "docker.io");
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.manifest_ref(), "latest");
        let r = Reference::parse(&format!("a.io/x:t@{D}")).unwrap();
        assert_eq!(r.manifest_ref(), D);
        assert_eq!(r.to_string(), format!("a.io/x:t@{D}"));
    }

    #[test]
    fn refuses_bad_references() {
        for bad in [
            "",
            " busybox",
            "Busybox",
            "a//b",
            "a/",
            "a:",
            "a:-x",
            "a@sha256:abc",
            "a@md5:0123",
            "a@0123",
            "a..b",
            "a_-b",
            "-a",
            "a.io/../x",
            "a.io/x/..",
            "a b",
            &format!("a:{}", "t".repeat(129)),
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} should be refused");
        }
        for ok in ["a__b", "a-----b", "a.b", "a_b/c-d.e", "a:V1.0_x-y"] {
            assert!(Reference::parse(ok).is_ok(), "{ok:?} should parse");
        }
        let e = Reference::parse("a@md5:0123").unwrap_err().to_string();
        assert!(e.contains("only sha256"), "{e}");
    }

    #[test]
    fn loopback_and_listed_hosts_are_insecure() {
        let none: Vec<String> = Vec::new();
        for h in [
            "127.0.0.1:5000",
            "127.0.0.1",
            "127.1.2.3:1",
            "localhost:80",
            "localhost",
            "[::1]:5000",
        ] {
            assert!(is_insecure(h, &none), "{h}");
        }
        for h in [
            "10.0.0.1:5000",
            "example.com",
            "localhost.evil.com:5000",
            "127.0.0.1.nip.io",
        ] {
            assert!(!is_insecure(h, &none), "{h}");
        }
        let list = vec!["reg.lan:5000".to_owned(), "other.lan".to_owned()];
        assert!(is_insecure("reg.lan:5000", &list));
        assert!(!is_insecure("reg.lan:5001", &list));
        assert!(is_insecure("other.lan:443", &list));
        assert_eq!(host_without_port("[::1]:5000"), "[::1]");
    }
}
