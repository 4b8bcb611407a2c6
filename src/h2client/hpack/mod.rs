//! HPACK (RFC 7541) for the upstream client: an encoder shaped by what APNs requests look like,
//! and a decoder for answers that bounds everything a hostile upstream (or a TLS-inspecting proxy)
//! could make it hold.
//!
//! Encoder: each header is sent as one of three [`Kind`]s. `Constant` fields (`:authority`,
//! `apns-topic`, `apns-push-type`, `content-type`…, the same on every push of a connection) are
//! inserted into the peer's dynamic table once and then sent as a one- or two-byte index.
//! `PerRequest` fields (`:path`, `apns-id`, `apns-expiration`…) are literals without indexing,
//! so they never churn the table. `Secret` fields (`authorization`) are never-indexed literals,
//! which also tells any intermediary not to index them. Static-table indices are used for names
//! and for whole fields where they exist. Huffman coding is used for a string only when it makes
//! it shorter, and for per-request strings only when [`Encoder::huffman_literals`] asks: a JWT or
//! a device token gains little and costs a table walk per byte, every push.
//!
//! Decoder: the dynamic table is bounded by the size we advertise (and a size update above it
//! is a COMPRESSION_ERROR), the decoded header list by a limit of our own, every integer by
//! 2^32, every string by the block it came in. Literal strings are slices of the received
//! block (no copy); Huffman strings are decoded into fresh buffers.

pub mod huffman;
pub mod table;

use bytes::{BufMut, Bytes, BytesMut};

use table::{Dynamic, entry_size, static_name_index, static_value_index};

/// The dynamic table size this side uses and advertises (the RFC default).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// Bytes the decoder takes at once for the Huffman-decoded strings it hands out.
const SCRATCH_CHUNK: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("HPACK block ends inside a field")]
    Truncated,
    #[error("HPACK integer too large")]
    IntegerOverflow,
    #[error("HPACK index {0} is not in the tables")]
    BadIndex(usize),
    #[error("HPACK dynamic table size update to {0} is above the allowed size")]
    TableSizeTooLarge(usize),
    #[error("HPACK dynamic table size update after the first field of a block")]
    LateTableSizeUpdate,
    #[error("HPACK string: {0}")]
    Huffman(#[from] huffman::HuffmanError),
}

/// How a header is represented on the wire; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Constant,
    PerRequest,
    Secret,
}

// Representation prefixes (RFC 7541 §6).
const INDEXED: u8 = 0x80;
const LITERAL_INDEXED: u8 = 0x40;
const LITERAL_NOT_INDEXED: u8 = 0x00;
const LITERAL_NEVER_INDEXED: u8 = 0x10;
const SIZE_UPDATE: u8 = 0x20;

/// Appends `value` as an HPACK integer with an `n`-bit prefix, `first` holding the high bits.
pub fn encode_int(value: usize, n: u32, first: u8, out: &mut BytesMut) {
    let max = (1usize << n) - 1;
    if value < max {
        out.put_u8(first | value as u8);
        return;
    }
    out.put_u8(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.put_u8((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.put_u8(rest as u8);
}

/// Reads an HPACK integer with an `n`-bit prefix from `buf` at `*pos`.
fn decode_int(buf: &[u8], pos: &mut usize, n: u32) -> Result<usize, HpackError> {
    let max = (1usize << n) - 1;
    let first = *buf.get(*pos).ok_or(HpackError::Truncated)?;
    *pos += 1;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok(value);
    }
    let mut shift = 0u32;
    loop {
        let b = *buf.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        if shift > 28 {
            return Err(HpackError::IntegerOverflow);
        }
        value += usize::from(b & 0x7f) << shift;
        if value > u32::MAX as usize {
            return Err(HpackError::IntegerOverflow);
        }
        if b & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
    }
}

/// When a string is Huffman-coded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Raw,
    /// When it is strictly shorter: a per-push value gains nothing from a tie but CPU.
    IfShorter,
    /// When it is no longer: a constant is coded once per connection (RFC 7541 C.6 does this).
    IfNotLonger,
}

/// Appends a string literal, Huffman-coded as `coding` says.
fn encode_str(s: &[u8], coding: Coding, out: &mut BytesMut) {
    if coding != Coding::Raw {
        let coded = huffman::encoded_len(s);
        if coded < s.len() || (coding == Coding::IfNotLonger && coded == s.len()) {
            encode_int(coded, 7, 0x80, out);
            huffman::encode(s, out);
            return;
        }
    }
    encode_int(s.len(), 7, 0, out);
    out.extend_from_slice(s);
}

/// The request-side encoder. Its table mirrors the one the peer's decoder keeps.
#[derive(Debug)]
pub struct Encoder {
    table: Dynamic,
    /// A table size change to announce at the start of the next block.
    pending_update: Option<usize>,
    /// Huffman-code names and `Constant` values when that makes them shorter (sent once).
    pub huffman_constants: bool,
    /// Huffman-code `PerRequest` and `Secret` values when that makes them shorter.
    pub huffman_literals: bool,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::with_table_size(DEFAULT_TABLE_SIZE)
    }
}

