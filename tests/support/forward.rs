//! A client of the forward-proxy door as MPNS is one (Go's net/http with a proxy): the CONNECT
//! head it writes, the reply read up to its blank line, then TLS inside the tunnel offering
//! `h2, http/1.1`.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::client::H2Client;

/// The CONNECT head Go's transport writes: `Host`, its User-Agent, and Basic credentials on the
/// first CONNECT when the proxy URL has them.
pub fn connect_head(target: &str, creds: Option<(&str, &str)>) -> String {
    let mut head = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: Go-http-client/1.1\r\n"
    );
    if let Some((user, pass)) = creds {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        head.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// A CONNECT sent and its reply head read; the stream is the tunnel when `status` is 200.
pub struct Tunnel {
    pub stream: TcpStream,
    pub status: u16,
    /// The reply head, as sent.
    pub head: String,
    /// Bytes after the reply head (a refusal's body).
    pub rest: Vec<u8>,
}

impl Tunnel {
    pub async fn open(proxy: SocketAddr, target: &str, creds: Option<(&str, &str)>) -> Tunnel {
        Self::open_with(proxy, connect_head(target, creds).as_bytes()).await
    }

    /// Sends `bytes` as they are and reads the reply head.
    pub async fn open_with(proxy: SocketAddr, bytes: &[u8]) -> Tunnel {
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "proxy closed before a reply head: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Tunnel {
            stream,
            status,
            head,
            rest: buf[end..].to_vec(),
        }
    }

    /// TLS inside the tunnel with SNI `sni`.
    pub async fn tls(
        self,
        sni: &str,
        config: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        assert_eq!(self.status, 200, "{}", self.head);
        let name = ServerName::try_from(sni.to_owned()).map_err(std::io::Error::other)?;
        TlsConnector::from(config).connect(name, self.stream).await
    }

    /// The rest of the reply body, read until the proxy closes.
    pub async fn body_until_close(&mut self) -> Vec<u8> {
        let mut body = std::mem::take(&mut self.rest);
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            self.stream.read_to_end(&mut body),
        )
        .await
        .expect("the proxy closes after a refusal");
        body
    }
}

/// An HTTP/2 client through `proxy` to `target` (`host:port`), TLS offering `h2, http/1.1` as
/// Go does; `None` credentials send none.
pub async fn h2_through(
    proxy: SocketAddr,
    target: &str,
    creds: Option<(&str, &str)>,
    config: Arc<rustls::ClientConfig>,
) -> H2Client {
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    let tunnel = Tunnel::open(proxy, target, creds).await;
    let tls = tunnel.tls(host, config).await.unwrap();
    let alpn = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
    H2Client::over(tls, alpn).await.unwrap()
}
