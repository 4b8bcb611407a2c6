//! HTTP/2 frames (RFC 9113 §4, §6): parsing from a receive buffer and serializing into a send
//! buffer. Parsing never copies a payload (each frame is split off the buffer and frozen, so
//! DATA and header blocks are slices of what was read), never allocates by what a length field
//! says (a frame longer than our SETTINGS_MAX_FRAME_SIZE is a FRAME_SIZE_ERROR before any byte of
//! it is buffered beyond one read), and turns every malformation into the connection or stream
//! error the RFC names for it.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADER_LEN: usize = 9;
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;
pub const MAX_MAX_FRAME_SIZE: u32 = 16_777_215;
pub const DEFAULT_WINDOW: u32 = 65_535;
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// An HTTP/2 error code (RFC 9113 §7); unknown codes are kept as they came.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    pub const NO_ERROR: ErrorCode = ErrorCode(0x0);
    pub const PROTOCOL_ERROR: ErrorCode = ErrorCode(0x1);
    pub const INTERNAL_ERROR: ErrorCode = ErrorCode(0x2);
    pub const FLOW_CONTROL_ERROR: ErrorCode = ErrorCode(0x3);
    pub const SETTINGS_TIMEOUT: ErrorCode = ErrorCode(0x4);
    pub const STREAM_CLOSED: ErrorCode = ErrorCode(0x5);
    pub const FRAME_SIZE_ERROR: ErrorCode = ErrorCode(0x6);
    pub const REFUSED_STREAM: ErrorCode = ErrorCode(0x7);
    pub const CANCEL: ErrorCode = ErrorCode(0x8);
    pub const COMPRESSION_ERROR: ErrorCode = ErrorCode(0x9);
    pub const CONNECT_ERROR: ErrorCode = ErrorCode(0xa);
    pub const ENHANCE_YOUR_CALM: ErrorCode = ErrorCode(0xb);
    pub const INADEQUATE_SECURITY: ErrorCode = ErrorCode(0xc);
    pub const HTTP_1_1_REQUIRED: ErrorCode = ErrorCode(0xd);

    pub fn name(self) -> Option<&'static str> {
        const NAMES: [&str; 14] = [
            "NO_ERROR",
            "PROTOCOL_ERROR",
            "INTERNAL_ERROR",
            "FLOW_CONTROL_ERROR",
            "SETTINGS_TIMEOUT",
            "STREAM_CLOSED",
            "FRAME_SIZE_ERROR",
            "REFUSED_STREAM",
            "CANCEL",
            "COMPRESSION_ERROR",
            "CONNECT_ERROR",
            "ENHANCE_YOUR_CALM",
            "INADEQUATE_SECURITY",
            "HTTP_1_1_REQUIRED",
        ];
        NAMES.get(self.0 as usize).copied()
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "0x{:x}", self.0),
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A protocol violation, with the scope RFC 9113 gives it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum H2Error {
    #[error("connection error {code}: {reason}")]
    Connection {
        code: ErrorCode,
        reason: &'static str,
    },
    #[error("stream {stream} error {code}: {reason}")]
    Stream {
        stream: u32,
        code: ErrorCode,
        reason: &'static str,
    },
}

pub fn conn_err(code: ErrorCode, reason: &'static str) -> H2Error {
    H2Error::Connection { code, reason }
}

fn proto(reason: &'static str) -> H2Error {
    conn_err(ErrorCode::PROTOCOL_ERROR, reason)
}

fn size(reason: &'static str) -> H2Error {
    conn_err(ErrorCode::FRAME_SIZE_ERROR, reason)
}

/// The parameters of a SETTINGS frame, validated, in the order sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsParams(Bytes);

impl SettingsParams {
    pub fn iter(&self) -> impl Iterator<Item = (u16, u32)> + '_ {
        self.0.chunks_exact(6).map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream: u32,
        end_stream: bool,
        data: Bytes,
        /// The whole payload length, padding included: what flow control counts.
        flow_len: u32,
    },
    Headers {
        stream: u32,
        end_stream: bool,
        end_headers: bool,
        block: Bytes,
    },
    Priority {
        stream: u32,
    },
    RstStream {
        stream: u32,
        code: ErrorCode,
    },
    Settings {
        ack: bool,
        params: SettingsParams,
    },
    PushPromise {
        stream: u32,
    },
    Ping {
        ack: bool,
        data: [u8; 8],
    },
    GoAway {
        last_stream: u32,
        code: ErrorCode,
        debug: Bytes,
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    Continuation {
        stream: u32,
        end_headers: bool,
        block: Bytes,
    },
    /// A frame type this endpoint does not know: ignored (RFC 9113 §4.1, §5.5).
    Unknown {
        kind: u8,
        stream: u32,
    },
}

