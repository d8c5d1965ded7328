//! The coordinator's settings (`coordinator:` section of a run config), with documented defaults
//! and validation that names the offending field.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Settings of the coordinator role. Every field has a default; unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// gRPC listen address (default `127.0.0.1:50051`; use `0.0.0.0:50051` in a pod).
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address; `null` turns the endpoint off (default `127.0.0.1:9464`).
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds a lease lives unless renewed by heartbeats (default 600).
    pub lease_ttl_s: f64,
    /// Upper bound on a lease's life however often it is renewed, in seconds (default 7200), so a
    /// hung worker that still heartbeats cannot hold prompts forever.
    pub lease_max_lifetime_s: f64,
    /// Seconds between worker heartbeats (default 10).
    pub heartbeat_interval_s: f64,
    /// Missed heartbeats after which a worker is dead and its leases expire (default 3).
    pub worker_timeout_heartbeats: u32,
    /// Most prompts in one lease (default 1: one prompt per worker, as the paper's 4 GPUs × 1).
    pub prompts_per_lease: u32,
    /// Prompts in one learner step (default 4, the paper's 4 GPUs × 1 prompt).
    pub prompts_per_step: u32,
    /// Versions a group may lag the learner: 0 (default) is strictly on-policy, the paper's
    /// setting; s >= 1 lets at most s+1 steps of prompts be out ahead of the published version.
    pub max_staleness: u32,
    /// Passes over the prompt set (default 1).
    pub epochs: u32,
    /// Seed of the per-epoch shuffles (default 42, the paper's `--data_seed`).
    pub seed: u64,
    /// Append-only run journal (JSONL, fsynced); a restart replays it. `null` (default) keeps
    /// the run in memory only, so a restarted coordinator starts over.
    pub journal: Option<PathBuf>,
    /// Milliseconds an idle worker waits before asking again after an empty lease (default 500).
    pub retry_after_ms: u64,
    /// Seconds without progress after which health reports NOT_SERVING (default 1800).
    pub stall_timeout_s: f64,
    /// Grants of one prompt within an epoch before it is marked failed (default 10; 0 = never),
    /// so a prompt that crashes every worker cannot stop the run.
    pub max_attempts: u32,
    /// Largest gRPC message in bytes, both ways (default 64 MiB).
    pub max_message_bytes: usize,
    /// Largest image file served, in bytes (default 32 MiB); larger ones fail their prompt.
    pub max_image_bytes: u64,
    /// Seconds between sweeps for expired leases and dead workers (default 1).
    pub reaper_interval_s: f64,
    /// Seconds `medrl coordinator` keeps serving once the run is done (default 10), so workers
    /// and the learner hear `done` before the endpoint goes away (a worker that misses it retries
    /// a vanished coordinator until stopped); keep it above a few heartbeat intervals.
    pub linger_s: f64,
    /// Support-aware scheduling (off by default: the paper's run trains on every prompt).
    pub support: SupportConfig,
}

/// Skipping prompts whose groups carry no learning signal (issue 6 item 6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupportConfig {
    /// Turn skipping on (default false).
    pub enabled: bool,
    /// A prompt whose last pass rate is at most this has zero support (default 0.0).
    pub zero_support_max: f32,
    /// A prompt whose last pass rate is at least this is saturated (default 1.0).
    pub saturated_min: f32,
    /// Observed groups needed before a prompt may be skipped (default 1).
    pub min_observations: u32,
    /// Re-lease a skipped prompt when its last observation is this many epochs old, to refresh its
    /// pass rate (default 0 = never re-check).
    pub recheck_every_epochs: u32,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            lease_ttl_s: 600.0,
            lease_max_lifetime_s: 7200.0,
            heartbeat_interval_s: 10.0,
            worker_timeout_heartbeats: 3,
            prompts_per_lease: 1,
            prompts_per_step: 4,
            max_staleness: 0,
            epochs: 1,
            seed: 42,
            journal: None,
            retry_after_ms: 500,
            stall_timeout_s: 1800.0,
            max_attempts: 10,
            max_message_bytes: medrl_proto::server::DEFAULT_MAX_MESSAGE_BYTES,
            max_image_bytes: 32 * 1024 * 1024,
            reaper_interval_s: 1.0,
            linger_s: 10.0,
            support: SupportConfig::default(),
        }
    }
}

impl Default for SupportConfig {
    fn default() -> Self {
        SupportConfig { enabled: false, zero_support_max: 0.0, saturated_min: 1.0, min_observations: 1, recheck_every_epochs: 0 }
    }
}

/// A setting is out of range; names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("coordinator config: field `{field}`: {problem}")]
pub struct ConfigError {
    /// Dotted path of the field, e.g. `support.saturated_min`.
    pub field: &'static str,
    /// What was wrong and what was expected.
    pub problem: String,
}

fn positive_secs(field: &'static str, value: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value > 0.0 && value < 1e9 {
        Ok(())
    } else {
        Err(ConfigError { field, problem: format!("expected a positive number of seconds, found {value}") })
    }
}

fn at_least_one(field: &'static str, value: u64) -> Result<(), ConfigError> {
    if value >= 1 { Ok(()) } else { Err(ConfigError { field, problem: "expected at least 1, found 0".into() }) }
}

