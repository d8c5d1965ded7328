//! Loopback throughput of the gRPC weight stream, for `medrl bench weight-sync`: one real server
//! and one real client on 127.0.0.1, timing full fetches including reassembly and the checksum.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use medrl_proto::client::AuthedChannel;
use medrl_proto::server::{GrpcServer, ServerOptions, bind};
use medrl_proto::v1::weights_client::WeightsClient;
use medrl_proto::{ClientOptions, connect};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::assemble::reusable_buffer;
use crate::client::{FetchOptions, fetch_weights_with};
use crate::error::{Result, WeightSyncError};
use crate::publisher::{PublisherOptions, WeightPublisher};

/// Bytes that do not compress and cost little to make (splitmix64), so the figure measures the
/// transport, not a generator or a lucky compression.
pub fn pseudo_random_blob(size: usize, seed: u64) -> Bytes {
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

/// One fetch's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FetchTiming {
    /// Seconds from asking for the version to holding the verified blob.
    pub seconds: f64,
    /// Throughput in GB/s (10^9 bytes per second).
    pub gb_per_s: f64,
    /// CPU seconds the process (server and client together) spent meanwhile, on all cores;
    /// `None` where the OS does not tell. Steadier than wall time on a shared machine, and what
    /// a machine with more cores can spread.
    pub cpu_s: Option<f64>,
}

/// What a loopback run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoopbackReport {
    /// Seconds to publish the blob (its digest, on all cores).
    pub publish_s: f64,
    /// The first fetch, into fresh memory (a worker's first update).
    pub cold: FetchTiming,
    /// A second fetch into the first blob's memory, as a worker's later updates do.
    pub warm: FetchTiming,
}

/// CPU seconds used so far by this process, all threads, from `/proc/self/stat` (Linux).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses; the fields after its last ')' do not.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of proc(5), 12 and 13 after the name, in clock ticks
    // (USER_HZ, 100 on every Linux ABI).
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Publishes `blob` on a loopback server with `chunk_bytes` chunks and fetches it twice with
/// one client: into fresh memory, then into the first fetch's memory.
pub async fn bench_loopback(blob: Bytes, chunk_bytes: usize) -> Result<LoopbackReport> {
    let span = tracing::info_span!("bench_loopback", size_bytes = blob.len(), chunk_bytes);
    run(blob, chunk_bytes).instrument(span).await
}

async fn timed_fetch(client: &WeightsClient<AuthedChannel>, buffer: BytesMut, size_bytes: usize) -> Result<(FetchTiming, Bytes)> {
    let options = FetchOptions { timeout: Duration::from_secs(600), ..FetchOptions::default() };
    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    let fetched = fetch_weights_with(client.clone(), 1, &options, buffer).await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_s = cpu_before.zip(process_cpu_seconds()).map(|(before, after)| after - before);
    if fetched.blob.len() != size_bytes {
        return Err(WeightSyncError::Truncated { version: fetched.version, received: fetched.blob.len() as u64, total: size_bytes as u64 });
    }
    // `fetch_weights_with` has logged the time and rate; the report carries the CPU time.
    let gb_per_s = size_bytes as f64 / seconds.max(1e-9) / 1e9;
    Ok((FetchTiming { seconds, gb_per_s, cpu_s }, fetched.blob))
}

async fn run(blob: Bytes, chunk_bytes: usize) -> Result<LoopbackReport> {
    let size_bytes = blob.len();
    if size_bytes == 0 {
        return Err(WeightSyncError::Config { field: "blob", problem: "must hold at least 1 byte".into() });
    }
    let publisher = WeightPublisher::new(PublisherOptions { chunk_bytes, ..PublisherOptions::default() })?;
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
    // A tiny first call opens the HTTP/2 connection, so the timings below are the transfers alone.
    let mut client = options.weights(channel);
    client.get_weight_info(medrl_proto::v1::GetWeightInfoRequest {}).await?;
    let (cold, blob) = timed_fetch(&client, BytesMut::new(), size_bytes).await?;
    let (warm, _) = timed_fetch(&client, reusable_buffer(blob), size_bytes).await?;

    let _ = stop.send(());
    match serving.await {
        Ok(result) => result?,
        Err(e) => return Err(WeightSyncError::Config { field: "server", problem: format!("server task failed: {e}") }),
    }
    Ok(LoopbackReport { publish_s, cold, warm })
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

    #[test]
    fn cpu_time_grows_with_work() {
        let cpu_seconds = process_cpu_seconds();
        if !cfg!(target_os = "linux") {
            return;
        }
        let before = cpu_seconds.expect("Linux has /proc/self/stat");
        let mut x = 0u64;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(150) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let used = process_cpu_seconds().expect("readable twice") - before;
        assert!((0.05..10.0).contains(&used), "150 ms of spinning counted as {used} s");
    }
}
