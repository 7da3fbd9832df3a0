//! The node RPC of cluster mode: how the api (and peer nodes) call a node's
//! [`NodeService`](crate::node::NodeService) and
//! [`BuildService`](crate::build::BuildService) over HTTP.
//!
//! Only the wire lives here (paths, bodies, status mapping, line framing);
//! the node serves it and the api's client speaks it.
//!
//! **Calls.** Every call is `POST <rpc_url><path>` with a JSON body (the
//! method's arguments, see each path constant) except [`EVENTS`], a `GET`.
//! Every route, the template transfer under [`TRANSFER`] included, needs
//! `Authorization: Bearer <cluster token>` ([`crate::cluster::bearer`]);
//! without it the node answers 401 with an [`RpcRejection`]. Request bodies
//! are at most [`MAX_REQUEST_BYTES`].
//!
//! **Answers.** Success is `200` with the method's result as JSON (`null`
//! for methods that return nothing). A failed call answers
//! [`status_of`] its [`NodeError`] with the error itself as the JSON body;
//! [`error_from_answer`] turns any non-2xx answer back into a `NodeError`.
//! Answers that are not about the call (bad token, unknown route, body too
//! large) carry an [`RpcRejection`] and become [`NodeError::Internal`] on
//! the client: they mean the two sides are misconfigured or of different
//! versions, not that the sandbox is in some state.
//!
//! **Streams** are NDJSON ([`NDJSON`]): one JSON document per line, `\n`
//! terminated, written by [`encode_line`] and split by [`LineBuffer`]. An
//! empty line is a keep-alive, sent every [`KEEPALIVE_INTERVAL`] so that a
//! reader notices a dead peer after [`KEEPALIVE_TIMEOUT`] of silence (and
//! the node notices a reader that went away when the write fails).
//! - [`EVENTS`]: one [`SandboxEvent`] per line, from the moment the answer's
//!   headers are sent (the node subscribes before it answers, so a client
//!   that lists sandboxes after seeing the `200` misses nothing). The node
//!   ends the stream when its reader fell behind and events were dropped:
//!   the reader reconnects and, knowing there was a gap, reconciles with
//!   [`LIST`].
//! - [`BUILD`]: [`BuildLine::Log`] lines as the build goes, then exactly one
//!   [`BuildLine::Done`] or [`BuildLine::Failed`]. The build runs only as
//!   long as someone reads: a reader that goes away cancels it, as dropping
//!   the [`BuildService::build`](crate::build::BuildService::build) future
//!   does in one process.
//!
//! ```
//! use arca_proto::node::{NodeError, SandboxId};
//! use arca_proto::rpc;
//!
//! let err = NodeError::SandboxNotFound(SandboxId::parse("abc").unwrap());
//! let status = rpc::status_of(&err);
//! assert_eq!(status, 404);
//! let body = serde_json::to_vec(&err).unwrap();
//! assert_eq!(rpc::error_from_answer("http://10.0.0.5:3100", status, &body), err);
//! ```

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::build::{BuildFailure, BuildLog, BuildResult};
use crate::network::NetworkSpec;
use crate::node::{NodeError, PauseMode, SandboxEvent, SandboxId, SandboxSpec};

/// Prefix of every node RPC path.
pub const PREFIX: &str = "/rpc/v1";

/// Response header naming the node that answered (`arca node` sets it
/// through `arca_node::rpc::identify`), so a client can tell when another
/// node now answers at an address.
pub const NODE_ID_HEADER: &str = "arca-node-id";

