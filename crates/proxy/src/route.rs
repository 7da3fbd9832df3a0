//! Which sandbox and port a request is for (CONTRACT 1.6).
//!
//! The decision is made per request, never per connection: the SDKs pool
//! connections to the one proxy address, so a kept-alive connection carries
//! requests for many sandboxes.

use std::net::IpAddr;

use arca_proto::node::{Route, RouteSource};
use http::{HeaderMap, Method, Request};
use subtle::ConstantTimeEq as _;

use crate::error::ProxyError;

/// envd's port inside every sandbox.
pub(crate) const ENVD_PORT: u16 = 49983;

/// Header naming the sandbox (rule 1).
const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
/// Header naming the port (rule 1).
const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The sandbox as the request named it, before any lookup.
    pub(crate) sandbox_id: String,
    /// Port inside the sandbox.
    pub(crate) port: u16,
    /// The route, when a lookup already happened (signature routing).
    pub(crate) route: Option<Route>,
}

/// Resolves a request to a target, following CONTRACT 1.6:
///
/// 1. a shared host (`localhost`, an IP literal, `sandbox.*`) with any
///    `E2b-Sandbox-*` header routes by the headers, which must then both be
///    valid;
/// 2. otherwise the first DNS label of the host is `<port>-<sandboxId>`
///    (a third, legacy `-<clientId>` part is ignored);
/// 3. a host that is not of that form falls back to the headers when any is
///    present (so `E2B_SANDBOX_URL` may name the proxy by any host name);
/// 4. a header-less `GET|POST /files` goes to envd of the sandbox whose access
///    token reproduces the URL's `signature`, or, unsigned, to the only
///    running sandbox.
pub(crate) fn resolve<B>(req: &Request<B>, routes: &dyn RouteSource) -> Result<Target, ProxyError> {
    let host = request_host(req);
    let host = strip_port(host.as_deref().unwrap_or(""));
    let headers = req.headers();
    let has_headers =
        headers.contains_key(SANDBOX_ID_HEADER) || headers.contains_key(SANDBOX_PORT_HEADER);
    if has_headers && is_shared_host(host) {
        return from_headers(headers);
    }
    if let Some(target) = parse_host_label(host) {
        return Ok(target);
    }
    if has_headers {
        return from_headers(headers);
    }
    if req.uri().path() == "/files" && matches!(*req.method(), Method::GET | Method::POST) {
        return header_less_files(req, routes);
    }
    Err(ProxyError::NoRouting)
}

/// The host a request was sent to: `Host`, else the URI authority (h2).
fn request_host<B>(req: &Request<B>) -> Option<String> {
    if let Some(h) = req.headers().get(http::header::HOST) {
        return h.to_str().ok().map(str::to_ascii_lowercase);
    }
    req.uri()
        .authority()
        .map(|a| a.as_str().to_ascii_lowercase())
}

/// `host[:port]` or `[v6][:port]` without the port.
pub(crate) fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        // Exactly one colon: a port. More: a bare IPv6 literal.
        Some((h, _)) if !h.contains(':') => h,
        _ => host,
    }
}

/// Hosts shared by every sandbox, routed by the headers (rule 1).
fn is_shared_host(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok() || host.starts_with("sandbox.")
}

/// `^[a-z0-9]+$`.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Rule 1: both headers, an integer port, a well-formed id.
fn from_headers(headers: &HeaderMap) -> Result<Target, ProxyError> {
    let (Some(id), Some(port)) = (
        headers.get(SANDBOX_ID_HEADER),
        headers.get(SANDBOX_PORT_HEADER),
    ) else {
        return Err(ProxyError::MissingRoutingHeader);
    };
    let port = port
        .to_str()
        .ok()
        .and_then(|p| p.trim().parse::<u16>().ok())
        .ok_or_else(|| {
            ProxyError::InvalidPort(String::from_utf8_lossy(port.as_bytes()).into_owned())
        })?;
    let id_str = id.to_str().unwrap_or_default().trim();
    if !valid_id(id_str) {
        return Err(ProxyError::InvalidSandboxId(
            String::from_utf8_lossy(id.as_bytes()).into_owned(),
        ));
    }
    Ok(Target {
        sandbox_id: id_str.to_string(),
        port,
        route: None,
    })
}

/// Rule 2: `<port>-<sandboxId>[-<clientId>].<anything>`, port stripped.
pub(crate) fn parse_host_label(host: &str) -> Option<Target> {
    let label = host.split('.').next()?;
    let mut parts = label.split('-');
    let port = parts.next()?.parse::<u16>().ok()?;
    let id = parts.next()?;
    // Old SDKs appended `-<clientId>` to sandbox ids; the reference proxy
    // reads the first two parts only, and so do we.
    if !valid_id(id) {
        return None;
    }
    Some(Target {
        sandbox_id: id.to_string(),
        port,
        route: None,
    })
}

