//! pushrelay's own HTTP/2 client driver against independent servers: the fake APNs origin (the
//! h2 crate, over TLS, with live SETTINGS changes, GOAWAY and REFUSED_STREAM) and `nghttpd`
//! (nghttp2, h2c, with padding, tiny flow-control windows and a low stream limit), and HAProxy
//! (TLS, its own SETTINGS and windows, a real GOAWAY on soft stop) in front of the origin.

mod support;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use pushrelay::h2client::driver::{self, Client, DriverConfig};
use pushrelay::h2client::frame::ErrorCode;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use support::origin::{FakeApns, OriginOptions, Script};
use support::pki::TestPki;
use support::{token, within};

async fn client_to(origin: &FakeApns, pki: &TestPki) -> Client {
    let tcp = TcpStream::connect(origin.addr).await.unwrap();
    let tls = TlsConnector::from(pki.client_config(&[b"h2"]))
        .connect(ServerName::try_from("api.push.apple.com").unwrap(), tcp)
        .await
        .unwrap();
    let (client, conn) = driver::connect(tls, DriverConfig::default());
    tokio::spawn(conn);
    client
}

fn push(token: &str, body: &'static str) -> Request<Bytes> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("https://api.push.apple.com/3/device/{token}"))
        .header("apns-topic", "com.example.app")
        .header("apns-push-type", "alert")
        .header("apns-id", "11111111-2222-4333-8444-555555555555")
        .header("authorization", "bearer eyJ.secret.sig")
        .body(Bytes::from_static(body.as_bytes()))
        .unwrap()
}

/// A push reaches the h2-crate origin over TLS with its headers and body; the answers (200 and
/// a 400 with its JSON reason) come back whole.
#[tokio::test]
async fn driver_sends_pushes_to_the_h2_origin_over_tls() {
    let pki = TestPki::new();
    let origin = FakeApns::start(&pki).await;
    let client = client_to(&origin, &pki).await;
    for _ in 0..2 {
        let a = within(10, "answer", client.send(push(&token(1), "{\"aps\":{}}")))
            .await
            .unwrap();
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.headers["apns-id"], "11111111-2222-4333-8444-555555555555");
        assert!(a.body.is_empty());
    }
    let bad = within(10, "answer", client.send(push("nothex", "{}")))
        .await
        .unwrap();
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(&bad.body[..], b"{\"reason\":\"BadDeviceToken\"}");
    let seen = origin.received();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].path, format!("/3/device/{}", token(1)));
    assert_eq!(seen[1].authority.as_deref(), Some("api.push.apple.com"));
    assert_eq!(seen[1].headers["apns-topic"], "com.example.app");
    assert_eq!(seen[1].headers["authorization"], "bearer eyJ.secret.sig");
    assert_eq!(&seen[1].body[..], b"{\"aps\":{}}");
    assert_eq!(origin.connection_count(), 1);
}

/// A REFUSED_STREAM reset is reported as never processed; the next push goes through.
#[tokio::test]
async fn refused_stream_at_the_origin_is_never_processed() {
    let pki = TestPki::new();
    let origin = FakeApns::start_with(
        &pki,
        OriginOptions {
            refuse_first: 1,
            ..OriginOptions::default()
        },
    )
    .await;
    let client = client_to(&origin, &pki).await;
    let err = within(10, "refused", client.send(push(&token(1), "{}")))
        .await
        .unwrap_err();
    assert!(err.never_processed(), "{err}");
    let ok = within(10, "answer", client.send(push(&token(2), "{}")))
        .await
        .unwrap();
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(origin.received().len(), 1);
}

/// After the origin's GOAWAY, every push reported as never processed was indeed never seen by
/// it, and every push it saw was answered.
#[tokio::test]
async fn goaway_at_the_origin_splits_pushes_into_answered_and_never_processed() {
    let pki = TestPki::new();
    let origin = FakeApns::start_with(
        &pki,
        OriginOptions {
            goaway_after: Some(3),
            ..OriginOptions::default()
        },
    )
    .await;
    let client = client_to(&origin, &pki).await;
    // Three at once, then one by one: the origin goes away after its third.
    let first = (0..3).map(|i| client.send(push(&token(i), "{}")));
    let mut results = within(10, "answers", futures_util::future::join_all(first)).await;
    for i in 3..20 {
        results.push(within(10, "answer", client.send(push(&token(i), "{}"))).await);
    }
    let answered = results.iter().filter(|r| r.is_ok()).count();
    for r in &results {
        if let Err(e) = r {
            assert!(e.never_processed(), "{e}");
        }
    }
    assert!(answered >= 3, "{answered}");
    assert!(answered < 20, "GOAWAY stopped some");
    assert_eq!(origin.received().len(), answered);
}

