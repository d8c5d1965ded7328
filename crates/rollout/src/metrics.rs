//! Prometheus metrics of a rollout worker and their `/metrics` endpoint.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `outcome` label of delivered groups.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// accepted, duplicate, stale, invalid or undelivered.
    pub outcome: &'static str,
}

/// Every metric of the worker, under the `medrl_rollout_` prefix.
pub struct WorkerMetrics {
    registry: Registry,
    /// Completion tokens sampled.
    pub tokens: Counter,
    /// Completion tokens per second of the latest group.
    pub tokens_per_second: Gauge<f64, AtomicU64>,
    /// Time to answer LeasePrompts, seconds.
    pub lease_latency: Histogram,
    /// Groups sent to the learner, by how the learner took them.
    pub groups: Family<OutcomeLabel, Counter>,
    /// Prompts that could not be sampled (bad record, image, length, model error).
    pub prompts_failed: Counter,
    /// Retried group submissions.
    pub submit_retries: Counter,
    /// Time to download, decode and install a weight version, seconds.
    pub weight_fetch: Histogram,
    /// Weight fetch tries that failed (the old weights stayed).
    pub weight_failures: Counter,
    /// Policy version held.
    pub policy_version: Gauge,
    /// Newest published version known.
    pub published_version: Gauge,
    /// Published minus held version.
    pub staleness: Gauge,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics::new()
    }
}

impl WorkerMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("medrl_rollout");
        let tokens = Counter::default();
        let tokens_per_second = Gauge::<f64, AtomicU64>::default();
        // 1 ms .. about 65 s.
        let lease_latency = Histogram::new(exponential_buckets(1e-3, 2.0, 17));
        let groups = Family::<OutcomeLabel, Counter>::default();
        let prompts_failed = Counter::default();
        let submit_retries = Counter::default();
        // 10 ms .. about 22 min: from the tiny model on loopback to 16 GB over a slow link.
        let weight_fetch = Histogram::new(exponential_buckets(1e-2, 2.0, 18));
        let weight_failures = Counter::default();
        let policy_version = Gauge::default();
        let published_version = Gauge::default();
        let staleness = Gauge::default();
        // Counters get `_total` appended by the encoder.
        registry.register("tokens", "Completion tokens sampled", tokens.clone());
        registry.register("tokens_per_second", "Completion tokens per second of the latest group", tokens_per_second.clone());
        registry.register("lease_latency_seconds", "Time for the coordinator to answer LeasePrompts", lease_latency.clone());
        registry.register("groups_sent", "Rollout groups sent to the learner, by outcome", groups.clone());
        registry.register("prompts_failed", "Leased prompts that could not be sampled", prompts_failed.clone());
        registry.register("submit_retries", "Group submissions retried after a learner error", submit_retries.clone());
        registry.register("weight_fetch_seconds", "Time to fetch, decode and install new weights", weight_fetch.clone());
        registry.register("weight_fetch_failures", "Weight fetch tries that failed; the old weights stayed", weight_failures.clone());
        registry.register("policy_version", "Policy version whose weights the worker holds", policy_version.clone());
        registry.register("published_version", "Newest policy version the coordinator published", published_version.clone());
        registry.register("staleness_versions", "Published version minus the version held", staleness.clone());
        WorkerMetrics {
            registry,
            tokens,
            tokens_per_second,
            lease_latency,
            groups,
            prompts_failed,
            submit_retries,
            weight_fetch,
            weight_failures,
            policy_version,
            published_version,
            staleness,
        }
    }

    /// Counts a group by outcome.
    pub fn group(&self, outcome: &'static str) {
        self.groups.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Sets the version gauges.
    pub fn versions(&self, held: u64, published: u64) {
        self.policy_version.set(held as i64);
        self.published_version.set(published as i64);
        self.staleness.set(published.saturating_sub(held) as i64);
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Binds the metrics listener (port 0 picks a free port).
pub use medrl_proto::server::listen as bind;

/// Serves `GET /metrics` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<WorkerMetrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    medrl_proto::metrics::serve_metrics(listener, Arc::new(move || metrics.encode().map_err(|e| e.to_string())), stop).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported() {
        let m = WorkerMetrics::new();
        m.tokens.inc_by(12);
        m.group("accepted");
        m.versions(2, 3);
        m.lease_latency.observe(0.01);
        m.weight_fetch.observe(0.5);
        let text = m.encode().expect("encode");
        for needle in [
            "medrl_rollout_tokens_total 12",
            "medrl_rollout_tokens_per_second",
            "medrl_rollout_lease_latency_seconds_bucket",
            "medrl_rollout_groups_sent_total{outcome=\"accepted\"} 1",
            "medrl_rollout_weight_fetch_seconds_count 1",
            "medrl_rollout_policy_version 2",
            "medrl_rollout_staleness_versions 1",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
