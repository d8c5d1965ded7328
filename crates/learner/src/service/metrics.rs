//! Prometheus metrics of the learner (its `/metrics` endpoint is `medrl_proto::metrics`). Step figures are set when a step
//! ends; gauges describing the state (buffer, version) are refreshed at scrape time so they cannot
//! drift from it.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::service::steplog::StepSummary;

/// `outcome` label of submitted groups.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// accepted, duplicate, stale, invalid or full.
    pub outcome: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric of the learner.
pub struct LearnerMetrics {
    registry: Registry,
    /// Seconds per optimizer step (taking groups to the optimizer step's end).
    pub step_seconds: Histogram,
    /// Seconds to encode and publish one version's weights.
    pub publish_seconds: Histogram,
    /// Versions a trained group lagged the version it was trained at.
    pub staleness: Histogram,
    /// Submitted groups by outcome.
    pub groups: Family<OutcomeLabel, Counter>,
    /// Optimizer steps taken by this process.
    pub steps: Counter,
    /// Steps that failed (their prompts were requeued).
    pub step_failures: Counter,
    /// Images fetched from the coordinator (cache misses).
    pub image_fetches: Counter,
    /// Size of the last published weight blob.
    pub publish_bytes: Gauge,
    /// Completion tokens in the last step's loss.
    pub tokens_per_step: Gauge,
    /// Last step's mean total reward.
    pub mean_reward: FloatGauge,
    /// Last step's mean accuracy reward.
    pub accuracy: FloatGauge,
    /// Last step's pre-clip gradient norm.
    pub grad_norm: FloatGauge,
    /// Last step's loss.
    pub loss: FloatGauge,
    /// The published policy version.
    pub policy_version: Gauge,
    /// Groups waiting for a step.
    pub buffered_groups: Gauge,
}

impl Default for LearnerMetrics {
    fn default() -> Self {
        LearnerMetrics::new()
    }
}

impl LearnerMetrics {
    /// Creates and registers every metric under the `medrl_learner_` prefix.
    pub fn new() -> LearnerMetrics {
        let mut registry = Registry::with_prefix("medrl_learner");
        let m = LearnerMetrics {
            // 10 ms .. about 45 min: tiny CPU steps to 7B steps.
            step_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 19)),
            // 1 ms .. about 9 min.
            publish_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            staleness: Histogram::new([0.0, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0]),
            groups: Family::default(),
            steps: Counter::default(),
            step_failures: Counter::default(),
            image_fetches: Counter::default(),
            publish_bytes: Gauge::default(),
            tokens_per_step: Gauge::default(),
            mean_reward: FloatGauge::default(),
            accuracy: FloatGauge::default(),
            grad_norm: FloatGauge::default(),
            loss: FloatGauge::default(),
            policy_version: Gauge::default(),
            buffered_groups: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("step_seconds", "Seconds per optimizer step", m.step_seconds.clone());
        registry.register("weight_publish_seconds", "Seconds to encode and publish one version's weights", m.publish_seconds.clone());
        registry.register("group_staleness_versions", "Versions a trained group lagged the learner", m.staleness.clone());
        // Counters get `_total` appended by the encoder.
        registry.register("groups", "Submitted rollout groups by outcome", m.groups.clone());
        registry.register("steps", "Optimizer steps taken by this process", m.steps.clone());
        registry.register("step_failures", "Steps that failed; their prompts were requeued", m.step_failures.clone());
        registry.register("image_fetches", "Images fetched from the coordinator (cache misses)", m.image_fetches.clone());
        registry.register("weight_publish_bytes", "Bytes of the last published weight blob", m.publish_bytes.clone());
        registry.register("tokens_per_step", "Completion tokens in the last step's loss", m.tokens_per_step.clone());
        registry.register("mean_reward", "Mean total reward of the last step's completions", m.mean_reward.clone());
        registry.register("accuracy", "Mean accuracy reward of the last step's completions", m.accuracy.clone());
        registry.register("grad_norm", "Gradient norm of the last step before clipping", m.grad_norm.clone());
        registry.register("loss", "Loss of the last step", m.loss.clone());
        registry.register("policy_version", "Published policy version", m.policy_version.clone());
        registry.register("buffered_groups", "Groups waiting for a step", m.buffered_groups.clone());
        LearnerMetrics { registry, ..m }
    }

    /// Counts a submitted group.
    pub fn count_group(&self, outcome: &'static str) {
        self.groups.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Records a finished step.
    pub fn observe_step(&self, s: &StepSummary) {
        self.steps.inc();
        self.step_seconds.observe(s.step_seconds);
        self.publish_seconds.observe(s.publish_seconds);
        self.publish_bytes.set(s.weight_bytes as i64);
        self.tokens_per_step.set(s.tokens as i64);
        self.mean_reward.set(s.mean_reward);
        self.accuracy.set(s.mean_accuracy);
        self.grad_norm.set(s.grad_norm);
        self.loss.set(s.loss);
        self.policy_version.set(s.version as i64);
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
