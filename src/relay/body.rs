//! Bodies on the way through the relay. A client's HTTP/2 request body is an `H2Body`
//! (crate::h2_body); the upstream's answer is its own `ResponseBody`, whatever the protocol. `read_whole`
//! reads a body to its end within bounds, into a `RelayBody`: the relay holds every request and
//! answer whole (pushes are ≤ 5 KiB), so a slow or stalled peer on one side never holds a
//! resource on the other.

use std::convert::Infallible;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::error::ReadError;
pub use crate::h2_body::H2Body;
use crate::upstream::BoxError;

/// A body held whole: pushrelay's own answers, a client's request once read, an origin's answer
/// once read. Nothing is streamed through the relay: a request reaches the upstream only when it
/// is complete, and an upstream stream is released before the client is written to.
#[derive(Debug, Default)]
pub struct RelayBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl RelayBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        RelayBody {
            data: (!bytes.is_empty()).then_some(bytes),
            trailers: None,
        }
    }

    pub fn empty() -> Self {
        RelayBody::default()
    }

    /// The length of the data not yet taken.
    pub fn len(&self) -> usize {
        self.data.as_ref().map_or(0, Bytes::len)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_none()
    }

    pub fn has_trailers(&self) -> bool {
        self.trailers.is_some()
    }

    /// The data and trailers, taken out at once.
    pub fn into_parts(self) -> (Option<Bytes>, Option<HeaderMap>) {
        (self.data, self.trailers)
    }
}

/// Reads `body` to its end, data and trailers, bounded by `limit` bytes and `timeout`.
pub async fn read_whole<B>(
    mut body: B,
    limit: usize,
    timeout: Duration,
) -> Result<RelayBody, ReadError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let read = async {
        let mut whole = RelayBody::empty();
        // A push is one DATA frame: kept as it came, without a copy; only a body in several
        // frames is gathered into `more` and joined.
        let mut first: Option<Bytes> = None;
        let mut more: Vec<Bytes> = Vec::new();
        let mut len = 0usize;
        while !body.is_end_stream() {
            let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await else {
                break;
            };
            // A body that knows why it failed (the HTTP/1.1 reader's chunk over the limit) says so.
            let frame = frame.map_err(|e| match e.into().downcast::<ReadError>() {
                Ok(known) => *known,
                Err(other) => ReadError::Broken(other),
            })?;
            match frame.into_data() {
                Ok(data) => {
                    len += data.len();
                    if len > limit {
                        return Err(ReadError::TooLarge { limit });
                    }
                    if !data.is_empty() {
                        match first {
                            None => first = Some(data),
                            Some(_) => more.push(data),
                        }
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        whole.trailers = Some(trailers);
                        break;
                    }
                }
            }
        }
        whole.data = match first {
            Some(first) if !more.is_empty() => {
                more.insert(0, first);
                Some(Bytes::from(more.concat()))
            }
            first => first,
        };
        Ok(whole)
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ReadError::Timeout { after: timeout })?
}

/// A whole body from text: how error.rs's answers become a door's body.
impl From<String> for RelayBody {
    fn from(text: String) -> Self {
        RelayBody::full(text)
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len() as u64)
    }
}