/// SETTINGS_MAX_CONCURRENT_STREAMS lowered to 1 mid-connection: pushes go one at a time.
#[tokio::test]
async fn a_live_max_concurrent_streams_change_at_the_origin_is_honoured() {
    let pki = TestPki::new();
    let script = Script::new();
    let (origin, hold) = FakeApns::start_holding(
        &pki,
        OriginOptions {
            script: Some(script.clone()),
            ..OriginOptions::default()
        },
    )
    .await;
    let client = Arc::new(client_to(&origin, &pki).await);
    // One push first, so the connection is up before the change.
    hold.add_permits(1);
    within(10, "first", client.send(push(&token(0), "{}")))
        .await
        .unwrap();
    assert_eq!(client.max_concurrent_streams(), 1000);
    script.set_max_streams(1);
    within(10, "SETTINGS acknowledged", script.acked.acquire())
        .await
        .unwrap()
        .forget();
    assert_eq!(client.max_concurrent_streams(), 1);
    let tasks: Vec<_> = (1..4)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { c.send(push(&token(i), "{}")).await })
        })
        .collect();
    origin.wait_received(2).await;
    for k in 2..5 {
        // With one stream allowed, the origin can have seen at most one unanswered push.
        assert!(origin.received().len() <= k, "at most {k} seen");
        hold.add_permits(1);
        if k < 4 {
            origin.wait_received(k + 1).await;
        }
    }
    for t in tasks {
        let a = within(10, "answers", t).await.unwrap().unwrap();
        assert_eq!(a.status, StatusCode::OK);
    }
    script.set_max_streams(1000);
    within(10, "SETTINGS acknowledged", script.acked.acquire())
        .await
        .unwrap()
        .forget();
    assert_eq!(client.max_concurrent_streams(), 1000);
}

/// An nghttpd of our own on 127.0.0.1 port 0 (h2c); the port is read back from /proc.
struct Nghttpd {
    child: std::process::Child,
    port: u16,
    _htdocs: tempfile::TempDir,
}

impl Drop for Nghttpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listening_port(pid: u32) -> Option<u16> {
    let mut inodes = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let link = std::fs::read_link(fd.path()).ok()?;
        let link = link.to_string_lossy();
        if let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
        {
            inodes.push(inode.to_owned());
        }
    }
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(3) == Some(&"0A") && inodes.iter().any(|i| Some(&i.as_str()) == f.get(9)))
            .then(|| u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok())
            .flatten()
    })
}

