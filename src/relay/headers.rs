//! Header rewriting between a client's request and the origin's HTTP/2 stream, pure and
//! table-tested: hop-by-hop headers go (RFC 9110 §7.6.1, and every header `Connection` names), `Host`
//! becomes `:authority` without staying behind as a stray header, and a request whose target and
//! `Host` disagree is refused.

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};

use crate::error::HeadError;
use crate::policy::Authority;

/// Headers that describe one hop and never cross the relay. `expect` is answered by the relay
/// itself (100 Continue on HTTP/1.1; HTTP/2 needs none); the relay chain's own headers
/// (`pushrelay-relay-secret`, `pushrelay-destination`, `pushrelay-dmz`) are read by the relay at
/// the other end and never go further (nor can a client smuggle one through).
const HOP_BY_HOP_LEN: usize = 11;
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_LEN] = [
    header::EXPECT,
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
    crate::upstream::chain::SECRET_HEADER,
    crate::upstream::chain::DESTINATION_HEADER,
    crate::upstream::chain::DMZ_HEADER,
];

/// Headers whose value is new in every message: an HPACK encoder that indexes them fills its
/// dynamic table with values never seen again, evicting the ones that repeat (`:authority`,
/// `apns-topic`) and walking every stale entry of that name on each lookup. They go as
/// never-indexed literals instead (RFC 7541 §6.2.3), which costs the peer nothing either.
const PER_MESSAGE: [HeaderName; 2] = [
    HeaderName::from_static("apns-id"),
    HeaderName::from_static("apns-unique-id"),
];

/// Marks the per-message headers (`apns-id`, `apns-unique-id`) so HTTP/2 never indexes them.
fn never_index_per_message(headers: &mut HeaderMap) {
    // One pass comparing names is cheaper than hashing each of them for a lookup.
    for (name, value) in headers.iter_mut() {
        if PER_MESSAGE.contains(name) {
            value.set_sensitive(true);
        }
    }
}

/// The host a request names: from the target (`:authority` or absolute-form) or `Host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedHost<'a> {
    /// Normalised host name.
    pub host: Cow<'a, str>,
    /// The port when the request wrote one.
    pub port: Option<u16>,
    /// As the client wrote it.
    pub raw: &'a str,
}

/// Finds the host a request is for. When both the target and `Host` name one, they must agree
/// (ports included, default ports compared as absent).
pub fn named_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Result<NamedHost<'a>, HeadError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(HeadError::DuplicateHost);
    }
    let parse = |raw: &'a str| -> Result<NamedHost<'a>, HeadError> {
        let (host, port) =
            Authority::split_host_port(raw).map_err(|_| HeadError::BadHost(raw.to_owned()))?;
        Ok(NamedHost { host, port, raw })
    };
    let from_target = match uri.authority() {
        Some(a) if a.as_str().contains('@') => {
            return Err(HeadError::BadHost(a.as_str().to_owned()));
        }
        Some(a) => Some(parse(a.as_str())?),
        None => None,
    };
    let from_header = match host_header {
        Some(v) => Some(parse(v.to_str().map_err(|_| {
            HeadError::BadHost(String::from_utf8_lossy(v.as_bytes()).into_owned())
        })?)?),
        None => None,
    };
    match (from_target, from_header) {
        (Some(t), Some(h)) => {
            let default_port = |p: Option<u16>| p.filter(|p| *p != 443 && *p != 80);
            if t.host != h.host || default_port(t.port) != default_port(h.port) {
                return Err(HeadError::HostMismatch {
                    target: t.raw.to_owned(),
                    host: h.raw.to_owned(),
                });
            }
            Ok(t)
        }
        (Some(t), None) => Ok(t),
        (None, Some(h)) => Ok(h),
        (None, None) => Err(HeadError::NoHost),
    }
}

/// Removes hop-by-hop headers, those `Connection` names, `Host`, and `TE` other than `trailers`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One look at each name says which of them are there, so only those are removed: an HTTP/2
    // push carries none, an HTTP/1.1 one usually just `Host`.
    const HOST: u16 = 1 << HOP_BY_HOP_LEN;
    const TE: u16 = HOST << 1;
    let mut found = 0u16;
    for name in headers.keys() {
        if name == header::HOST {
            found |= HOST;
        } else if name == header::TE {
            found |= TE;
        } else if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            found |= 1 << i;
        }
    }
    if found == 0 {
        return;
    }
    if found & HOST != 0 {
        headers.remove(header::HOST);
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if found & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if found & TE == 0 {
        return;
    }
    let keeps_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    headers.remove(header::TE);
    if keeps_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The HTTP/2 request head for the origin: `https://authority/path`, end-to-end headers only.
pub fn upstream_head(
    method: Method,
    uri: &Uri,
    mut headers: HeaderMap,
    authority: http::uri::Authority,
) -> Result<Request<()>, http::Error> {
    strip_hop_by_hop(&mut headers);
    never_index_per_message(&mut headers);
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTPS);
    parts.authority = Some(authority);
    // The client's path as parsed already: shared, not parsed again.
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = Uri::from_parts(parts)?;
    *request.version_mut() = Version::HTTP_2;
    *request.headers_mut() = headers;
    Ok(request)
}