/// [`NodeService::create`](crate::node::NodeService::create): body a
/// [`SandboxSpec`], answer a `SandboxStatus`.
pub const CREATE: &str = "/rpc/v1/create";
/// `kill`: body a [`SandboxRef`], answer `null`.
pub const KILL: &str = "/rpc/v1/kill";
/// `set_end_at`: body a [`SetEndAtRequest`], answer a `SandboxStatus`.
pub const SET_END_AT: &str = "/rpc/v1/set_end_at";
/// `get`: body a [`SandboxRef`], answer a `SandboxStatus`.
pub const GET: &str = "/rpc/v1/get";
/// `list`: no body (any is ignored), answer a list of `SandboxStatus`.
pub const LIST: &str = "/rpc/v1/list";
/// `metrics`: body a [`SandboxRef`], answer a list of `MetricSample`.
pub const METRICS: &str = "/rpc/v1/metrics";
/// `logs`: body a [`SandboxRef`], answer a list of `LogEntry`.
pub const LOGS: &str = "/rpc/v1/logs";
/// `events`: `GET`, answer an NDJSON stream of [`SandboxEvent`]s (see the
/// module docs).
pub const EVENTS: &str = "/rpc/v1/events";
/// `pause`: body a [`PauseRequest`], answer `null`.
pub const PAUSE: &str = "/rpc/v1/pause";
/// `resume`: body a [`ResumeRequest`], answer a `SandboxStatus`.
pub const RESUME: &str = "/rpc/v1/resume";
/// `fork`: body a [`ForkRequest`], answer one `{"Ok": SandboxStatus}` or
/// `{"Err": NodeError}` per spec, in order.
pub const FORK: &str = "/rpc/v1/fork";
/// `snapshot`: body a [`SnapshotRequest`], answer `null`.
pub const SNAPSHOT: &str = "/rpc/v1/snapshot";
/// `update_network`: body an [`UpdateNetworkRequest`], answer `null`.
pub const UPDATE_NETWORK: &str = "/rpc/v1/update_network";
/// `network_logs`: body a [`SandboxRef`], answer a list of `EgressLogEntry`.
pub const NETWORK_LOGS: &str = "/rpc/v1/network_logs";
/// [`BuildService::build`](crate::build::BuildService::build): body a
/// `BuildSpec`, answer an NDJSON stream of [`BuildLine`]s.
pub const BUILD: &str = "/rpc/v1/build";
/// `delete_build`: body a [`DeleteBuildRequest`], answer `null`.
pub const DELETE_BUILD: &str = "/rpc/v1/delete_build";
/// Template transfer between nodes (ADR 0006): its routes live under this
/// prefix and need the same token.
pub const TRANSFER: &str = "/rpc/v1/transfer";

/// Content type of unary bodies and answers.
pub const JSON: &str = "application/json";
/// Content type of the two streams.
pub const NDJSON: &str = "application/x-ndjson";

/// Largest request body a node accepts, bytes. Specs are a few KiB; this
/// leaves room for a fork of many sandboxes with long rule lists.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Longest line a stream reader accepts, bytes (a build log line or an
/// event is far shorter); a longer one means the stream is broken.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// How often a stream writer sends a keep-alive line when it has nothing
/// else to say.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a stream reader waits for any line before it takes the
/// connection for dead: three missed keep-alives.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Body of the calls that name one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRef {
    /// The sandbox.
    pub sandbox_id: SandboxId,
}

/// Body of [`SET_END_AT`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetEndAtRequest {
    /// The sandbox.
    pub sandbox_id: SandboxId,
    /// Its new deadline.
    pub end_at: DateTime<Utc>,
}

/// Body of [`PAUSE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseRequest {
    /// The sandbox.
    pub sandbox_id: SandboxId,
    /// What the pause keeps.
    pub mode: PauseMode,
}

/// Body of [`RESUME`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRequest {
    /// The sandbox.
    pub sandbox_id: SandboxId,
    /// Its deadline once running.
    pub end_at: DateTime<Utc>,
}

/// Body of [`FORK`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkRequest {
    /// The running sandbox copied.
    pub source: SandboxId,
    /// One new sandbox per spec.
    pub specs: Vec<SandboxSpec>,
}

/// Body of [`SNAPSHOT`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// The sandbox copied.
    pub source: SandboxId,
    /// Template the new build belongs to.
    pub template_id: String,
    /// The new build.
    pub build_id: String,
}

/// Body of [`UPDATE_NETWORK`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateNetworkRequest {
    /// The sandbox.
    pub sandbox_id: SandboxId,
    /// Its new egress rules.
    pub network: NetworkSpec,
    /// `false` denies all egress.
    pub allow_internet_access: bool,
}

/// Body of [`DELETE_BUILD`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteBuildRequest {
    /// Template.
    pub template_id: String,
    /// Its build.
    pub build_id: String,
}

