//! A real HTTP/2 client (the `h2` crate over rustls) that reaches the relay as an APNs client does:
//! TCP to the relay's address, TLS with SNI = the APNs host, ALPN h2 or no ALPN at all.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use super::pki::TestPki;

pub struct H2Client {
    send: h2::client::SendRequest<Bytes>,
    pub alpn: Option<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
    /// How the connection ended, once it has: the relay's GOAWAY reason, for one.
    pub ended: std::sync::Arc<std::sync::Mutex<Option<h2::Error>>>,
}

impl Drop for H2Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An answer, read to its end.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Answer {
    pub fn reason(&self) -> Option<String> {
        let text = std::str::from_utf8(&self.body).ok()?;
        let start = text.find("\"reason\":\"")? + 10;
        let end = text[start..].find('"')? + start;
        Some(text[start..end].to_owned())
    }
}

/// Options for how the client connects.
pub struct Connect<'a> {
    pub relay: SocketAddr,
    pub sni: &'a str,
    pub alpn: bool,
    pub from: Option<IpAddr>,
    /// The client's receive window per stream; 0: a client that never reads its answers.
    pub window: Option<u32>,
}

impl<'a> Connect<'a> {
    pub fn new(relay: SocketAddr) -> Self {
        Connect {
            relay,
            sni: "api.push.apple.com",
            alpn: true,
            from: None,
            window: None,
        }
    }
}

pub async fn tcp_from(from: Option<IpAddr>, to: SocketAddr) -> std::io::Result<TcpStream> {
    match from {
        Some(ip) => {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(to).await
        }
        None => TcpStream::connect(to).await,
    }
}

impl H2Client {
    pub async fn connect(pki: &TestPki, relay: SocketAddr) -> Self {
        Self::connect_with(pki, Connect::new(relay)).await.unwrap()
    }

    pub async fn connect_with(pki: &TestPki, c: Connect<'_>) -> std::io::Result<Self> {
        let alpn: &[&[u8]] = if c.alpn { &[b"h2"] } else { &[] };
        Self::connect_tls(pki.client_config(alpn), c).await
    }

    pub async fn connect_tls(
        config: std::sync::Arc<rustls::ClientConfig>,
        c: Connect<'_>,
    ) -> std::io::Result<Self> {
        let tcp = tcp_from(c.from, c.relay).await?;
        let name = ServerName::try_from(c.sni.to_owned()).map_err(std::io::Error::other)?;
        let tls = TlsConnector::from(config).connect(name, tcp).await?;
        let alpn = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
        Self::over_with(tls, alpn, c.window).await
    }

    /// HTTP/2 over an established stream (e.g. TLS inside a CONNECT tunnel).
    pub async fn over<IO>(io: IO, alpn: Option<Vec<u8>>) -> std::io::Result<Self>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        Self::over_with(io, alpn, None).await
    }

    /// As `over`, with the client's initial stream window (`None`: h2's default).
    async fn over_with<IO>(
        io: IO,
        alpn: Option<Vec<u8>>,
        window: Option<u32>,
    ) -> std::io::Result<Self>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut builder = h2::client::Builder::new();
        if let Some(window) = window {
            builder.initial_window_size(window);
        }
        let (send, conn) = builder.handshake(io).await.map_err(std::io::Error::other)?;
        let ended = std::sync::Arc::new(std::sync::Mutex::new(None));
        let end = ended.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                *end.lock().unwrap() = Some(e);
            }
        });
        Ok(H2Client {
            send,
            alpn,
            task,
            ended,
        })
    }

    /// Sends `req` with `body` and reads the whole answer.
    pub async fn send(&self, req: Request<()>, body: Bytes) -> Result<Answer, h2::Error> {
        let mut send = self.send.clone().ready().await?;
        let (response, mut stream) = send.send_request(req, body.is_empty())?;
        if !body.is_empty() {
            stream.send_data(body, true)?;
        }
        read_answer(response).await
    }

    /// Opens a stream with `req`'s head and no end: the test sends the body (or not) itself.
    pub async fn open(
        &self,
        req: Request<()>,
    ) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), h2::Error> {
        let mut send = self.send.clone().ready().await?;
        send.send_request(req, false)
    }

    /// Waits until the relay has closed this connection (after a GOAWAY, once no stream is open).
    pub async fn closed(&mut self) {
        let _ = (&mut self.task).await;
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.task.is_finished()
    }

    /// A standard push with the usual APNs headers.
    pub async fn push(&self, token: &str, payload: &str) -> Answer {
        self.send(
            push_request("api.push.apple.com", token),
            Bytes::from(payload.to_owned()),
        )
        .await
        .unwrap()
    }
}

/// A push request as APNs clients send it: `:authority` without a port and the `apns-*` headers.
pub fn push_request(authority: &str, token: &str) -> Request<()> {
    Request::builder()
        .method("POST")
        .uri(format!("https://{authority}/3/device/{token}"))
        .header("apns-topic", "com.example.app")
        .header("apns-push-type", "alert")
        .header("apns-priority", "10")
        .header("apns-expiration", "0")
        .header(
            "authorization",
            "bearer eyJhbGciOiJFUzI1NiIsImtpZCI6IkFCQzEyMyJ9.eyJpc3MiOiJERUYxMjMifQ.c2ln",
        )
        .body(())
        .unwrap()
}

/// Waits for the answer's head and reads its body to the end.
pub async fn read_answer(response: h2::client::ResponseFuture) -> Result<Answer, h2::Error> {
    let response = response.await?;
    let (parts, mut recv) = response.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await?;
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: Bytes::from(data),
        trailers,
    })
}

/// An unsigned bearer JWT from issuer `iss`, key id K1 (pushrelay reads it, never verifies it).
pub fn bearer(iss: &str) -> String {
    use base64::Engine;
    let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "bearer {}.{}.c2ln",
        e(r#"{"alg":"ES256","kid":"K1"}"#),
        e(&format!(r#"{{"iss":"{iss}"}}"#))
    )
}
