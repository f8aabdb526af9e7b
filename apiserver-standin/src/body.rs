//! Response bodies: a whole JSON document, or a watch stream fed line by line from a task.

use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame, SizeHint};
use tokio::sync::mpsc;

/// Ends a watch stream abruptly: hyper drops the connection without the final chunk, as when
/// an apiserver goes away mid-stream.
#[derive(Debug, thiserror::Error)]
#[error("watch stream broken by the stand-in")]
pub struct StreamBroken;

/// A response body.
#[derive(Debug)]
pub enum ResponseBody {
    /// A complete body (sent with Content-Length).
    Whole(Option<Bytes>),
    /// A stream (sent chunked) that ends when the sender is dropped, or breaks on an error.
    Stream(mpsc::Receiver<Result<Bytes, StreamBroken>>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = StreamBroken;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamBroken>>> {
        match self.get_mut() {
            Self::Whole(bytes) => Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
            Self::Stream(receiver) => receiver
                .poll_recv(cx)
                .map(|line| line.map(|line| line.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Whole(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Whole(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |bytes| bytes.len() as u64))
            }
            Self::Stream(_) => SizeHint::default(),
        }
    }
}
