//! The hasher for the small maps looked up on every request: the destination allowlist and the
//! pool's entries. The standard hasher (SipHash-1-3) is built to resist chosen-key flooding and
//! costs about twice as much per lookup for a `host:port`; rustc-hash's FxHasher (the one rustc
//! uses for its own tables) is a few instructions per 8 bytes.
//!
//! Only for maps whose size pushrelay bounds itself: the allowlist is what the admin wrote, and
//! pool entries are allowed destinations times at most `max_token_identities` identities. A client
//! that chose colliding keys could lengthen a probe to that bound, no further.

use std::collections::{HashMap, HashSet};

pub type FastBuild = rustc_hash::FxBuildHasher;
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
