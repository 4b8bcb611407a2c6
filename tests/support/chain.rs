//! A relay chain, in-process: a DMZ relay (post-proxy, TLS from the test CA, shared secret) in
//! front of the fake origin, and an inside relay (pre-proxy) whose `upstream.relay` names it.

use std::path::PathBuf;

use super::origin::FakeApns;
use super::pki::TestPki;
use super::relay::{self, RunningRelay, Via};

pub const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// Writes `secret` to a file in the PKI dir and returns its path.
pub fn secret_file(pki: &TestPki, name: &str, secret: &str) -> PathBuf {
    let path = pki.path(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    path
}

/// The DMZ relay: post-proxy over TLS (a certificate for `localhost` from the test CA),
/// requiring the secret in `secret`, letting in `sources`, reaching the origin directly.
pub fn dmz_yaml(
    pki: &TestPki,
    origin: &FakeApns,
    secret: &std::path::Path,
    sources: &str,
) -> String {
    dmz_yaml_on(pki, origin.port(), secret, sources)
}

pub fn dmz_yaml_on(pki: &TestPki, port: u16, secret: &std::path::Path, sources: &str) -> String {
    let tls = format!(
        "    tls:\n      ca_cert: \"{}\"\n      ca_key: \"{}\"\n",
        pki.ca_cert.display(),
        pki.ca_key.display(),
    );
    dmz_yaml_with_tls(pki, port, &tls, secret, sources)
}

fn dmz_yaml_with_tls(
    pki: &TestPki,
    port: u16,
    tls: &str,
    secret: &std::path::Path,
    sources: &str,
) -> String {
    let tls = format!("{tls}    relay_secret_file: \"{}\"\n", secret.display());
    relay::post_proxy_yaml_on(pki, port, "").replace(
        "    allow_sources: [\"127.0.0.1/32\"]\n",
        &format!("{tls}    allow_sources: [{sources}]\n"),
    )
}

/// A DMZ relay that knows the inside relay by its client certificate alone: post-proxy over TLS,
/// every client required to present a certificate from the test CA (`tls.client_ca`), no secret.
pub fn dmz_yaml_client_certs(pki: &TestPki, origin: &FakeApns) -> String {
    let tls = format!(
        "    tls:\n      ca_cert: \"{}\"\n      ca_key: \"{}\"\n      client_ca: \"{}\"\n",
        pki.ca_cert.display(),
        pki.ca_key.display(),
        pki.ca_cert.display(),
    );
    relay::post_proxy_yaml_on(pki, origin.port(), "").replace(
        "    allow_sources: [\"127.0.0.1/32\"]\n",
        &format!("{tls}    allow_sources: [\"127.0.0.1/32\"]\n"),
    )
}

/// The inside relay as `inside_yaml` makes it, known to the DMZ relay by the client certificate
/// `cert` (chain, key) instead of a secret.
pub fn inside_yaml_with_cert(
    pki: &TestPki,
    port: u16,
    proxy: Option<&str>,
    relay_url: &str,
    (cert, key): (&std::path::Path, &std::path::Path),
) -> String {
    let via = match proxy {
        Some(url) => Via::Proxy(url.to_owned()),
        None => Via::Direct,
    };
    format!(
        "{}  relay:\n    url: \"{relay_url}\"\n    client_cert: \"{}\"\n    client_key: \"{}\"\n",
        relay::pre_proxy_yaml_on(pki, port, via),
        cert.display(),
        key.display(),
    )
}

/// The inside relay: pre-proxy for the APNs hosts on `port`, every push through `relay_url`
/// (optionally through the CONNECT proxy at `proxy`), with the secret in `secret`.
pub fn inside_yaml(
    pki: &TestPki,
    port: u16,
    proxy: Option<&str>,
    relay_url: &str,
    secret: &std::path::Path,
) -> String {
    let via = match proxy {
        Some(url) => Via::Proxy(url.to_owned()),
        None => Via::Direct,
    };
    format!(
        "{}  relay:\n    url: \"{relay_url}\"\n    secret_file: \"{}\"\n",
        relay::pre_proxy_yaml_on(pki, port, via),
        secret.display()
    )
}

/// A chain with the DMZ relay started and the inside relay reaching it through `proxy`.
pub async fn start(
    pki: &TestPki,
    origin: &FakeApns,
    proxy: Option<&str>,
) -> (RunningRelay, RunningRelay) {
    let secret = secret_file(pki, "relay.secret", SECRET);
    let dmz = relay::start(&dmz_yaml(pki, origin, &secret, "\"127.0.0.1/32\"")).await;
    let url = format!("https://localhost:{}", dmz.addr().port());
    let inside = relay::start(&inside_yaml(pki, origin.port(), proxy, &url, &secret)).await;
    (inside, dmz)
}

/// A chain whose DMZ relay knows the inside relay by its client certificate alone
/// (`tls.client_ca`, no secret), the inside relay presenting `cert`/`key` and reaching it
/// through `proxy`.
pub async fn start_with_cert(
    pki: &TestPki,
    origin: &FakeApns,
    proxy: Option<&str>,
    cert: (&std::path::Path, &std::path::Path),
) -> (RunningRelay, RunningRelay) {
    let dmz = relay::start(&dmz_yaml_client_certs(pki, origin)).await;
    let url = format!("https://localhost:{}", dmz.addr().port());
    let inside = relay::start(&inside_yaml_with_cert(
        pki,
        origin.port(),
        proxy,
        &url,
        cert,
    ))
    .await;
    (inside, dmz)
}
