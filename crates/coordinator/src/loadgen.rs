//! A load generator for the coordinator: simulated rollout workers that skip the model (lease,
//! pretend the group reached the learner, ack) and a simulated learner that trains whatever is
//! delivered (ReportConsumed, PublishVersion), all over real gRPC. Used by the load test
//! (`tests/load.rs`) and by `medrl bench coordinator`.
//!
//! Every loop is bounded by a deadline and a call budget, so a stuck coordinator makes the
//! generator return (with `done == false`) instead of hanging.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use medrl_proto::client::AuthedChannel;
use medrl_proto::v1::coordinator_client::CoordinatorClient;
use medrl_proto::v1::{
    AckLeaseRequest, DeliveredPrompt, EpochPrompts, GetRunStateRequest, HeartbeatRequest, LeasePromptsRequest, PublishVersionRequest,
    RegisterWorkerRequest, ReportConsumedRequest, RunState, WorkerCapabilities,
};
use medrl_proto::{ProtoError, connect};
/// Re-exported so callers (the bench command) need no direct dependency on medrl-proto.
pub use medrl_proto::ClientOptions;
use medrl_vqa::VqaRecord;
use serde::Serialize;
use tonic::Status;

use crate::error::CoordinatorError;
use crate::prompts::PromptSet;

/// What to generate.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Simulated workers, each with its own connection.
    pub workers: usize,
    /// Stop after this long even if the run is not finished.
    pub duration: Duration,
    /// Prompts each worker asks for per lease.
    pub prompts_per_lease: u32,
    /// The simulated learner trains a step once it holds this many delivered prompts (or when
    /// nothing else can arrive).
    pub prompts_per_step: usize,
    /// Most calls one worker makes, next to the deadline, so no loop is unbounded.
    pub max_calls_per_worker: u64,
    /// Pause of an idle worker between polls when the coordinator suggests none.
    pub min_retry: Duration,
}

impl Default for LoadSpec {
    fn default() -> Self {
        LoadSpec {
            workers: 64,
            duration: Duration::from_secs(10),
            prompts_per_lease: 1,
            prompts_per_step: 64,
            max_calls_per_worker: 1_000_000,
            min_retry: Duration::from_millis(5),
        }
    }
}

/// Latency percentiles of one kind of call, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Calls measured.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest call.
    pub max_ms: f64,
}

impl Latency {
    /// Percentiles (nearest rank) of `samples`.
    pub fn of(mut samples: Vec<Duration>) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            // Nearest rank: the smallest sample with at least q of the samples at or below it.
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1].as_secs_f64() * 1000.0
        };
        Latency { count: samples.len(), p50_ms: at(0.50), p90_ms: at(0.90), p99_ms: at(0.99), max_ms: at(1.0) }
    }
}

/// What happened during a load run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Simulated workers.
    pub workers: usize,
    /// Wall time from the first registration to the last worker stopping.
    pub elapsed_s: f64,
    /// LeasePrompts calls made.
    pub lease_calls: u64,
    /// Calls that granted a non-empty lease.
    pub leases: u64,
    /// Prompts in those leases.
    pub prompts_leased: u64,
    /// Non-empty leases per second of `elapsed_s`.
    pub leases_per_s: f64,
    /// Latency of every LeasePrompts call, granted or empty.
    pub lease_latency: Latency,
    /// Latency of the calls that granted a lease.
    pub granted_latency: Latency,
    /// Prompts newly marked delivered by acks.
    pub acked_delivered: u64,
    /// Prompts acked that were already delivered or trained.
    pub acked_duplicate: u64,
    /// Prompts the acks sent back to the queue.
    pub acked_requeued: u64,
    /// Steps the simulated learner reported.
    pub steps: u64,
    /// Prompts the coordinator newly marked trained.
    pub trained: u64,
    /// Prompts the coordinator reported as already trained.
    pub trained_duplicate: u64,
    /// Calls that failed with an error status (the run goes on; the count should be 0).
    pub errors: u64,
    /// The first few error messages.
    pub first_errors: Vec<String>,
    /// Whether the coordinator reported the run finished before the deadline.
    pub done: bool,
    /// (epoch, prompt id) -> how many times a worker handed it to the learner.
    #[serde(skip)]
    pub delivered_to_learner: HashMap<(u32, String), u32>,
    /// The coordinator's run state at the end.
    #[serde(skip)]
    pub final_state: Option<RunState>,
}

