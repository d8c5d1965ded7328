//! A least-recently-used map of byte buffers bounded by their total size: the learner's image
//! cache, so a prompt's image is fetched from the coordinator once, not at every epoch.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

/// Entries keyed by string, evicted oldest-use first once `limit` bytes are exceeded.
#[derive(Debug)]
pub struct ByteLru {
    limit: u64,
    used: u64,
    tick: u64,
    entries: HashMap<String, (Bytes, u64)>,
    // Use order: tick -> key. Ticks are unique, so this is an exact recency list.
    order: BTreeMap<u64, String>,
}

impl ByteLru {
    /// An empty cache holding at most `limit` bytes.
    pub fn new(limit: u64) -> ByteLru {
        ByteLru { limit, used: 0, tick: 0, entries: HashMap::new(), order: BTreeMap::new() }
    }

    fn touch(&mut self, key: &str) -> Option<Bytes> {
        self.tick += 1;
        let tick = self.tick;
        let (bytes, last) = self.entries.get_mut(key)?;
        self.order.remove(last);
        *last = tick;
        self.order.insert(tick, key.to_string());
        Some(bytes.clone())
    }

    /// The bytes under `key`, marking them recently used.
    pub fn get(&mut self, key: &str) -> Option<Bytes> {
        self.touch(key)
    }

    /// Stores `bytes` under `key`; a value larger than the whole cache is not stored.
    pub fn insert(&mut self, key: &str, bytes: Bytes) {
        if self.touch(key).is_some() {
            return;
        }
        let size = bytes.len() as u64;
        if size > self.limit {
            return;
        }
        while self.used + size > self.limit {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            if let Some((evicted, _)) = self.entries.remove(&oldest) {
                self.used -= evicted.len() as u64;
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, key.to_string());
        self.entries.insert(key.to_string(), (bytes, self.tick));
        self.used += size;
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_entries_go_first() {
        let mut c = ByteLru::new(10);
        c.insert("a", Bytes::from_static(b"aaaa"));
        c.insert("b", Bytes::from_static(b"bbbb"));
        assert!(c.get("a").is_some(), "a is now the most recent");
        c.insert("c", Bytes::from_static(b"cccc"));
        assert!(c.get("b").is_none(), "b was the least recently used");
        assert!(c.get("a").is_some() && c.get("c").is_some());
        assert_eq!(c.used(), 8);
        c.insert("huge", Bytes::from(vec![0u8; 11]));
        assert!(c.get("huge").is_none(), "larger than the cache");
        assert_eq!(c.used(), 8);
    }
}
