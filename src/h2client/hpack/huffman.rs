//! The HPACK Huffman code (RFC 7541 Appendix B). The code is canonical: codes of one length are
//! consecutive in symbol order, and each length starts where the previous one ended, shifted. So
//! the table here is only the 257 code lengths; codes and the decoding tables are computed from
//! them at compile time, and tests check the result against codes printed in the RFC.

/// Code length in bits of each symbol, 0..=255 and EOS (256), from RFC 7541 Appendix B.
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, // 0..16
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, // 16..32
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, // ' '..'/'
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, // '0'..'?'
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, // '@'..'O'
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, // 'P'..'_'
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, // '`'..'o'
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, // 'p'..127
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, // 128..144
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, // 144..160
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, // 160..176
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, // 176..192
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, // 192..208
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, // 208..224
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, // 224..240
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, // 240..256
    30, // EOS
];

const EOS: u16 = 256;
const MAX_LEN: usize = 30;

/// Everything derived from `LENGTHS`: each symbol's code, and per length the first code, how many
/// codes have it, and where its symbols start in `sorted`.
struct Tables {
    codes: [u32; 257],
    /// One past the last code of each length (a code of length L is below `limit[L]` exactly
    /// when no shorter code is a prefix of the bits read so far).
    limit: [u32; MAX_LEN + 1],
    first: [u32; MAX_LEN + 1],
    offset: [u16; MAX_LEN + 1],
    sorted: [u16; 257],
    /// By the next `PAIR_BITS` bits: the one or two symbols whose codes they start with, as
    /// `second << 16 | first << 8 | count << 5 | bits used`; 0 where the first code is longer.
    /// Header text (digits, lowercase, `-`) has 5–7 bit codes: mostly two symbols a lookup.
    pairs: [u32; 1 << PAIR_BITS],
}

const PAIR_BITS: usize = 12;

static TABLES: Tables = build();

const fn build() -> Tables {
    let mut count = [0u32; MAX_LEN + 1];
    let mut s = 0;
    while s < 257 {
        count[LENGTHS[s] as usize] += 1;
        s += 1;
    }
    let mut first = [0u32; MAX_LEN + 1];
    let mut limit = [0u32; MAX_LEN + 1];
    let mut offset = [0u16; MAX_LEN + 1];
    let mut code = 0u32;
    let mut at = 0u16;
    let mut len = 1;
    while len <= MAX_LEN {
        code <<= 1;
        first[len] = code;
        offset[len] = at;
        code += count[len];
        limit[len] = code;
        at += count[len] as u16;
        len += 1;
    }
    let mut next = first;
    let mut codes = [0u32; 257];
    let mut sorted = [0u16; 257];
    let mut s = 0;
    while s < 257 {
        let l = LENGTHS[s] as usize;
        codes[s] = next[l];
        sorted[(offset[l] as u32 + next[l] - first[l]) as usize] = s as u16;
        next[l] += 1;
        s += 1;
    }
    let mut pairs = [0u32; 1 << PAIR_BITS];
    let mut w = 0;
    while w < (1 << PAIR_BITS) {
        let (first_sym, first_len) =
            leading_code(w as u32, PAIR_BITS, &limit, &first, &offset, &sorted);
        if first_len > 0 {
            let left = PAIR_BITS - first_len;
            let rest = w as u32 & ((1 << left) - 1);
            let (second_sym, second_len) =
                leading_code(rest, left, &limit, &first, &offset, &sorted);
            pairs[w] = if second_len > 0 {
                (second_sym << 16) | (first_sym << 8) | (2 << 5) | (first_len + second_len) as u32
            } else {
                (first_sym << 8) | (1 << 5) | first_len as u32
            };
        }
        w += 1;
    }
    Tables {
        codes,
        limit,
        first,
        offset,
        sorted,
        pairs,
    }
}

/// The symbol whose code `bits` (its `width` low bits, most significant first) start with, and
/// that code's length; length 0 when the code is longer than `width` (EOS, at 30 bits, always is).
const fn leading_code(
    bits: u32,
    width: usize,
    limit: &[u32; MAX_LEN + 1],
    first: &[u32; MAX_LEN + 1],
    offset: &[u16; MAX_LEN + 1],
    sorted: &[u16; 257],
) -> (u32, usize) {
    let mut len = 5;
    while len <= width {
        let c = bits >> (width - len);
        if c < limit[len] {
            return (
                sorted[(offset[len] as u32 + c - first[len]) as usize] as u32,
                len,
            );
        }
        len += 1;
    }
    (0, 0)
}

