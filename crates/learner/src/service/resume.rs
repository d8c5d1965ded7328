//! Starting a learner's trainer: from the newest complete checkpoint of the run when there is one,
//! otherwise from the base model.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::Result;
use crate::checkpoint::{latest_checkpoint, remove_partial_checkpoints};
use crate::config::{AlgorithmConfig, LearnerConfig};
use crate::trainer::Trainer;

/// Resumes from the newest checkpoint under `run_dir`, or loads `base_model` fresh. Returns the
/// trainer and the checkpoint it resumed from (`None` for a fresh start).
pub fn resume_or_new(
    run_dir: &Path,
    base_model: &Path,
    algorithm: AlgorithmConfig,
    config: LearnerConfig,
    dtype: DType,
    device: &Device,
) -> Result<(Trainer, Option<PathBuf>)> {
    for partial in remove_partial_checkpoints(run_dir)? {
        tracing::warn!(path = %partial.display(), "removed a partial checkpoint (its writing was cut short)");
    }
    match latest_checkpoint(run_dir) {
        Some(checkpoint) => {
            let trainer = Trainer::resume(&checkpoint, algorithm, config, dtype, device)?;
            tracing::info!(checkpoint = %checkpoint.display(), step = trainer.step, "resuming the learner");
            Ok((trainer, Some(checkpoint)))
        }
        None => {
            tracing::info!(model = %base_model.display(), "starting the learner from the base model");
            Ok((Trainer::new(base_model, algorithm, config, dtype, device)?, None))
        }
    }
}
