//! A load client for the forward-proxy door (scripts/bench.sh), since h2load cannot CONNECT. It
//! does what MPNS does with `HTTPS_PROXY`: `CONNECT host:port`, TLS inside the tunnel offering
//! `h2, http/1.1`, then HTTP/2. Without `--connect` it speaks TLS to `--relay` straight away, as a
//! pre-proxy client does, so both doors can be driven by the same client in the same run.
//!
//! - `pushes`: `--connections` tunnels, `--streams` pushes in flight on each, `--requests` in all.
//! - `tunnels`: `--requests` new tunnels one after another on each of `--connections` tasks, each
//!   CONNECT + TLS + an HTTP/2 PING round trip (so the relay has finished its side), then closed;
//!   `--resume` shares one TLS session cache so every handshake after the first resumes.
//!
//! Prints one line: `ok=<n> failed=<n> elapsed_s=<s> per_s=<rate> resumed=<n>`.
//!
//! ```text
//! cargo run --release --example connect_load -- pushes --relay 127.0.0.1:3128 \
//!     --connect api.push.apple.com:443 --ca /tmp/ca/ca.pem --requests 20000
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Pushes,
    Tunnels,
}

#[derive(Debug, Parser)]
#[command(about = "Load client for pushrelay's forward-proxy door (CONNECT + TLS + HTTP/2)")]
struct Args {
    mode: Mode,
    /// The relay's listener.
    #[arg(long)]
    relay: SocketAddr,
    /// CONNECT to this host:port first; without it, TLS straight to --relay (pre-proxy).
    #[arg(long)]
    connect: Option<String>,
    /// SNI and :authority host.
    #[arg(long, default_value = "api.push.apple.com")]
    host: String,
    /// CA certificate (PEM) the relay's certificates come from.
    #[arg(long)]
    ca: PathBuf,
    /// Concurrent connections (pushes) or concurrent tunnel openers (tunnels).
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// Pushes in flight per connection.
    #[arg(long, default_value_t = 10)]
    streams: usize,
    /// Pushes (pushes) or tunnels (tunnels) in all.
    #[arg(long, default_value_t = 10000)]
    requests: u64,
    /// Share a TLS session cache so handshakes resume (tunnels).
    #[arg(long)]
    resume: bool,
    /// Request body (default: a 300-byte APNs payload).
    #[arg(long)]
    payload: Option<PathBuf>,
    /// Bound on the whole run, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("connect_load: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("connect_load: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> Result<(), Error> {
    let args = Arc::new(args);
    let tls = tls_config(&args)?;
    let payload = match &args.payload {
        Some(path) => Bytes::from(std::fs::read(path)?),
        None => Bytes::from(format!(
            "{{\"aps\":{{\"alert\":\"bench\"}},\"pad\":\"{}\"}}",
            "x".repeat(264)
        )),
    };
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let work = async {
        match args.mode {
            Mode::Pushes => pushes(&args, &tls, payload, &counters).await,
            Mode::Tunnels => tunnels(&args, &tls, &counters).await,
        }
    };
    tokio::time::timeout(Duration::from_secs(args.timeout), work)
        .await
        .map_err(|_| format!("did not finish within {}s", args.timeout))??;
    let elapsed = started.elapsed().as_secs_f64();
    let ok = counters.ok.load(Ordering::Relaxed);
    println!(
        "ok={ok} failed={} elapsed_s={elapsed:.3} per_s={:.0} resumed={}",
        counters.failed.load(Ordering::Relaxed),
        ok as f64 / elapsed,
        counters.resumed.load(Ordering::Relaxed),
    );
    Ok(())
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
    resumed: AtomicU64,
    next: AtomicU64,
}

impl Counters {
    /// The next unit of work, while there is some.
    fn take(&self, total: u64) -> bool {
        self.next.fetch_add(1, Ordering::Relaxed) < total
    }
}