/// Query parameters of a `/files` URL that take part in its signature.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct FilesQuery {
    pub(crate) path: Option<String>,
    pub(crate) username: Option<String>,
    pub(crate) signature: Option<String>,
    pub(crate) signature_expiration: Option<String>,
}

impl FilesQuery {
    /// Decodes like envd's form decoder (`+` is a space, `%XX` a byte), so the
    /// recomputed signature sees the same strings envd will.
    pub(crate) fn parse(query: &str) -> FilesQuery {
        let mut q = FilesQuery::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = form_decode(v);
            match form_decode(k).as_str() {
                "path" => q.path = Some(v),
                "username" => q.username = Some(v),
                "signature" => q.signature = Some(v),
                "signature_expiration" => q.signature_expiration = Some(v),
                _ => {}
            }
        }
        q
    }
}

fn form_decode(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}

pub(crate) use arca_proto::files::signature;

/// Rule 4: signed URLs find their sandbox by token, unsigned ones need a
/// single running sandbox.
fn header_less_files<B>(req: &Request<B>, routes: &dyn RouteSource) -> Result<Target, ProxyError> {
    let q = FilesQuery::parse(req.uri().query().unwrap_or(""));
    let Some(sig) = q.signature.as_deref() else {
        let mut all = routes.routes();
        return match all.len() {
            1 => {
                let route = all.remove(0);
                Ok(Target {
                    sandbox_id: route.sandbox_id.to_string(),
                    port: ENVD_PORT,
                    route: Some(route),
                })
            }
            n => Err(ProxyError::Ambiguous(n)),
        };
    };
    // envd parses the expiration as an integer: compare on its canonical
    // text so `+5` or `05` cannot sign differently here and there.
    let exp = match q.signature_expiration.as_deref() {
        Some(e) => Some(
            e.parse::<i64>()
                .map_err(|_| ProxyError::InvalidExpiration(e.to_string()))?
                .to_string(),
        ),
        None => None,
    };
    let operation = if req.method() == Method::GET {
        "read"
    } else {
        "write"
    };
    let path = q.path.as_deref().unwrap_or("");
    let user = q.username.as_deref().unwrap_or("");
    routes
        .routes()
        .into_iter()
        .find(|route| {
            route.envd_access_token.as_deref().is_some_and(|token| {
                let expected = signature(path, operation, user, token, exp.as_deref());
                bool::from(expected.as_bytes().ct_eq(sig.as_bytes()))
            })
        })
        .map(|route| Target {
            sandbox_id: route.sandbox_id.to_string(),
            port: ENVD_PORT,
            route: Some(route),
        })
        .ok_or(ProxyError::NoSignatureMatch)
}

