//! Shared test harness: a real coordinator over synthetic records, a tiny model directory, and a
//! fake learner serving `Learner` (records every submitted group, can fail the first N calls) and
//! `Weights` (serves published blobs, can corrupt a fetch) on loopback.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use candle_core::{DType, Device};
use medrl_coordinator::{CoordinatorConfig, CoordinatorHandle, PromptSet, serve};
use medrl_model::config::Config;
use medrl_model::model::Qwen25Vl;
use medrl_model::pipeline::Vlm;
use medrl_model::tiny::{TinySpec, create_tiny};
use medrl_model::weights::Weights;
use medrl_proto::client::AuthedChannel;
use medrl_proto::server::{GrpcServer, ServerOptions, bind};
use medrl_proto::v1::coordinator_client::CoordinatorClient;
use medrl_proto::v1::learner_server::Learner;
use medrl_proto::v1::weights_server::Weights as WeightsService;
use medrl_proto::v1::{
    EpochPrompts, FetchWeightsRequest, GetRunStateRequest, GetWeightInfoRequest, PublishVersionRequest, ReportConsumedRequest, RolloutGroup,
    RunState, SubmitGroupsResponse, WeightChunk, WeightInfo,
};
use medrl_proto::{ClientOptions, connect};
use medrl_rollout::{RolloutConfig, WorkerSettings, WorkerTuning};
use medrl_vqa::VqaRecord;
use medrl_vqa::synthetic::{SyntheticSpec, write_synthetic};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// Every test finishes within this time or fails.
pub const TEST_BOUND: Duration = Duration::from_secs(120);

/// Runs a test body under the time bound.
pub async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(TEST_BOUND, body).await.expect("test exceeded its time bound");
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
}

/// A tiny model directory, its config and a dataset of synthetic records with their images.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub model_dir: PathBuf,
    pub data_dir: PathBuf,
    pub config: Config,
    pub records: Vec<VqaRecord>,
}

/// Creates the tiny model and `n` synthetic records.
pub fn fixture(n: usize) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = dir.path().join("model");
    let config = create_tiny(&model_dir, &TinySpec::default()).expect("tiny model");
    let data_dir = dir.path().join("data");
    let records = write_synthetic(&SyntheticSpec { count: n, seed: 5, ..SyntheticSpec::default() }, &data_dir).expect("synthetic data");
    Fixture { dir, model_dir, data_dir, config, records }
}

impl Fixture {
    /// The prompt set of the fixture's records.
    pub fn prompts(&self) -> PromptSet {
        PromptSet::new(self.records.clone(), &self.data_dir).expect("prompt set")
    }

    /// The bytes of a record's image.
    pub fn image(&self, name: &str) -> Bytes {
        Bytes::from(std::fs::read(self.data_dir.join(name)).expect("image file"))
    }

    /// A model built from `weights` as the worker builds it, projections fused (the version-0
    /// processor and tokenizer).
    pub fn vlm_with(&self, weights: &Weights) -> Vlm {
        let mut model = Qwen25Vl::new(self.config.clone(), weights, DType::F32, &Device::Cpu).expect("model");
        model.fuse_projections().expect("fused");
        Vlm::from_parts(&self.model_dir, model).expect("vlm")
    }

    /// Weights of a made-up later version.
    pub fn random_weights(&self, seed: u64) -> Weights {
        Weights::random(&self.config, seed, DType::F32, &Device::Cpu).expect("weights")
    }

    /// The model directory's own weights as a published blob (what a worker starts with).
    pub fn base_blob(&self) -> Bytes {
        let weights = Weights::load(&self.model_dir, &self.config, DType::F32, &Device::Cpu).expect("weights");
        medrl_weight_sync::encode_weights(&weights, DType::F32).expect("encode")
    }
}

/// Coordinator settings for tests: loopback on port 0, fast sweeps and retries.
pub fn coordinator_config(prompts_per_lease: u32, prompts_per_step: u32) -> CoordinatorConfig {
    CoordinatorConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: None,
        lease_ttl_s: 20.0,
        lease_max_lifetime_s: 60.0,
        heartbeat_interval_s: 1.0,
        reaper_interval_s: 0.05,
        retry_after_ms: 20,
        prompts_per_lease,
        prompts_per_step,
        ..CoordinatorConfig::default()
    }
}

