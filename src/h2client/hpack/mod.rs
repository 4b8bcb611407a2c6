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

use table::{Dynamic, entry_size, static_index, static_name_index};

/// The dynamic table size this side uses and advertises (the RFC default).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

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

/// Appends a string literal, Huffman-coded when allowed and shorter.
fn encode_str(s: &[u8], huffman: bool, out: &mut BytesMut) {
    if huffman {
        let coded = huffman::encoded_len(s);
        if coded < s.len() {
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
        if kind != Kind::Secret
            && let Some(i) = static_index(name, value)
        {
            return encode_int(i, 7, INDEXED, out);
        }
        let (prefix, bits, huffman) = match kind {
            Kind::Constant => {
                if let Some(at) = self.table.find(name, value) {
                    return encode_int(table::STATIC.len() + 1 + at, 7, INDEXED, out);
                }
                (LITERAL_INDEXED, 6, self.huffman_constants)
            }
            Kind::PerRequest => (LITERAL_NOT_INDEXED, 4, self.huffman_literals),
            Kind::Secret => (LITERAL_NEVER_INDEXED, 4, self.huffman_literals),
        };
        match static_name_index(name) {
            Some(i) => encode_int(i, bits, prefix, out),
            None => {
                out.put_u8(prefix);
                encode_str(name, self.huffman_constants, out);
            }
        }
        encode_str(value, huffman, out);
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
        // Shortest code is 5 bits: the output is bounded by the input.
        self.scratch.reserve(len * 8 / 5 + 1);
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
                self.table.insert(n.clone(), v.clone());
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
}
