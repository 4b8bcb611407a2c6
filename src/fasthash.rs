//! A fast hasher for the small maps looked up on every request: the destination allowlist and the
//! pool's entries. The standard hasher (SipHash-1-3) is built to resist chosen-key flooding and
//! cost about 500 instructions for a `host:port`; this one costs a few per 8 bytes.
//!
//! Only for maps whose size pushrelay bounds itself: the allowlist is what the admin wrote, and
//! pool entries are allowed destinations times at most `max_token_identities` identities. A client
//! that chose colliding keys could lengthen a probe to that bound, no further.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Multiply-rotate hashing, a word at a time (the scheme rustc uses for its own tables).
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

const SEED: u64 = 0x517c_c1b7_2722_0a95;

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let (words, rest) = bytes.as_chunks::<8>();
        for word in words {
            self.add(u64::from_le_bytes(*word));
        }
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            // The length keeps "ab" and "ab\0" apart.
            self.add(u64::from_le_bytes(last) ^ ((rest.len() as u64) << 56));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

pub type FastBuild = BuildHasherDefault<FastHasher>;
pub type FastMap<K, V> = HashMap<K, V, FastBuild>;
pub type FastSet<K> = HashSet<K, FastBuild>;

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasher, Hash};

    use super::*;

    fn hash<T: Hash + ?Sized>(v: &T) -> u64 {
        FastBuild::default().hash_one(v)
    }

    #[test]
    fn different_texts_hash_apart_and_equal_ones_alike() {
        let texts = [
            "",
            "a",
            "ab",
            "ab\0",
            "api.push.apple.com:443",
            "api.push.apple.com:2197",
            "api.sandbox.push.apple.com:443",
            "fcm.googleapis.com:443",
        ];
        let hashes: HashSet<u64> = texts.iter().map(|t| hash(*t)).collect();
        assert_eq!(hashes.len(), texts.len());
        assert_eq!(
            hash("api.push.apple.com:443"),
            hash(&String::from("api.push.apple.com:443"))
        );
    }

    #[test]
    fn a_map_with_it_finds_what_it_holds() {
        let mut map: FastMap<String, usize> = FastMap::default();
        for i in 0..1000 {
            map.insert(format!("host{i}.example:443"), i);
        }
        assert!((0..1000).all(|i| map[&format!("host{i}.example:443")] == i));
        assert!(!map.contains_key("host1000.example:443"));
    }
}
