//! A real Squid per test: its own config, logs and pid file in a temporary directory, listening on
//! a free 127.0.0.1 port, no cache, names answered from its own hosts file (the APNs hosts and
//! fcm.googleapis.com are 127.0.0.1) and a DNS server on 127.0.0.1 so no query ever leaves the
//! machine. Either it tunnels (CONNECT only, to the fake origin's port), as the corporate proxy in
//! front of a pre-proxy relay, or it forwards plain HTTP requests for a few ports to a parent peer
//! only (`never_direct`), as the legacy proxy in front of a post-proxy relay. Either way optionally
//! behind Basic auth (basic_ncsa_auth + htpasswd). The process is killed by its PID when the handle
//! drops.
//!
//! Started as root, Squid drops to `cache_effective_user` (Debian: `proxy`); the directory is then
//! handed to that user so Squid can write its logs and the auth helper can read the password file.
//! Even with `-N`, Squid makes POSIX shared-memory segments named after its service name
//! (/dev/shm/<service>-cf__*.shm): each instance gets its own name (`-n`) so parallel tests do not
//! share them, and its segments are removed after it is killed.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::host_tools;

/// The user Squid switches to when started as root: Debian's, then RHEL's.
const SQUID_USERS: [&str; 2] = ["proxy", "squid"];
/// Bounds on waiting for Squid to come up, and for it to write a log line.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);
/// A port picked by binding :0 may be taken again before Squid binds it: try a few.
const START_ATTEMPTS: usize = 3;

pub struct BasicAuth {
    /// basic_ncsa_auth
    pub helper: PathBuf,
    /// htpasswd, to write the password file
    pub htpasswd: PathBuf,
    pub user: String,
    pub pass: String,
}

/// What Squid lets through, and where it sends it.
pub enum Forward {
    /// `CONNECT` only, straight to this port and no other.
    Tunnel(u16),
    /// Plain HTTP requests (no `CONNECT`) for these destination ports, every one handed to the
    /// parent peer on 127.0.0.1:`parent_port` and never sent direct.
    Parent {
        parent_port: u16,
        dest_ports: Vec<u16>,
    },
    /// A TLS-inspecting proxy (ssl-bump, server first: peek, then bump): `CONNECT` to this port
    /// only, each tunnel's TLS ended with a certificate Squid mints from its own CA (`cert`,
    /// `key`: PEM) after the server's, and the requests inside read and sent on to the CONNECT
    /// target over a TLS connection of Squid's that trusts `trust` (PEM CA).
    Bump {
        port: u16,
        cert: String,
        key: String,
        trust: String,
    },
}

pub struct SquidOptions {
    pub forward: Forward,
    pub basic_auth: Option<BasicAuth>,
}

pub struct Squid {
    pub addr: SocketAddr,
    child: Child,
    dir: TempDir,
    service: String,
}

impl Drop for Squid {
    fn drop(&mut self) {
        // Only the process this handle started; its helpers exit when their stdin closes.
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_segments(&self.service);
    }
}

