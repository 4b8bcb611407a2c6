//! A raw HTTP/1.1 client: writes exactly the bytes a test gives and reads answers back with their
//! framing (Content-Length, chunked, or until close), so hostile shapes reach the relay unaltered.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct RawAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn reason(&self) -> Option<String> {
        let text = std::str::from_utf8(&self.body).ok()?;
        let start = text.find("\"reason\":\"")? + 10;
        let end = text[start..].find('"')? + start;
        Some(text[start..end].to_owned())
    }
}

/// A raw HTTP/1.1 connection over TCP, or over any stream (TLS with ALPN http/1.1).
pub struct RawConn<S = TcpStream> {
    pub stream: S,
    buf: Vec<u8>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> Self {
        RawConn::over(TcpStream::connect(addr).await.unwrap())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawConn<S> {
    pub fn over(stream: S) -> Self {
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!("no answer from the relay within 10s"),
        }
    }

    /// Reads one answer; `None` when the connection closed first.
    pub async fn read_answer(&mut self) -> Option<RawAnswer> {
        let (status, headers, head_len) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut hs);
            match resp.parse(&self.buf).expect("valid HTTP/1.1 answer head") {
                httparse::Status::Complete(len) => {
                    let headers = resp
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect::<Vec<_>>();
                    break (resp.code.unwrap(), headers, len);
                }
                httparse::Status::Partial => {
                    if !self.fill().await {
                        return None;
                    }
                }
            }
        };
        self.buf.drain(..head_len);
        let answer = |body| RawAnswer {
            status,
            headers: headers.clone(),
            body,
        };
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        if status == 100 || status == 204 {
            return Some(answer(Vec::new()));
        }
        if let Some(len) = find("content-length") {
            let len: usize = len.trim().parse().unwrap();
            while self.buf.len() < len {
                assert!(
                    self.fill().await,
                    "connection closed inside a Content-Length body"
                );
            }
            return Some(answer(self.buf.drain(..len).collect()));
        }
        if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break p;
                    }
                    assert!(self.fill().await, "connection closed inside a chunked body");
                };
                let size =
                    usize::from_str_radix(std::str::from_utf8(&self.buf[..line_end]).unwrap(), 16)
                        .unwrap();
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    assert!(self.fill().await, "connection closed inside a chunk");
                }
                body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    return Some(answer(body));
                }
            }
        }
        while self.fill().await {}
        Some(answer(std::mem::take(&mut self.buf)))
    }

    /// Whether the relay closed the connection (reads EOF within 10 s).
    pub async fn closed(&mut self) -> bool {
        !self.fill().await && self.buf.is_empty()
    }
}

/// One request on a fresh connection, and its answer.
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> RawAnswer {
    let mut conn = RawConn::connect(addr).await;
    conn.send(bytes).await;
    conn.read_answer().await.expect("an answer before close")
}

/// One push as HTTP/1.1 on `io` (e.g. TLS with ALPN http/1.1), with `Connection: close`; the
/// whole answer as text, read until the relay closes.
pub async fn push_over<IO>(mut io: IO, token: &str, payload: &str) -> String
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = format!(
        "POST /3/device/{token} HTTP/1.1\r\nHost: api.push.apple.com\r\napns-topic: com.example.app\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    io.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), io.read_to_string(&mut answer))
        .await
        .expect("an answer within 10s")
        .unwrap();
    answer
}