async fn nghttpd(args: &[&str]) -> Option<Nghttpd> {
    let htdocs = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(htdocs.path().join("big"), &big).unwrap();
    let child = match std::process::Command::new("nghttpd")
        .args(["--no-tls", "-a", "127.0.0.1", "-d"])
        .arg(htdocs.path())
        .args(args)
        .arg("0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "nghttpd missing in CI: {e}"
            );
            eprintln!("skipped: nghttpd not installed (apt-get install nghttp2-server)");
            return None;
        }
    };
    let pid = child.id();
    let mut server = Nghttpd {
        child,
        port: 0,
        _htdocs: htdocs,
    };
    server.port = within(10, "nghttpd listening", async {
        loop {
            if let Some(p) = listening_port(pid) {
                return p;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    Some(server)
}

async fn h2c_client(port: u16) -> Client {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (client, conn) = driver::connect(
        tcp,
        DriverConfig {
            max_body: 1 << 20,
            ..DriverConfig::default()
        },
    );
    tokio::spawn(conn);
    client
}

fn to_nghttpd(port: u16, method: Method, path: &str, body: Bytes) -> Request<Bytes> {
    Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("apns-topic", "com.example.app")
        .body(body)
        .unwrap()
}

/// nghttpd with padding, 1 KiB stream windows, two streams at most and no HPACK dynamic table:
/// uploads echoed byte for byte, a 300 kB download intact, ten requests at once all answered.
#[tokio::test]
async fn driver_interoperates_with_nghttpd_under_small_windows_padding_and_two_streams() {
    let Some(server) = nghttpd(&[
        "--echo-upload",
        "-b",
        "7",
        "-w",
        "10",
        "-m",
        "2",
        "-c",
        "0",
        "--trailer",
        "x-trailer: yes",
    ])
    .await
    else {
        return;
    };
    let client = h2c_client(server.port).await;
    let upload: Bytes = (0..100_000u32)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<_>>()
        .into();
    let sends = (0..10).map(|_| {
        client.send(to_nghttpd(
            server.port,
            Method::POST,
            "/echo",
            upload.clone(),
        ))
    });
    let answers = within(30, "echoes", futures_util::future::join_all(sends)).await;
    for a in answers {
        let a = a.unwrap();
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.body, upload);
        assert_eq!(a.trailers.as_ref().unwrap()["x-trailer"], "yes");
    }
    assert_eq!(client.max_concurrent_streams(), 2);
    let big = within(
        30,
        "download",
        client.send(to_nghttpd(server.port, Method::GET, "/big", Bytes::new())),
    )
    .await
    .unwrap();
    assert_eq!(big.status, StatusCode::OK);
    assert_eq!(big.body.len(), 300_000);
    assert!(
        big.body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i % 251) as u8)
    );
    let missing = within(
        10,
        "404",
        client.send(to_nghttpd(server.port, Method::GET, "/nope", Bytes::new())),
    )
    .await
    .unwrap();
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

/// A HAProxy of our own: h2 over TLS (ALPN h2, a certificate for api.push.apple.com from the
/// test CA) in front of the fake origin, on a socket the test bound on port 0 and hands over as
/// HAProxy's stdin (`bind fd@0`: HAProxy takes no port 0 of its own).
struct Haproxy {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Haproxy {
    /// Soft stop, as `systemctl reload` or an upgrade does it: HAProxy sends GOAWAY on its client
    /// connections, finishes the streams below it and exits.
    fn soft_stop(&self) {
        let ok = std::process::Command::new("kill")
            .args(["-USR1", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -USR1 haproxy");
    }
}

async fn haproxy(pki: &TestPki, origin: &FakeApns, tune: &[&str]) -> Option<Haproxy> {
    let dir = tempfile::tempdir().unwrap();
    let leaf = pki.ca.issue(&["api.push.apple.com".to_owned()]).unwrap();
    let front = dir.path().join("front.pem");
    std::fs::write(&front, format!("{}{}", leaf.chain_pem, leaf.key_pem)).unwrap();
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  log stderr format short local0 warning\n{tune}\n\
             defaults\n  mode http\n  log global\n  timeout connect 5s\n  timeout client 30s\n  \
             timeout server 30s\n\
             frontend apns\n  bind fd@0 ssl crt {front} alpn h2\n  default_backend origin\n\
             backend origin\n  server o {origin} ssl verify required ca-file {ca} \
             sni str(api.push.apple.com) alpn h2\n",
            tune = tune.iter().map(|t| format!("  {t}\n")).collect::<String>(),
            front = front.display(),
            origin = origin.addr,
            ca = pki.ca_cert.display(),
        ),
    )
    .unwrap();
    // The check parses `bind fd@0` too, so it gets a listening socket of its own.
    let check = match std::process::Command::new("haproxy")
        .args(["-c", "-f"])
        .arg(&cfg)
        .stdin(std::os::fd::OwnedFd::from(
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        ))
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "haproxy missing in CI: {e}"
            );
            eprintln!("skipped: haproxy not installed (apt-get install haproxy)");
            return None;
        }
    };
    assert!(
        check.status.success(),
        "haproxy -c: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let child = std::process::Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdin(std::os::fd::OwnedFd::from(listener))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The socket listens already (the kernel queues connections until HAProxy accepts them).
    Some(Haproxy {
        child,
        addr,
        _dir: dir,
    })
}

