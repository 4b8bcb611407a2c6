//! A TLS server standing in for FCM behind a blind tunnel: its certificate comes from a CA of its
//! own (not the relay's), and it echoes every byte back, so a test sees both whose certificate it
//! got and that the bytes went through unaltered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::pki::TestPki;

pub const FCM_HOST: &str = "fcm.googleapis.com";

pub struct TlsEcho {
    pub addr: SocketAddr,
    /// The CA its certificate is from.
    pub pki: TestPki,
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsEcho {
    pub async fn start() -> TlsEcho {
        let pki = TestPki::new();
        let tls = TlsAcceptor::from(pki.server_config(&[FCM_HOST], &[b"h2", b"http/1.1"]));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Ok(mut stream) = tls.accept(tcp).await else {
                        return;
                    };
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        let _ = stream.flush().await;
                    }
                });
            }
        });
        TlsEcho {
            addr,
            pki,
            connections,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn target(&self) -> String {
        format!("{FCM_HOST}:{}", self.port())
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}
