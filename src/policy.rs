//! Allowlists as pure data: which client addresses may connect, and which `host:port` pairs pushrelay
//! may ever connect to. Host names compare case-insensitively and without a trailing dot, IPv6 hosts
//! are held without brackets, and IPv4-mapped IPv6 clients are judged as the IPv4 address they are.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::fasthash::FastSet;

/// A destination `host:port`, normalised: lower-case host, no trailing dot, IPv6 without brackets.
/// Written out once (`host:port`, IPv6 in brackets) and shared, so cloning one per request, using
/// it as a pool key or a metrics label, costs no allocation.
#[derive(Clone, PartialEq, Eq)]
pub struct Authority {
    /// `host:port` as `Display` writes it.
    text: Arc<str>,
    /// Where the host is in `text`.
    host: std::ops::Range<usize>,
    port: u16,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("host", &self.host())
            .field("port", &self.port)
            .finish()
    }
}

/// The text alone says everything (host and port are parts of it), so only it is hashed.
impl std::hash::Hash for Authority {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

impl PartialOrd for Authority {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Authority {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.host(), self.port).cmp(&(other.host(), other.port))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthorityError {
    #[error("{0:?} has no port: write host:port, e.g. api.push.apple.com:443")]
    MissingPort(String),
    #[error("{0:?} has an invalid port (1-65535)")]
    BadPort(String),
    #[error("{0:?} has an invalid host name")]
    BadHost(String),
}

impl Authority {
    /// Builds an authority from a host (any case, brackets and trailing dot allowed) and a port.
    pub fn new(host: &str, port: u16) -> Result<Self, AuthorityError> {
        let host = normalize_host(host).ok_or_else(|| AuthorityError::BadHost(host.to_owned()))?;
        if port == 0 {
            return Err(AuthorityError::BadPort(format!("{host}:0")));
        }
        Ok(Authority::from_parts(&host, port))
    }

    fn from_parts(host: &str, port: u16) -> Self {
        let (text, start) = if host.contains(':') {
            (format!("[{host}]:{port}"), 1)
        } else {
            (format!("{host}:{port}"), 0)
        };
        Authority {
            text: text.into(),
            host: start..start + host.len(),
            port,
        }
    }

    pub fn host(&self) -> &str {
        &self.text[self.host.clone()]
    }

    /// `host:port`, as `Display` writes it, shared.
    pub fn as_shared_str(&self) -> &Arc<str> {
        &self.text
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Splits `host[:port]` as written in a `Host` header or `:authority`; the port is optional here.
    pub fn split_host_port(s: &str) -> Result<(Cow<'_, str>, Option<u16>), AuthorityError> {
        let bad_host = || AuthorityError::BadHost(s.to_owned());
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (v6, after) = rest.split_once(']').ok_or_else(bad_host)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(bad_host)?),
            };
            (v6, port)
        } else {
            match s.rsplit_once(':') {
                // More than one colon without brackets is a bare IPv6 address, which has no port.
                Some((h, _)) if h.contains(':') => (s, None),
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(AuthorityError::BadPort(s.to_owned())),
            },
        };
        let host = normalized_host(host).ok_or_else(bad_host)?;
        Ok((host, port))
    }
}

