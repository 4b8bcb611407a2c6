//! HTTP CONNECT through the corporate proxy. Any 2xx opens the tunnel; anything else keeps the
//! proxy's own status line, because admins debug proxies by the proxy's answer. The reply head is
//! bounded (8 KiB) and every step has a timeout. Credentials go as Basic auth and are never logged.

use std::io;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::config::ProxyUrl;

/// Largest CONNECT reply head accepted from a proxy.
pub const MAX_REPLY_BYTES: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot connect to proxy {proxy}: {source}")]
    Connect {
        proxy: String,
        #[source]
        source: io::Error,
    },
    #[error("proxy {proxy} did not accept a TCP connection within {after:?}")]
    ConnectTimeout { proxy: String, after: Duration },
    #[error("proxy {proxy} did not answer CONNECT {target} within {after:?}")]
    ReplyTimeout {
        proxy: String,
        target: String,
        after: Duration,
    },
    #[error("proxy {proxy} refused CONNECT {target}: {status} {reason}{}", challenge(.headers))]
    Refused {
        proxy: String,
        target: String,
        status: u16,
        reason: String,
        /// The proxy's reply headers (bounded by the reply size), e.g. `Proxy-Authenticate`.
        headers: Vec<(String, String)>,
    },
    #[error("proxy {proxy} sent an unreadable CONNECT reply: {detail}")]
    Malformed { proxy: String, detail: String },
    #[error("proxy {proxy} closed the connection before answering CONNECT {target}")]
    Closed { proxy: String, target: String },
    #[error("I/O with proxy {proxy}: {source}")]
    Io {
        proxy: String,
        #[source]
        source: io::Error,
    },
}

/// The authentication schemes a proxy asks for: pushrelay speaks Basic only, so a proxy that
/// offers only NTLM or Negotiate is worth saying so.
fn challenge(headers: &[(String, String)]) -> String {
    let schemes: Vec<&str> = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("proxy-authenticate"))
        .map(|(_, v)| v.as_str())
        .collect();
    if schemes.is_empty() {
        String::new()
    } else {
        format!(" (Proxy-Authenticate: {})", schemes.join(", "))
    }
}