/// Writes `n` two-option records sharing a few small image files into `dir` and returns the set
/// (the coordinator hashes each distinct image once, as with a real dataset's repeated scans).
pub fn synthetic_prompts(dir: &Path, n: usize) -> Result<PromptSet, CoordinatorError> {
    const DISTINCT_IMAGES: usize = 8;
    let images = dir.join("img");
    std::fs::create_dir_all(&images).map_err(|e| CoordinatorError::Prompts(format!("creating {}: {e}", images.display())))?;
    for i in 0..DISTINCT_IMAGES.min(n) {
        let path = images.join(format!("{i}.png"));
        std::fs::write(&path, format!("placeholder image {i}")).map_err(|e| CoordinatorError::Prompts(format!("writing {}: {e}", path.display())))?;
    }
    let records = (0..n)
        .map(|i| VqaRecord {
            id: format!("load/{i}"),
            dataset: "load".into(),
            modality: ["ct", "mri", "xray"][i % 3].into(),
            images: vec![format!("img/{}.png", i % DISTINCT_IMAGES)],
            question: format!("Load question {i}?"),
            options: vec!["yes".into(), "no".into()],
            answer_label: Some("A".into()),
            answer: "yes".into(),
        })
        .collect();
    PromptSet::new(records, dir)
}

/// Counters shared by the simulated processes.
#[derive(Default)]
struct Tally {
    lease_calls: u64,
    leases: u64,
    prompts_leased: u64,
    acked_delivered: u64,
    acked_duplicate: u64,
    acked_requeued: u64,
    lease_latency: Vec<Duration>,
    granted_latency: Vec<Duration>,
    errors: u64,
    first_errors: Vec<String>,
}

impl Tally {
    fn error(&mut self, what: &str, status: &Status) {
        self.errors += 1;
        if self.first_errors.len() < 5 {
            self.first_errors.push(format!("{what}: {:?}: {}", status.code(), status.message()));
        }
    }
}

/// What the workers hand to the learner: (epoch, prompt id).
type Inbox = Arc<Mutex<Vec<(u32, String)>>>;

/// Locks a mutex of plain counters; a poisoned one (a panicked task) still holds usable counts.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

type Client = CoordinatorClient<AuthedChannel>;

async fn client(endpoint: &str, options: &ClientOptions) -> Result<Client, ProtoError> {
    Ok(options.coordinator(connect(endpoint, options).await?))
}

