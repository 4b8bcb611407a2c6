//! A fast APNs lookalike for benchmarks (scripts/bench.sh): TLS with a certificate for the APNs
//! hosts signed by pushrelay's private CA, HTTP/2 through the `h2` server API, and for every
//! `POST /3/device/<token>` a 200 with `apns-id` and an empty body, as Apple answers a good push.
//! A client that asks for HTTP/1.1 by ALPN gets the same answers over HTTP/1.1 (hyper), which
//! Apple does not offer: the benchmark's baseline for HTTP/1.1-shaped load.
//! Anything else gets Apple's JSON error (404 BadPath, 405 MethodNotAllowed).
//!
//! It binds 127.0.0.1 only and prints `PORT=<n>` as its first line on stdout.
//!
//! ```text
//! target/release/pushrelay ca init --dir /tmp/ca
//! cargo run --release --example fake_apns -- --ca-dir /tmp/ca --port 0
//! ```

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use clap::Parser;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use pushrelay::relay::body::RelayBody;
use pushrelay::tls::pki::{CA_CERT_FILE, CA_KEY_FILE, Ca};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// Names on the origin's certificate: the APNs hosts only, since `pushrelay ca init` makes a CA
/// name-constrained to them (a leaf naming localhost or an IP address would fail verification);
/// proxies in front of it verify it by SNI.
const NAMES: [&str; 3] = [
    "api.push.apple.com",
    "api.sandbox.push.apple.com",
    "api.development.push.apple.com",
];

/// Streams a client may open at once on one connection, as APNs allows.
const MAX_STREAMS: u32 = 1000;

#[derive(Debug, Parser)]
#[command(about = "Fake APNs origin for benchmarks: TLS + HTTP/2 on 127.0.0.1, 200 to every push")]
struct Args {
    /// Directory holding ca.pem and ca.key, as `pushrelay ca init --dir` writes them.
    #[arg(long, value_name = "DIR")]
    ca_dir: PathBuf,
    /// Port on 127.0.0.1; 0 picks a free one (printed as PORT=<n>).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Runtime worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let ca = match Ca::from_files(
        &args.ca_dir.join(CA_CERT_FILE),
        &args.ca_dir.join(CA_KEY_FILE),
    ) {
        Ok(ca) => ca,
        Err(e) => {
            eprintln!("fake_apns: cannot load the CA: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let names: Vec<String> = NAMES.iter().map(|n| n.to_string()).collect();
    let leaf = match ca.issue(&names) {
        Ok(leaf) => leaf,
        Err(e) => {
            eprintln!("fake_apns: cannot issue the origin certificate: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_no_client_auth()
                .with_single_cert(leaf.chain, leaf.key)
        });
    let mut tls = match tls {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("fake_apns: TLS setup failed: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = args.threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = match runtime.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fake_apns: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("fake_apns: cannot bind {addr}: {e}");
                return std::process::ExitCode::from(1);
            }
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "PORT={port}");
        let _ = stdout.flush();
        let ids = Arc::new(AtomicU64::new(0));
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("fake_apns: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(serve(tcp, acceptor.clone(), ids.clone()));
        }
    })
}

async fn serve(tcp: TcpStream, acceptor: TlsAcceptor, ids: Arc<AtomicU64>) {
    let _ = tcp.set_nodelay(true);
    let Ok(stream) = acceptor.accept(tcp).await else {
        return;
    };
    if stream.get_ref().1.alpn_protocol() == Some(b"http/1.1") {
        // Apple has no HTTP/1.1; this is the baseline for clients that speak only HTTP/1.1.
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let id = ids.fetch_add(1, Ordering::Relaxed);
            async move {
                let (parts, mut body) = req.into_parts();
                while let Some(frame) =
                    std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                {
                    if frame.is_err() {
                        break;
                    }
                }
                let (head, reason) = verdict(&parts, id);
                let body = match reason {
                    None => RelayBody::empty(),
                    Some(reason) => RelayBody::full(format!("{{\"reason\":\"{reason}\"}}")),
                };
                Ok::<_, std::convert::Infallible>(Response::from_parts(head.into_parts().0, body))
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
        return;
    }
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(MAX_STREAMS)
        .initial_window_size(1 << 20)
        .initial_connection_window_size(16 << 20);
    let Ok(mut conn) = builder.handshake::<_, Bytes>(stream).await else {
        return;
    };
    while let Some(Ok((req, respond))) = conn.accept().await {
        let id = ids.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(answer(req, respond, id));
    }
}

/// Apple's answer to a request: the head (status, `apns-id`, and for errors the JSON type and
/// length) and the error reason, if any.
fn verdict(parts: &http::request::Parts, id: u64) -> (Response<()>, Option<&'static str>) {
    let (status, reason) = if parts.method != Method::POST {
        (StatusCode::METHOD_NOT_ALLOWED, Some("MethodNotAllowed"))
    } else if !parts.uri.path().starts_with("/3/device/") {
        (StatusCode::NOT_FOUND, Some("BadPath"))
    } else {
        (StatusCode::OK, None)
    };
    let apns_id = match parts.headers.get("apns-id") {
        Some(v) => v.clone(),
        None => http::HeaderValue::try_from(format!(
            "00000000-0000-4000-8000-{:012x}",
            id & 0xffff_ffff_ffff
        ))
        .unwrap_or(http::HeaderValue::from_static(
            "00000000-0000-4000-8000-000000000000",
        )),
    };
    let mut head = Response::new(());
    *head.status_mut() = status;
    let headers = head.headers_mut();
    headers.insert("apns-id", apns_id);
    if let Some(reason) = reason {
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        headers.insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(reason.len() + 13),
        );
    }
    (head, reason)
}

async fn answer(req: Request<h2::RecvStream>, mut respond: SendResponse<Bytes>, id: u64) {
    let (parts, mut body) = req.into_parts();
    // Apple answers once the whole payload is in.
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return };
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let (head, reason) = verdict(&parts, id);
    match reason {
        None => {
            let _ = respond.send_response(head, true);
        }
        Some(reason) => {
            if let Ok(mut stream) = respond.send_response(head, false) {
                let _ = stream.send_data(Bytes::from(format!("{{\"reason\":\"{reason}\"}}")), true);
            }
        }
    }
}
