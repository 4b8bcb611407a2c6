//! Idle APNs clients for scripts/idle-memory.sh: opens `--count` TLS + HTTP/2 connections to a
//! proxy (SNI and `:authority` the APNs host, ALPN h2), sends one push on each, as a push server
//! that has just started does, then keeps every connection open and idle until stdin closes.
//! Prints `READY <open> <failed>` once all are open.
//!
//! ```text
//! cargo run --release --example idle_clients -- --connect 127.0.0.1:8443 \
//!     --ca /tmp/ca/ca.pem --authority api.push.apple.com:443 --count 5000
//! ```

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;

#[derive(Debug, Parser)]
#[command(about = "Opens many idle TLS + HTTP/2 client connections to a proxy")]
struct Args {
    /// The proxy's address.
    #[arg(long)]
    connect: SocketAddr,
    /// PEM file of the CA that signed the proxy's certificate.
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// `:authority` of the push (host[:port]); its host is also the SNI.
    #[arg(long, default_value = "api.push.apple.com")]
    authority: String,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 50)]
    parallel: usize,
}

/// One connection: TLS, HTTP/2, one push. Returns what keeps it open.
async fn open(
    args: &Args,
    tls: &TlsConnector,
    name: &ServerName<'static>,
    n: usize,
) -> Result<(h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>), String> {
    let tcp = TcpStream::connect(args.connect)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let stream = tls
        .connect(name.clone(), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (send, conn) = h2::client::handshake(stream)
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut ready = send.ready().await.map_err(|e| format!("HTTP/2: {e}"))?;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "https://{}/3/device/{:064x}",
            args.authority, n as u128
        ))
        .header("apns-topic", "com.example.app")
        .header("apns-push-type", "alert")
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, mut body) = ready
        .send_request(request, false)
        .map_err(|e| format!("push: {e}"))?;
    body.send_data(Bytes::from(vec![b'x'; 300]), true)
        .map_err(|e| format!("push: {e}"))?;
    let response = response.await.map_err(|e| format!("push: {e}"))?;
    let mut recv = response.into_body();
    while let Some(chunk) = recv.data().await {
        let _ = chunk.map_err(|e| format!("push: {e}"))?;
    }
    Ok((ready, task))
}

fn main() -> std::process::ExitCode {
    let args = Arc::new(Args::parse());
    let mut roots = rustls::RootCertStore::empty();
    let certs = match CertificateDer::pem_file_iter(&args.ca) {
        Ok(certs) => certs,
        Err(e) => {
            eprintln!("idle_clients: cannot read {}: {e}", args.ca.display());
            return std::process::ExitCode::from(2);
        }
    };
    for cert in certs.flatten() {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b.with_root_certificates(roots).with_no_client_auth(),
        Err(e) => {
            eprintln!("idle_clients: TLS setup failed: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = TlsConnector::from(Arc::new(config));
    let host = args
        .authority
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let Ok(name) = ServerName::try_from(host) else {
        eprintln!("idle_clients: bad host in --authority");
        return std::process::ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idle_clients: runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let gate = Arc::new(Semaphore::new(args.parallel.max(1)));
        let mut tasks = Vec::with_capacity(args.count);
        for n in 0..args.count {
            let (args, tls, name, gate) = (args.clone(), tls.clone(), name.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire().await;
                open(&args, &tls, &name, n).await
            }));
        }
        let mut open_conns = Vec::with_capacity(args.count);
        let mut failed = 0;
        for task in tasks {
            match task.await {
                Ok(Ok(conn)) => open_conns.push(conn),
                Ok(Err(e)) => {
                    if failed == 0 {
                        eprintln!("idle_clients: first failure: {e}");
                    }
                    failed += 1;
                }
                Err(_) => failed += 1,
            }
        }
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "READY {} {failed}", open_conns.len());
        let _ = stdout.flush();
        // Idle until stdin closes; the connections stay open meanwhile.
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await;
        drop(open_conns);
        std::process::ExitCode::SUCCESS
    })
}
