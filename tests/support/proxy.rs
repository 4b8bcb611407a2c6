//! A small CONNECT proxy: optional Basic auth (407 without it), a mode that refuses (403), one that
//! never answers, and one that cuts every open tunnel on demand. Like Squid with a hosts file, it
//! sends every tunnel to 127.0.0.1 at the requested port, so no name is ever resolved. It records
//! each CONNECT head and counts tunnels.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub enum Behaviour {
    Open,
    /// `Proxy-Authorization: Basic base64(user:pass)` required.
    Auth {
        user: String,
        pass: String,
    },
    Forbid,
    Silent,
}

pub struct TestProxy {
    pub addr: SocketAddr,
    pub tunnels: Arc<AtomicUsize>,
    pub heads: Arc<Mutex<Vec<String>>>,
    cut: watch::Sender<u64>,
    /// Tunnels open now.
    open: watch::Sender<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestProxy {
    pub async fn start(behaviour: Behaviour) -> Self {
        Self::start_on(behaviour, 0).await
    }

    /// As `start`, on `port` (0: any free one), e.g. to come back where a killed proxy was.
    pub async fn start_on(behaviour: Behaviour, port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (cut, cut_rx) = watch::channel(0u64);
        let open = watch::Sender::new(0usize);
        let (t, h, o) = (tunnels.clone(), heads.clone(), open.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (t, h, b, cut_rx) = (t.clone(), h.clone(), behaviour.clone(), cut_rx.clone());
                tokio::spawn(serve(client, b, t, h, cut_rx, o.clone()));
            }
        });
        TestProxy {
            addr,
            tunnels,
            heads,
            cut,
            open,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn url_with(&self, user: &str, pass: &str) -> String {
        format!("http://{user}:{pass}@{}", self.addr)
    }

    pub fn tunnel_count(&self) -> usize {
        self.tunnels.load(Ordering::SeqCst)
    }

    /// Stops the proxy as a crash or restart would: the port is closed and every tunnel cut.
    pub fn kill(&self) {
        self.task.abort();
        self.cut_tunnels();
    }

    /// Closes every tunnel open now, as a firewall cutting idle connections would.
    pub fn cut_tunnels(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Waits until no tunnel is open (both of each tunnel's sockets closed).
    pub async fn wait_closed(&self) {
        self.wait_open_at_most(0).await;
    }

    /// Waits until at most `n` tunnels are open.
    pub async fn wait_open_at_most(&self, n: usize) {
        let _ = self.open.subscribe().wait_for(|open| *open <= n).await;
    }
}

async fn serve(
    mut client: TcpStream,
    behaviour: Behaviour,
    tunnels: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    mut cut: watch::Receiver<u64>,
    open: watch::Sender<usize>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let head = loop {
        let Ok(n) = client.read(&mut chunk).await else {
            return;
        };
        if n == 0 || buf.len() > 16 * 1024 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break String::from_utf8_lossy(&buf[..end + 4]).into_owned();
        }
    };
    heads.lock().unwrap().push(head.clone());
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "CONNECT" {
        let _ = client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            .await;
        return;
    }
    match &behaviour {
        Behaviour::Silent => {
            // Hold the connection open and say nothing.
            let _ = client.read(&mut chunk).await;
            return;
        }
        Behaviour::Forbid => {
            let _ = client
                .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                .await;
            return;
        }
        Behaviour::Auth { user, pass } => {
            use base64::Engine;
            let expected = format!(
                "basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
            );
            let ok = lines.any(|l| {
                l.split_once(':').is_some_and(|(k, v)| {
                    k.eq_ignore_ascii_case("proxy-authorization")
                        && v.trim().eq_ignore_ascii_case(&expected)
                })
            });
            if !ok {
                let _ = client
                    .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n")
                    .await;
                return;
            }
        }
        Behaviour::Open => {}
    }
    let port = target
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(0);
    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", port)).await else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
        return;
    };
    let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    tunnels.fetch_add(1, Ordering::SeqCst);
    open.send_modify(|n| *n += 1);
    let generation = *cut.borrow_and_update();
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        _ = cut.wait_for(|g| *g != generation) => {}
    }
    drop((client, upstream));
    open.send_modify(|n| *n -= 1);
}
