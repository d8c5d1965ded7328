//! Settings of the learner role server, with documented defaults and validation that names the
//! offending field. Security (token, TLS) is carried by the server and client options, which the
//! binary fills from the config's `security` section.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use candle_core::DType;
use medrl_proto::{ClientOptions, ServerOptions};
use serde::{Deserialize, Serialize};

use crate::config::LearnerConfig;
use crate::service::error::ServiceError;

/// The dtype weight blobs are published in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightDType {
    /// The dtype the learner's model runs in (default).
    #[default]
    Model,
    /// 32-bit floats.
    F32,
    /// bfloat16: half the bytes of f32, what GPU workers run.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl WeightDType {
    /// The candle dtype, given the model's.
    pub fn resolve(self, model: DType) -> DType {
        match self {
            WeightDType::Model => model,
            WeightDType::F32 => DType::F32,
            WeightDType::Bf16 => DType::BF16,
            WeightDType::F16 => DType::F16,
        }
    }
}

/// Everything the learner role needs besides its trainer. Unknown keys are errors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearnerSettings {
    /// gRPC listen address of the Learner and Weights services (default `127.0.0.1:50052`).
    pub listen: SocketAddr,
    /// The coordinator's endpoint URL (default `http://127.0.0.1:50051`).
    pub coordinator: String,
    /// Run directory: checkpoints, the consumed log, metrics.jsonl and the final model.
    pub run_dir: PathBuf,
    /// The model the run started from (recorded in checkpoints; LoRA resumes load it).
    pub base_model: PathBuf,
    /// Prompt groups per optimizer step (default 4; must match the coordinator's).
    pub prompts_per_step: usize,
    /// Versions a group may lag the learner (default 0, strictly on-policy).
    pub max_staleness: u64,
    /// Checkpoint every this many steps (default 200; 0: only at the end).
    pub save_every: u64,
    /// Prometheus `/metrics` listen address; `null` turns it off (default `127.0.0.1:9465`).
    pub metrics_listen: Option<SocketAddr>,
    /// Bytes of encoded images kept in memory between steps (default 256 MiB).
    pub image_cache_bytes: u64,
    /// Largest image accepted from the coordinator, in bytes (default 32 MiB).
    pub max_image_bytes: u64,
    /// Payload bytes per weight chunk (default 4 MiB).
    pub weight_chunk_bytes: usize,
    /// The dtype weights are published in (default `model`).
    pub weight_dtype: WeightDType,
    /// Groups buffered at most; beyond it SubmitGroups answers RESOURCE_EXHAUSTED (default 4096).
    pub max_buffered_groups: usize,
    /// Completions a group may carry (default 256).
    pub max_completions_per_group: usize,
    /// Prompt plus completion tokens a group's longest sequence may have (default 32768).
    pub max_sequence_tokens: usize,
    /// Milliseconds between run-state polls while waiting for groups (default 200).
    pub poll_interval_ms: u64,
    /// Deadline of one coordinator call, seconds (default 30).
    pub rpc_timeout_s: f64,
    /// How long failing coordinator calls are retried before the learner gives up, seconds
    /// (default 300), so a coordinator restart does not stop the learner.
    pub coordinator_retry_s: f64,
    /// Seconds without progress after which health reports NOT_SERVING (default 1800).
    pub stall_timeout_s: f64,
    /// Longest a FetchWeights call waits for a version not yet published, seconds (default 600).
    pub weight_wait_s: f64,
    /// Consecutive failed steps after which the learner stops (default 3).
    pub max_step_failures: u32,
    /// gRPC server limits, token and TLS (from the config's `security` section).
    #[serde(skip)]
    pub server: ServerOptions,
    /// Client options for the coordinator (limits, token, TLS).
    #[serde(skip)]
    pub client: ClientOptions,
}

impl Default for LearnerSettings {
    fn default() -> Self {
        LearnerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
            coordinator: "http://127.0.0.1:50051".into(),
            run_dir: PathBuf::from("runs/default"),
            base_model: PathBuf::new(),
            prompts_per_step: 4,
            max_staleness: 0,
            save_every: 200,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9465))),
            image_cache_bytes: 256 << 20,
            max_image_bytes: 32 << 20,
            weight_chunk_bytes: 4 << 20,
            weight_dtype: WeightDType::Model,
            max_buffered_groups: 4096,
            max_completions_per_group: 256,
            max_sequence_tokens: 32768,
            poll_interval_ms: 200,
            rpc_timeout_s: 30.0,
            coordinator_retry_s: 300.0,
            stall_timeout_s: 1800.0,
            weight_wait_s: 600.0,
            max_step_failures: 3,
            server: ServerOptions::default(),
            client: ClientOptions::default(),
        }
    }
}

