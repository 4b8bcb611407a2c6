//! The one place an error becomes an HTTP answer. pushrelay's own failures answer with a JSON reason
//! that starts with `Relay`, never an APNs reason: `BadDeviceToken`, `Unregistered` and their kin make
//! push servers delete devices, so pushrelay must never say them on Apple's behalf.

use http::{HeaderValue, Response, StatusCode, header};

use crate::policy::Authority;
use crate::upstream::chain::ChainError;
use crate::upstream::connect::ConnectError;
use crate::upstream::identity::IdentityRefused;
use crate::upstream::tunnel::TunnelError;
use crate::upstream::{PoolError, UpstreamError};

/// Why a request cannot be relayed as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the request names no host (neither :authority, an absolute target nor Host)")]
    NoHost,
    #[error("the request target's host {target:?} differs from Host {host:?}")]
    HostMismatch { target: String, host: String },
    #[error("invalid host {0:?}")]
    BadHost(String),
    #[error("more than one Host header")]
    DuplicateHost,
}

/// Whose fault a failure was: decides the log level, and later metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Policy,
    Upstream,
    Relay,
}

/// Why a body (the client's request, or the origin's answer) could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("body not complete within {after:?}")]
    Timeout { after: std::time::Duration },
    #[error("body broke off: {0}")]
    Broken(#[source] crate::upstream::BoxError),
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error("request for {authority:?} on a TLS connection for {sni:?}")]
    Misdirected { sni: String, authority: String },
    #[error("destination {0} is not in the allowlist")]
    DestinationNotAllowed(Authority),
    #[error("method {0} is not relayed")]
    MethodNotAllowed(String),
    #[error("the relay secret (pushrelay-relay-secret) is {}", if *.missing { "missing" } else { "wrong" })]
    ChainSecret { missing: bool },
    #[error(transparent)]
    IdentityNotAllowed(#[from] IdentityRefused),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("proxy credentials missing or wrong")]
    ProxyCredentials,
    #[error("this client has {0} tunnels open already")]
    TooManyTunnels(usize),
    #[error("tunnel to {dest}: {source}")]
    Tunnel {
        dest: Authority,
        #[source]
        source: Box<ConnectError>,
    },
    #[error("client's request body: {0}")]
    RequestBody(#[source] ReadError),
    #[error("origin's answer on connection {conn}: {source}")]
    AnswerBody {
        conn: u64,
        #[source]
        source: ReadError,
    },
    #[error("this client connection already has {limit} requests upstream")]
    ConnectionBusy { limit: usize },
}

impl RelayError {
    /// The status, the reason for the JSON body, and whose fault it was.
    pub fn classify(&self) -> (StatusCode, &'static str, Fault) {
        use StatusCode as S;
        match self {
            RelayError::BadRequest(_) | RelayError::Head(_) => {
                (S::BAD_REQUEST, "RelayBadRequest", Fault::Client)
            }
            RelayError::Misdirected { .. } => (
                S::MISDIRECTED_REQUEST,
                "RelayMisdirectedRequest",
                Fault::Client,
            ),
            RelayError::DestinationNotAllowed(_) => {
                (S::FORBIDDEN, "RelayDestinationNotAllowed", Fault::Policy)
            }
            RelayError::MethodNotAllowed(_) => (
                S::METHOD_NOT_ALLOWED,
                "RelayMethodNotAllowed",
                Fault::Policy,
            ),
            RelayError::IdentityNotAllowed(_) => {
                (S::FORBIDDEN, "RelayIdentityNotAllowed", Fault::Policy)
            }
            RelayError::ChainSecret { .. } => {
                (S::FORBIDDEN, "RelayChainSecretRejected", Fault::Policy)
            }
            RelayError::Upstream(e) => classify_upstream(e),
            RelayError::ProxyCredentials => (
                S::PROXY_AUTHENTICATION_REQUIRED,
                "RelayProxyCredentialsRequired",
                Fault::Client,
            ),
            RelayError::TooManyTunnels(_) => {
                (S::TOO_MANY_REQUESTS, "RelayTooManyTunnels", Fault::Client)
            }
            RelayError::Tunnel { source, .. } => classify_connect(source),
            RelayError::RequestBody(e) => match e {
                ReadError::TooLarge { .. } => {
                    (S::PAYLOAD_TOO_LARGE, "RelayRequestTooLarge", Fault::Client)
                }
                ReadError::Timeout { .. } => {
                    (S::REQUEST_TIMEOUT, "RelayRequestTimeout", Fault::Client)
                }
                ReadError::Broken(_) => (S::BAD_REQUEST, "RelayClientBodyFailed", Fault::Client),
            },
            RelayError::AnswerBody { source, .. } => match source {
                ReadError::TooLarge { .. } => (
                    S::BAD_GATEWAY,
                    "RelayUpstreamAnswerTooLarge",
                    Fault::Upstream,
                ),
                ReadError::Timeout { .. } => {
                    (S::GATEWAY_TIMEOUT, "RelayUpstreamTimeout", Fault::Upstream)
                }
                ReadError::Broken(_) => (S::BAD_GATEWAY, "RelayUpstreamReset", Fault::Upstream),
            },
            RelayError::ConnectionBusy { .. } => {
                (S::SERVICE_UNAVAILABLE, "RelayOverloaded", Fault::Client)
            }
        }
    }

    /// pushrelay's answer for this error, in whatever body type the door answers with,
    /// carrying the client's `apns-id` when it sent one.
    pub fn to_response<B: From<String>>(&self, apns_id: Option<&HeaderValue>) -> Response<B> {
        let (status, reason, _) = self.classify();
        relay_response(status, reason, apns_id)
    }
}

/// A request refused before anything was relayed, by kind: the HTTP/1.1 reader says which kind
/// its errors are (`Http1Error::refusal`); the status and reason are decided here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The head is over `limits.max_header_bytes`, or has too many fields.
    HeadTooLarge,
    /// An `Expect` other than `100-continue`.
    ExpectationFailed,
    /// Malformed or ambiguous (smuggling shapes included).
    Malformed,
    /// The head did not arrive within `limits.handshake_timeout`.
    HeadTimeout,
    /// A chunk size says the body is over `limits.max_request_body`.
    BodyTooLarge,
}

