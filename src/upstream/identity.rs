//! Which upstream identity a request travels under, so requests of different apps and tenants never
//! share a connection. Certificate-based APNs auth cannot pass a TLS-terminating relay: pushrelay
//! presents the app's certificate itself, chosen by `apns-topic` (an app's VoIP, complication and
//! file-provider topics share its certificate). Token auth passes through, but many JWT issuers on
//! one connection trigger `429 TooManyProviderTokenUpdates`, so each issuer + key id gets its own
//! connections. The JWT is read, never verified: that is Apple's job.

use std::collections::HashSet;
use std::sync::Arc;

use base64::Engine;
use http::HeaderMap;

/// Topic suffixes APNs uses for an app's other push types, all served by the app's certificate.
const TOPIC_SUFFIXES: [&str; 3] = [".voip", ".complication", ".pushkit.fileprovider"];

/// The pool identity for a request: `cert:<topic>` for a configured certificate identity,
/// `jwt:<iss>/<kid>` for token auth, `None` otherwise.
pub fn identity_for(headers: &HeaderMap, cert_topics: &HashSet<String>) -> Option<Arc<str>> {
    if !cert_topics.is_empty()
        && let Some(topic) = headers.get("apns-topic").and_then(|v| v.to_str().ok())
    {
        let base = TOPIC_SUFFIXES
            .iter()
            .find_map(|s| topic.strip_suffix(s))
            .unwrap_or(topic);
        for candidate in [topic, base] {
            if cert_topics.contains(candidate) {
                return Some(format!("cert:{candidate}").into());
            }
        }
    }
    let auth = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let token = auth
        .strip_prefix("bearer ")
        .or_else(|| auth.strip_prefix("Bearer "))?;
    let (iss, kid) = jwt_issuer(token)?;
    Some(format!("jwt:{iss}/{kid}").into())
}

/// `iss` (claims) and `kid` (header) of a compact JWT, unverified.
fn jwt_issuer(token: &str) -> Option<(String, String)> {
    let mut parts = token.trim().split('.');
    let decode = |part: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
    };
    let header = decode(parts.next()?)?;
    let claims = decode(parts.next()?)?;
    Some((
        json_string(&claims, "iss")?,
        json_string(&header, "kid").unwrap_or_default(),
    ))
}

/// The string value of top-level `key` in a small JSON object; enough for JWT headers and claims.
fn json_string(json: &str, key: &str) -> Option<String> {
    let quoted = format!("\"{key}\"");
    let mut rest = &json[json.find(&quoted)? + quoted.len()..];
    rest = rest
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let end = rest.find('"')?;
    let value = &rest[..end];
    (!value.is_empty() && value.len() <= 128).then(|| value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(header: &str, claims: &str) -> String {
        let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2ln", e(header), e(claims))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn certificate_identity_by_topic_and_its_suffixes() {
        let topics: HashSet<String> = ["com.example.app".to_string()].into();
        for topic in [
            "com.example.app",
            "com.example.app.voip",
            "com.example.app.complication",
            "com.example.app.pushkit.fileprovider",
        ] {
            let id = identity_for(&headers(&[("apns-topic", topic)]), &topics);
            assert_eq!(id.as_deref(), Some("cert:com.example.app"), "{topic}");
        }
        assert_eq!(
            identity_for(&headers(&[("apns-topic", "com.other.app")]), &topics),
            None
        );
    }

    #[test]
    fn token_identity_by_issuer_and_key_id() {
        let none = HashSet::new();
        let a = jwt(
            r#"{"alg":"ES256","kid":"KEY1"}"#,
            r#"{"iss":"TEAM1","iat":1}"#,
        );
        let spaced = jwt(
            r#"{ "alg" : "ES256", "kid" : "KEY1" }"#,
            r#"{ "iss" : "TEAM1" }"#,
        );
        let b = jwt(
            r#"{"alg":"ES256","kid":"KEY2"}"#,
            r#"{"iss":"TEAM1","iat":1}"#,
        );
        let id = |t: &str| {
            identity_for(
                &headers(&[("authorization", &format!("bearer {t}"))]),
                &none,
            )
        };
        assert_eq!(id(&a).as_deref(), Some("jwt:TEAM1/KEY1"));
        assert_eq!(id(&spaced), id(&a));
        assert_ne!(id(&a), id(&b));
        assert_eq!(id("not-a-jwt"), None);
        assert_eq!(identity_for(&headers(&[]), &none), None);
    }
}
