//! HTTP/1.1 as the inside relay of a relay chain speaks it to the DMZ relay: one request written
//! whole with `Content-Length` (the body is read first, so nothing is streamed half-way), and the
//! answer read whole within bounds (`Content-Length`, chunked, or until close), strictly parsed.
//! Whether any byte of the request left is tracked, because HTTP/1.1 has no "never processed"
//! signal: once a byte went out, the request is never sent again.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest answer head accepted from the DMZ relay.
const MAX_HEAD: usize = 16 * 1024;
/// Largest answer body: APNs answers are a short JSON reason, FCM's a few KiB.
pub const MAX_BODY: usize = 64 * 1024;
/// A chunk-size or trailer line at most.
const MAX_LINE: usize = 4096;
const MAX_HEADERS: usize = 64;

/// A byte stream to the DMZ relay: TLS through a tunnel, or plain TCP.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Why an exchange on a connection failed; `written` says whether any request byte went out.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("writing the request failed after {written} bytes: {source}")]
    Write {
        written: usize,
        #[source]
        source: io::Error,
    },
    #[error("reading the answer failed: {0}")]
    Read(#[source] io::Error),
    #[error("the connection closed before the answer was complete")]
    Closed,
    #[error("unreadable answer: {0}")]
    Malformed(String),
}

impl WireError {
    /// Whether nothing of the request left: it may go on another connection.
    pub fn nothing_written(&self) -> bool {
        matches!(self, WireError::Write { written: 0, .. })
    }
}

/// What an idle connection has to say, without waiting (a live idle connection has nothing to
/// read): `None` while it is live; otherwise it is unusable, by EOF (`Ok(0)`), stray bytes, or
/// the error that ended it (a reset, a TLS alert).
pub fn idle_read<S: AsyncRead + Unpin>(io: &mut S) -> Option<io::Result<usize>> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    // EOF, stray bytes, or an error: nothing more can be told apart on this connection.
    match Pin::new(io).poll_read(&mut cx, &mut buf) {
        std::task::Poll::Pending => None,
        std::task::Poll::Ready(r) => Some(r.map(|()| buf.filled().len())),
    }
}

/// Whether `e` is the peer's TLS refusing the handshake (an alert about our certificate, or a
/// failed handshake), which TLS 1.3 reports only once the client has finished its side and
/// sent its first bytes. Such a peer never took what was written as application data.
pub fn is_handshake_refusal(e: &io::Error) -> bool {
    use rustls::AlertDescription as A;
    e.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::AlertReceived(
                    A::CertificateRequired
                        | A::BadCertificate
                        | A::UnsupportedCertificate
                        | A::CertificateRevoked
                        | A::CertificateExpired
                        | A::CertificateUnknown
                        | A::UnknownCA
                        | A::AccessDenied
                        | A::HandshakeFailure
                        // A certificate whose signature does not verify (RFC 8446 §6.2: a
                        // handshake operation, never the record layer).
                        | A::DecryptError
                )
            )
        })
}

