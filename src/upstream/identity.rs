//! Which upstream identity a request travels under, so requests of different apps and tenants never
//! share a connection. Certificate-based APNs auth cannot pass a TLS-terminating relay: pushrelay
//! presents the app's certificate itself, chosen by `apns-topic` (an app's VoIP, complication and
//! file-provider topics share its certificate). Any allowed client can send any `apns-topic`, so a
//! certificate identity is used only by the clients bound to it: the listeners it names, and
//! where given the client-certificate subjects; any other request naming its topic is refused.
//! Token auth passes through, but many JWT issuers on
//! one connection trigger `429 TooManyProviderTokenUpdates`, so each issuer + key id gets its own
//! connections. The JWT is read, never verified: that is Apple's job.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use base64::Engine;
use http::{HeaderMap, HeaderValue};

use crate::config::IdentityConfig;

/// Topic suffixes APNs uses for an app's other push types, all served by the app's certificate.
const TOPIC_SUFFIXES: [&str; 3] = [".voip", ".complication", ".pushkit.fileprovider"];

/// `authorization` values remembered with their identity.
const RECENT_TOKENS: usize = 16;

/// A certificate identity and the clients that may use it.
struct CertIdentity {
    /// `cert:<topic>`.
    id: Arc<str>,
    listeners: Vec<String>,
    /// Client-certificate subject common names; empty: any client of those listeners.
    subjects: Vec<String>,
}

/// Who sends a request, as the identity bindings see it.
#[derive(Debug, Clone, Copy)]
pub struct Sender<'a> {
    pub listener: &'a str,
    /// The subject common name of the client's TLS certificate, when it presented one.
    pub client_subject: Option<&'a str>,
}

/// A request whose `apns-topic` names a certificate identity its sender is not bound to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "apns-topic {topic:?} names a certificate identity that listener {listener:?} (client certificate {subject:?}) may not use"
)]
pub struct IdentityRefused {
    pub topic: String,
    pub listener: String,
    pub subject: Option<String>,
}

/// Finds the pool identity of each request.
pub struct Identities {
    /// Each configured certificate topic with its identity and bindings.
    cert_topics: HashMap<String, CertIdentity>,
    /// Recently seen `authorization` values and their identities, newest last. A push client
    /// sends the same JWT for up to an hour, so it is decoded once rather than once per push.
    recent: Mutex<VecDeque<(HeaderValue, Option<Arc<str>>)>>,
}

/// The pool identity of the certificate configured for `topic`.
pub fn certificate_identity(topic: &str) -> Arc<str> {
    format!("cert:{topic}").into()
}

impl Identities {
    pub fn new(configs: &[IdentityConfig]) -> Self {
        Identities {
            cert_topics: configs
                .iter()
                .map(|c| {
                    let identity = CertIdentity {
                        id: certificate_identity(&c.topic),
                        listeners: c.listeners.clone(),
                        subjects: c.client_subjects.clone(),
                    };
                    (c.topic.clone(), identity)
                })
                .collect(),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_TOKENS)),
        }
    }

    /// The pool identity for a request from `sender`: `cert:<topic>` for a configured certificate
    /// identity it is bound to, `jwt:<iss>/<kid>` for token auth, `None` otherwise. A topic of a
    /// certificate identity the sender is not bound to is refused, never sent another way.
    pub fn identity_for(
        &self,
        headers: &HeaderMap,
        sender: Sender<'_>,
    ) -> Result<Option<Arc<str>>, IdentityRefused> {
        if !self.cert_topics.is_empty()
            && let Some(topic) = headers.get("apns-topic").and_then(|v| v.to_str().ok())
        {
            let base = TOPIC_SUFFIXES
                .iter()
                .find_map(|s| topic.strip_suffix(s))
                .unwrap_or(topic);
            let found = self
                .cert_topics
                .get(topic)
                .or_else(|| self.cert_topics.get(base));
            if let Some(cert) = found {
                let listener_ok = cert.listeners.iter().any(|l| l == sender.listener);
                let subject_ok = cert.subjects.is_empty()
                    || sender
                        .client_subject
                        .is_some_and(|s| cert.subjects.iter().any(|c| c == s));
                if listener_ok && subject_ok {
                    return Ok(Some(cert.id.clone()));
                }
                return Err(IdentityRefused {
                    topic: topic.to_owned(),
                    listener: sender.listener.to_owned(),
                    subject: sender.client_subject.map(str::to_owned),
                });
            }
        }
        Ok(self.token_identity_of(headers))
    }

    fn token_identity_of(&self, headers: &HeaderMap) -> Option<Arc<str>> {
        let auth = headers.get(http::header::AUTHORIZATION)?;
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, id)) = recent.iter().rev().find(|(seen, _)| seen == auth) {
            return id.clone();
        }
        let id = token_identity(auth);
        if recent.len() == RECENT_TOKENS {
            recent.pop_front();
        }
        recent.push_back((auth.clone(), id.clone()));
        id
    }
}

