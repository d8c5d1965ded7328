//! Prometheus metrics of the coordinator (its `/metrics` endpoint is `medrl_proto::metrics`). Counters and histograms are
//! updated as calls happen; gauges that describe the state (prompts by state, versions, support
//! map) are refreshed from the state at scrape time, so they can never drift from it.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::core::Core;
use crate::support::SupportClass;

/// `state` label of the prompt gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// pending, leased, delivered, trained, skipped or failed.
    pub state: &'static str,
}

/// `modality` and `class` labels of the support map.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SupportLabel {
    /// Record modality (dataset when empty).
    pub modality: String,
    /// unseen, zero, partial or saturated.
    pub class: &'static str,
}

/// `modality` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModalityLabel {
    /// Record modality (dataset when empty).
    pub modality: String,
}

/// `reason` label of skip counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// zero_support or saturated.
    pub reason: &'static str,
}

/// `rpc` and `code` labels of refused calls.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcErrorLabel {
    /// Method name.
    pub rpc: &'static str,
    /// gRPC status code name.
    pub code: String,
}

/// Every metric of the coordinator.
pub struct Metrics {
    registry: Registry,
    /// Leases handed out.
    pub leases_granted: Counter,
    /// Leases that expired (deadline passed or worker died).
    pub leases_expired: Counter,
    /// Prompts handed out in leases.
    pub prompts_leased: Counter,
    /// Prompts newly delivered to the learner (acked).
    pub prompts_delivered: Counter,
    /// Prompts newly trained.
    pub prompts_trained: Counter,
    /// Prompts skipped, by reason.
    pub prompts_skipped: Family<ReasonLabel, Counter>,
    /// Prompts returned to the queue (expiry, partial acks, learner refusal or restart).
    pub prompts_requeued: Counter,
    /// Workers declared dead.
    pub workers_lost: Counter,
    /// Time to answer LeasePrompts, seconds.
    pub lease_latency: Histogram,
    /// Learner version minus lease version at delivery, in versions.
    pub delivered_staleness: Histogram,
    /// Refused calls by method and status code.
    pub rpc_errors: Family<RpcErrorLabel, Counter>,
    prompts: Family<StateLabel, Gauge>,
    policy_version: Gauge,
    learner_version: Gauge,
    active_staleness: Gauge,
    workers_alive: Gauge,
    epoch: Gauge,
    done: Gauge,
    support: Family<SupportLabel, Gauge>,
    pass_rate: Family<ModalityLabel, Gauge<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `medrl_coordinator_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("medrl_coordinator");
        let m = Metrics {
            leases_granted: Counter::default(),
            leases_expired: Counter::default(),
            prompts_leased: Counter::default(),
            prompts_delivered: Counter::default(),
            prompts_trained: Counter::default(),
            prompts_skipped: Family::default(),
            prompts_requeued: Counter::default(),
            workers_lost: Counter::default(),
            // 100 µs .. about 26 s.
            lease_latency: Histogram::new(exponential_buckets(1e-4, 2.0, 18)),
            delivered_staleness: Histogram::new([0.0, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0]),
            rpc_errors: Family::default(),
            prompts: Family::default(),
            policy_version: Gauge::default(),
            learner_version: Gauge::default(),
            active_staleness: Gauge::default(),
            workers_alive: Gauge::default(),
            epoch: Gauge::default(),
            done: Gauge::default(),
            support: Family::default(),
            pass_rate: Family::default(),
            registry: Registry::default(),
        };
        // Counters get `_total` appended by the encoder.
        registry.register("leases_granted", "Leases handed out", m.leases_granted.clone());
        registry.register("leases_expired", "Leases expired (deadline passed or worker dead)", m.leases_expired.clone());
        registry.register("prompts_leased", "Prompts handed out in leases", m.prompts_leased.clone());
        registry.register("prompts_delivered", "Prompts whose groups reached the learner", m.prompts_delivered.clone());
        registry.register("prompts_trained", "Prompts trained by the learner", m.prompts_trained.clone());
        registry.register("prompts_skipped", "Prompts skipped by support-aware scheduling", m.prompts_skipped.clone());
        registry.register("prompts_requeued", "Prompts returned to the queue", m.prompts_requeued.clone());
        registry.register("workers_lost", "Workers declared dead after missed heartbeats", m.workers_lost.clone());
        registry.register("lease_latency_seconds", "Time to answer LeasePrompts, in seconds", m.lease_latency.clone());
        registry.register(
            "delivered_staleness_versions",
            "Learner version minus the lease's policy version when a group was delivered",
            m.delivered_staleness.clone(),
        );
        registry.register("rpc_errors", "Calls refused with an error status, by method and code", m.rpc_errors.clone());
        registry.register("prompts", "Prompts of the current epoch by state", m.prompts.clone());
        registry.register("policy_version", "Published policy version", m.policy_version.clone());
        registry.register("learner_version", "Newest version reported by the learner", m.learner_version.clone());
        registry.register(
            "active_staleness_versions",
            "Largest learner-version lag among active leases",
            m.active_staleness.clone(),
        );
        registry.register("workers_alive", "Workers with a recent heartbeat", m.workers_alive.clone());
        registry.register("epoch", "Oldest epoch with unfinished prompts", m.epoch.clone());
        registry.register("run_done", "1 when every prompt of every epoch is finished", m.done.clone());
        registry.register("support_prompts", "Prompts per modality and support class (from acked pass rates)", m.support.clone());
        registry.register("modality_pass_rate", "Mean last pass rate of observed prompts per modality", m.pass_rate.clone());
        Metrics { registry, ..m }
    }

    /// Counts a refused call.
    pub fn count_error(&self, rpc: &'static str, status: &tonic::Status) {
        self.rpc_errors.get_or_create(&RpcErrorLabel { rpc, code: format!("{:?}", status.code()) }).inc();
    }

    /// Refreshes the state gauges from the core.
    pub fn refresh(&self, core: &Core) {
        let current = core.current_epoch();
        let counts = core.epochs().get(current as usize).map(|e| e.counts()).unwrap_or_default();
        for (state, value) in [
            ("pending", counts.pending),
            ("leased", counts.leased),
            ("delivered", counts.delivered),
            ("trained", counts.trained),
            ("skipped", counts.skipped),
            ("failed", counts.failed),
        ] {
            self.prompts.get_or_create(&StateLabel { state }).set(i64::from(value));
        }
        self.policy_version.set(core.published_version() as i64);
        self.learner_version.set(core.learner_version() as i64);
        self.active_staleness.set(core.max_active_staleness() as i64);
        self.workers_alive.set(i64::from(core.workers_alive()));
        self.epoch.set(i64::from(current));
        self.done.set(i64::from(core.is_done()));
        for entry in core.support_map() {
            for (class, count) in SupportClass::ALL.iter().zip(entry.counts) {
                let label = SupportLabel { modality: entry.modality.clone(), class: class.as_str() };
                self.support.get_or_create(&label).set(i64::from(count));
            }
            if let Some(rate) = entry.mean_pass_rate {
                self.pass_rate.get_or_create(&ModalityLabel { modality: entry.modality.clone() }).set(rate);
            }
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
