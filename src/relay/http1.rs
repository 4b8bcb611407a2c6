//! HTTP/1.1 as a legacy corporate proxy speaks it to the post-proxy front door, parsed strictly:
//! every request-smuggling shape is refused rather than repaired (both `Content-Length` and
//! `Transfer-Encoding`, differing lengths, a coding other than a lone `chunked`, obs-folded lines,
//! bad bytes in names or values). hyper's parser repairs some of these silently, which hides them
//! from the relay, so this door owns its parser: httparse for the head, a bounded chunked decoder
//! for bodies, and a writer that frames answers with `Content-Length` when known, else chunked.
//! Lines end in CRLF only (httparse also takes a bare LF, which lets a second request hide in a
//! head another parser reads differently), chunk lines follow RFC 9112 §7.1 to the byte, and the
//! one `Content-Length` that goes on is written canonically.

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
/// Chunk-extension bytes in one body at most: extensions carry nothing a push needs, and without
/// a bound a client could send any number of them around one-byte chunks.
const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;
/// Trailer fields in one body at most (they are read and dropped).
const MAX_TRAILERS: usize = MAX_HEADERS;

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
    #[error("chunked body larger than {0} bytes")]
    BodyTooLarge(u64),
}

impl Http1Error {
    /// What kind of refusal this is; error.rs turns it into the answer.
    pub fn refusal(&self) -> Refusal {
        match self {
            Http1Error::HeadTooLarge(_) | Http1Error::TooManyHeaders => Refusal::HeadTooLarge,
            Http1Error::BadExpect(_) => Refusal::ExpectationFailed,
            Http1Error::BodyTooLarge(_) => Refusal::BodyTooLarge,
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
    if let Some(what) = bare_cr_or_lf(&buf[..len]) {
        return Err(Http1Error::Malformed(format!("{what} in the request head")));
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
    let framing = framing(&mut map, version)?;
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

/// `Some("bare LF")` or `Some("bare CR")` when `bytes` has a line end other than CRLF.
fn bare_cr_or_lf(bytes: &[u8]) -> Option<&'static str> {
    let mut at = 0;
    loop {
        // To the next CR or LF, eight bytes at a time (most of a head has none).
        while let Some(chunk) = bytes.get(at..).and_then(<[u8]>::first_chunk::<8>) {
            match first_cr_or_lf(u64::from_le_bytes(*chunk)) {
                Some(i) => {
                    at += i;
                    break;
                }
                None => at += 8,
            }
        }
        match bytes.get(at) {
            None => return None,
            Some(b'\r') if bytes.get(at + 1) == Some(&b'\n') => at += 2,
            Some(b'\r') => return Some("bare CR"),
            Some(b'\n') => return Some("bare LF"),
            Some(_) => at += 1,
        }
    }
}

/// The index of the first CR or LF among the eight bytes of `word` (little-endian: byte 0 is
/// the lowest). The borrow trick marks a zero byte exactly when no zero byte is below it, so the
/// lowest mark of either search is exact.
fn first_cr_or_lf(word: u64) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let zeros = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let marks =
        zeros(word ^ u64::from_ne_bytes([b'\r'; 8])) | zeros(word ^ u64::from_ne_bytes([b'\n'; 8]));
    (marks != 0).then(|| marks.trailing_zeros() as usize / 8)
}

/// The byte-by-byte walk `bare_cr_or_lf` answers as (kept for its test).
#[cfg(test)]
fn first_bare_cr_or_lf(bytes: &[u8]) -> Option<&'static str> {
    let mut after_cr = false;
    for &b in bytes {
        let lf = b == b'\n';
        if after_cr != lf {
            return Some(if lf { "bare LF" } else { "bare CR" });
        }
        after_cr = b == b'\r';
    }
    after_cr.then_some("bare CR")
}

/// Decides how the body is delimited, refusing every ambiguous shape (RFC 9112 §6.1–6.3). A
/// `Content-Length` written other than as one plain number (`5, 5`, a repeat, `005`) is replaced
/// by that number: the origin gets exactly one canonical value.
fn framing(headers: &mut HeaderMap, version: Version) -> Result<Framing, Http1Error> {
    let te = headers.get_all(header::TRANSFER_ENCODING);
    let cl = headers.get_all(header::CONTENT_LENGTH);
    if te.iter().next().is_some() {
        if cl.iter().next().is_some() {
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
        if te.iter().count() != 1 || !joined.trim().eq_ignore_ascii_case("chunked") {
            return Err(Http1Error::BadTransferEncoding(joined));
        }
        return Ok(Framing::Chunked);
    }
    let mut length: Option<u64> = None;
    // Already one plain number (the usual case): nothing to rewrite.
    let mut values = cl.iter();
    let canonical = match (values.next(), values.next()) {
        (Some(only), None) => {
            let b = only.as_bytes();
            b.iter().all(u8::is_ascii_digit) && (b.len() == 1 || b.first() != Some(&b'0'))
        }
        _ => false,
    };
    for v in cl.iter() {
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
    if let Some(n) = length
        && !canonical
    {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
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

    /// Ready once the client has closed its side (EOF) or the connection failed, while its request
    /// is being handled. Bytes that arrive meanwhile (a pipelined request) stay buffered for the
    /// next head, up to `max`; with that much buffered the close is no longer watched.
    pub fn poll_closed(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<()> {
        while self.buf.len() < max {
            match ready!(self.poll_fill(cx)) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) => {}
            }
        }
        Poll::Pending
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

    /// The next line, without its CRLF. A bare CR or LF is refused as soon as it is seen.
    async fn read_line(&mut self, what: &str) -> Result<BytesMut, ReadError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\r' || *b == b'\n')
                && pos <= MAX_CHUNK_LINE
            {
                match (self.buf[pos], self.buf.get(pos + 1)) {
                    (b'\r', Some(b'\n')) => {
                        let line = self.buf.split_to(pos);
                        self.buf.advance(2);
                        return Ok(line);
                    }
                    (b'\r', None) => {}
                    (b'\r', _) => {
                        return Err(
                            Http1Error::BadChunk(format!("bare CR in a {what} line")).into()
                        );
                    }
                    _ => {
                        return Err(
                            Http1Error::BadChunk(format!("bare LF in a {what} line")).into()
                        );
                    }
                }
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
            match state.at {
                ChunkAt::Done => return Ok(None),
                ChunkAt::Size => {
                    let line = self.read_line("chunk-size").await?;
                    let (size, ext) = parse_chunk_line(&line)?;
                    state.extensions += ext;
                    if state.extensions > MAX_CHUNK_EXTENSIONS {
                        return Err(Http1Error::BadChunk(format!(
                            "chunk extensions longer than {MAX_CHUNK_EXTENSIONS} bytes"
                        ))
                        .into());
                    }
                    // Refused on the size line, before any of its data: a client announcing more
                    // than the limit would otherwise hold the request open until it timed out.
                    state.body = state.body.saturating_add(size);
                    if state.body > state.limit {
                        return Err(Http1Error::BodyTooLarge(state.limit).into());
                    }
                    state.at = if size == 0 {
                        ChunkAt::Trailers
                    } else {
                        ChunkAt::Data(size)
                    };
                }
                ChunkAt::Data(remaining) => {
                    let data = self.read_some(remaining).await?;
                    let left = remaining - data.len() as u64;
                    state.at = if left == 0 {
                        ChunkAt::DataEnd
                    } else {
                        ChunkAt::Data(left)
                    };
                    return Ok(Some(data));
                }
                ChunkAt::DataEnd => {
                    let line = self.read_line("chunk end").await?;
                    if !line.is_empty() {
                        return Err(
                            Http1Error::BadChunk("chunk data longer than its size".into()).into(),
                        );
                    }
                    state.at = ChunkAt::Size;
                }
                ChunkAt::Trailers => {
                    // Trailer fields are checked and dropped: push services define none.
                    let line = self.read_line("trailer").await?;
                    if line.is_empty() {
                        state.at = ChunkAt::Done;
                    } else if !is_field_line(&line) {
                        return Err(Http1Error::BadChunk("malformed trailer field".into()).into());
                    } else {
                        state.trailers += 1;
                        if state.trailers > MAX_TRAILERS {
                            return Err(Http1Error::BadChunk(format!(
                                "more than {MAX_TRAILERS} trailer fields"
                            ))
                            .into());
                        }
                    }
                }
            }
        }
    }
}

/// Where a chunked body's decoder is, and what it has counted against its bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkState {
    at: ChunkAt,
    /// Body bytes announced by the chunk sizes so far, and their bound.
    body: u64,
    limit: u64,
    extensions: usize,
    trailers: usize,
}

impl ChunkState {
    /// A decoder at the first chunk-size line, for a body of at most `limit` bytes.
    pub fn new(limit: u64) -> Self {
        ChunkState {
            at: ChunkAt::Size,
            body: 0,
            limit,
            extensions: 0,
            trailers: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkAt {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A field value byte: VCHAR, SP, HTAB or obs-text; no other control.
fn is_field_value_byte(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

/// `field-name ":" OWS field-value OWS`, as a trailer line must be.
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|b| *b == b':') else {
        return false;
    };
    colon > 0
        && line[..colon].iter().all(|b| is_tchar(*b))
        && line[colon + 1..].iter().all(|b| is_field_value_byte(*b))
}

/// A chunk line, `chunk-size [ chunk-ext ]` (RFC 9112 §7.1.1): the size, and how many bytes of
/// extensions followed it. Extensions are checked to the grammar and dropped.
fn parse_chunk_line(line: &[u8]) -> Result<(u64, usize), Http1Error> {
    let bad = |why: &str| {
        Http1Error::BadChunk(format!(
            "{why} in chunk line {:?}",
            String::from_utf8_lossy(&line[..line.len().min(64)])
        ))
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    // No whitespace allowed before the size: lenient parsers disagree there (smuggling).
    if digits == 0 || digits > 15 {
        return Err(bad("invalid chunk size"));
    }
    let mut size = 0u64;
    for b in &line[..digits] {
        // At most 15 hex digits: fits in 60 bits.
        size = size << 4 | u64::from((*b as char).to_digit(16).unwrap_or(0));
    }
    let ext = &line[digits..];
    let mut rest = ext;
    let skip_bws = |r: &mut &[u8]| {
        while let [b' ' | b'\t', tail @ ..] = *r {
            *r = tail;
        }
    };
    let token = |r: &mut &[u8]| {
        let n = r.iter().take_while(|b| is_tchar(**b)).count();
        *r = &r[n..];
        n > 0
    };
    while !rest.is_empty() {
        skip_bws(&mut rest);
        let [b';', tail @ ..] = rest else {
            return Err(bad("invalid chunk size"));
        };
        rest = tail;
        skip_bws(&mut rest);
        if !token(&mut rest) {
            return Err(bad("invalid chunk-extension name"));
        }
        let mut after = rest;
        skip_bws(&mut after);
        let [b'=', tail @ ..] = after else {
            continue;
        };
        rest = tail;
        skip_bws(&mut rest);
        if let [b'"', tail @ ..] = rest {
            rest = quoted_string_rest(tail).ok_or_else(|| bad("invalid quoted chunk-extension"))?;
        } else if !token(&mut rest) {
            return Err(bad("invalid chunk-extension value"));
        }
    }
    Ok((size, ext.len()))
}

/// What follows a quoted-string whose opening quote is already taken, or `None` when it is
/// malformed (unterminated, or a control character inside).
fn quoted_string_rest(mut r: &[u8]) -> Option<&[u8]> {
    loop {
        match *r {
            [b'"', ref tail @ ..] => return Some(tail),
            [b'\\', q, ref tail @ ..] if is_field_value_byte(q) => r = tail,
            [b, ref tail @ ..] if b != b'\\' && is_field_value_byte(b) => r = tail,
            _ => return None,
        }
    }
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

    /// Transfer-Encoding as lenient parsers read it differently: only a lone `chunked` (any case,
    /// optional whitespace around it) frames a body.
    #[test]
    fn transfer_encoding_table() {
        let head =
            |te: &str| format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:{te}\r\n\r\n");
        for te in [
            " chunked",
            " CHUNKED",
            " cHuNkEd",
            "chunked",
            "  chunked  ",
            "\tchunked\t",
        ] {
            assert_eq!(
                parse(&head(te)).map(|h| h.framing),
                Ok(Framing::Chunked),
                "{te:?}"
            );
        }
        for te in [
            " chunked, identity",
            " identity, chunked",
            " chunked,",
            " ,chunked",
            " chunked;q=1",
            " chunk",
            " \"chunked\"",
            " chunked chunked",
            " x-chunked",
            "",
        ] {
            assert!(
                matches!(parse(&head(te)), Err(Http1Error::BadTransferEncoding(_))),
                "{te:?}: {:?}",
                parse(&head(te))
            );
        }
        // Control characters and line tricks never reach the TE check at all.
        for te in [
            " chunked\x0b",
            " chunked\x0c",
            " chunked\0",
            " chunked\r",
            "\x01chunked",
        ] {
            assert!(
                matches!(parse(&head(te)), Err(Http1Error::Malformed(_))),
                "{te:?}: {:?}",
                parse(&head(te))
            );
        }
        for raw in [
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding\t: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\n Transfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
        ] {
            let result = parse(raw);
            // `Transfer_Encoding` is a different (valid) name: it frames nothing.
            if raw.contains("Transfer_Encoding") {
                assert_eq!(result.map(|h| h.framing), Ok(Framing::Empty));
            } else {
                assert!(
                    matches!(result, Err(Http1Error::Malformed(_))),
                    "{raw:?}: {result:?}"
                );
            }
        }
        assert_eq!(
            parse("POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err(),
            Http1Error::TransferEncodingInHttp10
        );
    }

    /// Content-Length: one decimal number, perhaps repeated; whatever the client wrote, one
    /// canonical value goes on.
    #[test]
    fn content_length_table() {
        let head = |cl: &str| format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length:{cl}\r\n\r\n");
        let good: [(&str, Framing, &str); 8] = [
            (" 5", Framing::Length(5), "5"),
            ("5", Framing::Length(5), "5"),
            (" 5 ", Framing::Length(5), "5"),
            (" 5, 5", Framing::Length(5), "5"),
            (" 5,5,5", Framing::Length(5), "5"),
            (" 005", Framing::Length(5), "5"),
            (" 0", Framing::Empty, "0"),
            (" 00", Framing::Empty, "0"),
        ];
        for (cl, framing, sent) in good {
            let h = parse(&head(cl)).unwrap();
            assert_eq!(h.framing, framing, "{cl:?}");
            let values: Vec<_> = h.headers.get_all(header::CONTENT_LENGTH).iter().collect();
            assert_eq!(values, [sent], "{cl:?}");
        }
        let repeated =
            parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ncontent-length: 05\r\n\r\n")
                .unwrap();
        assert_eq!(repeated.framing, Framing::Length(5));
        assert_eq!(
            repeated
                .headers
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .count(),
            1
        );
        for cl in [
            " +5",
            " -5",
            " -0",
            " 0x5",
            " 5e0",
            " 5.0",
            " 5.",
            " .5",
            " 5,",
            " ,5",
            " 5,,5",
            " 5, 6",
            " 5 5",
            " five",
            "",
            " 1234567890123456789",
            " 18446744073709551616",
            " 99999999999999999999999",
        ] {
            assert!(
                matches!(parse(&head(cl)), Err(Http1Error::BadContentLength(_))),
                "{cl:?}: {:?}",
                parse(&head(cl))
            );
        }
        for cl in [" 5\x0b", " 5\0", " \x015"] {
            assert!(
                matches!(parse(&head(cl)), Err(Http1Error::Malformed(_))),
                "{cl:?}"
            );
        }
        assert_eq!(
            parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n")
                .unwrap_err(),
            Http1Error::BadContentLength("6".into())
        );
        // TE.CL and CL.TE, in both orders, and with the length hidden behind an obs-fold.
        for raw in [
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(
                parse(raw).unwrap_err(),
                Http1Error::LengthAndChunked,
                "{raw:?}"
            );
        }
        for raw in [
            "POST / HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n Content-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n\tContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n Content-Length: 3\r\n\r\n",
        ] {
            assert!(
                matches!(parse(raw), Err(Http1Error::Malformed(_))),
                "{raw:?}"
            );
        }
    }

    /// Lines end in CRLF: a bare LF or CR anywhere in the head is refused, including where it
    /// would end the head early or start a header another parser does not see.
    #[test]
    fn bare_lf_and_cr_in_the_head_are_refused() {
        for raw in [
            "POST / HTTP/1.1\nHost: a\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\n\n",
            "POST / HTTP/1.1\r\nHost: a\r\n\n",
            "POST / HTTP/1.1\r\nHost: a\r\nVisible: v\nSmuggled: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nX: v\r\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
            "POST / HTTP/1.1\r\rHost: a\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(raw);
            let result = parse_head(&mut buf, 16 * 1024);
            assert!(
                matches!(result, Err(Http1Error::Malformed(_))),
                "{raw:?}: {result:?}"
            );
        }
        assert_eq!(bare_cr_or_lf(b"a\r\nb\r\n\r\n"), None);
        assert_eq!(bare_cr_or_lf(b"a\nb"), Some("bare LF"));
        assert_eq!(bare_cr_or_lf(b"a\rb"), Some("bare CR"));
        assert_eq!(bare_cr_or_lf(b"a\r"), Some("bare CR"));
        // The eight-at-a-time skip answers as the walk does, for every short mix of CR, LF and
        // two other bytes (up to 10: a skipped word and part of one more).
        let alphabet = [b'a', b'\r', b'\n', 0x8d];
        for len in 0..=10u32 {
            for n in 0..4usize.pow(len) {
                let bytes: Vec<u8> = (0..len).map(|i| alphabet[n / 4usize.pow(i) % 4]).collect();
                assert_eq!(
                    bare_cr_or_lf(&bytes),
                    first_bare_cr_or_lf(&bytes),
                    "{bytes:?}"
                );
            }
        }
    }

    /// Header count and head size: the bound itself is fine, one past it is 431.
    #[test]
    fn header_count_and_head_size_at_and_past_the_bound() {
        let with_headers = |n: usize| {
            let mut raw = String::from("GET / HTTP/1.1\r\n");
            for i in 0..n {
                raw.push_str(&format!("X-{i}: v\r\n"));
            }
            raw + "\r\n"
        };
        assert_eq!(
            parse(&with_headers(MAX_HEADERS)).unwrap().headers.len(),
            MAX_HEADERS
        );
        assert_eq!(
            parse(&with_headers(MAX_HEADERS + 1)).unwrap_err(),
            Http1Error::TooManyHeaders
        );
        let sized = |len: usize| {
            let fixed = "GET / HTTP/1.1\r\nHost: a\r\nX-Pad: \r\n\r\n".len();
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\nX-Pad: {}\r\n\r\n",
                "p".repeat(len - fixed)
            )
        };
        let max = 1024;
        for (len, ok) in [(max - 1, true), (max, true), (max + 1, false)] {
            let raw = sized(len);
            assert_eq!(raw.len(), len);
            let result = parse_head(&mut BytesMut::from(raw.as_str()), max);
            assert_eq!(result.is_ok(), ok, "{len}: {result:?}");
            if !ok {
                assert_eq!(result.unwrap_err(), Http1Error::HeadTooLarge(max));
            }
            // Arriving byte by byte changes nothing.
            let mut buf = BytesMut::new();
            let mut last = Ok(None);
            for b in raw.bytes() {
                buf.extend_from_slice(&[b]);
                last = parse_head(&mut buf, max);
                if !matches!(last, Ok(None)) {
                    break;
                }
            }
            assert_eq!(
                matches!(last, Ok(Some(_))),
                ok,
                "{len} byte by byte: {last:?}"
            );
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

    /// Decodes a whole chunked body; the bytes left after it, or the error.
    async fn decode(raw: &[u8], limit: u64) -> Result<(Vec<u8>, Vec<u8>), ReadError> {
        let mut reader = Reader::new(raw);
        let mut state = ChunkState::new(limit);
        let mut body = Vec::new();
        for _ in 0..raw.len() + 2 {
            match reader.read_chunk(&mut state).await? {
                Some(chunk) => body.extend_from_slice(&chunk),
                None => return Ok((body, reader.buf.to_vec())),
            }
        }
        panic!("decoder made no progress on {raw:?}");
    }

    #[test]
    fn chunk_lines_follow_rfc9112() {
        let good: [(&[u8], u64); 12] = [
            (b"1a", 26),
            (b"1A", 26),
            (b"000000000000001", 1),
            (b"1a;ext", 26),
            (b"1a;ext=1", 26),
            (b"1a;a=1;b;c=\"x y\"", 26),
            (b"1a ; ext = v", 26),
            (b"1a\t;\text", 26),
            (b"1a;e=\"q\\\"uote\"", 26),
            (b"1a;e=\"\"", 26),
            (b"fffffffffffffff", 0xfff_ffff_ffff_ffff),
            (b"0", 0),
        ];
        for (line, size) in good {
            assert_eq!(
                parse_chunk_line(line).map(|(n, _)| n),
                Ok(size),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        let bad: [&[u8]; 22] = [
            b"",
            b" 1a",
            b"1a ",
            b"1a\t",
            b"-1",
            b"+1",
            b"0x10",
            b"1a.0",
            b"ffffffffffffffffff",
            b"1a;",
            b"1a;=v",
            b"1a;e=",
            b"1a;e=\"open",
            b"1a;e=\"a\0b\"",
            b"1a;e=v w",
            b"1a;e\0",
            b"1a;e=\x01",
            b"1a;e\x7f",
            b"1a,e",
            b"1a;e=v;",
            b"1a;\"e\"",
            b"1a;e=\"x\"y",
        ];
        for line in bad {
            assert!(
                matches!(parse_chunk_line(line), Err(Http1Error::BadChunk(_))),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[tokio::test]
    async fn chunked_body_decodes_with_extensions_and_trailers() {
        let raw = b"5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\nX-Trailer: 1\r\nOther:\tv v\r\n\r\nNEXT";
        let (body, rest) = decode(raw, 1024).await.unwrap();
        assert_eq!(body, b"hello, world");
        assert_eq!(rest, b"NEXT", "the next pipelined request stays buffered");
    }

    /// Every shape a lenient decoder reads differently from a strict one, each refused.
    #[tokio::test]
    async fn chunked_smuggling_shapes_are_refused() {
        let many_trailers = format!("0\r\n{}\r\n", "X: 1\r\n".repeat(MAX_TRAILERS + 1));
        let long_extensions = format!("{}0\r\n\r\n", "1;e=xxxxxxxxxxxx\r\nA\r\n".repeat(1100));
        let table: [(&str, &[u8]); 15] = [
            ("bare LF in extension", b"2;\nXX\r\n0\r\n\r\n"),
            ("bare CR in extension", b"2;\rXX\r\n0\r\n\r\n"),
            ("bare LF after size", b"2\nXX\r\n0\r\n\r\n"),
            ("bare CR after size", b"2\rXX\r\n0\r\n\r\n"),
            ("bare LF after data", b"2\r\nXX\n0\r\n\r\n"),
            ("bare LF ends the body", b"2\r\nXX\r\n0\n\n"),
            ("bare LF in trailer", b"2\r\nXX\r\n0\r\nX: 1\n\r\n"),
            ("NUL in extension", b"2;e\0\r\nXX\r\n0\r\n\r\n"),
            ("chunk longer than its size", b"3\r\nhello\r\n0\r\n\r\n"),
            ("folded trailer", b"0\r\n folded: 1\r\n\r\n"),
            ("trailer without colon", b"0\r\nnocolon\r\n\r\n"),
            ("trailer with space in name", b"0\r\nBad Name: 1\r\n\r\n"),
            ("trailer with control in value", b"0\r\nX: a\x01b\r\n\r\n"),
            ("too many trailers", many_trailers.as_bytes()),
            ("too many extension bytes", long_extensions.as_bytes()),
        ];
        for (name, raw) in table {
            let result = decode(raw, 1 << 20).await;
            assert!(
                matches!(result, Err(ReadError::Http(Http1Error::BadChunk(_)))),
                "{name}: {result:?}"
            );
        }
    }

    /// A chunk size over the body limit is refused on its size line, before any data arrives.
    #[tokio::test]
    async fn chunk_size_over_the_limit_is_413_at_once() {
        let table: [&[u8]; 3] = [
            // Nothing but the size line: the decoder must not wait for the data.
            b"fffffffffffffff\r\n",
            b"40\r\n",
            // The sum of the sizes counts.
            b"20\r\n0123456789abcdef0123456789abcdef\r\n20\r\n",
        ];
        for raw in table {
            let result = decode(raw, 0x3f).await;
            assert!(
                matches!(result, Err(ReadError::Http(Http1Error::BodyTooLarge(0x3f)))),
                "{:?}: {result:?}",
                String::from_utf8_lossy(raw)
            );
        }
        assert_eq!(
            Http1Error::BodyTooLarge(1).status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let mut exact = b"3f;e\r\n".to_vec();
        exact.extend_from_slice(&[b'x'; 0x3f]);
        exact.extend_from_slice(b"\r\n0\r\n\r\n");
        let (body, _) = decode(&exact, 0x3f).await.unwrap();
        assert_eq!(body.len(), 0x3f, "exactly the limit is fine");
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