impl CoordinatorConfig {
    /// Checks ranges and relations between fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive_secs("lease_ttl_s", self.lease_ttl_s)?;
        positive_secs("lease_max_lifetime_s", self.lease_max_lifetime_s)?;
        positive_secs("heartbeat_interval_s", self.heartbeat_interval_s)?;
        positive_secs("stall_timeout_s", self.stall_timeout_s)?;
        positive_secs("reaper_interval_s", self.reaper_interval_s)?;
        if !(self.linger_s.is_finite() && (0.0..1e9).contains(&self.linger_s)) {
            return Err(ConfigError { field: "linger_s", problem: format!("expected seconds >= 0, found {}", self.linger_s) });
        }
        if self.lease_max_lifetime_s < self.lease_ttl_s {
            return Err(ConfigError {
                field: "lease_max_lifetime_s",
                problem: format!("{} is shorter than lease_ttl_s {}", self.lease_max_lifetime_s, self.lease_ttl_s),
            });
        }
        at_least_one("worker_timeout_heartbeats", self.worker_timeout_heartbeats.into())?;
        at_least_one("prompts_per_lease", self.prompts_per_lease.into())?;
        at_least_one("prompts_per_step", self.prompts_per_step.into())?;
        at_least_one("epochs", self.epochs.into())?;
        if self.max_message_bytes < 1024 {
            return Err(ConfigError { field: "max_message_bytes", problem: format!("{} is below 1024", self.max_message_bytes) });
        }
        at_least_one("max_image_bytes", self.max_image_bytes)?;
        if self.max_image_bytes.saturating_add(4096) > self.max_message_bytes as u64 {
            // An image travels in one GetImage response, with a little room for framing.
            return Err(ConfigError {
                field: "max_image_bytes",
                problem: format!("{} does not fit in max_message_bytes {} (less 4096 bytes of framing)", self.max_image_bytes, self.max_message_bytes),
            });
        }
        let s = &self.support;
        for (field, value) in [("support.zero_support_max", s.zero_support_max), ("support.saturated_min", s.saturated_min)] {
            if !(0.0..=1.0).contains(&value) {
                return Err(ConfigError { field, problem: format!("expected a pass rate in [0, 1], found {value}") });
            }
        }
        if s.zero_support_max >= s.saturated_min {
            return Err(ConfigError {
                field: "support.saturated_min",
                problem: format!("{} must be above support.zero_support_max {}", s.saturated_min, s.zero_support_max),
            });
        }
        at_least_one("support.min_observations", s.min_observations.into())?;
        Ok(())
    }

    /// Lease lifetime.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs_f64(self.lease_ttl_s)
    }

    /// Cap on a renewed lease's lifetime.
    pub fn lease_max_lifetime(&self) -> Duration {
        Duration::from_secs_f64(self.lease_max_lifetime_s)
    }

    /// Heartbeat period asked of workers.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_interval_s)
    }

    /// Time served after the run is done.
    pub fn linger(&self) -> Duration {
        Duration::from_secs_f64(self.linger_s)
    }

    /// Silence after which a worker is declared dead.
    pub fn worker_timeout(&self) -> Duration {
        self.heartbeat_interval() * self.worker_timeout_heartbeats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_unknown_keys_are_rejected() {
        CoordinatorConfig::default().validate().expect("defaults are valid");
        let parsed: CoordinatorConfig = serde_json::from_str(r#"{"max_staleness": 1, "support": {"enabled": true}}"#).expect("parses");
        assert_eq!(parsed.max_staleness, 1);
        assert_eq!(parsed.linger(), Duration::from_secs(10), "today's linger when the key is absent");
        assert!(parsed.support.enabled);
        let err = serde_json::from_str::<CoordinatorConfig>(r#"{"lease_ttl": 3}"#).expect_err("typo");
        assert!(err.to_string().contains("lease_ttl"), "{err}");
        let err = serde_json::from_str::<CoordinatorConfig>(r#"{"support": {"saturated": 1}}"#).expect_err("typo");
        assert!(err.to_string().contains("saturated"), "{err}");
    }

    #[test]
    fn ranges_name_the_field() {
        let bad = CoordinatorConfig { lease_ttl_s: -1.0, ..Default::default() };
        assert_eq!(bad.validate().expect_err("negative").field, "lease_ttl_s");
        let bad = CoordinatorConfig { prompts_per_step: 0, ..Default::default() };
        assert_eq!(bad.validate().expect_err("zero").field, "prompts_per_step");
        for linger_s in [-1.0, f64::NAN, f64::INFINITY] {
            let bad = CoordinatorConfig { linger_s, ..Default::default() };
            assert_eq!(bad.validate().expect_err("bad linger").field, "linger_s");
        }
        CoordinatorConfig { linger_s: 0.0, ..Default::default() }.validate().expect("no linger is valid");
        let mut bad = CoordinatorConfig::default();
        bad.support.zero_support_max = 0.9;
        bad.support.saturated_min = 0.5;
        assert_eq!(bad.validate().expect_err("inverted").field, "support.saturated_min");
    }
}