impl Encoder {
    /// An encoder whose peer's table starts at `size` bytes (the peer's SETTINGS, agreed).
    pub fn with_table_size(size: usize) -> Self {
        Encoder {
            table: Dynamic::new(size),
            pending_update: None,
            huffman_constants: true,
            huffman_literals: false,
        }
    }

    /// The peer's SETTINGS_HEADER_TABLE_SIZE: we use up to `DEFAULT_TABLE_SIZE` of it and say so
    /// at the start of the next block when that differs from what we use now.
    pub fn set_peer_table_size(&mut self, peer: usize) {
        let size = peer.min(DEFAULT_TABLE_SIZE);
        if size != self.table.max_size() {
            self.table.set_max_size(size);
            self.pending_update = Some(size);
        }
    }

    /// Starts a header block: announces a pending table size change.
    pub fn begin(&mut self, out: &mut BytesMut) {
        if let Some(size) = self.pending_update.take() {
            encode_int(size, 5, SIZE_UPDATE, out);
        }
    }

    /// Appends one field (`name` lowercase) as `kind` says.
    pub fn field(&mut self, name: &[u8], value: &[u8], kind: Kind, out: &mut BytesMut) {
        // One lookup of the name serves both the full-field check and a literal's name.
        let name_index = static_name_index(name);
        if kind != Kind::Secret
            && let Some(i) = name_index.and_then(|first| static_value_index(first, name, value))
        {
            return encode_int(i, 7, INDEXED, out);
        }
        let constants = if self.huffman_constants {
            Coding::IfNotLonger
        } else {
            Coding::Raw
        };
        let literals = if self.huffman_literals {
            Coding::IfShorter
        } else {
            Coding::Raw
        };
        let (prefix, bits, coding) = match kind {
            Kind::Constant => {
                if let Some(at) = self.table.find(name, value) {
                    return encode_int(table::STATIC.len() + 1 + at, 7, INDEXED, out);
                }
                (LITERAL_INDEXED, 6, constants)
            }
            Kind::PerRequest => (LITERAL_NOT_INDEXED, 4, literals),
            Kind::Secret => (LITERAL_NEVER_INDEXED, 4, literals),
        };
        match name_index {
            Some(i) => encode_int(i, bits, prefix, out),
            None => {
                out.put_u8(prefix);
                encode_str(name, constants, out);
            }
        }
        encode_str(value, coding, out);
        if prefix == LITERAL_INDEXED {
            self.table
                .insert(Bytes::copy_from_slice(name), Bytes::copy_from_slice(value));
        }
    }

    /// Entries now in the peer's table as we model it.
    pub fn table_len(&self) -> usize {
        self.table.len()
    }
}

/// What decoding a header block gave besides the fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// The header list was larger than the decoder's limit: fields past it were not emitted.
    pub too_large: bool,
}

/// The answer-side decoder.
#[derive(Debug)]
pub struct Decoder {
    table: Dynamic,
    /// The SETTINGS_HEADER_TABLE_SIZE we advertised: the most a size update may ask.
    allowed: usize,
    /// Bound on a decoded header list (RFC 9113 §6.5.2 sizes: name + value + 32 each).
    max_list: usize,
    scratch: BytesMut,
}

impl Decoder {
    pub fn new(table_size: usize, max_list: usize) -> Self {
        Decoder {
            table: Dynamic::new(table_size),
            allowed: table_size,
            max_list,
            scratch: BytesMut::new(),
        }
    }

    pub fn table_size(&self) -> usize {
        self.table.size()
    }

    pub fn table_len(&self) -> usize {
        self.table.len()
    }

