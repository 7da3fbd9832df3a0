//! One proxied request: resolve, check, forward, stream back, tunnel.
//!
//! A route with a relay (cluster mode: the front proxy) is handed to the
//! node's edge proxy as it came, apart from hop-by-hop headers: same Host,
//! `E2b-Sandbox-*` headers and traffic token, no Host mask, no traffic-token
//! check here. The edge runs this same code with the node's routes and
//! decides all of that itself; its answers, 502s and 403s included, pass
//! back untouched. A relayed exchange that breaks (the edge resets its
//! connections to a sandbox that ends) resets the client in turn.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arca_proto::node::{Route, RouteSource};
use http::header::{CONNECTION, EXPECT, HOST, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use subtle::ConstantTimeEq as _;
use tokio_util::sync::CancellationToken;

use crate::BoxError;
use crate::abort::{Abort, ClientConn, Sandboxes};
use crate::body::{GiveBack, ProxyBody, ResponseBody};
use crate::dial::DialError;
use crate::error::ProxyError;
use crate::pool::{ConnectError, Key, Pool, Sender};
use crate::route::{self, Target};

/// Hop-by-hop headers (RFC 9110 7.6.1 and the classic proxy ones): never
/// forwarded; upgrades put `Connection`/`Upgrade` back explicitly.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
];

/// Header with the traffic access token of a private sandbox (CONTRACT 2.6).
const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";
/// The port placeholder of `maskRequestHost`.
const PORT_PLACEHOLDER: &str = "${PORT}";

/// Last time (`log_allowed`) a failed connect was logged.
static CONNECT_WARNED: AtomicU64 = AtomicU64::new(0);
/// Last time (`log_allowed`) an unreachable edge was logged.
static RELAY_WARNED: AtomicU64 = AtomicU64::new(0);

/// What every request handler shares.
pub(crate) struct Shared {
    pub(crate) routes: Arc<dyn RouteSource>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) sandboxes: Sandboxes,
}

/// Serves one request from a client connection.
///
/// Errors are only returned to abort: hyper resets the h2 stream, or closes
/// the HTTP/1.1 connection that [`Abort::fire`] already set to reset.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    client: Arc<ClientConn>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, BoxError> {
    let target = match route::resolve(&req, &*shared.routes) {
        Ok(target) => target,
        Err(err) => return Ok(reply(err)),
    };
    if route::is_orchestrator_only(target.port, req.uri().path()) {
        return Ok(reply(ProxyError::OrchestratorOnly {
            sandbox_id: target.sandbox_id,
        }));
    }
    let mut route = target
        .route
        .clone()
        .or_else(|| shared.routes.route(&target.sandbox_id));
    // A sandbox without a route whose ingress settings the source knows
    // exists here, paused.
    let paused = match route {
        Some(_) => None,
        None => shared.routes.ingress(&target.sandbox_id),
    };
    // User ports of a private sandbox need its traffic token, checked
    // before anything can wake a paused one (ADR 0005 section 5).
    if target.port != route::ENVD_PORT {
        let expected = match &route {
            Some(r) => expected_traffic_token(r),
            None => paused
                .as_ref()
                .and_then(|i| i.traffic_access_token.as_deref()),
        };
        if !traffic_token_ok(expected, req.headers()) {
            return Ok(reply(ProxyError::TrafficTokenRequired {
                sandbox_id: target.sandbox_id,
            }));
        }
    }
    // A sandbox paused at its deadline with auto-resume wakes up for this
    // request, which waits the milliseconds that takes.
    // The SDKs' `/health` probe after a cut stream must learn the sandbox is
    // gone, not wake it (CONTRACT 1.6). An id the source does not know at
    // all is still asked for: a node answers no, a cluster front proxy's
    // source looks its route up (the edge then applies this rule itself).
    let health_probe = target.port == route::ENVD_PORT && req.uri().path() == "/health";
    if route.is_none()
        && !(health_probe && paused.is_some())
        && shared.routes.wake(&target.sandbox_id).await
    {
        route = shared.routes.route(&target.sandbox_id);
    }
    let Some(route) = route else {
        return Ok(reply(ProxyError::SandboxNotFound {
            sandbox_id: target.sandbox_id,
        }));
    };
    // Again against the route actually used (the one found after a wake).
    if target.port != route::ENVD_PORT
        && !traffic_token_ok(expected_traffic_token(&route), req.headers())
    {
        return Ok(reply(ProxyError::TrafficTokenRequired {
            sandbox_id: target.sandbox_id,
        }));
    }
    let (token, fresh) = shared.sandboxes.token(&target.sandbox_id);
    // A new token may have been made just after the sandbox's end was
    // handled (nothing would ever cancel it): check it still runs. Not for
    // a relayed route: its cached entry may just have expired, and the edge
    // knows better anyway (and resets what it cuts).
    if fresh && route.relay.is_none() && shared.routes.route(&target.sandbox_id).is_none() {
        shared.sandboxes.end(&target.sandbox_id);
        return Ok(reply(ProxyError::SandboxNotFound {
            sandbox_id: target.sandbox_id,
        }));
    }
    let abort = Abort {
        token: token.clone(),
        client,
        h2: req.version() == Version::HTTP_2,
    };
    tokio::select! {
        biased;
        () = token.cancelled() => Err(abort.fire()),
        res = forward(&shared, &target, &route, req, abort.clone()) => match res {
            Ok(resp) => Ok(resp),
            Err(Failure::Reply(err)) => {
                tracing::debug!(sandbox_id = %target.sandbox_id, port = target.port, err = ?err, "proxy error");
                Ok(reply(err))
            }
            Err(Failure::Reset(err)) => {
                tracing::debug!(sandbox_id = %target.sandbox_id, port = target.port, ?err, "relayed request broke off, resetting the client");
                Err(abort.fire())
            }
        },
    }
}