impl Refusal {
    /// The status, the reason for the JSON body, and whose fault it was.
    pub fn classify(self) -> (StatusCode, &'static str, Fault) {
        use StatusCode as S;
        match self {
            Refusal::HeadTooLarge => (
                S::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "RelayRequestHeaderTooLarge",
                Fault::Client,
            ),
            Refusal::ExpectationFailed => (
                S::EXPECTATION_FAILED,
                "RelayExpectationFailed",
                Fault::Client,
            ),
            Refusal::Malformed => (S::BAD_REQUEST, "RelayBadRequest", Fault::Client),
            Refusal::HeadTimeout => (S::REQUEST_TIMEOUT, "RelayRequestTimeout", Fault::Client),
            Refusal::BodyTooLarge => (S::PAYLOAD_TOO_LARGE, "RelayRequestTooLarge", Fault::Client),
        }
    }

    /// pushrelay's answer for this refusal (with a new `apns-id`: no request was read).
    pub fn to_response<B: From<String>>(self) -> Response<B> {
        let (status, reason, _) = self.classify();
        relay_response(status, reason, None)
    }
}

/// A JSON answer `{"reason":"…"}` with `status` and an `apns-id`: the client's, else a new one,
/// as Apple always sends one and APNs clients (aioapns) fail on an answer without it.
pub fn relay_response<B: From<String>>(
    status: StatusCode,
    reason: &str,
    apns_id: Option<&HeaderValue>,
) -> Response<B> {
    let body = format!("{{\"reason\":\"{reason}\"}}");
    let length = HeaderValue::from(body.len());
    let mut response = Response::new(B::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, length);
    let id = apns_id.cloned().unwrap_or_else(new_apns_id);
    headers.insert(APNS_ID, id);
    response
}

const APNS_ID: header::HeaderName = header::HeaderName::from_static("apns-id");

