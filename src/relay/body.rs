//! The body of an answer to a client: either pushrelay's own (a short JSON reason) or the origin's
//! HTTP/2 stream, streamed frame by frame with flow-control credit returned as it is read. The
//! upstream stream slot is held until the origin's body ends or the client goes away.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::RecvStream;
use http_body::{Body, Frame, SizeHint};

use crate::upstream::Lease;

pub enum RelayBody {
    Full(Option<Bytes>),
    Upstream {
        recv: RecvStream,
        /// Released when the body is dropped, which frees the upstream stream slot.
        _lease: Lease,
        data_done: bool,
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
            data_done: recv.is_end_stream(),
            recv,
            _lease: lease,
        }
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
            RelayBody::Upstream {
                recv, data_done, ..
            } => {
                if !*data_done {
                    match ready!(recv.poll_data(cx)) {
                        Some(Ok(data)) => {
                            // Credit back what we took; a failure means the stream is gone anyway.
                            let _ = recv.flow_control().release_capacity(data.len());
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                        None => *data_done = true,
                    }
                }
                match ready!(recv.poll_trailers(cx)) {
                    Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                    Ok(None) => Poll::Ready(None),
                    Err(e) => Poll::Ready(Some(Err(e))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RelayBody::Full(bytes) => bytes.is_none(),
            RelayBody::Upstream { recv, .. } => recv.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RelayBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RelayBody::Full(None) => SizeHint::with_exact(0),
            RelayBody::Upstream { recv, .. } if recv.is_end_stream() => SizeHint::with_exact(0),
            RelayBody::Upstream { .. } => SizeHint::default(),
        }
    }
}
