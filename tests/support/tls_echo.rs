//! A TLS server standing in for FCM behind a blind tunnel: its certificate comes from a CA of its
//! own (not the relay's), and it echoes every byte back, so a test sees both whose certificate it
//! got and that the bytes went through unaltered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::forward::Tunnel;
use super::pki::TestPki;
use super::within;

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

    /// Opens a blind tunnel to this server through the forward-proxy relay at `relay`, checks the
    /// certificate is this server's own and that every byte value comes back unaltered; returns
    /// how many bytes went each way.
    pub async fn exchange_through(&self, relay: SocketAddr) -> usize {
        let fcm = self;
        let tunnel = Tunnel::open(relay, &fcm.target(), None).await;
        assert_eq!(tunnel.status, 200, "{}", tunnel.head);
        // Trusting only the FCM stand-in's CA: a certificate from pushrelay's CA would fail here.
        let mut tls = within(
            10,
            "TLS with the FCM stand-in",
            tunnel.tls(FCM_HOST, fcm.pki.client_config(&[b"h2", b"http/1.1"])),
        )
        .await
        .unwrap();
        let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let issued_by_fcm_ca = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(fcm.pki.roots()),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        assert!(
            issued_by_fcm_ca
                .verify_server_cert(
                    &served,
                    &[],
                    &ServerName::try_from(FCM_HOST).unwrap(),
                    &[],
                    rustls::pki_types::UnixTime::now(),
                )
                .is_ok()
        );
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 256) as u8).collect();
        tls.write_all(&data).await.unwrap();
        let mut back = vec![0u8; data.len()];
        within(10, "echo", tls.read_exact(&mut back)).await.unwrap();
        assert_eq!(back, data);
        drop(tls);
        data.len()
    }
}
