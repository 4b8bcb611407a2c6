//! README.md's "Try it locally" commands, run as written (in a scratch directory, on free ports):
//! the fake APNs origin and the relay start, curl's push comes back 200 with an `apns-id`, the log,
//! /metrics and the status page show it. Every process the commands start is ended by its PID.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const README_SECTION: &str = "## Try it locally";

/// The first `sh` block after the section heading.
fn readme_commands() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let section = readme
        .split_once(README_SECTION)
        .unwrap_or_else(|| panic!("README.md has no {README_SECTION:?} section"))
        .1;
    let block = section.split_once("```sh\n").expect("an sh block").1;
    block
        .split_once("\n```")
        .expect("the block's end")
        .0
        .to_owned()
}

/// The one line that only sets ports (`A_PORT=9443 B_PORT=8443   # any free ports`): its names.
fn port_line(line: &str) -> Option<Vec<String>> {
    let code = line.split('#').next().unwrap_or("").trim();
    let names: Option<Vec<String>> = code
        .split_whitespace()
        .map(|word| {
            let (name, value) = word.split_once('=')?;
            (name.ends_with("_PORT") && value.parse::<u16>().is_ok()).then(|| name.to_owned())
        })
        .collect();
    names.filter(|n| !n.is_empty())
}

/// Ports nobody listens on now: bound on port 0 together, then released.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// The README's block with its port line set to free ports, then what the test needs to end what
/// it started: the background jobs' PIDs on stdout, a wait for the test's go-ahead, and a wait
/// for the jobs to end.
fn script(block: &str) -> String {
    let mut out = String::new();
    let mut port_lines = 0;
    for line in block.lines() {
        match port_line(line) {
            Some(names) => {
                port_lines += 1;
                let ports = free_ports(names.len());
                let set: Vec<String> = names
                    .iter()
                    .zip(ports)
                    .map(|(name, port)| format!("{name}={port}"))
                    .collect();
                out.push_str(&set.join(" "));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    assert_eq!(port_lines, 1, "one line sets the ports:\n{block}");
    out.push_str("echo \"PIDS=$(jobs -p | tr '\\n' ' ')\"\nread -r _\nwait\n");
    out
}

fn search_path() -> String {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_pushrelay"));
    let dir = bin.parent().unwrap();
    let examples = dir.join("examples");
    assert!(
        examples.join("fake_apns").exists(),
        "{}: not built; `cargo test` builds it (or `cargo build --example fake_apns`)",
        examples.join("fake_apns").display()
    );
    format!(
        "{}:{}:{}",
        dir.display(),
        examples.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The commands in README.md's "Try it locally" relay a push to the fake origin: 200 with an
/// apns-id, a `relayed` log line without the whole device token, and a 2xx count in /metrics.
#[test]
fn readme_try_it_locally_relays_a_push() {
    let dir = tempfile::tempdir().unwrap();
    let script = script(&readme_commands());
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env("PATH", search_path())
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        let lower = k.to_ascii_lowercase();
        if k.starts_with("PUSHRELAY_") || lower.ends_with("_proxy") || lower == "all_proxy" {
            cmd.env_remove(k);
        }
    }
    let mut shell = cmd.spawn().unwrap();
    let mut stdin = shell.stdin.take().unwrap();
    let stdout = shell.stdout.take().unwrap();
    let mut stderr = shell.stderr.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    // Everything up to the PIDs line is what the commands printed.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut printed = Vec::new();
    let pids = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => match line.strip_prefix("PIDS=") {
                Some(pids) => {
                    break pids
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect::<Vec<_>>();
                }
                None => printed.push(line),
            },
            Err(e) => {
                let _ = shell.kill();
                panic!(
                    "the README commands did not finish ({e}); printed:\n{}",
                    printed.join("\n")
                );
            }
        }
    };
    assert_eq!(
        pids.len(),
        2,
        "fake_apns and pushrelay run in the background: {pids:?}"
    );
    for pid in &pids {
        let status = Command::new("kill").args(["-TERM", pid]).status().unwrap();
        assert!(status.success(), "kill -TERM {pid}");
    }
    let _ = stdin.write_all(b"\n");
    drop(stdin);
    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(shell.wait());
    });
    let exited = done.recv_timeout(Duration::from_secs(30));
    assert!(
        exited.is_ok(),
        "the background processes did not end after SIGTERM"
    );
    let log = errors.join().unwrap();
    let printed = printed.join("\n");

    assert!(
        printed.lines().any(|l| l.trim_end() == "HTTP/2 200"),
        "curl's push is answered 200 over HTTP/2:\n{printed}\n--- log:\n{log}"
    );
    let apns_id = printed
        .lines()
        .find_map(|l| l.strip_prefix("apns-id: "))
        .unwrap_or_else(|| panic!("an apns-id header:\n{printed}"));
    assert!(!apns_id.trim().is_empty(), "{printed}");
    assert!(
        printed.contains(
            "pushrelay_requests_total{listener=\"apns\",destination=\"api.push.apple.com:443\",status_class=\"2xx\"} 1"
        ),
        "/metrics counts the push:\n{printed}"
    );
    assert!(
        printed.lines().any(|l| l.trim() == "\"state\": \"up\","),
        "the status page has the destination up:\n{printed}"
    );
    let relayed = log
        .lines()
        .find(|l| l.contains("relayed"))
        .unwrap_or_else(|| panic!("a `relayed` log line:\n{log}"));
    for field in [
        "listener=apns",
        "status=200",
        "apns_id=",
        "/3/device/ffffffff…",
    ] {
        assert!(relayed.contains(field), "{field} in {relayed}");
    }
    assert!(
        !log.contains("ffffffff00000000000000000000000000000000000000000000000000000001"),
        "the whole device token is never logged:\n{log}"
    );
}

/// The port line is told apart from every other line of the block.
#[test]
fn only_the_port_line_is_rewritten() {
    assert_eq!(
        port_line("A_PORT=1 B_PORT=2   # any free ports"),
        Some(vec!["A_PORT".to_owned(), "B_PORT".to_owned()])
    );
    assert_eq!(port_line("pushrelay ca init --dir try"), None);
    assert_eq!(port_line("RELAY_PORT=8443 pushrelay serve"), None);
    assert_eq!(port_line("export PATH=\"$PWD:$PATH\""), None);
    assert_eq!(port_line(""), None);
}
