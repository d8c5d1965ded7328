//! The learner role against the real coordinator, over real gRPC on 127.0.0.1:0, with the tiny
//! model and synthetic records; the test itself plays the rollout worker (leases prompts, builds
//! groups of two completions, submits them, acks). Every test is bounded in time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device};
use medrl_coordinator::{CoordinatorConfig, CoordinatorHandle, PromptSet, serve};
use medrl_learner::config::{AlgorithmConfig, AlgorithmName, LearnerConfig};
use medrl_learner::service::{CONSUMED_LOG, FINAL_MODEL, LearnerHandle, LearnerSettings, METRICS_JSONL, Phase, resume_or_new, serve_learner};
use medrl_model::pipeline::Vlm;
use medrl_model::tiny::{TinySpec, create_tiny};
use medrl_proto::client::AuthedChannel;
use medrl_proto::v1::coordinator_client::CoordinatorClient;
use medrl_proto::v1::{
    AckLeaseRequest, Completion, DeliveredPrompt, GetImageRequest, GetRunStateRequest, Lease, LeasePromptsRequest, RegisterWorkerRequest,
    RolloutGroup, RunState, SubmitGroupsResponse,
};
use medrl_proto::{ClientOptions, connect};
use medrl_vqa::synthetic::{SyntheticSpec, write_synthetic};
use medrl_vqa::{PromptTemplate, VqaRecord};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Every test finishes within this time or fails.
const BOUND: Duration = Duration::from_secs(240);

/// A run directory, a tiny model and a coordinator over `prompts` synthetic records.
struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    run_dir: PathBuf,
    coordinator: CoordinatorHandle,
}

async fn fixture(prompts: usize, prompts_per_step: u32) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("tiny");
    create_tiny(&model, &TinySpec::default()).expect("tiny model");
    let data = dir.path().join("data");
    let records = write_synthetic(&SyntheticSpec { count: prompts, seed: 5, ..SyntheticSpec::default() }, &data).expect("synthetic data");
    let config = CoordinatorConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: None,
        prompts_per_step,
        prompts_per_lease: 1,
        max_staleness: 0,
        epochs: 1,
        lease_ttl_s: 60.0,
        lease_max_lifetime_s: 120.0,
        heartbeat_interval_s: 30.0,
        reaper_interval_s: 0.05,
        retry_after_ms: 20,
        ..CoordinatorConfig::default()
    };
    let coordinator = serve(config, PromptSet::new(records, &data).expect("prompt set")).await.expect("coordinator starts");
    Fixture { model, run_dir: dir.path().join("run"), _dir: dir, coordinator }
}

fn configs() -> (AlgorithmConfig, LearnerConfig) {
    let algorithm = AlgorithmConfig { name: AlgorithmName::Grpo, ..AlgorithmConfig::default() };
    let mut learner = LearnerConfig { micro_batch_sequences: 4, total_steps: 10, ..LearnerConfig::default() };
    // Large enough that one step visibly changes the weights.
    learner.optimizer.lr = 1e-3;
    (algorithm, learner)
}

fn settings(f: &Fixture, prompts_per_step: usize) -> LearnerSettings {
    LearnerSettings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
        coordinator: f.coordinator.endpoint(),
        run_dir: f.run_dir.clone(),
        base_model: f.model.clone(),
        prompts_per_step,
        max_staleness: 0,
        save_every: 1,
        // Small chunks, so weights really travel as many messages.
        weight_chunk_bytes: 64 * 1024,
        poll_interval_ms: 20,
        rpc_timeout_s: 10.0,
        coordinator_retry_s: 10.0,
        ..LearnerSettings::default()
    }
}

async fn start_learner(f: &Fixture, prompts_per_step: usize) -> (LearnerHandle, Option<PathBuf>) {
    let (algorithm, learner) = configs();
    let (trainer, resumed) = resume_or_new(&f.run_dir, &f.model, algorithm, learner, DType::F32, &Device::Cpu).expect("trainer");
    (serve_learner(settings(f, prompts_per_step), trainer).await.expect("learner starts"), resumed)
}

/// The rollout worker the test plays.
struct Worker {
    coordinator: CoordinatorClient<AuthedChannel>,
    id: String,
    vlm: Vlm,
}

fn options() -> ClientOptions {
    ClientOptions { request_timeout: Some(Duration::from_secs(20)), ..ClientOptions::default() }
}