/// Starts a coordinator.
pub async fn start_coordinator(config: CoordinatorConfig, prompts: PromptSet) -> CoordinatorHandle {
    serve(config, prompts).await.expect("coordinator starts")
}

/// A connected Coordinator client, to act as the learner does.
pub async fn coordinator_client(handle: &CoordinatorHandle) -> CoordinatorClient<AuthedChannel> {
    let options = ClientOptions { request_timeout: Some(Duration::from_secs(10)), ..ClientOptions::default() };
    options.coordinator(connect(&handle.endpoint(), &options).await.expect("connect"))
}

/// The run state.
pub async fn run_state(client: &mut CoordinatorClient<AuthedChannel>) -> RunState {
    client.get_run_state(GetRunStateRequest {}).await.expect("run state").into_inner()
}

/// Reports a learner step that trained `prompts` of epoch 0.
pub async fn report_trained(client: &mut CoordinatorClient<AuthedChannel>, prompts: Vec<String>, new_version: u64) {
    client
        .report_consumed(ReportConsumedRequest { new_version, trained: vec![EpochPrompts { epoch: 0, prompt_ids: prompts }], requeue: vec![] })
        .await
        .expect("report consumed");
}

/// Tells the coordinator a version is live.
pub async fn publish_version(client: &mut CoordinatorClient<AuthedChannel>, version: u64, blob: &[u8]) {
    client
        .publish_version(PublishVersionRequest { version, sha256: medrl_weight_sync::blob_digest(blob), format: "safetensors".into() })
        .await
        .expect("publish");
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// Worker settings for tests: small groups and short completions, fast retries.
pub fn worker_settings(fx: &Fixture, coordinator: &str, learner: &str, prompts_per_lease: u32) -> WorkerSettings {
    let mut s = WorkerSettings::new("test-worker", coordinator, learner, &fx.model_dir);
    s.rollout = RolloutConfig { group_size: 4, max_new_tokens: 6, prompts_per_lease, seed: 11, ..RolloutConfig::default() };
    s.tuning = WorkerTuning {
        call_timeout: Duration::from_secs(5),
        weight_fetch_timeout: Duration::from_secs(5),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        stall_after: Duration::from_secs(2),
        drain_timeout: Duration::from_secs(2),
        ..WorkerTuning::default()
    };
    s
}

/// One SubmitGroups call as the fake learner saw it.
#[derive(Debug, Clone)]
pub struct Submission {
    pub group: RolloutGroup,
    /// False when the fake failed the call on purpose.
    pub answered: bool,
    /// "accepted" or "duplicate" when answered.
    pub outcome: &'static str,
}

/// State of the fake learner, shared with the test.
#[derive(Default)]
pub struct LearnerState {
    pub submissions: Mutex<Vec<Submission>>,
    seen_groups: Mutex<HashSet<String>>,
    seen_prompts: Mutex<HashSet<(u32, String)>>,
    /// Fail this many upcoming SubmitGroups calls with UNAVAILABLE.
    pub fail_next_submits: AtomicU32,
    /// Published blobs by version.
    pub blobs: Mutex<BTreeMap<u64, Bytes>>,
    /// Flip a byte in this many upcoming weight transfers (the declared checksum stays right).
    pub corrupt_next_fetches: AtomicU32,
    /// FetchWeights calls answered, by version served.
    pub fetches: Mutex<Vec<u64>>,
    /// FetchWeights calls received (answered or not).
    pub fetch_calls: AtomicU32,
    /// Hold a FetchWeights call for a version not published yet until it is (as the real
    /// learner does, for up to a minute here) instead of answering UNAVAILABLE.
    pub hold_missing_versions: AtomicBool,
}

impl LearnerState {
    /// Groups answered as accepted, in arrival order.
    pub fn accepted(&self) -> Vec<RolloutGroup> {
        self.submissions.lock().expect("lock").iter().filter(|s| s.answered && s.outcome == "accepted").map(|s| s.group.clone()).collect()
    }

    /// Every submission, answered or failed.
    pub fn all(&self) -> Vec<Submission> {
        self.submissions.lock().expect("lock").clone()
    }

    /// Makes a blob fetchable.
    pub fn publish_blob(&self, version: u64, blob: Bytes) {
        self.blobs.lock().expect("lock").insert(version, blob);
    }
}

/// The fake learner's gRPC face.
#[derive(Clone)]
pub struct FakeLearner(pub Arc<LearnerState>);

#[tonic::async_trait]
impl Learner for FakeLearner {
    async fn submit_groups(&self, request: Request<Streaming<RolloutGroup>>) -> Result<Response<SubmitGroupsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut groups = Vec::new();
        while let Some(group) = stream.message().await? {
            groups.push(group);
        }
        let fail = self.0.fail_next_submits.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        let mut reply = SubmitGroupsResponse::default();
        for group in groups {
            let outcome = if fail {
                "failed"
            } else {
                let new_group = self.0.seen_groups.lock().expect("lock").insert(group.group_id.clone());
                let new_prompt = self.0.seen_prompts.lock().expect("lock").insert((group.epoch, group.prompt_id.clone()));
                if new_group && new_prompt {
                    reply.accepted += 1;
                    "accepted"
                } else {
                    reply.duplicate += 1;
                    "duplicate"
                }
            };
            self.0.submissions.lock().expect("lock").push(Submission { group, answered: !fail, outcome });
        }
        if fail {
            return Err(Status::unavailable("fake learner: failing on purpose"));
        }
        Ok(Response::new(reply))
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl WeightsService for FakeLearner {
    type FetchWeightsStream = ChunkStream;

    async fn fetch_weights(&self, request: Request<FetchWeightsRequest>) -> Result<Response<ChunkStream>, Status> {
        let min = request.get_ref().min_version;
        self.0.fetch_calls.fetch_add(1, Ordering::SeqCst);
        let newest = || self.0.blobs.lock().expect("lock").iter().next_back().map(|(v, b)| (*v, b.clone())).filter(|(v, _)| *v >= min);
        let held_until = tokio::time::Instant::now() + Duration::from_secs(60);
        while newest().is_none() && self.0.hold_missing_versions.load(Ordering::SeqCst) && tokio::time::Instant::now() < held_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let Some((version, blob)) = newest() else {
            return Err(Status::unavailable(format!("fake learner: no version >= {min}")));
        };
        self.0.fetches.lock().expect("lock").push(version);
        let sha256 = medrl_weight_sync::blob_digest(&blob);
        let corrupt = self.0.corrupt_next_fetches.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        let chunk_bytes = 64 * 1024;
        let mut chunks = Vec::new();
        for (i, start) in (0..blob.len()).step_by(chunk_bytes).enumerate() {
            let end = blob.len().min(start + chunk_bytes);
            let mut data = blob.slice(start..end);
            if corrupt && i == 0 {
                let mut bad = data.to_vec();
                bad[0] ^= 0xff;
                data = Bytes::from(bad);
            }
            chunks.push(Ok(WeightChunk {
                version,
                offset: start as u64,
                data,
                total_size: blob.len() as u64,
                sha256: sha256.clone(),
                format: "safetensors".into(),
            }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn get_weight_info(&self, _request: Request<GetWeightInfoRequest>) -> Result<Response<WeightInfo>, Status> {
        let newest = self.0.blobs.lock().expect("lock").iter().next_back().map(|(v, b)| (*v, b.clone()));
        let (version, blob) = newest.ok_or_else(|| Status::not_found("nothing published"))?;
        Ok(Response::new(WeightInfo { version, total_size: blob.len() as u64, sha256: medrl_weight_sync::blob_digest(&blob), format: "safetensors".into() }))
    }
}

/// A running fake learner.
pub struct LearnerHandle {
    pub state: Arc<LearnerState>,
    pub endpoint: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Serves a fake learner on a loopback port.
pub async fn start_learner() -> LearnerHandle {
    let state = Arc::new(LearnerState::default());
    let (listener, addr) = bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
    let server = GrpcServer::new(&ServerOptions::default()).expect("server").with_learner(FakeLearner(state.clone())).with_weights(FakeLearner(state.clone()));
    let (stop, mut rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        server
            .serve(listener, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .expect("learner serves");
    });
    LearnerHandle { state, endpoint: format!("http://{addr}"), stop, task }
}

impl LearnerHandle {
    /// Stops serving.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Polls `check` every 10 ms until it holds.
pub async fn wait_until(mut check: impl FnMut() -> bool) {
    while !check() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The data directory's image names for a record.
pub fn image_names(record: &VqaRecord) -> Vec<String> {
    record.images.clone()
}

/// Writes a file and returns its path (for corrupt-input tests).
pub fn overwrite(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write");
}