impl FromStr for Authority {
    type Err = AuthorityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match Authority::split_host_port(s)? {
            (host, Some(port)) => Ok(Authority::from_parts(&host, port)),
            (_, None) => Err(AuthorityError::MissingPort(s.to_owned())),
        }
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Lower-cases a host, drops one trailing dot and IPv6 brackets; `None` when it cannot be a host.
pub fn normalize_host(host: &str) -> Option<String> {
    normalized_host(host).map(Cow::into_owned)
}

/// As `normalize_host`, borrowing when the host is already in normal form (the usual case).
pub fn normalized_host(host: &str) -> Option<Cow<'_, str>> {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    // An IPv4 address starts with a digit and an IPv6 one holds a colon; a name is not parsed.
    let bytes = host.as_bytes();
    if (bytes.first().is_some_and(u8::is_ascii_digit) || bytes.contains(&b':'))
        && let Ok(ip) = host.parse::<IpAddr>()
    {
        return Some(Cow::Owned(ip.to_string()));
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 {
        return None;
    }
    // Labels of 1 to 63 letters, digits, '-' or '_', in one pass.
    let (mut label, mut upper) = (0usize, false);
    for &b in host.as_bytes() {
        if b == b'.' {
            if label == 0 {
                return None;
            }
            label = 0;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return None;
        }
        upper |= b.is_ascii_uppercase();
        label += 1;
        if label > 63 {
            return None;
        }
    }
    if label == 0 {
        None
    } else if upper {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

/// Client addresses allowed to connect. Empty means nobody.
#[derive(Clone, Debug, Default)]
pub struct SourcePolicy {
    nets: Vec<IpNet>,
}

impl SourcePolicy {
    pub fn new(nets: Vec<IpNet>) -> Self {
        SourcePolicy { nets }
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    pub fn allows(&self, addr: IpAddr) -> bool {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
            v4 => v4,
        };
        self.nets.iter().any(|net| net.contains(&addr))
    }
}

/// The only `host:port` pairs pushrelay connects to. Empty means none.
#[derive(Clone, Debug, Default)]
pub struct DestinationPolicy {
    allowed: FastSet<Authority>,
}

impl DestinationPolicy {
    pub fn new(allowed: impl IntoIterator<Item = Authority>) -> Self {
        DestinationPolicy {
            allowed: allowed.into_iter().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.allowed.is_empty()
    }

    pub fn allows(&self, dest: &Authority) -> bool {
        self.allowed.contains(dest)
    }

    /// Every allowed `host:port`, sorted (for the status page).
    pub fn allowed(&self) -> Vec<&Authority> {
        let mut all: Vec<&Authority> = self.allowed.iter().collect();
        all.sort_by_key(|a| a.to_string());
        all
    }

    /// Host names allowed on `port`, sorted: the names a pre-proxy listener presents certificates for.
    pub fn hosts_on_port(&self, port: u16) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .allowed
            .iter()
            .filter(|a| a.port == port)
            .map(|a| a.host().to_owned())
            .collect();
        hosts.sort();
        hosts
    }

    /// Every allowed host name, on any port, sorted and once each: what a forward-proxy listener
    /// presents certificates for.
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self.allowed.iter().map(|a| a.host().to_owned()).collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(s: &str) -> Authority {
        s.parse().unwrap()
    }

    #[test]
    fn authority_parsing_table() {
        let ok = [
            ("api.push.apple.com:443", "api.push.apple.com", 443),
            ("API.Push.Apple.COM.:2197", "api.push.apple.com", 2197),
            ("127.0.0.1:8443", "127.0.0.1", 8443),
            ("[::1]:443", "::1", 443),
            ("[0:0:0:0:0:0:0:1]:443", "::1", 443),
        ];
        for (input, host, port) in ok {
            let a = auth(input);
            assert_eq!((a.host(), a.port()), (host, port), "{input}");
        }
        let bad = [
            (
                "api.push.apple.com",
                AuthorityError::MissingPort("api.push.apple.com".into()),
            ),
            (
                "api.push.apple.com:0",
                AuthorityError::BadPort("api.push.apple.com:0".into()),
            ),
            (
                "api.push.apple.com:99999",
                AuthorityError::BadPort("api.push.apple.com:99999".into()),
            ),
            (
                "api.push.apple.com:x",
                AuthorityError::BadPort("api.push.apple.com:x".into()),
            ),
            (":443", AuthorityError::BadHost(":443".into())),
            ("a b:443", AuthorityError::BadHost("a b:443".into())),
            ("[::1:443", AuthorityError::BadHost("[::1:443".into())),
            ("::1", AuthorityError::MissingPort("::1".into())),
        ];
        for (input, err) in bad {
            assert_eq!(input.parse::<Authority>(), Err(err), "{input}");
        }
    }

    #[test]
    fn host_name_table() {
        let long_label = "a".repeat(63);
        let too_long_label = "a".repeat(64);
        let long_name = format!("{long_label}.{long_label}.{long_label}.{}", "a".repeat(61));
        let ok: [(&str, &str, bool); 10] = [
            ("api.push.apple.com", "api.push.apple.com", true),
            ("API.push.Apple.com", "api.push.apple.com", false),
            ("api.push.apple.com.", "api.push.apple.com", true),
            ("1password.com", "1password.com", true),
            ("a-b_c.example", "a-b_c.example", true),
            ("127.0.0.1", "127.0.0.1", false),
            ("::1", "::1", false),
            ("0:0::1", "::1", false),
            (&long_label, &long_label, true),
            (&long_name, &long_name, true),
        ];
        for (input, want, borrowed) in ok {
            let got = normalized_host(input).unwrap_or_else(|| panic!("{input:?} refused"));
            assert_eq!(got, want, "{input:?}");
            assert_eq!(matches!(got, Cow::Borrowed(_)), borrowed, "{input:?}");
        }
        let too_long_name = format!("{long_name}a");
        let bad = [
            "",
            ".",
            "a..b",
            ".a",
            "a b",
            "a/b",
            "ex\u{e4}mple.com",
            "a:b",
            "1.2.3.4.5:",
            &too_long_label,
            &too_long_name,
        ];
        for input in bad {
            assert_eq!(normalized_host(input), None, "{input:?}");
        }
    }

    #[test]
    fn authority_displays_ipv6_in_brackets() {
        assert_eq!(auth("[::1]:443").to_string(), "[::1]:443");
        assert_eq!(auth("Example.org.:80").to_string(), "example.org:80");
    }

    #[test]
    fn host_header_port_is_optional() {
        assert_eq!(
            Authority::split_host_port("api.push.apple.com").unwrap(),
            ("api.push.apple.com".into(), None)
        );
        assert_eq!(
            Authority::split_host_port("Api.Push.Apple.Com:443").unwrap(),
            ("api.push.apple.com".into(), Some(443))
        );
        assert_eq!(
            Authority::split_host_port("[::1]").unwrap(),
            ("::1".into(), None)
        );
    }

    #[test]
    fn sources_match_cidrs_v4_v6_and_mapped() {
        let policy = SourcePolicy::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        let table = [
            ("127.0.0.1", true),
            ("127.9.9.9", true),
            ("128.0.0.1", false),
            ("::1", true),
            ("::2", false),
            ("::ffff:127.0.0.2", true),
            ("::ffff:8.8.8.8", false),
        ];
        for (ip, expected) in table {
            assert_eq!(policy.allows(ip.parse().unwrap()), expected, "{ip}");
        }
    }

    #[test]
    fn empty_policies_deny_everything() {
        assert!(!SourcePolicy::default().allows("127.0.0.1".parse().unwrap()));
        assert!(!DestinationPolicy::default().allows(&auth("api.push.apple.com:443")));
    }

    #[test]
    fn destinations_compare_normalised_and_by_port() {
        let policy = DestinationPolicy::new([
            auth("api.push.apple.com:443"),
            auth("api.sandbox.push.apple.com:443"),
        ]);
        assert!(policy.allows(&auth("API.push.apple.com.:443")));
        assert!(!policy.allows(&auth("api.push.apple.com:2197")));
        assert!(!policy.allows(&auth("evil.example:443")));
        assert_eq!(
            policy.hosts_on_port(443),
            vec![
                "api.push.apple.com".to_string(),
                "api.sandbox.push.apple.com".to_string()
            ]
        );
        assert!(policy.hosts_on_port(2197).is_empty());
    }
}
