//! Wire contracts of Arca.
//!
//! - [`process`] and [`filesystem`]: the envd protobuf messages, generated at
//!   build time from Arca's own `proto/*.proto` (wire-identical to E2B's envd,
//!   see `CONTRACT.md` section 3), with proto3-JSON serde implementations.
//! - [`node`]: the node agent's interface ([`node::NodeService`]) and the
//!   proxy's view of sandboxes ([`node::RouteSource`]).
//! - [`cluster`]: what nodes and proxies exchange with the api in cluster
//!   mode (registration, heartbeats, routes); [`rpc`]: the node RPC.
//! - [`files`]: signed `/files` URLs.
//! - [`network`]: egress and ingress settings, their checks, egress log entries.
//! - [`connect`]: the Connect protocol as the E2B SDKs speak it: codecs,
//!   content types, envelopes, end-of-stream messages and error codes.
//!
//! ```
//! use arca_proto::connect::{Codec, Code, ConnectError};
//! use arca_proto::process::ProcessEvent;
//!
//! let codec = Codec::from_stream_content_type("application/connect+json").unwrap();
//! let bytes = codec.encode(&ProcessEvent::default());
//! let back: ProcessEvent = codec.decode(&bytes).unwrap();
//! assert_eq!(back, ProcessEvent::default());
//! let err = ConnectError::new(Code::NotFound, "no such file");
//! assert_eq!(err.code().http_status(), 404);
//! ```
#![forbid(unsafe_code)]

pub mod build;
pub mod cluster;
pub mod connect;
pub mod files;
pub mod network;
pub mod node;
pub mod rpc;
mod timestamp;

/// `err` and its sources joined with `": "`, for logs and error bodies.
///
/// ```
/// let inner = std::io::Error::other("disk full");
/// let outer = std::io::Error::new(std::io::ErrorKind::Other, inner);
/// assert_eq!(arca_proto::error_chain(&outer), "disk full: disk full");
/// ```
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

/// Messages of the `process.Process` service (CONTRACT 3.3).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod process {
    include!(concat!(env!("OUT_DIR"), "/process.rs"));
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
}

/// Messages of the `filesystem.Filesystem` service (CONTRACT 3.4).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod filesystem {
    include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
}

pub use prost;
pub use timestamp::Timestamp;
