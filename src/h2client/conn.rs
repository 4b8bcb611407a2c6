//! The client side of one HTTP/2 connection, sans I/O: bytes read from the peer go into
//! [`Connection::recv_buf`], [`Connection::process`] turns them into [`Event`]s, and whatever must
//! be written (our frames, ACKs, WINDOW_UPDATEs) accumulates for [`Connection::take_output`].
//! Nothing here blocks, locks, spawns or reads a clock, so a worker can own it outright and tests
//! can drive it frame by frame.
//!
//! What it keeps: the peer's SETTINGS as they change (MAX_CONCURRENT_STREAMS may go 1000 → 1 →
//! 1000 on a live connection: [`Connection::can_open`] follows it), both directions of flow
//! control on both levels (our receive windows are given back as data is handed out), and which
//! streams the peer provably never processed — a REFUSED_STREAM reset, or a stream above a
//! GOAWAY's last-stream-id (RFC 9113 §8.7) — so the caller can send those again, and only those.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use rustc_hash::FxHashMap;

use super::frame::{self, ErrorCode, Frame, H2Error, conn_err, setting};
use super::hpack::{self, Decoder, Encoder, Kind};

/// Local limits; the defaults suit APNs answers (a few hundred bytes of headers, tiny bodies).
#[derive(Debug, Clone)]
pub struct Config {
    /// SETTINGS_INITIAL_WINDOW_SIZE we advertise: how much each stream may receive unread.
    pub stream_window: u32,
    /// Receive window of the whole connection (raised from 65 535 by a WINDOW_UPDATE at start).
    pub connection_window: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE we advertise and enforce on answers.
    pub max_header_list: usize,
    /// Most bytes of one header block (HEADERS + CONTINUATION) we buffer before decoding it.
    pub max_header_block: usize,
    /// Huffman-code per-request header values when it makes them shorter.
    pub huffman_literals: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            stream_window: 1 << 20,
            connection_window: 4 << 20,
            max_header_list: 16 << 10,
            max_header_block: 64 << 10,
            huffman_literals: false,
        }
    }
}

/// Why a stream ended without a complete answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// RST_STREAM REFUSED_STREAM: the peer did no work on it (RFC 9113 §8.7).
    Refused,
    /// Above the last-stream-id of a GOAWAY: never processed.
    AfterGoAway { code: ErrorCode },
    /// Reset by the peer for another reason: it may have been processed.
    Reset(ErrorCode),
    /// The answer broke the protocol; we reset the stream (it may have been processed).
    Malformed(&'static str),
    /// The connection failed with the stream open.
    Connection(H2Error),
}

impl Failure {
    /// True when the request provably never reached the application: safe to send again.
    pub fn never_processed(&self) -> bool {
        matches!(self, Failure::Refused | Failure::AfterGoAway { .. })
    }
}

#[derive(Debug)]
pub enum Event {
    /// The final answer head (1xx heads are skipped).
    Response {
        stream: u32,
        status: StatusCode,
        headers: HeaderMap,
        end_stream: bool,
    },
    Data {
        stream: u32,
        data: Bytes,
        end_stream: bool,
    },
    Trailers {
        stream: u32,
        trailers: HeaderMap,
    },
    Failed {
        stream: u32,
        failure: Failure,
    },
    /// The peer's SETTINGS were applied: stream limit and windows may have changed.
    Settings,
    Pong {
        data: [u8; 8],
    },
    GoAway {
        last_stream: u32,
        code: ErrorCode,
        debug: Bytes,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("the connection is going away")]
    GoingAway,
    #[error("the peer's SETTINGS_MAX_CONCURRENT_STREAMS is reached")]
    AtCapacity,
    #[error("stream ids are used up")]
    StreamIdsExhausted,
    #[error("the connection failed: {0}")]
    Failed(H2Error),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("stream {0} is not open for sending")]
    NotOpen(u32),
    #[error("stream {0} still has data waiting for flow-control window")]
    Busy(u32),
}

