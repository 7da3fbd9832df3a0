//! The Connect protocol (v1) as used between the E2B SDKs and envd.
//!
//! Unary calls carry one unframed message (`application/json` or
//! `application/proto`); streaming calls carry envelopes
//! (`application/connect+json` / `application/connect+proto`): one flag byte,
//! a 4-byte big-endian length and the payload. The last envelope of a
//! response stream has [`FLAG_END_STREAM`] set and a JSON payload that is `{}`
//! on success or `{"error": {"code", "message"}}` on failure, whatever the
//! codec. See `docs/adr/0001-connect-layer.md` for why this is hand-written.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Serialize, de::DeserializeOwned};

/// Envelope flag: the payload is compressed (never produced by Arca; refused).
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: this envelope ends the stream.
pub const FLAG_END_STREAM: u8 = 0x02;
/// Largest message accepted in one envelope or unary body (64 MiB).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A message that can travel over Connect in either codec.
pub trait Message: prost::Message + Default + Serialize + DeserializeOwned {}
impl<T: prost::Message + Default + Serialize + DeserializeOwned> Message for T {}

/// Connect error codes with their standard HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The operation was cancelled (499).
    Canceled,
    /// Unknown error (500).
    Unknown,
    /// Bad request data (400).
    InvalidArgument,
    /// The deadline passed (504).
    DeadlineExceeded,
    /// The thing asked for does not exist (404).
    NotFound,
    /// The thing to create exists already (409).
    AlreadyExists,
    /// Not allowed (403).
    PermissionDenied,
    /// Out of some resource (429).
    ResourceExhausted,
    /// The system is not in the state the call needs (400).
    FailedPrecondition,
    /// Aborted, usually by a concurrency conflict (409).
    Aborted,
    /// Out of the valid range (400).
    OutOfRange,
    /// Not implemented (501).
    Unimplemented,
    /// Internal error (500).
    Internal,
    /// Unavailable (503).
    Unavailable,
    /// Data loss (500).
    DataLoss,
    /// Missing or bad credentials (401).
    Unauthenticated,
}

impl Code {
    const ALL: [Code; 16] = [
        Code::Canceled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The code's wire name, such as `not_found`.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// HTTP status of a unary error with this code.
    pub fn http_status(self) -> u16 {
        match self {
            Code::Canceled => 499,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        }
    }

    /// The code a client infers from a non-Connect HTTP error status.
    pub fn from_http_status(status: u16) -> Code {
        match status {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::AlreadyExists,
            413 | 429 => Code::ResourceExhausted,
            499 => Code::Canceled,
            501 | 505 => Code::Unimplemented,
            502 | 503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Unknown,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as it travels over Connect: a code and a message for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ConnectError {
    code: Code,
    message: String,
}

impl ConnectError {
    /// Makes an error.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ConnectError {
            code,
            message: message.into(),
        }
    }

    /// The error code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Body of a unary error response (`Content-Type: application/json`).
    pub fn unary_body(&self) -> Bytes {
        let body = serde_json::json!({
            "code": self.code.as_str(),
            "message": self.message,
            "details": [],
        });
        Bytes::from(body.to_string())
    }

    /// Parses an end-of-stream payload: `Ok(())` for success, the error otherwise.
    pub fn from_end_stream(payload: &[u8]) -> Result<(), ConnectError> {
        let value: serde_json::Value = serde_json::from_slice(payload).map_err(|e| {
            ConnectError::new(Code::Internal, format!("bad end-of-stream message: {e}"))
        })?;
        match value.get("error") {
            None | Some(serde_json::Value::Null) => Ok(()),
            Some(err) => {
                let code = err
                    .get("code")
                    .and_then(|c| c.as_str())
                    .and_then(Code::parse)
                    .unwrap_or(Code::Unknown);
                let message = err.get("message").and_then(|m| m.as_str()).unwrap_or("");
                Err(ConnectError::new(code, message))
            }
        }
    }

    /// Parses a unary error body, falling back to the HTTP status for
    /// non-Connect bodies (an integer `code`, or no JSON at all).
    pub fn from_unary_body(status: u16, body: &[u8]) -> ConnectError {
        let value: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let message = value
            .as_ref()
            .and_then(|v| v.get("message"))
            .and_then(|m| m.as_str())
            .map_or_else(|| String::from_utf8_lossy(body).into_owned(), str::to_owned);
        let code = value
            .as_ref()
            .and_then(|v| v.get("code"))
            .and_then(|c| c.as_str())
            .and_then(Code::parse)
            .unwrap_or_else(|| Code::from_http_status(status));
        ConnectError::new(code, message)
    }
}

/// End-of-stream payload: `{}` or `{"error": {...}}`.
pub fn end_stream_payload(error: Option<&ConnectError>) -> Bytes {
    match error {
        None => Bytes::from_static(b"{}"),
        Some(e) => Bytes::from(
            serde_json::json!({"error": {"code": e.code.as_str(), "message": e.message}})
                .to_string(),
        ),
    }
}

/// The message encoding of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// proto3 JSON (what the official SDKs use).
    Json,
    /// binary protobuf.
    Proto,
}

fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

impl Codec {
    /// Codec of a unary request (`application/json`, `application/proto`;
    /// parameters such as `charset` are tolerated).
    pub fn from_unary_content_type(content_type: &str) -> Option<Codec> {
        match media_type(content_type).as_str() {
            "application/json" => Some(Codec::Json),
            "application/proto" => Some(Codec::Proto),
            _ => None,
        }
    }

