//! Connect-RPC on axum: turns HTTP requests into typed calls of the process
//! and filesystem services, and their results back into Connect responses
//! (unary, server-streaming and client-streaming; CONTRACT 3.1).

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use arca_proto::connect::{
    Code, Codec, ConnectError, EnvelopeDecoder, FLAG_END_STREAM, MAX_MESSAGE_BYTES, Message,
    end_stream_payload, envelope,
};
use axum::body::Body;
use axum::extract::{Path, Request, State as AxState};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{HeaderMap, StatusCode, header};
use tokio::sync::mpsc;

use crate::users::User;
use crate::{State, fsys, process, watch};

/// Keepalive interval when the client names none (reference default).
pub(crate) const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// How long a client stream may go on sending after its call has ended.
const CLIENT_STREAM_DRAIN: Duration = Duration::from_secs(10);

/// What a call knows about its caller besides the message.
pub(crate) struct CallCtx {
    pub(crate) user: User,
    /// `Keepalive-Ping-Interval`: idle time before a keepalive event.
    pub(crate) keepalive: Duration,
    /// `Connect-Timeout-Ms`: the whole call's deadline.
    pub(crate) timeout: Option<Duration>,
}

fn header_secs(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn call_ctx(state: &State, headers: &HeaderMap) -> Result<CallCtx, ConnectError> {
    let keepalive = header_secs(headers, "keepalive-ping-interval")
        .filter(|s| *s > 0)
        .map_or(DEFAULT_KEEPALIVE, Duration::from_secs);
    let timeout = header_secs(headers, "connect-timeout-ms")
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    Ok(CallCtx {
        user: state.caller(headers)?,
        keepalive,
        timeout,
    })
}

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn unsupported_media_type(expected: &str) -> Response {
    (
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        [("accept-post", expected.to_string())],
        format!("unsupported content type; use {expected}"),
    )
        .into_response()
}

/// A unary error response.
pub(crate) fn error_response(err: &ConnectError) -> Response {
    let status =
        StatusCode::from_u16(err.code().http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        err.unary_body(),
    )
        .into_response()
}

/// Sends the messages of a server stream, one envelope each, flushed as
/// they are written.
pub(crate) struct Sink<M> {
    tx: mpsc::Sender<Bytes>,
    codec: Codec,
    _msg: PhantomData<fn(M)>,
}

/// The client went away; the stream cannot be written any more.
#[derive(Debug)]
pub(crate) struct Gone;

impl<M: Message> Sink<M> {
    pub(crate) async fn send(&self, msg: &M) -> Result<(), Gone> {
        let payload = self.codec.encode(msg);
        self.tx.send(envelope(0, &payload)).await.map_err(|_| Gone)
    }

    /// Resolves when the client has gone away.
    pub(crate) async fn closed(&self) {
        self.tx.closed().await;
    }
}

fn stream_response(codec: Codec, rx: mpsc::Receiver<Bytes>) -> Response {
    let body = Body::from_stream(tokio_stream_from(rx).map(Ok::<_, std::convert::Infallible>));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, codec.stream_content_type())
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn tokio_stream_from(mut rx: mpsc::Receiver<Bytes>) -> impl futures_util::Stream<Item = Bytes> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn end_only(codec: Codec, err: &ConnectError) -> Response {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(envelope(FLAG_END_STREAM, &end_stream_payload(Some(err))));
    stream_response(codec, rx)
}

async fn read_body(body: Body) -> Result<Bytes, ConnectError> {
    axum::body::to_bytes(body, MAX_MESSAGE_BYTES)
        .await
        .map_err(|e| ConnectError::new(Code::ResourceExhausted, format!("request body: {e}")))
}

async fn unary<Req, Resp, F, Fut>(state: Arc<State>, req: Request, f: F) -> Response
where
    Req: Message,
    Resp: Message,
    F: FnOnce(Arc<State>, CallCtx, Req) -> Fut,
    Fut: Future<Output = Result<Resp, ConnectError>>,
{
    let Some(codec) = Codec::from_unary_content_type(content_type(req.headers())) else {
        return unsupported_media_type("application/json or application/proto");
    };
    let (parts, body) = req.into_parts();
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(e) => return error_response(&e),
    };
    let ctx = match call_ctx(&state, &parts.headers) {
        Ok(c) => c,
        Err(e) => return error_response(&e),
    };
    let msg: Req = match codec.decode(&body) {
        Ok(m) => m,
        Err(e) => return error_response(&e),
    };
    let deadline = ctx.timeout;
    let call = f(state, ctx, msg);
    let result = match deadline {
        Some(d) => tokio::time::timeout(d, call).await.unwrap_or_else(|_| {
            Err(ConnectError::new(
                Code::DeadlineExceeded,
                "the call did not finish within its Connect-Timeout-Ms",
            ))
        }),
        None => call.await,
    };
    match result {
        Ok(resp) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, codec.unary_content_type())],
            codec.encode(&resp),
        )
            .into_response(),
        Err(e) => error_response(&e),
    }
}

