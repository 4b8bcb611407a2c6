//! pushrelay's own HTTP/2 client codec for the upstream (APNs-facing) side, written so that a
//! worker owns each connection outright: no locks, no unsafe, frames and header blocks as slices
//! of the `bytes` buffers they were read into.
//!
//! - [`frame`]: parse and serialize every RFC 9113 frame; each malformation a typed connection
//!   or stream error.
//! - [`hpack`]: RFC 7541, with an encoder shaped by APNs requests (per-connection constants
//!   indexed once, per-push values and secrets as literals) and a bounded decoder; the Huffman
//!   code in [`hpack::huffman`].
//! - [`conn`]: the connection state machine, sans I/O: streams, SETTINGS as they change, flow
//!   control both ways, GOAWAY / REFUSED_STREAM → "never processed", PING.
//! - [`driver`]: a thin tokio task over a TLS or TCP stream, with whole-request handles.
//!
//! The pool uses it as a connection kind (`upstream::native_link`) when
//! `upstream.http2_client` is `native`, the default; `h2` keeps the h2 crate's client. Request
//! bodies go whole (APNs pushes are at most 5 KiB) and answers come back whole, bounded by
//! `DriverConfig::max_body`. Tested frame by frame (tests/h2client.rs, with a seeded fuzz run),
//! against the h2-crate origin, nghttpd and HAProxy (tests/h2client_interop.rs), and by the
//! pool's own tests run on both clients.

pub mod conn;
pub mod driver;
pub mod frame;
pub mod hpack;