fn tls_config(args: &Args) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&args.ca)? {
        roots.add(cert?)?;
    }
    let mut provider = rustls::crypto::ring::default_provider();
    // Go's crypto/tls (MPNS) puts AES-128-GCM-SHA256 first on machines with AES instructions.
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if matches!(args.mode, Mode::Tunnels) && !args.resume {
        config.resumption = Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// TCP to the relay, the CONNECT (when asked for) and TLS inside.
async fn open(args: &Args, tls: &Arc<rustls::ClientConfig>) -> Result<TlsStream<TcpStream>, Error> {
    let mut tcp = TcpStream::connect(args.relay).await?;
    tcp.set_nodelay(true)?;
    if let Some(target) = &args.connect {
        let head = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: Go-http-client/1.1\r\n\r\n"
        );
        tcp.write_all(head.as_bytes()).await?;
        let mut reply = Vec::with_capacity(64);
        let mut byte = [0u8; 1];
        while !reply.ends_with(b"\r\n\r\n") {
            if tcp.read(&mut byte).await? == 0 || reply.len() > 8192 {
                return Err("the relay closed before answering CONNECT".into());
            }
            reply.push(byte[0]);
        }
        if !reply.starts_with(b"HTTP/1.1 200 ") {
            return Err(format!("CONNECT refused: {}", String::from_utf8_lossy(&reply)).into());
        }
    }
    let name = ServerName::try_from(args.host.clone())?;
    Ok(TlsConnector::from(tls.clone()).connect(name, tcp).await?)
}

async fn pushes(
    args: &Arc<Args>,
    tls: &Arc<rustls::ClientConfig>,
    payload: Bytes,
    counters: &Arc<Counters>,
) -> Result<(), Error> {
    let mut conns = Vec::new();
    for _ in 0..args.connections {
        let stream = open(args, tls).await?;
        let (send, conn) = h2::client::handshake(stream).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        conns.push(send);
    }
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "https://{}/3/device/5f3c2a1e9b8d7c6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a29",
            args.host
        ))
        .header("apns-topic", "com.example.bench")
        .header("apns-push-type", "alert")
        .header("content-type", "application/json; charset=utf-8")
        .body(())?;
    let mut tasks = tokio::task::JoinSet::new();
    for send in conns {
        for _ in 0..args.streams {
            let (send, request, payload, counters, total) = (
                send.clone(),
                request.clone(),
                payload.clone(),
                counters.clone(),
                args.requests,
            );
            tasks.spawn(async move {
                while counters.take(total) {
                    match push(send.clone(), request.clone(), payload.clone()).await {
                        Ok(true) => counters.ok.fetch_add(1, Ordering::Relaxed),
                        _ => counters.failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// One push; true when it was answered 200.
async fn push(
    send: h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
    payload: Bytes,
) -> Result<bool, Error> {
    let mut send = send.ready().await?;
    let (response, mut body) = send.send_request(request, false)?;
    body.send_data(payload, true)?;
    let response = response.await?;
    let ok = response.status() == http::StatusCode::OK;
    let mut recv = response.into_body();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    Ok(ok)
}

async fn tunnels(
    args: &Arc<Args>,
    tls: &Arc<rustls::ClientConfig>,
    counters: &Arc<Counters>,
) -> Result<(), Error> {
    if args.resume {
        // Prime the session cache, so every counted tunnel resumes.
        one_tunnel(args, tls).await?;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.connections {
        let (args, tls, counters) = (args.clone(), tls.clone(), counters.clone());
        tasks.spawn(async move {
            while counters.take(args.requests) {
                match one_tunnel(&args, &tls).await {
                    Ok(resumed) => {
                        counters.ok.fetch_add(1, Ordering::Relaxed);
                        if resumed {
                            counters.resumed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// CONNECT, TLS and an HTTP/2 PING round trip; true when the TLS session was resumed.
async fn one_tunnel(args: &Args, tls: &Arc<rustls::ClientConfig>) -> Result<bool, Error> {
    let stream = open(args, tls).await?;
    let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let (_send, mut conn) = h2::client::handshake(stream).await?;
    let mut ping = conn.ping_pong().ok_or("no ping_pong")?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    ping.ping(h2::Ping::opaque()).await?;
    driver.abort();
    Ok(resumed)
}
