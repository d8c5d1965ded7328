//! The policy the worker samples with: a loaded model and the version of its weights. Loading,
//! sampling and swapping weights run on blocking threads so the async runtime (heartbeats,
//! deliveries, health) stays responsive while the model computes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use candle_core::{DType, Device};
use medrl_model::model::Qwen25Vl;
use medrl_model::pipeline::Vlm;

use crate::error::{PromptError, WeightError, WorkerError};
use crate::sample::{GroupJob, GroupSettings, SampledGroup, sample_group};

/// A model and the policy version of its weights.
pub struct Policy {
    vlm: Arc<Vlm>,
    version: u64,
    dir: PathBuf,
    dtype: DType,
    device: Device,
}

impl Policy {
    /// Loads the model directory as version 0 (the initial weights).
    pub async fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Policy, WorkerError> {
        let (d, dev) = (dir.to_path_buf(), device.clone());
        let vlm = tokio::task::spawn_blocking(move || Vlm::load_for_inference(&d, dtype, &dev))
            .await
            .map_err(|e| WorkerError::Task(format!("model load: {e}")))?
            .map_err(WorkerError::LoadModel)?;
        Ok(Policy { vlm: Arc::new(vlm), version: 0, dir: dir.to_path_buf(), dtype, device: device.clone() })
    }

    /// The version of the weights held.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The loaded model, processor and tokenizer.
    pub fn vlm(&self) -> &Vlm {
        &self.vlm
    }

    /// Samples one group with the weights held now. The group is sampled entirely with these
    /// weights: a swap can only happen between calls, because it needs `&mut self`.
    pub async fn sample(&self, job: GroupJob, settings: Arc<GroupSettings>) -> Result<SampledGroup, PromptError> {
        let (vlm, version) = (self.vlm.clone(), self.version);
        let prompt_id = job.prompt.prompt_id.clone();
        tokio::task::spawn_blocking(move || sample_group(&vlm, version, job, &settings))
            .await
            .map_err(|e| PromptError::Task { prompt_id, cause: e.to_string() })?
    }

    /// Decodes `blob` as weights of `version` and rebuilds the model from them; on any error the
    /// weights held stay in place, untouched. Gives the blob back for the next fetch to write
    /// into (`medrl_weight_sync::reusable_buffer`).
    pub async fn install(&mut self, version: u64, blob: Bytes) -> Result<Bytes, WeightError> {
        let config = self.vlm.model.config.clone();
        let (dir, dtype, device) = (self.dir.clone(), self.dtype, self.device.clone());
        let (vlm, blob) = tokio::task::spawn_blocking(move || {
            let weights =
                medrl_weight_sync::decode_weights(&blob, &config, dtype, &device).map_err(|cause| WeightError::Decode { version, cause })?;
            let mut model = Qwen25Vl::new(config, &weights, dtype, &device).map_err(|cause| WeightError::Build { version, cause })?;
            // Only the model holds the separate projections now, so fusing frees them layer by layer.
            drop(weights);
            model.fuse_projections().map_err(|cause| WeightError::Build { version, cause })?;
            let vlm = Vlm::from_parts(&dir, model).map_err(|cause| WeightError::Build { version, cause })?;
            Ok::<_, WeightError>((vlm, blob))
        })
        .await
        .map_err(|e| WeightError::Task(e.to_string()))??;
        self.vlm = Arc::new(vlm);
        self.version = version;
        Ok(blob)
    }
}
