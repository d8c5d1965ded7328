//! The weight stream over real gRPC on 127.0.0.1:0: a chunked round trip of real model weights
//! with checksum, waiting for a newer version, and a corrupt or truncated stream (served by a
//! deliberately broken server) refused by the client.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use candle_core::{DType, Device};
use medrl_model::tiny::{TinySpec, create_tiny};
use medrl_model::weights::Weights;
use medrl_proto::server::{GrpcServer, ServerOptions, bind};
use medrl_proto::v1::weights_server::Weights as WeightsService;
use medrl_proto::v1::{FetchWeightsRequest, GetWeightInfoRequest, WeightChunk, WeightInfo};
use medrl_proto::{ClientOptions, connect};
use medrl_weight_sync::{
    FORMAT, FetchOptions, PublisherOptions, WeightPublisher, WeightSyncError, decode_weights, encode_weights, fetch_weights, fetch_weights_with,
    blob_digest,
};
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

const BOUND: Duration = Duration::from_secs(60);

/// A running server and the means to stop it.
struct Served {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), medrl_proto::ProtoError>>,
}

async fn serve<S: WeightsService>(service: S) -> Served {
    let (listener, addr) = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("bind");
    let server = GrpcServer::new(&ServerOptions::default()).expect("server").with_weights(service);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    Served { addr, stop, task }
}

impl Served {
    async fn channel(&self) -> Channel {
        let options = ClientOptions { request_timeout: None, ..ClientOptions::default() };
        connect(&format!("http://{}", self.addr), &options).await.expect("connect")
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("server task").expect("server ran");
    }
}

#[tokio::test]
async fn model_weights_round_trip_in_chunks_with_their_checksum() {
    tokio::time::timeout(BOUND, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = create_tiny(dir.path(), &TinySpec::default()).expect("tiny model");
        let weights = Weights::load(dir.path(), &config, DType::F32, &Device::Cpu).expect("weights");
        let blob = encode_weights(&weights, DType::BF16).expect("encode");
        // Small chunks so the blob really travels as many messages.
        let chunk_bytes = 64 * 1024;
        assert!(blob.len() > 10 * chunk_bytes, "blob of {} bytes is too small for this test", blob.len());
        let publisher = WeightPublisher::new(PublisherOptions { chunk_bytes, ..Default::default() }).expect("publisher");
        let published = publisher.publish(3, blob.clone()).expect("publish");
        let served = serve(publisher.clone()).await;

        let (version, got) = fetch_weights(served.channel().await, 2, Duration::from_secs(20)).await.expect("fetch");
        assert_eq!(version, 3);
        assert_eq!(got, blob);
        assert_eq!(blob_digest(&got), published.sha256);
        let back = decode_weights(&got, &config, DType::F32, &Device::Cpu).expect("decode");
        for (name, t) in weights.iter() {
            let want = t.to_dtype(DType::BF16).and_then(|t| t.to_dtype(DType::F32)).expect("round");
            let diff = (want - back.get(name).expect("present")).and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()).expect("diff");
            assert_eq!(diff, 0.0, "{name}");
        }

        let mut client = ClientOptions::default().weights(served.channel().await);
        let info = client.get_weight_info(GetWeightInfoRequest {}).await.expect("info").into_inner();
        assert_eq!(info, WeightInfo { version: 3, total_size: blob.len() as u64, sha256: published.sha256.clone(), format: FORMAT.into() });
        served.stop().await;
    })
    .await
    .expect("test exceeded its time bound");
}

#[tokio::test]
async fn a_fetch_waits_for_a_newer_version_and_times_out_when_none_comes() {
    tokio::time::timeout(BOUND, async {
        let publisher = WeightPublisher::new(PublisherOptions { chunk_bytes: 7, ..Default::default() }).expect("publisher");
        let served = serve(publisher.clone()).await;
        let mut info = ClientOptions::default().weights(served.channel().await);
        assert_eq!(info.get_weight_info(GetWeightInfoRequest {}).await.expect_err("nothing yet").code(), tonic::Code::NotFound);
        publisher.publish(1, Bytes::from_static(b"weights of version one")).expect("v1");

        let channel = served.channel().await;
        let waiter = tokio::spawn(async move { fetch_weights(channel, 2, Duration::from_secs(20)).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished(), "version 1 must not answer a request for version 2");
        publisher.publish(2, Bytes::from_static(b"weights of version two, a little longer")).expect("v2");
        let (version, blob) = waiter.await.expect("task").expect("fetch");
        assert_eq!((version, blob.as_ref()), (2, b"weights of version two, a little longer".as_ref()));

        // Nobody publishes version 9: the client's deadline ends the wait.
        let started = Instant::now();
        let err = fetch_weights(served.channel().await, 9, Duration::from_millis(300)).await.expect_err("no version 9");
        assert!(started.elapsed() < Duration::from_secs(5), "the deadline was not honoured: {:?}", started.elapsed());
        assert!(matches!(err, WeightSyncError::Timeout(_) | WeightSyncError::Status(_)), "{err}");
        served.stop().await;
    })
    .await
    .expect("test exceeded its time bound");
}

/// How the broken server damages the stream.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Stops after the first half of the chunks.
    Truncate,
    /// Flips a byte of the second chunk (the header still claims the original sha256).
    Corrupt,
    /// Skips the second chunk.
    Gap,
    /// Sends the first half, then fails the call.
    FailMidway,
}