    fn lookup(&self, index: usize) -> Result<(Bytes, Bytes), HpackError> {
        if index == 0 {
            return Err(HpackError::BadIndex(0));
        }
        if let Some((n, v)) = table::STATIC.get(index - 1) {
            return Ok((
                Bytes::from_static(n.as_bytes()),
                Bytes::from_static(v.as_bytes()),
            ));
        }
        self.table
            .get(index - table::STATIC.len() - 1)
            .cloned()
            .ok_or(HpackError::BadIndex(index))
    }

    fn string(&mut self, block: &Bytes, pos: &mut usize) -> Result<Bytes, HpackError> {
        let huffman = block.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
        let len = decode_int(block, pos, 7)?;
        let end = pos.checked_add(len).ok_or(HpackError::Truncated)?;
        if end > block.len() {
            return Err(HpackError::Truncated);
        }
        let raw = block.slice(*pos..end);
        *pos = end;
        if !huffman {
            return Ok(raw);
        }
        // Decoded strings are cut from one buffer, several to an allocation (an answer's
        // `apns-id` is 36 bytes); a string still in use keeps only its own buffer alive.
        let room = huffman::max_decoded_len(raw.len());
        if self.scratch.capacity() < room {
            self.scratch.reserve(room.max(SCRATCH_CHUNK));
        }
        huffman::decode(&raw, &mut self.scratch, usize::MAX)?;
        Ok(self.scratch.split().freeze())
    }

    /// Decodes one complete header block, calling `emit` for each field in order.
    pub fn decode(
        &mut self,
        block: &Bytes,
        mut emit: impl FnMut(Bytes, Bytes),
    ) -> Result<Decoded, HpackError> {
        let mut pos = 0;
        let mut list = 0usize;
        let mut too_large = false;
        let mut fields = 0usize;
        while pos < block.len() {
            let b = block[pos];
            let (name, value) = if b & INDEXED != 0 {
                let i = decode_int(block, &mut pos, 7)?;
                self.lookup(i)?
            } else if b & 0xc0 == LITERAL_INDEXED {
                let (n, v) = self.literal(block, &mut pos, 6)?;
                // Copies of its own: a slice would keep what it was cut from (the frame's read
                // buffer, the Huffman scratch) alive as long as the entry lives, and the table's
                // size bound would not bound memory.
                self.table
                    .insert(Bytes::copy_from_slice(&n), Bytes::copy_from_slice(&v));
                (n, v)
            } else if b & 0xe0 == SIZE_UPDATE {
                if fields > 0 {
                    return Err(HpackError::LateTableSizeUpdate);
                }
                let size = decode_int(block, &mut pos, 5)?;
                if size > self.allowed {
                    return Err(HpackError::TableSizeTooLarge(size));
                }
                self.table.set_max_size(size);
                continue;
            } else {
                // Not indexed (0000) or never indexed (0001): 4-bit name index either way.
                self.literal(block, &mut pos, 4)?
            };
            fields += 1;
            list = list.saturating_add(entry_size(&name, &value));
            if list > self.max_list {
                too_large = true;
            }
            if !too_large {
                emit(name, value);
            }
        }
        Ok(Decoded { too_large })
    }