/// One simulated worker: register, then lease / deliver / ack until done, the deadline or the
/// call budget.
async fn worker(mut c: Client, name: String, spec: LoadSpec, deadline: Instant, inbox: Inbox, tally: Arc<Mutex<Tally>>) {
    let capabilities = WorkerCapabilities { device: "simulated".into(), group_size: 8, max_prompts: spec.prompts_per_lease, weight_transports: vec![] };
    let id = match c.register_worker(RegisterWorkerRequest { worker_name: name, capabilities: Some(capabilities) }).await {
        Ok(r) => r.into_inner().worker_id,
        Err(status) => {
            lock(&tally).error("RegisterWorker", &status);
            return;
        }
    };
    let mut held = 0u64;
    let mut latencies = Vec::new();
    let mut granted = Vec::new();
    for _ in 0..spec.max_calls_per_worker {
        if Instant::now() >= deadline {
            break;
        }
        let started = Instant::now();
        let result = c.lease_prompts(LeasePromptsRequest { worker_id: id.clone(), max_prompts: spec.prompts_per_lease, policy_version: held }).await;
        let took = started.elapsed();
        latencies.push(took);
        let response = match result {
            Ok(r) => r.into_inner(),
            Err(status) => {
                lock(&tally).error("LeasePrompts", &status);
                tokio::time::sleep(spec.min_retry).await;
                continue;
            }
        };
        if response.done {
            break;
        }
        let Some(lease) = response.lease.filter(|l| !l.prompts.is_empty()) else {
            // Idle: a heartbeat tells which version is published (a real worker would fetch it).
            match c.heartbeat(HeartbeatRequest { worker_id: id.clone(), policy_version: held, lease_ids: vec![] }).await {
                Ok(hb) => held = hb.into_inner().policy_version,
                Err(status) => lock(&tally).error("Heartbeat", &status),
            }
            tokio::time::sleep(Duration::from_millis(response.retry_after_ms).max(spec.min_retry)).await;
            continue;
        };
        granted.push(took);
        held = lease.policy_version;
        {
            // The group "reaches the learner" before the ack, as with a real worker.
            let mut inbox = lock(&inbox);
            inbox.extend(lease.prompts.iter().map(|p| (lease.epoch, p.prompt_id.clone())));
        }
        let delivered = lease.prompts.iter().map(|p| DeliveredPrompt { prompt_id: p.prompt_id.clone(), pass_rate: Some(0.5) }).collect();
        let ack = c.ack_lease(AckLeaseRequest { lease_id: lease.lease_id.clone(), worker_id: id.clone(), delivered }).await;
        let mut t = lock(&tally);
        t.leases += 1;
        t.prompts_leased += lease.prompts.len() as u64;
        match ack {
            Ok(r) => {
                let r = r.into_inner();
                t.acked_delivered += u64::from(r.delivered);
                t.acked_duplicate += u64::from(r.duplicate);
                t.acked_requeued += u64::from(r.requeued);
            }
            Err(status) => t.error("AckLease", &status),
        }
    }
    let mut t = lock(&tally);
    t.lease_calls += latencies.len() as u64;
    t.lease_latency.extend(latencies);
    t.granted_latency.extend(granted);
}

/// What the simulated learner did.
#[derive(Default)]
struct LearnerTally {
    steps: u64,
    trained: u64,
    trained_duplicate: u64,
    received: HashMap<(u32, String), u32>,
    done: bool,
    final_state: Option<RunState>,
}

/// The simulated learner: trains a step from the inbox when it holds `prompts_per_step` prompts,
/// or fewer when nothing is pending or leased any more; never trains a prompt twice in an epoch
/// (its consumed log); publishes each new version at once.
async fn learner(mut c: Client, spec: LoadSpec, deadline: Instant, inbox: Inbox, tally: Arc<Mutex<Tally>>) -> LearnerTally {
    let mut out = LearnerTally::default();
    let mut version = 0u64;
    let mut trained: HashMap<(u32, String), u64> = HashMap::new();
    while Instant::now() < deadline {
        let state = match c.get_run_state(GetRunStateRequest {}).await {
            Ok(s) => s.into_inner(),
            Err(status) => {
                lock(&tally).error("GetRunState", &status);
                tokio::time::sleep(spec.min_retry).await;
                continue;
            }
        };
        if state.done {
            out.done = true;
            out.final_state = Some(state);
            return out;
        }
        let nothing_else = state.epoch_counts.iter().all(|e| e.pending == 0 && e.leased == 0);
        let batch: Vec<(u32, String)> = {
            let mut inbox = lock(&inbox);
            if inbox.len() >= spec.prompts_per_step || (nothing_else && !inbox.is_empty()) {
                inbox.drain(..).collect()
            } else {
                Vec::new()
            }
        };
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let mut by_epoch: HashMap<u32, Vec<String>> = HashMap::new();
        for (epoch, prompt) in batch {
            *out.received.entry((epoch, prompt.clone())).or_default() += 1;
            if trained.insert((epoch, prompt.clone()), version + 1).is_none() {
                by_epoch.entry(epoch).or_default().push(prompt);
            }
        }
        version += 1;
        let trained_now = by_epoch.into_iter().map(|(epoch, prompt_ids)| EpochPrompts { epoch, prompt_ids }).collect();
        match c.report_consumed(ReportConsumedRequest { new_version: version, trained: trained_now, requeue: vec![] }).await {
            Ok(r) => {
                let r = r.into_inner();
                out.steps += 1;
                out.trained += u64::from(r.trained);
                out.trained_duplicate += u64::from(r.duplicate);
            }
            Err(status) => lock(&tally).error("ReportConsumed", &status),
        }
        let publish = PublishVersionRequest { version, sha256: format!("{version:064x}"), format: "safetensors".into() };
        if let Err(status) = c.publish_version(publish).await {
            lock(&tally).error("PublishVersion", &status);
        }
    }
    // Deadline: record where the run got to.
    out.final_state = c.get_run_state(GetRunStateRequest {}).await.ok().map(tonic::Response::into_inner);
    out
}