    /// Codec of a streaming request (`application/connect+json`,
    /// `application/connect+proto`).
    pub fn from_stream_content_type(content_type: &str) -> Option<Codec> {
        match media_type(content_type).as_str() {
            "application/connect+json" => Some(Codec::Json),
            "application/connect+proto" => Some(Codec::Proto),
            _ => None,
        }
    }

    /// Content type of a unary response.
    pub fn unary_content_type(self) -> &'static str {
        match self {
            Codec::Json => "application/json",
            Codec::Proto => "application/proto",
        }
    }

    /// Content type of a streaming response; exactly this string, with no
    /// parameters (the Python SDK refuses any).
    pub fn stream_content_type(self) -> &'static str {
        match self {
            Codec::Json => "application/connect+json",
            Codec::Proto => "application/connect+proto",
        }
    }

    /// Encodes a message.
    pub fn encode<M: Message>(self, msg: &M) -> Bytes {
        match self {
            // Serializing generated messages cannot fail: every map key is a
            // string and every value a plain type.
            Codec::Json => Bytes::from(serde_json::to_vec(msg).unwrap_or_default()),
            Codec::Proto => Bytes::from(msg.encode_to_vec()),
        }
    }

    /// Decodes a message; malformed input is `invalid_argument`.
    pub fn decode<M: Message>(self, bytes: &[u8]) -> Result<M, ConnectError> {
        match self {
            Codec::Json if bytes.iter().all(u8::is_ascii_whitespace) => Ok(M::default()),
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| {
                ConnectError::new(
                    Code::InvalidArgument,
                    format!("malformed JSON message: {e}"),
                )
            }),
            Codec::Proto => M::decode(bytes).map_err(|e| {
                ConnectError::new(
                    Code::InvalidArgument,
                    format!("malformed protobuf message: {e}"),
                )
            }),
        }
    }
}

/// Frames one envelope.
pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.put_u8(flags);
    // Payloads are bounded by MAX_MESSAGE_BYTES, far below u32::MAX.
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
    out.freeze()
}

/// One decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Flag byte.
    pub flags: u8,
    /// Payload.
    pub payload: Bytes,
}

impl Envelope {
    /// Whether this envelope ends the stream.
    pub fn is_end_stream(&self) -> bool {
        self.flags & FLAG_END_STREAM != 0
    }
}

/// Incremental envelope decoder for bodies that arrive in arbitrary chunks.
#[derive(Debug, Default)]
pub struct EnvelopeDecoder {
    buf: BytesMut,
}

impl EnvelopeDecoder {
    /// Makes an empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Takes the next complete envelope, if one has arrived.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, ConnectError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Err(ConnectError::new(
                Code::ResourceExhausted,
                format!("message of {len} bytes is larger than the limit of {MAX_MESSAGE_BYTES}"),
            ));
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(ConnectError::new(
                Code::Unimplemented,
                "compressed messages are not supported; send them uncompressed",
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Envelope { flags, payload }))
    }

    /// Whether bytes of an incomplete envelope are left over.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }
}