/// The request bytes: the head with `host`, the end-to-end headers, `Content-Length`, and
/// `extra` (the relay secret, proxy credentials: never logged), then the body.
pub fn encode_request(
    method: &Method,
    target: &str,
    host: &str,
    headers: &HeaderMap,
    extra: &[(HeaderName, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        // Framing is this hop's own; `te` would need `Connection: te`, and APNs takes no trailers.
        if name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::TE
            || extra.iter().any(|(n, _)| n == name)
        {
            continue;
        }
        push_field(&mut out, name.as_str(), value.as_bytes());
    }
    for (name, value) in extra {
        push_field(&mut out, name.as_str(), value.as_bytes());
    }
    if !body.is_empty() || method == Method::POST || method == Method::PUT {
        push_field(
            &mut out,
            "content-length",
            body.len().to_string().as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes `bytes` whole, counting what left, so a failure says whether anything was sent.
pub async fn write_request<S: AsyncWrite + Unpin>(
    io: &mut S,
    bytes: &[u8],
) -> Result<(), WireError> {
    let mut written = 0;
    while written < bytes.len() {
        match poll_fn(|cx| Pin::new(&mut *io).poll_write(cx, &bytes[written..])).await {
            Ok(0) => {
                return Err(WireError::Write {
                    written,
                    source: io::ErrorKind::WriteZero.into(),
                });
            }
            Ok(n) => written += n,
            Err(source) => return Err(WireError::Write { written, source }),
        }
    }
    poll_fn(|cx| Pin::new(&mut *io).poll_flush(cx))
        .await
        .map_err(|source| WireError::Write { written, source })
}

/// An answer read whole, and whether the connection may carry another request.
pub struct Answer {
    pub response: Response<Bytes>,
    pub reusable: bool,
}

/// Reads one answer (informational ones skipped) to its end.
pub async fn read_answer<S: AsyncRead + Unpin>(
    io: &mut S,
    method: &Method,
) -> Result<Answer, WireError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let (head, len) = loop {
            if let Some(parsed) = parse_head(&buf)? {
                break parsed;
            }
            if buf.len() >= MAX_HEAD {
                return Err(WireError::Malformed(format!(
                    "answer head larger than {MAX_HEAD} bytes"
                )));
            }
            fill(io, &mut buf).await?;
        };
        buf.advance(len);
        if head.status.is_informational() {
            if head.status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(WireError::Malformed(
                    "unexpected 101 Switching Protocols".into(),
                ));
            }
            continue;
        }
        return read_body(io, buf, head, method).await;
    }
}

struct Head {
    status: StatusCode,
    http11: bool,
    headers: HeaderMap,
}

fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, WireError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(WireError::Malformed(e.to_string())),
    };
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| WireError::Malformed("invalid status code".into()))?;
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for h in response.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| WireError::Malformed(format!("invalid header name {:?}", h.name)))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| WireError::Malformed(format!("invalid value for {name}")))?;
        headers.append(name, value);
    }
    Ok(Some((
        Head {
            status,
            http11: response.version == Some(1),
            headers,
        },
        len,
    )))
}

/// Reads more bytes into `buf`; the end of the connection is an error here.
async fn fill<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> Result<(), WireError> {
    buf.reserve(4096);
    let mut chunk = [0u8; 4096];
    let mut read = ReadBuf::new(&mut chunk);
    poll_fn(|cx| Pin::new(&mut *io).poll_read(cx, &mut read))
        .await
        .map_err(WireError::Read)?;
    if read.filled().is_empty() {
        return Err(WireError::Closed);
    }
    buf.extend_from_slice(read.filled());
    Ok(())
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

async fn read_body<S: AsyncRead + Unpin>(
    io: &mut S,
    mut buf: BytesMut,
    head: Head,
    method: &Method,
) -> Result<Answer, WireError> {
    let Head {
        status,
        http11,
        mut headers,
    } = head;
    let keep_alive = http11 && !has_token(&headers, header::CONNECTION, "close");
    let no_body = *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let chunked = headers.contains_key(header::TRANSFER_ENCODING);
    let length = match headers.get(header::CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| WireError::Malformed("invalid Content-Length".into()))?,
        ),
    };
    if chunked && length.is_some() {
        return Err(WireError::Malformed(
            "both Content-Length and Transfer-Encoding".into(),
        ));
    }
    let (body, framed) = if no_body {
        (Bytes::new(), true)
    } else if chunked {
        if !has_token(&headers, header::TRANSFER_ENCODING, "chunked") {
            return Err(WireError::Malformed(
                "a Transfer-Encoding other than chunked".into(),
            ));
        }
        (read_chunked(io, &mut buf).await?, true)
    } else if let Some(n) = length {
        if n > MAX_BODY {
            return Err(WireError::Malformed(format!(
                "answer body of {n} bytes, more than {MAX_BODY}"
            )));
        }
        while buf.len() < n {
            fill(io, &mut buf).await?;
        }
        (buf.split_to(n).freeze(), true)
    } else {
        // Delimited by the end of the connection.
        loop {
            if buf.len() > MAX_BODY {
                return Err(WireError::Malformed(format!(
                    "answer body larger than {MAX_BODY} bytes"
                )));
            }
            match fill(io, &mut buf).await {
                Ok(()) => {}
                Err(WireError::Closed) => break,
                Err(e) => return Err(e),
            }
        }
        (buf.split().freeze(), false)
    };
    headers.remove(header::TRANSFER_ENCODING);
    if chunked {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(Answer {
        response,
        // Bytes beyond the answer were never asked for: the connection is not to be trusted.
        reusable: keep_alive && framed && buf.is_empty(),
    })
}

