//! The serving side of the gRPC weight stream: the learner publishes each new version's blob here,
//! and `medrl.v1.Weights` hands the newest version to whoever asks, in ordered chunks that all
//! carry the version, size and checksum of the whole blob.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use medrl_proto::v1::weights_server::Weights;
use medrl_proto::v1::{FetchWeightsRequest, GetWeightInfoRequest, WeightChunk, WeightInfo};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::assemble::reusable_buffer;
use crate::codec::FORMAT;
use crate::digest::blob_digest;
use crate::error::{Result, WeightSyncError};

/// Largest chunk allowed: the default gRPC message limit (64 MiB) less room for the other fields.
pub const MAX_CHUNK_BYTES: usize = medrl_proto::server::DEFAULT_MAX_MESSAGE_BYTES - 64 * 1024;

/// Settings of a [`WeightPublisher`].
#[derive(Debug, Clone)]
pub struct PublisherOptions {
    /// Payload bytes per chunk (default 4 MiB: well under the message limit, few enough chunks
    /// that per-message overhead does not matter).
    pub chunk_bytes: usize,
    /// Longest a FetchWeights call waits for a version that is not there yet (default 10 min);
    /// the client's own deadline cuts it shorter.
    pub max_wait: Duration,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions { chunk_bytes: 4 << 20, max_wait: Duration::from_secs(600) }
    }
}

impl PublisherOptions {
    /// Checks the chunk size against the message limit.
    pub fn validate(&self) -> Result<()> {
        if self.chunk_bytes == 0 || self.chunk_bytes > MAX_CHUNK_BYTES {
            return Err(WeightSyncError::Config {
                field: "chunk_bytes",
                problem: format!("{} is outside 1..={MAX_CHUNK_BYTES}", self.chunk_bytes),
            });
        }
        Ok(())
    }
}

/// One published version: its blob and the blob's checksum.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedWeights {
    /// Policy version.
    pub version: u64,
    /// Lowercase hex digest of `blob` ([`crate::digest`]).
    pub sha256: String,
    /// Blob format ([`FORMAT`]).
    pub format: String,
    /// The whole blob.
    pub blob: Bytes,
}

/// Holds the newest published weights and serves them as the `medrl.v1.Weights` service.
/// Cheap to clone: clones share the same state.
#[derive(Clone)]
pub struct WeightPublisher {
    // A watch channel gives an atomic swap (readers hold the Arc they took, so a stream in
    // progress keeps its version even when a newer one arrives) and a wake-up for waiters.
    current: Arc<watch::Sender<Option<Arc<PublishedWeights>>>>,
    /// The version the newest publication replaced, kept for [`WeightPublisher::spare_buffer`].
    retired: Arc<Mutex<Option<Arc<PublishedWeights>>>>,
    options: PublisherOptions,
}

impl std::fmt::Debug for WeightPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current();
        f.debug_struct("WeightPublisher")
            .field("version", &current.as_ref().map(|c| c.version))
            .field("bytes", &current.as_ref().map(|c| c.blob.len()))
            .field("options", &self.options)
            .finish()
    }
}

impl WeightPublisher {
    /// A publisher with nothing published yet.
    pub fn new(options: PublisherOptions) -> Result<Self> {
        options.validate()?;
        let (current, _) = watch::channel(None);
        Ok(WeightPublisher { current: Arc::new(current), retired: Arc::default(), options })
    }

    /// The settings in force.
    pub fn options(&self) -> &PublisherOptions {
        &self.options
    }

    /// Hashes `blob` and makes it the served version. Versions only move forward; publishing the
    /// current version again is a no-op when the bytes are equal and an error otherwise.
    pub fn publish(&self, version: u64, blob: Bytes) -> Result<Arc<PublishedWeights>> {
        let _span = tracing::info_span!("publish_weights", version, bytes = blob.len()).entered();
        // Hash outside the swap: it is the slow part and needs no lock.
        let sha256 = blob_digest(&blob);
        let new = Arc::new(PublishedWeights { version, sha256, format: FORMAT.to_string(), blob });
        let mut refused = None;
        let mut result = new.clone();
        let mut replaced = None;
        self.current.send_if_modified(|slot| match slot {
            Some(old) if old.version > version => {
                refused = Some(format!("older than the published version {}", old.version));
                false
            }
            Some(old) if old.version == version => {
                if old.sha256 != new.sha256 {
                    refused = Some(format!("already published with sha256 {}; a version's bytes never change", old.sha256));
                }
                result = old.clone();
                false
            }
            _ => {
                replaced = slot.replace(new.clone());
                true
            }
        });
        if let Some(old) = replaced {
            // A poisoned lock only loses the spare: the next encode allocates afresh.
            if let Ok(mut retired) = self.retired.lock() {
                *retired = Some(old);
            }
        }
        if let Some(problem) = refused {
            return Err(WeightSyncError::Publish { version, problem });
        }
        tracing::info!(version, sha256 = %result.sha256, bytes = result.blob.len(), "weights published");
        Ok(result)
    }