/// Client-side: splits a whole streaming response body into its messages
/// and the stream's final status.
pub fn decode_stream<M: Message>(codec: Codec, body: &[u8]) -> (Vec<M>, Result<(), ConnectError>) {
    let mut decoder = EnvelopeDecoder::new();
    decoder.push(body);
    let mut messages = Vec::new();
    loop {
        match decoder.next_envelope() {
            Ok(Some(env)) if env.is_end_stream() => {
                return (messages, ConnectError::from_end_stream(&env.payload));
            }
            Ok(Some(env)) => match codec.decode(&env.payload) {
                Ok(m) => messages.push(m),
                Err(e) => return (messages, Err(e)),
            },
            Ok(None) => {
                return (
                    messages,
                    Err(ConnectError::new(
                        Code::Internal,
                        "stream ended without an end-of-stream message",
                    )),
                );
            }
            Err(e) => return (messages, Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filesystem::{EntryInfo, FileType};
    use crate::process::{
        ProcessConfig, ProcessEvent, StartRequest, process_event, process_event::EndEvent,
    };

    #[test]
    fn codes_round_trip_and_map_to_statuses() {
        for c in Code::ALL {
            assert_eq!(Code::parse(c.as_str()), Some(c));
        }
        assert_eq!(Code::NotFound.http_status(), 404);
        assert_eq!(Code::Canceled.http_status(), 499);
        assert_eq!(Code::from_http_status(502), Code::Unavailable);
        assert_eq!(Code::from_http_status(413), Code::ResourceExhausted);
    }

    #[test]
    fn content_types_are_strict_for_streams_and_lenient_for_parameters() {
        assert_eq!(
            Codec::from_unary_content_type("application/json; charset=utf-8"),
            Some(Codec::Json)
        );
        assert_eq!(
            Codec::from_stream_content_type("application/connect+proto"),
            Some(Codec::Proto)
        );
        assert_eq!(Codec::from_stream_content_type("application/json"), None);
        assert_eq!(
            Codec::Json.stream_content_type(),
            "application/connect+json"
        );
    }

    #[test]
    fn json_uses_camel_case_names_and_omits_defaults() {
        let ev = ProcessEvent {
            event: Some(process_event::Event::End(EndEvent {
                exit_code: 0,
                exited: true,
                status: "exit status 0".into(),
                error: None,
            })),
        };
        let json = String::from_utf8(Codec::Json.encode(&ev).to_vec()).unwrap();
        assert_eq!(json, r#"{"end":{"exited":true,"status":"exit status 0"}}"#);

        let ev = ProcessEvent {
            event: Some(process_event::Event::End(EndEvent {
                exit_code: -1,
                exited: false,
                status: "signal: killed".into(),
                error: Some("signal: killed".into()),
            })),
        };
        let json = String::from_utf8(Codec::Json.encode(&ev).to_vec()).unwrap();
        assert!(json.contains(r#""exitCode":-1"#), "{json}");
    }

    #[test]
    fn json_accepts_snake_case_optional_false_and_unknown_fields() {
        let req: StartRequest = Codec::Json
            .decode(
                br#"{"process":{"cmd":"/bin/bash","args":["-l","-c","true"],"envs":{"A":"1"}},
                    "stdin":false,"newField":{"x":1}}"#,
            )
            .unwrap();
        assert_eq!(req.stdin, Some(false));
        assert_eq!(
            req.process,
            Some(ProcessConfig {
                cmd: "/bin/bash".into(),
                args: vec!["-l".into(), "-c".into(), "true".into()],
                envs: [("A".to_string(), "1".to_string())].into(),
                cwd: None,
            })
        );
        let info: EntryInfo = Codec::Json
            .decode(br#"{"modified_time":"2026-01-01T00:00:00Z","size":"12","type":1,"is_symlink":true}"#)
            .unwrap();
        assert_eq!(info.size, 12);
        assert_eq!(info.r#type(), FileType::File);
        assert!(info.is_symlink);
    }

    #[test]
    fn json_int64_is_a_string_and_enums_are_names() {
        let info = EntryInfo {
            name: "a".into(),
            r#type: FileType::Directory.into(),
            size: 4096,
            ..Default::default()
        };
        let json = String::from_utf8(Codec::Json.encode(&info).to_vec()).unwrap();
        assert_eq!(
            json,
            r#"{"name":"a","type":"FILE_TYPE_DIRECTORY","size":"4096"}"#
        );
    }

    #[test]
    fn bytes_are_base64_in_json() {
        use crate::process::process_event::{DataEvent, data_event::Output};
        let ev = ProcessEvent {
            event: Some(process_event::Event::Data(DataEvent {
                output: Some(Output::Stdout(b"hi\n".to_vec())),
            })),
        };
        let json = String::from_utf8(Codec::Json.encode(&ev).to_vec()).unwrap();
        assert_eq!(json, r#"{"data":{"stdout":"aGkK"}}"#);
        let back: ProcessEvent = Codec::Json.decode(json.as_bytes()).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn keepalive_is_an_empty_object() {
        let ev = ProcessEvent {
            event: Some(process_event::Event::Keepalive(process_event::KeepAlive {})),
        };
        assert_eq!(&Codec::Json.encode(&ev)[..], br#"{"keepalive":{}}"#);
    }

    #[test]
    fn proto_codec_round_trips() {
        let req = StartRequest {
            tag: Some("t".into()),
            stdin: Some(false),
            ..Default::default()
        };
        let bytes = Codec::Proto.encode(&req);
        let back: StartRequest = Codec::Proto.decode(&bytes).unwrap();
        assert_eq!(back, req);
        assert_eq!(
            Codec::Proto
                .decode::<StartRequest>(&[0xff, 0xff])
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn envelopes_decode_across_arbitrary_chunk_boundaries() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&envelope(0, b"{\"a\":1}"));
        wire.extend_from_slice(&envelope(0, b""));
        wire.extend_from_slice(&envelope(FLAG_END_STREAM, b"{}"));
        for split in 0..wire.len() {
            let mut d = EnvelopeDecoder::new();
            let mut got = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                d.push(part);
                while let Some(e) = d.next_envelope().unwrap() {
                    got.push(e);
                }
            }
            assert_eq!(got.len(), 3, "split at {split}");
            assert_eq!(&got[0].payload[..], b"{\"a\":1}");
            assert!(got[2].is_end_stream());
            assert!(!d.has_partial());
        }
    }

    #[test]
    fn oversized_and_compressed_envelopes_are_refused() {
        let mut d = EnvelopeDecoder::new();
        d.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            d.next_envelope().unwrap_err().code(),
            Code::ResourceExhausted
        );
        let mut d = EnvelopeDecoder::new();
        d.push(&envelope(FLAG_COMPRESSED, b"x"));
        assert_eq!(d.next_envelope().unwrap_err().code(), Code::Unimplemented);
    }

    #[test]
    fn end_of_stream_encodes_success_and_errors() {
        assert_eq!(&end_stream_payload(None)[..], b"{}");
        let err = ConnectError::new(Code::NotFound, "process with pid 7 not found");
        let payload = end_stream_payload(Some(&err));
        assert_eq!(ConnectError::from_end_stream(&payload), Err(err));
        assert_eq!(ConnectError::from_end_stream(b"{}"), Ok(()));
    }

    #[test]
    fn unary_error_bodies_carry_code_name_and_details() {
        let err = ConnectError::new(Code::InvalidArgument, "path is a directory");
        let v: serde_json::Value = serde_json::from_slice(&err.unary_body()).unwrap();
        assert_eq!(v["code"], "invalid_argument");
        assert_eq!(v["details"], serde_json::json!([]));
        assert_eq!(ConnectError::from_unary_body(400, &err.unary_body()), err);
        let plain = ConnectError::from_unary_body(401, br#"{"code":401,"message":"bad token"}"#);
        assert_eq!(plain, ConnectError::new(Code::Unauthenticated, "bad token"));
    }

    #[test]
    fn decode_stream_reports_missing_end() {
        let mut wire = envelope(0, br#"{"start":{"pid":3}}"#).to_vec();
        let (msgs, status) = decode_stream::<ProcessEvent>(Codec::Json, &wire);
        assert_eq!(msgs.len(), 1);
        assert_eq!(status.unwrap_err().code(), Code::Internal);
        wire.extend_from_slice(&envelope(FLAG_END_STREAM, b"{}"));
        let (msgs, status) = decode_stream::<ProcessEvent>(Codec::Json, &wire);
        assert_eq!(msgs.len(), 1);
        assert!(status.is_ok());
    }
}