/// One CRLF-terminated line from the front of `buf`, bounded.
async fn line<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> Result<Bytes, WireError> {
    loop {
        if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = buf.split_to(at).freeze();
            buf.advance(2);
            return Ok(line);
        }
        if buf.len() > MAX_LINE {
            return Err(WireError::Malformed("chunk line too long".into()));
        }
        fill(io, buf).await?;
    }
}

async fn read_chunked<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
) -> Result<Bytes, WireError> {
    let mut body = BytesMut::new();
    loop {
        let size_line = line(io, buf).await?;
        let size_text = size_line
            .split(|b| *b == b';')
            .next()
            .and_then(|s| std::str::from_utf8(s).ok())
            .map(str::trim)
            .unwrap_or("");
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| WireError::Malformed(format!("bad chunk size {size_text:?}")))?;
        if size == 0 {
            // Trailers, until the empty line; APNs sends none, and they are not relayed.
            while !line(io, buf).await?.is_empty() {}
            return Ok(body.freeze());
        }
        if body.len() + size > MAX_BODY {
            return Err(WireError::Malformed(format!(
                "answer body larger than {MAX_BODY} bytes"
            )));
        }
        while buf.len() < size + 2 {
            fill(io, buf).await?;
        }
        body.extend_from_slice(&buf[..size]);
        if &buf[size..size + 2] != b"\r\n" {
            return Err(WireError::Malformed("chunk not followed by CRLF".into()));
        }
        buf.advance(size + 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn answer_to(bytes: &'static [u8]) -> Result<Answer, WireError> {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        server.write_all(bytes).await.unwrap();
        drop(server);
        read_answer(&mut client, &Method::POST).await
    }

    #[test]
    fn request_bytes_have_host_length_and_extra_fields_once() {
        let mut headers = HeaderMap::new();
        headers.insert("apns-topic", HeaderValue::from_static("com.example"));
        headers.insert(header::HOST, HeaderValue::from_static("evil.example"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        headers.insert("pushrelay-relay-secret", HeaderValue::from_static("forged"));
        let secret = HeaderName::from_static("pushrelay-relay-secret");
        let bytes = encode_request(
            &Method::POST,
            "/3/device/abc",
            "api.push.apple.com",
            &headers,
            &[(secret, "s3cret")],
            b"{}",
        );
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "POST /3/device/abc HTTP/1.1\r\nhost: api.push.apple.com\r\napns-topic: com.example\r\n\
             pushrelay-relay-secret: s3cret\r\ncontent-length: 2\r\n\r\n{}"
        );
    }

    #[tokio::test]
    async fn answers_by_framing() {
        let a = answer_to(b"HTTP/1.1 200 OK\r\napns-id: x\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(a.response.status(), 200);
        assert_eq!(a.response.headers()["apns-id"], "x");
        assert!(a.reusable);
        let a = answer_to(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n2;x=y\r\n1}\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        assert_eq!(a.response.status(), 400);
        assert_eq!(a.response.body().as_ref(), b"{\"a\":1}");
        assert_eq!(a.response.headers()[header::CONTENT_LENGTH], "7");
        assert!(a.reusable);
        let a = answer_to(b"HTTP/1.1 410 Gone\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}")
            .await
            .unwrap();
        assert!(!a.reusable, "Connection: close ends the connection");
        let a = answer_to(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
            .await
            .unwrap();
        assert_eq!(a.response.body().as_ref(), b"until close");
        assert!(!a.reusable);
        let a = answer_to(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\n")
            .await
            .unwrap();
        assert!(!a.reusable, "bytes nobody asked for");
    }

    #[tokio::test]
    async fn broken_answers_are_errors() {
        assert!(matches!(answer_to(b"").await, Err(WireError::Closed)));
        assert!(matches!(
            answer_to(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort").await,
            Err(WireError::Closed)
        ));
        assert!(matches!(
            answer_to(b"SSH-2.0-OpenSSH\r\n\r\n").await,
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            answer_to(
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            .await,
            Err(WireError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn a_closed_idle_connection_is_seen_dead_and_a_live_one_is_not() {
        let (mut client, server) = tokio::io::duplex(1024);
        assert!(idle_read(&mut client).is_none());
        drop(server);
        assert!(idle_read(&mut client).is_some());
    }
}
