//! Everything a worker needs to run: its peers, its model, the rollout section of the run config,
//! the task's prompt and reward settings, its own endpoints, and timing knobs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device};
use medrl_proto::{ClientAuth, TlsSettings};
use medrl_vqa::{PromptTemplate, RewardConfig};

use crate::config::RolloutConfig;
use crate::sample::GroupSettings;

/// Settings of one rollout worker.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Human-readable name (pod or host name), shown in the coordinator's logs.
    pub name: String,
    /// Coordinator endpoint URL, e.g. `http://127.0.0.1:50051`.
    pub coordinator: String,
    /// Learner endpoint URL serving the `Learner` and `Weights` services.
    pub learner: String,
    /// Hugging Face model directory with the initial (version 0) weights, tokenizer and processor.
    pub model_dir: PathBuf,
    /// Compute dtype of the model.
    pub dtype: DType,
    /// Device the model runs on.
    pub device: Device,
    /// Sampling settings (`rollout:` section).
    pub rollout: RolloutConfig,
    /// How a record becomes prompt text.
    pub template: PromptTemplate,
    /// System turn replacing the template's own, when set.
    pub system_prompt: Option<String>,
    /// Rule rewards and their weights.
    pub rewards: RewardConfig,
    /// gRPC health endpoint (`grpc.health.v1`), off when `None`.
    pub health_listen: Option<SocketAddr>,
    /// Prometheus `/metrics` endpoint, off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// Shared token sent to the coordinator and the learner.
    pub auth: ClientAuth,
    /// TLS toward the coordinator and the learner (weights included); `None` is plaintext.
    pub tls: Option<TlsSettings>,
    /// Deadlines, backoff and limits; the defaults suit real runs.
    pub tuning: WorkerTuning,
}

/// Timing and size knobs of a worker that are not part of the run config.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerTuning {
    /// Time allowed to open a connection to a peer (default 5 s).
    pub connect_timeout: Duration,
    /// Deadline of one coordinator call or one group submission (default 30 s).
    pub call_timeout: Duration,
    /// Deadline of one weight download, which may be gigabytes (default 10 min).
    pub weight_fetch_timeout: Duration,
    /// First retry delay after a failed call (default 200 ms); doubles per failure.
    pub backoff_initial: Duration,
    /// Longest retry delay (default 10 s).
    pub backoff_max: Duration,
    /// Weight fetch tries before sampling a group whose lease asks for a newer version than the
    /// one held (default 3); after that the group is sampled with the held weights and the
    /// learner judges its staleness.
    pub weight_tries_per_group: u32,
    /// Health turns NOT_SERVING after failing this long without a success (default 120 s).
    pub stall_after: Duration,
    /// Time allowed on exit to finish delivering sampled groups and acking leases (default 30 s).
    pub drain_timeout: Duration,
    /// Leases whose groups may still be in delivery before the worker stops leasing more
    /// (default 2): sampling overlaps delivery, and memory stays bounded if the learner is down.
    pub max_pending_leases: usize,
    /// Bytes of verified image files kept by content address (default 256 MiB).
    pub image_cache_bytes: usize,
    /// Largest image file fetched (default 64 MiB less 4 KiB, what fits one gRPC message).
    pub max_image_bytes: u64,
    /// Largest gRPC message, both ways (default 64 MiB).
    pub max_message_bytes: usize,
}

impl Default for WorkerTuning {
    fn default() -> Self {
        let max_message_bytes = medrl_proto::server::DEFAULT_MAX_MESSAGE_BYTES;
        WorkerTuning {
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(30),
            weight_fetch_timeout: Duration::from_secs(600),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            weight_tries_per_group: 3,
            stall_after: Duration::from_secs(120),
            drain_timeout: Duration::from_secs(30),
            max_pending_leases: 2,
            image_cache_bytes: 256 * 1024 * 1024,
            max_image_bytes: (max_message_bytes - 4096) as u64,
            max_message_bytes,
        }
    }
}

impl WorkerSettings {
    /// Settings with the paper's rollout defaults, the default template and rewards, on CPU in
    /// f32, with no health or metrics endpoint.
    pub fn new(name: impl Into<String>, coordinator: impl Into<String>, learner: impl Into<String>, model_dir: impl Into<PathBuf>) -> Self {
        WorkerSettings {
            name: name.into(),
            coordinator: coordinator.into(),
            learner: learner.into(),
            model_dir: model_dir.into(),
            dtype: DType::F32,
            device: Device::Cpu,
            rollout: RolloutConfig::default(),
            template: PromptTemplate::default(),
            system_prompt: None,
            rewards: RewardConfig::default(),
            health_listen: None,
            metrics_listen: None,
            auth: ClientAuth::none(),
            tls: None,
            tuning: WorkerTuning::default(),
        }
    }

    /// The part every group is sampled with.
    pub fn group_settings(&self) -> GroupSettings {
        GroupSettings { rollout: self.rollout.clone(), template: self.template, system_prompt: self.system_prompt.clone(), rewards: self.rewards }
    }
}
