//! Images of rollout groups, fetched by content address from the coordinator (the learner needs no
//! shared filesystem), verified against their sha256, and kept in a byte-bounded cache.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use medrl_proto::v1::ImageRef;

use crate::service::cache::ByteLru;
use crate::service::coordinator::CoordinatorRpc;
use crate::service::error::{ServiceError, ServiceResult};
use crate::service::metrics::LearnerMetrics;

/// Fetches and caches encoded images.
pub struct ImageStore {
    rpc: CoordinatorRpc,
    cache: Mutex<ByteLru>,
    max_image_bytes: u64,
}

impl ImageStore {
    /// A store fetching through `rpc`, caching up to `cache_bytes`.
    pub fn new(rpc: CoordinatorRpc, cache_bytes: u64, max_image_bytes: u64) -> ImageStore {
        ImageStore { rpc, cache: Mutex::new(ByteLru::new(cache_bytes)), max_image_bytes }
    }

    fn cached(&self, sha256: &str) -> Option<Bytes> {
        self.cache.lock().ok().and_then(|mut c| c.get(sha256))
    }

    /// The bytes of `image`, from the cache or the coordinator; counts fetches in `metrics`.
    pub async fn get(&self, image: &ImageRef, metrics: Option<&LearnerMetrics>) -> ServiceResult<Bytes> {
        if let Some(bytes) = self.cached(&image.sha256) {
            return Ok(bytes);
        }
        let bad = |problem: String| ServiceError::Image { sha256: image.sha256.clone(), problem };
        let response = self.rpc.get_image(image).await?;
        if let Some(m) = metrics {
            m.image_fetches.inc();
        }
        if response.data.len() as u64 > self.max_image_bytes {
            return Err(bad(format!("{} bytes, at most {} accepted", response.data.len(), self.max_image_bytes)));
        }
        // The address is the content: bytes that hash differently are not this image.
        let actual = medrl_weight_sync::sha256_hex(&response.data);
        if actual != image.sha256 {
            return Err(bad(format!("the coordinator sent bytes hashing to {actual}")));
        }
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(&image.sha256, response.data.clone());
        }
        Ok(response.data)
    }

    /// Fetches `images` in the background (errors are logged; the step fetches again).
    pub fn prefetch(self: &Arc<Self>, images: Vec<ImageRef>) {
        let missing: Vec<ImageRef> = images.into_iter().filter(|i| self.cached(&i.sha256).is_none()).collect();
        if missing.is_empty() {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            for image in missing {
                if let Err(e) = store.get(&image, None).await {
                    tracing::warn!(image = %image.name, error = %e, "image prefetch failed; the step will try again");
                }
            }
        });
    }
}
