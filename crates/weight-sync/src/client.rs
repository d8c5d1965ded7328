//! The receiving side of the gRPC weight stream: asks for a version, reassembles and verifies it,
//! all under one deadline.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use medrl_proto::client::AuthedChannel;
use medrl_proto::v1::FetchWeightsRequest;
use medrl_proto::v1::weights_client::WeightsClient;
use medrl_proto::{ClientOptions, with_deadline};
use tonic::transport::Channel;
use tracing::Instrument;

use crate::assemble::{Assembler, FetchedWeights};
use crate::error::{Result, WeightSyncError};

/// Settings of one fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Deadline of the whole fetch: waiting for the version, every chunk, and the checksum.
    pub timeout: Duration,
    /// Largest blob accepted (default 64 GiB, above a 7B model in f32); a server declaring more
    /// is refused before anything is allocated.
    pub max_total_bytes: u64,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions { timeout: Duration::from_secs(600), max_total_bytes: 64 << 30 }
    }
}

/// Fetches the newest weights of version `>= min_version` over `channel` (no auth token) and
/// returns the version and the verified blob.
pub async fn fetch_weights(channel: Channel, min_version: u64, timeout: Duration) -> Result<(u64, Bytes)> {
    let client = ClientOptions::default().weights(channel);
    let fetched = fetch_weights_with(client, min_version, &FetchOptions { timeout, ..FetchOptions::default() }, BytesMut::new()).await?;
    Ok((fetched.version, fetched.blob))
}

/// Fetches with an already configured client (auth, message limits) and explicit options, into
/// `buffer` (empty, or an earlier blob's memory from [`crate::reusable_buffer`]).
pub async fn fetch_weights_with(
    mut client: WeightsClient<AuthedChannel>,
    min_version: u64,
    options: &FetchOptions,
    buffer: BytesMut,
) -> Result<FetchedWeights> {
    let span = tracing::info_span!("fetch_weights", min_version);
    let started = Instant::now();
    let transfer = async move {
        // The deadline also travels to the server, which then stops waiting for the version.
        let request = with_deadline(FetchWeightsRequest { min_version }, options.timeout);
        let mut stream = client.fetch_weights(request).await?.into_inner();
        let mut assembler = Assembler::new(min_version, options.max_total_bytes, buffer);
        // A stream error mid-way (server gone, deadline) is an error: the partial blob is dropped.
        while let Some(chunk) = stream.message().await? {
            assembler.push(chunk)?;
        }
        assembler.finish()
    };
    let fetched = match tokio::time::timeout(options.timeout, transfer.instrument(span.clone())).await {
        Ok(result) => result?,
        Err(_) => return Err(WeightSyncError::Timeout(options.timeout)),
    };
    let secs = started.elapsed().as_secs_f64();
    span.in_scope(|| {
        tracing::info!(
            version = fetched.version,
            bytes = fetched.blob.len(),
            seconds = secs,
            gb_per_s = fetched.blob.len() as f64 / secs.max(1e-9) / 1e9,
            "weights fetched and verified"
        )
    });
    Ok(fetched)
}
