//! Images by content address: fetched from the coordinator, verified against their sha256, and
//! kept in a byte-bounded cache so re-leased prompts and later epochs do not fetch them again.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use medrl_proto::v1::ImageRef;
use medrl_weight_sync::sha256_hex;

use crate::error::PromptError;
use crate::session::Session;

/// Verified image files by sha256, evicted oldest-first beyond a byte budget.
#[derive(Debug)]
pub struct ImageCache {
    entries: HashMap<String, Bytes>,
    order: VecDeque<String>,
    bytes: usize,
    budget: usize,
}

impl ImageCache {
    /// An empty cache holding at most `budget` bytes.
    pub fn new(budget: usize) -> Self {
        ImageCache { entries: HashMap::new(), order: VecDeque::new(), bytes: 0, budget }
    }

    /// The cached file, if any.
    pub fn get(&self, sha256: &str) -> Option<Bytes> {
        self.entries.get(sha256).cloned()
    }

    /// Keeps a verified file; one larger than the whole budget is not kept.
    pub fn insert(&mut self, sha256: &str, data: Bytes) {
        if data.len() > self.budget || self.entries.contains_key(sha256) {
            return;
        }
        while self.bytes + data.len() > self.budget {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(evicted) = self.entries.remove(&old) {
                self.bytes -= evicted.len();
            }
        }
        self.bytes += data.len();
        self.order.push_back(sha256.to_string());
        self.entries.insert(sha256.to_string(), data);
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Files held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Checks a leased reference before fetching: a content address, and a size we accept.
pub fn check_ref(image: &ImageRef, max_bytes: u64) -> Result<(), PromptError> {
    let bad = |problem: String| PromptError::ImageRef { sha256: image.sha256.clone(), problem };
    if !medrl_proto::is_sha256_hex(&image.sha256) {
        return Err(bad("field `sha256`: expected 64 lowercase hex digits".into()));
    }
    if image.size_bytes > max_bytes {
        return Err(bad(format!("field `size_bytes`: {} bytes, more than the {max_bytes} this worker accepts", image.size_bytes)));
    }
    Ok(())
}

/// Checks served bytes against their address and the size limit.
pub fn verify(sha256: &str, data: &[u8], max_bytes: u64) -> Result<(), PromptError> {
    if data.len() as u64 > max_bytes {
        return Err(PromptError::ImageRef { sha256: sha256.to_string(), problem: format!("served {} bytes, more than {max_bytes}", data.len()) });
    }
    let actual = sha256_hex(data);
    if actual != sha256 {
        return Err(PromptError::ImageHash { sha256: sha256.to_string(), actual });
    }
    Ok(())
}

/// The files of `images`, from the cache or the coordinator, each verified.
pub async fn fetch_images(session: &Session, cache: &mut ImageCache, images: &[ImageRef], max_bytes: u64) -> Result<Vec<Bytes>, PromptError> {
    let mut out = Vec::with_capacity(images.len());
    for image in images {
        check_ref(image, max_bytes)?;
        if let Some(hit) = cache.get(&image.sha256) {
            out.push(hit);
            continue;
        }
        let data = session.image(image).await.map_err(|status| PromptError::ImageFetch {
            sha256: image.sha256.clone(),
            code: status.code(),
            message: status.message().to_string(),
        })?;
        verify(&image.sha256, &data, max_bytes)?;
        cache.insert(&image.sha256, data.clone());
        out.push(data);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_evicts_oldest_beyond_budget() {
        let mut cache = ImageCache::new(10);
        cache.insert("a", Bytes::from_static(b"1234"));
        cache.insert("b", Bytes::from_static(b"5678"));
        cache.insert("c", Bytes::from_static(b"90"));
        assert_eq!((cache.len(), cache.bytes()), (3, 10));
        cache.insert("d", Bytes::from_static(b"xyz"));
        assert!(cache.get("a").is_none(), "oldest evicted");
        assert_eq!(cache.get("d").as_deref(), Some(&b"xyz"[..]));
        cache.insert("huge", Bytes::from(vec![0u8; 11]));
        assert!(cache.get("huge").is_none());
        assert!(cache.bytes() <= 10);
    }

    #[test]
    fn refs_and_bytes_are_verified() {
        let data = b"image bytes";
        let sha = sha256_hex(data);
        verify(&sha, data, 100).expect("matches");
        assert!(matches!(verify(&sha, b"other bytes", 100), Err(PromptError::ImageHash { .. })));
        assert!(matches!(verify(&sha, data, 3), Err(PromptError::ImageRef { .. })));
        let good = ImageRef { sha256: sha.clone(), size_bytes: 11, name: "x.png".into() };
        check_ref(&good, 100).expect("good ref");
        assert!(check_ref(&ImageRef { sha256: "../../etc/passwd".into(), ..good.clone() }, 100).is_err());
        assert!(check_ref(&ImageRef { size_bytes: 101, ..good }, 100).is_err());
    }
}
