//! Test fixtures, all on 127.0.0.1 port 0: the test PKI (from the same code as `pushrelay ca init`),
//! a fake APNs origin, a CONNECT proxy, an HTTP/2 client and the relay itself, in-process.
// Each test binary uses a different part of the fixtures.
#![allow(dead_code)]

pub mod chain;
pub mod client;
pub mod forward;
pub mod http1;
pub mod logs;
pub mod origin;
pub mod pki;
pub mod proxy;
pub mod relay;
pub mod tls_echo;

use std::future::Future;
use std::time::Duration;

/// Defines an async test once per upstream HTTP/2 client, as `NAME::h2` and `NAME::native`: every
/// relay the test starts through `relay::start*`, and every pool it builds through
/// `relay::pool_for_current_client`, gets that `upstream.http2_client`. The body is the test's;
/// `#[doc]` lines are kept on both. `paused:` first runs both on paused time.
#[macro_export]
macro_rules! for_each_http2_client {
    (paused: $($test:tt)*) => {
        $crate::for_each_http2_client!(@as [tokio::test(start_paused = true)] $($test)*);
    };
    (@as [$($attr:tt)*] $(#[doc = $doc:expr])* async fn $name:ident() $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[doc = $doc])*
            #[$($attr)*]
            async fn h2() {
                $crate::support::relay::with_http2_client("h2", async $body).await
            }
            $(#[doc = $doc])*
            #[$($attr)*]
            async fn native() {
                $crate::support::relay::with_http2_client("native", async $body).await
            }
        }
    };
    ($($test:tt)*) => {
        $crate::for_each_http2_client!(@as [tokio::test] $($test)*);
    };
}

/// Bounds a test step in time so a bug fails the test instead of hanging it.
pub async fn within<F: Future>(secs: u64, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs}s"),
    }
}

/// A 64-hex-digit device token, different per `n`.
pub fn token(n: usize) -> String {
    format!("{:064x}", n as u128 * 0x9e37_79b9_7f4a_7c15 + 1)
}
