//! Response bodies streamed from the sandbox to the client.
//!
//! Frames are passed on as they arrive (no buffering: hyper flushes each),
//! except empty data frames, which are dropped: an h2 client (Python's SDK)
//! aborts after about a hundred of them (CONTRACT 1.5). The body also fails
//! at once when its sandbox ends, and returns its upstream connection to the
//! pool when it was read to the end.
//!
//! A relayed body (cluster mode) whose connection to the node's edge breaks
//! cuts the client's transport as an abort does: the edge resets that
//! connection when the sandbox ends there, and the client must see the same
//! reset it would see from the edge itself, never a clean end.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::BoxError;
use crate::abort::Abort;
use crate::pool::{Key, Pool, Sender};

/// Body type of every response the proxy gives and request it forwards.
pub(crate) type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// An upstream connection to return to the pool once its response is done.
pub(crate) struct GiveBack {
    pub(crate) pool: Arc<Pool>,
    pub(crate) key: Key,
    pub(crate) sender: Sender,
}

impl GiveBack {
    fn run(self) {
        self.pool.put(self.key, self.sender);
    }
}

/// A proxied response body.
pub(crate) struct ResponseBody {
    inner: Incoming,
    abort: Abort,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    give_back: Option<GiveBack>,
    /// Relayed to an edge: an upstream error resets the client.
    relayed: bool,
}

impl ResponseBody {
    pub(crate) fn new(
        inner: Incoming,
        abort: Abort,
        give_back: Option<GiveBack>,
        relayed: bool,
    ) -> ResponseBody {
        let cancelled = Box::pin(CancellationToken::clone(&abort.token).cancelled_owned());
        ResponseBody {
            inner,
            abort,
            cancelled,
            give_back,
            relayed,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.cancelled.as_mut().poll(cx).is_ready() {
            this.give_back = None;
            return Poll::Ready(Some(Err(this.abort.fire())));
        }
        loop {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    if let Some(give_back) = this.give_back.take() {
                        give_back.run();
                    }
                    return Poll::Ready(None);
                }
                Some(Ok(frame)) if frame.data_ref().is_some_and(Bytes::is_empty) => {}
                Some(Ok(frame)) => return Poll::Ready(Some(Ok(frame))),
                Some(Err(err)) => {
                    this.give_back = None;
                    if this.relayed {
                        tracing::debug!(?err, "relayed response broke off, resetting the client");
                        return Poll::Ready(Some(Err(this.abort.fire())));
                    }
                    return Poll::Ready(Some(Err(err.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper does not poll a body that says it has ended (empty bodies,
        // the last frame of a sized one): the connection is reusable then.
        if self.inner.is_end_stream() && !self.abort.token.is_cancelled() {
            if let Some(give_back) = self.give_back.take() {
                give_back.run();
            }
        }
    }
}