/// Splits one whole frame off the front of `buf`. `Ok(None)`: not all of it is there yet (the
/// caller reads more; never more than `max_frame_size` + 9 needs to be held).
pub fn decode(buf: &mut BytesMut, max_frame_size: u32) -> Result<Option<Frame>, H2Error> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]);
    let kind = buf[3];
    let flags = buf[4];
    let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & MAX_WINDOW;
    if len > max_frame_size {
        return Err(size("frame larger than SETTINGS_MAX_FRAME_SIZE"));
    }
    let total = HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let mut payload = buf.split_to(total).freeze();
    payload.advance(HEADER_LEN);
    parse(kind, flags, stream, payload).map(Some)
}

/// Strips padding (RFC 9113 §6.1): the pad length byte, then the pad itself.
fn unpad(flags: u8, mut payload: Bytes) -> Result<Bytes, H2Error> {
    if flags & flag::PADDED == 0 {
        return Ok(payload);
    }
    if payload.is_empty() {
        return Err(size("padded frame without a pad length"));
    }
    let pad = usize::from(payload.get_u8());
    if pad > payload.len() {
        return Err(proto("padding longer than the frame"));
    }
    payload.truncate(payload.len() - pad);
    Ok(payload)
}

fn parse(kind: u8, flags: u8, stream: u32, payload: Bytes) -> Result<Frame, H2Error> {
    let len = payload.len();
    match kind {
        kind::DATA => {
            if stream == 0 {
                return Err(proto("DATA on stream 0"));
            }
            Ok(Frame::Data {
                stream,
                end_stream: flags & flag::END_STREAM != 0,
                data: unpad(flags, payload)?,
                flow_len: len as u32,
            })
        }
        kind::HEADERS => {
            if stream == 0 {
                return Err(proto("HEADERS on stream 0"));
            }
            let mut block = unpad(flags, payload)?;
            if flags & flag::PRIORITY != 0 {
                if block.len() < 5 {
                    return Err(size("HEADERS too short for its priority fields"));
                }
                block.advance(5);
            }
            Ok(Frame::Headers {
                stream,
                end_stream: flags & flag::END_STREAM != 0,
                end_headers: flags & flag::END_HEADERS != 0,
                block,
            })
        }
        kind::PRIORITY => {
            if stream == 0 {
                return Err(proto("PRIORITY on stream 0"));
            }
            if len != 5 {
                return Err(H2Error::Stream {
                    stream,
                    code: ErrorCode::FRAME_SIZE_ERROR,
                    reason: "PRIORITY of a length other than 5",
                });
            }
            Ok(Frame::Priority { stream })
        }
        kind::RST_STREAM => {
            if stream == 0 {
                return Err(proto("RST_STREAM on stream 0"));
            }
            if len != 4 {
                return Err(size("RST_STREAM of a length other than 4"));
            }
            let code = ErrorCode(u32::from_be_bytes([
                payload[0], payload[1], payload[2], payload[3],
            ]));
            Ok(Frame::RstStream { stream, code })
        }
        kind::SETTINGS => {
            if stream != 0 {
                return Err(proto("SETTINGS on a stream"));
            }
            let ack = flags & flag::ACK != 0;
            if ack && len != 0 {
                return Err(size("SETTINGS ACK with a payload"));
            }
            if !len.is_multiple_of(6) {
                return Err(size("SETTINGS length not a multiple of 6"));
            }
            let params = SettingsParams(payload);
            for (id, value) in params.iter() {
                match id {
                    setting::ENABLE_PUSH if value != 0 => {
                        return Err(proto("server sent SETTINGS_ENABLE_PUSH other than 0"));
                    }
                    setting::INITIAL_WINDOW_SIZE if value > MAX_WINDOW => {
                        return Err(conn_err(
                            ErrorCode::FLOW_CONTROL_ERROR,
                            "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
                        ));
                    }
                    setting::MAX_FRAME_SIZE
                        if !(DEFAULT_MAX_FRAME_SIZE..=MAX_MAX_FRAME_SIZE).contains(&value) =>
                    {
                        return Err(proto("SETTINGS_MAX_FRAME_SIZE out of range"));
                    }
                    _ => {}
                }
            }
            Ok(Frame::Settings { ack, params })
        }
        kind::PUSH_PROMISE => {
            // We send SETTINGS_ENABLE_PUSH 0: a promise is a connection error whatever it says.
            Err(proto("PUSH_PROMISE with push disabled"))
        }
        kind::PING => {
            if stream != 0 {
                return Err(proto("PING on a stream"));
            }
            if len != 8 {
                return Err(size("PING of a length other than 8"));
            }
            let mut data = [0u8; 8];
            data.copy_from_slice(&payload);
            Ok(Frame::Ping {
                ack: flags & flag::ACK != 0,
                data,
            })
        }
        kind::GOAWAY => {
            if stream != 0 {
                return Err(proto("GOAWAY on a stream"));
            }
            if len < 8 {
                return Err(size("GOAWAY shorter than 8"));
            }
            let mut p = payload;
            let last_stream = p.get_u32() & MAX_WINDOW;
            let code = ErrorCode(p.get_u32());
            Ok(Frame::GoAway {
                last_stream,
                code,
                debug: p,
            })
        }
        kind::WINDOW_UPDATE => {
            if len != 4 {
                return Err(size("WINDOW_UPDATE of a length other than 4"));
            }
            let increment =
                u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & MAX_WINDOW;
            if increment == 0 {
                return Err(if stream == 0 {
                    proto("WINDOW_UPDATE of 0 on the connection")
                } else {
                    H2Error::Stream {
                        stream,
                        code: ErrorCode::PROTOCOL_ERROR,
                        reason: "WINDOW_UPDATE of 0",
                    }
                });
            }
            Ok(Frame::WindowUpdate { stream, increment })
        }
        kind::CONTINUATION => {
            if stream == 0 {
                return Err(proto("CONTINUATION on stream 0"));
            }
            Ok(Frame::Continuation {
                stream,
                end_headers: flags & flag::END_HEADERS != 0,
                block: payload,
            })
        }
        kind => Ok(Frame::Unknown { kind, stream }),
    }
}