    fn literal(
        &mut self,
        block: &Bytes,
        pos: &mut usize,
        bits: u32,
    ) -> Result<(Bytes, Bytes), HpackError> {
        let i = decode_int(block, pos, bits)?;
        let name = if i == 0 {
            self.string(block, pos)?
        } else {
            self.lookup(i)?.0
        };
        let value = self.string(block, pos)?;
        Ok((name, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn table_entries_do_not_keep_the_block_they_came_from() {
        // A literal with incremental indexing (raw, then Huffman-coded) inside a large block.
        let mut raw = vec![0x40, 0x01, b'x', 0x03, b'a', b'b', b'c'];
        let mut huffman_value = BytesMut::new();
        huffman::encode(b"0123456789abcdef", &mut huffman_value);
        raw.extend_from_slice(&[0x40, 0x01, b'y', 0x80 | huffman_value.len() as u8]);
        raw.extend_from_slice(&huffman_value);
        let mut block = BytesMut::from(&raw[..]);
        block.resize(raw.len() + 16 * 1024, 0);
        let block = block.freeze();
        let used = block.slice(..raw.len());
        let mut d = Decoder::new(4096, 64 * 1024);
        d.decode(&used, |_, _| {}).unwrap();
        let range = block.as_ptr_range();
        for at in 0..2 {
            let (n, v) = d.table.get(at).unwrap();
            for s in [n, v] {
                assert!(
                    !range.contains(&s.as_ptr()),
                    "entry {at} is a slice of the 16 KiB block: {s:?}"
                );
            }
        }
    }

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        d.decode(&Bytes::copy_from_slice(block), |n, v| {
            out.push((
                String::from_utf8(n.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            ))
        })
        .unwrap();
        out
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn integers_of_rfc_7541_c1() {
        let mut out = BytesMut::new();
        encode_int(10, 5, 0, &mut out);
        encode_int(1337, 5, 0, &mut out);
        encode_int(42, 8, 0, &mut out);
        assert_eq!(&out[..], &[0x0a, 0x1f, 0x9a, 0x0a, 0x2a]);
        let mut pos = 0;
        assert_eq!(decode_int(&out, &mut pos, 5), Ok(10));
        assert_eq!(decode_int(&out, &mut pos, 5), Ok(1337));
        assert_eq!(decode_int(&out, &mut pos, 8), Ok(42));
        let mut pos = 0;
        let huge = [0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert_eq!(
            decode_int(&huge, &mut pos, 5),
            Err(HpackError::IntegerOverflow)
        );
    }

    /// Encodes `list` (kinds as given) and checks the bytes, then decodes them back and checks
    /// the fields and the decoder's table size: one step of an RFC 7541 Appendix C example.
    fn step(
        enc: &mut Encoder,
        dec: &mut Decoder,
        list: &[(&str, &str, Kind)],
        wire: &str,
        table_size: usize,
    ) {
        let mut out = BytesMut::new();
        enc.begin(&mut out);
        for (n, v, k) in list {
            enc.field(n.as_bytes(), v.as_bytes(), *k, &mut out);
        }
        assert_eq!(hex_of(&out), hex_of(&hex(wire)), "encoding of {list:?}");
        let fields: Vec<(&str, &str)> = list.iter().map(|(n, v, _)| (*n, *v)).collect();
        assert_eq!(decode_all(dec, &hex(wire)), pairs(&fields));
        assert_eq!(dec.table_size(), table_size);
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    use Kind::{Constant as C, PerRequest as P, Secret as S};

    #[test]
    fn field_representations_of_rfc_7541_c2() {
        let plain = || Encoder {
            huffman_constants: false,
            ..Encoder::default()
        };
        let mut d = Decoder::new(4096, 1 << 16);
        step(
            &mut plain(),
            &mut d,
            &[("custom-key", "custom-header", C)],
            "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
            55,
        );
        let mut d = Decoder::new(4096, 1 << 16);
        step(
            &mut plain(),
            &mut d,
            &[(":path", "/sample/path", P)],
            "040c 2f73 616d 706c 652f 7061 7468",
            0,
        );
        step(
            &mut plain(),
            &mut d,
            &[("password", "secret", S)],
            "1008 7061 7373 776f 7264 0673 6563 7265 74",
            0,
        );
        step(&mut plain(), &mut d, &[(":method", "GET", C)], "82", 0);
    }

    const REQ1: [(&str, &str, Kind); 4] = [
        (":method", "GET", C),
        (":scheme", "http", C),
        (":path", "/", P),
        (":authority", "www.example.com", C),
    ];
    const REQ2: [(&str, &str, Kind); 5] = [
        (":method", "GET", C),
        (":scheme", "http", C),
        (":path", "/", P),
        (":authority", "www.example.com", C),
        ("cache-control", "no-cache", C),
    ];
    const REQ3: [(&str, &str, Kind); 5] = [
        (":method", "GET", C),
        (":scheme", "https", C),
        (":path", "/index.html", P),
        (":authority", "www.example.com", C),
        ("custom-key", "custom-value", C),
    ];

    #[test]
    fn requests_without_huffman_of_rfc_7541_c3() {
        let mut e = Encoder {
            huffman_constants: false,
            ..Encoder::default()
        };
        let mut d = Decoder::new(4096, 1 << 16);
        step(
            &mut e,
            &mut d,
            &REQ1,
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            57,
        );
        step(
            &mut e,
            &mut d,
            &REQ2,
            "8286 84be 5808 6e6f 2d63 6163 6865",
            110,
        );
        step(
            &mut e,
            &mut d,
            &REQ3,
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            164,
        );
    }

    #[test]
    fn requests_with_huffman_of_rfc_7541_c4() {
        let mut e = Encoder::default();
        let mut d = Decoder::new(4096, 1 << 16);
        step(
            &mut e,
            &mut d,
            &REQ1,
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            57,
        );
        step(&mut e, &mut d, &REQ2, "8286 84be 5886 a8eb 1064 9cbf", 110);
        step(
            &mut e,
            &mut d,
            &REQ3,
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            164,
        );
        assert_eq!(e.table_len(), 3);
    }

    const DATE1: &str = "Mon, 21 Oct 2013 20:13:21 GMT";
    const DATE2: &str = "Mon, 21 Oct 2013 20:13:22 GMT";
    const LOC: &str = "https://www.example.com";
    const COOKIE: &str = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";

    fn responses(e: &mut Encoder, d: &mut Decoder, wires: [&str; 3]) {
        let r1 = [
            (":status", "302", C),
            ("cache-control", "private", C),
            ("date", DATE1, C),
            ("location", LOC, C),
        ];
        let r2 = [
            (":status", "307", C),
            ("cache-control", "private", C),
            ("date", DATE1, C),
            ("location", LOC, C),
        ];
        let r3 = [
            (":status", "200", C),
            ("cache-control", "private", C),
            ("date", DATE2, C),
            ("location", LOC, C),
            ("content-encoding", "gzip", C),
            ("set-cookie", COOKIE, C),
        ];
        step(e, d, &r1, wires[0], 222);
        step(e, d, &r2, wires[1], 222);
        step(e, d, &r3, wires[2], 215);
        assert_eq!(d.table_len(), 3);
    }

    #[test]
    fn responses_without_huffman_and_with_evictions_of_rfc_7541_c5() {
        let mut e = Encoder::with_table_size(256);
        e.huffman_constants = false;
        let mut d = Decoder::new(256, 1 << 16);
        responses(
            &mut e,
            &mut d,
            [
                "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
                 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
                 6c65 2e63 6f6d",
                "4803 3330 37c1 c0bf",
                "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
                 54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
                 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e
                 3d31",
            ],
        );
    }

    #[test]
    fn responses_with_huffman_and_with_evictions_of_rfc_7541_c6() {
        let mut e = Encoder::with_table_size(256);
        let mut d = Decoder::new(256, 1 << 16);
        responses(
            &mut e,
            &mut d,
            [
                "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
                 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
                "4883 640e ffc1 c0bf",
                "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
                 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
                 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
            ],
        );
    }

    #[test]
    fn a_smaller_peer_table_is_announced_at_the_next_block() {
        let mut e = Encoder::default();
        let mut d = Decoder::new(4096, 1 << 16);
        let mut out = BytesMut::new();
        e.begin(&mut out);
        e.field(b"apns-topic", b"com.example.app", C, &mut out);
        decode_all(&mut d, &out);
        assert_eq!(d.table_len(), 1);
        e.set_peer_table_size(0);
        let mut out = BytesMut::new();
        e.begin(&mut out);
        e.field(b"apns-topic", b"com.example.app", C, &mut out);
        assert_eq!(out[0], 0x20, "size update to 0 first");
        assert_eq!(
            decode_all(&mut d, &out),
            pairs(&[("apns-topic", "com.example.app")])
        );
        assert_eq!(d.table_len(), 0);
    }

    #[test]
    fn decoder_rejects_what_rfc_7541_forbids() {
        let mut d = Decoder::new(4096, 1 << 16);
        let mut bad = |b: &[u8]| d.decode(&Bytes::copy_from_slice(b), |_, _| {}).unwrap_err();
        assert_eq!(bad(&[0x80]), HpackError::BadIndex(0));
        assert_eq!(bad(&[0xbe]), HpackError::BadIndex(62));
        assert_eq!(
            bad(&[0x3f, 0xe2, 0x1f]),
            HpackError::TableSizeTooLarge(4097)
        );
        assert_eq!(bad(&[0x82, 0x20]), HpackError::LateTableSizeUpdate);
        assert_eq!(bad(&[0x04, 0x05, b'a']), HpackError::Truncated);
        assert_eq!(
            bad(&[0x04, 0x81, 0x00]),
            HpackError::Huffman(huffman::HuffmanError::Padding)
        );
    }

    #[test]
    fn decoder_stops_emitting_past_the_header_list_limit() {
        let mut d = Decoder::new(4096, 100);
        let mut out = BytesMut::new();
        let mut e = Encoder::default();
        for i in 0..5 {
            e.field(format!("x-{i}").as_bytes(), b"0123456789", P, &mut out);
        }
        let mut n = 0;
        let r = d.decode(&out.freeze(), |_, _| n += 1).unwrap();
        assert!(r.too_large);
        assert_eq!(n, 2, "45 bytes each: two fit in 100");
    }
}
