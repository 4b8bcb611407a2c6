//! HTTP/1.1 as a legacy corporate proxy speaks it to the post-proxy front door, parsed strictly:
//! every request-smuggling shape is refused rather than repaired (both `Content-Length` and
//! `Transfer-Encoding`, differing lengths, a coding other than a lone `chunked`, obs-folded lines,
//! bad bytes in names or values). hyper's parser repairs some of these silently, which hides them
//! from the relay, so this door owns its parser: httparse for the head, a bounded chunked decoder
//! for bodies, and a writer that frames answers with `Content-Length` when known, else chunked.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Refusal;

/// Headers in one request head at most.
const MAX_HEADERS: usize = 128;
/// A chunk-size line (with extensions) or a trailer line at most.
const MAX_CHUNK_LINE: usize = 4096;

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
}

/// A parsed, validated request head.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub target: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

/// Why a request head is refused; each maps to the status the client gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Http1Error {
    #[error("request head larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("both Content-Length and Transfer-Encoding (request smuggling shape)")]
    LengthAndChunked,
    #[error("Content-Length values differ or are not a number: {0:?}")]
    BadContentLength(String),
    #[error("Transfer-Encoding {0:?} is not a single final chunked")]
    BadTransferEncoding(String),
    #[error("HTTP/1.0 cannot use Transfer-Encoding")]
    TransferEncodingInHttp10,
    #[error("Expect {0:?} is not supported")]
    BadExpect(String),
    #[error("malformed chunked body: {0}")]
    BadChunk(String),
}

impl Http1Error {
    /// What kind of refusal this is; error.rs turns it into the answer.
    pub fn refusal(&self) -> Refusal {
        match self {
            Http1Error::HeadTooLarge(_) | Http1Error::TooManyHeaders => Refusal::HeadTooLarge,
            Http1Error::BadExpect(_) => Refusal::ExpectationFailed,
            _ => Refusal::Malformed,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.refusal().classify().0
    }

    pub fn reason(&self) -> &'static str {
        self.refusal().classify().1
    }
}

/// APNs request header names, matched before the general parser: the same few names arrive in
/// every push, and as static names they cost no allocation.
const APNS_NAMES: [HeaderName; 6] = [
    HeaderName::from_static("apns-topic"),
    HeaderName::from_static("apns-push-type"),
    HeaderName::from_static("apns-id"),
    HeaderName::from_static("apns-expiration"),
    HeaderName::from_static("apns-priority"),
    HeaderName::from_static("apns-collapse-id"),
];

fn header_name(raw: &str) -> Result<HeaderName, Http1Error> {
    let b = raw.as_bytes();
    if b.len() > 5
        && b[..5].eq_ignore_ascii_case(b"apns-")
        && let Some(known) = APNS_NAMES
            .iter()
            .find(|n| n.as_str().eq_ignore_ascii_case(raw))
    {
        return Ok(known.clone());
    }
    HeaderName::from_bytes(b)
        .map_err(|_| Http1Error::Malformed(format!("invalid header name {raw:?}")))
}

/// Parses one request head from the front of `buf` and takes it off. `Ok(None)`: more bytes are
/// needed. Header values are slices of the head as read, not copies.
pub fn parse_head(buf: &mut BytesMut, max_head: usize) -> Result<Option<RequestHead>, Http1Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => {
            return Err(Http1Error::HeadTooLarge(max_head));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Http1Error::TooManyHeaders),
        Err(e) => return Err(Http1Error::Malformed(e.to_string())),
    };
    if len > max_head {
        return Err(Http1Error::HeadTooLarge(max_head));
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| Http1Error::Malformed("invalid method".into()))?;
    let target = req.path.unwrap_or("").to_owned();
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(Http1Error::Malformed("unsupported HTTP version".into())),
    };
    // Where each value sits in the head, so that the head can be split off and shared.
    let base = buf.as_ptr() as usize;
    let mut fields = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let start = h.value.as_ptr() as usize - base;
        fields.push((header_name(h.name)?, start..start + h.value.len()));
    }
    let head = buf.split_to(len).freeze();
    let mut map = HeaderMap::with_capacity(fields.len());
    for (name, value) in fields {
        let value = HeaderValue::from_maybe_shared(head.slice(value)).map_err(|_| {
            Http1Error::Malformed(format!("invalid value for header {:?}", name.as_str()))
        })?;
        map.append(name, value);
    }
    let framing = framing(&map, version)?;
    let connection_has = |token: &str| {
        map.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let keep_alive = match version {
        Version::HTTP_11 => !connection_has("close"),
        _ => connection_has("keep-alive") && !connection_has("close"),
    };
    let expect_continue = match map.get(header::EXPECT) {
        None => false,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"100-continue") => true,
        Some(v) => {
            return Err(Http1Error::BadExpect(
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            ));
        }
    };
    Ok(Some(RequestHead {
        method,
        target,
        version,
        headers: map,
        framing,
        keep_alive,
        expect_continue,
    }))
}