/// One line of the [`BUILD`] stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildLine {
    /// A log line, sent as the build says it.
    Log(BuildLog),
    /// The build succeeded; the last line.
    Done(BuildResult),
    /// The build failed; the last line.
    Failed(BuildFailure),
}

/// Body of an answer that is not the result of a call: a missing or wrong
/// token (401), an unknown route (404), a body too large (413).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcRejection {
    /// What was wrong, for operators.
    pub error: String,
}

/// The HTTP status a node answers a failed call with.
pub fn status_of(err: &NodeError) -> u16 {
    match err {
        NodeError::SandboxNotFound(_) | NodeError::TemplateNotFound(_) => 404,
        NodeError::InvalidInput(_) => 400,
        NodeError::Conflict(_) => 409,
        NodeError::Capacity(_) | NodeError::Unavailable(_) => 503,
        NodeError::Internal(_) => 500,
    }
}

/// The error a non-2xx answer of the node at `node` (its RPC URL, named in
/// the message of errors that are not the node's own) stands for: the
/// [`NodeError`] in the body when there is one and it agrees with the
/// status, else [`NodeError::Internal`] with the status and what the body
/// said.
pub fn error_from_answer(node: &str, status: u16, body: &[u8]) -> NodeError {
    if let Ok(err) = serde_json::from_slice::<NodeError>(body) {
        if status_of(&err) == status {
            return err;
        }
    }
    let said = match serde_json::from_slice::<RpcRejection>(body) {
        Ok(r) => r.error,
        Err(_) => snippet(body),
    };
    let reason = reason_phrase(status);
    if said.is_empty() {
        NodeError::Internal(format!("node {node} answered {status}{reason}"))
    } else {
        NodeError::Internal(format!("node {node} answered {status}{reason}: {said}"))
    }
}

/// ` Unauthorized` and the like, for the statuses a node or something in
/// front of it is likely to answer.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => " Bad Request",
        401 => " Unauthorized",
        403 => " Forbidden",
        404 => " Not Found",
        405 => " Method Not Allowed",
        409 => " Conflict",
        413 => " Payload Too Large",
        500 => " Internal Server Error",
        502 => " Bad Gateway",
        503 => " Service Unavailable",
        504 => " Gateway Timeout",
        _ => "",
    }
}

/// The start of a body that is not ours, as one line of text.
fn snippet(body: &[u8]) -> String {
    const MAX_CHARS: usize = 200;
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .chars()
        .take(MAX_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(MAX_CHARS).is_some() {
        out.push_str("...");
    }
    out.trim().to_string()
}

/// `value` as one NDJSON line: compact JSON and a `\n`.
pub fn encode_line<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own wire types into memory cannot fail: they have
    // string keys and no custom serializers that error.
    let mut line = serde_json::to_vec(value).expect("wire types serialize to JSON");
    line.push(b'\n');
    line
}

/// The keep-alive line: empty.
pub const KEEPALIVE_LINE: &[u8] = b"\n";

/// One line of the [`EVENTS`] stream: `None` for a keep-alive.
pub fn decode_event_line(line: &[u8]) -> Result<Option<SandboxEvent>, serde_json::Error> {
    decode_line(line)
}

/// One line of the [`BUILD`] stream: `None` for a keep-alive.
pub fn decode_build_line(line: &[u8]) -> Result<Option<BuildLine>, serde_json::Error> {
    decode_line(line)
}

fn decode_line<T: serde::de::DeserializeOwned>(
    line: &[u8],
) -> Result<Option<T>, serde_json::Error> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(line).map(Some)
}

/// A stream reader's line longer than [`MAX_LINE_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stream line longer than {max} bytes")]
pub struct LineTooLong {
    /// The limit.
    pub max: usize,
}

/// Splits a byte stream that arrives in arbitrary chunks into lines.
///
/// ```
/// use arca_proto::rpc::LineBuffer;
///
/// let mut lines = LineBuffer::new(1024);
/// lines.push(b"{\"a\":1}\n{\"b\"");
/// assert_eq!(lines.next_line().unwrap(), Some(b"{\"a\":1}".to_vec()));
/// assert_eq!(lines.next_line().unwrap(), None);
/// lines.push(b":2}\n");
/// assert_eq!(lines.next_line().unwrap(), Some(b"{\"b\":2}".to_vec()));
/// ```
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// Where the first line not yet returned starts in `buf`.
    start: usize,
    /// Bytes of `buf` already known to hold no `\n`.
    scanned: usize,
    max: usize,
}