fn reply(err: ProxyError) -> Response<ProxyBody> {
    err.into_response()
}

/// How forwarding failed.
#[derive(Debug)]
enum Failure {
    /// Answer the client with this error.
    Reply(ProxyError),
    /// Cut the client's transport: a relayed exchange broke, which is how
    /// the edge passes on a sandbox's end.
    Reset(BoxError),
}

impl From<ProxyError> for Failure {
    fn from(err: ProxyError) -> Failure {
        Failure::Reply(err)
    }
}

/// The traffic token this proxy requires on the route's user ports: none
/// for a relayed route, whose edge checks the token itself.
fn expected_traffic_token(route: &Route) -> Option<&str> {
    match route.relay {
        Some(_) => None,
        None => route.ingress.traffic_access_token.as_deref(),
    }
}

/// Whether a request may reach a user port whose sandbox requires the
/// traffic token `expected` (none: public). Compared in constant time.
fn traffic_token_ok(expected: Option<&str>, headers: &HeaderMap) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    headers
        .get(TRAFFIC_TOKEN_HEADER)
        .is_some_and(|given| bool::from(given.as_bytes().ct_eq(expected.as_bytes())))
}

/// Forwards to the sandbox and wraps the answer.
async fn forward(
    shared: &Shared,
    target: &Target,
    route: &Route,
    mut req: Request<Incoming>,
    abort: Abort,
) -> Result<Response<ProxyBody>, Failure> {
    let version = req.version();
    let relayed = route.relay.is_some();
    let upgrade = upgrade_protocol(req.headers());
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let upstream_req = upstream_request(req, upgrade, target.port, route);

    let key = Key::new(route, target.port);
    let pooled = shared.pool.take(&key);
    let reused = pooled.is_some();
    let mut sender = match pooled {
        Some(sender) => sender,
        None => connect(shared, target, route, &abort).await?,
    };
    let mut resp = match sender.try_send_request(upstream_req).await {
        Ok(resp) => resp,
        Err(mut err) => match err.take_message() {
            // A pooled connection closed by the sandbox before the request
            // went out: one retry on a fresh connection is safe.
            Some(req) if reused => {
                sender = connect(shared, target, route, &abort).await?;
                sender
                    .send_request(req)
                    .await
                    .map_err(|e| upstream_failure(target, relayed, e.into()))?
            }
            _ => return Err(upstream_failure(target, relayed, err.into_error().into())),
        },
    };

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tunnel(
                client_upgrade,
                upstream_upgrade,
                abort,
                target.clone(),
                relayed,
            );
            let (mut parts, _) = resp.into_parts();
            parts.version = version;
            let body = Empty::new().map_err(|never| match never {}).boxed_unsync();
            return Ok(Response::from_parts(parts, body));
        }
    }

    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = version;
    let give_back = GiveBack {
        pool: Arc::clone(&shared.pool),
        key,
        sender,
    };
    let body = ResponseBody::new(body, abort, Some(give_back), relayed).boxed_unsync();
    Ok(Response::from_parts(parts, body))
}

async fn connect(
    shared: &Shared,
    target: &Target,
    route: &Route,
    abort: &Abort,
) -> Result<Sender, ProxyError> {
    let (sandbox_id, port) = (target.sandbox_id.clone(), target.port);
    shared
        .pool
        .connect(route, port, CancellationToken::clone(&abort.token))
        .await
        .map_err(|err| match err {
            ConnectError::Dial(DialError::OpenNetns { .. }) => {
                ProxyError::SandboxNotFound { sandbox_id }
            }
            // The node holding the sandbox is gone or cut off: for the
            // client the sandbox is.
            ConnectError::Dial(err @ DialError::Relay { .. }) => {
                if crate::log_allowed(&RELAY_WARNED) {
                    tracing::warn!(%sandbox_id, ?err, "cannot reach a node's edge proxy");
                }
                ProxyError::SandboxNotFound { sandbox_id }
            }
            ConnectError::Dial(DialError::Connect { .. }) => {
                ProxyError::PortNotOpen { sandbox_id, port }
            }
            other => {
                // Traffic from the internet triggers this: at most one line a second.
                if crate::log_allowed(&CONNECT_WARNED) {
                    tracing::warn!(%sandbox_id, port, err = ?other, "cannot connect to a sandbox");
                }
                ProxyError::Upstream {
                    sandbox_id,
                    port,
                    source: other.into(),
                }
            }
        })
}