    /// The memory of the version the newest publication replaced, emptied, for the next blob to
    /// be written into; empty when a stream still reads that version (or there is none). The
    /// retired blob is thus kept until the next encode: the learner holds two blobs between
    /// steps, the peak an encode reaches anyway.
    pub fn spare_buffer(&self) -> BytesMut {
        let retired = self.retired.lock().ok().and_then(|mut r| r.take());
        match retired.map(Arc::try_unwrap) {
            Some(Ok(weights)) => reusable_buffer(weights.blob),
            _ => BytesMut::new(),
        }
    }

    /// The newest published weights, if any.
    pub fn current(&self) -> Option<Arc<PublishedWeights>> {
        self.current.borrow().clone()
    }

    /// Waits up to `wait` for a version `>= min_version`; `None` when none came in time.
    pub async fn wait_for(&self, min_version: u64, wait: Duration) -> Option<Arc<PublishedWeights>> {
        let mut rx = self.current.subscribe();
        let found = tokio::time::timeout(wait, rx.wait_for(|c| c.as_ref().is_some_and(|w| w.version >= min_version))).await;
        match found {
            Ok(Ok(slot)) => slot.clone(),
            // The sender lives in `self`, so the channel cannot close while we wait.
            Ok(Err(_)) | Err(_) => None,
        }
    }
}

/// Cuts a published blob into the stream's chunks; an empty blob still yields one chunk so the
/// receiver learns its header.
struct Chunks {
    weights: Arc<PublishedWeights>,
    chunk_bytes: usize,
    offset: usize,
    started: bool,
}

impl Iterator for Chunks {
    type Item = std::result::Result<WeightChunk, Status>;

    fn next(&mut self) -> Option<Self::Item> {
        let total = self.weights.blob.len();
        if self.started && self.offset >= total {
            return None;
        }
        self.started = true;
        let end = total.min(self.offset + self.chunk_bytes);
        let chunk = WeightChunk {
            version: self.weights.version,
            offset: self.offset as u64,
            // `Bytes::slice` shares the blob: no copy per chunk.
            data: self.weights.blob.slice(self.offset..end),
            total_size: total as u64,
            sha256: self.weights.sha256.clone(),
            format: self.weights.format.clone(),
        };
        self.offset = end;
        Some(Ok(chunk))
    }
}