async fn tls_client_to(
    addr: std::net::SocketAddr,
    pki: &TestPki,
) -> (
    Client,
    Arc<Mutex<Tapped>>,
    tokio::task::JoinHandle<driver::Ended>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(pki.client_config(&[b"h2"]))
        .connect(ServerName::try_from("api.push.apple.com").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let tapped = Arc::new(Mutex::new(Tapped::default()));
    let io = Tap {
        io: tls,
        log: tapped.clone(),
    };
    let (client, conn) = driver::connect(io, DriverConfig::default());
    let driving = tokio::spawn(conn);
    assert!(within(10, "ready", client.ready()).await);
    (client, tapped, driving)
}

/// The frames that went each way over a connection, in the order the client saw them (a frame
/// read is logged when the driver reads it, so what it wrote after depends only on what came
/// before): (sent by us, type, stream, payload; DATA payloads as their length only).
#[derive(Default)]
struct Tapped {
    frames: Vec<(bool, u8, u32, Vec<u8>)>,
    sent: Vec<u8>,
    received: Vec<u8>,
    preface_skipped: bool,
}

impl Tapped {
    fn feed(&mut self, sent: bool, bytes: &[u8]) {
        let buf = if sent {
            &mut self.sent
        } else {
            &mut self.received
        };
        buf.extend_from_slice(bytes);
        if sent && !self.preface_skipped {
            if buf.len() < 24 {
                return;
            }
            buf.drain(..24);
            self.preface_skipped = true;
        }
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let kind = buf[3];
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload = if kind == 0 {
                (len as u32).to_be_bytes().to_vec()
            } else {
                buf[9..9 + len].to_vec()
            };
            buf.drain(..9 + len);
            self.frames.push((sent, kind, stream, payload));
        }
    }

    /// Checks that no DATA we sent went beyond the send windows the server gave (its
    /// SETTINGS_INITIAL_WINDOW_SIZE, 65535 for the connection, plus its WINDOW_UPDATEs).
    /// Returns the streams the server sent WINDOW_UPDATEs for.
    fn check_send_windows(&self) -> Vec<u32> {
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let mut initial = 65_535i64;
        let mut conn = 65_535i64;
        let mut credit: std::collections::HashMap<u32, i64> = Default::default();
        let mut updated = Vec::new();
        for (sent, kind, stream, payload) in &self.frames {
            match (*sent, *kind) {
                (false, 4) => {
                    for p in payload.chunks(6) {
                        if p.len() == 6 && u16::from_be_bytes([p[0], p[1]]) == 4 {
                            let new = i64::from(be(&p[2..]));
                            for c in credit.values_mut() {
                                *c += new - initial;
                            }
                            initial = new;
                        }
                    }
                }
                (false, 8) if *stream == 0 => conn += i64::from(be(payload) & 0x7fff_ffff),
                (false, 8) => {
                    let c = credit.entry(*stream).or_insert(initial);
                    *c += i64::from(be(payload) & 0x7fff_ffff);
                    if !updated.contains(stream) {
                        updated.push(*stream);
                    }
                }
                (true, 1) => {
                    credit.entry(*stream).or_insert(initial);
                }
                (true, 0) => {
                    let n = i64::from(be(payload));
                    let c = credit.entry(*stream).or_insert(initial);
                    *c -= n;
                    conn -= n;
                    assert!(*c >= 0, "stream {stream}: DATA beyond the stream window");
                    assert!(conn >= 0, "DATA beyond the connection window");
                }
                _ => {}
            }
        }
        updated
    }
}

/// Logs the frames passing between the driver and the TLS stream.
struct Tap<IO> {
    io: IO,
    log: Arc<Mutex<Tapped>>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tap<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let new = &buf.filled()[before..];
            self.log.lock().unwrap().feed(false, new);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tap<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.log.lock().unwrap().feed(true, &buf[..n]);
        }
        r
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn push_with(token: &str, body: Bytes) -> Request<Bytes> {
    let mut r = push(token, "");
    *r.body_mut() = body;
    r
}

