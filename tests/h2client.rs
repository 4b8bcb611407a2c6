//! pushrelay's own HTTP/2 client connection, driven frame by frame against a scripted server
//! (sans I/O): SETTINGS as they change, flow control both ways, GOAWAY and REFUSED_STREAM as
//! "never processed", CONTINUATION and padding, and typed errors for malformed input. Then a
//! seeded fuzz run: random and mutated frame streams, random HPACK blocks; nothing panics and
//! nothing grows without bound.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use pushrelay::h2client::conn::{Config, Connection, Event, Failure, OpenError, RequestHead};
use pushrelay::h2client::frame::{self, ErrorCode, Frame, H2Error, flag, kind, setting};
use pushrelay::h2client::hpack::{Decoder, Encoder, Kind};

/// The server side of the script: frames built with the same serializers, an HPACK encoder of
/// its own.
struct Server {
    enc: Encoder,
    dec: Decoder,
}

impl Server {
    fn new() -> Self {
        Server {
            enc: Encoder::default(),
            dec: Decoder::new(4096, 1 << 20),
        }
    }

    fn block(&mut self, fields: &[(&str, &str)]) -> BytesMut {
        let mut b = BytesMut::new();
        self.enc.begin(&mut b);
        for (n, v) in fields {
            self.enc
                .field(n.as_bytes(), v.as_bytes(), Kind::Constant, &mut b);
        }
        b
    }

    fn answer(&mut self, stream: u32, status: &str, end_stream: bool) -> BytesMut {
        let block = self.block(&[(":status", status), ("apns-id", "abc")]);
        let mut out = BytesMut::new();
        frame::put_headers(&mut out, stream, &block, end_stream, 16_384);
        out
    }
}

fn settings(params: &[(u16, u32)]) -> BytesMut {
    let mut out = BytesMut::new();
    frame::put_settings(&mut out, params);
    out
}

fn feed(conn: &mut Connection, bytes: &[u8]) -> (Result<(), H2Error>, Vec<Event>) {
    conn.recv_buf().extend_from_slice(bytes);
    let r = conn.process();
    let mut events = Vec::new();
    while let Some(e) = conn.poll_event() {
        events.push(e);
    }
    (r, events)
}

/// Every frame the client wrote since the last call (the preface skipped).
fn written(conn: &mut Connection) -> Vec<Frame> {
    let mut out = conn.take_output();
    if out.starts_with(frame::PREFACE) {
        let _ = out.split_to(frame::PREFACE.len());
    }
    let mut frames = Vec::new();
    while let Some(f) = frame::decode(&mut out, frame::MAX_MAX_FRAME_SIZE).unwrap() {
        frames.push(f);
    }
    assert!(out.is_empty(), "a partial frame was written");
    frames
}

/// A client that has seen the server's SETTINGS (`params`) and sent its own.
fn connected(params: &[(u16, u32)]) -> Connection {
    let mut c = Connection::new(Config::default());
    let (r, _) = feed(&mut c, &settings(params));
    r.unwrap();
    written(&mut c);
    c
}

fn apns_headers(jwt: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("apns-topic", HeaderValue::from_static("com.example.app"));
    h.insert("apns-push-type", HeaderValue::from_static("alert"));
    h.insert("apns-expiration", HeaderValue::from_static("0"));
    h.insert("authorization", HeaderValue::from_str(jwt).unwrap());
    h
}

fn push(c: &mut Connection, token: &str, body: &'static [u8]) -> Result<u32, OpenError> {
    let headers = apns_headers("bearer eyJhbGciOiJFUzI1NiJ9.payload.signature");
    let path = format!("/3/device/{token}");
    let head = RequestHead {
        method: &Method::POST,
        scheme: "https",
        authority: "api.push.apple.com",
        path: &path,
        headers: &headers,
    };
    c.send_request(&head, Bytes::from_static(body))
}

fn failure_of(events: &[Event], id: u32) -> Option<&Failure> {
    events.iter().find_map(|e| match e {
        Event::Failed { stream, failure } if *stream == id => Some(failure),
        _ => None,
    })
}

/// The client preface, SETTINGS (push off, our window) and a connection WINDOW_UPDATE go first.
#[test]
fn client_starts_with_preface_settings_and_a_connection_window() {
    let mut c = Connection::new(Config::default());
    let out = c.take_output();
    assert!(out.starts_with(frame::PREFACE));
    let mut c2 = Connection::new(Config::default());
    let frames = written(&mut c2);
    let Frame::Settings { ack: false, params } = &frames[0] else {
        panic!("{frames:?}")
    };
    let params: Vec<_> = params.iter().collect();
    assert!(params.contains(&(setting::ENABLE_PUSH, 0)));
    assert!(params.contains(&(setting::INITIAL_WINDOW_SIZE, 1 << 20)));
    assert_eq!(
        frames[1],
        Frame::WindowUpdate {
            stream: 0,
            increment: (4 << 20) - 65_535
        }
    );
}