async fn server_stream<Req, Resp, F, Fut>(state: Arc<State>, req: Request, f: F) -> Response
where
    Req: Message,
    Resp: Message + Send + 'static,
    F: FnOnce(Arc<State>, CallCtx, Req, Sink<Resp>) -> Fut,
    Fut: Future<Output = Result<(), ConnectError>> + Send + 'static,
{
    let Some(codec) = Codec::from_stream_content_type(content_type(req.headers())) else {
        return unsupported_media_type("application/connect+json or application/connect+proto");
    };
    let (parts, body) = req.into_parts();
    let body = match read_body(body).await {
        Ok(b) => b,
        Err(e) => return end_only(codec, &e),
    };
    let ctx = match call_ctx(&state, &parts.headers) {
        Ok(c) => c,
        Err(e) => return end_only(codec, &e),
    };
    let mut dec = EnvelopeDecoder::new();
    dec.push(&body);
    let msg: Req = match dec.next_envelope() {
        Ok(Some(env)) => match codec.decode(&env.payload) {
            Ok(m) => m,
            Err(e) => return end_only(codec, &e),
        },
        Ok(None) => {
            return end_only(
                codec,
                &ConnectError::new(
                    Code::InvalidArgument,
                    "request carries no enveloped message",
                ),
            );
        }
        Err(e) => return end_only(codec, &e),
    };
    let (tx, rx) = mpsc::channel(32);
    let sink = Sink {
        tx: tx.clone(),
        codec,
        _msg: PhantomData,
    };
    let fut = f(state, ctx, msg, sink);
    tokio::spawn(async move {
        let result = fut.await;
        let end = envelope(FLAG_END_STREAM, &end_stream_payload(result.err().as_ref()));
        let _ = tx.send(end).await;
    });
    stream_response(codec, rx)
}

/// Incoming messages of a client stream, in order.
pub(crate) type Incoming<M> = mpsc::Receiver<Result<M, ConnectError>>;

async fn client_stream<Req, Resp, F, Fut>(state: Arc<State>, req: Request, f: F) -> Response
where
    Req: Message + Send + 'static,
    Resp: Message,
    F: FnOnce(Arc<State>, CallCtx, Incoming<Req>) -> Fut,
    Fut: Future<Output = Result<Resp, ConnectError>>,
{
    let Some(codec) = Codec::from_stream_content_type(content_type(req.headers())) else {
        return unsupported_media_type("application/connect+json or application/connect+proto");
    };
    let ctx = call_ctx(&state, req.headers());
    let (tx, rx) = mpsc::channel::<Result<Req, ConnectError>>(16);
    let mut body = req.into_body().into_data_stream();
    let reader = tokio::spawn(async move {
        let mut dec = EnvelopeDecoder::new();
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx
                        .send(Err(ConnectError::new(
                            Code::Canceled,
                            format!("request body: {e}"),
                        )))
                        .await;
                    return;
                }
            };
            dec.push(&chunk);
            loop {
                match dec.next_envelope() {
                    Ok(Some(env)) if env.is_end_stream() => return,
                    Ok(Some(env)) => {
                        // Once the handler is done, the rest is read and
                        // dropped so the client can finish sending.
                        let _ = tx.send(codec.decode(&env.payload)).await;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        }
        if dec.has_partial() {
            let _ = tx
                .send(Err(ConnectError::new(
                    Code::InvalidArgument,
                    "request stream ended inside a message",
                )))
                .await;
        }
    });
    let result = match ctx {
        Ok(ctx) => f(state, ctx, rx).await,
        Err(e) => {
            drop(rx);
            Err(e)
        }
    };
    if tokio::time::timeout(CLIENT_STREAM_DRAIN, reader)
        .await
        .is_err()
    {
        tracing::debug!("client stream still sending after the call ended; answering anyway");
    }
    let (tx, rx) = mpsc::channel(2);
    match result {
        Ok(resp) => {
            let _ = tx.try_send(envelope(0, &codec.encode(&resp)));
            let _ = tx.try_send(envelope(FLAG_END_STREAM, &end_stream_payload(None)));
        }
        Err(e) => {
            let _ = tx.try_send(envelope(FLAG_END_STREAM, &end_stream_payload(Some(&e))));
        }
    }
    stream_response(codec, rx)
}

fn unknown_method(service: &str, method: &str) -> Response {
    error_response(&ConnectError::new(
        Code::Unimplemented,
        format!("{service}/{method} is not a method of envd"),
    ))
}

/// `POST /process.Process/{method}`.
pub(crate) async fn process_service(
    AxState(state): AxState<Arc<State>>,
    Path(method): Path<String>,
    req: Request,
) -> Response {
    match method.as_str() {
        "Start" => server_stream(state, req, process::start).await,
        "Connect" => server_stream(state, req, process::connect).await,
        "List" => unary(state, req, process::list).await,
        "SendInput" => unary(state, req, process::send_input).await,
        "StreamInput" => client_stream(state, req, process::stream_input).await,
        "SendSignal" => unary(state, req, process::send_signal).await,
        "CloseStdin" => unary(state, req, process::close_stdin).await,
        "Update" => unary(state, req, process::update).await,
        _ => unknown_method("process.Process", &method),
    }
}

/// `POST /filesystem.Filesystem/{method}`.
pub(crate) async fn filesystem_service(
    AxState(state): AxState<Arc<State>>,
    Path(method): Path<String>,
    req: Request,
) -> Response {
    match method.as_str() {
        "Stat" => unary(state, req, fsys::stat).await,
        "MakeDir" => unary(state, req, fsys::make_dir).await,
        "Move" => unary(state, req, fsys::move_entry).await,
        "ListDir" => unary(state, req, fsys::list_dir).await,
        "Remove" => unary(state, req, fsys::remove).await,
        "WatchDir" => server_stream(state, req, watch::watch_dir).await,
        "CreateWatcher" => unary(state, req, watch::create_watcher).await,
        "GetWatcherEvents" => unary(state, req, watch::get_watcher_events).await,
        "RemoveWatcher" => unary(state, req, watch::remove_watcher).await,
        _ => unknown_method("filesystem.Filesystem", &method),
    }
}