/// HAProxy as the HTTP/2 server (its own SETTINGS: 4 streams, 1 KiB stream windows): a push with a body three windows long reaches the origin byte for byte with its
/// headers; answers (200 with apns-id, 400 with its JSON reason) come back whole; twelve pushes
/// at once never have more than four streams open and are all answered.
#[tokio::test]
async fn driver_interoperates_with_haproxy_settings_windows_and_stream_limit() {
    let pki = TestPki::new();
    let (origin, hold) = FakeApns::start_holding(&pki, OriginOptions::default()).await;
    let Some(ha) = haproxy(
        &pki,
        &origin,
        &[
            "tune.h2.max-concurrent-streams 4",
            "tune.h2.initial-window-size 1024",
        ],
    )
    .await
    else {
        return;
    };
    let (client, tapped, _) = tls_client_to(ha.addr, &pki).await;
    let client = Arc::new(client);
    let body: Bytes = format!("{{\"aps\":{{}},\"pad\":\"{}\"}}", "x".repeat(3000)).into();
    hold.add_permits(2);
    let a = within(
        10,
        "answer",
        client.send(push_with(&token(1), body.clone())),
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["apns-id"], "11111111-2222-4333-8444-555555555555");
    assert_eq!(client.max_concurrent_streams(), 4, "HAProxy's own SETTINGS");
    let bad = within(10, "answer", client.send(push("nothex", "{}")))
        .await
        .unwrap();
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(&bad.body[..], b"{\"reason\":\"BadDeviceToken\"}");
    let seen = origin.received();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].path, format!("/3/device/{}", token(1)));
    assert_eq!(seen[0].body, body);
    assert_eq!(seen[0].headers["apns-topic"], "com.example.app");
    assert_eq!(seen[0].headers["apns-push-type"], "alert");
    assert_eq!(seen[0].headers["authorization"], "bearer eyJ.secret.sig");

    let tasks: Vec<_> = (10..22)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { c.send(push(&token(i), "{}")).await })
        })
        .collect();
    origin.wait_received(2 + 4).await;
    assert!(client.open_streams() <= 4, "{}", client.open_streams());
    hold.add_permits(12);
    for t in tasks {
        let a = within(10, "answers", t).await.unwrap().unwrap();
        assert_eq!(a.status, StatusCode::OK);
    }
    assert_eq!(origin.received().len(), 14);
    assert!(!client.is_going_away());
    let updated = tapped.lock().unwrap().check_send_windows();
    assert!(
        updated.contains(&1),
        "the 3 kB body needed HAProxy's WINDOW_UPDATEs"
    );
}

/// HAProxy's soft stop (SIGUSR1) sends a real GOAWAY: the four pushes in flight below its last
/// stream id are answered, the two waiting for a stream fail as never processed (and the origin
/// never sees them), as does every push after it; then the connection ends, its end naming the
/// GOAWAY.
#[tokio::test]
async fn haproxy_soft_stop_goaway_tells_never_processed_pushes_apart() {
    let pki = TestPki::new();
    let (origin, hold) = FakeApns::start_holding(&pki, OriginOptions::default()).await;
    let Some(ha) = haproxy(&pki, &origin, &["tune.h2.max-concurrent-streams 4"]).await else {
        return;
    };
    let (client, _, driving) = tls_client_to(ha.addr, &pki).await;
    let client = Arc::new(client);
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { (i, c.send(push(&token(i), "{}")).await) })
        })
        .collect();
    origin.wait_received(4).await;
    ha.soft_stop();
    within(10, "GOAWAY from HAProxy", async {
        while !client.is_going_away() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    let late = within(10, "after GOAWAY", client.send(push(&token(99), "{}")))
        .await
        .unwrap_err();
    assert!(late.never_processed(), "{late}");
    hold.add_permits(6);
    let mut answered = Vec::new();
    for t in tasks {
        let (i, r) = within(10, "answers", t).await.unwrap();
        match r {
            Ok(a) => {
                assert_eq!(a.status, StatusCode::OK);
                answered.push(format!("/3/device/{}", token(i)));
            }
            Err(e) => assert!(e.never_processed(), "push {i}: {e}"),
        }
    }
    assert_eq!(answered.len(), 4, "the four in flight at the GOAWAY");
    let mut seen: Vec<String> = origin.received().into_iter().map(|r| r.path).collect();
    seen.sort();
    answered.sort();
    assert_eq!(seen, answered, "the origin saw exactly the answered pushes");
    let ended = within(10, "connection end", driving).await.unwrap();
    assert_eq!(
        ended.goaway.as_ref().map(|g| g.0),
        Some(ErrorCode::NO_ERROR),
        "{ended}"
    );
    assert!(ended.to_string().starts_with("GOAWAY"), "{ended}");
    assert!(client.is_closed());
}