/// The first frame from the server must be SETTINGS.
#[test]
fn a_server_preface_other_than_settings_is_a_protocol_error() {
    let mut c = Connection::new(Config::default());
    let mut ping = BytesMut::new();
    frame::put_ping(&mut ping, false, [0; 8]);
    let (r, _) = feed(&mut c, &ping);
    assert!(
        matches!(r, Err(H2Error::Connection { code, .. }) if code == ErrorCode::PROTOCOL_ERROR)
    );
}

/// Per-connection constants are indexed from the second push on; the path and apns-expiration
/// stay literals without indexing; authorization is never indexed.
#[test]
fn apns_constants_are_indexed_once_and_secrets_never() {
    let mut c = connected(&[]);
    let mut server = Server::new();
    let mut blocks = Vec::new();
    for token in ["aa", "bb"] {
        push(&mut c, token, b"{}").unwrap();
        let frames = written(&mut c);
        let Frame::Headers {
            block, end_stream, ..
        } = &frames[0]
        else {
            panic!("{frames:?}")
        };
        assert!(!end_stream);
        assert!(
            matches!(&frames[1], Frame::Data { end_stream: true, data, .. } if data.as_ref() == b"{}")
        );
        let mut fields = Vec::new();
        server
            .dec
            .decode(block, |n, v| fields.push((n, v)))
            .unwrap();
        let names: Vec<&[u8]> = fields.iter().map(|(n, _)| n.as_ref()).collect();
        assert_eq!(
            names,
            [
                &b":method"[..],
                b":scheme",
                b":path",
                b":authority",
                b"apns-topic",
                b"apns-push-type",
                b"apns-expiration",
                b"authorization"
            ]
        );
        assert_eq!(fields[2].1, format!("/3/device/{token}").as_bytes());
        // Never indexed, name index 23 (authorization) on a 4-bit prefix: 0x1f 0x08.
        assert!(block.windows(2).any(|w| w == [0x1f, 0x08]), "{block:x?}");
        blocks.push(block.clone());
    }
    // :method POST (0x83) and :scheme https (0x87) from the static table; then :authority,
    // apns-topic and apns-push-type as one-byte indices into the dynamic table.
    assert_eq!(&blocks[1][..2], &[0x83, 0x87]);
    assert!(
        blocks[1].len() + 40 < blocks[0].len(),
        "{} vs {}",
        blocks[1].len(),
        blocks[0].len()
    );
    assert_eq!(server.dec.table_len(), 3);
}

/// An answer split over HEADERS + CONTINUATION, with padding and a PRIORITY flag, arrives whole.
#[test]
fn an_answer_in_continuation_frames_with_padding_is_assembled() {
    let mut c = connected(&[]);
    let id = push(&mut c, "aa", b"").unwrap();
    let mut server = Server::new();
    let block = server.block(&[
        (":status", "410"),
        ("apns-id", "x"),
        ("content-length", "5"),
    ]);
    let mut wire = BytesMut::new();
    // HEADERS: padded (3), priority fields (5), first 4 bytes of the block.
    frame::put_header(
        &mut wire,
        1 + 5 + 4 + 3,
        kind::HEADERS,
        flag::PADDED | flag::PRIORITY,
        id,
    );
    wire.put_u8(3);
    wire.put_slice(&[0, 0, 0, 0, 16]);
    wire.put_slice(&block[..4]);
    wire.put_slice(&[0, 0, 0]);
    frame::put_header(
        &mut wire,
        block.len() - 4,
        kind::CONTINUATION,
        flag::END_HEADERS,
        id,
    );
    wire.put_slice(&block[4..]);
    // DATA padded by 2 around "gone!".
    frame::put_header(
        &mut wire,
        1 + 5 + 2,
        kind::DATA,
        flag::PADDED | flag::END_STREAM,
        id,
    );
    wire.put_u8(2);
    wire.put_slice(b"gone!\0\0");
    let (r, events) = feed(&mut c, &wire);
    r.unwrap();
    match &events[..] {
        [
            Event::Response {
                status, headers, ..
            },
            Event::Data {
                data,
                end_stream: true,
                ..
            },
        ] => {
            assert_eq!(*status, StatusCode::GONE);
            assert_eq!(headers["apns-id"], "x");
            assert_eq!(data.as_ref(), b"gone!");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.open_streams(), 0);
}

/// Another frame between HEADERS and its CONTINUATION is a connection PROTOCOL_ERROR.
#[test]
fn an_interrupted_header_block_is_a_protocol_error() {
    let mut c = connected(&[]);
    let id = push(&mut c, "aa", b"").unwrap();
    let mut server = Server::new();
    let block = server.block(&[(":status", "200")]);
    let mut wire = BytesMut::new();
    frame::put_header(&mut wire, block.len(), kind::HEADERS, 0, id);
    wire.put_slice(&block);
    frame::put_ping(&mut wire, false, [1; 8]);
    let (r, events) = feed(&mut c, &wire);
    assert!(
        matches!(r, Err(H2Error::Connection { code, .. }) if code == ErrorCode::PROTOCOL_ERROR)
    );
    assert!(matches!(
        failure_of(&events, id),
        Some(Failure::Connection(_))
    ));
    let frames = written(&mut c);
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, Frame::GoAway { code, .. } if *code == ErrorCode::PROTOCOL_ERROR))
    );
    assert!(!c.can_open());
}