impl LineBuffer {
    /// An empty buffer that refuses lines longer than `max` bytes.
    pub fn new(max: usize) -> LineBuffer {
        LineBuffer {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            max,
        }
    }

    /// Appends what arrived.
    pub fn push(&mut self, chunk: &[u8]) {
        // Lines already returned are dropped here, once per chunk rather
        // than once per line.
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete line without its `\n`, `None` until one is
    /// complete. An error once a line is longer than the limit, complete
    /// or not (the buffer is then of no further use).
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, LineTooLong> {
        let from = self.scanned.max(self.start);
        match self.buf[from..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let end = from + i;
                if end - self.start > self.max {
                    return Err(LineTooLong { max: self.max });
                }
                let line = self.buf[self.start..end].to_vec();
                self.start = end + 1;
                self.scanned = self.start;
                Ok(Some(line))
            }
            None => {
                self.scanned = self.buf.len();
                if self.pending() > self.max {
                    return Err(LineTooLong { max: self.max });
                }
                Ok(None)
            }
        }
    }

    /// Bytes of an incomplete last line (a stream that ends with some has
    /// been cut).
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;
    use crate::build::BuildLogLevel;
    use crate::node::EndReason;

    fn id(s: &str) -> SandboxId {
        SandboxId::parse(s).unwrap()
    }

    fn every_error() -> Vec<NodeError> {
        vec![
            NodeError::SandboxNotFound(id("abc")),
            NodeError::TemplateNotFound("tpl".into()),
            NodeError::Capacity("full".into()),
            NodeError::InvalidInput("bad".into()),
            NodeError::Conflict("paused".into()),
            NodeError::Internal("disk".into()),
            NodeError::Unavailable("gone".into()),
        ]
    }

    #[test]
    fn each_error_has_its_status() {
        let statuses: Vec<u16> = every_error().iter().map(status_of).collect();
        assert_eq!(statuses, [404, 404, 503, 400, 409, 500, 503]);
    }

    #[test]
    fn each_error_comes_back_from_its_answer() {
        for err in every_error() {
            let body = serde_json::to_vec(&err).unwrap();
            assert_eq!(error_from_answer("http://n", status_of(&err), &body), err);
        }
    }

    #[test]
    fn an_error_under_the_wrong_status_is_not_believed() {
        let err = NodeError::Conflict("paused".into());
        let body = serde_json::to_vec(&err).unwrap();
        let NodeError::Internal(msg) = error_from_answer("http://n:1", 502, &body) else {
            panic!("a 502 with a Conflict body must not read as Conflict");
        };
        assert!(
            msg.starts_with("node http://n:1 answered 502 Bad Gateway"),
            "{msg}"
        );
    }

    #[test]
    fn rejections_and_foreign_bodies_become_internal_errors_naming_the_node() {
        let body = serde_json::to_vec(&RpcRejection {
            error: "missing or wrong cluster token".into(),
        })
        .unwrap();
        assert_eq!(
            error_from_answer("http://10.0.0.5:3100", 401, &body),
            NodeError::Internal(
                "node http://10.0.0.5:3100 answered 401 Unauthorized: \
                 missing or wrong cluster token"
                    .into()
            )
        );
        assert_eq!(
            error_from_answer("http://n", 502, b"<html>\r\nbad gateway</html>"),
            NodeError::Internal(
                "node http://n answered 502 Bad Gateway: <html>  bad gateway</html>".into()
            )
        );
        assert_eq!(
            error_from_answer("http://n", 599, b""),
            NodeError::Internal("node http://n answered 599".into())
        );
        let long = "x".repeat(500);
        let NodeError::Internal(msg) = error_from_answer("http://n", 500, long.as_bytes()) else {
            panic!("expected Internal");
        };
        assert!(msg.ends_with("..."), "{msg}");
        assert!(msg.len() < 300, "{msg}");
    }