/// The code of `symbol` (0..=256) and its length, as RFC 7541 Appendix B prints them.
pub fn code(symbol: u16) -> (u32, u8) {
    let s = usize::from(symbol.min(EOS));
    (TABLES.codes[s], LENGTHS[s])
}

/// Length in bytes of `input` Huffman-coded (padding included).
pub fn encoded_len(input: &[u8]) -> usize {
    let bits: usize = input
        .iter()
        .map(|&b| usize::from(LENGTHS[usize::from(b)]))
        .sum();
    bits.div_ceil(8)
}

/// Appends `input` Huffman-coded, padded with the most significant bits of EOS (all ones).
pub fn encode(input: &[u8], out: &mut bytes::BytesMut) {
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    for &b in input {
        let s = usize::from(b);
        let len = u32::from(LENGTHS[s]);
        acc = (acc << len) | u64::from(TABLES.codes[s]);
        bits += len;
        while bits >= 8 {
            bits -= 8;
            out.extend_from_slice(&[(acc >> bits) as u8]);
        }
        // Keep only the bits not yet written, so the shift above never overflows.
        acc &= (1u64 << bits) - 1;
    }
    if bits > 0 {
        let pad = 8 - bits;
        out.extend_from_slice(&[((acc << pad) as u8) | ((1u8 << pad) - 1)]);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HuffmanError {
    #[error("Huffman string contains EOS")]
    Eos,
    #[error("Huffman string has invalid padding")]
    Padding,
    #[error("Huffman string decodes to more than the limit")]
    TooLong,
}

/// The most bytes `encoded` bytes of Huffman code can decode to: the shortest code is 5 bits.
pub fn max_decoded_len(encoded: usize) -> usize {
    encoded * 8 / 5
}

/// Appends the decoding of `input` to `out`, failing on EOS, bad padding (RFC 7541 §5.2), or an
/// output longer than `max` bytes.
pub fn decode(input: &[u8], out: &mut bytes::BytesMut, max: usize) -> Result<(), HuffmanError> {
    let start = out.len();
    // The shortest code is 5 bits: no more than this many symbols can come out. Written by
    // index into room made once, then cut to what was decoded.
    let room = max_decoded_len(input.len()).min(max.saturating_add(1));
    out.resize(start + room, 0);
    let mut n = 0;
    let r = decode_into(input, &mut out[start..], &mut n, max);
    out.truncate(start + n);
    r
}

fn decode_into(
    input: &[u8],
    out: &mut [u8],
    n: &mut usize,
    max: usize,
) -> Result<(), HuffmanError> {
    let t = &TABLES;
    let mut acc: u64 = 0;
    let mut bits: usize = 0;
    let mut rest = input;
    loop {
        // Four bytes at once while they fit, then byte by byte.
        if bits <= 32
            && let Some((word, tail)) = rest.split_first_chunk::<4>()
        {
            acc = (acc << 32) | u64::from(u32::from_be_bytes(*word));
            bits += 32;
            rest = tail;
        }
        while bits <= 56 {
            let Some((&b, tail)) = rest.split_first() else {
                break;
            };
            acc = (acc << 8) | u64::from(b);
            bits += 8;
            rest = tail;
        }
        if bits == 0 {
            return Ok(());
        }
        let mut len = 5;
        if bits >= PAIR_BITS {
            let e = t.pairs[((acc >> (bits - PAIR_BITS)) & ((1 << PAIR_BITS) - 1)) as usize];
            let count = ((e >> 5) & 3) as usize;
            if count > 0 {
                let Some(slots) = out.get_mut(*n..*n + count).filter(|_| *n + count <= max) else {
                    return Err(HuffmanError::TooLong);
                };
                slots[0] = (e >> 8) as u8;
                if let Some(second) = slots.get_mut(1) {
                    *second = (e >> 16) as u8;
                }
                *n += count;
                bits -= (e & 31) as usize;
                acc &= (1u64 << bits) - 1;
                continue;
            }
            // The first code is longer than the table's reach.
            len = PAIR_BITS + 1;
        }
        let mut found = None;
        while len <= MAX_LEN && len <= bits {
            let c = ((acc >> (bits - len)) & ((1u64 << len) - 1)) as u32;
            if c < t.limit[len] {
                found = Some((
                    t.sorted[usize::from(t.offset[len]) + (c - t.first[len]) as usize],
                    len,
                ));
                break;
            }
            len += 1;
        }
        match found {
            Some((EOS, _)) => return Err(HuffmanError::Eos),
            Some((sym, len)) => {
                if *n >= max {
                    return Err(HuffmanError::TooLong);
                }
                let Some(slot) = out.get_mut(*n) else {
                    return Err(HuffmanError::TooLong);
                };
                *slot = sym as u8;
                *n += 1;
                bits -= len;
                acc &= (1u64 << bits) - 1;
            }
            None => {
                // What is left is no whole code: it must be padding, at most 7 one bits.
                let ones = (1u64 << bits) - 1;
                if bits <= 7 && acc == ones && rest.is_empty() {
                    return Ok(());
                }
                return Err(HuffmanError::Padding);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn codes_match_those_printed_in_rfc_7541() {
        let printed: [(u16, u32, u8); 14] = [
            (0, 0x1ff8, 13),
            (1, 0x7fffd8, 23),
            (10, 0x3ffffffc, 30),
            (32, 0x14, 6),
            (48, 0x0, 5),
            (b'a'.into(), 0x3, 5),
            (b'z'.into(), 0x7b, 7),
            (92, 0x7fff0, 19),
            (127, 0xffffffc, 28),
            (128, 0xfffe6, 20),
            (203, 0x7ffffde, 27),
            (220, 0xffffffd, 28),
            (255, 0x3ffffee, 26),
            (256, 0x3fffffff, 30),
        ];
        for (sym, c, l) in printed {
            assert_eq!(code(sym), (c, l), "symbol {sym}");
        }
    }

    #[test]
    fn the_code_is_complete() {
        // Kraft: sum of 2^-len over all symbols is exactly 1 for a complete prefix code.
        let total: u64 = LENGTHS.iter().map(|&l| 1u64 << (30 - l)).sum();
        assert_eq!(total, 1 << 30);
    }

    #[test]
    fn every_byte_round_trips() {
        let input: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        let mut enc = BytesMut::new();
        encode(&input, &mut enc);
        assert_eq!(enc.len(), encoded_len(&input));
        let mut dec = BytesMut::new();
        decode(&enc, &mut dec, usize::MAX).unwrap();
        assert_eq!(&dec[..], &input[..]);
    }

    #[test]
    fn strings_round_trip_and_the_limit_is_exact() {
        // Header-like text (two symbols per table lookup) mixed with any byte (the slow path),
        // of every length up to 64: the table and the symbol-by-symbol walk must agree.
        let mut x: u32 = 0x2545_f491;
        for round in 0..4000usize {
            let input: Vec<u8> = (0..round % 65)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    let r = (x >> 16) as u8;
                    match x & 0x300 {
                        0 => r,
                        _ => b"0123456789abcdef-/"[usize::from(r) % 18],
                    }
                })
                .collect();
            let mut enc = BytesMut::new();
            encode(&input, &mut enc);
            let mut dec = BytesMut::new();
            decode(&enc, &mut dec, input.len()).unwrap();
            assert_eq!(&dec[..], &input[..], "round {round}");
            if let Some(shorter) = input.len().checked_sub(1) {
                assert_eq!(
                    decode(&enc, &mut BytesMut::new(), shorter),
                    Err(HuffmanError::TooLong),
                    "round {round}"
                );
            }
        }
    }

    #[test]
    fn bad_padding_and_eos_are_errors() {
        let mut out = BytesMut::new();
        // 'a' (00011) then 000 padding: not ones.
        assert_eq!(decode(&[0x18], &mut out, 100), Err(HuffmanError::Padding));
        // A whole byte of ones is more than 7 bits of padding.
        assert_eq!(
            decode(&[0x1f, 0xff], &mut out, 100),
            Err(HuffmanError::Padding)
        );
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff], &mut out, 100),
            Err(HuffmanError::Eos)
        );
        assert_eq!(
            decode(&[0x00, 0x00], &mut out, 2),
            Err(HuffmanError::TooLong)
        );
    }
}