/// A random UUID (version 4, RFC 9562) in its lowercase text form, from the TLS provider's
/// system random source.
pub fn new_apns_id() -> HeaderValue {
    use std::fmt::Write;
    let mut b = [0u8; 16];
    if rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut b)
        .is_err()
    {
        // No system randomness: a unique but predictable id still lets the client correlate.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        b[8..].copy_from_slice(&n.to_be_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut text = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text.push('-');
        }
        let _ = write!(text, "{byte:02x}");
    }
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn classify_upstream(e: &UpstreamError) -> (StatusCode, &'static str, Fault) {
    use StatusCode as S;
    match e {
        // One status per cause: a request that waited for the failed connect and one failed fast
        // because of it get the same answer.
        UpstreamError::Pool(
            PoolError::Connect { source, .. }
            | PoolError::BackingOff { source, .. }
            | PoolError::Reconnecting { source, .. },
        ) => classify_connect(source),
        UpstreamError::Pool(PoolError::Connecting { .. }) => {
            (S::GATEWAY_TIMEOUT, "RelayUpstreamTimeout", Fault::Upstream)
        }
        UpstreamError::Pool(PoolError::QueueFull { .. } | PoolError::WaitTimeout { .. }) => {
            (S::SERVICE_UNAVAILABLE, "RelayOverloaded", Fault::Relay)
        }
        UpstreamError::Pool(
            PoolError::TooManyIdentities { .. } | PoolError::IdentityRate { .. },
        ) => (
            S::SERVICE_UNAVAILABLE,
            "RelayTooManyIdentities",
            Fault::Relay,
        ),
        UpstreamError::Timeout { .. } => {
            (S::GATEWAY_TIMEOUT, "RelayUpstreamTimeout", Fault::Upstream)
        }
        UpstreamError::Stream { .. } | UpstreamError::NativeStream { .. } => {
            (S::BAD_GATEWAY, "RelayUpstreamReset", Fault::Upstream)
        }
        UpstreamError::Chain(e) => classify_chain(e),
    }
}

/// A relay chain's own failures name the hop to the DMZ relay; the proxy's keep their reasons.
fn classify_chain(e: &ChainError) -> (StatusCode, &'static str, Fault) {
    use StatusCode as S;
    let up = Fault::Upstream;
    match e {
        ChainError::ProxyAnswered { status: 407, .. } => {
            (S::BAD_GATEWAY, "RelayProxyAuthenticationRequired", up)
        }
        ChainError::ProxyAnswered { .. } => (S::BAD_GATEWAY, "RelayProxyRefused", up),
        ChainError::Timeout { .. } => (S::GATEWAY_TIMEOUT, "RelayChainTimeout", up),
        ChainError::TlsRefused { .. } => (S::BAD_GATEWAY, "RelayChainTlsFailed", up),
        ChainError::Exchange {
            source: crate::upstream::chain::WireError::Malformed(_),
            ..
        } => (S::BAD_GATEWAY, "RelayChainProtocolError", up),
        ChainError::Exchange { .. } => (S::BAD_GATEWAY, "RelayChainReset", up),
    }
}

/// A step on the way to a relay chain's DMZ relay: the proxy's failures keep their reasons.
fn classify_chain_connect(e: &ConnectError) -> (StatusCode, &'static str, Fault) {
    use StatusCode as S;
    let up = Fault::Upstream;
    match e {
        ConnectError::Tunnel(_) => classify_connect(e),
        e if e.is_timeout() => (S::GATEWAY_TIMEOUT, "RelayChainTimeout", up),
        ConnectError::Tls { .. } | ConnectError::CertificateRefused { .. } => {
            (S::BAD_GATEWAY, "RelayChainTlsFailed", up)
        }
        _ => (S::BAD_GATEWAY, "RelayChainUnreachable", up),
    }
}

fn classify_connect(e: &ConnectError) -> (StatusCode, &'static str, Fault) {
    use StatusCode as S;
    let up = Fault::Upstream;
    match e {
        ConnectError::Tunnel(t) => match t {
            TunnelError::Refused { status: 407, .. } => {
                (S::BAD_GATEWAY, "RelayProxyAuthenticationRequired", up)
            }
            TunnelError::Refused { .. } => (S::BAD_GATEWAY, "RelayProxyRefused", up),
            TunnelError::Connect { .. } => (S::BAD_GATEWAY, "RelayProxyUnreachable", up),
            TunnelError::ConnectTimeout { .. } | TunnelError::ReplyTimeout { .. } => {
                (S::GATEWAY_TIMEOUT, "RelayProxyTimeout", up)
            }
            TunnelError::Malformed { .. } | TunnelError::Closed { .. } | TunnelError::Io { .. } => {
                (S::BAD_GATEWAY, "RelayProxyFailed", up)
            }
        },
        ConnectError::Resolve { .. } => (S::BAD_GATEWAY, "RelayUpstreamUnresolvable", up),
        ConnectError::Tcp { .. } => (S::BAD_GATEWAY, "RelayUpstreamUnreachable", up),
        ConnectError::Tls { .. } | ConnectError::CertificateRefused { .. } => {
            (S::BAD_GATEWAY, "RelayUpstreamTlsFailed", up)
        }
        ConnectError::NoH2 { .. } => (S::BAD_GATEWAY, "RelayUpstreamNoHttp2", up),
        ConnectError::H2 { .. } | ConnectError::Http2 { .. } => {
            (S::BAD_GATEWAY, "RelayUpstreamProtocolError", up)
        }
        ConnectError::ResolveTimeout { .. }
        | ConnectError::TcpTimeout { .. }
        | ConnectError::TlsTimeout { .. }
        | ConnectError::H2Timeout { .. } => (S::GATEWAY_TIMEOUT, "RelayUpstreamTimeout", up),
        ConnectError::Relay { source, .. } => classify_chain_connect(source),
    }
}