    #[test]
    fn events_and_keepalives_frame_as_lines() {
        let events = [
            SandboxEvent::Ended {
                sandbox_id: id("a1"),
                reason: EndReason::Expired,
            },
            SandboxEvent::Paused {
                sandbox_id: id("b2"),
            },
            SandboxEvent::Resumed {
                sandbox_id: id("c3"),
                end_at: Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap(),
            },
        ];
        let mut wire = Vec::new();
        for e in &events {
            let line = encode_line(e);
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(line.last(), Some(&b'\n'));
            wire.extend_from_slice(&line);
            wire.extend_from_slice(KEEPALIVE_LINE);
        }
        // Delivered in awkward chunks: the reader must not care.
        let mut buf = LineBuffer::new(MAX_LINE_BYTES);
        let mut got = Vec::new();
        let mut keepalives = 0;
        for chunk in wire.chunks(7) {
            buf.push(chunk);
            while let Some(line) = buf.next_line().unwrap() {
                match decode_event_line(&line).unwrap() {
                    Some(e) => got.push(e),
                    None => keepalives += 1,
                }
            }
        }
        assert_eq!(got, events);
        assert_eq!(keepalives, 3);
        assert_eq!(buf.pending(), 0);
    }

    #[test]
    fn a_build_stream_is_logs_then_one_result() {
        let log = BuildLog {
            timestamp: Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap(),
            level: BuildLogLevel::Info,
            step: Some("1".into()),
            message: "RUN echo \"hi\"\nwith a newline inside".into(),
        };
        let lines = [
            BuildLine::Log(log.clone()),
            BuildLine::Failed(BuildFailure {
                message: "step 1 failed".into(),
                step: Some("1".into()),
            }),
            BuildLine::Done(BuildResult {
                envd_version: "0.6.13".into(),
                rootfs_size_mb: 12,
                cached_steps: 1,
                built_steps: 2,
            }),
        ];
        let mut buf = LineBuffer::new(MAX_LINE_BYTES);
        for l in &lines {
            buf.push(&encode_line(l));
        }
        // The newline in the message is escaped, so it stays one line.
        let mut back = Vec::new();
        while let Some(line) = buf.next_line().unwrap() {
            back.push(decode_build_line(&line).unwrap().unwrap());
        }
        assert_eq!(back, lines);
        let first = String::from_utf8(encode_line(&lines[0])).unwrap();
        assert!(first.starts_with("{\"log\":"), "{first}");
        assert_eq!(decode_build_line(b"").unwrap(), None);
        assert!(decode_build_line(b"{\"nope\":1}").is_err());
    }

    #[test]
    fn an_overlong_line_is_refused_complete_or_not() {
        let mut buf = LineBuffer::new(4);
        buf.push(b"abcd\nabcdef\n");
        assert_eq!(buf.next_line().unwrap(), Some(b"abcd".to_vec()));
        assert_eq!(buf.next_line(), Err(LineTooLong { max: 4 }));
        let mut buf = LineBuffer::new(4);
        buf.push(b"abc");
        assert_eq!(buf.next_line().unwrap(), None);
        assert_eq!(buf.pending(), 3);
        buf.push(b"de");
        assert_eq!(buf.next_line(), Err(LineTooLong { max: 4 }));
    }

    #[test]
    fn request_bodies_round_trip() {
        let at = Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap();
        let body = serde_json::to_value(SetEndAtRequest {
            sandbox_id: id("abc"),
            end_at: at,
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"sandbox_id": "abc", "end_at": "2030-01-02T03:04:05Z"})
        );
        let pause: PauseRequest =
            serde_json::from_str(r#"{"sandbox_id":"abc","mode":"filesystem"}"#).unwrap();
        assert_eq!(pause.mode, PauseMode::Filesystem);
        // An invalid id is refused while parsing, before any handler runs.
        assert!(serde_json::from_str::<SandboxRef>(r#"{"sandbox_id":"../x"}"#).is_err());
        let fork: Vec<Result<u32, NodeError>> =
            serde_json::from_str(r#"[{"Ok":1},{"Err":{"Capacity":"full"}}]"#).unwrap();
        assert_eq!(fork, [Ok(1), Err(NodeError::Capacity("full".into()))]);
    }
}
