//! pushrelay's own HTTP/2 client driver against independent servers: the fake APNs origin (the
//! h2 crate, over TLS, with live SETTINGS changes, GOAWAY and REFUSED_STREAM) and `nghttpd`
//! (nghttp2, h2c, with padding, tiny flow-control windows and a low stream limit).

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use pushrelay::h2client::driver::{self, Client, DriverConfig};
use rustls::pki_types::ServerName;
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
