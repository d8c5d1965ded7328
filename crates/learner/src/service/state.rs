//! State shared by the SubmitGroups handler, the step loop, the health watchdog and the handle:
//! the buffer, the consumed index, the version, counts, and the admission rule for one group.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use medrl_proto::v1::RolloutGroup;
use tokio::sync::Notify;

use crate::service::buffer::{Accepted, GroupBuffer};
use crate::service::consumed::ConsumedIndex;
use crate::service::error::{ServiceError, ServiceResult};
use crate::service::metrics::LearnerMetrics;
use crate::service::steplog::StepSummary;
use crate::service::validate::{Limits, validate_group};

/// Where the learner is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Accepting groups and stepping.
    Running,
    /// The run is finished; the final checkpoint and model are written.
    Done,
    /// Stopped by [`crate::service::LearnerHandle::shutdown`] before the run finished.
    Stopped,
    /// The step loop ended with an error.
    Failed(String),
}

/// How submitted groups were taken, since this process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubmitCounts {
    /// Taken for training.
    pub accepted: u64,
    /// Already held or trained.
    pub duplicate: u64,
    /// Too old.
    pub stale: u64,
    /// Malformed.
    pub invalid: u64,
}

/// A snapshot of the learner, for callers and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct LearnerStatus {
    /// Where the learner is in its life.
    pub phase: Phase,
    /// The published policy version.
    pub version: u64,
    /// Optimizer steps this process took.
    pub steps: u64,
    /// Groups waiting for a step.
    pub buffered: usize,
    /// Groups in the step being taken.
    pub in_training: usize,
    /// (epoch, prompt) pairs in the consumed log.
    pub consumed: usize,
    /// Submission outcomes.
    pub counts: SubmitCounts,
    /// The last step this process took.
    pub last_step: Option<StepSummary>,
}

/// What happened to one submitted group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Buffered for training.
    Accepted,
    /// Already held or trained; the worker may ack it as delivered.
    Duplicate,
    /// Sampled more than `max_staleness` versions ago.
    Stale,
    /// Malformed; the reason names the field.
    Invalid(String),
    /// The buffer is full; the worker should retry later.
    Full,
}

/// The mutable part, under one lock.
#[derive(Debug)]
pub struct Inner {
    /// Accepted groups.
    pub buffer: GroupBuffer,
    /// What the consumed log holds.
    pub consumed: ConsumedIndex,
    /// The published policy version.
    pub version: u64,
    /// Prompts refused as duplicates of the consumed log, to report as trained with the next
    /// step so the coordinator's accounting catches up (reports are idempotent).
    pub catch_up: BTreeMap<u32, BTreeSet<String>>,
    /// Submission outcomes.
    pub counts: SubmitCounts,
    /// Steps this process took.
    pub steps: u64,
    /// Last accepted group or finished step.
    pub last_progress: Instant,
    /// Where the learner is.
    pub phase: Phase,
    /// The last step.
    pub last_step: Option<StepSummary>,
}

/// Everything shared between the learner's tasks.
pub struct Shared {
    inner: Mutex<Inner>,
    /// Woken when a group is accepted, so the step loop need not poll for it.
    pub wake: Notify,
    /// Prometheus metrics.
    pub metrics: LearnerMetrics,
    /// Checks applied to every group.
    pub limits: Limits,
    /// Versions a group may lag.
    pub max_staleness: u64,
    /// Buffer capacity (pending plus in training).
    pub max_buffered: usize,
}

impl Shared {
    /// State at `version` with the consumed log's index.
    pub fn new(version: u64, consumed: ConsumedIndex, limits: Limits, max_staleness: u64, max_buffered: usize) -> Shared {
        let inner = Inner {
            buffer: GroupBuffer::default(),
            consumed,
            version,
            catch_up: BTreeMap::new(),
            counts: SubmitCounts::default(),
            steps: 0,
            last_progress: Instant::now(),
            phase: Phase::Running,
            last_step: None,
        };
        let metrics = LearnerMetrics::new();
        metrics.policy_version.set(version as i64);
        Shared { inner: Mutex::new(inner), wake: Notify::new(), metrics, limits, max_staleness, max_buffered }
    }

    /// Locks the state; a poisoned lock (a panic elsewhere) is an error, not a second panic.
    pub fn lock(&self) -> ServiceResult<MutexGuard<'_, Inner>> {
        self.inner.lock().map_err(|_| ServiceError::Stopped("learner state lock poisoned".into()))
    }

    /// True when `group_version` is too old to train at `current`.
    pub fn is_stale(&self, group_version: u64, current: u64) -> bool {
        group_version.saturating_add(self.max_staleness) < current
    }

    /// Validates, deduplicates and buffers one group. Order matters: a malformed group cannot be
    /// trusted to say who it duplicates, and a duplicate is reported as such even when stale, so
    /// the worker acks it as delivered instead of having it sampled again.
    pub fn admit(&self, group: RolloutGroup) -> ServiceResult<Verdict> {
        let mut inner = self.lock()?;
        let verdict = match validate_group(&group, &self.limits, inner.version) {
            Err(problem) => {
                inner.counts.invalid += 1;
                Verdict::Invalid(problem)
            }
            Ok(record) => {
                let in_log = inner.consumed.has_group(&group.group_id) || inner.consumed.has_prompt(group.epoch, &group.prompt_id);
                if in_log || inner.buffer.holds(&group.group_id, group.epoch, &group.prompt_id) {
                    if in_log {
                        inner.catch_up.entry(group.epoch).or_default().insert(group.prompt_id.clone());
                    }
                    inner.counts.duplicate += 1;
                    Verdict::Duplicate
                } else if self.is_stale(group.policy_version, inner.version) {
                    inner.counts.stale += 1;
                    Verdict::Stale
                } else if inner.buffer.len() + inner.buffer.in_training() >= self.max_buffered {
                    Verdict::Full
                } else {
                    inner.buffer.push(Accepted { group, record });
                    inner.counts.accepted += 1;
                    inner.last_progress = Instant::now();
                    Verdict::Accepted
                }
            }
        };
        drop(inner);
        let label = match &verdict {
            Verdict::Accepted => {
                self.wake.notify_one();
                "accepted"
            }
            Verdict::Duplicate => "duplicate",
            Verdict::Stale => "stale",
            Verdict::Invalid(_) => "invalid",
            Verdict::Full => "full",
        };
        self.metrics.count_group(label);
        Ok(verdict)
    }

    /// A snapshot for callers.
    pub fn status(&self) -> ServiceResult<LearnerStatus> {
        let inner = self.lock()?;
        Ok(LearnerStatus {
            phase: inner.phase.clone(),
            version: inner.version,
            steps: inner.steps,
            buffered: inner.buffer.len(),
            in_training: inner.buffer.in_training(),
            consumed: inner.consumed.len(),
            counts: inner.counts,
            last_step: inner.last_step.clone(),
        })
    }

    /// Sets the phase (the loop's end, or a stop).
    pub fn set_phase(&self, phase: Phase) {
        if let Ok(mut inner) = self.lock() {
            inner.phase = phase;
        }
    }

    /// Refreshes the state gauges and renders the metrics.
    pub fn scrape(&self) -> Result<String, String> {
        {
            let inner = self.lock().map_err(|e| e.to_string())?;
            self.metrics.buffered_groups.set(inner.buffer.len() as i64);
            self.metrics.policy_version.set(inner.version as i64);
        }
        self.metrics.encode().map_err(|e| e.to_string())
    }
}