/// The request head to send; `authority` and `path` as they go on the wire.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a http::Method,
    pub scheme: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

#[derive(Debug)]
struct Stream {
    send_window: i64,
    recv_window: i64,
    recv_unacked: u32,
    pending: Option<Bytes>,
    pending_end: bool,
    /// Request trailers to send once `pending` is out; encoded only then, so header blocks
    /// reach the peer in the order the HPACK encoder saw them.
    trailers: Option<HeaderMap>,
    queued: bool,
    local_closed: bool,
    remote_closed: bool,
    got_final: bool,
    head_request: bool,
    content_length: Option<u64>,
    received: u64,
}

#[derive(Debug, Clone, Copy)]
struct PeerSettings {
    max_concurrent: u32,
    initial_window: u32,
    max_frame_size: u32,
}

/// One HTTP/2 client connection; see the module documentation.
#[derive(Debug)]
pub struct Connection {
    cfg: Config,
    recv: BytesMut,
    send: BytesMut,
    scratch: BytesMut,
    fields: Vec<(Bytes, Bytes)>,
    enc: Encoder,
    dec: Decoder,
    streams: FxHashMap<u32, Stream>,
    next_id: u32,
    peer: PeerSettings,
    send_window: i64,
    recv_window: i64,
    recv_unacked: u32,
    blocked: VecDeque<u32>,
    /// A header block still waiting for CONTINUATION: its stream and END_STREAM.
    cont: Option<(u32, bool)>,
    cont_buf: BytesMut,
    events: VecDeque<Event>,
    goaway_recv: Option<u32>,
    goaway_sent: bool,
    seen_settings: bool,
    failed: Option<H2Error>,
}

const MAX_STREAM_ID: u32 = (1 << 31) - 1;
/// We never raise SETTINGS_MAX_FRAME_SIZE: 16 KiB bounds what one frame makes us buffer.
const LOCAL_MAX_FRAME: u32 = frame::DEFAULT_MAX_FRAME_SIZE;

impl Connection {
    /// A new connection; the client preface and our SETTINGS are already in the output.
    pub fn new(cfg: Config) -> Self {
        let mut send = BytesMut::with_capacity(16 << 10);
        send.extend_from_slice(frame::PREFACE);
        frame::put_settings(
            &mut send,
            &[
                (setting::ENABLE_PUSH, 0),
                (setting::INITIAL_WINDOW_SIZE, cfg.stream_window),
                (setting::MAX_HEADER_LIST_SIZE, cfg.max_header_list as u32),
            ],
        );
        let extra = cfg.connection_window.saturating_sub(frame::DEFAULT_WINDOW);
        if extra > 0 {
            frame::put_window_update(&mut send, 0, extra);
        }
        let mut enc = Encoder::default();
        enc.huffman_literals = cfg.huffman_literals;
        Connection {
            dec: Decoder::new(hpack::DEFAULT_TABLE_SIZE, cfg.max_header_list),
            enc,
            recv: BytesMut::with_capacity(LOCAL_MAX_FRAME as usize + frame::HEADER_LEN),
            send,
            scratch: BytesMut::with_capacity(1024),
            fields: Vec::with_capacity(16),
            streams: FxHashMap::default(),
            next_id: 1,
            peer: PeerSettings {
                // Until the peer's SETTINGS say otherwise (RFC 9113 §6.5.2: initially unlimited;
                // 100 is what RFC 9113 recommends as the least a server should allow).
                max_concurrent: 100,
                initial_window: frame::DEFAULT_WINDOW,
                max_frame_size: frame::DEFAULT_MAX_FRAME_SIZE,
            },
            send_window: i64::from(frame::DEFAULT_WINDOW),
            recv_window: i64::from(cfg.connection_window.max(frame::DEFAULT_WINDOW)),
            recv_unacked: 0,
            blocked: VecDeque::new(),
            cont: None,
            cont_buf: BytesMut::new(),
            events: VecDeque::new(),
            goaway_recv: None,
            goaway_sent: false,
            seen_settings: false,
            failed: None,
            cfg,
        }
    }