impl Squid {
    /// Starts `squid -N` and waits until it accepts connections. Panics with Squid's own log when it
    /// does not come up.
    pub fn start(squid: &Path, options: &SquidOptions) -> Squid {
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(squid, options) {
                Ok(s) => return s,
                Err(e) => last_error = e,
            }
        }
        panic!("squid did not start in {START_ATTEMPTS} attempts:\n{last_error}");
    }

    fn try_start(squid: &Path, options: &SquidOptions) -> Result<Squid, String> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let service = format!("prtest{:016x}", host_tools::random_u64());
        let as_root = host_tools::running_as_root(dir.path());
        let d = dir.path().display();

        std::fs::write(
            dir.path().join("hosts"),
            "127.0.0.1 localhost\n127.0.0.1 api.push.apple.com api.sandbox.push.apple.com api.development.push.apple.com fcm.googleapis.com\n",
        )
        .unwrap();
        let auth = match &options.basic_auth {
            None => String::new(),
            Some(a) => {
                let users = dir.path().join("users");
                let out = Command::new(&a.htpasswd)
                    .arg("-bc")
                    .arg(&users)
                    .args([&a.user, &a.pass])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "htpasswd failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                format!(
                    "auth_param basic program {} {}\n\
                     auth_param basic children 2 startup=1 idle=1\n\
                     auth_param basic realm pushrelay-test\n\
                     acl authenticated proxy_auth REQUIRED\n",
                    a.helper.display(),
                    users.display()
                )
            }
        };
        let allow = if options.basic_auth.is_some() {
            "http_access allow authenticated"
        } else {
            "http_access allow all"
        };
        let squid_user = as_root.then(|| {
            SQUID_USERS
                .into_iter()
                .find_map(|u| Some((u, host_tools::user_ids(u)?)))
                .unwrap_or_else(|| panic!("as root, squid needs one of the users {SQUID_USERS:?}"))
        });
        let user = if let Some((name, _)) = squid_user {
            format!("cache_effective_user {name}\n")
        } else {
            String::new()
        };
        let mut listen_options = String::new();
        let forward = match &options.forward {
            Forward::Tunnel(port) => format!(
                "acl loopback src 127.0.0.0/8\n\
                 acl tunnel_port port {port}\n\
                 acl CONNECT method CONNECT\n\
                 http_access deny !loopback\n\
                 http_access deny !CONNECT\n\
                 http_access deny CONNECT !tunnel_port\n"
            ),
            Forward::Parent {
                parent_port,
                dest_ports,
            } => {
                let ports: Vec<String> = dest_ports.iter().map(u16::to_string).collect();
                format!(
                    "cache_peer 127.0.0.1 parent {parent_port} 0 no-query no-digest no-netdb-exchange name=pushrelay\n\
                     cache_peer_access pushrelay allow all\n\
                     never_direct allow all\n\
                     acl loopback src 127.0.0.0/8\n\
                     acl dest_port port {ports}\n\
                     acl CONNECT method CONNECT\n\
                     http_access deny !loopback\n\
                     http_access deny CONNECT\n\
                     http_access deny !dest_port\n",
                    ports = ports.join(" ")
                )
            }
            Forward::Bump {
                port: relay_port,
                cert,
                key,
                trust,
            } => {
                std::fs::write(dir.path().join("bump.pem"), cert).unwrap();
                std::fs::write(dir.path().join("bump.key"), key).unwrap();
                std::fs::write(dir.path().join("trust.pem"), trust).unwrap();
                let certgen = host_tools::require("security_file_certgen", "squid-openssl")
                    .ok_or("security_file_certgen is missing")?;
                let db = dir.path().join("ssl_db");
                let out = Command::new(&certgen)
                    .arg("-c")
                    .arg("-s")
                    .arg(&db)
                    .args(["-M", "4MB"])
                    .output()
                    .map_err(|e| format!("cannot run {}: {e}", certgen.display()))?;
                if !out.status.success() {
                    return Err(format!(
                        "security_file_certgen -c failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                listen_options = format!(
                    " ssl-bump tls-cert={d}/bump.pem tls-key={d}/bump.key \
                     generate-host-certificates=on dynamic_cert_mem_cache_size=4MB"
                );
                format!(
                    "sslcrtd_program {certgen} -s {db} -M 4MB\n\
                     sslcrtd_children 2 startup=1 idle=1\n\
                     tls_outgoing_options cafile={d}/trust.pem\n\
                     acl step1 at_step SslBump1\n\
                     ssl_bump peek step1\n\
                     ssl_bump bump all\n\
                     via off\n\
                     forwarded_for delete\n\
                     request_header_access Cache-Control deny all\n\
                     acl loopback src 127.0.0.0/8\n\
                     acl relay_port port {relay_port}\n\
                     acl CONNECT method CONNECT\n\
                     http_access deny !loopback\n\
                     http_access deny CONNECT !relay_port\n",
                    certgen = certgen.display(),
                    db = db.display(),
                )
            }
        };
        let conf = format!(
            "# Written by tests/squid.rs: loopback only, no cache, no DNS.\n\
             http_port 127.0.0.1:{port}{listen_options}\n\
             pid_filename {d}/squid.pid\n\
             cache_log {d}/cache.log\n\
             access_log stdio:{d}/access.log\n\
             cache_store_log none\n\
             cache deny all\n\
             cache_mem 8 MB\n\
             coredump_dir {d}\n\
             hosts_file {d}/hosts\n\
             dns_nameservers 127.0.0.1\n\
             udp_incoming_address 127.0.0.1\n\
             visible_hostname pushrelay-test\n\
             pinger_enable off\n\
             netdb_filename none\n\
             shutdown_lifetime 0 seconds\n\
             {user}\
             {auth}\
             {forward}\
             {allow}\n\
             http_access deny all\n",
        );
        let conf_path = dir.path().join("squid.conf");
        std::fs::write(&conf_path, conf).unwrap();
        if let Some((_, ids)) = squid_user {
            give_to(dir.path(), ids);
        }

        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let child = Command::new(squid)
            .arg("-N")
            .arg("-n")
            .arg(&service)
            .arg("-f")
            .arg(&conf_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", squid.display()))?;
        let mut squid = Squid {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            dir,
            service,
        };
        squid.wait_until_accepting()?;
        Ok(squid)
    }

    /// Polls (bounded in count and time) until Squid says it accepts and a TCP connect succeeds.
    fn wait_until_accepting(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let polls = START_TIMEOUT.as_millis() / POLL.as_millis();
        for _ in 0..polls {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("squid exited ({status}):\n{}", self.logs()));
            }
            // "Accepting HTTP Socket connections", or "Accepting SSL bumped HTTP Socket …".
            let said_so = self
                .read("cache.log")
                .lines()
                .any(|l| l.contains("Accepting ") && l.contains("HTTP Socket connections"));
            if said_so && TcpStream::connect_timeout(&self.addr, POLL).is_ok() {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                break;
            }
            std::thread::sleep(POLL);
        }
        Err(format!(
            "squid did not accept on {} within {START_TIMEOUT:?}:\n{}",
            self.addr,
            self.logs()
        ))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn url_with(&self, user: &str, pass: &str) -> String {
        format!("http://{user}:{pass}@{}", self.addr)
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    pub fn access_log(&self) -> String {
        self.read("access.log")
    }

    /// Everything Squid said, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- cache.log\n{}--- stderr\n{}--- access.log\n{}",
            self.read("cache.log"),
            self.read("stderr.log"),
            self.access_log()
        )
    }

    /// The first access log line matching `wanted`, waiting (bounded) for Squid to write it: Squid
    /// logs a transaction when it ends, a tunnel when it closes.
    pub fn wait_for_access_line(&self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        let polls = LOG_TIMEOUT.as_millis() / POLL.as_millis();
        for _ in 0..polls {
            if let Some(line) = self.access_log().lines().find(|l| wanted(l)) {
                return line.to_owned();
            }
            if started.elapsed() > LOG_TIMEOUT {
                break;
            }
            std::thread::sleep(POLL);
        }
        panic!(
            "squid's access log has no line for {what} after {LOG_TIMEOUT:?}:\n{}",
            self.logs()
        );
    }
}

/// A port free a moment ago: bind 127.0.0.1:0, read the port, close.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Removes the shared-memory segments of the Squid named `service` (a name only that one used).
fn remove_segments(service: &str) {
    let Ok(entries) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    let prefix = format!("{service}-");
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Hands `dir` and everything in it to the user Squid runs as, so it can use them.
fn give_to(dir: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            give_to(&path, (uid, gid));
        } else {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
        }
    }
}