/// Appends a frame header.
pub fn put_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = len as u32;
    out.put_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.put_u32(stream & MAX_WINDOW);
}

pub fn put_settings(out: &mut BytesMut, params: &[(u16, u32)]) {
    put_header(out, params.len() * 6, kind::SETTINGS, 0, 0);
    for &(id, value) in params {
        out.put_u16(id);
        out.put_u32(value);
    }
}

pub fn put_settings_ack(out: &mut BytesMut) {
    put_header(out, 0, kind::SETTINGS, flag::ACK, 0);
}

pub fn put_ping(out: &mut BytesMut, ack: bool, data: [u8; 8]) {
    put_header(out, 8, kind::PING, if ack { flag::ACK } else { 0 }, 0);
    out.put_slice(&data);
}

pub fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put_header(out, 4, kind::WINDOW_UPDATE, 0, stream);
    out.put_u32(increment & MAX_WINDOW);
}

pub fn put_rst_stream(out: &mut BytesMut, stream: u32, code: ErrorCode) {
    put_header(out, 4, kind::RST_STREAM, 0, stream);
    out.put_u32(code.0);
}

pub fn put_goaway(out: &mut BytesMut, last_stream: u32, code: ErrorCode, debug: &[u8]) {
    put_header(out, 8 + debug.len(), kind::GOAWAY, 0, 0);
    out.put_u32(last_stream & MAX_WINDOW);
    out.put_u32(code.0);
    out.put_slice(debug);
}

/// Appends a header block as HEADERS plus as many CONTINUATION frames as `max_frame_size` needs.
pub fn put_headers(
    out: &mut BytesMut,
    stream: u32,
    block: &[u8],
    end_stream: bool,
    max_frame_size: u32,
) {
    let max = (max_frame_size as usize).max(1);
    let mut chunks = block.chunks(max);
    let first = chunks.next().unwrap_or(&[]);
    let mut rest = chunks.peekable();
    let mut flags = if end_stream { flag::END_STREAM } else { 0 };
    if rest.peek().is_none() {
        flags |= flag::END_HEADERS;
    }
    put_header(out, first.len(), kind::HEADERS, flags, stream);
    out.put_slice(first);
    while let Some(chunk) = rest.next() {
        let flags = if rest.peek().is_none() {
            flag::END_HEADERS
        } else {
            0
        };
        put_header(out, chunk.len(), kind::CONTINUATION, flags, stream);
        out.put_slice(chunk);
    }
}

/// Appends one DATA frame (the caller keeps it within the peer's MAX_FRAME_SIZE and windows).
pub fn put_data(out: &mut BytesMut, stream: u32, data: &[u8], end_stream: bool) {
    let flags = if end_stream { flag::END_STREAM } else { 0 };
    put_header(out, data.len(), kind::DATA, flags, stream);
    out.put_slice(data);
}