impl TunnelError {
    /// The proxy's own HTTP status, when it answered with one.
    pub fn proxy_status(&self) -> Option<u16> {
        match self {
            TunnelError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What the proxy answered to a CONNECT that opened.
#[derive(Debug, Clone)]
pub struct TunnelReply {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

/// Connects to `proxy` and opens a tunnel to `target` (`host:port`). `step_timeout` bounds the TCP
/// connect and, separately, the wait for the proxy's reply.
pub async fn open(
    proxy: &ProxyUrl,
    target: &str,
    step_timeout: Duration,
) -> Result<(TcpStream, TunnelReply), TunnelError> {
    let shown = proxy.to_string();
    let mut stream = match timeout(step_timeout, TcpStream::connect(proxy.address())).await {
        Err(_) => {
            return Err(TunnelError::ConnectTimeout {
                proxy: shown,
                after: step_timeout,
            });
        }
        Ok(Err(source)) => {
            return Err(TunnelError::Connect {
                proxy: shown,
                source,
            });
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let reply = match timeout(step_timeout, handshake(&mut stream, proxy, target)).await {
        Err(_) => {
            return Err(TunnelError::ReplyTimeout {
                proxy: shown,
                target: target.to_owned(),
                after: step_timeout,
            });
        }
        Ok(r) => r?,
    };
    Ok((stream, reply))
}

/// The CONNECT request bytes; the credentials are in there, so this never reaches a log.
fn request(proxy: &ProxyUrl, target: &str) -> Vec<u8> {
    let mut req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: pushrelay/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(user) = &proxy.username {
        let pass = proxy.password.as_ref().map(|p| p.expose()).unwrap_or("");
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        req.push_str("Proxy-Authorization: Basic ");
        req.push_str(&token);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// Sends CONNECT on `stream` and reads the reply head.
pub async fn handshake<S>(
    stream: &mut S,
    proxy: &ProxyUrl,
    target: &str,
) -> Result<TunnelReply, TunnelError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io_err = |source| TunnelError::Io {
        proxy: proxy.to_string(),
        source,
    };
    stream
        .write_all(&request(proxy, target))
        .await
        .map_err(io_err)?;
    stream.flush().await.map_err(io_err)?;

    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        // Read no further than the reply head's bound; a tunnel's first bytes belong to TLS.
        let room = (MAX_REPLY_BYTES - buf.len()).min(chunk.len());
        if room == 0 {
            return Err(TunnelError::Malformed {
                proxy: proxy.to_string(),
                detail: format!("reply head larger than {MAX_REPLY_BYTES} bytes"),
            });
        }
        let n = stream.read(&mut chunk[..room]).await.map_err(io_err)?;
        if n == 0 {
            return Err(TunnelError::Closed {
                proxy: proxy.to_string(),
                target: target.to_owned(),
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(len)) => {
                let status = response.code.unwrap_or(0);
                let reason = response.reason.unwrap_or("").to_owned();
                let headers = response
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                if !(200..300).contains(&status) {
                    return Err(TunnelError::Refused {
                        proxy: proxy.to_string(),
                        target: target.to_owned(),
                        status,
                        reason,
                        headers,
                    });
                }
                if len < buf.len() {
                    // The origin speaks only after our ClientHello: bytes here are not from it.
                    return Err(TunnelError::Malformed {
                        proxy: proxy.to_string(),
                        detail: "data after the CONNECT reply, before the tunnel was used".into(),
                    });
                }
                return Ok(TunnelReply {
                    status,
                    reason,
                    headers,
                });
            }
            Err(e) => {
                return Err(TunnelError::Malformed {
                    proxy: proxy.to_string(),
                    detail: e.to_string(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(url: &str) -> ProxyUrl {
        url.parse().unwrap()
    }

    #[test]
    fn connect_request_bytes_carry_basic_auth() {
        let req = request(
            &proxy("http://user:secret@proxy:3128"),
            "api.push.apple.com:443",
        );
        let text = String::from_utf8(req).unwrap();
        assert!(text.starts_with(
            "CONNECT api.push.apple.com:443 HTTP/1.1\r\nHost: api.push.apple.com:443\r\n"
        ));
        assert!(
            text.contains("Proxy-Authorization: Basic dXNlcjpzZWNyZXQ=\r\n"),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\n"));
        let anon = String::from_utf8(request(&proxy("http://proxy:3128"), "h:443")).unwrap();
        assert!(!anon.contains("Proxy-Authorization"));
    }

    async fn reply_to(bytes: &'static [u8]) -> Result<TunnelReply, TunnelError> {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let server_task = tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = server.read(&mut buf).await;
            server.write_all(bytes).await.unwrap();
            // End of the reply: the client sees EOF after the bytes.
            server.shutdown().await.unwrap();
        });
        let result = handshake(&mut client, &proxy("http://proxy:3128"), "h:443").await;
        drop(client);
        server_task.await.unwrap();
        result
    }

    #[tokio::test]
    async fn proxy_replies_table() {
        let ok = reply_to(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            (ok.status, ok.reason.as_str()),
            (200, "Connection established")
        );
        let ok10 = reply_to(b"HTTP/1.0 200 OK\r\nVia: squid\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(ok10.headers, vec![("Via".to_string(), "squid".to_string())]);
        assert_eq!(
            reply_to(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap()
                .status,
            204
        );

        let refused = reply_to(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n",
        )
        .await
        .unwrap_err();
        assert_eq!(refused.proxy_status(), Some(407));
        assert!(
            refused
                .to_string()
                .contains("407 Proxy Authentication Required"),
            "{refused}"
        );
        assert!(
            refused.to_string().ends_with("(Proxy-Authenticate: Basic)"),
            "the proxy's challenge is kept: {refused}"
        );
        let forbidden = reply_to(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            .await
            .unwrap_err();
        assert_eq!(forbidden.proxy_status(), Some(403));

        assert!(matches!(
            reply_to(b"").await,
            Err(TunnelError::Closed { .. })
        ));
        assert!(matches!(
            reply_to(b"SSH-2.0-OpenSSH\r\n\r\n").await,
            Err(TunnelError::Malformed { .. })
        ));
        assert!(matches!(
            reply_to(b"HTTP/1.1 200 OK\r\n\r\nextra").await,
            Err(TunnelError::Malformed { .. })
        ));
    }

    #[tokio::test]
    async fn oversized_reply_is_refused() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = server.read(&mut buf).await;
            let _ = server.write_all(b"HTTP/1.1 200 OK\r\n").await;
            let filler = format!("X-Filler: {}\r\n", "a".repeat(1000));
            for _ in 0..10 {
                if server.write_all(filler.as_bytes()).await.is_err() {
                    break;
                }
            }
            let _ = server.read(&mut buf).await;
        });
        let err = handshake(&mut client, &proxy("http://proxy:3128"), "h:443")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("larger than 8192"), "{err}");
    }
}