fn positive_secs(field: &'static str, value: f64) -> Result<(), ServiceError> {
    if value.is_finite() && value > 0.0 && value < 1e9 {
        Ok(())
    } else {
        Err(ServiceError::settings(field, format!("expected a positive number of seconds, found {value}")))
    }
}

impl LearnerSettings {
    /// Default settings with the checkpoint period of the `learner` section.
    pub fn from_learner_config(config: &LearnerConfig) -> Self {
        LearnerSettings { save_every: config.save_every, ..LearnerSettings::default() }
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ServiceError> {
        if self.coordinator.trim().is_empty() {
            return Err(ServiceError::settings("coordinator", "expected the coordinator's endpoint URL"));
        }
        if self.run_dir.as_os_str().is_empty() {
            return Err(ServiceError::settings("run_dir", "expected a directory"));
        }
        for (field, value) in [
            ("prompts_per_step", self.prompts_per_step),
            ("max_buffered_groups", self.max_buffered_groups),
            ("max_completions_per_group", self.max_completions_per_group),
            ("max_sequence_tokens", self.max_sequence_tokens),
        ] {
            if value == 0 {
                return Err(ServiceError::settings(field, "must be at least 1"));
            }
        }
        if self.max_buffered_groups < self.prompts_per_step {
            return Err(ServiceError::settings(
                "max_buffered_groups",
                format!("{} cannot hold one step of {} groups", self.max_buffered_groups, self.prompts_per_step),
            ));
        }
        if self.max_image_bytes == 0 {
            return Err(ServiceError::settings("max_image_bytes", "must be at least 1"));
        }
        if self.weight_chunk_bytes == 0 || self.weight_chunk_bytes > medrl_weight_sync::publisher::MAX_CHUNK_BYTES {
            return Err(ServiceError::settings(
                "weight_chunk_bytes",
                format!("{} is outside 1..={}", self.weight_chunk_bytes, medrl_weight_sync::publisher::MAX_CHUNK_BYTES),
            ));
        }
        if self.poll_interval_ms == 0 {
            return Err(ServiceError::settings("poll_interval_ms", "must be at least 1"));
        }
        positive_secs("rpc_timeout_s", self.rpc_timeout_s)?;
        positive_secs("coordinator_retry_s", self.coordinator_retry_s)?;
        positive_secs("stall_timeout_s", self.stall_timeout_s)?;
        positive_secs("weight_wait_s", self.weight_wait_s)?;
        if self.max_step_failures == 0 {
            return Err(ServiceError::settings("max_step_failures", "must be at least 1"));
        }
        Ok(())
    }

    /// Interval between run-state polls.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    /// Deadline of one coordinator call.
    pub fn rpc_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.rpc_timeout_s)
    }

    /// Retry window of coordinator calls.
    pub fn coordinator_retry(&self) -> Duration {
        Duration::from_secs_f64(self.coordinator_retry_s)
    }

    /// Time without progress before health turns NOT_SERVING.
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.stall_timeout_s)
    }

    /// Longest wait of a FetchWeights call.
    pub fn weight_wait(&self) -> Duration {
        Duration::from_secs_f64(self.weight_wait_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_typos_are_named() {
        LearnerSettings::default().validate().expect("defaults are valid");
        let parsed: LearnerSettings = serde_json::from_str(r#"{"max_staleness": 1, "weight_dtype": "bf16"}"#).expect("parses");
        assert_eq!((parsed.max_staleness, parsed.weight_dtype), (1, WeightDType::Bf16));
        let err = serde_json::from_str::<LearnerSettings>(r#"{"prompt_per_step": 3}"#).expect_err("typo");
        assert!(err.to_string().contains("prompt_per_step"), "{err}");
        let bad = LearnerSettings { prompts_per_step: 0, ..Default::default() };
        assert!(bad.validate().expect_err("zero").to_string().contains("prompts_per_step"));
        let bad = LearnerSettings { rpc_timeout_s: f64::NAN, ..Default::default() };
        assert!(bad.validate().expect_err("nan").to_string().contains("rpc_timeout_s"));
    }
}