/// Decides how the body is delimited, refusing every ambiguous shape (RFC 9112 §6.1–6.3).
fn framing(headers: &HeaderMap, version: Version) -> Result<Framing, Http1Error> {
    let te: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    let cl: Vec<&HeaderValue> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    if !te.is_empty() {
        if !cl.is_empty() {
            return Err(Http1Error::LengthAndChunked);
        }
        if version != Version::HTTP_11 {
            return Err(Http1Error::TransferEncodingInHttp10);
        }
        let joined = te
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(",");
        // Only a lone `chunked`: other codings would reach the origin still encoded.
        if te.len() != 1 || !joined.trim().eq_ignore_ascii_case("chunked") {
            return Err(Http1Error::BadTransferEncoding(joined));
        }
        return Ok(Framing::Chunked);
    }
    let mut length: Option<u64> = None;
    for v in cl {
        let text = v
            .to_str()
            .map_err(|_| Http1Error::BadContentLength("<non-ASCII>".into()))?;
        for part in text.split(',') {
            let part = part.trim();
            let bad = || Http1Error::BadContentLength(text.to_owned());
            if part.is_empty() || part.len() > 18 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let n: u64 = part.parse().map_err(|_| bad())?;
            match length {
                Some(prev) if prev != n => return Err(bad()),
                _ => length = Some(n),
            }
        }
    }
    Ok(match length {
        None | Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
    })
}