/// Runs `spec.workers` simulated workers and one simulated learner against the coordinator at
/// `endpoint` until the run is done or `spec.duration` has passed.
pub async fn run_load(endpoint: &str, options: &ClientOptions, spec: &LoadSpec) -> Result<LoadReport, ProtoError> {
    let inbox: Inbox = Arc::default();
    let tally: Arc<Mutex<Tally>> = Arc::default();
    // Connect everyone first, so connection setup is not counted as lease latency.
    let mut clients = Vec::with_capacity(spec.workers);
    for _ in 0..spec.workers {
        clients.push(client(endpoint, options).await?);
    }
    let learner_client = client(endpoint, options).await?;
    let started = Instant::now();
    let deadline = started + spec.duration;
    let mut tasks = Vec::with_capacity(spec.workers);
    for (i, c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(worker(c, format!("sim-{i}"), spec.clone(), deadline, inbox.clone(), tally.clone())));
    }
    let learned = tokio::spawn(learner(learner_client, spec.clone(), deadline, inbox.clone(), tally.clone()));
    for task in tasks {
        if let Err(e) = task.await {
            let mut t = lock(&tally);
            t.errors += 1;
            t.first_errors.push(format!("worker task: {e}"));
        }
    }
    let learned = match learned.await {
        Ok(l) => l,
        Err(e) => {
            let mut t = lock(&tally);
            t.errors += 1;
            t.first_errors.push(format!("learner task: {e}"));
            LearnerTally::default()
        }
    };
    let elapsed_s = started.elapsed().as_secs_f64();
    let mut t = lock(&tally);
    Ok(LoadReport {
        workers: spec.workers,
        elapsed_s,
        lease_calls: t.lease_calls,
        leases: t.leases,
        prompts_leased: t.prompts_leased,
        leases_per_s: t.leases as f64 / elapsed_s.max(1e-9),
        lease_latency: Latency::of(std::mem::take(&mut t.lease_latency)),
        granted_latency: Latency::of(std::mem::take(&mut t.granted_latency)),
        acked_delivered: t.acked_delivered,
        acked_duplicate: t.acked_duplicate,
        acked_requeued: t.acked_requeued,
        steps: learned.steps,
        trained: learned.trained,
        trained_duplicate: learned.trained_duplicate,
        errors: t.errors,
        first_errors: t.first_errors.clone(),
        done: learned.done,
        delivered_to_learner: learned.received,
        final_state: learned.final_state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms = |v: u64| Duration::from_millis(v);
        let l = Latency::of((1..=100).map(ms).collect());
        assert_eq!((l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms), (100, 50.0, 90.0, 99.0, 100.0));
        let one = Latency::of(vec![ms(7)]);
        assert_eq!((one.p50_ms, one.p99_ms), (7.0, 7.0));
        assert_eq!(Latency::of(Vec::new()), Latency::default());
    }
}
