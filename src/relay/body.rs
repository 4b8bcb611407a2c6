//! Bodies on the way through the relay. `H2Body` reads an HTTP/2 stream (a client's request, or
//! the origin's answer) frame by frame, returning flow-control credit as it is read. `RelayBody`
//! is the body of an answer to a client: either pushrelay's own (a short JSON reason) or the
//! origin's stream, whose upstream stream slot is held until the body ends or the client goes away.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::RecvStream;
use http_body::{Body, Frame, SizeHint};

use crate::upstream::Lease;

/// An HTTP/2 stream's body as an `http_body::Body`.
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
}

impl H2Body {
    pub fn new(recv: RecvStream) -> Self {
        H2Body {
            data_done: recv.is_end_stream(),
            recv,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Credit back what we took; a failure means the stream is gone anyway.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.recv.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

pub enum RelayBody {
    Full(Option<Bytes>),
    Upstream {
        body: H2Body,
        /// Released when the body is dropped, which frees the upstream stream slot.
        _lease: Lease,
    },
}

impl RelayBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        RelayBody::Full((!bytes.is_empty()).then_some(bytes))
    }

    pub fn empty() -> Self {
        RelayBody::Full(None)
    }

    pub fn upstream(recv: RecvStream, lease: Lease) -> Self {
        RelayBody::Upstream {
            body: H2Body::new(recv),
            _lease: lease,
        }
    }
}

/// A whole body from text: how error.rs's answers become a door's body.
impl From<String> for RelayBody {
    fn from(text: String) -> Self {
        RelayBody::full(text)
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        match self.get_mut() {
            RelayBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            RelayBody::Upstream { body, .. } => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RelayBody::Full(bytes) => bytes.is_none(),
            RelayBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RelayBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RelayBody::Full(None) => SizeHint::with_exact(0),
            RelayBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}
