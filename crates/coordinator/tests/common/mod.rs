//! Helpers shared by the coordinator's gRPC tests: a generated prompt set with real image files,
//! fast test settings, a connected client, and a time bound on every test.

#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use medrl_coordinator::{CoordinatorConfig, CoordinatorHandle, PromptSet, serve};
use medrl_proto::client::AuthedChannel;
use medrl_proto::v1::coordinator_client::CoordinatorClient;
use medrl_proto::v1::{
    AckLeaseRequest, DeliveredPrompt, EpochPrompts, GetRunStateRequest, Lease, LeasePromptsRequest, PublishVersionRequest,
    RegisterWorkerRequest, ReportConsumedRequest, RunState,
};
use medrl_proto::{ClientOptions, connect};
use medrl_vqa::VqaRecord;

/// Every test finishes within this time or fails.
pub const TEST_BOUND: Duration = Duration::from_secs(60);

/// Runs a test body under the time bound.
pub async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(TEST_BOUND, body).await.expect("test exceeded its time bound");
}

/// `n` multiple-choice records with one image file each, alternating modalities.
pub fn prompt_set(dir: &Path, n: usize) -> PromptSet {
    std::fs::create_dir_all(dir.join("img")).expect("image dir");
    let records = (0..n)
        .map(|i| {
            let image = format!("img/{i}.png");
            std::fs::write(dir.join(&image), format!("image bytes of prompt {i}")).expect("write image");
            VqaRecord {
                id: format!("synthetic/train/{i}"),
                dataset: "synthetic".into(),
                modality: if i % 2 == 0 { "ct".into() } else { "mri".into() },
                images: vec![image],
                question: format!("Question {i}?"),
                options: vec!["yes".into(), "no".into()],
                answer_label: Some("A".into()),
                answer: "yes".into(),
            }
        })
        .collect();
    PromptSet::new(records, dir).expect("prompt set")
}

/// Loopback on port 0, short lease and heartbeat times, fast sweeps.
pub fn fast_config() -> CoordinatorConfig {
    CoordinatorConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
        lease_ttl_s: 5.0,
        lease_max_lifetime_s: 30.0,
        heartbeat_interval_s: 5.0,
        reaper_interval_s: 0.05,
        retry_after_ms: 20,
        ..CoordinatorConfig::default()
    }
}

/// Starts a coordinator.
pub async fn start(config: CoordinatorConfig, prompts: PromptSet) -> CoordinatorHandle {
    serve(config, prompts).await.expect("coordinator starts")
}

/// A connected Coordinator client with a 10 s deadline per call.
pub async fn client(handle: &CoordinatorHandle) -> CoordinatorClient<AuthedChannel> {
    let options = ClientOptions { request_timeout: Some(Duration::from_secs(10)), ..ClientOptions::default() };
    let channel = connect(&handle.endpoint(), &options).await.expect("connect");
    options.coordinator(channel)
}

/// Registers a worker and returns its id.
pub async fn register(client: &mut CoordinatorClient<AuthedChannel>, name: &str) -> String {
    client
        .register_worker(RegisterWorkerRequest { worker_name: name.into(), capabilities: None })
        .await
        .expect("register")
        .into_inner()
        .worker_id
}

/// Asks for a lease; `None` when the answer is empty.
pub async fn lease(client: &mut CoordinatorClient<AuthedChannel>, worker: &str, max: u32, version: u64) -> Option<Lease> {
    let response = client
        .lease_prompts(LeasePromptsRequest { worker_id: worker.into(), max_prompts: max, policy_version: version })
        .await
        .expect("lease call")
        .into_inner();
    response.lease.filter(|l| !l.prompts.is_empty())
}

/// The wait reason of an empty lease answer.
pub async fn wait_reason(client: &mut CoordinatorClient<AuthedChannel>, worker: &str, version: u64) -> (i32, bool) {
    let response = client
        .lease_prompts(LeasePromptsRequest { worker_id: worker.into(), max_prompts: 1, policy_version: version })
        .await
        .expect("lease call")
        .into_inner();
    assert!(response.lease.is_none_or(|l| l.prompts.is_empty()), "expected an empty lease");
    (response.wait_reason, response.done)
}

/// Acks a lease with every prompt delivered at the given pass rate.
pub async fn ack_all(client: &mut CoordinatorClient<AuthedChannel>, worker: &str, lease: &Lease, pass_rate: Option<f32>) -> u32 {
    let delivered = lease.prompts.iter().map(|p| DeliveredPrompt { prompt_id: p.prompt_id.clone(), pass_rate }).collect();
    client
        .ack_lease(AckLeaseRequest { lease_id: lease.lease_id.clone(), worker_id: worker.into(), delivered })
        .await
        .expect("ack")
        .into_inner()
        .delivered
}

/// Reports a learner step.
pub async fn train(client: &mut CoordinatorClient<AuthedChannel>, epoch: u32, prompts: Vec<String>, new_version: u64) -> u32 {
    client
        .report_consumed(ReportConsumedRequest {
            new_version,
            trained: vec![EpochPrompts { epoch, prompt_ids: prompts }],
            requeue: vec![],
        })
        .await
        .expect("report consumed")
        .into_inner()
        .trained
}

/// Publishes a version with a made-up checksum.
pub async fn publish(client: &mut CoordinatorClient<AuthedChannel>, version: u64) {
    client
        .publish_version(PublishVersionRequest { version, sha256: format!("{version:064x}"), format: "safetensors".into() })
        .await
        .expect("publish");
}

/// The run state.
pub async fn state(client: &mut CoordinatorClient<AuthedChannel>) -> RunState {
    client.get_run_state(GetRunStateRequest {}).await.expect("run state").into_inner()
}
