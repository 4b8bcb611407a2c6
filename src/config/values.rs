//! The string-shaped values of the configuration: secrets, the proxy URL (with its credentials
//! percent-decoded and never shown), and serde through `FromStr` / `Display` for them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::policy::Authority;

/// A string that never shows itself in `Debug`, `Display` or serialized output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The users of a forward-proxy `proxy_auth.users_file`: one `user:password` per line, `#`
/// comments. Errors say where, never what: a line may hold a password.
pub fn read_proxy_users(path: &std::path::Path) -> Result<Vec<(String, Secret)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut users = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((user, pass)) if !user.is_empty() && !pass.is_empty() => {
                users.push((user.to_owned(), Secret(pass.to_owned())));
            }
            _ => {
                return Err(format!(
                    "{} line {}: expected user:password",
                    path.display(),
                    n + 1
                ));
            }
        }
    }
    if users.is_empty() {
        return Err(format!("{} has no user:password line", path.display()));
    }
    Ok(users)
}

/// Reads a shared secret from `path`: one line of visible ASCII (it travels in a header), at
/// most 1 KiB, surrounding whitespace ignored. Errors name the file, never its content.
pub fn read_secret(path: &std::path::Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!(
            "{} is empty: it must hold the shared secret",
            path.display()
        ));
    }
    if secret.len() > 1024 {
        return Err(format!(
            "{}: the secret is longer than 1024 bytes",
            path.display()
        ));
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{}: the secret must be one line of visible ASCII (it travels in a header), \
             e.g. from `openssl rand -hex 32`",
            path.display()
        ));
    }
    Ok(Secret(secret.to_owned()))
}

/// An HTTP CONNECT proxy: `http://[user[:password]@]host:port`. Displays with the password masked.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

impl ProxyUrl {
    /// `host:port` to open a TCP connection to (IPv6 in brackets).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for ProxyUrl {
    type Err = String;

    /// Errors never repeat the password.
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "proxy URL scheme {scheme:?} is not supported: pushrelay speaks plain HTTP CONNECT \
                     to the proxy, write http://host:port"
                ));
            }
            None => s,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let shown = match userinfo {
            Some(_) => format!("http://***@{hostport}"),
            None => format!("http://{hostport}"),
        };
        if hostport.contains('/') || hostport.contains('?') {
            return Err(format!("proxy URL {shown:?} must not have a path"));
        }
        let (host, port) = Authority::split_host_port(hostport)
            .map_err(|_| format!("proxy URL {shown:?} has an invalid host or port"))?;
        let port =
            port.ok_or_else(|| format!("proxy URL {shown:?} has no port: write http://host:port"))?;
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, pass) = match u.split_once(':') {
                    Some((user, pass)) => (user, Some(pass)),
                    None => (u, None),
                };
                let user = percent_decode(user)
                    .ok_or_else(|| format!("proxy URL {shown:?}: bad %-escape in user"))?;
                let pass = match pass {
                    Some(p) => Some(Secret(percent_decode(p).ok_or_else(|| {
                        format!("proxy URL {shown:?}: bad %-escape in password")
                    })?)),
                    None => None,
                };
                (Some(user), pass)
            }
        };
        Ok(ProxyUrl {
            host: host.into_owned(),
            port,
            username,
            password,
        })
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("http://")?;
        if let Some(user) = &self.username {
            f.write_str(user)?;
            if self.password.is_some() {
                f.write_str(":***")?;
            }
            f.write_str("@")?;
        }
        f.write_str(&self.address())
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The DMZ relay an inside relay reaches over HTTP/1.1 (`upstream.relay.url`):
/// `https://host[:port]` (TLS through a CONNECT tunnel) or `http://host[:port]` (plain, in
/// absolute form through the proxy). The port defaults to the scheme's.
#[derive(Clone, PartialEq, Eq)]
pub struct RelayUrl {
    pub tls: bool,
    pub authority: Authority,
}

impl FromStr for RelayUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (tls, rest) = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (true, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (false, rest),
            _ => {
                return Err(format!(
                    "relay URL {s:?} must start with https:// (TLS to the DMZ relay) or http://"
                ));
            }
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err(format!(
                "relay URL {s:?} must not carry credentials: the DMZ relay knows this one by \
                 upstream.relay.secret_file"
            ));
        }
        if rest.contains('/') || rest.contains('?') {
            return Err(format!("relay URL {s:?} must not have a path"));
        }
        let (host, port) = Authority::split_host_port(rest)
            .map_err(|_| format!("relay URL {s:?} has an invalid host or port"))?;
        let port = port.unwrap_or(if tls { 443 } else { 80 });
        let authority = Authority::new(&host, port).map_err(|e| format!("relay URL {s:?}: {e}"))?;
        Ok(RelayUrl { tls, authority })
    }
}

impl fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority)
    }
}

impl fmt::Debug for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Serde through `FromStr` / `Display`, for the string-shaped config types.
macro_rules! serde_via_str {
    ($ty:ty) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}
serde_via_str!(ProxyUrl);
serde_via_str!(RelayUrl);
serde_via_str!(Authority);