/// `jwt:<iss>/<kid>` of a bearer token.
fn token_identity(auth: &HeaderValue) -> Option<Arc<str>> {
    let auth = auth.to_str().ok()?;
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

    const PLAIN: Sender<'static> = Sender {
        listener: "legacy",
        client_subject: None,
    };

    fn identity(topic: &str, listeners: &[&str], subjects: &[&str]) -> IdentityConfig {
        IdentityConfig {
            topic: topic.into(),
            cert: "c.pem".into(),
            key: "c.key".into(),
            listeners: listeners.iter().map(|l| l.to_string()).collect(),
            client_subjects: subjects.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn certificate_identity_by_topic_and_its_suffixes() {
        let ids = Identities::new(&[identity("com.example.app", &["legacy"], &[])]);
        for topic in [
            "com.example.app",
            "com.example.app.voip",
            "com.example.app.complication",
            "com.example.app.pushkit.fileprovider",
        ] {
            let id = ids.identity_for(&headers(&[("apns-topic", topic)]), PLAIN);
            assert_eq!(
                id.unwrap().as_deref(),
                Some("cert:com.example.app"),
                "{topic}"
            );
        }
        assert_eq!(
            ids.identity_for(&headers(&[("apns-topic", "com.other.app")]), PLAIN),
            Ok(None)
        );
    }

    /// A certificate identity is used only by the listeners (and client-certificate subjects) it
    /// is bound to; a topic naming it from anyone else is refused, never sent another way.
    #[test]
    fn certificate_identities_are_bound_to_listeners_and_subjects() {
        let ids = Identities::new(&[
            identity("com.example.open", &["legacy", "apns"], &[]),
            identity("com.example.mtls", &["legacy"], &["corp-proxy"]),
            identity("com.example.unbound", &[], &[]),
        ]);
        let from = |listener, client_subject| Sender {
            listener,
            client_subject,
        };
        let table = [
            ("com.example.open", from("legacy", None), true),
            ("com.example.open", from("apns", None), true),
            ("com.example.open.voip", from("other", None), false),
            ("com.example.open", from("other", Some("corp-proxy")), false),
            ("com.example.mtls", from("legacy", Some("corp-proxy")), true),
            ("com.example.mtls", from("legacy", None), false),
            (
                "com.example.mtls",
                from("legacy", Some("someone-else")),
                false,
            ),
            ("com.example.mtls", from("apns", Some("corp-proxy")), false),
            ("com.example.unbound", from("legacy", None), false),
            (
                "com.example.unbound",
                from("apns", Some("corp-proxy")),
                false,
            ),
        ];
        for (topic, sender, allowed) in table {
            // With a bearer token too: a refused certificate topic never falls back to it.
            let h = headers(&[("apns-topic", topic), ("authorization", "bearer x.y.z")]);
            let got = ids.identity_for(&h, sender);
            assert_eq!(got.is_ok(), allowed, "{topic} from {sender:?}: {got:?}");
            if let Err(e) = got {
                assert_eq!(e.topic, topic);
                assert_eq!(e.listener, sender.listener);
            }
        }
    }

    #[test]
    fn token_identity_by_issuer_and_key_id() {
        let ids = Identities::new(&[]);
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
            ids.identity_for(
                &headers(&[("authorization", &format!("bearer {t}"))]),
                PLAIN,
            )
            .unwrap()
        };
        assert_eq!(id(&a).as_deref(), Some("jwt:TEAM1/KEY1"));
        assert_eq!(id(&spaced), id(&a));
        assert_ne!(id(&a), id(&b));
        assert_eq!(id("not-a-jwt"), None);
        assert_eq!(ids.identity_for(&headers(&[]), PLAIN).unwrap(), None);
    }

    #[test]
    fn remembered_tokens_keep_their_identity_and_the_oldest_is_forgotten() {
        let ids = Identities::new(&[]);
        let bearer = |n: usize| {
            let t = jwt(
                &format!(r#"{{"kid":"K{n}"}}"#),
                &format!(r#"{{"iss":"T{n}"}}"#),
            );
            headers(&[("authorization", &format!("bearer {t}"))])
        };
        for n in 0..RECENT_TOKENS + 5 {
            assert_eq!(
                ids.identity_for(&bearer(n), PLAIN).unwrap().as_deref(),
                Some(&*format!("jwt:T{n}/K{n}"))
            );
            // Asked again, from memory.
            assert_eq!(
                ids.identity_for(&bearer(n), PLAIN).unwrap().as_deref(),
                Some(&*format!("jwt:T{n}/K{n}"))
            );
        }
        assert_eq!(ids.recent.lock().unwrap().len(), RECENT_TOKENS);
        // Forgotten ones are decoded again, to the same answer.
        assert_eq!(
            ids.identity_for(&bearer(0), PLAIN).unwrap().as_deref(),
            Some("jwt:T0/K0")
        );
        let not_jwt = headers(&[("authorization", "bearer nope")]);
        assert_eq!(ids.identity_for(&not_jwt, PLAIN).unwrap(), None);
        assert_eq!(ids.identity_for(&not_jwt, PLAIN).unwrap(), None);
    }
}