/// GOAWAY: streams above last-stream-id fail as never processed; the one below finishes.
#[test]
fn goaway_fails_only_streams_above_last_stream_id_as_never_processed() {
    let mut c = connected(&[]);
    let ids: Vec<u32> = (0..3).map(|_| push(&mut c, "aa", b"{}").unwrap()).collect();
    assert_eq!(ids, [1, 3, 5]);
    let mut wire = BytesMut::new();
    frame::put_goaway(&mut wire, 1, ErrorCode::NO_ERROR, b"shutting down");
    let (r, events) = feed(&mut c, &wire);
    r.unwrap();
    for id in [3, 5] {
        let f = failure_of(&events, id).unwrap();
        assert!(f.never_processed(), "{f:?}");
    }
    assert!(failure_of(&events, 1).is_none());
    assert!(events.iter().any(
        |e| matches!(e, Event::GoAway { last_stream: 1, debug, .. } if debug.as_ref() == b"shutting down")
    ));
    assert_eq!(push(&mut c, "aa", b""), Err(OpenError::GoingAway));
    let (r, events) = feed(&mut c, &Server::new().answer(1, "200", true));
    r.unwrap();
    assert!(matches!(events[0], Event::Response { stream: 1, .. }));
    assert!(c.is_finished());
}

/// REFUSED_STREAM means never processed; any other reset means it may have been.
#[test]
fn refused_stream_is_never_processed_and_other_resets_may_have_been() {
    let mut c = connected(&[]);
    let a = push(&mut c, "aa", b"{}").unwrap();
    let b = push(&mut c, "bb", b"{}").unwrap();
    let mut wire = BytesMut::new();
    frame::put_rst_stream(&mut wire, a, ErrorCode::REFUSED_STREAM);
    frame::put_rst_stream(&mut wire, b, ErrorCode::INTERNAL_ERROR);
    let (r, events) = feed(&mut c, &wire);
    r.unwrap();
    assert_eq!(failure_of(&events, a), Some(&Failure::Refused));
    assert!(failure_of(&events, a).unwrap().never_processed());
    assert_eq!(
        failure_of(&events, b),
        Some(&Failure::Reset(ErrorCode::INTERNAL_ERROR))
    );
    assert!(!failure_of(&events, b).unwrap().never_processed());
}

/// SETTINGS_MAX_CONCURRENT_STREAMS going 1000 → 1 → 1000 on a live connection is followed.
#[test]
fn max_concurrent_streams_follows_live_settings_1000_1_1000() {
    let mut c = connected(&[(setting::MAX_CONCURRENT_STREAMS, 1000)]);
    for _ in 0..3 {
        push(&mut c, "aa", b"").unwrap();
    }
    written(&mut c);
    let (r, events) = feed(&mut c, &settings(&[(setting::MAX_CONCURRENT_STREAMS, 1)]));
    r.unwrap();
    assert!(matches!(events[..], [Event::Settings]));
    assert!(matches!(
        written(&mut c)[..],
        [Frame::Settings { ack: true, .. }]
    ));
    assert_eq!(c.max_concurrent_streams(), 1);
    assert_eq!(push(&mut c, "aa", b""), Err(OpenError::AtCapacity));
    let mut server = Server::new();
    let mut answers = server.answer(1, "200", true);
    answers.extend_from_slice(&server.answer(3, "200", true));
    feed(&mut c, &answers).0.unwrap();
    assert_eq!(c.open_streams(), 1);
    assert!(!c.can_open());
    feed(&mut c, &server.answer(5, "200", true)).0.unwrap();
    assert!(c.can_open());
    push(&mut c, "aa", b"").unwrap();
    assert!(!c.can_open());
    feed(
        &mut c,
        &settings(&[(setting::MAX_CONCURRENT_STREAMS, 1000)]),
    )
    .0
    .unwrap();
    for _ in 0..999 {
        push(&mut c, "aa", b"").unwrap();
    }
    assert_eq!(push(&mut c, "aa", b""), Err(OpenError::AtCapacity));
}

