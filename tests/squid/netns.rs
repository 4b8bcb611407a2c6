//! A network namespace whose /etc/hosts points the APNs hosts at the relay, as an admin does on the
//! push server. `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts for the programs
//! it runs. The namespace reaches the root namespace over a veth pair addressed inside 127.0.0.0/8
//! only (127.77.x.y/30), which needs route_localnet on both ends, and a /32 route in table local so
//! the answer to the peer leaves by the veth instead of matching the local 127.0.0.0/8 route.
//! Everything made here is removed when the handle drops, on failure too.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::host_tools;

const NETNS_ETC: &str = "/etc/netns";
/// Attempts at an address block no interface here uses yet.
const ADDRESS_ATTEMPTS: usize = 8;

pub struct Netns {
    pub name: String,
    /// The root namespace's end of the veth: where the relay listens.
    pub host_addr: Ipv4Addr,
    /// The namespace's end: where its connections come from.
    pub ns_addr: Ipv4Addr,
    ip: PathBuf,
    veth_host: String,
    veth_ns: String,
    hosts_dir: PathBuf,
    made_netns_etc: bool,
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The veth goes first: a namespace may be torn down lazily, and its veth end with it.
        let _ = self.run_quiet(&["link", "del", &self.veth_host]);
        let _ = self.run_quiet(&["netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(&self.hosts_dir);
        if self.made_netns_etc {
            // Only if empty: another namespace may be using it by now.
            let _ = std::fs::remove_dir(NETNS_ETC);
        }
    }
}

impl Netns {
    /// Creates the namespace, the veth pair with loopback-range addresses, and the hosts file
    /// mapping `names` to the root side's address. Err says which step failed.
    pub fn create(ip: &Path, names: &[&str]) -> Result<Netns, String> {
        let tag = format!("{:08x}", host_tools::random_u64() as u32);
        let (host_addr, ns_addr) = free_block(ip)?;
        let mut ns = Netns {
            name: format!("pr-{tag}"),
            host_addr,
            ns_addr,
            ip: ip.to_owned(),
            veth_host: format!("prh{tag}"),
            veth_ns: format!("prn{tag}"),
            hosts_dir: Path::new(NETNS_ETC).join(format!("pr-{tag}")),
            made_netns_etc: false,
        };
        let (name, vh, vn) = (ns.name.clone(), ns.veth_host.clone(), ns.veth_ns.clone());
        let host_cidr = format!("{host_addr}/30");
        let ns_cidr = format!("{ns_addr}/30");

        ns.run(&["netns", "add", &name])?;
        ns.run(&["link", "add", &vh, "type", "veth", "peer", "name", &vn])?;
        ns.run(&["link", "set", &vn, "netns", &name])?;
        let localnet = format!("/proc/sys/net/ipv4/conf/{vh}/route_localnet");
        std::fs::write(&localnet, "1").map_err(|e| format!("write {localnet}: {e}"))?;
        ns.run(&[
            "netns",
            "exec",
            &name,
            "sh",
            "-c",
            &format!("echo 1 > /proc/sys/net/ipv4/conf/{vn}/route_localnet"),
        ])?;
        ns.run(&["addr", "add", &host_cidr, "dev", &vh])?;
        ns.run(&["link", "set", &vh, "up"])?;
        ns.run(&["-n", &name, "addr", "add", &ns_cidr, "dev", &vn])?;
        ns.run(&["-n", &name, "link", "set", &vn, "up"])?;
        let (host_s, ns_s) = (host_addr.to_string(), ns_addr.to_string());
        ns.run(&[
            "route",
            "add",
            &format!("{ns_s}/32"),
            "dev",
            &vh,
            "src",
            &host_s,
            "table",
            "local",
        ])?;
        ns.run(&[
            "-n",
            &name,
            "route",
            "add",
            &format!("{host_s}/32"),
            "dev",
            &vn,
            "src",
            &ns_s,
            "table",
            "local",
        ])?;

        ns.made_netns_etc = !Path::new(NETNS_ETC).exists();
        std::fs::create_dir_all(&ns.hosts_dir)
            .map_err(|e| format!("create {}: {e}", ns.hosts_dir.display()))?;
        let hosts = format!("127.0.0.1 localhost\n{host_addr} {}\n", names.join(" "));
        std::fs::write(ns.hosts_dir.join("hosts"), hosts)
            .map_err(|e| format!("write {}/hosts: {e}", ns.hosts_dir.display()))?;
        Ok(ns)
    }

    /// `ip netns exec <ns> <program> <args…>`, as a command to finish setting up and run.
    pub fn exec(&self, program: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.ip);
        cmd.args(["netns", "exec", &self.name, program]);
        cmd.kill_on_drop(true);
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<(), String> {
        let out = self.run_quiet(args)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn run_quiet(&self, args: &[&str]) -> Result<std::process::Output, String> {
        Command::new(&self.ip)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.ip.display()))
    }
}

/// Two addresses of a 127.77.x.y/30 block that no interface here has yet.
fn free_block(ip: &Path) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let out = Command::new(ip)
        .args(["-o", "-4", "addr", "show"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ip.display()))?;
    let used = String::from_utf8_lossy(&out.stdout).into_owned();
    for _ in 0..ADDRESS_ATTEMPTS {
        let r = host_tools::random_u64();
        let third = (r & 0xff) as u8;
        let base = (((r >> 8) % 64) * 4) as u8;
        let host = Ipv4Addr::new(127, 77, third, base + 1);
        let peer = Ipv4Addr::new(127, 77, third, base + 2);
        if !used.contains(&format!(" {host}/")) && !used.contains(&format!(" {peer}/")) {
            return Ok((host, peer));
        }
    }
    Err("no free 127.77.x.y/30 block found".into())
}