/// A request that failed after its connection was made: a 502 from a
/// sandbox's port, a reset when relayed (the edge broke the exchange off,
/// as it does when the sandbox ends).
fn upstream_failure(target: &Target, relayed: bool, source: BoxError) -> Failure {
    if relayed {
        return Failure::Reset(source);
    }
    Failure::Reply(ProxyError::Upstream {
        sandbox_id: target.sandbox_id.clone(),
        port: target.port,
        source,
    })
}

/// The `Upgrade` value of an HTTP/1.1 upgrade request (websocket or any
/// other protocol): `Connection` lists `upgrade` and `Upgrade` is present.
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        headers.get(UPGRADE).cloned()
    } else {
        None
    }
}

/// The request as sent upstream: HTTP/1.1, origin-form URI, `Host` kept
/// (or made from the h2 authority; on user ports replaced by the sandbox's
/// `maskRequestHost`), hop-by-hop headers and the traffic token dropped.
/// Everything else, `E2b-Sandbox-*` included, passes unchanged; envd
/// ignores those. A relayed request keeps its Host and traffic token: the
/// edge applies the mask and checks and drops the token.
fn upstream_request(
    req: Request<Incoming>,
    upgrade: Option<HeaderValue>,
    port: u16,
    route: &Route,
) -> Request<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let relayed = route.relay.is_some();
    let masked = (!relayed && port != route::ENVD_PORT)
        .then_some(route.ingress.mask_request_host.as_deref())
        .flatten()
        .and_then(|mask| masked_host(mask, port));
    let host = masked.or_else(|| {
        parts.headers.get(HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        })
    });
    strip_hop_by_hop(&mut parts.headers);
    // The token is for the edge; the sandbox never sees it.
    if !relayed {
        parts.headers.remove(TRAFFIC_TOKEN_HEADER);
    }
    // hyper answers `100 Continue` to the client itself when the body is
    // first read; the sandbox gets the body without waiting.
    parts.headers.remove(EXPECT);
    if let Some(host) = host {
        parts.headers.insert(HOST, host);
    }
    if let Some(protocol) = upgrade {
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(UPGRADE, protocol);
    }
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    parts.version = Version::HTTP_11;
    Request::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
}

/// `maskRequestHost` with `${PORT}` replaced by `port`, if that is a valid
/// header value (the api checks masks, so it is).
fn masked_host(mask: &str, port: u16) -> Option<HeaderValue> {
    HeaderValue::from_str(&mask.replace(PORT_PLACEHOLDER, &port.to_string())).ok()
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Copies raw bytes both ways once both sides switched protocols, until
/// either closes or the sandbox ends. A relayed tunnel that breaks (the
/// edge resets tunnels of a sandbox that ends) resets the client.
fn tunnel(client: OnUpgrade, upstream: OnUpgrade, abort: Abort, target: Target, relayed: bool) {
    tokio::spawn(async move {
        let run = async {
            let (client, upstream) = tokio::try_join!(client, upstream)?;
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            if copied.is_err() && relayed {
                // Before `client` is dropped: its close becomes the reset.
                let _ = abort.fire();
            }
            copied?;
            Ok::<(), BoxError>(())
        };
        tokio::select! {
            biased;
            () = abort.token.cancelled() => {
                // Dropping `run` closes both sides; the client's with RST.
                let _ = abort.fire();
            }
            res = run => {
                if let Err(err) = res {
                    tracing::debug!(sandbox_id = %target.sandbox_id, port = target.port, ?err, "tunnel ended");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("e2b-sandbox-id", HeaderValue::from_static("abc"));
        h.insert("content-length", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["e2b-sandbox-id", "content-length"]);
    }

    #[test]
    fn traffic_tokens_must_match_exactly() {
        let mut h = HeaderMap::new();
        assert!(traffic_token_ok(None, &h));
        assert!(!traffic_token_ok(Some("tok"), &h));
        h.insert(TRAFFIC_TOKEN_HEADER, HeaderValue::from_static("tok2"));
        assert!(!traffic_token_ok(Some("tok"), &h));
        h.insert(TRAFFIC_TOKEN_HEADER, HeaderValue::from_static("TOK"));
        assert!(!traffic_token_ok(Some("tok"), &h));
        h.insert(TRAFFIC_TOKEN_HEADER, HeaderValue::from_static("tok"));
        assert!(traffic_token_ok(Some("tok"), &h));
        assert!(traffic_token_ok(None, &h));
    }

    #[test]
    fn masks_replace_every_port_placeholder() {
        assert_eq!(
            masked_host("${PORT}-a.test:${PORT}", 8080).unwrap(),
            "8080-a.test:8080"
        );
        assert_eq!(masked_host("fixed.test", 1).unwrap(), "fixed.test");
        assert!(masked_host("bad\nhost", 1).is_none());
    }

    #[test]
    fn upgrades_need_connection_upgrade() {
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_protocol(&h), None);
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(upgrade_protocol(&h).unwrap(), "websocket");
    }
}
