//! Checkpoints: the merged model in the Hugging Face layout (so transformers and vLLM load it),
//! plus what an exact resume needs (optimizer state with f32 masters, LoRA adapters, the EMA
//! reference, the step). Written into a temporary folder and renamed, so a checkpoint is either
//! complete or absent.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use medrl_model::weights::Weights;
use serde::{Deserialize, Serialize};

use crate::config::{AlgorithmConfig, LearnerConfig, OptimizerKind, Trainable};
use crate::optim::{AdamW, Sgd};
use crate::policy::Policy;
use crate::trainer::{Opt, Trainer};
use crate::{Error, Result};

/// Files besides the weights that make a model directory loadable.
const MODEL_FILES: [&str; 11] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
];

const TRAINER_STATE: &str = "trainer.json";
const ADAPTERS: &str = "adapters.safetensors";
const REFERENCE: &str = "reference.safetensors";
const SHARD_BYTES: usize = 4 << 30;

/// What `trainer.json` records.
#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    /// The model the run started from (LoRA resumes load their base from here).
    base_model: PathBuf,
    trainable: Trainable,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Copies the tokenizer, processor and config files of `from` into `to`.
pub fn copy_model_files(from: &Path, to: &Path) -> Result<()> {
    for name in MODEL_FILES {
        let src = from.join(name);
        if src.exists() {
            std::fs::copy(&src, to.join(name)).map_err(io(&src))?;
        }
    }
    Ok(())
}

impl Trainer {
    /// Writes the merged model in the HF layout (weights in the model's dtype) to `dir`.
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        self.policy.merged_weights()?.save(dir, self.vlm.model.dtype(), SHARD_BYTES)?;
        copy_model_files(&self.vlm.dir, dir)
    }

    /// Writes a resumable checkpoint `run_dir/checkpoints/step-NNNNNN` atomically; returns its path.
    pub fn save_checkpoint(&self, run_dir: &Path, base_model: &Path) -> Result<PathBuf> {
        let root = run_dir.join("checkpoints");
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        let name = format!("step-{:06}", self.step);
        let tmp = root.join(format!(".{name}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        self.save_model(&tmp)?;
        if let Opt::AdamW(adamw) = &self.optimizer {
            adamw.save(&tmp)?;
        }
        if !self.policy.adapters.is_empty() {
            let adapters: std::collections::HashMap<String, candle_core::Tensor> = self.policy.adapter_tensors().into_iter().collect();
            candle_core::safetensors::save(&adapters, tmp.join(ADAPTERS))?;
        }
        if let Some((weights, _)) = &self.reference {
            let map: std::collections::HashMap<String, candle_core::Tensor> = weights.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            candle_core::safetensors::save(&map, tmp.join(REFERENCE))?;
        }
        let state = TrainerState { step: self.step, base_model: base_model.to_path_buf(), trainable: self.config.trainable };
        let json = serde_json::to_string_pretty(&state).map_err(|e| Error::Input(e.to_string()))?;
        std::fs::write(tmp.join(TRAINER_STATE), json).map_err(io(&tmp))?;
        crate::testhook::pause_if_asked("checkpoint", self.step);
        let dest = root.join(&name);
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
        }
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        Ok(dest)
    }

    /// Restores a trainer from a checkpoint written by [`Trainer::save_checkpoint`]; the next step
    /// equals the one an uninterrupted run would take.
    pub fn resume(checkpoint: &Path, algorithm: AlgorithmConfig, config: LearnerConfig, dtype: DType, device: &Device) -> Result<Self> {
        config.validate()?;
        let state_path = checkpoint.join(TRAINER_STATE);
        let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|source| Error::Json { path: state_path.clone(), source })?;
        if state.trainable != config.trainable {
            return Err(Error::Input(format!("{}: saved with trainable {:?}, the config says {:?}", state_path.display(), state.trainable, config.trainable)));
        }
        let (model, policy) = if config.trainable == Trainable::Lora {
            let (model, policy) = Policy::load(&state.base_model, &config, dtype, device)?;
            let path = checkpoint.join(ADAPTERS);
            let saved = candle_core::safetensors::load(&path, device)?;
            for (name, var) in &policy.params {
                let t = saved.get(name).ok_or_else(|| Error::Input(format!("{}: adapter {name} missing", path.display())))?;
                var.set(&t.to_dtype(var.dtype())?)?;
            }
            (model, policy)
        } else {
            Policy::load(checkpoint, &config, dtype, device)?
        };
        let optimizer = match config.optimizer.kind {
            // AdamW's masters are f32; setting the variables from them undoes the dtype rounding
            // of the saved HF weights.
            OptimizerKind::Adamw => Opt::AdamW(AdamW::load(checkpoint, policy.params.clone(), config.optimizer.placement())?),
            OptimizerKind::Sgd => Opt::Sgd(Sgd::new(policy.vars(), config.optimizer.lr)),
        };
        let reference_path = checkpoint.join(REFERENCE);
        let reference = if reference_path.exists() {
            let tensors = candle_core::safetensors::load(&reference_path, device)?;
            let converted = tensors.into_iter().map(|(k, v)| Ok((k, v.to_dtype(dtype)?))).collect::<Result<Vec<_>>>()?;
            Some(Weights::from_tensors(converted))
        } else {
            None
        };
        let mut trainer = Trainer::assemble(checkpoint, model, policy, algorithm, config, reference, Some(optimizer))?;
        trainer.step = state.step;
        Ok(trainer)
    }
}

/// Deletes the temporary folders of checkpoints whose writing was cut short (a crash before the
/// rename): [`latest_checkpoint`] never picks them, and for a large model each is gigabytes.
/// Returns the folders removed.
pub fn remove_partial_checkpoints(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let root = run_dir.join("checkpoints");
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&root)(e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(&root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".step-") && name.ends_with(".tmp") {
            let path = entry.path();
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// The newest complete checkpoint under `run_dir/checkpoints`, if any.
pub fn latest_checkpoint(run_dir: &Path) -> Option<PathBuf> {
    let root = run_dir.join("checkpoints");
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(&root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            e.path().join(TRAINER_STATE).exists().then_some((step, e.path()))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_checkpoints_are_never_picked_and_are_removed() -> std::io::Result<()> {
        let run = tempfile::tempdir()?;
        let root = run.path().join("checkpoints");
        for (name, complete) in [("step-000001", true), (".step-000002.tmp", true), ("step-000003", false)] {
            std::fs::create_dir_all(root.join(name))?;
            if complete {
                std::fs::write(root.join(name).join(TRAINER_STATE), "{}")?;
            }
        }
        // A temporary folder holding every file (the crash hit just before the rename) and a
        // folder without its state file are both incomplete.
        assert_eq!(latest_checkpoint(run.path()), Some(root.join("step-000001")));
        let removed = remove_partial_checkpoints(run.path()).map_err(std::io::Error::other)?;
        assert_eq!(removed, vec![root.join(".step-000002.tmp")]);
        assert!(root.join("step-000001").exists() && !root.join(".step-000002.tmp").exists());
        assert!(remove_partial_checkpoints(&run.path().join("absent")).map_err(std::io::Error::other)?.is_empty());
        Ok(())
    }
}
