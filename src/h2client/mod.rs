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
//! Not done yet (issue 15): nothing uses this in the relay. It is neither the default nor
//! selectable. The plan for plugging it in: the pool's per-connection handle (today an
//! `h2::client::SendRequest` in `upstream::pool`) becomes an enum with a second arm holding a
//! [`driver::Client`]; `Client::max_concurrent_streams` / `open_streams` stand in for
//! `current_max_send_streams`, and [`driver::RequestError::never_processed`] is the
//! resend decision `upstream::decision` makes from h2 errors today. A streaming request body
//! (the pool's `ReplayBody`) needs `Connection::send_data` chunk by chunk, with the driver
//! waiting on `Connection::has_pending`; the driver here takes whole bodies, which is what APNs
//! pushes are (≤ 4 KiB). Answers are collected whole (bounded by `DriverConfig::max_body`);
//! a streamed answer body would hand `Event::Data` on instead. A config key
//! (`upstream.http2_client: h2 | native`) and the pool's existing tests run on both come with
//! that step.

pub mod conn;
pub mod driver;
pub mod frame;
pub mod hpack;