/// The hop that failed and the proxy's own status, for the log line.
pub fn hop_of(e: &RelayError) -> (&'static str, Option<u16>) {
    match e {
        RelayError::Upstream(UpstreamError::Pool(
            PoolError::Connect { source, .. }
            | PoolError::BackingOff { source, .. }
            | PoolError::Reconnecting { source, .. },
        )) => (
            source.hop(),
            source.tunnel().and_then(TunnelError::proxy_status),
        ),
        RelayError::Upstream(UpstreamError::Pool(_)) => ("pool", None),
        RelayError::Tunnel { source, .. } => {
            let status = match source.as_ref() {
                ConnectError::Tunnel(t) => t.proxy_status(),
                _ => None,
            };
            (source.hop(), status)
        }
        RelayError::Upstream(UpstreamError::Chain(e)) => (e.hop(), e.proxy_status()),
        RelayError::Upstream(
            UpstreamError::Timeout { .. }
            | UpstreamError::Stream { .. }
            | UpstreamError::NativeStream { .. },
        ) => ("origin", None),
        RelayError::AnswerBody { .. } => ("origin", None),
        _ => ("client", None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_reasons_never_use_apns_vocabulary() {
        let apns = [
            "BadDeviceToken",
            "Unregistered",
            "MissingDeviceToken",
            "DeviceTokenNotForTopic",
            "BadTopic",
        ];
        let errors = [
            RelayError::BadRequest("x".into()),
            RelayError::Head(HeadError::NoHost),
            RelayError::DestinationNotAllowed("a.example:443".parse().unwrap()),
            RelayError::Upstream(UpstreamError::Timeout {
                after: std::time::Duration::from_secs(1),
            }),
            RelayError::RequestBody(ReadError::TooLarge { limit: 1 }),
        ];
        for e in errors {
            let (_, reason, _) = e.classify();
            assert!(reason.starts_with("Relay"), "{reason}");
            assert!(!apns.contains(&reason));
        }
    }

    #[test]
    fn relay_answers_carry_the_clients_apns_id_else_a_new_uuid_v4() {
        let theirs = HeaderValue::from_static("7b3f1c2a-0000-4000-8000-0000000000aa");
        let kept: Response<String> = relay_response(
            StatusCode::BAD_GATEWAY,
            "RelayUpstreamUnreachable",
            Some(&theirs),
        );
        assert_eq!(kept.headers()["apns-id"], theirs);
        let a: Response<String> =
            relay_response(StatusCode::BAD_GATEWAY, "RelayUpstreamUnreachable", None);
        let b: Response<String> =
            relay_response(StatusCode::BAD_GATEWAY, "RelayUpstreamUnreachable", None);
        let id = a.headers()["apns-id"].to_str().unwrap().to_owned();
        assert_ne!(a.headers()["apns-id"], b.headers()["apns-id"]);
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
        assert!(
            id.bytes()
                .all(|c| c == b'-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(&id[14..15], "4", "{id}");
        assert!("89ab".contains(&id[19..20]), "{id}");
    }

    #[test]
    fn proxy_407_is_a_502_naming_proxy_authentication() {
        let e = RelayError::Upstream(UpstreamError::Pool(PoolError::Connect {
            dest: "api.push.apple.com:443".into(),
            source: std::sync::Arc::new(ConnectError::Tunnel(TunnelError::Refused {
                proxy: "http://proxy:3128".into(),
                target: "api.push.apple.com:443".into(),
                status: 407,
                reason: "Proxy Authentication Required".into(),
                headers: vec![],
            })),
        }));
        assert_eq!(e.classify().0, StatusCode::BAD_GATEWAY);
        assert_eq!(e.classify().1, "RelayProxyAuthenticationRequired");
        assert_eq!(hop_of(&e), ("proxy", Some(407)));
    }
}