impl Worker {
    async fn new(f: &Fixture) -> Worker {
        let options = options();
        let mut coordinator = options.coordinator(connect(&f.coordinator.endpoint(), &options).await.expect("connect"));
        let id = coordinator
            .register_worker(RegisterWorkerRequest { worker_name: "test-worker".into(), capabilities: None })
            .await
            .expect("register")
            .into_inner()
            .worker_id;
        let vlm = Vlm::load(&f.model, DType::F32, &Device::Cpu).expect("worker model");
        Worker { coordinator, id, vlm }
    }

    async fn lease(&mut self, version: u64) -> Lease {
        let answer = self
            .coordinator
            .lease_prompts(LeasePromptsRequest { worker_id: self.id.clone(), max_prompts: 1, policy_version: version })
            .await
            .expect("lease call")
            .into_inner();
        answer.lease.filter(|l| !l.prompts.is_empty()).expect("a lease with a prompt")
    }

    /// A group of two completions (one right, one wrong) for the lease's prompt.
    async fn group(&mut self, lease: &Lease, version: u64) -> RolloutGroup {
        let p = &lease.prompts[0];
        let record: VqaRecord = serde_json::from_str(&p.record_json).expect("record");
        let mut images = Vec::new();
        for image in &p.images {
            let data = self.coordinator.get_image(GetImageRequest::from(image)).await.expect("image").into_inner().data;
            images.push(self.vlm.images.process_bytes(&data, &image.name).expect("processed image"));
        }
        let prompt = PromptTemplate::R1v.build(&record.question, &record.options);
        let encoded = self.vlm.user_prompt(prompt.system.as_deref(), images, &prompt.user).expect("prompt");
        let label = record.answer_label.clone().unwrap_or_else(|| "A".into());
        let completions = [format!("<think>it looks like that</think><answer>{label}</answer><|im_end|>"), "<think>a guess</think><answer>Z</answer><|im_end|>".to_string()]
            .iter()
            .map(|text| {
                let token_ids = self.vlm.prompts.encode_completion(text).expect("tokens");
                Completion { logprobs: vec![-1.0; token_ids.len()], token_ids, text: text.clone(), ..Default::default() }
            })
            .collect();
        RolloutGroup {
            group_id: medrl_proto::group_id(lease.epoch, &p.prompt_id, p.attempt),
            prompt_id: p.prompt_id.clone(),
            epoch: lease.epoch,
            lease_id: lease.lease_id.clone(),
            worker_id: self.id.clone(),
            policy_version: version,
            prompt_token_ids: encoded.ids,
            completions,
            attempt: p.attempt,
            record_json: p.record_json.clone(),
            images: p.images.clone(),
        }
    }

    async fn ack(&mut self, lease: &Lease) {
        let delivered = lease.prompts.iter().map(|p| DeliveredPrompt { prompt_id: p.prompt_id.clone(), pass_rate: Some(0.5) }).collect();
        self.coordinator
            .ack_lease(AckLeaseRequest { lease_id: lease.lease_id.clone(), worker_id: self.id.clone(), delivered })
            .await
            .expect("ack");
    }

    async fn state(&mut self) -> RunState {
        self.coordinator.get_run_state(GetRunStateRequest {}).await.expect("run state").into_inner()
    }
}

async fn submit(learner: &LearnerHandle, groups: Vec<RolloutGroup>) -> SubmitGroupsResponse {
    let options = options();
    let mut client = options.learner(connect(&learner.endpoint(), &options).await.expect("connect learner"));
    client.submit_groups(tokio_stream::iter(groups)).await.expect("submit").into_inner()
}