/// A body larger than the windows waits for WINDOW_UPDATE and never exceeds MAX_FRAME_SIZE; a
/// smaller SETTINGS_INITIAL_WINDOW_SIZE takes effect on open streams.
#[test]
fn request_body_follows_both_send_windows_and_max_frame_size() {
    static BODY: [u8; 100_000] = [7; 100_000];
    let mut c = connected(&[]);
    let id = push(&mut c, "aa", &BODY).unwrap();
    let sent = |frames: &[Frame]| -> usize {
        frames
            .iter()
            .map(|f| match f {
                Frame::Data { data, .. } => {
                    assert!(data.len() <= 16_384);
                    data.len()
                }
                _ => 0,
            })
            .sum()
    };
    assert_eq!(sent(&written(&mut c)), 65_535, "the default windows");
    assert!(c.has_pending(id));
    let mut wire = BytesMut::new();
    frame::put_window_update(&mut wire, 0, 50_000);
    feed(&mut c, &wire).0.unwrap();
    assert_eq!(
        sent(&written(&mut c)),
        0,
        "the stream window is still empty"
    );
    // Stream window 65 535 → 65 535 + 10 000 by SETTINGS.
    feed(&mut c, &settings(&[(setting::INITIAL_WINDOW_SIZE, 75_535)]))
        .0
        .unwrap();
    assert_eq!(sent(&written(&mut c)), 10_000);
    let mut wire = BytesMut::new();
    frame::put_window_update(&mut wire, id, 1 << 20);
    feed(&mut c, &wire).0.unwrap();
    let frames = written(&mut c);
    assert_eq!(sent(&frames), 100_000 - 75_535);
    assert!(matches!(
        frames.last(),
        Some(Frame::Data {
            end_stream: true,
            ..
        })
    ));
    assert!(!c.has_pending(id));
}

/// Data received is given back by WINDOW_UPDATE once half a window is used; DATA beyond the
/// window is a FLOW_CONTROL_ERROR.
#[test]
fn received_data_is_given_back_and_overruns_are_flow_control_errors() {
    let cfg = Config {
        stream_window: 40_000,
        connection_window: 50_000,
        ..Config::default()
    };
    let mut c = Connection::new(cfg);
    feed(&mut c, &settings(&[])).0.unwrap();
    let id = push(&mut c, "aa", b"").unwrap();
    written(&mut c);
    let mut wire = Server::new().answer(id, "200", false);
    let chunk = [1u8; 10_000];
    for _ in 0..3 {
        frame::put_data(&mut wire, id, &chunk, false);
    }
    let (r, events) = feed(&mut c, &wire);
    r.unwrap();
    assert_eq!(events.len(), 4);
    let frames = written(&mut c);
    assert!(frames.contains(&Frame::WindowUpdate {
        stream: id,
        increment: 20_000
    }));
    assert!(frames.contains(&Frame::WindowUpdate {
        stream: 0,
        increment: 30_000
    }));
    // A peer that ignores the window: 20 000 advertised, 9 999 used, 16 384 more is too much.
    let mut c = Connection::new(Config {
        stream_window: 20_000,
        ..Config::default()
    });
    feed(&mut c, &settings(&[])).0.unwrap();
    let id = push(&mut c, "aa", b"").unwrap();
    written(&mut c);
    let mut wire = Server::new().answer(id, "200", false);
    frame::put_data(&mut wire, id, &[0u8; 9_999], false);
    frame::put_data(&mut wire, id, &[0u8; 16_384], false);
    let (r, events) = feed(&mut c, &wire);
    r.unwrap();
    assert_eq!(
        failure_of(&events, id),
        Some(&Failure::Malformed("DATA beyond the stream window"))
    );
    assert!(written(&mut c).contains(&Frame::RstStream {
        stream: id,
        code: ErrorCode::FLOW_CONTROL_ERROR
    }));
}

/// PING is answered with an ACK of the same payload; our PING's ACK is reported; PRIORITY and
/// unknown frame types are ignored.
#[test]
fn ping_is_acknowledged_and_unknown_frames_are_ignored() {
    let mut c = connected(&[]);
    let mut wire = BytesMut::new();
    frame::put_ping(&mut wire, false, *b"12345678");
    frame::put_header(&mut wire, 3, 0xfa, 0xff, 1);
    wire.put_slice(b"abc");
    frame::put_header(&mut wire, 5, kind::PRIORITY, 0, 9);
    wire.put_slice(&[0, 0, 0, 1, 200]);
    frame::put_ping(&mut wire, true, *b"87654321");
    let (r, events) = feed(&mut c, &wire);
    r.unwrap();
    assert!(matches!(&events[..], [Event::Pong { data }] if data == b"87654321"));
    assert_eq!(
        written(&mut c),
        [Frame::Ping {
            ack: true,
            data: *b"12345678"
        }]
    );
}