    /// Where the caller puts bytes read from the peer, then calls `process`.
    pub fn recv_buf(&mut self) -> &mut BytesMut {
        &mut self.recv
    }

    /// Everything to write to the peer now.
    pub fn take_output(&mut self) -> BytesMut {
        self.send.split()
    }

    pub fn has_output(&self) -> bool {
        !self.send.is_empty()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Streams open now (counted against the peer's MAX_CONCURRENT_STREAMS).
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// The peer's current SETTINGS_MAX_CONCURRENT_STREAMS.
    pub fn max_concurrent_streams(&self) -> u32 {
        self.peer.max_concurrent
    }

    /// Whether the server's preface (its first SETTINGS) has arrived: until then its limits are
    /// unknown, and streams opened above them would be refused.
    pub fn settings_received(&self) -> bool {
        self.seen_settings
    }

    /// Whether a new stream may be opened now.
    pub fn can_open(&self) -> bool {
        self.open_error().is_none()
    }

    fn open_error(&self) -> Option<OpenError> {
        if let Some(e) = &self.failed {
            return Some(OpenError::Failed(e.clone()));
        }
        if self.goaway_recv.is_some() || self.goaway_sent {
            return Some(OpenError::GoingAway);
        }
        if self.next_id > MAX_STREAM_ID {
            return Some(OpenError::StreamIdsExhausted);
        }
        if self.streams.len() >= self.peer.max_concurrent as usize {
            return Some(OpenError::AtCapacity);
        }
        None
    }

    /// No new stream will ever open here: a GOAWAY came or went, or the connection failed.
    pub fn is_going_away(&self) -> bool {
        self.failed.is_some() || self.goaway_recv.is_some() || self.goaway_sent
    }

    /// The connection is done: it failed or is going away, and no stream is left.
    pub fn is_finished(&self) -> bool {
        (self.failed.is_some() || self.goaway_recv.is_some() || self.goaway_sent)
            && self.streams.is_empty()
    }

    pub fn error(&self) -> Option<&H2Error> {
        self.failed.as_ref()
    }

    /// Data of `stream` still waiting for window.
    pub fn has_pending(&self, stream: u32) -> bool {
        self.streams
            .get(&stream)
            .is_some_and(|s| s.pending.is_some())
    }

    /// Sends a PING; its ACK comes back as `Event::Pong` with the same `data`.
    pub fn ping(&mut self, data: [u8; 8]) {
        frame::put_ping(&mut self.send, false, data);
    }

    /// Starts a graceful close: no new streams; open ones finish.
    pub fn go_away(&mut self, code: ErrorCode) {
        if !self.goaway_sent {
            self.goaway_sent = true;
            // We accept no streams from the server, so the last one we processed is 0.
            frame::put_goaway(&mut self.send, 0, code, b"");
        }
    }

    /// Cancels a stream (RST_STREAM CANCEL); no event follows for it.
    pub fn cancel(&mut self, stream: u32) {
        if self.streams.remove(&stream).is_some() {
            frame::put_rst_stream(&mut self.send, stream, ErrorCode::CANCEL);
        }
    }

    /// Opens a stream and sends the request `head` and `body` (all of it, as the windows allow).
    pub fn send_request(&mut self, head: &RequestHead<'_>, body: Bytes) -> Result<u32, OpenError> {
        self.send_request_with_trailers(head, body, None)
    }

    /// [`Self::send_request`], then `trailers` (a HEADERS frame ending the stream) after the
    /// body.
    pub fn send_request_with_trailers(
        &mut self,
        head: &RequestHead<'_>,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Result<u32, OpenError> {
        let end = body.is_empty() && trailers.is_none();
        let id = self.send_headers(head, end)?;
        // A stream just opened has no pending data: these cannot be Busy or NotOpen.
        if !body.is_empty() {
            let _ = self.send_data(id, body, trailers.is_none());
        }
        if let Some(trailers) = trailers {
            let _ = self.send_trailers(id, trailers);
        }
        Ok(id)
    }

    /// Ends `stream` with trailers, sent once its pending data is out.
    pub fn send_trailers(&mut self, stream: u32, trailers: HeaderMap) -> Result<(), SendError> {
        let s = self
            .streams
            .get_mut(&stream)
            .filter(|s| !s.local_closed && !s.pending_end && s.trailers.is_none())
            .ok_or(SendError::NotOpen(stream))?;
        s.trailers = Some(trailers);
        self.flush_stream(stream);
        Ok(())
    }

    /// Writes `id`'s trailers when nothing of its body is left to send.
    fn flush_trailers(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.pending.is_some() {
            return;
        }
        let Some(trailers) = s.trailers.take() else {
            return;
        };
        s.local_closed = true;
        let out = &mut self.scratch;
        out.clear();
        self.enc.begin(out);
        for (name, value) in &trailers {
            if is_connection_specific(name.as_str()) {
                continue;
            }
            let kind = if value.is_sensitive() {
                Kind::Secret
            } else {
                Kind::PerRequest
            };
            self.enc
                .field(name.as_str().as_bytes(), value.as_bytes(), kind, out);
        }
        frame::put_headers(
            &mut self.send,
            id,
            &self.scratch,
            true,
            self.peer.max_frame_size,
        );
    }

    /// Opens a stream with the request `head`.
    pub fn send_headers(
        &mut self,
        head: &RequestHead<'_>,
        end_stream: bool,
    ) -> Result<u32, OpenError> {
        if let Some(e) = self.open_error() {
            return Err(e);
        }
        let id = self.next_id;
        self.next_id += 2;
        let out = &mut self.scratch;
        out.clear();
        self.enc.begin(out);
        self.enc.field(
            b":method",
            head.method.as_str().as_bytes(),
            Kind::Constant,
            out,
        );
        self.enc
            .field(b":scheme", head.scheme.as_bytes(), Kind::Constant, out);
        self.enc
            .field(b":path", head.path.as_bytes(), Kind::PerRequest, out);
        self.enc.field(
            b":authority",
            head.authority.as_bytes(),
            Kind::Constant,
            out,
        );
        for (name, value) in head.headers {
            if is_connection_specific(name.as_str()) || name == http::header::HOST {
                continue;
            }
            let kind = if value.is_sensitive() {
                Kind::Secret
            } else {
                kind_of(name.as_str())
            };
            self.enc
                .field(name.as_str().as_bytes(), value.as_bytes(), kind, out);
        }
        frame::put_headers(
            &mut self.send,
            id,
            &self.scratch,
            end_stream,
            self.peer.max_frame_size,
        );
        self.streams.insert(
            id,
            Stream {
                send_window: i64::from(self.peer.initial_window),
                recv_window: i64::from(self.cfg.stream_window),
                recv_unacked: 0,
                pending: None,
                pending_end: false,
                trailers: None,
                queued: false,
                local_closed: end_stream,
                remote_closed: false,
                got_final: false,
                head_request: head.method == http::Method::HEAD,
                content_length: None,
                received: 0,
            },
        );
        Ok(id)
    }

    /// Queues `data` on `stream`; it goes out as flow control allows, in DATA frames no larger
    /// than the peer's MAX_FRAME_SIZE.
    pub fn send_data(
        &mut self,
        stream: u32,
        data: Bytes,
        end_stream: bool,
    ) -> Result<(), SendError> {
        let s = self
            .streams
            .get_mut(&stream)
            .filter(|s| !s.local_closed)
            .ok_or(SendError::NotOpen(stream))?;
        if s.pending.is_some() {
            return Err(SendError::Busy(stream));
        }
        s.pending = Some(data);
        s.pending_end = end_stream;
        self.flush_stream(stream);
        Ok(())
    }

    /// Writes what flow control allows of `id`'s pending data; queues it when blocked.
    fn flush_stream(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        while let Some(buf) = s.pending.as_mut() {
            let room = s
                .send_window
                .min(self.send_window)
                .min(i64::from(self.peer.max_frame_size))
                .max(0) as usize;
            let n = buf.len().min(room);
            if n == 0 && !buf.is_empty() {
                if !s.queued {
                    s.queued = true;
                    self.blocked.push_back(id);
                }
                return;
            }
            let chunk = buf.split_to(n);
            let last = buf.is_empty();
            let end = last && s.pending_end;
            frame::put_data(&mut self.send, id, &chunk, end);
            s.send_window -= n as i64;
            self.send_window -= n as i64;
            if last {
                s.pending = None;
                s.local_closed = end;
            }
        }
        self.flush_trailers(id);
        self.close_if_done(id);
    }

    fn flush_blocked(&mut self) {
        for _ in 0..self.blocked.len() {
            let Some(id) = self.blocked.pop_front() else {
                break;
            };
            if let Some(s) = self.streams.get_mut(&id) {
                s.queued = false;
                self.flush_stream(id);
            }
            if self.send_window <= 0 {
                break;
            }
        }
    }

    fn close_if_done(&mut self, id: u32) {
        if self
            .streams
            .get(&id)
            .is_some_and(|s| s.local_closed && s.remote_closed)
        {
            self.streams.remove(&id);
        }
    }

    /// Handles every whole frame in the receive buffer. A connection error is final: GOAWAY is
    /// queued, every open stream fails, and this and later calls return it.
    pub fn process(&mut self) -> Result<(), H2Error> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        loop {
            let result = match frame::decode(&mut self.recv, LOCAL_MAX_FRAME) {
                Ok(None) => return Ok(()),
                Ok(Some(f)) => self.on_frame(f),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {}
                Err(H2Error::Stream {
                    stream,
                    code,
                    reason,
                }) => self.reset(stream, code, Failure::Malformed(reason)),
                Err(e) => {
                    self.fail(e.clone());
                    return Err(e);
                }
            }
        }
    }

    fn fail(&mut self, e: H2Error) {
        if let H2Error::Connection { code, reason } = &e {
            frame::put_goaway(&mut self.send, 0, *code, reason.as_bytes());
        }
        self.goaway_sent = true;
        for (stream, _) in self.streams.drain() {
            self.events.push_back(Event::Failed {
                stream,
                failure: Failure::Connection(e.clone()),
            });
        }
        self.blocked.clear();
        self.recv.clear();
        self.failed = Some(e);
    }

    /// We reset `stream` (a stream error of ours).
    fn reset(&mut self, stream: u32, code: ErrorCode, failure: Failure) {
        if self.streams.remove(&stream).is_some() {
            frame::put_rst_stream(&mut self.send, stream, code);
            self.events.push_back(Event::Failed { stream, failure });
        }
    }

    fn is_idle(&self, stream: u32) -> bool {
        stream >= self.next_id || stream.is_multiple_of(2)
    }

    fn on_frame(&mut self, f: Frame) -> Result<(), H2Error> {
        if !self.seen_settings {
            if !matches!(f, Frame::Settings { ack: false, .. }) {
                return Err(conn_err(
                    ErrorCode::PROTOCOL_ERROR,
                    "server preface is not a SETTINGS frame",
                ));
            }
            self.seen_settings = true;
        }
        if let Some((cont_stream, _)) = self.cont
            && !matches!(f, Frame::Continuation { stream, .. } if stream == cont_stream)
        {
            return Err(conn_err(
                ErrorCode::PROTOCOL_ERROR,
                "header block interrupted before END_HEADERS",
            ));
        }
        match f {
            Frame::Data {
                stream,
                end_stream,
                data,
                flow_len,
            } => self.on_data(stream, end_stream, data, flow_len),
            Frame::Headers {
                stream,
                end_stream,
                end_headers,
                block,
            } => {
                if self.is_idle(stream) {
                    return Err(conn_err(
                        ErrorCode::PROTOCOL_ERROR,
                        "HEADERS on a stream we did not open",
                    ));
                }
                if end_headers {
                    self.on_header_block(stream, end_stream, block)
                } else {
                    self.cont = Some((stream, end_stream));
                    self.cont_buf.clear();
                    self.append_block(&block)
                }
            }
            Frame::Continuation {
                stream,
                end_headers,
                block,
            } => {
                let Some((_, end_stream)) = self.cont else {
                    return Err(conn_err(
                        ErrorCode::PROTOCOL_ERROR,
                        "CONTINUATION without a header block",
                    ));
                };
                self.append_block(&block)?;
                if end_headers {
                    self.cont = None;
                    let block = self.cont_buf.split().freeze();
                    self.on_header_block(stream, end_stream, block)?;
                }
                Ok(())
            }
            Frame::Priority { .. } | Frame::Unknown { .. } => Ok(()),
            Frame::RstStream { stream, code } => {
                if self.is_idle(stream) {
                    return Err(conn_err(
                        ErrorCode::PROTOCOL_ERROR,
                        "RST_STREAM on an idle stream",
                    ));
                }
                if let Some(s) = self.streams.remove(&stream) {
                    // After a complete answer, NO_ERROR only asks us to stop sending.
                    if !(s.remote_closed && code == ErrorCode::NO_ERROR) {
                        let failure = if code == ErrorCode::REFUSED_STREAM {
                            Failure::Refused
                        } else {
                            Failure::Reset(code)
                        };
                        self.events.push_back(Event::Failed { stream, failure });
                    }
                }
                Ok(())
            }
            Frame::Settings { ack: true, .. } => Ok(()),
            Frame::Settings { ack: false, params } => {
                for (id, value) in params.iter() {
                    match id {
                        setting::HEADER_TABLE_SIZE => self.enc.set_peer_table_size(value as usize),
                        setting::MAX_CONCURRENT_STREAMS => self.peer.max_concurrent = value,
                        setting::INITIAL_WINDOW_SIZE => {
                            let delta = i64::from(value) - i64::from(self.peer.initial_window);
                            self.peer.initial_window = value;
                            for s in self.streams.values_mut() {
                                s.send_window += delta;
                                if s.send_window > i64::from(frame::MAX_WINDOW) {
                                    return Err(conn_err(
                                        ErrorCode::FLOW_CONTROL_ERROR,
                                        "SETTINGS_INITIAL_WINDOW_SIZE overflows a stream window",
                                    ));
                                }
                            }
                        }
                        setting::MAX_FRAME_SIZE => self.peer.max_frame_size = value,
                        _ => {}
                    }
                }
                frame::put_settings_ack(&mut self.send);
                self.events.push_back(Event::Settings);
                self.flush_blocked();
                Ok(())
            }
            Frame::PushPromise { .. } => Err(conn_err(
                ErrorCode::PROTOCOL_ERROR,
                "PUSH_PROMISE with push disabled",
            )),
            Frame::Ping { ack: false, data } => {
                frame::put_ping(&mut self.send, true, data);
                Ok(())
            }
            Frame::Ping { ack: true, data } => {
                self.events.push_back(Event::Pong { data });
                Ok(())
            }
            Frame::GoAway {
                last_stream,
                code,
                debug,
            } => {
                let last = self.goaway_recv.map_or(last_stream, |l| l.min(last_stream));
                self.goaway_recv = Some(last);
                let events = &mut self.events;
                self.streams.retain(|&stream, _| {
                    if stream > last {
                        events.push_back(Event::Failed {
                            stream,
                            failure: Failure::AfterGoAway { code },
                        });
                        false
                    } else {
                        true
                    }
                });
                self.events.push_back(Event::GoAway {
                    last_stream: last,
                    code,
                    debug,
                });
                Ok(())
            }
            Frame::WindowUpdate {
                stream: 0,
                increment,
            } => {
                self.send_window += i64::from(increment);
                if self.send_window > i64::from(frame::MAX_WINDOW) {
                    return Err(conn_err(
                        ErrorCode::FLOW_CONTROL_ERROR,
                        "connection window above 2^31-1",
                    ));
                }
                self.flush_blocked();
                Ok(())
            }
            Frame::WindowUpdate { stream, increment } => {
                if self.is_idle(stream) {
                    return Err(conn_err(
                        ErrorCode::PROTOCOL_ERROR,
                        "WINDOW_UPDATE on an idle stream",
                    ));
                }
                let Some(s) = self.streams.get_mut(&stream) else {
                    return Ok(());
                };
                s.send_window += i64::from(increment);
                if s.send_window > i64::from(frame::MAX_WINDOW) {
                    return Err(H2Error::Stream {
                        stream,
                        code: ErrorCode::FLOW_CONTROL_ERROR,
                        reason: "stream window above 2^31-1",
                    });
                }
                self.flush_stream(stream);
                Ok(())
            }
        }
    }

    fn append_block(&mut self, block: &[u8]) -> Result<(), H2Error> {
        if self.cont_buf.len() + block.len() > self.cfg.max_header_block {
            return Err(conn_err(
                ErrorCode::ENHANCE_YOUR_CALM,
                "header block larger than the limit",
            ));
        }
        self.cont_buf.extend_from_slice(block);
        Ok(())
    }

    fn on_data(
        &mut self,
        stream: u32,
        end_stream: bool,
        data: Bytes,
        flow_len: u32,
    ) -> Result<(), H2Error> {
        self.recv_window -= i64::from(flow_len);
        if self.recv_window < 0 {
            return Err(conn_err(
                ErrorCode::FLOW_CONTROL_ERROR,
                "DATA beyond the connection window",
            ));
        }
        // Handed out (or dropped) at once: the connection window comes back now.
        self.recv_unacked += flow_len;
        if self.recv_unacked >= self.cfg.connection_window / 2 {
            frame::put_window_update(&mut self.send, 0, self.recv_unacked);
            self.recv_window += i64::from(self.recv_unacked);
            self.recv_unacked = 0;
        }
        if self.is_idle(stream) {
            return Err(conn_err(
                ErrorCode::PROTOCOL_ERROR,
                "DATA on a stream we did not open",
            ));
        }
        let Some(s) = self.streams.get_mut(&stream) else {
            // A stream we reset or finished: its DATA only counted against the connection.
            return Ok(());
        };
        let err = |code, reason| H2Error::Stream {
            stream,
            code,
            reason,
        };
        if s.remote_closed {
            return Err(err(ErrorCode::STREAM_CLOSED, "DATA after END_STREAM"));
        }
        if !s.got_final {
            return Err(err(
                ErrorCode::PROTOCOL_ERROR,
                "DATA before the answer head",
            ));
        }
        s.recv_window -= i64::from(flow_len);
        if s.recv_window < 0 {
            return Err(err(
                ErrorCode::FLOW_CONTROL_ERROR,
                "DATA beyond the stream window",
            ));
        }
        s.received += data.len() as u64;
        if let Some(cl) = s.content_length
            && (s.received > cl || (end_stream && s.received != cl))
        {
            return Err(err(
                ErrorCode::PROTOCOL_ERROR,
                "body length differs from content-length",
            ));
        }
        if end_stream {
            s.remote_closed = true;
        } else {
            s.recv_unacked += flow_len;
            if s.recv_unacked >= self.cfg.stream_window / 2 {
                frame::put_window_update(&mut self.send, stream, s.recv_unacked);
                s.recv_window += i64::from(s.recv_unacked);
                s.recv_unacked = 0;
            }
        }
        self.events.push_back(Event::Data {
            stream,
            data,
            end_stream,
        });
        self.close_if_done(stream);
        Ok(())
    }

    fn on_header_block(
        &mut self,
        stream: u32,
        end_stream: bool,
        block: Bytes,
    ) -> Result<(), H2Error> {
        // Decode even for a stream that is gone: the HPACK state must follow every block.
        let mut fields = std::mem::take(&mut self.fields);
        fields.clear();
        let decoded = self
            .dec
            .decode(&block, |n, v| fields.push((n, v)))
            .map_err(|_| conn_err(ErrorCode::COMPRESSION_ERROR, "undecodable header block"));
        let result = match decoded {
            Err(e) => Err(e),
            Ok(d) if d.too_large => {
                self.reset(
                    stream,
                    ErrorCode::CANCEL,
                    Failure::Malformed("answer header list larger than the limit"),
                );
                Ok(())
            }
            Ok(_) => {
                let r = self.on_fields(stream, end_stream, &fields);
                match r {
                    Err(reason) => {
                        self.reset(
                            stream,
                            ErrorCode::PROTOCOL_ERROR,
                            Failure::Malformed(reason),
                        );
                        Ok(())
                    }
                    Ok(()) => Ok(()),
                }
            }
        };
        fields.clear();
        self.fields = fields;
        result
    }

    /// Checks a decoded header block against RFC 9113 §8.3 and emits it.
    fn on_fields(
        &mut self,
        stream: u32,
        end_stream: bool,
        fields: &[(Bytes, Bytes)],
    ) -> Result<(), &'static str> {
        let Some(s) = self.streams.get_mut(&stream) else {
            return Ok(());
        };
        if s.remote_closed {
            return Err("HEADERS after END_STREAM");
        }
        let mut status = None;
        let mut headers = HeaderMap::with_capacity(fields.len());
        let mut regular = false;
        for (name, value) in fields {
            if name.first() == Some(&b':') {
                if regular {
                    return Err("pseudo-header after a regular header");
                }
                if name.as_ref() != b":status" || status.is_some() || s.got_final {
                    return Err("pseudo-header other than one :status");
                }
                status = Some(StatusCode::from_bytes(value).map_err(|_| "invalid :status")?);
                continue;
            }
            regular = true;
            if name.iter().any(|b| b.is_ascii_uppercase()) {
                return Err("upper-case header name");
            }
            let name = HeaderName::from_bytes(name).map_err(|_| "invalid header name")?;
            if is_connection_specific(name.as_str()) {
                return Err("connection-specific header in an answer");
            }
            let value = HeaderValue::from_maybe_shared(value.clone())
                .map_err(|_| "invalid header value")?;
            headers.append(name, value);
        }
        if s.got_final {
            if !end_stream {
                return Err("trailers without END_STREAM");
            }
            s.remote_closed = true;
            if let Some(cl) = s.content_length
                && cl != s.received
            {
                return Err("body length differs from content-length");
            }
            self.events.push_back(Event::Trailers {
                stream,
                trailers: headers,
            });
            self.close_if_done(stream);
            return Ok(());
        }
        let status = status.ok_or("answer without :status")?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS || end_stream {
                return Err("101 or 1xx with END_STREAM");
            }
            return Ok(());
        }
        s.got_final = true;
        let has_body = !s.head_request
            && status != StatusCode::NO_CONTENT
            && status != StatusCode::NOT_MODIFIED;
        if has_body && let Some(v) = headers.get(http::header::CONTENT_LENGTH) {
            let cl = v
                .to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or("invalid content-length")?;
            if end_stream && cl != 0 {
                return Err("body length differs from content-length");
            }
            s.content_length = Some(cl);
        }
        if end_stream {
            s.remote_closed = true;
        }
        self.events.push_back(Event::Response {
            stream,
            status,
            headers,
            end_stream,
        });
        self.close_if_done(stream);
        Ok(())
    }
}

/// Headers that mean something only on one HTTP/1.1 hop (RFC 9113 §8.2.2).
fn is_connection_specific(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade"
    )
}

/// How a request header goes on the wire: the same on every push of a connection, per push,
/// or a secret (never indexed, here or by any intermediary).
pub fn kind_of(name: &str) -> Kind {
    match name {
        "apns-topic" | "apns-push-type" | "apns-priority" | "content-type" | "user-agent"
        | "accept" | "accept-encoding" | "te" => Kind::Constant,
        "authorization" | "proxy-authorization" | "cookie" => Kind::Secret,
        _ => Kind::PerRequest,
    }
}