/// The read side of a client connection: a buffer over the stream.
pub struct Reader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(io: R) -> Self {
        Reader {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
        }
    }

    /// Whether bytes are already buffered (a pipelined request).
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(8 * 1024);
        }
        // `read_buf` keeps no state of its own, so a fresh one per poll loses nothing.
        pin!(self.io.read_buf(&mut self.buf)).poll(cx)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Waits for the first byte of the next request. `Ok(false)`: the client closed cleanly.
    pub async fn wait_for_request(&mut self) -> io::Result<bool> {
        while self.buf.is_empty() {
            if self.fill().await? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The next request head, if it is already buffered whole.
    pub fn buffered_head(&mut self, max_head: usize) -> Result<Option<RequestHead>, Http1Error> {
        parse_head(&mut self.buf, max_head)
    }

    /// Reads one request head.
    pub async fn read_head(&mut self, max_head: usize) -> Result<RequestHead, ReadError> {
        loop {
            if let Some(head) = parse_head(&mut self.buf, max_head)? {
                return Ok(head);
            }
            if self.fill().await? == 0 {
                return Err(ReadError::Closed);
            }
        }
    }

    /// Reads up to `max` body bytes of a `Content-Length` body.
    pub async fn read_some(&mut self, max: u64) -> Result<Bytes, ReadError> {
        poll_fn(|cx| self.poll_read_some(cx, max)).await
    }

    /// Polls for up to `max` body bytes of a `Content-Length` body.
    pub fn poll_read_some(
        &mut self,
        cx: &mut Context<'_>,
        max: u64,
    ) -> Poll<Result<Bytes, ReadError>> {
        if self.buf.is_empty() && ready!(self.poll_fill(cx))? == 0 {
            return Poll::Ready(Err(ReadError::Closed));
        }
        let n = (self.buf.len() as u64).min(max) as usize;
        Poll::Ready(Ok(self.buf.split_to(n).freeze()))
    }

    async fn read_line(&mut self, what: &str) -> Result<BytesMut, ReadError> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(pos);
                self.buf.advance(2);
                return Ok(line);
            }
            if self.buf.len() > MAX_CHUNK_LINE {
                return Err(Http1Error::BadChunk(format!(
                    "{what} line longer than {MAX_CHUNK_LINE} bytes"
                ))
                .into());
            }
            if self.fill().await? == 0 {
                return Err(ReadError::Closed);
            }
        }
    }

    /// Reads the next chunk's data of a chunked body (`None` after the last chunk and trailers).
    pub async fn read_chunk(&mut self, state: &mut ChunkState) -> Result<Option<Bytes>, ReadError> {
        loop {
            match *state {
                ChunkState::Done => return Ok(None),
                ChunkState::Size => {
                    let line = self.read_line("chunk-size").await?;
                    let size = parse_chunk_size(&line)?;
                    *state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(remaining) => {
                    let data = self.read_some(remaining).await?;
                    let left = remaining - data.len() as u64;
                    *state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Some(data));
                }
                ChunkState::DataEnd => {
                    let line = self.read_line("chunk end").await?;
                    if !line.is_empty() {
                        return Err(
                            Http1Error::BadChunk("chunk data longer than its size".into()).into(),
                        );
                    }
                    *state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    // Trailer fields are read and dropped: push services define none.
                    let line = self.read_line("trailer").await?;
                    if line.is_empty() {
                        *state = ChunkState::Done;
                    } else if line[0] == b' ' || line[0] == b'\t' || !line.contains(&b':') {
                        return Err(Http1Error::BadChunk("malformed trailer field".into()).into());
                    }
                }
            }
        }
    }
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, Http1Error> {
    let size = line.split(|b| *b == b';').next().unwrap_or(&[]);
    // No whitespace allowed around the size: lenient parsers disagree there (smuggling).
    if size.is_empty() || size.len() > 15 || !size.iter().all(u8::is_ascii_hexdigit) {
        return Err(Http1Error::BadChunk(format!(
            "invalid chunk size {:?}",
            String::from_utf8_lossy(line)
        )));
    }
    let text =
        std::str::from_utf8(size).map_err(|_| Http1Error::BadChunk("invalid chunk size".into()))?;
    u64::from_str_radix(text, 16).map_err(|_| Http1Error::BadChunk("invalid chunk size".into()))
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Http(#[from] Http1Error),
    #[error("client closed the connection mid-request")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The response head as bytes: status line, headers, framing. `chunked` says how the body follows.
pub fn response_head(
    status: StatusCode,
    headers: &HeaderMap,
    keep_alive: bool,
    chunked: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Writes a body chunk in chunked encoding.
pub async fn write_chunk<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    w.write_all(format!("{:x}\r\n", data.len()).as_bytes())
        .await?;
    w.write_all(data).await?;
    w.write_all(b"\r\n").await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<RequestHead, Http1Error> {
        let mut buf = BytesMut::from(raw);
        let head = parse_head(&mut buf, 16 * 1024).map(|r| r.expect("complete head"));
        if head.is_ok() {
            assert!(buf.is_empty(), "the head is taken off the buffer");
        }
        head
    }

    #[test]
    fn framing_table() {
        let table: [(&str, Framing); 5] = [
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
                Framing::Length(5),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                Framing::Length(5),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n",
                Framing::Chunked,
            ),
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", Framing::Empty),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
                Framing::Empty,
            ),
        ];
        for (raw, framing) in table {
            assert_eq!(parse(raw).unwrap().framing, framing, "{raw:?}");
        }
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let table: [(&str, Http1Error); 8] = [
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                Http1Error::LengthAndChunked,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                Http1Error::LengthAndChunked,
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                Http1Error::BadContentLength("6".into()),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n",
                Http1Error::BadContentLength("5, 6".into()),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
                Http1Error::BadContentLength("+5".into()),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Http1Error::BadTransferEncoding("gzip, chunked".into()),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                Http1Error::BadTransferEncoding("chunked,chunked".into()),
            ),
            (
                "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                Http1Error::TransferEncodingInHttp10,
            ),
        ];
        for (raw, err) in table {
            assert_eq!(parse(raw).unwrap_err(), err, "{raw:?}");
        }
    }

    #[test]
    fn malformed_heads_are_refused() {
        let malformed = [
            "POST / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nX-Nul: a\0b\r\n\r\n",
            "POST / HTTP/2.0\r\nHost: a\r\n\r\n",
            "POST  / HTTP/1.1\r\nHost: a\r\n\r\n",
        ];
        for raw in malformed {
            assert!(
                matches!(parse(raw), Err(Http1Error::Malformed(_))),
                "{raw:?}: {:?}",
                parse(raw)
            );
        }
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        assert!(
            parse("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        assert!(
            !parse("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        assert!(!parse("GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive);
        assert!(
            parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .unwrap()
                .keep_alive
        );
    }

    #[test]
    fn expect_other_than_continue_is_417() {
        let err = parse("POST / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n").unwrap_err();
        assert_eq!(err.status(), StatusCode::EXPECTATION_FAILED);
        assert!(
            parse("POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\n\r\n")
                .unwrap()
                .expect_continue
        );
    }

    #[test]
    fn heads_come_off_the_buffer_one_by_one_with_their_headers() {
        let mut buf = BytesMut::from(
            "POST /3/device/a HTTP/1.1\r\nHost: h\r\nAPNS-Topic: com.example\r\napns-id: 1\r\n\
             X-Other: v\r\nContent-Length: 2\r\n\r\nok\
             GET /b HTTP/1.1\r\nHost: h\r\nApns-Push-Type: alert\r\n\r\n",
        );
        let first = parse_head(&mut buf, 16 * 1024).unwrap().unwrap();
        assert_eq!(first.target, "/3/device/a");
        assert_eq!(first.headers["apns-topic"], "com.example");
        assert_eq!(first.headers["apns-id"], "1");
        assert_eq!(first.headers["x-other"], "v");
        assert_eq!(first.framing, Framing::Length(2));
        assert!(
            buf.starts_with(b"okGET /b"),
            "the body and the next request stay"
        );
        buf.advance(2);
        let second = parse_head(&mut buf, 16 * 1024).unwrap().unwrap();
        assert_eq!(second.target, "/b");
        let names: Vec<_> = second.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["host", "apns-push-type"]);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_head_is_431() {
        let raw = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "a".repeat(20_000)
        );
        let err = parse_head(&mut BytesMut::from(raw.as_str()), 16 * 1024).unwrap_err();
        assert_eq!(err.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let partial = format!("GET / HTTP/1.1\r\nX-Big: {}", "a".repeat(20_000));
        assert_eq!(
            parse_head(&mut BytesMut::from(partial.as_str()), 16 * 1024).unwrap_err(),
            Http1Error::HeadTooLarge(16 * 1024)
        );
        assert!(
            parse_head(
                &mut BytesMut::from("GET / HTTP/1.1\r\nHost: a\r\n"),
                16 * 1024
            )
            .unwrap()
            .is_none()
        );
    }

    #[test]
    fn chunk_sizes_are_strict() {
        assert_eq!(parse_chunk_size(b"1a"), Ok(26));
        assert_eq!(parse_chunk_size(b"1A;ext=1"), Ok(26));
        for bad in [
            &b""[..],
            b" 1a",
            b"1a ",
            b"-1",
            b"0x10",
            b"ffffffffffffffffff",
        ] {
            assert!(
                parse_chunk_size(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn chunked_body_decodes_across_reads() {
        let raw = b"5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let mut reader = Reader::new(&raw[..]);
        let mut state = ChunkState::Size;
        let mut body = Vec::new();
        while let Some(chunk) = reader.read_chunk(&mut state).await.unwrap() {
            body.extend_from_slice(&chunk);
        }
        assert_eq!(body, b"hello, world");
        assert_eq!(
            &reader.buf[..],
            b"NEXT",
            "the next pipelined request stays buffered"
        );
    }

    #[tokio::test]
    async fn chunk_longer_than_its_size_is_refused() {
        let raw = b"3\r\nhello\r\n0\r\n\r\n";
        let mut reader = Reader::new(&raw[..]);
        let mut state = ChunkState::Size;
        let mut result = Ok(Some(Bytes::new()));
        for _ in 0..5 {
            result = reader.read_chunk(&mut state).await;
            if !matches!(result, Ok(Some(_))) {
                break;
            }
        }
        assert!(
            matches!(result, Err(ReadError::Http(Http1Error::BadChunk(_)))),
            "{result:?}"
        );
    }

    #[test]
    fn response_head_frames_and_closes() {
        let mut h = HeaderMap::new();
        h.insert("apns-id", HeaderValue::from_static("abc"));
        let head = String::from_utf8(response_head(StatusCode::OK, &h, false, true)).unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\napns-id: abc\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
    }
}