/// The chunk stream type of FetchWeights.
pub type ChunkStream = Pin<Box<dyn Stream<Item = std::result::Result<WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Weights for WeightPublisher {
    type FetchWeightsStream = ChunkStream;

    async fn fetch_weights(&self, request: Request<FetchWeightsRequest>) -> std::result::Result<Response<ChunkStream>, Status> {
        let min_version = request.get_ref().min_version;
        let span = tracing::info_span!("fetch_weights", min_version);
        async move {
            let Some(weights) = self.wait_for(min_version, self.options.max_wait).await else {
                let newest = self.current().map(|c| c.version.to_string()).unwrap_or_else(|| "none".into());
                return Err(Status::deadline_exceeded(format!(
                    "version {min_version} was not published within {:?} (newest: {newest}); ask again",
                    self.options.max_wait
                )));
            };
            tracing::debug!(version = weights.version, bytes = weights.blob.len(), "streaming weights");
            let chunks = Chunks { weights, chunk_bytes: self.options.chunk_bytes, offset: 0, started: false };
            Ok(Response::new(Box::pin(tokio_stream::iter(chunks)) as ChunkStream))
        }
        .instrument(span)
        .await
    }

    async fn get_weight_info(&self, _request: Request<GetWeightInfoRequest>) -> std::result::Result<Response<WeightInfo>, Status> {
        match self.current() {
            Some(w) => Ok(Response::new(WeightInfo {
                version: w.version,
                total_size: w.blob.len() as u64,
                sha256: w.sha256.clone(),
                format: w.format.clone(),
            })),
            None => Err(Status::not_found("no weights have been published yet")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publisher(chunk_bytes: usize) -> WeightPublisher {
        WeightPublisher::new(PublisherOptions { chunk_bytes, max_wait: Duration::from_millis(50) }).expect("valid options")
    }

    #[test]
    fn versions_only_move_forward_and_never_change_bytes() -> Result<()> {
        let p = publisher(4);
        p.publish(1, Bytes::from_static(b"one"))?;
        let again = p.publish(1, Bytes::from_static(b"one"))?;
        assert_eq!(again.version, 1);
        assert!(p.publish(1, Bytes::from_static(b"uno")).is_err());
        assert!(p.publish(0, Bytes::from_static(b"zero")).is_err());
        p.publish(3, Bytes::from_static(b"three"))?;
        let current = p.current().expect("published");
        assert_eq!((current.version, current.sha256.as_str()), (3, blob_digest(b"three").as_str()));
        Ok(())
    }

    #[test]
    fn chunks_cover_the_blob_in_order() {
        let weights = Arc::new(PublishedWeights { version: 2, sha256: blob_digest(b"abcdefghij"), format: FORMAT.into(), blob: Bytes::from_static(b"abcdefghij") });
        let chunks: Vec<WeightChunk> = Chunks { weights: weights.clone(), chunk_bytes: 4, offset: 0, started: false }.map(|c| c.expect("ok")).collect();
        assert_eq!(chunks.iter().map(|c| c.offset).collect::<Vec<_>>(), vec![0, 4, 8]);
        assert_eq!(chunks.iter().map(|c| c.data.len()).collect::<Vec<_>>(), vec![4, 4, 2]);
        assert!(chunks.iter().all(|c| c.total_size == 10 && c.version == 2 && c.sha256 == weights.sha256));
        let empty = Arc::new(PublishedWeights { version: 0, sha256: blob_digest(b""), format: FORMAT.into(), blob: Bytes::new() });
        assert_eq!(Chunks { weights: empty, chunk_bytes: 4, offset: 0, started: false }.count(), 1);
        assert!(WeightPublisher::new(PublisherOptions { chunk_bytes: 0, ..Default::default() }).is_err());
    }

    #[test]
    fn the_replaced_version_lends_its_memory_once_no_stream_reads_it() -> Result<()> {
        let p = publisher(4);
        assert_eq!(p.spare_buffer().capacity(), 0, "nothing retired yet");
        let one = Bytes::from(vec![1u8; 1000]);
        let address = one.as_ptr();
        p.publish(1, one)?;
        p.publish(2, Bytes::from(vec![2u8; 1000]))?;
        let spare = p.spare_buffer();
        assert!(spare.is_empty() && spare.capacity() >= 1000 && spare.as_ptr() == address, "version 1's memory comes back");
        assert_eq!(p.spare_buffer().capacity(), 0, "lent once");
        // A version still being streamed (an Arc held elsewhere) is not lent.
        let streaming = p.current().expect("version 2");
        p.publish(3, Bytes::from(vec![3u8; 1000]))?;
        assert_eq!(p.spare_buffer().capacity(), 0);
        assert_eq!(streaming.blob.as_ref(), &[2u8; 1000][..], "the streamed bytes stay intact");
        Ok(())
    }

    #[tokio::test]
    async fn waiting_ends_when_the_version_arrives_or_the_wait_runs_out() -> Result<()> {
        let p = publisher(4);
        assert!(p.wait_for(1, Duration::from_millis(20)).await.is_none());
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait_for(2, Duration::from_secs(10)).await })
        };
        p.publish(1, Bytes::from_static(b"v1"))?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "version 1 must not satisfy min_version 2");
        p.publish(2, Bytes::from_static(b"v2"))?;
        let got = waiter.await.expect("task").expect("version 2 arrives");
        assert_eq!(got.version, 2);
        Ok(())
    }
}
