//! Loopback throughput of the gRPC weight stream, for `medrl bench weight-sync`: one real server
//! and one real client on 127.0.0.1, timing a full fetch including reassembly and the checksum.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use medrl_proto::server::{GrpcServer, ServerOptions, bind};
use medrl_proto::{ClientOptions, connect};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::client::{FetchOptions, fetch_weights_with};
use crate::error::{Result, WeightSyncError};
use crate::publisher::{PublisherOptions, WeightPublisher};

/// Bytes that do not compress and cost little to make (splitmix64), so the figure measures the
/// transport, not a generator or a lucky compression.
fn pseudo_random_blob(size: usize, seed: u64) -> Bytes {
    let mut state = seed;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(size);
    Bytes::from(out)
}

/// What one loopback transfer measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoopbackReport {
    /// Seconds to publish the blob (its digest, on all cores).
    pub publish_s: f64,
    /// Seconds from asking for the version to holding the verified blob.
    pub fetch_s: f64,
    /// Fetch throughput in GB/s (10^9 bytes per second).
    pub gb_per_s: f64,
}

/// Publishes a `size_bytes` blob on a loopback server with `chunk_bytes` chunks and fetches it
/// once with a fresh client.
pub async fn bench_loopback(size_bytes: usize, chunk_bytes: usize) -> Result<LoopbackReport> {
    let span = tracing::info_span!("bench_loopback", size_bytes, chunk_bytes);
    run(size_bytes, chunk_bytes).instrument(span).await
}

async fn run(size_bytes: usize, chunk_bytes: usize) -> Result<LoopbackReport> {
    if size_bytes == 0 {
        return Err(WeightSyncError::Config { field: "size_bytes", problem: "must be at least 1".into() });
    }
    let publisher = WeightPublisher::new(PublisherOptions { chunk_bytes, ..PublisherOptions::default() })?;
    let blob = pseudo_random_blob(size_bytes, 7);
    let started = Instant::now();
    publisher.publish(1, blob)?;
    let publish_s = started.elapsed().as_secs_f64();
    let (listener, addr) = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let server = GrpcServer::new(&ServerOptions::default())?.with_weights(publisher);
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));

    let options = ClientOptions { request_timeout: None, ..ClientOptions::default() };
    let channel = connect(&format!("http://{addr}"), &options).await?;
    let fetch = FetchOptions { timeout: Duration::from_secs(600), ..FetchOptions::default() };
    // A tiny first call opens the HTTP/2 connection, so the timing below is the transfer alone.
    let mut client = options.weights(channel);
    client.get_weight_info(medrl_proto::v1::GetWeightInfoRequest {}).await?;
    let started = Instant::now();
    let fetched = fetch_weights_with(client, 1, &fetch).await?;
    let secs = started.elapsed().as_secs_f64();

    let _ = stop.send(());
    match serving.await {
        Ok(result) => result?,
        Err(e) => return Err(WeightSyncError::Config { field: "server", problem: format!("server task failed: {e}") }),
    }
    if fetched.blob.len() != size_bytes {
        return Err(WeightSyncError::Truncated { version: fetched.version, received: fetched.blob.len() as u64, total: size_bytes as u64 });
    }
    let gb_per_s = size_bytes as f64 / secs.max(1e-9) / 1e9;
    tracing::info!(publish_s, seconds = secs, gb_per_s, "loopback weight transfer");
    Ok(LoopbackReport { publish_s, fetch_s: secs, gb_per_s })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_deterministic_and_of_the_asked_size() {
        assert_eq!(pseudo_random_blob(13, 1).len(), 13);
        assert_eq!(pseudo_random_blob(100, 1), pseudo_random_blob(100, 1));
        assert_ne!(pseudo_random_blob(100, 1), pseudo_random_blob(100, 2));
    }
}