/// Each malformed frame is the connection error RFC 9113 names for it.
#[test]
fn malformed_frames_are_typed_connection_errors() {
    let frame_of = |len: usize, k: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut b = BytesMut::new();
        frame::put_header(&mut b, len, k, flags, stream);
        b.put_slice(payload);
        b
    };
    let cases: Vec<(&str, BytesMut, ErrorCode)> = vec![
        (
            "DATA on stream 0",
            frame_of(1, kind::DATA, 0, 0, b"x"),
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "frame above MAX_FRAME_SIZE",
            frame_of(16_385, kind::DATA, 0, 1, b""),
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        (
            "PING of 7",
            frame_of(7, kind::PING, 0, 0, &[0; 7]),
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        (
            "PING on a stream",
            frame_of(8, kind::PING, 0, 1, &[0; 8]),
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "SETTINGS of 5",
            frame_of(5, kind::SETTINGS, 0, 0, &[0; 5]),
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        (
            "SETTINGS ACK with payload",
            frame_of(6, kind::SETTINGS, flag::ACK, 0, &[0; 6]),
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        (
            "ENABLE_PUSH 1",
            settings(&[(setting::ENABLE_PUSH, 1)]),
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "window above 2^31-1",
            settings(&[(setting::INITIAL_WINDOW_SIZE, 1 << 31)]),
            ErrorCode::FLOW_CONTROL_ERROR,
        ),
        (
            "MAX_FRAME_SIZE too small",
            settings(&[(setting::MAX_FRAME_SIZE, 100)]),
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "PUSH_PROMISE",
            frame_of(4, kind::PUSH_PROMISE, flag::END_HEADERS, 1, &[0, 0, 0, 2]),
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "GOAWAY of 4",
            frame_of(4, kind::GOAWAY, 0, 0, &[0; 4]),
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        (
            "RST_STREAM of 3",
            frame_of(3, kind::RST_STREAM, 0, 1, &[0; 3]),
            ErrorCode::FRAME_SIZE_ERROR,
        ),
        (
            "RST_STREAM on an idle stream",
            frame_of(4, kind::RST_STREAM, 0, 99, &[0; 4]),
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "WINDOW_UPDATE of 0 on the connection",
            frame_of(4, kind::WINDOW_UPDATE, 0, 0, &[0; 4]),
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "connection window overflow",
            frame_of(4, kind::WINDOW_UPDATE, 0, 0, &[0x7f, 0xff, 0xff, 0xff]),
            ErrorCode::FLOW_CONTROL_ERROR,
        ),
        (
            "HEADERS on a server stream",
            frame_of(1, kind::HEADERS, flag::END_HEADERS, 2, &[0x88]),
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "padding longer than the frame",
            frame_of(2, kind::DATA, flag::PADDED, 1, &[5, 0]),
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "CONTINUATION alone",
            frame_of(1, kind::CONTINUATION, flag::END_HEADERS, 1, &[0x88]),
            ErrorCode::PROTOCOL_ERROR,
        ),
        (
            "bad HPACK",
            frame_of(1, kind::HEADERS, flag::END_HEADERS, 1, &[0xff]),
            ErrorCode::COMPRESSION_ERROR,
        ),
    ];
    for (what, wire, want) in cases {
        let mut c = connected(&[]);
        push(&mut c, "aa", b"").unwrap();
        written(&mut c);
        let (r, _) = feed(&mut c, &wire);
        match r {
            Err(H2Error::Connection { code, .. }) => assert_eq!(code, want, "{what}"),
            other => panic!("{what}: {other:?}"),
        }
        assert!(
            written(&mut c)
                .iter()
                .any(|f| matches!(f, Frame::GoAway { code, .. } if *code == want)),
            "{what}: GOAWAY with the code"
        );
    }
}

/// Header fields of an answer, and the reason it is malformed.
type Case<'a> = (&'a [(&'a str, &'a str)], &'a str);

/// A malformed answer resets its own stream (PROTOCOL_ERROR); the connection goes on.
#[test]
fn malformed_answers_reset_only_their_stream() {
    let cases: [Case<'_>; 5] = [
        (&[("apns-id", "x")], "answer without :status"),
        (
            &[(":status", "200"), ("Apns-Id", "x")],
            "upper-case header name",
        ),
        (
            &[("apns-id", "x"), (":status", "200")],
            "pseudo-header after a regular header",
        ),
        (
            &[(":status", "200"), ("connection", "close")],
            "connection-specific header in an answer",
        ),
        (
            &[(":status", "200"), ("content-length", "3")],
            "body length differs from content-length",
        ),
    ];
    let mut c = connected(&[]);
    let mut server = Server::new();
    for (fields, reason) in cases {
        let id = push(&mut c, "aa", b"").unwrap();
        written(&mut c);
        let block = server.block(fields);
        let mut wire = BytesMut::new();
        frame::put_headers(&mut wire, id, &block, true, 16_384);
        let (r, events) = feed(&mut c, &wire);
        r.unwrap();
        assert_eq!(failure_of(&events, id), Some(&Failure::Malformed(reason)));
        assert_eq!(
            written(&mut c),
            [Frame::RstStream {
                stream: id,
                code: ErrorCode::PROTOCOL_ERROR
            }]
        );
    }
    assert!(c.can_open());
}

/// A small seeded generator (xorshift), so the fuzz run is the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A plausible server transcript: SETTINGS, answers with bodies, PINGs, WINDOW_UPDATEs, GOAWAY.
fn transcript(rng: &mut Rng, streams: u32) -> BytesMut {
    let mut server = Server::new();
    let mut wire = settings(&[(setting::MAX_CONCURRENT_STREAMS, 1000)]);
    for i in 0..streams {
        let id = 2 * i + 1;
        wire.extend_from_slice(&server.answer(id, "200", false));
        let n = rng.below(40);
        let body = rng.bytes(n);
        frame::put_data(&mut wire, id, &body, true);
        frame::put_ping(&mut wire, false, [i as u8; 8]);
        frame::put_window_update(&mut wire, id, 1000);
    }
    frame::put_goaway(&mut wire, streams, ErrorCode::NO_ERROR, b"bye");
    wire
}

/// Random and mutated frame streams, fed in random pieces: the connection never panics, its
/// buffers and event queue stay bounded by what it was given, and an error is typed.
#[test]
fn random_and_mutated_frame_streams_never_panic_and_stay_bounded() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..3000 {
        let mut c = Connection::new(Config::default());
        for _ in 0..4 {
            push(&mut c, "aa", b"{\"aps\":{}}").unwrap();
        }
        let mut wire = transcript(&mut rng, 4).to_vec();
        match round % 3 {
            0 => {
                // Flip, insert or delete a few bytes.
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(wire.len());
                    match rng.below(3) {
                        0 => wire[at] ^= 1 << rng.below(8),
                        1 => wire.insert(at, rng.next() as u8),
                        _ => {
                            wire.remove(at);
                        }
                    }
                }
            }
            1 => {
                // Random frames with valid-looking headers after the SETTINGS.
                wire.truncate(9);
                for _ in 0..rng.below(20) {
                    let len = rng.below(64);
                    let mut b = BytesMut::new();
                    frame::put_header(
                        &mut b,
                        len,
                        rng.below(12) as u8,
                        rng.next() as u8,
                        rng.below(8) as u32,
                    );
                    wire.extend_from_slice(&b);
                    wire.extend_from_slice(&rng.bytes(len));
                }
            }
            _ => {
                // Pure noise after the SETTINGS.
                wire.truncate(9);
                let n = rng.below(300);
                wire.extend_from_slice(&rng.bytes(n));
            }
        }
        let mut rest = &wire[..];
        let mut events = 0;
        while !rest.is_empty() {
            let n = 1 + rng.below(rest.len().min(100));
            c.recv_buf().extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            let r = c.process();
            assert!(
                c.recv_buf().len() <= 16_384 + 9 + 100,
                "receive buffer bounded"
            );
            while c.poll_event().is_some() {
                events += 1;
            }
            let _ = c.take_output();
            if r.is_err() {
                assert!(c.process().is_err(), "a connection error is final");
                break;
            }
        }
        assert!(events <= wire.len(), "events bounded by the input");
    }
}

/// Random HPACK blocks (noise and mutated valid blocks): the decoder never panics, its table
/// never exceeds the allowed size, and the header list limit holds.
#[test]
fn random_hpack_blocks_never_panic_and_tables_stay_bounded() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut enc = Encoder::default();
    let mut d = Decoder::new(4096, 8192);
    for round in 0..20_000 {
        let mut block = BytesMut::new();
        if round % 2 == 0 {
            let n = rng.below(200);
            block.extend_from_slice(&rng.bytes(n));
        } else {
            enc.begin(&mut block);
            for i in 0..rng.below(6) {
                let n = rng.below(50);
                let v = rng.bytes(n);
                let v: Vec<u8> = v.iter().map(|b| b'a' + b % 26).collect();
                enc.field(format!("x-{i}").as_bytes(), &v, Kind::Constant, &mut block);
            }
            let len = block.len();
            if len > 0 {
                let at = rng.below(len);
                block[at] ^= 1 << rng.below(8);
            }
        }
        let mut list = 0;
        let r = d.decode(&block.freeze(), |n, v| list += n.len() + v.len() + 32);
        assert!(d.table_size() <= 4096);
        assert!(list <= 8192);
        if r.is_err() {
            // A failed block leaves the state undefined, as on a real connection: start over.
            d = Decoder::new(4096, 8192);
            enc = Encoder::default();
        }
    }
}

/// Every frame type (and an unknown one) with every single flag, no flags and all flags, payloads
/// of 0 to 24 random bytes and stream ids 0, 1, 2 and 2^31-1 (reserved bit set): the frame decoder
/// never panics, takes exactly one whole frame when it returns one, and keeps the buffer as it was
/// when it errs.
#[test]
fn frame_decoder_sweeps_types_flags_lengths_and_streams_without_panicking() {
    let mut rng = Rng(0xd1b5_4a32_d192_ed03);
    let flags: Vec<u8> = [0u8, 0xff]
        .into_iter()
        .chain((0..8).map(|b| 1 << b))
        .collect();
    let mut decoded = 0;
    for k in (0u8..=10).chain([0xfa]) {
        for &f in &flags {
            for len in 0..=24 {
                for stream in [0u32, 1, 2, 0xffff_ffff] {
                    let mut b = BytesMut::new();
                    frame::put_header(&mut b, len, k, f, stream);
                    b.put_slice(&rng.bytes(len));
                    // A byte of the next frame behind it must stay in the buffer.
                    b.put_u8(0xee);
                    match frame::decode(&mut b, frame::DEFAULT_MAX_FRAME_SIZE) {
                        Ok(Some(_)) => {
                            decoded += 1;
                            assert_eq!(&b[..], &[0xee], "type {k} flags {f:#x} len {len}");
                        }
                        Ok(None) => panic!("a whole frame was there: type {k} len {len}"),
                        Err(_) => {}
                    }
                }
            }
        }
    }
    assert!(decoded > 1000, "{decoded}");
}

/// A frame header announcing more than SETTINGS_MAX_FRAME_SIZE is refused from its 9 bytes: the
/// decoder does not wait for (or buffer) the 16 MB announced.
#[test]
fn an_oversized_frame_is_refused_from_its_header_alone() {
    for max in [frame::DEFAULT_MAX_FRAME_SIZE, 1 << 20] {
        let mut b = BytesMut::new();
        frame::put_header(&mut b, frame::MAX_MAX_FRAME_SIZE as usize, kind::DATA, 0, 1);
        let err = frame::decode(&mut b, max).unwrap_err();
        assert!(matches!(
            err,
            H2Error::Connection {
                code: ErrorCode::FRAME_SIZE_ERROR,
                ..
            }
        ));
    }
    let mut c = connected(&[]);
    c.recv_buf()
        .extend_from_slice(&[0xff, 0xff, 0xff, kind::DATA, 0, 0, 0, 0, 1]);
    assert!(c.process().is_err());
}

/// HEADERS followed by CONTINUATIONs that never end: the connection fails ENHANCE_YOUR_CALM once
/// the block passes `max_header_block`, having buffered no more than that and one frame.
#[test]
fn an_endless_continuation_flood_is_cut_off_at_the_header_block_limit() {
    let cfg = Config::default();
    let limit = cfg.max_header_block;
    let mut c = Connection::new(cfg);
    c.recv_buf().extend_from_slice(&settings(&[]));
    c.process().unwrap();
    let id = push(&mut c, "aa", b"{}").unwrap();
    let chunk = vec![0x82u8; 16_000];
    let mut wire = BytesMut::new();
    frame::put_header(&mut wire, chunk.len(), kind::HEADERS, 0, id);
    wire.put_slice(&chunk);
    let mut fed = 0;
    let mut result = c.process();
    for _ in 0..1000 {
        c.recv_buf().extend_from_slice(&wire);
        fed += wire.len();
        result = c.process();
        if result.is_err() {
            break;
        }
        wire.clear();
        frame::put_header(&mut wire, chunk.len(), kind::CONTINUATION, 0, id);
        wire.put_slice(&chunk);
    }
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            H2Error::Connection {
                code: ErrorCode::ENHANCE_YOUR_CALM,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(fed <= limit + 2 * (16_000 + 9), "cut off after {fed} bytes");
}

/// A block of 20 000 indexed fields (one byte each) against an 8 KiB header list limit: the
/// decoder emits fields only up to the limit and reports the list too large.
#[test]
fn hpack_header_list_bound_holds_for_tiny_indexed_fields() {
    let mut d = Decoder::new(4096, 8192);
    let block = Bytes::from(vec![0x82u8; 20_000]);
    let mut list = 0;
    let decoded = d
        .decode(&block, |n, v| list += n.len() + v.len() + 32)
        .unwrap();
    assert!(decoded.too_large);
    assert!(list <= 8192, "{list}");
    assert!(list > 8000, "fields up to the limit were emitted: {list}");
}

/// Integers past what fits (RFC 7541 §5.1 continuation bytes without end, or beyond usize) are
/// errors, not overflows or panics, in every position a block has one.
#[test]
fn hpack_integer_overflow_is_an_error() {
    for first in [0xffu8, 0x7f, 0x3f, 0x1f, 0x0f] {
        for n in [1usize, 5, 9, 10, 11, 20, 64] {
            let mut b = vec![first];
            b.extend(std::iter::repeat_n(0xffu8, n));
            b.push(0x7f);
            let mut d = Decoder::new(4096, 8192);
            assert!(
                d.decode(&Bytes::from(b), |_, _| {}).is_err(),
                "{first:#x} + {n} × 0xff"
            );
        }
    }
}

/// Huffman: random byte strings (all 256 symbols) survive encode → decode; random input never
/// panics, and never decodes to more than the limit given.
#[test]
fn huffman_round_trips_random_strings_and_bounds_random_input() {
    use pushrelay::h2client::hpack::huffman;
    let mut rng = Rng(0x94d0_49bb_1331_11eb);
    for _ in 0..5000 {
        let n = rng.below(100);
        let s = rng.bytes(n);
        let mut enc = BytesMut::new();
        huffman::encode(&s, &mut enc);
        assert_eq!(enc.len(), huffman::encoded_len(&s));
        let mut dec = BytesMut::new();
        huffman::decode(&enc, &mut dec, s.len()).unwrap();
        assert_eq!(&dec[..], &s[..]);
        if !s.is_empty() {
            let mut short = BytesMut::new();
            assert!(huffman::decode(&enc, &mut short, s.len() - 1).is_err());
            assert!(short.len() < s.len());
        }
    }
    for _ in 0..20_000 {
        let n = rng.below(64);
        let noise = rng.bytes(n);
        let max = rng.below(80);
        let mut out = BytesMut::new();
        let _ = huffman::decode(&noise, &mut out, max);
        assert!(out.len() <= max, "{} > {max}", out.len());
    }
}

/// Request trailers wait behind a body the window holds back, then end the stream in a HEADERS
/// frame the server decodes to the same fields; no DATA carries END_STREAM.
#[test]
fn request_trailers_follow_the_whole_body_and_end_the_stream() {
    static BODY: [u8; 70_000] = [3; 70_000];
    let mut c = connected(&[]);
    let headers = apns_headers("bearer x.y.z");
    let head = RequestHead {
        method: &Method::POST,
        scheme: "https",
        authority: "api.push.apple.com",
        path: "/3/device/aa",
        headers: &headers,
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("c0ffee"));
    let id = c
        .send_request_with_trailers(&head, Bytes::from_static(&BODY), Some(trailers))
        .unwrap();
    let first = written(&mut c);
    let heads = |frames: &[Frame]| {
        frames
            .iter()
            .filter(|f| matches!(f, Frame::Headers { .. }))
            .count()
    };
    assert_eq!(
        heads(&first),
        1,
        "only the request head while the body waits"
    );
    assert!(c.has_pending(id));
    let mut wire = BytesMut::new();
    frame::put_window_update(&mut wire, 0, 1 << 20);
    frame::put_window_update(&mut wire, id, 1 << 20);
    feed(&mut c, &wire).0.unwrap();
    let rest = written(&mut c);
    for f in first.iter().chain(&rest) {
        if let Frame::Data { end_stream, .. } = f {
            assert!(!end_stream, "DATA must not end a stream with trailers");
        }
    }
    let Some(Frame::Headers {
        end_stream: true,
        block,
        ..
    }) = rest.last()
    else {
        panic!("trailers last: {rest:?}");
    };
    let mut server = Server::new();
    // The server's decoder has seen the request head first, as on the wire.
    let Some(Frame::Headers {
        block: head_block, ..
    }) = first.first()
    else {
        panic!("{first:?}");
    };
    server.dec.decode(head_block, |_, _| {}).unwrap();
    let mut fields = Vec::new();
    server
        .dec
        .decode(block, |n, v| fields.push((n, v)))
        .unwrap();
    assert_eq!(
        fields,
        vec![(
            Bytes::from_static(b"x-checksum"),
            Bytes::from_static(b"c0ffee")
        )]
    );
}

/// The static table's lookups by name (a match on the bytes) agree with a walk over the table
/// for every entry, and find nothing for other names.
#[test]
fn static_table_lookups_agree_with_the_table() {
    use pushrelay::h2client::hpack::table::{STATIC, static_index, static_name_index};
    for (i, (n, v)) in STATIC.iter().enumerate() {
        let first_name = STATIC.iter().position(|(m, _)| m == n).unwrap() + 1;
        let first_pair = STATIC.iter().position(|e| e == &(*n, *v)).unwrap() + 1;
        assert_eq!(static_name_index(n.as_bytes()), Some(first_name), "{n}");
        assert_eq!(
            static_index(n.as_bytes(), v.as_bytes()),
            Some(first_pair),
            "{i}"
        );
    }
    for other in [
        "",
        ":authorit",
        "apns-topic",
        "Accept",
        "x-www-authenticate",
    ] {
        assert_eq!(static_name_index(other.as_bytes()), None, "{other}");
    }
    assert_eq!(static_index(b":method", b"PUT"), None);
    assert_eq!(static_index(b":status", b"404"), Some(13));
}