/// Response headers from the origin as they go back to the client. HTTP/2 forbids hop-by-hop
/// headers, but a lenient origin may still send some.
pub fn downstream_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    never_index_per_message(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    type Pairs<'a> = &'a [(&'a str, &'a str)];

    #[test]
    fn named_host_table() {
        let ok: [(&str, Pairs, &str, Option<u16>); 7] = [
            (
                "https://api.push.apple.com/3/device/x",
                &[],
                "api.push.apple.com",
                None,
            ),
            (
                "https://api.push.apple.com:443/3/device/x",
                &[],
                "api.push.apple.com",
                Some(443),
            ),
            (
                "/3/device/x",
                &[("host", "API.push.apple.com")],
                "api.push.apple.com",
                None,
            ),
            (
                "/3/device/x",
                &[("host", "api.push.apple.com:2197")],
                "api.push.apple.com",
                Some(2197),
            ),
            (
                "http://api.push.apple.com/x",
                &[("host", "api.push.apple.com")],
                "api.push.apple.com",
                None,
            ),
            (
                "http://api.push.apple.com:443/x",
                &[("host", "api.push.apple.com")],
                "api.push.apple.com",
                Some(443),
            ),
            ("https://[::1]:8443/x", &[], "::1", Some(8443)),
        ];
        for (uri, h, host, port) in ok {
            let (uri, h) = (uri.parse().unwrap(), headers(h));
            let named = named_host(&uri, &h).unwrap();
            assert_eq!(
                (named.host.as_ref(), named.port),
                (host, port),
                "{uri} {h:?}"
            );
        }
        let bad: [(&str, Pairs, HeadError); 5] = [
            ("/x", &[], HeadError::NoHost),
            (
                "http://api.push.apple.com/x",
                &[("host", "evil.example")],
                HeadError::HostMismatch {
                    target: "api.push.apple.com".into(),
                    host: "evil.example".into(),
                },
            ),
            (
                "http://api.push.apple.com:2197/x",
                &[("host", "api.push.apple.com")],
                HeadError::HostMismatch {
                    target: "api.push.apple.com:2197".into(),
                    host: "api.push.apple.com".into(),
                },
            ),
            (
                "/x",
                &[("host", "a.example"), ("host", "b.example")],
                HeadError::DuplicateHost,
            ),
            (
                "/x",
                &[("host", "bad host")],
                HeadError::BadHost("bad host".into()),
            ),
        ];
        for (uri, h, err) in bad {
            assert_eq!(
                named_host(&uri.parse().unwrap(), &headers(h)),
                Err(err),
                "{uri} {h:?}"
            );
        }
    }

    #[test]
    fn userinfo_in_target_is_refused() {
        let err = named_host(
            &"http://user@api.push.apple.com/x".parse().unwrap(),
            &HeaderMap::new(),
        )
        .unwrap_err();
        assert!(matches!(err, HeadError::BadHost(_)));
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Private-Hop"),
            ("x-private-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "gzip, trailers"),
            ("host", "api.push.apple.com"),
            ("apns-topic", "com.example.app"),
            ("apns-id", "123e4567-e89b-12d3-a456-426614174000"),
            ("authorization", "bearer eyJ"),
            ("content-length", "12"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "apns-id",
                "apns-topic",
                "authorization",
                "content-length",
                "te"
            ]
        );
        assert_eq!(h["te"], "trailers");
        let mut no_trailers = headers(&[("te", "gzip")]);
        strip_hop_by_hop(&mut no_trailers);
        assert!(no_trailers.is_empty());
    }

    #[test]
    fn connection_may_name_te_and_host_too() {
        let mut h = headers(&[
            ("host", "api.push.apple.com"),
            ("connection", "te, x-hop"),
            ("te", "trailers"),
            ("x-hop", "1"),
            ("apns-topic", "t"),
        ]);
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["apns-topic"]);
    }

    #[test]
    fn per_message_headers_are_never_indexed_either_way() {
        let uri: Uri = "/3/device/abc".parse().unwrap();
        let h = headers(&[
            ("apns-id", "123e4567-e89b-12d3-a456-426614174000"),
            ("apns-topic", "t"),
        ]);
        let req = upstream_head(
            Method::POST,
            &uri,
            h.clone(),
            "api.push.apple.com".parse().unwrap(),
        )
        .unwrap();
        assert!(req.headers()["apns-id"].is_sensitive());
        assert!(!req.headers()["apns-topic"].is_sensitive());
        let mut answer = headers(&[
            ("apns-unique-id", "u"),
            ("apns-id", "i"),
            ("content-type", "x"),
        ]);
        downstream_headers(&mut answer);
        assert!(answer["apns-unique-id"].is_sensitive());
        assert!(answer["apns-id"].is_sensitive());
        assert!(!answer["content-type"].is_sensitive());
    }

    #[test]
    fn upstream_head_uses_authority_and_drops_host() {
        let req = upstream_head(
            Method::POST,
            &"/3/device/abc?x=1".parse().unwrap(),
            headers(&[("host", "api.push.apple.com"), ("apns-topic", "t")]),
            http::uri::Authority::from_static("api.push.apple.com"),
        )
        .unwrap();
        assert_eq!(
            req.uri().to_string(),
            "https://api.push.apple.com/3/device/abc?x=1"
        );
        assert_eq!(req.version(), Version::HTTP_2);
        assert!(req.headers().get("host").is_none());
        assert_eq!(req.headers()["apns-topic"], "t");
    }
}
