//! `run_dir/metrics.jsonl`: one JSON line per optimizer step, appended and flushed as the step
//! ends, for plots and for people reading a run. After a learner restart, steps newer than the
//! checkpoint appear twice (the lost one and its redo); readers keep the last line per step.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::service::error::{ServiceError, ServiceResult};

/// File name of the per-step metrics inside the run directory.
pub const METRICS_JSONL: &str = "metrics.jsonl";

/// What one step did, as logged and as [`crate::service::LearnerHandle::state`] reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepSummary {
    /// Optimizer steps taken after this one (equals `version`).
    pub step: u64,
    /// Policy version the step produced.
    pub version: u64,
    /// Loss of the step.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Mean total reward over the step's completions.
    pub mean_reward: f64,
    /// Mean accuracy reward.
    pub mean_accuracy: f64,
    /// Mean format reward.
    pub mean_format: f64,
    /// Completion tokens in the loss.
    pub tokens: usize,
    /// Groups trained.
    pub groups: usize,
    /// Groups taken but refused at step time (too stale or unusable); their prompts were requeued.
    pub refused: usize,
    /// Mean over the trained groups of the step's starting version minus the version each was sampled with.
    pub mean_staleness: f64,
    /// Largest such difference (0 for an on-policy step).
    pub max_staleness: u64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Seconds from taking the groups to the optimizer step's end.
    pub step_seconds: f64,
    /// Seconds to encode and publish the new weights.
    pub publish_seconds: f64,
    /// Size of the published weight blob.
    pub weight_bytes: usize,
    /// Wall clock at the end of the step, seconds since the Unix epoch.
    pub time: f64,
}

/// The open metrics file.
#[derive(Debug)]
pub struct StepLog {
    path: PathBuf,
    file: File,
}

impl StepLog {
    /// Opens `path` for appending (creating it).
    pub fn open(path: &Path) -> ServiceResult<StepLog> {
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| ServiceError::io(path, e))?;
        Ok(StepLog { path: path.to_path_buf(), file })
    }

    /// Appends one step's line. Not fsynced: losing the last lines in a crash loses no training.
    pub fn append(&mut self, summary: &StepSummary) -> ServiceResult<()> {
        let mut line = serde_json::to_string(summary).map_err(|e| ServiceError::io(&self.path, std::io::Error::other(e)))?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).and_then(|()| self.file.flush()).map_err(|e| ServiceError::io(&self.path, e))
    }
}
