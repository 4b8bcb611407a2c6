//! The seam between the pool and the protocols: a connection *kind* opens connections for a
//! destination, and a *link* is one open connection's request side. The pool (`pool.rs`) holds
//! links of any kind and does everything else the same way for all of them (checkout, the
//! decision table, fairness, queue, riding out outages, back-off, health, metrics).
//!
//! A kind (one file each: `h2_link.rs` for the h2 crate, `native_link.rs` for pushrelay's own
//! HTTP/2 codec, `chain.rs` for HTTP/1.1 to a DMZ relay)
//! provides:
//! - `open(…, deadline, close)`: connect (through `connect::Connector` and its CONNECT tunnel),
//!   bounded by `deadline`; returns the link, its `Route`, and a receiver on which the
//!   connection's driver task says why the connection ended (`None`: `close` was cancelled);
//! - on the link, `capacity()` (requests it may carry at once, live: h2 the peer's
//!   MAX_CONCURRENT_STREAMS, HTTP/1.1 one) and `send(head, whole body)`, whose error says
//!   whether the request was provably never processed and whether the connection is done.
//!
//! Adding a kind: a file like `h2_link.rs`, and one arm in each enum here.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::chain::{ChainFailure, ChainKind, ChainLink};
use super::connect::{ConnectError, Route};
use super::h2_link::{H2Failure, H2Kind, H2Link};
use super::native_link::{NativeFailure, NativeKind, NativeLink};
use crate::policy::Authority;

/// How the pool's connections are made.
pub enum LinkKind {
    H2(Box<H2Kind>),
    Native(Box<NativeKind>),
    Chain(ChainKind),
}

/// One open connection's request side.
pub enum Link {
    H2(H2Link),
    Native(NativeLink),
    Chain(ChainLink),
}

/// A connection just opened, and the receiver its driver says why it ended on.
pub struct Opened {
    pub link: Link,
    pub route: Route,
    pub ended: oneshot::Receiver<Option<String>>,
}

/// An answer as a link gives it: an HTTP/2 stream still being received, or read whole (with
/// its trailers, when it had some).
pub enum LinkAnswer {
    Stream(Response<h2::RecvStream>),
    Whole(Response<Bytes>, Option<HeaderMap>),
}

/// Why a request failed on a link.
#[derive(Debug)]
pub enum LinkError {
    H2(H2Failure),
    Native(NativeFailure),
    Chain(ChainFailure),
}

impl LinkError {
    /// Whether the connection takes no more requests after this.
    pub fn ends_connection(&self) -> bool {
        match self {
            LinkError::H2(e) => e.ends_connection(),
            LinkError::Native(e) => e.ends_connection(),
            // The driver ends the connection itself; the pool learns of it from `ended`.
            LinkError::Chain(_) => true,
        }
    }
}

impl LinkKind {
    /// Requests one new connection of this kind is counted on to carry at once, before its
    /// peer says (`decision::Limits::connect_brings`).
    pub fn connect_brings(&self) -> usize {
        match self {
            LinkKind::Chain(_) => 1,
            _ => usize::MAX,
        }
    }

    pub async fn open(
        &self,
        dest: &Authority,
        identity: &Option<Arc<str>>,
        deadline: Instant,
        close: CancellationToken,
    ) -> Result<Opened, ConnectError> {
        let (link, route, ended) = match self {
            LinkKind::H2(kind) => {
                let (link, route, ended) = kind.open(dest, identity, deadline, close).await?;
                (Link::H2(link), route, ended)
            }
            LinkKind::Native(kind) => {
                let (link, route, ended) = kind.open(dest, identity, deadline, close).await?;
                (Link::Native(link), route, ended)
            }
            LinkKind::Chain(kind) => {
                let (link, route, ended) = kind.open(deadline, close).await?;
                (Link::Chain(link), route, ended)
            }
        };
        Ok(Opened { link, route, ended })
    }
}

impl Link {
    /// Requests this connection may carry at once, as its peer allows now.
    pub fn capacity(&self) -> usize {
        match self {
            Link::H2(link) => link.capacity(),
            Link::Native(link) => link.capacity(),
            Link::Chain(_) => 1,
        }
    }

    /// Sends one request for `dest`, its body whole, and gives the answer (its head, for a
    /// stream).
    pub async fn send(
        &self,
        dest: &Authority,
        head: Request<()>,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Result<LinkAnswer, LinkError> {
        match self {
            Link::H2(link) => link
                .send(head, body, trailers)
                .await
                .map(LinkAnswer::Stream)
                .map_err(LinkError::H2),
            Link::Native(link) => link
                .send(head, body, trailers)
                .await
                .map(|(response, trailers)| LinkAnswer::Whole(response, trailers))
                .map_err(LinkError::Native),
            // HTTP/1.1 with a length carries no trailers; APNs takes none.
            Link::Chain(link) => link
                .send(dest, &head, &body)
                .await
                .map(|response| LinkAnswer::Whole(response, None))
                .map_err(LinkError::Chain),
        }
    }
}