/// Whether a request must never reach the sandbox from outside: envd's
/// `/init` configures the sandbox and is for the orchestrator only (CONTRACT
/// 3.5). The path is compared after percent-decoding, collapsing slashes and
/// dropping a trailing one, so no spelling of it slips through.
pub(crate) fn is_orchestrator_only(port: u16, path: &str) -> bool {
    if port != ENVD_PORT {
        return false;
    }
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let segments: Vec<&str> = decoded.split('/').filter(|s| !s.is_empty()).collect();
    matches!(segments.as_slice(), [one] if one.eq_ignore_ascii_case("init"))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use arca_proto::node::SandboxId;
    use tokio::sync::broadcast;

    use super::*;

    struct Routes(Vec<Route>);

    impl RouteSource for Routes {
        fn route(&self, id: &str) -> Option<Route> {
            self.0.iter().find(|r| r.sandbox_id.as_str() == id).cloned()
        }
        fn routes(&self) -> Vec<Route> {
            self.0.clone()
        }
        fn ended(&self) -> broadcast::Receiver<SandboxId> {
            broadcast::channel(1).1
        }
    }

    fn route(id: &str, token: Option<&str>) -> Route {
        Route {
            sandbox_id: SandboxId::parse(id).unwrap(),
            netns: PathBuf::from("/nonexistent"),
            envd_access_token: token.map(str::to_string),
            ingress: Default::default(),
            relay: None,
            address: None,
        }
    }

    fn req(host: &str, headers: &[(&str, &str)], uri: &str) -> Request<()> {
        let mut b = Request::builder().uri(uri).header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn target(id: &str, port: u16) -> Target {
        Target {
            sandbox_id: id.into(),
            port,
            route: None,
        }
    }

    #[test]
    fn shared_hosts_route_by_headers() {
        let none = Routes(vec![]);
        let h = [("E2b-Sandbox-Id", "abc1"), ("E2b-Sandbox-Port", "49983")];
        for host in [
            "localhost:3001",
            "127.0.0.1:3001",
            "[::1]:80",
            "sandbox.e2b.app",
            "::1",
        ] {
            assert_eq!(
                resolve(&req(host, &h, "/"), &none).unwrap(),
                target("abc1", 49983),
                "{host}"
            );
        }
        // A per-sandbox host wins over headers on other hosts.
        let r = resolve(&req("8080-xyz.e2b.test:8443", &h, "/"), &none).unwrap();
        assert_eq!(r, target("xyz", 8080));
        // Any other host falls back to the headers.
        let r = resolve(&req("proxy.lan:3001", &h, "/"), &none).unwrap();
        assert_eq!(r, target("abc1", 49983));
    }

    #[test]
    fn header_errors_are_bad_requests() {
        let none = Routes(vec![]);
        let cases: &[&[(&str, &str)]] = &[
            &[("E2b-Sandbox-Id", "abc")],
            &[("E2b-Sandbox-Port", "49983")],
            &[("E2b-Sandbox-Id", "ABC"), ("E2b-Sandbox-Port", "49983")],
            &[("E2b-Sandbox-Id", "a-b"), ("E2b-Sandbox-Port", "49983")],
            &[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "x")],
            &[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "70000")],
        ];
        for h in cases {
            let err = resolve(&req("127.0.0.1", h, "/"), &none).unwrap_err();
            assert_eq!(err.status(), http::StatusCode::BAD_REQUEST, "{h:?}");
        }
    }

    #[test]
    fn host_labels() {
        assert_eq!(parse_host_label("49983-abc"), Some(target("abc", 49983)));
        assert_eq!(
            parse_host_label("3000-abc-client1.x.y"),
            Some(target("abc", 3000))
        );
        for bad in [
            "",
            "abc.e2b.dev",
            "x-abc.d",
            "49983-.d",
            "49983-ABC.d",
            "70000-a.d",
            "sandbox.e2b.app",
        ] {
            assert_eq!(parse_host_label(bad), None, "{bad}");
        }
        assert_eq!(strip_port("49983-abc.e2b.test:8443"), "49983-abc.e2b.test");
        assert_eq!(strip_port("[::1]:1"), "::1");
    }

    #[test]
    fn signed_files_find_their_sandbox() {
        let routes = Routes(vec![
            route("aaa", Some("ta")),
            route("bbb", Some("tb")),
            route("ccc", None),
        ]);
        let sig = signature(
            "/home/user/a b.txt",
            "read",
            "user",
            "tb",
            Some("1700000000"),
        );
        let enc = sig.replace('+', "%2B").replace('/', "%2F");
        let uri = format!(
            "/files?path=%2Fhome%2Fuser%2Fa+b.txt&username=user&signature={enc}&signature_expiration=1700000000"
        );
        let t = resolve(&req("127.0.0.1:3001", &[], &uri), &routes).unwrap();
        assert_eq!(t.sandbox_id, "bbb");
        assert_eq!(t.port, ENVD_PORT);
        // The same signature does not authorize a write.
        let mut post = req("127.0.0.1:3001", &[], &uri);
        *post.method_mut() = Method::POST;
        assert!(matches!(
            resolve(&post, &routes),
            Err(ProxyError::NoSignatureMatch)
        ));
        // Unsigned with several sandboxes is ambiguous; with one it is not.
        let err = resolve(&req("localhost", &[], "/files?path=a"), &routes).unwrap_err();
        assert!(matches!(err, ProxyError::Ambiguous(3)));
        let one = Routes(vec![route("aaa", None)]);
        let t = resolve(&req("localhost", &[], "/files?path=a"), &one).unwrap();
        assert_eq!(t.sandbox_id, "aaa");
        // Other header-less requests are not guessed.
        assert!(matches!(
            resolve(&req("localhost", &[], "/health"), &one),
            Err(ProxyError::NoRouting)
        ));
    }

    #[test]
    fn init_is_orchestrator_only() {
        for p in ["/init", "/init/", "//init", "/%69nit", "/INIT"] {
            assert!(is_orchestrator_only(ENVD_PORT, p), "{p}");
        }
        assert!(!is_orchestrator_only(ENVD_PORT, "/files"));
        assert!(!is_orchestrator_only(ENVD_PORT, "/init/x"));
        assert!(!is_orchestrator_only(8080, "/init"));
    }
}