/// Polls `check` every 20 ms until it holds (the test's bound stops a hang).
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !check() {
        assert!(started.elapsed() < BOUND, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn health(learner: &LearnerHandle) -> i32 {
    let channel = connect(&learner.endpoint(), &options()).await.expect("connect");
    HealthClient::new(channel).check(HealthCheckRequest { service: "medrl.v1.Learner".into() }).await.expect("health").into_inner().status
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).expect("read").lines().map(|l| serde_json::from_str(l).expect("json line")).collect()
}

async fn fetch(learner: &LearnerHandle, min_version: u64) -> (u64, bytes::Bytes) {
    let channel = connect(&learner.endpoint(), &ClientOptions { request_timeout: None, ..ClientOptions::default() }).await.expect("connect");
    medrl_weight_sync::fetch_weights(channel, min_version, Duration::from_secs(30)).await.expect("fetch weights")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learner_counts_trains_publishes_and_finishes() {
    tokio::time::timeout(BOUND, async {
        let f = fixture(4, 2).await;
        let (learner, resumed) = start_learner(&f, 2).await;
        assert!(resumed.is_none());
        assert_eq!(health(&learner).await, ServingStatus::Serving as i32);
        let mut worker = Worker::new(&f).await;

        // Version 0 is published at start and fetchable with its checksum.
        let (v0, blob0) = fetch(&learner, 0).await;
        assert_eq!(v0, 0);
        assert_eq!(worker.state().await.published_sha256, medrl_weight_sync::blob_digest(&blob0));
        let config = medrl_model::config::Config::load(&f.model).expect("config");
        medrl_weight_sync::decode_weights(&blob0, &config, DType::F32, &Device::Cpu).expect("v0 decodes");

        // Two good groups, two duplicates (same id; same prompt under another attempt), one invalid.
        let (l1, l2) = (worker.lease(0).await, worker.lease(0).await);
        let (g1, g2) = (worker.group(&l1, 0).await, worker.group(&l2, 0).await);
        let mut same_prompt = g1.clone();
        same_prompt.attempt += 1;
        same_prompt.group_id = medrl_proto::group_id(same_prompt.epoch, &same_prompt.prompt_id, same_prompt.attempt);
        let mut invalid = g2.clone();
        invalid.group_id = "0/99/not-a-prompt".into();
        invalid.prompt_id = "not-a-prompt".into();
        invalid.attempt = 99;
        invalid.completions[0].token_ids[0] = u32::MAX;
        let answer = submit(&learner, vec![g1.clone(), g2.clone(), g1.clone(), same_prompt, invalid]).await;
        assert_eq!((answer.accepted, answer.duplicate, answer.stale, answer.invalid), (2, 2, 0, 1), "{answer:?}");
        assert_eq!(answer.rejected_group_ids, vec!["0/99/not-a-prompt".to_string()]);
        worker.ack(&l1).await;
        worker.ack(&l2).await;

        // One step: version 1 is published, fetchable, announced, and its prompts count as trained.
        let (v1, blob1) = fetch(&learner, 1).await;
        assert_eq!(v1, 1);
        assert_ne!(blob1, blob0, "the step must change the weights");
        until("step 1 is complete", || learner.state().is_ok_and(|s| s.last_step.is_some())).await;
        let state = worker.state().await;
        assert_eq!(state.epoch_counts[0].trained, 2);
        assert_eq!((state.published_version, state.published_sha256.clone()), (1, medrl_weight_sync::blob_digest(&blob1)));
        let status = learner.state().expect("state");
        assert_eq!((status.version, status.steps, status.buffered, status.consumed), (1, 1, 0, 2));
        let step = status.last_step.expect("a step summary");
        assert_eq!((step.groups, step.version), (2, 1));
        assert!(step.tokens > 0 && step.loss.is_finite() && step.weight_bytes == blob1.len());
        assert_eq!((step.mean_staleness, step.max_staleness), (0.0, 0), "groups sampled with version 0 trained at version 0");
        assert!(f.run_dir.join("checkpoints/step-000001/trainer.json").exists(), "save_every 1 checkpoints step 1");

        // A group sampled with version 0 is stale now; a retry of a trained group is a duplicate.
        let (l3, l4) = (worker.lease(1).await, worker.lease(1).await);
        let old = worker.group(&l3, 0).await;
        let answer = submit(&learner, vec![old.clone(), g1.clone()]).await;
        assert_eq!((answer.accepted, answer.duplicate, answer.stale), (0, 1, 1), "{answer:?}");
        assert_eq!(answer.rejected_group_ids, vec![old.group_id.clone()]);
        let (g3, g4) = (worker.group(&l3, 1).await, worker.group(&l4, 1).await);
        let answer = submit(&learner, vec![g3, g4]).await;
        assert_eq!(answer.accepted, 2, "{answer:?}");
        worker.ack(&l3).await;
        worker.ack(&l4).await;

        // Step 2 trains the last prompts; the run is done and the learner finishes.
        let outcome = learner.wait_done().await.expect("finished");
        assert!(outcome.finished);
        assert_eq!((outcome.version, outcome.steps), (2, 2));
        let final_dir = f.run_dir.join(FINAL_MODEL);
        assert_eq!(outcome.final_model.as_deref(), Some(final_dir.as_path()));
        assert!(final_dir.join("config.json").exists() && final_dir.join("model.safetensors").exists() && final_dir.join("tokenizer.json").exists());
        let state = worker.state().await;
        assert!(state.done && state.published_version == 2);
        assert_eq!(state.epoch_counts[0].trained, 4);
        let steps = lines(&f.run_dir.join(METRICS_JSONL));
        assert_eq!(steps.iter().map(|l| l["version"].as_u64().unwrap_or(0)).collect::<Vec<_>>(), vec![1, 2]);
        assert!(steps.iter().all(|l| l["mean_reward"].is_number() && l["step_seconds"].is_number()));
        assert!(steps.iter().all(|l| l["mean_staleness"].as_f64() == Some(0.0) && l["max_staleness"].as_u64() == Some(0)), "on-policy steps: {steps:?}");
        let consumed = lines(&f.run_dir.join(CONSUMED_LOG));
        assert_eq!(consumed.len(), 2);

        let metrics = learner.metrics_text().expect("metrics");
        for name in ["medrl_learner_step_seconds", "medrl_learner_tokens_per_step", "medrl_learner_weight_publish_bytes", "medrl_learner_group_staleness_versions"] {
            assert!(metrics.contains(name), "{name} missing from\n{metrics}");
        }
        assert!(metrics.contains(r#"medrl_learner_groups_total{outcome="accepted"} 4"#), "{metrics}");
        let scraped = scrape(learner.metrics_addr().expect("metrics on")).await;
        assert!(scraped.contains("medrl_learner_policy_version 2"), "{scraped}");
        // The health watchdog looks every 500 ms.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(health(&learner).await, ServingStatus::NotServing as i32);
        assert_eq!(learner.state().expect("state").phase, Phase::Done);
        learner.shutdown().await.expect("clean shutdown");
        f.coordinator.shutdown().await.expect("coordinator stops");
    })
    .await
    .expect("test exceeded its time bound");
}

/// `GET /metrics` over plain HTTP/1.1.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect metrics");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.expect("request");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("response");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_learner_never_trains_a_group_twice() {
    tokio::time::timeout(BOUND, async {
        // Three prompts in steps of two: the second learner finishes with a partial step of one.
        let f = fixture(3, 2).await;
        let mut worker = Worker::new(&f).await;

        // First learner: one step on two prompts, checkpointed.
        let (learner, _) = start_learner(&f, 2).await;
        let (l1, l2) = (worker.lease(0).await, worker.lease(0).await);
        let (g1, g2) = (worker.group(&l1, 0).await, worker.group(&l2, 0).await);
        assert_eq!(submit(&learner, vec![g1.clone(), g2.clone()]).await.accepted, 2);
        worker.ack(&l1).await;
        worker.ack(&l2).await;
        until("step 1 is complete", || learner.state().is_ok_and(|s| s.last_step.is_some())).await;
        assert_eq!(worker.state().await.epoch_counts[0].trained, 2);
        let trainer = learner.shutdown().await.expect("first learner stops");
        assert_eq!(trainer.step, 1);
        drop(trainer);

        // Second learner resumes from the checkpoint and refuses the trained groups, whether they
        // come back under the same id or as a new attempt at the same prompt.
        let (learner, resumed) = start_learner(&f, 2).await;
        assert_eq!(resumed, Some(f.run_dir.join("checkpoints/step-000001")));
        assert_eq!(learner.state().expect("state").version, 1);
        let mut retry = g2.clone();
        retry.attempt += 7;
        retry.group_id = medrl_proto::group_id(retry.epoch, &retry.prompt_id, retry.attempt);
        retry.policy_version = 1;
        let answer = submit(&learner, vec![g1.clone(), retry]).await;
        assert_eq!((answer.accepted, answer.duplicate), (0, 2), "{answer:?}");
        let status = learner.state().expect("state");
        assert_eq!((status.version, status.steps, status.buffered, status.consumed), (1, 0, 0, 2));

        // The last prompt goes through the new learner, as a partial step once nothing else can come.
        let l3 = worker.lease(1).await;
        let g3 = worker.group(&l3, 1).await;
        assert_eq!(submit(&learner, vec![g3]).await.accepted, 1);
        worker.ack(&l3).await;
        let outcome = learner.wait_done().await.expect("finished");
        assert_eq!((outcome.version, outcome.steps, outcome.finished), (2, 1, true));
        assert_eq!(learner.state().expect("state").last_step.map(|s| s.groups), Some(1));

        // Every prompt of the epoch was trained exactly once, by the log and by the coordinator.
        let mut trained: Vec<String> = lines(&f.run_dir.join(CONSUMED_LOG))
            .iter()
            .filter(|l| l["kind"] == "step")
            .flat_map(|l| l["groups"].as_array().cloned().unwrap_or_default())
            .map(|g| g["prompt_id"].as_str().unwrap_or_default().to_string())
            .collect();
        trained.sort();
        let before = trained.len();
        trained.dedup();
        assert_eq!((before, trained.len()), (3, 3), "{trained:?}");
        let state = worker.state().await;
        assert!(state.done);
        assert_eq!(state.epoch_counts[0].trained, 3);
        learner.shutdown().await.expect("second learner stops");
        f.coordinator.shutdown().await.expect("coordinator stops");
    })
    .await
    .expect("test exceeded its time bound");
}