/// A Weights server that sends a damaged version of a good stream.
struct Broken {
    blob: Bytes,
    damage: Damage,
}

#[tonic::async_trait]
impl WeightsService for Broken {
    type FetchWeightsStream = Pin<Box<dyn Stream<Item = Result<WeightChunk, Status>> + Send>>;

    async fn fetch_weights(&self, _request: Request<FetchWeightsRequest>) -> Result<Response<Self::FetchWeightsStream>, Status> {
        let sha256 = blob_digest(&self.blob);
        let total = self.blob.len();
        let mut chunks: Vec<Result<WeightChunk, Status>> = (0..total)
            .step_by(4)
            .map(|offset| {
                Ok(WeightChunk {
                    version: 5,
                    offset: offset as u64,
                    data: self.blob.slice(offset..total.min(offset + 4)),
                    total_size: total as u64,
                    sha256: sha256.clone(),
                    format: FORMAT.into(),
                })
            })
            .collect();
        let half = chunks.len() / 2;
        match self.damage {
            Damage::Truncate => chunks.truncate(half),
            Damage::Corrupt => {
                if let Some(Ok(c)) = chunks.get_mut(1) {
                    let mut data = c.data.to_vec();
                    data[0] ^= 0xff;
                    c.data = Bytes::from(data);
                }
            }
            Damage::Gap => {
                let _ = chunks.remove(1);
            }
            Damage::FailMidway => {
                chunks.truncate(half);
                chunks.push(Err(Status::internal("disk on fire")));
            }
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn get_weight_info(&self, _request: Request<GetWeightInfoRequest>) -> Result<Response<WeightInfo>, Status> {
        Err(Status::unimplemented("broken on purpose"))
    }
}

#[tokio::test]
async fn truncated_corrupt_gapped_and_failed_streams_are_refused() {
    tokio::time::timeout(BOUND, async {
        let blob = Bytes::from_static(b"a blob of thirty-two bytes long!");
        for damage in [Damage::Truncate, Damage::Corrupt, Damage::Gap, Damage::FailMidway] {
            let served = serve(Broken { blob: blob.clone(), damage }).await;
            let client = ClientOptions::default().weights(served.channel().await);
            let err = fetch_weights_with(client, 0, &FetchOptions { timeout: Duration::from_secs(10), ..Default::default() }, BytesMut::new())
                .await
                .expect_err("a damaged stream must be refused");
            let fits = match damage {
                Damage::Truncate => matches!(err, WeightSyncError::Truncated { received: 16, total: 32, .. }),
                Damage::Corrupt => matches!(err, WeightSyncError::Checksum { .. }),
                Damage::Gap => matches!(err, WeightSyncError::Stream { chunk: 1, .. }),
                Damage::FailMidway => matches!(&err, WeightSyncError::Status(s) if s.code() == tonic::Code::Internal),
            };
            assert!(fits, "{damage:?} gave an unexpected error: {err}");
            served.stop().await;
        }
    })
    .await
    .expect("test exceeded its time bound");
}

#[tokio::test]
async fn loopback_benchmark_reports_a_throughput() {
    tokio::time::timeout(BOUND, async {
        // 32 MiB keeps the test quick; `medrl bench weight-sync` measures the figure to report.
        let report = medrl_weight_sync::bench_loopback(medrl_weight_sync::pseudo_random_blob(32 << 20, 1), 4 << 20).await.expect("bench");
        for fetch in [report.cold, report.warm] {
            assert!(fetch.gb_per_s.is_finite() && fetch.gb_per_s > 0.0 && fetch.seconds > 0.0, "{report:?}");
        }
        assert!(report.publish_s > 0.0, "{report:?}");
    })
    .await
    .expect("test exceeded its time bound");
}
